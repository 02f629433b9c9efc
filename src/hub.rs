//! The Hub: a Hugging Face repo id (+ revision) or a local folder → a folder of model files on
//! local disk ([`ModelFiles`], read by [`crate::weights`]).
//!
//! Downloads go through the `hf-hub` crate into the standard Hugging Face cache (`$HF_HOME/hub`,
//! default `~/.cache/huggingface/hub`, laid out as `models--org--name/snapshots/<commit>/`), so
//! files a Python user already downloaded are reused and the other way round. `HF_HUB_OFFLINE=1`
//! reads the cache only (hf-hub ignores it, so it is done here); `HF_ENDPOINT` and `HF_TOKEN` are
//! honoured. When the Hub cannot be reached but the cache has the files, they are used with a
//! warning, as `transformers` does.

use crate::weights::{shard_names, weights_file, CONFIG, SAFETENSORS_INDEX, TOKENIZER_FILES};
use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub use crate::weights::ModelFiles;

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
    if let Some(revision) = &options.revision {
        check_revision(revision)?;
    }
    let snapshot = fetch_snapshot(model, options)?;
    ModelFiles::from_dir(&snapshot).with_context(|| format!("Hub repo {model}"))
}


/// A revision is a branch, tag or commit name: it becomes a path under the cache's `refs/` and
/// `snapshots/`, so one that could lead outside the cache (`/any/folder`, `../x`) is refused.
fn check_revision(revision: &str) -> Result<()> {
    if !crate::weights::is_inside_path(revision) || revision.starts_with('.') {
        bail!("--revision {revision:?} is not a branch, tag or commit name (a local folder is given with --model, not --revision)");
    }
    Ok(())
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
        let path = download_waiting_for_others(&repo, file, &local)?;
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

/// How long a download waits for another process that is fetching the same file into the same
/// cache (hf-hub locks each blob while it downloads it and itself gives up after 5 s).
const WAIT_FOR_OTHER_DOWNLOAD: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Downloads `file` into the cache. When another process holds the file's lock, waits for it
/// (and uses its result once the snapshot has the file) instead of failing or fetching twice;
/// a failure after the other process completed the file (two processes linking the same
/// snapshot entry) is no failure. A killed download leaves only hf-hub's `.sync.part` file,
/// which the next download resumes; the snapshot entry appears only once the blob is complete.
fn download_waiting_for_others(repo: &hf_hub::api::sync::ApiRepo, file: &str, local: &Path) -> Result<PathBuf> {
    let start = std::time::Instant::now();
    let mut told = false;
    loop {
        match repo.download(file) {
            Ok(path) => return Ok(path),
            Err(_) if local.is_file() => return Ok(local.to_path_buf()),
            Err(ApiError::LockAcquisition(lock)) if start.elapsed() < WAIT_FOR_OTHER_DOWNLOAD => {
                if !std::mem::replace(&mut told, true) {
                    eprintln!("another process is downloading {file} ({} is locked); waiting for it", lock.display());
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(download_error(file, e)),
        }
    }
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
    // A refs file names a commit; anything else in it must not become a path.
    if !crate::weights::is_inside_path(&commit) || commit.contains('/') {
        return None;
    }
    let dir = repo.pointer_path(&commit);
    dir.join(CONFIG).is_file().then_some(dir)
}

