//! The `wick` command's subcommands, one module each: its clap arguments and a `run` function.
//! They live in the library so that the `wick` binary (src/main.rs) and the examples call the
//! same code; the work itself is done by the library's other modules.

pub mod distill;
pub mod download;
pub mod embed;
pub mod finetune;
pub mod generate;
pub mod info;
pub mod perplexity;
pub mod predict;
pub mod prune;
pub mod quantize;
pub mod serve;
pub mod train;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Train, fine-tune and run neural networks (GPT-2, BERT, MLP, CNN, LSTM/GRU) on candle, on the
/// CPU or CUDA. Models are Hub repo ids (downloaded into the Hugging Face cache) or local folders.
#[derive(Parser, Debug)]
#[command(name = "wick", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Continue prompts with a GPT-2 model (streamed; greedy or sampled).
    Generate(generate::GenerateArgs),
    /// Fine-tune a BERT-family model on labelled text (classification, sentence pairs, regression).
    Finetune(finetune::FinetuneArgs),
    /// Classify or score texts, sentence pairs or a whole file with a fine-tuned model.
    Predict(predict::PredictArgs),
    /// Sentence embeddings with a BERT-family encoder (all-MiniLM-L6-v2 by default).
    Embed(embed::EmbedArgs),
    /// Train a model from scratch (GPT-2, MNIST MLP/CNN, char-RNN).
    Train(train::TrainArgs),
    /// Quantize a GPT-2 or BERT model's linear layers (q8_0, q4_0, q4_k, q6_k) into a GGUF model folder.
    Quantize(quantize::QuantizeArgs),
    /// Distil a BERT classifier or GPT-2 model into a smaller student (fewer layers or a smaller config).
    Distill(distill::DistillArgs),
    /// Prune a BERT classifier or GPT-2 model (magnitude sparsity, FFN neurons, whole layers), with recovery fine-tuning.
    Prune(prune::PruneArgs),
    /// Perplexity of a GPT-2 model (f32, f16, bf16 or quantized) on a text file.
    Perplexity(perplexity::PerplexityArgs),
    /// Download a model from the Hugging Face Hub into the local cache.
    Download(download::DownloadArgs),
    /// Describe a model: architecture, parameters, dtype, size, where it was found.
    Info(info::InfoArgs),
    /// Serve models over HTTP with OpenAI's API (completions, embeddings, classification).
    Serve(serve::ServeArgs),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // A misspelt WICK_OPS is an error here, not the library's warning.
    crate::ops::OpsPath::from_env()?;
    // Under mpirun, this process joins the job of its ranks (see crate::dist).
    let session = crate::dist::init()?;
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Train(args) => train::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Distill(args) => distill::run(args),
        Command::Prune(args) => prune::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Download(args) => download::run(args),
        Command::Info(args) => info::run(args),
        Command::Serve(args) => serve::run(args),
    };
    session.finish(result)
}

/// A progress bar over `len` items on stderr, or a hidden one (`hidden`: JSON output, or too
/// little work to be worth one).
pub fn progress_bar(len: usize, unit: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}, {{per_sec}}]");
    bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}
