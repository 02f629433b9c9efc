//! wick: train, fine-tune and run neural networks on candle, on CPU and CUDA.

pub mod cli;
pub mod data;
pub mod device;
pub mod generate;
pub mod hub;
pub mod nn;
pub mod ops;
pub mod tokenizer;
pub mod train;

#[path = "../models/mod.rs"]
pub mod models;
