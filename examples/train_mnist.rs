//! Train an MLP or a CNN on MNIST and report test accuracy.
//!
//! cargo run --release --example train_mnist -- --model cnn --data ../shared/data/mnist

use anyhow::Result;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::DType;
use candle_nn::VarMap;
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use wick::models::cnn::{ConvNet, ConvNetConfig, LeNet5, LeNetConfig};
use wick::models::mlp::{Mlp, MlpConfig};
use wick::train::tasks::Classifier;
use wick::train::{optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModelKind {
    /// 784-512-256-10, ReLU, dropout 0.2
    Mlp,
    /// conv 32 → conv 64 (3×3, batch norm, ReLU, max-pool) → fc 128 → 10, dropout 0.25
    Cnn,
    /// LeNet-5: conv 6@5×5 → conv 16@5×5 → 120 → 84 → 10
    Lenet,
}

/// Train a digit classifier on MNIST (IDX files, gzipped or not) and evaluate on its test set.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Which network to train.
    #[arg(long, value_enum, default_value = "cnn")]
    model: ModelKind,
    /// Folder with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*.
    #[arg(long)]
    data: PathBuf,
    /// Passes over the training set.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate of Adam(W); it decays along a cosine to 0.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Decoupled weight decay (biases and batch norm excluded).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Use only the first N training images (quick runs).
    #[arg(long)]
    max_train: Option<usize>,
    #[command(flatten)]
    run: wick::cli::RunArgs,
    #[command(flatten)]
    out: wick::cli::OutputArgs,
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    let args = Args::parse();
    let device = args.run.device()?;
    let mnist = wick::data::mnist::load_dir(&args.data)?;
    let train = match args.max_train {
        Some(n) => mnist.train.take(n)?,
        None => mnist.train,
    };
    let varmap = VarMap::new();
    let vb = wick::nn::var_builder(&varmap, DType::F32, &device, args.run.seed);
    let config = TrainerConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        schedule: Schedule::CosineWarmup { warmup: 100, min_ratio: 0.0 },
        goal: Some(MetricGoal::maximize("accuracy")),
        log_every: 20,
        ..args.out.trainer_config(&args.run)
    };
    let opt = OptimizerConfig::adamw(args.weight_decay);
    let (report, params) = match args.model {
        ModelKind::Mlp => {
            let cfg = MlpConfig { dropout: 0.2, ..MlpConfig::new(784, &[512, 256], 10) };
            run(Classifier { net: Mlp::load(vb, &cfg)?, num_classes: 10 }, &varmap, &opt, config, &device, &train, &mnist.test)?
        }
        ModelKind::Cnn => run(Classifier { net: ConvNet::load(vb, &ConvNetConfig::default())?, num_classes: 10 }, &varmap, &opt, config, &device, &train, &mnist.test)?,
        ModelKind::Lenet => run(Classifier { net: LeNet5::load(vb, &LeNetConfig::default())?, num_classes: 10 }, &varmap, &opt, config, &device, &train, &mnist.test)?,
    };
    let eval = report.last_eval().cloned().unwrap_or_default();
    let accuracy = eval.get("accuracy").copied().unwrap_or(f64::NAN);
    let summary = serde_json::json!({
        "model": format!("{:?}", args.model).to_lowercase(),
        "parameters": params,
        "epochs": report.epochs_completed,
        "steps": report.steps,
        "eval_accuracy": accuracy,
        "eval_loss": eval.get("loss"),
        "train_samples_per_s": report.samples_per_s,
        "seconds": report.train_seconds,
        "device": wick::device::device_name(&device),
        "threads": candle_core::utils::get_num_threads(),
    });
    if args.run.json {
        println!("{summary}");
    } else {
        eprintln!(
            "test accuracy {:.2}% after {} epochs ({} parameters), {:.0} samples/s, {:.1} s",
            accuracy * 100.0, report.epochs_completed, params, report.samples_per_s, report.train_seconds
        );
    }
    Ok(())
}

fn run<M: wick::train::TrainModel<Batch = (candle_core::Tensor, candle_core::Tensor)>>(
    model: M,
    varmap: &VarMap,
    opt: &OptimizerConfig,
    config: TrainerConfig,
    device: &candle_core::Device,
    train: &wick::data::TensorDataset,
    test: &wick::data::TensorDataset,
) -> Result<(wick::train::TrainReport, usize)> {
    let params = optim::params(varmap, optim::is_bias_or_norm);
    let count = params.iter().map(|p| p.var.elem_count()).sum();
    let mut trainer = Trainer::new(config, varmap.clone(), opt.build(params)?, device.clone());
    Ok((trainer.fit(&model, train, Some(test))?, count))
}
