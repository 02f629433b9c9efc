//! Flags every example shares, so each `--help` says the same thing about them.

use clap::Args;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// Where to run: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed for initialisation, shuffling, dropout and sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Folder for checkpoints, metrics.jsonl and loss_curve.svg (nothing is saved without it).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Continue from the newest checkpoint in --output.
    #[arg(long)]
    pub resume: bool,
    /// Print one JSON object with the results as the last line of stdout (and no progress bar).
    #[arg(long)]
    pub json: bool,
}

impl CommonArgs {
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        crate::device::device(&self.device)
    }

    /// The trainer settings these flags decide (output folder, resume, seed, progress bar), on
    /// top of the defaults; examples fill in the rest with `..args.common.trainer_config()`.
    pub fn trainer_config(&self) -> crate::train::TrainerConfig {
        crate::train::TrainerConfig {
            output_dir: self.output.clone(),
            resume: self.resume,
            seed: self.seed,
            progress: !self.json,
            ..Default::default()
        }
    }
}
