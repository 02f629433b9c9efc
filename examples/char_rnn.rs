//! A character-level LSTM/GRU language model (Karpathy's char-rnn): trains on a text file,
//! reports validation loss in nats per character, and prints a sample.
//!
//! cargo run --release --example char_rnn -- --data ../shared/data/tinyshakespeare/input.txt --cell lstm

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::DType;
use candle_nn::VarMap;
use clap::Parser;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Duration;
use wick::data::chars::{CharCorpus, TokenWindows};
use wick::models::rnn::{Cell, CharRnn, CharRnnConfig};
use wick::train::tasks::LanguageModel;
use wick::train::{optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

/// Train a character-level RNN language model on a text file and sample from it.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A plain-text corpus (e.g. tinyshakespeare's input.txt); the last 10% is the validation set.
    #[arg(long)]
    data: PathBuf,
    /// Recurrent cell: lstm or gru.
    #[arg(long, default_value = "lstm")]
    cell: Cell,
    /// Optimizer steps (the LR schedule spans them).
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Stop early, with a checkpoint, after this many minutes of training.
    #[arg(long)]
    minutes: Option<f64>,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Characters per training sequence (truncated backpropagation length).
    #[arg(long, default_value_t = 100)]
    seq_len: usize,
    /// Width of the character embedding.
    #[arg(long, default_value_t = 64)]
    embedding: usize,
    /// Hidden (and cell) state size of each recurrent layer.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Stacked recurrent layers.
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// Dropout between layers and before the output layer.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Peak learning rate of Adam; warmup of 50 steps, then cosine decay to 10%.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Clip the gradients' global norm to this value.
    #[arg(long, default_value_t = 5.0)]
    clip: f64,
    /// Evaluate on (part of) the validation set every N steps.
    #[arg(long, default_value_t = 250)]
    eval_every: usize,
    /// Characters to sample after training.
    #[arg(long, default_value_t = 300)]
    sample_len: usize,
    /// Text the sample starts from.
    #[arg(long, default_value = "ROMEO:\n")]
    prompt: String,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[command(flatten)]
    run: wick::cli::RunArgs,
    #[command(flatten)]
    out: wick::cli::OutputArgs,
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    let args = Args::parse();
    let device = args.run.device()?;
    let corpus = CharCorpus::from_file(&args.data)?;
    // Checked before training, so a prompt the corpus cannot spell fails at once.
    let prompt = corpus.encode(&args.prompt)?;
    let (train_ids, val_ids) = corpus.split(0.1);
    let train = TokenWindows::new(train_ids, args.seq_len)?;
    let val = TokenWindows::new(val_ids, args.seq_len)?;

    let varmap = VarMap::new();
    let vb = wick::nn::var_builder(&varmap, DType::F32, &device, args.run.seed);
    let mut cfg = CharRnnConfig::new(args.cell, corpus.vocab.len(), args.embedding, args.hidden, args.layers);
    cfg.rnn.dropout = args.dropout;
    cfg.dropout = args.dropout;
    let model = LanguageModel { net: CharRnn::load(vb, &cfg)? };
    let params = optim::params(&varmap, optim::is_bias_or_norm);
    let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
    let config = TrainerConfig {
        epochs: usize::MAX,
        max_steps: Some(args.steps),
        time_limit: args.minutes.map(|m| Duration::from_secs_f64(m * 60.0)),
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
        "device": wick::device::device_name(&device),
    });
    if args.run.json {
        println!("{summary}");
    } else {
        eprintln!("validation loss {val_loss:.4} nats/char after {} steps ({:.0} s, {:.0} chars/s)", report.steps, report.train_seconds, report.samples_per_s * args.seq_len as f64);
    }
    Ok(())
}
