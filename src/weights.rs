//! A model folder's files (config, weights, tokenizer) and how weights are read and written.
//!
//! [`crate::hub`] turns a repo id into a folder on disk; this module reads that folder. Weights
//! come as one `model.safetensors`, shards named by `model.safetensors.index.json`, or a PyTorch
//! `pytorch_model.bin` (read without executing any code), or, for a quantized model, one GGUF
//! `model.gguf` (see [`crate::quant`]). Safetensors files are memory-mapped:
//! tensors are copied once, from the page cache into their own storage, and the file's bytes are
//! never held in a second buffer (a 500 MB GPT-2 checkpoint peaked at 1 GB when read whole).
//! A folder's files never lead outside it: shard names are plain relative paths, checked before
//! anything is opened.

use crate::hub::HubError;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

pub(crate) const CONFIG: &str = "config.json";
pub(crate) const SAFETENSORS: &str = "model.safetensors";
pub(crate) const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
pub(crate) const PYTORCH_BIN: &str = "pytorch_model.bin";
pub(crate) const GGUF: &str = crate::quant::gguf::FILE;
/// Files a tokenizer may be built from, most complete first.
pub(crate) const TOKENIZER_FILES: [&str; 6] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt"];

/// The weight files of a model, in the format found.
#[derive(Clone, Debug)]
pub enum WeightFiles {
    /// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    Safetensors(Vec<PathBuf>),
    /// `pytorch_model.bin` (read without executing any code).
    PytorchBin(PathBuf),
    /// `model.gguf`: a quantized model (`wick quantize`), for inference only.
    Gguf(PathBuf),
}

impl WeightFiles {
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            Self::Safetensors(paths) => paths.iter().map(PathBuf::as_path).collect(),
            Self::PytorchBin(path) | Self::Gguf(path) => vec![path.as_path()],
        }
    }

    /// Bytes on disk, all files together.
    pub fn size_on_disk(&self) -> u64 {
        self.paths().iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
    }
}

/// A model's files, all on local disk.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The folder the files are in (a local folder or a cache snapshot).
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: WeightFiles,
}

impl ModelFiles {
    /// Finds config and weights in a folder; errors list what the folder has instead.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let has = |name: &str| dir.join(name).is_file();
        let config = dir.join(CONFIG);
        if config.exists() && !config.is_file() {
            bail!("{} is not a file (a folder?); it must be the model's JSON config", config.display());
        }
        if !has(CONFIG) {
            return Err(missing("config.json", dir).into());
        }
        let weights = match weights_file(has) {
            Some(SAFETENSORS_INDEX) => {
                let shards = shard_names(&dir.join(SAFETENSORS_INDEX))?;
                let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
                if let Some(absent) = paths.iter().find(|p| !p.is_file()) {
                    return Err(missing(&format!("shard {} named by {SAFETENSORS_INDEX}", absent.display()), dir).into());
                }
                WeightFiles::Safetensors(paths)
            }
            Some(SAFETENSORS) => WeightFiles::Safetensors(vec![dir.join(SAFETENSORS)]),
            Some(PYTORCH_BIN) => WeightFiles::PytorchBin(dir.join(PYTORCH_BIN)),
            Some(_) => WeightFiles::Gguf(dir.join(GGUF)),
            None => return Err(missing("weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin or model.gguf)", dir).into()),
        };
        check_inside(dir, &config)?;
        let text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(_)) => {}
            Ok(_) => bail!("{} is not a JSON object of model settings", config.display()),
            Err(e) => bail!("{} is not valid JSON ({e})", config.display()),
        }
        for path in weights.paths() {
            check_inside(dir, path)?;
        }
        Ok(Self { dir: dir.to_path_buf(), config, weights })
    }

    /// `config.json` parsed as `T`.
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let text = std::fs::read_to_string(&self.config).with_context(|| format!("reading {}", self.config.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} does not parse as the model's config", self.config.display()))
    }

    /// `config.json`'s `model_type`, when it has one (old configs omit it).
    pub fn model_type(&self) -> Result<Option<String>> {
        let value: serde_json::Value = self.config()?;
        Ok(value.get("model_type").and_then(|v| v.as_str()).map(String::from))
    }

    /// Fails unless `config.json`'s `model_type` is one of `supported`.
    pub fn check_model_type(&self, supported: &[&str]) -> Result<()> {
        match self.model_type()? {
            Some(t) if supported.contains(&t.as_str()) => Ok(()),
            Some(t) => bail!("{}: model_type {t:?} is not supported here (expected {})", self.config.display(), supported.join(" or ")),
            None => Ok(()), // old configs omit it; the weights decide
        }
    }

    /// Every tensor of the checkpoint, by its name in the checkpoint (a quantized model's
    /// weights dequantized to f32).
    pub fn load_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        match &self.weights {
            WeightFiles::Safetensors(paths) => {
                let mut all = HashMap::new();
                for path in paths {
                    all.extend(read_safetensors(path, device)?);
                }
                Ok(all)
            }
            WeightFiles::PytorchBin(path) => {
                let tensors = candle_core::pickle::read_all(path)
                    .map_err(|e| anyhow::anyhow!("{}: not a readable PyTorch checkpoint ({e}); it may be truncated or corrupt", path.display()))?;
                tensors.into_iter().map(|(name, t)| Ok((name, t.to_device(device)?))).collect()
            }
            WeightFiles::Gguf(path) => crate::quant::gguf::read_dequantized(path, device),
        }
    }

    /// The tokenizer: `tokenizer.json` when there is one, else built from `vocab.txt` (WordPiece,
    /// BERT) or `vocab.json` + `merges.txt` (byte-level BPE, GPT-2). Padding and truncation saved
    /// in the file are switched off: callers pad and truncate themselves.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        crate::tokenizer::load(&self.dir)
    }
}

