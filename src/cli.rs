//! The flags every `wick` subcommand and example shares, defined once so that each `--help` says
//! the same thing about them and each value is checked the same way, before any work starts.
//!
//! - [`ModelArgs`]: which model (`--model`, `--revision`, `--offline`).
//! - [`RunArgs`]: where and how to run (`--device`, `--dtype`, `--seed`, `--json`).
//! - [`OutputArgs`]: where a training run writes (`--output`, `--resume`).
//! - Value parsers for numeric flags ([`positive`], [`fraction`], [`minutes`], ...), so that
//!   `--lr NaN` or `--minutes -1` is a clear error from clap, not a panic deep in a run.

use crate::hub::{self, HubOptions, ModelFiles};
use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// Which model to use.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A Hub repo id (like openai-community/gpt2) or a local model folder (config.json, weights,
    /// tokenizer).
    #[arg(long, value_name = "ID|DIR")]
    pub model: String,
    /// Hub branch, tag or commit of --model (default: main). Ignored for a local folder.
    #[arg(long)]
    pub revision: Option<String>,
    /// Use only files already in the Hugging Face cache; never touch the network (as
    /// HF_HUB_OFFLINE=1 does).
    #[arg(long)]
    pub offline: bool,
}

impl ModelArgs {
    /// A `ModelArgs` for `model` with the other flags at their defaults.
    pub fn new(model: impl Into<String>) -> Self {
        Self { model: model.into(), revision: None, offline: false }
    }

    /// How the Hub loader should look the model up; `quiet` hides the download progress bar.
    pub fn hub_options(&self, quiet: bool) -> HubOptions {
        HubOptions { offline: self.offline.then_some(true), quiet, ..Default::default() }.revision(self.revision.clone())
    }

    /// The model's files on local disk (downloaded into the cache first when needed).
    pub fn resolve(&self, quiet: bool) -> Result<ModelFiles> {
        hub::resolve(&self.model, &self.hub_options(quiet))
    }
}

/// Where and how to run.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Where to run: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Number format of the weights and activations: f32, f16 or bf16 (on the CPU, f16/bf16 are
    /// supported where a command says so).
    #[arg(long, default_value = "f32", value_parser = dtype)]
    pub dtype: DType,
    /// Seed for initialisation, shuffling, dropout and sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print results as JSON on stdout (no progress bar); the last line is one object.
    #[arg(long)]
    pub json: bool,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self { device: "cpu".into(), dtype: DType::F32, seed: 42, json: false }
    }
}

impl RunArgs {
    pub fn device(&self) -> Result<Device> {
        crate::device::device(&self.device)
    }

    /// The device, and `--dtype` checked against what the command can run there: `cpu_dtypes`
    /// lists the types the command supports on the CPU (every type is allowed on CUDA).
    pub fn device_and_dtype(&self, cpu_dtypes: &[DType]) -> Result<(Device, DType)> {
        let device = self.device()?;
        if device.is_cpu() && !cpu_dtypes.contains(&self.dtype) {
            let names: Vec<String> = cpu_dtypes.iter().map(|d| d.as_str().to_string()).collect();
            anyhow::bail!("--dtype {} is not supported on the CPU by this command (it supports {}); use --device cuda", self.dtype.as_str(), names.join(", "));
        }
        Ok((device, self.dtype))
    }

    /// The device for a training command: training keeps f32 master weights on every device,
    /// so another `--dtype` is an error rather than a flag silently ignored.
    pub fn training_device(&self) -> Result<Device> {
        if self.dtype != DType::F32 {
            anyhow::bail!("--dtype {}: training runs in f32 (mixed precision is not supported yet); leave --dtype out", self.dtype.as_str());
        }
        self.device()
    }
}

/// Where a training run writes, and whether it continues an earlier one.
#[derive(Args, Clone, Debug, Default)]
pub struct OutputArgs {
    /// Folder for checkpoints, metrics.jsonl, loss_curve.svg and the final model (nothing is
    /// saved without it).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Continue from the newest checkpoint in --output (an error when there is none).
    #[arg(long, requires = "output")]
    pub resume: bool,
}

