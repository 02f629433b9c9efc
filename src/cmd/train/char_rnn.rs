//! `wick train char-rnn`: a character-level LSTM/GRU language model (Karpathy's char-rnn)
//! trained on a text file, with validation loss in nats per character and a sample.

use crate::cli::{self, OutputArgs, RunArgs};
use anyhow::{Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use clap::Args;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Duration;
use crate::data::chars::{CharCorpus, TokenWindows};
use crate::models::rnn::{Cell, CharRnn, CharRnnConfig};
use crate::train::tasks::LanguageModel;
use crate::train::{optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

/// The saved model's characters in id order, one JSON string, beside its config.json.
pub const CHAR_VOCAB: &str = "char_vocab.json";

/// Train a character-level RNN language model on a text file and sample from it.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct CharRnnArgs {
    /// A plain-text corpus (e.g. tinyshakespeare's input.txt); the last 10% is the validation set.
    #[arg(long)]
    pub data: PathBuf,
    /// Recurrent cell: lstm or gru.
    #[arg(long, default_value = "lstm")]
    pub cell: Cell,
    /// Optimizer steps (the LR schedule spans them).
    #[arg(long, default_value_t = 2000, value_parser = cli::at_least_one)]
    pub steps: usize,
    /// Stop early, with a checkpoint, after this many minutes of training.
    #[arg(long, value_parser = cli::minutes)]
    pub minutes: Option<Duration>,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 32, value_parser = cli::at_least_one)]
    pub batch_size: usize,
    /// Characters per training sequence (truncated backpropagation length).
    #[arg(long, default_value_t = 100, value_parser = cli::at_least_one)]
    pub seq_len: usize,
    /// Width of the character embedding.
    #[arg(long, default_value_t = 64, value_parser = cli::at_least_one)]
    pub embedding: usize,
    /// Hidden (and cell) state size of each recurrent layer.
    #[arg(long, default_value_t = 256, value_parser = cli::at_least_one)]
    pub hidden: usize,
    /// Stacked recurrent layers.
    #[arg(long, default_value_t = 1, value_parser = cli::at_least_one)]
    pub layers: usize,
    /// Dropout between layers and before the output layer.
    #[arg(long, default_value_t = 0.0, value_parser = cli::fraction)]
    pub dropout: f64,
    /// Peak learning rate of Adam; warmup of 50 steps, then cosine decay to 10%.
    #[arg(long, default_value_t = 3e-3, value_parser = cli::positive)]
    pub lr: f64,
    /// Clip the gradients' global norm to this value.
    #[arg(long = "max-grad-norm", alias = "clip", value_name = "NORM", default_value_t = 5.0, value_parser = cli::positive)]
    pub clip: f64,
    /// Evaluate on (part of) the validation set every N steps.
    #[arg(long, default_value_t = 250, value_parser = cli::at_least_one)]
    pub eval_every: usize,
    /// Characters to sample after training.
    #[arg(long, default_value_t = 300, value_parser = cli::at_least_one)]
    pub sample_len: usize,
    /// Text the sample starts from.
    #[arg(long, default_value = "ROMEO:\n")]
    pub prompt: String,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8, value_parser = cli::non_negative)]
    pub temperature: f64,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn run(args: CharRnnArgs) -> Result<()> {
    let device = args.run.training_device()?;
    let corpus = CharCorpus::from_file(&args.data)?;
    // Checked before training, so a prompt the corpus cannot spell fails at once.
    let prompt = corpus.encode(&args.prompt).map_err(|e| anyhow::anyhow!("--prompt {:?}: {e}", args.prompt))?;
    let (train_ids, val_ids) = corpus.split(0.1);
    let data = args.data.display();
    let train = TokenWindows::new(train_ids, args.seq_len).with_context(|| format!("{data}: the training part (90%) is too short for --seq-len {}", args.seq_len))?;
    let val = TokenWindows::new(val_ids, args.seq_len).with_context(|| format!("{data}: the validation part (10%) is too short for --seq-len {}", args.seq_len))?;

    let varmap = VarMap::new();
    let vb = crate::nn::var_builder(&varmap, DType::F32, &device, args.run.seed);
    let mut cfg = CharRnnConfig::new(args.cell, corpus.vocab.len(), args.embedding, args.hidden, args.layers);
    cfg.rnn.dropout = args.dropout;
    cfg.dropout = args.dropout;
    let model = LanguageModel { net: CharRnn::load(vb, &cfg)? };
    let params = optim::params(&varmap, optim::is_bias_or_norm);
    let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
    let config = TrainerConfig {
        epochs: usize::MAX,
        max_steps: Some(args.steps),
        time_limit: args.minutes,
        batch_size: args.batch_size,
        eval_batch_size: 64,
        drop_last: true,
        lr: args.lr,
        schedule: Schedule::CosineWarmup { warmup: 50, min_ratio: 0.1 },
        max_grad_norm: Some(args.clip),
        eval_every: Some(args.eval_every),
        eval_each_epoch: false,
        max_eval_batches: Some(8),
        save_each_epoch: false,
        goal: Some(MetricGoal::minimize("loss")),
        log_every: 10,
        ..args.out.trainer_config(&args.run)
    };
    let mut trainer = Trainer::new(config, varmap.clone(), OptimizerConfig::adam().build(params)?, device.clone());
    let report = trainer.fit(&model, &train, Some(&val))?;
    // The full validation set, not the subset evaluated during training.
    let val_metrics = trainer.evaluate(&model, &val)?;
    let val_loss = val_metrics["loss"];

    if let Some(dir) = args.out.model_dir() {
        crate::pretrained::save_varmap::<CharRnn>(dir, &cfg, &varmap, None)?;
        let chars: String = corpus.vocab.iter().collect();
        crate::weights::write_atomically(&dir.join(CHAR_VOCAB), serde_json::to_string(&chars)?.as_bytes())?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.run.seed);
    let sample = corpus.decode(&model.net.sample(&prompt, args.sample_len, args.temperature, &mut rng)?);
    if !args.run.json {
        println!("{}{}", args.prompt, sample);
    }
    let summary = serde_json::json!({
        "cell": format!("{:?}", args.cell).to_lowercase(),
        "parameters": n_params,
        "steps": report.steps,
        "val_loss": val_loss,
        "val_perplexity": val_metrics["perplexity"],
        "train_samples_per_s": report.samples_per_s,
        "train_chars_per_s": report.samples_per_s * args.seq_len as f64,
        "seconds": report.train_seconds,
        "sample": format!("{}{}", args.prompt, sample),
        "device": crate::device::device_name(&device),
    });
    if args.run.json {
        println!("{summary}");
    } else {
        eprintln!("validation loss {val_loss:.4} nats/char after {} steps ({:.0} s, {:.0} chars/s)", report.steps, report.train_seconds, report.samples_per_s * args.seq_len as f64);
    }
    Ok(())
}