/// Which weights file a model folder (local or on the Hub) is loaded from: a shard index, else
/// one safetensors file, else a PyTorch pickle, else a quantized `model.gguf`.
pub(crate) fn weights_file(has: impl Fn(&str) -> bool) -> Option<&'static str> {
    [SAFETENSORS_INDEX, SAFETENSORS, PYTORCH_BIN, GGUF].into_iter().find(|f| has(f))
}

fn missing(what: &str, dir: &Path) -> HubError {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    let available = if names.is_empty() { "nothing".to_string() } else { names.join(", ") };
    HubError::FileMissing { what: what.to_string(), location: dir.display().to_string(), available }
}

/// The shard files a safetensors index names, each checked to stay inside the model folder.
pub(crate) fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let parsed: Index = serde_json::from_str(&text).with_context(|| format!("{} is not a safetensors index", index.display()))?;
    let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
    if shards.is_empty() {
        bail!("{} names no shards", index.display());
    }
    if let Some(bad) = shards.iter().find(|s| !is_inside_path(s)) {
        bail!("{} names the shard {bad:?}, which is not a file inside the model folder; refusing to open it", index.display());
    }
    Ok(shards.into_iter().collect())
}

/// Whether `relative` names something inside the folder it is joined to: not empty, not
/// absolute, no `..`, no drive or root.
pub(crate) fn is_inside_path(relative: &str) -> bool {
    let path = Path::new(relative);
    !relative.is_empty() && !relative.contains('\\') && path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Errors unless `file` (which may be a symbolic link) really lies inside the model folder `dir`:
/// a link to `/etc/passwd` or to another user's files is never opened. A Hugging Face cache
/// snapshot (`models--org--name/snapshots/<commit>/`) is made of links into the repo's own
/// `blobs/`, so there the repo's folder is the boundary.
pub fn check_inside(dir: &Path, file: &Path) -> Result<()> {
    let Ok(target) = file.canonicalize() else {
        return Ok(()); // absent: whoever opens it reports that
    };
    let folder = dir.canonicalize().with_context(|| format!("reading the folder {}", dir.display()))?;
    let in_cache = folder.parent().filter(|p| p.file_name() == Some("snapshots".as_ref())).and_then(Path::parent);
    let root = match in_cache {
        Some(repo) if repo.file_name().is_some_and(|n| n.to_string_lossy().starts_with("models--")) => repo.to_path_buf(),
        _ => folder,
    };
    if !target.starts_with(&root) {
        bail!("{} leads to {}, outside the model folder {}; refusing to open it (copy the file into the folder instead of linking it)", file.display(), target.display(), root.display());
    }
    Ok(())
}

/// Reads a safetensors file through a memory map; a truncated or corrupt file is a
/// [`HubError::CorruptWeights`].
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the map is read-only and dropped before returning; the tensors own copies. A file
    // changed by another process while mapped could give wrong values, as any read would.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
    let corrupt = |why: String| HubError::CorruptWeights { path: path.display().to_string(), why };
    // Parse with the safetensors crate first: it checks the header against the file length, so a
    // truncated download is reported as such and not as a confusing shape error later.
    let parsed = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut out = HashMap::with_capacity(parsed.len());
    for (name, view) in parsed.tensors() {
        let tensor = candle_core::safetensors::Load::load(&view, device).map_err(|e| corrupt(format!("tensor {name}: {e}")))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

/// A `VarBuilder` over fixed (not trainable) tensors, for inference.
pub fn inference_var_builder(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors, dtype, device)
}

/// What copying a checkpoint into a model's variables did.
#[derive(Debug, Default)]
pub struct CopyReport {
    /// Variables the checkpoint had no value for: they keep their fresh initialisation.
    pub newly_initialized: Vec<String>,
    /// Checkpoint tensors the model has no variable for.
    pub unused: Vec<String>,
    /// Checkpoint tensors the caller chose not to copy (see `pretrained::load_trainable`).
    pub left_out: Vec<String>,
}

impl CopyReport {
    /// The warning transformers prints for the same situation, or `None` when all matched.
    pub fn warning(&self) -> Option<String> {
        if self.newly_initialized.is_empty() && self.unused.is_empty() {
            return None;
        }
        let mut parts = vec![];
        if !self.newly_initialized.is_empty() {
            parts.push(format!("newly initialised (train them before use): {}", self.newly_initialized.join(", ")));
        }
        if !self.unused.is_empty() {
            parts.push(format!("checkpoint tensors not used: {}", self.unused.join(", ")));
        }
        Some(parts.join("; "))
    }
}

/// Copies checkpoint values into the model's trainable variables (a `VarMap` the model was built
/// from), converting dtypes. A shape mismatch is an error naming the tensor and both shapes.
pub fn copy_into_varmap(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> Result<CopyReport> {
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("the model's variables are poisoned by an earlier panic"))?;
    let mut report = CopyReport::default();
    for (name, var) in vars.iter() {
        match tensors.get(name) {
            Some(value) => {
                if value.dims() != var.dims() {
                    bail!(
                        "checkpoint tensor {name} has shape {:?} but the config makes it {:?}: config.json and the weights do not belong together",
                        value.dims(),
                        var.dims()
                    );
                }
                var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?;
            }
            None => report.newly_initialized.push(name.clone()),
        }
    }
    report.unused = tensors.keys().filter(|k| !vars.contains_key(*k)).cloned().collect();
    report.newly_initialized.sort();
    report.unused.sort();
    Ok(report)
}

// ------------------------------------------------------------------------------- saving


/// Writes a Hugging Face model folder that `from_pretrained` loads unchanged: `config.json`,
/// `model.safetensors` (`tensors`, by the checkpoint names transformers uses) and the tokenizer
/// files found in `tokenizer_from`. Each file is written beside its target and renamed into place,
/// so an interrupted save never leaves a half-written file where a good one was; `config.json`
/// goes last. Weight files of another format left in the folder (shards, `pytorch_model.bin`)
/// are removed, as loaders would prefer them to the new `model.safetensors`.
pub fn save_pretrained(dir: &Path, config: &impl serde::Serialize, tensors: &HashMap<String, Tensor>, tokenizer_from: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Contiguous copies on the CPU: what safetensors files hold.
    let cpu: HashMap<String, Tensor> =
        tensors.iter().map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?))).collect::<Result<_>>()?;
    write_with(&dir.join(SAFETENSORS), &|p| Ok(candle_core::safetensors::save(&cpu, p)?))?;
    finish_folder(dir, SAFETENSORS, config, tokenizer_from)
}

