//! wick: train, fine-tune and run neural networks on candle, on CPU and CUDA.

pub mod cli;
pub mod cmd;
pub mod compress;
pub mod cpu;
pub mod data;
pub mod device;
pub mod dist;
pub mod embed;
pub mod generate;
pub mod hub;
pub mod nn;
pub mod ops;
pub mod pretrained;
pub mod quant;
pub mod serve;
pub mod tokenizer;
pub mod train;
pub mod weights;

#[path = "../models/mod.rs"]
pub mod models;

/// Makes mimalloc keep freed memory for reuse instead of handing it back to the OS. Training
/// allocates and frees the same large activation buffers every step; with mimalloc's default
/// purging the kernel re-faults and re-zeroes them each time, which measured 40% of a MiniLM
/// training step on the CPU (system time 4.6 s → 0.4 s over 4 steps). Call it first in `main`
/// when mimalloc is the global allocator (the examples and benches do); memory then stays at
/// its peak until exit.
pub fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc's option enum (v2 and v3); -1 = never purge.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is a plain store into mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}
