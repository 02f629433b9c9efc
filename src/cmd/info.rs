//! `wick info`: what a model is (architecture, size, number format) and where it was found,
//! read from its config and the weight files' headers without loading the weights.

use crate::cli::ModelArgs;
use crate::weights::{ModelFiles, WeightFiles};
use anyhow::{Context, Result};
use clap::Args;
use std::collections::BTreeMap;

/// Describe a model: architecture, parameter count, dtype, size on disk, and where it was found.
#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The facts `wick info` reports.
#[derive(Debug, serde::Serialize)]
pub struct ModelInfo {
    pub model: String,
    pub dir: String,
    pub model_type: Option<String>,
    pub architectures: Vec<String>,
    /// Elements of the floating-point tensors (integer buffers such as BERT's `position_ids`
    /// are not parameters).
    pub parameters: u64,
    /// Elements by element type (`F32`, `F16`, `BF16`, ..., and `Q8_0`, `Q4K`, ... in a
    /// quantized model).
    pub dtypes: BTreeMap<String, u64>,
    /// A quantized model's weight format (`q8_0`, `q4_0`, `q4_k`, `q6_k`); none otherwise.
    pub quantization: Option<String>,
    pub size_on_disk: u64,
    pub weight_files: Vec<String>,
    /// Shape-deciding config values under their usual names (layers, width, heads, vocabulary,
    /// context), when the config has them.
    pub shape: BTreeMap<String, serde_json::Value>,
}

pub fn describe(model: &str, files: &ModelFiles) -> Result<ModelInfo> {
    let config: serde_json::Value = files.config()?;
    let mut dtypes = BTreeMap::new();
    let mut quantization = None;
    match &files.weights {
        WeightFiles::Safetensors(paths) => {
            for path in paths {
                let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
                // SAFETY: read-only map of a file we only parse the header of.
                let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
                let (_, metadata) = safetensors::SafeTensors::read_metadata(&map)
                    .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
                for info in metadata.tensors().values() {
                    *dtypes.entry(format!("{:?}", info.dtype)).or_insert(0) += info.shape.iter().product::<usize>() as u64;
                }
            }
        }
        WeightFiles::PytorchBin(_) => {
            for tensor in files.load_tensors(&candle_core::Device::Cpu)?.values() {
                *dtypes.entry(format!("{:?}", tensor.dtype()).to_uppercase()).or_insert(0) += tensor.elem_count() as u64;
            }
        }
        WeightFiles::Gguf(path) => (dtypes, quantization) = crate::quant::gguf::describe(path)?,
    }
    const SHAPE_KEYS: [&str; 12] = [
        "num_hidden_layers", "n_layer", "hidden_size", "n_embd", "num_attention_heads", "n_head",
        "intermediate_size", "vocab_size", "max_position_embeddings", "n_positions", "num_labels", "id2label",
    ];
    let shape = SHAPE_KEYS.iter().filter_map(|k| config.get(*k).map(|v| (k.to_string(), v.clone()))).collect();
    Ok(ModelInfo {
        model: model.to_string(),
        dir: files.dir.display().to_string(),
        model_type: config["model_type"].as_str().map(String::from),
        architectures: config["architectures"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default(),
        // Float and quantized elements (`Q...`), not integer buffers.
        parameters: dtypes.iter().filter(|(d, _)| d.starts_with('F') || d.starts_with("BF") || d.starts_with('Q')).map(|(_, n)| n).sum(),
        dtypes,
        quantization,
        size_on_disk: files.weights.size_on_disk(),
        weight_files: files.weights.paths().iter().map(|p| p.display().to_string()).collect(),
        shape,
    })
}

pub fn run(args: InfoArgs) -> Result<()> {
    let files = args.model.resolve(args.json).with_context(|| format!("cannot get the model {:?}", args.model.model))?;
    let info = describe(&args.model.model, &files)?;
    if args.json {
        println!("{}", serde_json::to_string(&info)?);
        return Ok(());
    }
    println!("model         {}", info.model);
    println!("found in      {}", info.dir);
    println!("architecture  {} ({})", info.architectures.join(", "), info.model_type.as_deref().unwrap_or("no model_type"));
    println!("parameters    {} ({:.2} M)", info.parameters, info.parameters as f64 / 1e6);
    let dtypes: Vec<String> = info.dtypes.iter().map(|(d, n)| format!("{d} {n}")).collect();
    println!("dtype         {}", dtypes.join(", "));
    if let Some(q) = &info.quantization {
        println!("quantization  {q} (linear layers; model.gguf, inference only)");
    }
    println!("size on disk  {:.1} MB in {} file(s)", info.size_on_disk as f64 / 1e6, info.weight_files.len());
    for (key, value) in &info.shape {
        println!("  {key:<24}{value}");
    }
    Ok(())
}