/// Completes a model folder whose weights file `weights` is written: removes weight files of
/// other formats (loaders would prefer them), copies the tokenizer files of `tokenizer_from`,
/// then writes `config.json`, last and atomically.
pub(crate) fn finish_folder(dir: &Path, weights: &str, config: &impl serde::Serialize, tokenizer_from: Option<&Path>) -> Result<()> {
    let write = |name: &str, fill: &dyn Fn(&Path) -> Result<()>| write_with(&dir.join(name), fill);
    let index = dir.join(SAFETENSORS_INDEX);
    let mut stale: Vec<PathBuf> = shard_names(&index).map(|shards| shards.iter().map(|s| dir.join(s)).collect()).unwrap_or_default();
    stale.extend([index, dir.join(SAFETENSORS), dir.join(PYTORCH_BIN), dir.join(GGUF)]);
    for path in stale.iter().filter(|p| p.is_file() && p.file_name() != Some(weights.as_ref())) {
        std::fs::remove_file(path).with_context(|| format!("removing the stale {}", path.display()))?;
    }
    if let Some(src) = tokenizer_from.filter(|src| !same_dir(src, dir)) {
        for name in TOKENIZER_FILES {
            let from = src.join(name);
            if from.is_file() {
                write(name, &|p| Ok(std::fs::copy(&from, p).map(|_| ())?))?;
            }
        }
    }
    let json = serde_json::to_string_pretty(config)?;
    write(CONFIG, &|p| Ok(std::fs::write(p, format!("{json}\n"))?))
}

pub(crate) fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Writes `target` through `fill` on a temporary file beside it, synced, then renamed into place:
/// an interrupted write never leaves a half-written file where a good one was.
pub fn write_with(target: &Path, fill: &dyn Fn(&Path) -> Result<()>) -> Result<()> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = target.with_file_name(format!(".{name}.tmp"));
    let written = fill(&tmp).and_then(|_| Ok(std::fs::File::open(&tmp)?.sync_all()?)).and_then(|_| Ok(std::fs::rename(&tmp, target)?));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", target.display()))
}

/// [`write_with`] for bytes already in memory.
pub fn write_atomically(target: &Path, bytes: &[u8]) -> Result<()> {
    write_with(target, &|tmp| Ok(std::fs::write(tmp, bytes)?))
}
