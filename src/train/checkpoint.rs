//! Checkpoints: a folder `checkpoints/step-NNNNNNNN/` with the model's weights
//! (`model.safetensors`), the optimizer's state (`optimizer.safetensors`) and the trainer's
//! (`trainer_state.json`). A checkpoint is written into a hidden temporary folder and renamed
//! into place, so a crash leaves either the old checkpoint or the new one, never half of one: a
//! folder that does not match `step-NNNNNNNN` exactly (`.step-00000007.tmp`, `step-7.tmp`) is never
//! taken for a checkpoint, and a `step-NNNNNNNN` folder with a file missing is a damaged
//! checkpoint, which resuming reports instead of starting over.

use super::best::BestSoFar;
use super::guard::LossWatch;
use super::optim::Optimizer;
use super::TrainerConfig;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};

/// The files of a checkpoint folder.
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Epochs fully completed.
    pub epoch: usize,
    /// What decides the batches each step sees (stored flat, like the other fields).
    #[serde(flatten)]
    pub order: DataOrder,
    pub samples_seen: u64,
    #[serde(flatten)]
    pub best: BestSoFar,
    pub train_seconds: f64,
    #[serde(flatten)]
    pub losses: LossWatch,
}

/// The settings that decide which items each optimizer step sees. A resumed run replays the
/// interrupted run's batches only when all of them are unchanged, so a resume that changes one is
/// refused. `None` (a state written before the field was recorded) means unknown: accepted.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DataOrder {
    pub seed: u64,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub grad_accum: Option<usize>,
    #[serde(default)]
    pub drop_last: Option<bool>,
    /// Items in the training set.
    #[serde(default)]
    pub train_len: Option<usize>,
    /// Processes the run was spread over (`mpirun -np`, 1 without it): a resume with another
    /// number is refused (its BatchNorm statistics and dropout masks would differ).
    #[serde(default)]
    pub world_size: Option<usize>,
}

impl DataOrder {
    /// The order a run with `config` over `train_len` items, spread over `world_size`
    /// processes, has.
    pub fn of(config: &TrainerConfig, train_len: usize, world_size: usize) -> Self {
        Self {
            seed: config.seed,
            batch_size: Some(config.batch_size),
            grad_accum: Some(config.grad_accum),
            drop_last: Some(config.drop_last),
            train_len: Some(train_len),
            world_size: Some(world_size),
        }
    }

    /// An error naming the first setting in which `now` differs from this order (read from the
    /// checkpoint `dir`), with the value of each run.
    pub fn check_resumable_as(&self, now: &DataOrder, dir: &Path) -> Result<()> {
        fn differs<T: PartialEq + Display>(what: &str, was: Option<T>, now: Option<T>) -> Option<String> {
            match (was, now) {
                (Some(was), Some(now)) if was != now => Some(format!("{what} was {was} in the run being resumed, now {now}")),
                _ => None,
            }
        }
        let change = differs("--seed", Some(self.seed), Some(now.seed))
            .or_else(|| differs("--batch-size", self.batch_size, now.batch_size))
            .or_else(|| differs("--grad-accum (gradient accumulation)", self.grad_accum, now.grad_accum))
            .or_else(|| differs("drop_last", self.drop_last, now.drop_last))
            .or_else(|| differs("the training set's size (items)", self.train_len, now.train_len))
            .or_else(|| differs("the number of processes (mpirun -np)", self.world_size, now.world_size));
        match change {
            Some(change) => bail!(
                "cannot resume from {}: {change}, so the resumed run would see other batches than the interrupted one. \
                 Resume with the same settings and data, or start a new run in another output folder",
                dir.display()
            ),
            None => Ok(()),
        }
    }
}

/// The tensors of a VarMap by name (copies, so later training does not change them).
pub fn varmap_tensors(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().unwrap();
    data.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect()
}

/// Sets every variable of `varmap` from a safetensors file; a missing tensor or a shape
/// mismatch is an error naming the tensor.
pub fn load_varmap(varmap: &VarMap, path: &Path) -> Result<()> {
    let tensors = read_safetensors(path, &Device::Cpu)?;
    set_varmap(varmap, &tensors).with_context(|| format!("loading {}", path.display()))
}

/// Sets every variable of `varmap` from `tensors` (by name), converting device and dtype; a
/// variable without a tensor, or with one of another shape, is an error naming it.
pub fn set_varmap(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let report = crate::weights::copy_into_varmap(varmap, tensors)?;
    if !report.newly_initialized.is_empty() {
        bail!("no tensor for {:?}", report.newly_initialized);
    }
    Ok(())
}

/// Reads a checkpoint's safetensors file (a truncated or corrupt file is reported as such).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    crate::weights::read_safetensors(path, device)
}

pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// The folder the checkpoint of `step` has (or would have) under `output`.
pub fn step_dir(output: &Path, step: usize) -> PathBuf {
    checkpoints_dir(output).join(step_dir_name(step))
}

/// The step a checkpoint folder's name stands for: only names [`save`] gives (`step-NNNNNNNN`),
/// never a temporary or leftover folder beside them.
fn step_of(name: &str) -> Option<usize> {
    let step = name.strip_prefix("step-")?.parse().ok()?;
    (step_dir_name(step) == name).then_some(step)
}

