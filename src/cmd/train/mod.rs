//! `wick train`: the from-scratch training jobs, one subcommand each.

pub mod char_rnn;
pub mod gpt2;
pub mod mnist;

use anyhow::Result;
use clap::{Args, Subcommand};

/// Train a model from scratch: GPT-2 on a text corpus, an MLP/CNN/LeNet-5 on MNIST, or a
/// character-level LSTM/GRU on a text file. Each saves a model folder in --output, next to the
/// trainer's checkpoints, metrics.jsonl and loss_curve.svg.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(subcommand)]
    pub job: TrainJob,
}

#[derive(Subcommand, Debug)]
pub enum TrainJob {
    /// A small GPT-2 on a text file (nanoGPT-style), saved as a Hugging Face GPT-2 folder.
    Gpt2(gpt2::Gpt2Args),
    /// An MLP, CNN or LeNet-5 digit classifier on MNIST, with the test set's accuracy.
    Mnist(mnist::MnistArgs),
    /// A character-level LSTM/GRU language model (char-rnn) on a text file, with a sample.
    CharRnn(char_rnn::CharRnnArgs),
}

pub fn run(args: TrainArgs) -> Result<()> {
    match args.job {
        TrainJob::Gpt2(args) => gpt2::run(args),
        TrainJob::Mnist(args) => mnist::run(args),
        TrainJob::CharRnn(args) => char_rnn::run(args),
    }
}
