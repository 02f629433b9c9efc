//! `wick perplexity`: how well a GPT-2 model (f32, f16, bf16 or quantized) predicts a text, as
//! llama.cpp's `llama-perplexity` reports it: the mean negative log-likelihood per token over
//! non-overlapping windows of the model's context, and its exponential.
//!
//! With `--last 0.1` it scores the part of a corpus `wick train gpt2` held out for validation
//! (the last 10% of the tokens, in windows of `--context` tokens = the training `--block-size`),
//! so the figure is the run's own validation perplexity, and a quantized copy of the model can be
//! compared with the original on the same tokens.

use crate::cli::{self, ModelArgs, RunArgs};
use crate::data::chars::TokenWindows;
use crate::data::Dataset;
use crate::models::gpt2::GPT2LMHeadModel;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use std::path::PathBuf;

/// Perplexity of a GPT-2 model (a folder or Hub id; quantized folders too) on a text file.
#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score (plain UTF-8).
    #[arg(long)]
    pub input: PathBuf,
    /// Score only the last FRACTION of the file's tokens (0 < FRACTION ≤ 1): 0.1 is the
    /// validation part `wick train gpt2` held out.
    #[arg(long, value_name = "FRACTION", default_value_t = 1.0, value_parser = cli::probability)]
    pub last: f64,
    /// Tokens per window (default: the model's context, n_positions).
    #[arg(long, value_parser = cli::at_least_one)]
    pub context: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8, value_parser = cli::at_least_one)]
    pub batch_size: usize,
    /// Score at most this many windows (from the start of the scored part).
    #[arg(long, value_parser = cli::at_least_one)]
    pub max_windows: Option<usize>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// What `wick perplexity` measured.
#[derive(Debug, serde::Serialize)]
pub struct PerplexityReport {
    pub windows: usize,
    pub tokens_scored: usize,
    /// Mean negative log-likelihood per token, in nats.
    pub loss: f64,
    pub perplexity: f64,
    pub seconds: f64,
}

/// Scores `windows` with `model`, `batch_size` windows at a time.
pub fn perplexity(model: &GPT2LMHeadModel, windows: &TokenWindows, count: usize, batch_size: usize, device: &candle_core::Device, bar: &indicatif::ProgressBar) -> Result<PerplexityReport> {
    let start = std::time::Instant::now();
    let (mut nll, mut tokens) = (0f64, 0usize);
    for first in (0..count).step_by(batch_size) {
        let indices: Vec<usize> = (first..(first + batch_size).min(count)).collect();
        let (inputs, targets) = windows.batch(&indices, device)?;
        let logits = model.forward(&inputs, None, None, None, false)?.to_dtype(DType::F32)?;
        let mean = crate::nn::cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
        let n = targets.elem_count();
        if !mean.is_finite() {
            bail!("the model's loss is {mean} on windows {}..{}: its weights or the input are broken", indices[0], indices[indices.len() - 1] + 1)
        }
        nll += mean * n as f64;
        tokens += n;
        bar.inc(indices.len() as u64);
    }
    let loss = nll / tokens as f64;
    Ok(PerplexityReport { windows: count, tokens_scored: tokens, loss, perplexity: loss.exp(), seconds: start.elapsed().as_secs_f64() })
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let (device, dtype) = args.run.device_and_dtype(&[DType::F32, DType::F16, DType::BF16])?;
    let files = args.model.resolve(args.run.json).with_context(|| format!("cannot get the model {:?}", args.model.model))?;
    let (model, cfg) = crate::pretrained::load::<GPT2LMHeadModel>(&files, dtype, &device)?;
    let tokenizer = files.tokenizer()?;
    let context = args.context.unwrap_or(cfg.n_positions);
    if context > cfg.n_positions {
        bail!("--context {context} is longer than the model's context of {} positions", cfg.n_positions)
    }
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the file is empty", args.input.display())
    }
    let ids = tokenizer.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", args.input.display()))?.get_ids().to_vec();
    // The same cut as `wick train gpt2`: the last len/10 tokens for --last 0.1.
    let keep = ((ids.len() as f64 * args.last) as usize).max(1);
    let scored = ids[ids.len() - keep..].to_vec();
    let windows = TokenWindows::new(scored, context).with_context(|| format!("{}: the scored part ({keep} tokens) is too short for windows of {context} tokens", args.input.display()))?;
    let count = args.max_windows.map_or(windows.len(), |m| m.min(windows.len()));
    let bar = super::progress_bar(count, "windows", args.run.json || count < 2);
    let report = perplexity(&model, &windows, count, args.batch_size, &device, &bar)?;
    bar.finish_and_clear();
    if args.run.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "perplexity {:.4} (loss {:.4} nats/token) over {} tokens in {} windows of {context}; {:.1} s",
            report.perplexity, report.loss, report.tokens_scored, report.windows, report.seconds
        );
    }
    Ok(())
}
