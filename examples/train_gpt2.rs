//! A small GPT-2 trained from scratch on a text file and saved as a Hugging Face folder that
//! transformers' `GPT2LMHeadModel.from_pretrained` and `wick generate --model DIR` load: model,
//! data, Trainer and save in one page. `wick train gpt2` is the full command.
//!
//! cargo run --release --example train_gpt2 -- ../shared/data/tinyshakespeare/input.txt \
//!     ../shared/data/gpt2-tokenizer runs/gpt2-tiny

use anyhow::{Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use std::path::PathBuf;
use wick::data::chars::TokenWindows;
use wick::models::gpt2::{Config, GPT2LMHeadModel};
use wick::train::{checkpoint, optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

fn main() -> Result<()> {
    // Parallel ops run on this thread instead of a round trip to the pool's (see the function).
    wick::cpu::join_thread_pool();
    let args: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let [text, tokenizer_dir, output] = args.as_slice() else {
        anyhow::bail!("usage: train_gpt2 TEXT_FILE TOKENIZER_DIR OUTPUT_DIR");
    };
    let tokenizer = wick::tokenizer::load(tokenizer_dir)?;
    let corpus = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let ids = tokenizer.encode(corpus.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    let cut = ids.len() * 9 / 10;
    let (train, val) = (TokenWindows::new(ids[..cut].to_vec(), 128)?, TokenWindows::new(ids[cut..].to_vec(), 128)?);

    // 4 layers, width 192, 6 heads, context 128: about 10 M parameters with GPT-2's vocabulary.
    let config = Config::new(tokenizer.get_vocab_size(true), 128, 192, 4, 6);
    let device = wick::device::device("auto")?;
    let varmap = VarMap::new();
    let model = GPT2LMHeadModel::load(wick::nn::var_builder(&varmap, DType::F32, &device, 42), &config)?;
    let trainer_config = TrainerConfig {
        epochs: usize::MAX,
        max_steps: Some(500),
        batch_size: 8,
        drop_last: true,
        lr: 1e-3,
        schedule: Schedule::CosineWarmup { warmup: 50, min_ratio: 0.1 },
        max_grad_norm: Some(1.0),
        eval_every: Some(100),
        eval_each_epoch: false,
        max_eval_batches: Some(8),
        goal: Some(MetricGoal::minimize("loss")),
        ..Default::default()
    };
    let optimizer = OptimizerConfig::AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let optimizer = optimizer.build(optim::params(&varmap, optim::is_bias_or_norm))?;
    let report = Trainer::new(trainer_config, varmap.clone(), optimizer, device).fit(&model, &train, Some(&val))?;
    eprintln!("validation loss {:.3} after {} steps", report.last_eval().map_or(f64::NAN, |m| m["loss"]), report.steps);

    wick::pretrained::save::<GPT2LMHeadModel>(output, &config, checkpoint::varmap_tensors(&varmap)?, Some(tokenizer_dir))?;
    println!("saved to {}", output.display());
    Ok(())
}
