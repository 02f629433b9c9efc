//! Checkpoints: a folder `checkpoints/step-NNNNNNNN/` with the model's weights
//! (`model.safetensors`), the optimizer's state (`optimizer.safetensors`) and the trainer's
//! (`trainer_state.json`). A checkpoint is written into a hidden temporary folder and renamed
//! into place, so a crash leaves either the old checkpoint or the new one, never half of one.

use super::optim::Optimizer;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Epochs fully completed.
    pub epoch: usize,
    pub seed: u64,
    pub samples_seen: u64,
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    /// Evaluations since the best one (for early stopping).
    pub evals_since_best: usize,
    pub train_seconds: f64,
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
    let report = crate::hub::copy_into_varmap(varmap, tensors)?;
    if !report.newly_initialized.is_empty() {
        bail!("no tensor for {:?}", report.newly_initialized);
    }
    Ok(())
}

/// Reads a checkpoint's safetensors file (a truncated or corrupt file is reported as such).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    crate::hub::read_safetensors(path, device)
}

pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
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
    candle_core::safetensors::save(&varmap_tensors(varmap)?, tmp.join("model.safetensors"))?;
    let opt: HashMap<String, Tensor> = optimizer.state().into_iter().collect();
    candle_core::safetensors::save(&opt, tmp.join("optimizer.safetensors"))?;
    std::fs::write(tmp.join("trainer_state.json"), serde_json::to_string_pretty(state)?)?;
    for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
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

/// All complete checkpoints under `output`, oldest first.
pub fn list(output: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = checkpoints_dir(output);
    if !root.is_dir() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root)? {
        let path = entry?.path();
        let step = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse().ok());
        if let Some(step) = step {
            if path.join("trainer_state.json").is_file() {
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

/// Restores model weights and optimizer state from `dir`, returning the trainer's state.
pub fn load(dir: &Path, varmap: &VarMap, optimizer: &mut dyn Optimizer) -> Result<TrainerState> {
    load_varmap(varmap, &dir.join("model.safetensors"))?;
    let opt = read_safetensors(&dir.join("optimizer.safetensors"), &Device::Cpu)?;
    optimizer.load_state(&opt).with_context(|| format!("restoring the optimizer from {}", dir.display()))?;
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state", path.display()))
}
