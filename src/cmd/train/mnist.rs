//! `wick train mnist`: an MLP, a CNN or LeNet-5 trained on MNIST through the shared Trainer,
//! with the test set's accuracy.

use crate::cli::{self, OutputArgs, RunArgs};
use anyhow::Result;
use crate::data::TensorDataset;
use crate::pretrained::Pretrained;
use crate::train::TrainReport;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use crate::models::cnn::{ConvNet, ConvNetConfig, LeNet5, LeNetConfig};
use crate::models::mlp::{Mlp, MlpConfig};
use crate::train::tasks::Classifier;
use crate::train::{optim, MetricGoal, OptimizerConfig, Schedule, Trainer, TrainerConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModelKind {
    /// 784-512-256-10, ReLU, dropout 0.2
    Mlp,
    /// conv 32 → conv 64 (3×3, batch norm, ReLU, max-pool) → fc 128 → 10, dropout 0.25
    Cnn,
    /// LeNet-5: conv 6@5×5 → conv 16@5×5 → 120 → 84 → 10
    Lenet,
}

/// Train a digit classifier on MNIST (IDX files, gzipped or not) and evaluate on its test set.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct MnistArgs {
    /// Which network to train.
    #[arg(long, value_enum, default_value = "cnn")]
    pub model: ModelKind,
    /// Folder with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*.
    #[arg(long)]
    pub data: PathBuf,
    /// Passes over the training set.
    #[arg(long, default_value_t = 5, value_parser = cli::at_least_one)]
    pub epochs: usize,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 128, value_parser = cli::at_least_one)]
    pub batch_size: usize,
    /// Peak learning rate of Adam(W); it decays along a cosine to 0.
    #[arg(long, default_value_t = 2e-3, value_parser = cli::positive)]
    pub lr: f64,
    /// Decoupled weight decay (biases and batch norm excluded).
    #[arg(long, default_value_t = 0.0, value_parser = cli::non_negative)]
    pub weight_decay: f64,
    /// Use only the first N training images (quick runs).
    #[arg(long)]
    pub max_train: Option<usize>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn run(args: MnistArgs) -> Result<()> {
    let device = args.run.training_device()?;
    let mnist = crate::data::mnist::load_dir(&args.data)?;
    let train = match args.max_train {
        Some(n) => mnist.train.take(n)?,
        None => mnist.train,
    };
    let config = TrainerConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        schedule: Schedule::CosineWarmup { warmup: 100, min_ratio: 0.0 },
        goal: Some(MetricGoal::maximize("accuracy")),
        log_every: 20,
        ..args.out.trainer_config(&args.run)
    };
    let job = Job { config, optimizer: OptimizerConfig::adamw(args.weight_decay), device: &device, seed: args.run.seed, output: args.out.model_dir() };
    let (report, params) = match args.model {
        ModelKind::Mlp => job.fit::<Mlp>(&MlpConfig { dropout: 0.2, ..MlpConfig::new(784, &[512, 256], 10) }, &train, &mnist.test)?,
        ModelKind::Cnn => job.fit::<ConvNet>(&ConvNetConfig::default(), &train, &mnist.test)?,
        ModelKind::Lenet => job.fit::<LeNet5>(&LeNetConfig::default(), &train, &mnist.test)?,
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
        "device": crate::device::device_name(&device),
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

/// What every MNIST network shares: the trainer settings, where to run and where to save.
struct Job<'a> {
    config: TrainerConfig,
    optimizer: OptimizerConfig,
    device: &'a Device,
    seed: u64,
    output: Option<&'a Path>,
}

impl Job<'_> {
    /// Builds `N`, trains it as a 10-class classifier, saves it as a model folder in the output
    /// folder (when there is one); returns the report and the parameter count.
    fn fit<N>(self, net_config: &N::Config, train: &TensorDataset, test: &TensorDataset) -> Result<(TrainReport, usize)>
    where
        N: Pretrained + candle_nn::ModuleT,
    {
        let varmap = VarMap::new();
        let net = N::build(crate::nn::var_builder(&varmap, DType::F32, self.device, self.seed), net_config)?;
        let model = Classifier { net, num_classes: 10 };
        let params = optim::params(&varmap, optim::is_bias_or_norm);
        let count = params.iter().map(|p| p.var.elem_count()).sum();
        let mut trainer = Trainer::new(self.config, varmap.clone(), self.optimizer.build(params)?, self.device.clone());
        let report = trainer.fit(&model, train, Some(test))?;
        if let Some(dir) = self.output {
            crate::pretrained::save_varmap::<N>(dir, net_config, &varmap, None)?;
        }
        Ok((report, count))
    }
}
