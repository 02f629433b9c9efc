//! Guards against training that has gone wrong without failing: a loss that explodes while
//! staying finite, and weights that became NaN or infinite in an update no later loss saw (the
//! last step's, whose result no forward pass checks).
//!
//! Costs: the divergence rule is a few scalar operations a step on the loss the trainer already
//! has; the weights are checked only before they are written (a checkpoint) and once at the end of
//! a run: one read of every weight, cheap next to writing them.

use anyhow::{bail, Result};
use candle_core::{DType, Storage, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

/// What to do about a run that diverged (NaN, infinity, or the rule of [`LossWatch`]).
pub const ADVICE: &str = "lower the learning rate (--lr), warm it up for longer, or clip gradients (--max-grad-norm)";

/// How many times its first value the smoothed training loss may grow before the run counts as
/// diverged.
pub const DIVERGENCE_FACTOR: f64 = 1e3;
/// Weight of the newest step in the smoothed loss (an exponential moving average): one bad batch
/// moves it by a tenth of its loss, so a single spike has to be 10⁴× the first loss to stop a run.
const SMOOTHING: f64 = 0.1;

/// The divergence rule. A run has diverged when its training loss, smoothed as an exponential
/// moving average (weight [`SMOOTHING`] = 0.1 on each new step), exceeds [`DIVERGENCE_FACTOR`]
/// (1000) × the larger of its first loss and 1. Healthy training moves the loss down from its
/// first value, or up by a small factor; a learning rate far too high sends it up by orders of
/// magnitude within a few steps (`--lr 1e6` reaches 1e13) while it stays finite. The floor of 1
/// keeps a run that starts near a loss of 0 (a fine-tuned model, a regression on small targets)
/// from being stopped by ordinary noise.
///
/// Both values are saved in the trainer's state (flat in `trainer_state.json`), so a resumed run
/// decides exactly as the uninterrupted one would; a state written before they existed starts
/// over from the first loss after the resume.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LossWatch {
    #[serde(default)]
    pub first_loss: Option<f64>,
    #[serde(default)]
    pub smoothed_loss: Option<f64>,
}

impl LossWatch {
    /// Adds one step's (finite) training loss; an error saying by how much when the run has
    /// diverged.
    pub fn observe(&mut self, loss: f64) -> Result<()> {
        let first = *self.first_loss.get_or_insert(loss);
        let smoothed = self.smoothed_loss.map_or(loss, |s| (1.0 - SMOOTHING) * s + SMOOTHING * loss);
        self.smoothed_loss = Some(smoothed);
        let limit = DIVERGENCE_FACTOR * first.max(1.0);
        if smoothed > limit {
            bail!("the training loss, smoothed, is {smoothed:.3e}, past {limit:.3e}: {DIVERGENCE_FACTOR}× the first loss ({first:.4}), and never less than {DIVERGENCE_FACTOR}");
        }
        Ok(())
    }
}

/// An error naming the first tensor of `varmap` (by name) that holds a NaN or an infinity after
/// optimizer step `step`; what the trainer checks before weights are written.
pub fn check_weights_finite(varmap: &VarMap, step: usize) -> Result<()> {
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("the VarMap's lock is poisoned (a thread panicked while holding it)"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        if !all_finite(data[name].as_tensor())? {
            bail!("{name} holds NaN or infinite values after step {step}: the run has diverged, and these weights are not saved; {ADVICE}");
        }
    }
    Ok(())
}

