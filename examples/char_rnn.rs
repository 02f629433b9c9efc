//! A character-level LSTM language model (Karpathy's char-rnn) trained for a few hundred steps
//! and sampled: the library's recurrent model, data and Trainer. `wick train char-rnn` is the
//! full command (GRU, sizes, checkpoints, a saved model folder).
//!
//! cargo run --release --example char_rnn -- ../shared/data/tinyshakespeare/input.txt

use anyhow::{Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use rand::SeedableRng;
use wick::data::chars::{CharCorpus, TokenWindows};
use wick::models::rnn::{Cell, CharRnn, CharRnnConfig};
use wick::train::tasks::LanguageModel;
use wick::train::{optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

fn main() -> Result<()> {
    // Parallel ops run on this thread instead of a round trip to the pool's (see the function).
    wick::cpu::join_thread_pool();
    let path = std::env::args().nth(1).context("usage: char_rnn TEXT_FILE")?;
    let corpus = CharCorpus::from_file(path.as_ref())?;
    let (train_ids, val_ids) = corpus.split(0.1);
    let (train, val) = (TokenWindows::new(train_ids, 100)?, TokenWindows::new(val_ids, 100)?);
    let device = wick::device::device("auto")?;

    let varmap = VarMap::new();
    let config = CharRnnConfig::new(Cell::Lstm, corpus.vocab.len(), 64, 256, 1);
    let model = LanguageModel { net: CharRnn::load(wick::nn::var_builder(&varmap, DType::F32, &device, 42), &config)? };
    let trainer_config = TrainerConfig {
        epochs: usize::MAX,
        max_steps: Some(300),
        batch_size: 32,
        drop_last: true,
        lr: 3e-3,
        schedule: Schedule::CosineWarmup { warmup: 50, min_ratio: 0.1 },
        max_grad_norm: Some(5.0),
        eval_every: Some(100),
        eval_each_epoch: false,
        max_eval_batches: Some(8),
        goal: Some(MetricGoal::minimize("loss")),
        ..Default::default()
    };
    let optimizer = OptimizerConfig::adam().build(optim::params(&varmap, optim::is_bias_or_norm))?;
    let report = Trainer::new(trainer_config, varmap, optimizer, device).fit(&model, &train, Some(&val))?;
    eprintln!("validation loss {:.3} nats/char after {} steps", report.last_eval().map_or(f64::NAN, |m| m["loss"]), report.steps);

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let prompt = corpus.encode("ROMEO:\n")?;
    println!("ROMEO:\n{}", corpus.decode(&model.net.sample(&prompt, 300, 0.8, &mut rng)?));
    Ok(())
}
