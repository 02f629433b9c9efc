//! The Hub weight loader: a Hugging Face repo id (+ revision) or a local folder → config,
//! weights (one safetensors file, sharded safetensors, or `pytorch_model.bin`) and tokenizer.
//!
//! Downloads go through the `hf-hub` crate into the standard Hugging Face cache (`$HF_HOME/hub`,
//! default `~/.cache/huggingface/hub`, laid out as `models--org--name/snapshots/<commit>/`), so
//! files a Python user already downloaded are reused and the other way round. `HF_HUB_OFFLINE=1`
//! reads the cache only (hf-hub ignores it, so it is done here); `HF_ENDPOINT` and `HF_TOKEN` are
//! honoured. When the Hub cannot be reached but the cache has the files, they are used with a
//! warning, as `transformers` does.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Errors a caller may want to tell apart; everything else is an `anyhow` chain with context.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("model repository {repo:?} was not found on {endpoint} (HTTP {status}); check the id, or set HF_TOKEN for a private or gated repository")]
    RepoNotFound { repo: String, endpoint: String, status: u16 },
    #[error("revision {revision:?} of {repo:?} was not found on {endpoint}")]
    RevisionNotFound { repo: String, revision: String, endpoint: String },
    #[error("{what} not found in {location}; it has: {available}")]
    FileMissing { what: String, location: String, available: String },
    #[error("{repo:?} (revision {revision}) is not in the cache at {cache} and {why}")]
    NotCached { repo: String, revision: String, cache: String, why: String },
    #[error("{path}: not a valid safetensors file ({why}); it may be truncated or corrupt: delete it and download again")]
    CorruptWeights { path: String, why: String },
}

/// Where and how to look a model up.
#[derive(Clone, Debug, Default)]
pub struct HubOptions {
    /// Branch, tag or commit; `main` when not given.
    pub revision: Option<String>,
    /// The `hub` cache folder; `$HF_HOME/hub` or `~/.cache/huggingface/hub` when not given.
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network; `None` reads `HF_HUB_OFFLINE`.
    pub offline: Option<bool>,
    /// The Hub's URL; `HF_ENDPOINT` or `https://huggingface.co` when not given.
    pub endpoint: Option<String>,
    /// Hide the download progress bar.
    pub quiet: bool,
}

impl HubOptions {
    pub fn revision(mut self, revision: Option<String>) -> Self {
        self.revision = revision;
        self
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }

    fn is_offline(&self) -> bool {
        self.offline.unwrap_or_else(|| env_flag("HF_HUB_OFFLINE") || env_flag("TRANSFORMERS_OFFLINE"))
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")).unwrap_or(false)
}

/// The weight files of a model, in the format found.
#[derive(Clone, Debug)]
pub enum WeightFiles {
    /// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    Safetensors(Vec<PathBuf>),
    /// `pytorch_model.bin` (read without executing any code).
    PytorchBin(PathBuf),
}

/// A model's files, all on local disk.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The folder the files are in (a local folder or a cache snapshot).
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: WeightFiles,
}

const CONFIG: &str = "config.json";
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PYTORCH_BIN: &str = "pytorch_model.bin";
/// Files a tokenizer may be built from, most complete first.
const TOKENIZER_FILES: [&str; 6] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt"];

/// Resolves `model` (a local folder, or a Hub repo id such as `openai-community/gpt2`) to files on
/// disk, downloading what is missing from the cache unless offline.
pub fn resolve(model: &str, options: &HubOptions) -> Result<ModelFiles> {
    let local = Path::new(model);
    if local.is_dir() {
        return ModelFiles::from_dir(local);
    }
    if local.exists() {
        bail!("{model} is a file; give the folder that holds config.json and the weights, or a Hub repo id");
    }
    if model.starts_with('.') || model.starts_with('/') || model.matches('/').count() > 1 || model.is_empty() {
        bail!("{model:?} is neither an existing folder nor a Hub repo id (like `org/name`)");
    }
    let snapshot = fetch_snapshot(model, options)?;
    ModelFiles::from_dir(&snapshot).with_context(|| format!("Hub repo {model}"))
}

impl ModelFiles {
    /// Finds config and weights in a folder; errors list what the folder has instead.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let has = |name: &str| dir.join(name).is_file();
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
            Some(_) => WeightFiles::PytorchBin(dir.join(PYTORCH_BIN)),
            None => return Err(missing("weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)", dir).into()),
        };
        Ok(Self { dir: dir.to_path_buf(), config: dir.join(CONFIG), weights })
    }

    /// `config.json` parsed as `T`.
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let text = std::fs::read_to_string(&self.config).with_context(|| format!("reading {}", self.config.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} does not parse as the model's config", self.config.display()))
    }

    /// Fails unless `config.json`'s `model_type` is one of `supported`.
    pub fn check_model_type(&self, supported: &[&str]) -> Result<()> {
        let value: serde_json::Value = self.config()?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some(t) if supported.contains(&t) => Ok(()),
            Some(t) => bail!("{}: model_type {t:?} is not supported here (expected {})", self.config.display(), supported.join(" or ")),
            None => Ok(()), // old configs omit it; the weights decide
        }
    }

    /// Every tensor of the checkpoint, by its name in the checkpoint.
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
/// one safetensors file, else a PyTorch pickle.
fn weights_file(has: impl Fn(&str) -> bool) -> Option<&'static str> {
    [SAFETENSORS_INDEX, SAFETENSORS, PYTORCH_BIN].into_iter().find(|f| has(f))
}

