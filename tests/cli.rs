//! The `wick` binary end to end on the tiny fixtures: each subcommand's output contract, bad
//! flags as clear errors (never a panic), and what the training commands save loading back.

mod common;

use anyhow::Result;
use common::fixture_path;
use std::path::Path;
use std::process::{Command, Output};

fn wick(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(args)
        // Never the network: the Hub is not reachable from CI.
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("running wick")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `wick args`, fails the test with its stderr unless it succeeds; the last stdout line
/// parsed as JSON.
fn json(args: &[&str]) -> serde_json::Value {
    let out = wick(args);
    assert!(out.status.success(), "wick {args:?} failed:\n{}", stderr(&out));
    let text = stdout(&out);
    serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("wick {args:?}: last line is not JSON ({e}):\n{text}"))
}

/// Runs `wick args` expecting a clean failure whose stderr contains `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = wick(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "wick {args:?} should fail");
    assert!(!err.contains("panicked"), "wick {args:?} panicked:\n{err}");
    assert!(err.contains(needle), "wick {args:?}: stderr lacks {needle:?}:\n{err}");
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_subcommand_explains_its_flags() {
    let top = stdout(&wick(&["--help"]));
    for sub in ["generate", "finetune", "predict", "embed", "train", "quantize", "distill", "prune", "perplexity", "serve", "download", "info"] {
        assert!(top.contains(sub), "wick --help lacks {sub}");
    }
    for sub in [&["generate"][..], &["finetune"], &["predict"], &["embed"], &["quantize"], &["distill"], &["prune"], &["perplexity"], &["serve"], &["info"], &["download"], &["train", "gpt2"], &["train", "mnist"], &["train", "char-rnn"]] {
        let mut args = sub.to_vec();
        args.push("--help");
        let help = stdout(&wick(&args));
        // Every option line (`      --flag ...`) is followed by its explanation.
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("--") && !line.trim_start().starts_with("--help") && !line.trim_start().starts_with("--version") {
                let explained = line.split("  ").filter(|s| !s.trim().is_empty()).count() > 1
                    || lines.get(i + 1).is_some_and(|next| !next.trim().is_empty() && !next.trim_start().starts_with('-'));
                assert!(explained, "wick {sub:?} --help: {line:?} has no explanation");
            }
        }
    }
}