impl OutputArgs {
    /// The trainer settings these flags and `run` decide (output folder, resume, seed, progress
    /// bar), on top of the defaults; callers fill in the rest with `..output.trainer_config(&run)`.
    pub fn trainer_config(&self, run: &RunArgs) -> crate::train::TrainerConfig {
        crate::train::TrainerConfig {
            output_dir: self.output.clone(),
            resume: self.resume,
            seed: run.seed,
            progress: !run.json,
            ..Default::default()
        }
    }

    /// The folder the trained model is saved in: --output, on rank 0 only (the other ranks of a
    /// distributed run, `crate::dist`, hold the same weights and write nothing).
    pub fn model_dir(&self) -> Option<&std::path::Path> {
        self.output.as_deref().filter(|_| crate::dist::world().is_root())
    }
}

/// `--dtype f32|f16|bf16`.
pub fn dtype(s: &str) -> Result<DType, String> {
    crate::device::parse_dtype(s).map_err(|e| e.to_string())
}

fn number(s: &str) -> Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(format!("{s:?} is not a finite number"))
    }
}

/// A finite number > 0 (learning rates, temperatures, norms).
pub fn positive(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(format!("{x} must be greater than 0"))
    }
}

/// A finite number ≥ 0 (weight decay, penalties that may be off).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(format!("{x} must not be negative"))
    }
}

/// A number in [0, 1] (ratios, dropout).
pub fn fraction(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(format!("{x} must be between 0 and 1"))
    }
}

/// A probability mass in (0, 1] (top-p).
pub fn probability(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if x > 0.0 && x <= 1.0 {
        Ok(x)
    } else {
        Err(format!("{x} must be greater than 0 and at most 1"))
    }
}

/// A string that is not empty (stop strings, column names).
pub fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

/// A count ≥ 1 (batch sizes, steps, epochs).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number ≥ 1")),
    }
}

/// Minutes of wall time (> 0, at most a year), as a [`Duration`].
pub fn minutes(s: &str) -> Result<Duration, String> {
    const YEAR_IN_MINUTES: f64 = 365.0 * 24.0 * 60.0;
    let m = positive(s)?;
    if m > YEAR_IN_MINUTES {
        return Err(format!("{m} minutes is more than a year"));
    }
    Ok(Duration::from_secs_f64(m * 60.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_flags_refuse_what_would_panic_or_mislead_later() {
        for bad in ["NaN", "inf", "-1", "0", "abc", "1e400"] {
            assert!(positive(bad).is_err(), "{bad}");
            assert!(minutes(bad).is_err(), "{bad}");
        }
        assert!(minutes("1e300").unwrap_err().contains("more than a year"));
        assert_eq!(minutes("0.5").unwrap(), Duration::from_secs(30));
        assert!(fraction("2").is_err() && fraction("-0.1").is_err() && fraction("NaN").is_err());
        assert_eq!(fraction("0").unwrap(), 0.0);
        assert!(probability("0").is_err() && probability("1.5").is_err());
        assert_eq!(probability("1").unwrap(), 1.0);
        assert!(non_negative("-1e-9").is_err());
        assert!(at_least_one("0").is_err() && at_least_one("-3").is_err());
        assert_eq!(at_least_one("8").unwrap(), 8);
        assert!(dtype("f64").unwrap_err().contains("unknown dtype"));
    }

    #[test]
    fn a_cpu_dtype_the_command_cannot_run_is_an_error_naming_the_alternative() {
        let run = RunArgs { dtype: DType::BF16, ..Default::default() };
        let err = run.device_and_dtype(&[DType::F32]).unwrap_err().to_string();
        assert!(err.contains("bf16") && err.contains("cuda"), "{err}");
        assert!(run.device_and_dtype(&[DType::F32, DType::BF16]).is_ok());
    }
}