fn missing(what: &str, dir: &Path) -> HubError {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    let available = if names.is_empty() { "nothing".to_string() } else { names.join(", ") };
    HubError::FileMissing { what: what.to_string(), location: dir.display().to_string(), available }
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
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
    Ok(shards.into_iter().collect())
}

/// Reads a safetensors file; a truncated or corrupt file is a [`HubError::CorruptWeights`].
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
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
    let vars = varmap.data().lock().unwrap();
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

// ------------------------------------------------------------------------------------ the Hub

fn fetch_snapshot(repo_id: &str, options: &HubOptions) -> Result<PathBuf> {
    let revision = options.revision.clone().unwrap_or_else(|| "main".to_string());
    let cache = options.cache();
    let cached = cached_snapshot(&cache, repo_id, &revision);
    let not_cached = |why: String| HubError::NotCached {
        repo: repo_id.to_string(),
        revision: revision.clone(),
        cache: cache.path().display().to_string(),
        why,
    };
    if options.is_offline() {
        return cached.ok_or_else(|| not_cached("offline mode is on (HF_HUB_OFFLINE)".into()).into());
    }
    let endpoint = options
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| "https://huggingface.co".to_string());
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()).or_else(|| cache.token());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(endpoint.clone())
        .with_token(token)
        .with_progress(!options.quiet)
        .build()
        .context("setting up the Hub client")?;
    let repo = api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.clone()));
    let info = match repo.info() {
        Ok(info) => info,
        Err(e) => {
            return match http_status(&e) {
                Some(status @ (401 | 404)) if revision == "main" => {
                    Err(HubError::RepoNotFound { repo: repo_id.into(), endpoint, status }.into())
                }
                Some(404) => Err(HubError::RevisionNotFound { repo: repo_id.into(), revision, endpoint }.into()),
                Some(status) => Err(anyhow::anyhow!("the Hub at {endpoint} answered HTTP {status} for {repo_id}")),
                None => match cached {
                    Some(dir) => {
                        eprintln!("warning: cannot reach {endpoint} ({e}); using the cached copy of {repo_id} in {}", dir.display());
                        Ok(dir)
                    }
                    None => Err(not_cached(format!("the Hub at {endpoint} cannot be reached ({e})")).into()),
                },
            };
        }
    };
    let remote: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    if !remote.contains(CONFIG) {
        return Err(HubError::FileMissing {
            what: "config.json".into(),
            location: format!("{repo_id} (revision {revision})"),
            available: remote.iter().copied().collect::<Vec<_>>().join(", "),
        }
        .into());
    }
    // Everything comes from the commit the Hub names now (`info.sha`): a file already in that
    // snapshot is reused, any other is downloaded (`download`, not `get`: `get` would take a file
    // of whatever older commit `refs/<revision>` still points to).
    let snapshot = cache.repo(Repo::model(repo_id.to_string())).pointer_path(&info.sha);
    let fetch = |file: &str| -> Result<PathBuf> {
        let local = snapshot.join(file);
        if local.is_file() {
            return Ok(local);
        }
        let path = repo.download(file).map_err(|e| download_error(file, e))?;
        if path != local {
            bail!("the Hub served {file} from another commit than {} (the branch moved during the download?): try again", info.sha);
        }
        Ok(path)
    };
    fetch(CONFIG)?;
    match weights_file(|f| remote.contains(f)) {
        Some(SAFETENSORS_INDEX) => {
            for shard in shard_names(&fetch(SAFETENSORS_INDEX)?)? {
                fetch(&shard)?;
            }
        }
        Some(file) => {
            fetch(file)?;
        }
        None => {} // from_dir names what is missing
    }
    for file in TOKENIZER_FILES.iter().filter(|f| remote.contains(**f)) {
        fetch(file)?;
    }
    cache.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision)).create_ref(&info.sha)?;
    Ok(snapshot)
}

fn download_error(file: &str, e: ApiError) -> anyhow::Error {
    anyhow::anyhow!("downloading {file}: {e}")
}

fn http_status(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::StatusCode(code) => Some(*code),
            _ => None,
        },
        _ => None,
    }
}

/// The cached snapshot of `revision` (a branch or tag through `refs/`, or a commit hash).
fn cached_snapshot(cache: &Cache, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo = cache.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string()));
    let repo_dir = cache.path().join(Repo::model(repo_id.to_string()).folder_name());
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let dir = repo.pointer_path(&commit);
    dir.join(CONFIG).is_file().then_some(dir)
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
    let write = |name: &str, fill: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let (tmp, target) = (dir.join(format!(".{name}.tmp")), dir.join(name));
        let written = fill(&tmp).and_then(|_| Ok(std::fs::File::open(&tmp)?.sync_all()?)).and_then(|_| Ok(std::fs::rename(&tmp, &target)?));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.with_context(|| format!("writing {}", target.display()))
    };
    // Contiguous copies on the CPU: what safetensors files hold.
    let cpu: HashMap<String, Tensor> =
        tensors.iter().map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?))).collect::<Result<_>>()?;
    write(SAFETENSORS, &|p| Ok(candle_core::safetensors::save(&cpu, p)?))?;
    let index = dir.join(SAFETENSORS_INDEX);
    let mut stale: Vec<PathBuf> = shard_names(&index).map(|shards| shards.iter().map(|s| dir.join(s)).collect()).unwrap_or_default();
    stale.extend([index, dir.join(PYTORCH_BIN)]);
    for path in stale.iter().filter(|p| p.is_file() && p.file_name() != Some(SAFETENSORS.as_ref())) {
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

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