#[test]
fn generate_greedy_matches_the_library_and_keeps_its_json_contract() -> Result<()> {
    let model = fixture_path("hf/gpt2-tiny");
    let out = json(&["generate", "--model", path(&model), "--prompt", "hello world", "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos", "--json"]);
    for key in ["prompt", "prompt_ids", "generated_ids", "text", "finish_reason", "new_tokens", "tokens_per_s", "device", "dtype"] {
        assert!(out.get(key).is_some(), "no {key} in {out}");
    }
    let files = wick::weights::ModelFiles::from_dir(&model)?;
    let (lm, _) = wick::pretrained::load::<wick::models::gpt2::GPT2LMHeadModel>(&files, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let expected = wick::generate::generate_text(&lm, &files.tokenizer()?, &["hello world"], &wick::generate::GenerationConfig::greedy(6), None)?;
    assert_eq!(out["generated_ids"], serde_json::json!(expected.generated_ids[0]));
    assert_eq!(out["text"], serde_json::json!(expected.texts[0]));
    // f16 and bf16 weights run on the CPU too.
    for dtype in ["f16", "bf16"] {
        json(&["generate", "--model", path(&model), "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "2", "--dtype", dtype, "--json"]);
    }
    Ok(())
}

#[test]
fn bad_flag_values_are_clear_errors() {
    let model = fixture_path("hf/gpt2-tiny");
    let m = path(&model);
    refused(&["generate", "--model", m, "--top-p", "1.5"], "--top-p");
    refused(&["generate", "--model", m, "--top-p", "NaN"], "--top-p");
    refused(&["generate", "--model", m, "--temperature=-1"], "--temperature");
    refused(&["generate", "--model", m, "--stop", ""], "--stop");
    refused(&["generate", "--model", m, "--device", "tpu"], "unknown device");
    refused(&["generate", "--model", m, "--dtype", "f64"], "unknown dtype");
    refused(&["generate", "--model", m, "--max-new-tokens", "18446744073709551615"], "context");
    refused(&["generate", "--model", "/no/such/folder"], "neither an existing folder");
    refused(&["generate", "--model", "org/name", "--revision", "/any/folder"], "not a branch, tag or commit");
    refused(&["train", "char-rnn", "--data", "x.txt", "--minutes", "NaN"], "--minutes");
    refused(&["train", "char-rnn", "--data", "x.txt", "--minutes", "1e300"], "more than a year");
    refused(&["train", "gpt2", "--data", "x.txt", "--lr", "0"], "--lr");
    refused(&["train", "mnist", "--data", "x", "--batch-size", "0"], "--batch-size");
    refused(&["train", "mnist", "--data", "/no/such", "--dtype", "bf16"], "training runs in f32");
    refused(&["embed", "--model", path(&fixture_path("hf/bert-tiny-cls")), "--dtype", "bf16"], "not supported on the CPU");
    refused(&["embed", "--model", path(&fixture_path("hf/bert-tiny-cls"))], "nothing to embed");
    refused(&["download", "--model", m], "local path");
}

#[test]
fn info_and_embed_describe_and_encode_a_model_folder() -> Result<()> {
    let model = fixture_path("hf/bert-tiny-cls");
    let info = json(&["info", "--model", path(&model), "--json"]);
    let tensors = wick::weights::ModelFiles::from_dir(&model)?.load_tensors(&candle_core::Device::Cpu)?;
    let floats: usize = tensors.values().filter(|t| t.dtype().is_float()).map(|t| t.elem_count()).sum();
    assert_eq!(info["parameters"], floats);
    assert_eq!(info["model_type"], "bert");

    let out = wick(&["embed", "--model", path(&model), "--text", "the movie was great", "--text", "a dull film", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "two vectors and a summary:\n{text}");
    let files = wick::weights::ModelFiles::from_dir(&model)?;
    let embedder = wick::embed::SentenceEmbedder::load(&files, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let expected = embedder.embed(&["the movie was great", "a dull film"])?.vectors;
    for (line, want) in lines.iter().zip(&expected) {
        let got: Vec<f32> = serde_json::from_str(line)?;
        assert_eq!(&got, want);
    }
    let summary: serde_json::Value = serde_json::from_str(lines[2])?;
    assert_eq!(summary["rows"], 2);
    Ok(())
}

#[test]
fn download_without_network_or_cache_says_so() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["download", "--model", "org/name"])
        .env("HF_HOME", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("not in the cache") && !err.contains("panicked"), "{err}");
}

#[test]
fn train_mnist_saves_a_model_folder_that_info_reads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("mnist");
    std::fs::create_dir_all(&data)?;
    for (prefix, n) in [("train", 64), ("t10k", 32)] {
        let pixels: Vec<u8> = (0..n * 28 * 28).map(|i| ((i * 7) % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        wick::data::mnist::write_idx(&data.join(format!("{prefix}-images-idx3-ubyte")), &[n, 28, 28], &pixels)?;
        wick::data::mnist::write_idx(&data.join(format!("{prefix}-labels-idx1-ubyte")), &[n], &labels)?;
    }
    let output = dir.path().join("run");
    let report = json(&["train", "mnist", "--model", "mlp", "--data", path(&data), "--epochs", "1", "--batch-size", "16", "--output", path(&output), "--json"]);
    assert_eq!(report["steps"], 4);
    assert!(report["eval_accuracy"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{report}");
    let info = json(&["info", "--model", path(&output), "--json"]);
    assert_eq!(info["model_type"], "wick-mlp");
    assert_eq!(info["parameters"], report["parameters"]);
    Ok(())
}

#[test]
fn train_gpt2_and_char_rnn_save_folders_that_load_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, "the quick brown fox jumps over the lazy dog. ".repeat(40))?;
    let gpt2 = dir.path().join("gpt2");
    let tokenizer = fixture_path("hf/gpt2-tiny");
    let report = json(&[
        "train", "gpt2", "--data", path(&corpus), "--tokenizer", path(&tokenizer), "--n-layer", "1", "--n-embd", "16",
        "--n-head", "2", "--block-size", "16", "--steps", "3", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
        "--warmup", "1", "--sample-tokens", "4", "--prompt", "the", "--output", path(&gpt2), "--json",
    ]);
    assert_eq!(report["steps"], 3);
    let generated = json(&["generate", "--model", path(&gpt2), "--prompt", "the", "--temperature", "0", "--max-new-tokens", "3", "--ignore-eos", "--json"]);
    assert_eq!(generated["new_tokens"], 3);
    // `wick perplexity` on the held-out part scores the same tokens as training's final
    // evaluation: the same perplexity (batches of another size: float summation order only).
    let scored = json(&["perplexity", "--model", path(&gpt2), "--input", path(&corpus), "--last", "0.1", "--context", "16", "--json"]);
    let (got, want) = (scored["perplexity"].as_f64().unwrap(), report["val_perplexity"].as_f64().unwrap());
    assert!((got - want).abs() <= 1e-4 * want, "wick perplexity {got} vs training's validation perplexity {want}");
    refused(&["perplexity", "--model", path(&gpt2), "--input", path(&corpus), "--context", "17"], "longer than the model's context");
    refused(&["perplexity", "--model", path(&gpt2), "--input", path(&corpus), "--last", "0"], "--last");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, " \n")?;
    refused(&["perplexity", "--model", path(&gpt2), "--input", path(&empty)], "empty");

    let rnn = dir.path().join("rnn");
    let report = json(&[
        "train", "char-rnn", "--data", path(&corpus), "--steps", "3", "--batch-size", "2", "--seq-len", "8", "--embedding", "4",
        "--hidden", "8", "--eval-every", "2", "--sample-len", "5", "--prompt", "the", "--output", path(&rnn), "--json",
    ]);
    assert_eq!(report["steps"], 3);
    assert!(rnn.join(wick::cmd::train::char_rnn::CHAR_VOCAB).is_file());
    assert_eq!(json(&["info", "--model", path(&rnn), "--json"])["model_type"], "wick-char-rnn");
    // A prompt the corpus cannot spell names the flag, before any training.
    refused(&["train", "char-rnn", "--data", path(&corpus), "--prompt", "QZX"], "--prompt");
    Ok(())
}