/// Saves a checkpoint for `state.step` and returns its folder.
pub fn save(output: &Path, varmap: &VarMap, optimizer: &dyn Optimizer, state: &TrainerState) -> Result<PathBuf> {
    let root = checkpoints_dir(output);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = step_dir_name(state.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    candle_core::safetensors::save(&varmap_tensors(varmap)?, tmp.join(MODEL_FILE))?;
    let opt: HashMap<String, Tensor> = optimizer.state()?.into_iter().collect();
    candle_core::safetensors::save(&opt, tmp.join(OPTIMIZER_FILE))?;
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    if final_dir.exists() {
        let old = root.join(format!(".{name}.old"));
        std::fs::rename(&final_dir, &old)?;
        std::fs::rename(&tmp, &final_dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, &final_dir)?;
    }
    Ok(final_dir)
}

/// Every checkpoint folder under `output`, oldest first. A folder renamed into place is
/// complete; one that lost a file since is listed too, so that resuming from it reports what is
/// missing (instead of silently taking an older one, or none).
pub fn list(output: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = checkpoints_dir(output);
    if !root.is_dir() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
        let path = entry?.path();
        if let Some(step) = path.file_name().and_then(|n| n.to_str()).and_then(step_of) {
            if path.is_dir() {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn latest(output: &Path) -> Result<Option<PathBuf>> {
    Ok(list(output)?.pop().map(|(_, p)| p))
}

/// Removes all but the newest `keep_last` checkpoints, never the one of step `protect` (the best).
pub fn prune(output: &Path, keep_last: usize, protect: Option<usize>) -> Result<()> {
    let all = list(output)?;
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, path) in &all[..cut] {
        if Some(*step) != protect {
            std::fs::remove_dir_all(path).with_context(|| format!("removing old checkpoint {}", path.display()))?;
        }
    }
    Ok(())
}

/// The trainer's state saved in the checkpoint `dir`; a missing or unreadable file is an error
/// naming it.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let damaged = |why: String| anyhow::anyhow!("{}: {why}. The checkpoint {} is damaged: delete it to resume from the one before it", path.display(), dir.display());
    let text = std::fs::read_to_string(&path).map_err(|e| damaged(format!("cannot read it ({e})")))?;
    serde_json::from_str(&text).map_err(|e| damaged(format!("not a trainer state ({e})")))
}

/// Continues from the checkpoint `dir`: reads its state, refuses it when the run described by
/// `now` would see other batches ([`DataOrder::check_resumable_as`]), then restores the model's
/// weights and the optimizer's state.
pub fn resume(dir: &Path, now: &DataOrder, varmap: &VarMap, optimizer: &mut dyn Optimizer) -> Result<TrainerState> {
    let mut state = read_state(dir)?;
    state.order.check_resumable_as(now, dir)?;
    // Settings a state written before they were recorded lacked are known from here on.
    state.order = now.clone();
    load_varmap(varmap, &dir.join(MODEL_FILE))?;
    let opt = read_safetensors(&dir.join(OPTIMIZER_FILE), &Device::Cpu)?;
    optimizer.load_state(&opt).with_context(|| format!("restoring the optimizer from {}", dir.display()))?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_written_before_the_data_order_was_recorded_loads_and_resumes() -> Result<()> {
        let old = r#"{"step": 9, "epoch": 1, "seed": 11, "samples_seen": 144, "best_metric": 0.5, "best_step": 7,
                      "evals_since_best": 1, "train_seconds": 0.25}"#;
        let state: TrainerState = serde_json::from_str(old)?;
        assert_eq!((state.step, state.order.seed, state.order.batch_size), (9, 11, None));
        assert_eq!(state.best.best(), Some((7, 0.5)));
        let now = DataOrder { seed: 11, batch_size: Some(16), grad_accum: Some(2), drop_last: Some(true), train_len: Some(200), world_size: Some(2) };
        state.order.check_resumable_as(&now, Path::new("ckpt"))?;
        let err = state.order.check_resumable_as(&DataOrder { seed: 12, ..now.clone() }, Path::new("ckpt")).unwrap_err().to_string();
        assert!(err.contains("--seed was 11 in the run being resumed, now 12") && err.contains("ckpt"), "{err}");
        let err = now.check_resumable_as(&DataOrder { world_size: Some(4), ..now.clone() }, Path::new("ckpt")).unwrap_err().to_string();
        assert!(err.contains("number of processes (mpirun -np) was 2 in the run being resumed, now 4"), "{err}");
        // Written back flat, with every field.
        let json: serde_json::Value = serde_json::to_value(&state)?;
        for key in ["step", "seed", "batch_size", "train_len", "best_step", "evals_since_best", "first_loss"] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
        Ok(())
    }

    #[test]
    fn only_the_names_save_gives_are_checkpoints() {
        assert_eq!(step_of("step-00000007"), Some(7));
        assert_eq!(step_of("step-123456789"), Some(123_456_789));
        for name in [".step-00000007.tmp", "step-00000007.tmp", ".step-00000007.old", "step-7", "step-+0000007", "step-", "checkpoint-7"] {
            assert_eq!(step_of(name), None, "{name}");
        }
    }
}
