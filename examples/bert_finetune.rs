//! Fine-tune a BERT model on labelled texts or sentence pairs (classification or regression),
//! and predict with the result: the `wick finetune` and `wick predict` commands as one example
//! program, calling the same library functions.
//!
//! cargo run --release --example bert_finetune -- train --model ../shared/data/all-MiniLM-L6-v2 \
//!     --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv --output runs/sst2
//! cargo run --release --example bert_finetune -- predict --model runs/sst2 --text "a great film"
//! cargo run --release --example bert_finetune -- predict --model runs/sst2 --input ../shared/data/sst2/dev.tsv
//!
//! The output folder is a Hugging Face model folder (config.json with id2label, or
//! problem_type "regression"; model.safetensors; tokenizer) that `transformers` loads with
//! `from_pretrained`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use wick::cmd::{finetune, predict};

/// Fine-tune BERT-family models on labelled texts or sentence pairs, and predict with the result.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune a model on a labelled file (classification or regression); the best
    /// evaluation's weights are saved to --output as a Hugging Face model folder.
    Train(finetune::FinetuneArgs),
    /// Classify or score texts, sentence pairs or a whole file with a fine-tuned model.
    Predict(predict::PredictArgs),
}

fn main() -> anyhow::Result<()> {
    wick::keep_freed_memory();
    wick::cpu::join_thread_pool();
    match Cli::parse().command {
        Command::Train(args) => finetune::run(args),
        Command::Predict(args) => predict::run(args),
    }
}
