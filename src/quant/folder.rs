//! A model folder turned into a quantized one (`wick quantize`): `config.json`, the tokenizer
//! files and `model.gguf`, which [`crate::pretrained::load`] (and so `wick generate`, `predict`,
//! `embed` and `info`) reads like any other folder.
//!
//! The model is loaded in f32 on the CPU as its family's usual class (`GPT2LMHeadModel`,
//! `BertForSequenceClassification` when the config names it, else `BertModel`), its linear
//! layers are quantized, and the file stores them with every other tensor by the names that
//! class's `build` reads. A linear weight the checkpoint shares with another tensor (GPT-2's LM
//! head, tied to `wte`) is stored as its own quantized tensor and the config says
//! `tie_word_embeddings: false`, which is what the folder then holds.

use super::{gguf, quantize_model, QuantType};
use crate::models::bert::{BertForSequenceClassification, BertModel};
use crate::models::gpt2::GPT2LMHeadModel;
use crate::pretrained::{load_with_tensors, Pretrained};
use crate::weights::ModelFiles;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::Path;

/// What [`quantize_folder`] wrote.
#[derive(Debug, serde::Serialize)]
pub struct QuantizeReport {
    pub architecture: String,
    pub quantization: String,
    /// Linear layers quantized.
    pub layers: usize,
    /// Weights in them.
    pub quantized_weights: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub output: String,
}

/// Quantizes the model in `files` to `qtype` and writes the quantized folder `output`.
pub fn quantize_folder(files: &ModelFiles, qtype: QuantType, output: &Path) -> Result<QuantizeReport> {
    if output.exists() && crate::weights::same_dir(output, &files.dir) {
        bail!("--output {} is the model's own folder: write the quantized model to another folder", output.display());
    }
    let config: serde_json::Value = files.config()?;
    let model_type = config.get("model_type").and_then(|v| v.as_str()).unwrap_or_default();
    let names_class = |class: &str| config["architectures"].as_array().is_some_and(|a| a.iter().any(|v| v.as_str() == Some(class)));
    match model_type {
        "gpt2" => quantize_as::<GPT2LMHeadModel>(files, qtype, output, config),
        "bert" if names_class(BertForSequenceClassification::ARCHITECTURE) => quantize_as::<BertForSequenceClassification>(files, qtype, output, config),
        "bert" => quantize_as::<BertModel>(files, qtype, output, config),
        other => bail!("{}: model_type {other:?} cannot be quantized (wick quantizes gpt2 and bert models)", files.config.display()),
    }
}

fn quantize_as<M: Pretrained>(files: &ModelFiles, qtype: QuantType, output: &Path, mut config: serde_json::Value) -> Result<QuantizeReport> {
    if matches!(files.weights, crate::weights::WeightFiles::Gguf(_)) {
        bail!("{} is quantized already: quantize the f32 model instead", files.dir.display());
    }
    let (mut model, _, mut tensors) = load_with_tensors::<M>(files, DType::F32, &Device::Cpu)?;
    let quantized = quantize_model(&mut model, qtype).with_context(|| format!("quantizing {}", files.dir.display()))?;
    let mut tied = false;
    for (name, _) in &quantized {
        tied |= tensors.remove(name).is_none();
    }
    if tied {
        config["tie_word_embeddings"] = false.into();
    }
    let quantized_weights: u64 = quantized.iter().map(|(_, q)| q.shape().elem_count() as u64).sum();
    let bytes_before = files.weights.size_on_disk();
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let plain: HashMap<_, _> = tensors.into_iter().filter(|(_, t)| t.dtype().is_float()).collect();
    gguf::write(&output.join(gguf::FILE), &config, qtype, &plain, &quantized)?;
    crate::weights::finish_folder(output, gguf::FILE, &config, Some(&files.dir))?;
    Ok(QuantizeReport {
        architecture: M::ARCHITECTURE.to_string(),
        quantization: qtype.name().to_string(),
        layers: quantized.len(),
        quantized_weights,
        bytes_before,
        bytes_after: std::fs::metadata(output.join(gguf::FILE))?.len(),
        output: output.display().to_string(),
    })
}
