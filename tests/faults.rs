//! Faults while downloading, against a local fake Hub: a download killed midway, and two
//! processes downloading the same model into the same cache at once. Both must leave a cache
//! that loads correctly, and a partial file must never be used.

mod common;

use anyhow::Result;
use common::fake_hub::{fake_hub, COMMIT};
use common::fixture_path;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn download(endpoint: &str, hf_home: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["download", "--model", "org/tiny", "--json"])
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting wick download")
}

fn snapshot(hf_home: &Path) -> std::path::PathBuf {
    hf_home.join("hub/models--org--tiny/snapshots").join(COMMIT)
}

/// The snapshot holds every file of the fixture, byte for byte, and loads as a model.
fn assert_complete(hf_home: &Path) -> Result<()> {
    let source = fixture_path("hf/bert-tiny-cls");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"] {
        assert_eq!(std::fs::read(snapshot(hf_home).join(f))?, std::fs::read(source.join(f))?, "{f} differs");
    }
    let files = wick::weights::ModelFiles::from_dir(&snapshot(hf_home))?;
    wick::pretrained::load::<wick::models::bert::BertForSequenceClassification>(&files, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    Ok(())
}

fn partial_files(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".part")).filter_map(|p| Some((p.clone(), std::fs::metadata(&p).ok()?.len()))).collect()
}

#[test]
fn a_download_killed_midway_is_never_used_and_resumes() -> Result<()> {
    let home = tempfile::tempdir()?;
    // 4 KiB every 100 ms: model.safetensors (83 KB) takes about 2 s.
    let slow = fake_hub(fixture_path("hf/bert-tiny-cls"), Some(Duration::from_millis(100)));
    let mut child = download(&slow, home.path());
    let blobs = home.path().join("hub/models--org--tiny/blobs");
    let start = Instant::now();
    while !partial_files(&blobs).iter().any(|(_, len)| *len >= 8192) {
        assert!(start.elapsed() < Duration::from_secs(60), "the download never started");
        assert!(child.try_wait()?.is_none(), "the download ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    assert!(!snapshot(home.path()).join("model.safetensors").exists(), "a partial file is in the snapshot");

    // Offline, the model is not there: the partial file is not used.
    let offline = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["info", "--model", "org/tiny", "--offline"])
        .env("HF_HOME", home.path())
        .output()?;
    let err = String::from_utf8_lossy(&offline.stderr);
    assert!(!offline.status.success() && !err.contains("panicked"), "{err}");

    // Online again: the download completes (resuming the partial file) and loads.
    let fast = fake_hub(fixture_path("hf/bert-tiny-cls"), None);
    let out = download(&fast, home.path()).wait_with_output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_complete(home.path())
}

#[test]
fn two_processes_downloading_the_same_model_leave_a_cache_that_loads() -> Result<()> {
    let home = tempfile::tempdir()?;
    let slow = fake_hub(fixture_path("hf/bert-tiny-cls"), Some(Duration::from_millis(40)));
    let (a, b) = (download(&slow, home.path()), download(&slow, home.path()));
    for (name, child) in [("first", a), ("second", b)] {
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains("panicked"), "the {name} download failed:\n{err}");
    }
    assert_complete(home.path())
}