/// Whether every element of `t` is finite.
fn all_finite(t: &Tensor) -> Result<bool> {
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            if let Ok(values) = crate::ops::cpu_f32(cpu, layout, "finite check") {
                return Ok(values.iter().all(|x| x.is_finite()));
            }
        }
    }
    // Elsewhere (another device, dtype or layout) one reduction where the tensor lives: x · 0 is
    // 0 for a finite x and NaN for a NaN or an infinity, so the sum is NaN exactly when some
    // element is not finite (and sums of zeros cannot overflow).
    let sum = t.affine(0.0, 0.0)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    Ok(sum.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_loss_that_explodes_while_finite_is_divergence() {
        let mut watch = LossWatch::default();
        // Healthy: the loss falls, or rises a little.
        for loss in [2.3, 2.0, 1.5, 3.0, 1.0] {
            watch.observe(loss).unwrap();
        }
        assert_eq!(watch.first_loss, Some(2.3));
        // One spike moves the average by a tenth: 2e4 (8700× the first loss) alone does not stop it.
        watch.observe(2e4).unwrap();
        // A run that stays up there does, within a few steps.
        let steps = (0..20).position(|_| watch.observe(1e5).is_err()).expect("diverged");
        assert!(steps < 3, "{steps}");
        let err = watch.observe(1e5).unwrap_err().to_string();
        assert!(err.contains("smoothed") && err.contains("1000× the first loss (2.3000)"), "{err}");
    }

    #[test]
    fn a_loss_that_starts_near_zero_is_judged_against_one() {
        let mut watch = LossWatch::default();
        for loss in [1e-4, 0.5, 50.0, 5.0] {
            watch.observe(loss).unwrap();
        }
        for _ in 0..30 {
            watch.observe(900.0).unwrap();
        }
        assert!(watch.observe(1e5).is_err());
    }

    #[test]
    fn a_saved_watch_decides_as_the_uninterrupted_one() -> Result<()> {
        let (mut a, mut b) = (LossWatch::default(), LossWatch::default());
        for loss in [1.0, 2.0, 3.0] {
            a.observe(loss)?;
            b.observe(loss)?;
        }
        let mut resumed: LossWatch = serde_json::from_str(&serde_json::to_string(&b)?)?;
        assert_eq!(resumed, a);
        for loss in [100.0, 5000.0, 9000.0] {
            assert_eq!(a.observe(loss).is_ok(), resumed.observe(loss).is_ok());
        }
        assert_eq!(resumed, a);
        // A state written before the watch existed has neither field.
        assert_eq!(serde_json::from_str::<LossWatch>("{}")?, LossWatch::default());
        Ok(())
    }

    #[test]
    fn the_first_non_finite_weight_is_named_with_the_step() -> Result<()> {
        let mut varmap = VarMap::new();
        let dev = Device::Cpu;
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        vb.get_with_hints(4, "a.weight", candle_nn::Init::Const(1.0))?;
        vb.get_with_hints(4, "b.weight", candle_nn::Init::Const(1.0))?;
        vb.get_with_hints(2, "c.half", candle_nn::Init::Const(1.0))?;
        check_weights_finite(&varmap, 7)?;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            varmap.set_one("b.weight", Tensor::new(&[0f32, 1.0, bad, 2.0], &dev)?)?;
            let err = check_weights_finite(&varmap, 7).unwrap_err().to_string();
            assert!(err.contains("b.weight") && err.contains("step 7") && err.contains("--lr"), "{err}");
        }
        varmap.set_one("b.weight", Tensor::new(&[f32::MAX, -f32::MAX, 0.0, 1.0], &dev)?)?;
        check_weights_finite(&varmap, 7)?;
        Ok(())
    }

    #[test]
    fn every_dtype_and_layout_is_checked() -> Result<()> {
        let dev = Device::Cpu;
        let good = Tensor::new(&[[1f32, 2.0], [3.0, 65504.0]], &dev)?;
        let bad = Tensor::new(&[[1f32, 2.0], [f32::INFINITY, 4.0]], &dev)?;
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            assert!(all_finite(&good.to_dtype(dtype)?)?, "{dtype:?}");
            assert!(!all_finite(&bad.to_dtype(dtype)?)?, "{dtype:?}");
            // A transposed (non-contiguous) view takes the reduction path.
            assert!(!all_finite(&bad.to_dtype(dtype)?.t()?)?, "{dtype:?} transposed");
            assert!(all_finite(&good.to_dtype(dtype)?.t()?)?, "{dtype:?} transposed");
        }
        assert!(!all_finite(&Tensor::new(&[f32::NAN], &dev)?.to_dtype(DType::F16)?)?);
        Ok(())
    }
}
