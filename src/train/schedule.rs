//! Learning-rate schedules as multipliers of the base rate, with the same values as
//! transformers' `get_*_schedule_with_warmup` (the tests compare against them).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Linear rise from 0 over `warmup` steps, then constant.
    ConstantWithWarmup { warmup: usize },
    /// Linear rise over `warmup` steps, then linear decay to 0 at the last step.
    LinearWarmup { warmup: usize },
    /// Linear rise over `warmup` steps, then half a cosine down to `min_ratio` of the base rate.
    CosineWarmup { warmup: usize, min_ratio: f64 },
}

impl Schedule {
    /// The multiplier of the base learning rate at optimizer step `step` (0-based) of `total`.
    pub fn factor(&self, step: usize, total: usize) -> f64 {
        let warm = |w: usize| step as f64 / w.max(1) as f64;
        match *self {
            Self::Constant => 1.0,
            Self::ConstantWithWarmup { warmup } => if step < warmup { warm(warmup) } else { 1.0 },
            Self::LinearWarmup { warmup } => {
                if step < warmup {
                    warm(warmup)
                } else {
                    (total.saturating_sub(step) as f64 / total.saturating_sub(warmup).max(1) as f64).max(0.0)
                }
            }
            Self::CosineWarmup { warmup, min_ratio } => {
                if step < warmup {
                    warm(warmup)
                } else {
                    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                    let cosine = (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0);
                    min_ratio + (1.0 - min_ratio) * cosine
                }
            }
        }
    }

    /// Warmup given as a fraction of the total steps (`--warmup-ratio`), rounded up as HF does.
    pub fn warmup_steps(ratio: f64, total: usize) -> usize {
        (ratio * total as f64).ceil() as usize
    }

    pub fn parse(name: &str, warmup: usize) -> anyhow::Result<Self> {
        Ok(match name {
            "constant" => if warmup > 0 { Self::ConstantWithWarmup { warmup } } else { Self::Constant },
            "linear" => Self::LinearWarmup { warmup },
            "cosine" => Self::CosineWarmup { warmup, min_ratio: 0.0 },
            other => anyhow::bail!("unknown schedule {other:?}: expected constant, linear or cosine"),
        })
    }
}
