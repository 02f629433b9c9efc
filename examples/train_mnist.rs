//! Train an MLP on MNIST with the shared Trainer and report test accuracy: the library's
//! training pieces in about thirty lines. `wick train mnist` is the full command (CNN, LeNet-5,
//! checkpoints, resume, JSON output).
//!
//! cargo run --release --example train_mnist -- ../shared/data/mnist

use anyhow::{Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use wick::models::mlp::{Mlp, MlpConfig};
use wick::train::tasks::Classifier;
use wick::train::{optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

fn main() -> Result<()> {
    // Parallel ops run on this thread instead of a round trip to the pool's (see the function).
    wick::cpu::join_thread_pool();
    let data = std::env::args().nth(1).context("usage: train_mnist MNIST_DIR (the folder with the IDX files)")?;
    let mnist = wick::data::mnist::load_dir(data.as_ref())?;
    let device = wick::device::device("auto")?;

    // 784 → 512 → 256 → 10 with ReLU and dropout, its variables in a VarMap the trainer updates.
    let varmap = VarMap::new();
    let net = Mlp::load(wick::nn::var_builder(&varmap, DType::F32, &device, 42), &MlpConfig { dropout: 0.2, ..MlpConfig::new(784, &[512, 256], 10) })?;
    let model = Classifier { net, num_classes: 10 };

    let config = TrainerConfig {
        epochs: 3,
        batch_size: 128,
        lr: 2e-3,
        schedule: Schedule::CosineWarmup { warmup: 100, min_ratio: 0.0 },
        goal: Some(MetricGoal::maximize("accuracy")),
        ..Default::default()
    };
    let optimizer = OptimizerConfig::adamw(0.0).build(optim::params(&varmap, optim::is_bias_or_norm))?;
    let mut trainer = Trainer::new(config, varmap, optimizer, device);
    let report = trainer.fit(&model, &mnist.train, Some(&mnist.test))?;
    let accuracy = report.last_eval().and_then(|m| m.get("accuracy").copied()).unwrap_or(f64::NAN);
    println!("test accuracy {:.2}% ({:.0} images/s)", accuracy * 100.0, report.samples_per_s);
    Ok(())
}
