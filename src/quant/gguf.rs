//! `model.gguf`: a model's weights in one GGUF file (llama.cpp's format, read and written by
//! `candle_core::quantized::gguf_file`), by the tensor names the model's `build` reads.
//!
//! Linear layers' weights are quantized (out, in) matrices; every other tensor is stored as
//! f16 (2-D: embedding tables) or f32 (biases, LayerNorms). Metadata: `general.architecture`
//! (the config's `model_type`), `wick.quantization` (`q8_0`, ...) and `wick.config` (the
//! `config.json` text, so the file alone describes the model). The file is read whole (no memory
//! map): quantized weights are small, and candle's `QTensor` owns its bytes.

use super::QuantType;
use crate::ops::linear::stand_in;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, TensorId};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub const FILE: &str = "model.gguf";
pub const QUANTIZATION_KEY: &str = "wick.quantization";
pub const CONFIG_KEY: &str = "wick.config";

/// A GGUF file's tensors as a model loader takes them.
pub struct GgufWeights {
    /// Every tensor by its name in the file: unquantized ones as tensors, quantized ones as
    /// zero-memory stand-ins of their (out, in) shape (see [`stand_in`]).
    pub tensors: HashMap<String, Tensor>,
    /// The quantized weights, by the id of their stand-in in `tensors` (names may be changed
    /// by a model's `canonical_names` before they are used: the id follows the tensor).
    pub quantized: HashMap<TensorId, Arc<QTensor>>,
}

impl GgufWeights {
    /// The quantized weights by the names their stand-ins have in `tensors` (renamed or not);
    /// those whose stand-in was dropped are left out.
    pub fn by_name(tensors: &HashMap<String, Tensor>, mut quantized: HashMap<TensorId, Arc<QTensor>>) -> HashMap<String, Arc<QTensor>> {
        tensors.iter().filter_map(|(name, t)| quantized.remove(&t.id()).map(|q| (name.clone(), q))).collect()
    }
}

fn open(path: &Path) -> Result<(std::fs::File, gguf_file::Content)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file ({e}); it may be truncated or corrupt", path.display()))?;
    Ok((file, content))
}

/// Reads `path` onto `device`. A tensor with NaN or infinite values (in its scales, for a
/// quantized one) is an error naming it.
pub fn read(path: &Path, device: &Device) -> Result<GgufWeights> {
    let (mut file, content) = open(path)?;
    let mut weights = GgufWeights { tensors: HashMap::new(), quantized: HashMap::new() };
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let q = content.tensor(&mut file, name, device).map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}; the file may be truncated or corrupt", path.display()))?;
        let values = q.dequantize(device)?;
        if !values.sum_all()?.to_scalar::<f32>()?.is_finite() {
            bail!("{}: tensor {name} holds NaN or infinite values: the file is damaged or was written from a model that diverged", path.display());
        }
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            weights.tensors.insert(name.clone(), values);
        } else {
            let placeholder = stand_in(q.shape(), DType::F32, device)?;
            weights.quantized.insert(placeholder.id(), Arc::new(q));
            weights.tensors.insert(name.clone(), placeholder);
        }
    }
    Ok(weights)
}

/// Every tensor of `path`, quantized ones dequantized to f32 (to inspect or convert a file).
pub fn read_dequantized(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let (mut file, content) = open(path)?;
    content
        .tensor_infos
        .keys()
        .map(|name| {
            let q = content.tensor(&mut file, name, device).map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", path.display()))?;
            Ok((name.clone(), q.dequantize(device)?))
        })
        .collect()
}

/// What a GGUF file's header says: elements per stored type (`Q8_0`, `F16`, ...) and the
/// quantization it was written with.
pub fn describe(path: &Path) -> Result<(BTreeMap<String, u64>, Option<String>)> {
    let (_, content) = open(path)?;
    let mut dtypes = BTreeMap::new();
    for info in content.tensor_infos.values() {
        *dtypes.entry(format!("{:?}", info.ggml_dtype).to_uppercase()).or_insert(0) += info.shape.elem_count() as u64;
    }
    let quantization = content.metadata.get(QUANTIZATION_KEY).and_then(|v| v.to_string().ok().cloned());
    Ok((dtypes, quantization))
}

/// How an unquantized tensor is stored: embedding tables (2-D) in f16, vectors in f32.
pub fn plain_storage_type(t: &Tensor) -> GgmlDType {
    if t.rank() == 2 {
        GgmlDType::F16
    } else {
        GgmlDType::F32
    }
}

/// Writes `plain` (stored as [`plain_storage_type`] says) and `quantized` to `path`, atomically,
/// with `config` (the model's `config.json`) in the metadata.
pub fn write(path: &Path, config: &serde_json::Value, qtype: QuantType, plain: &HashMap<String, Tensor>, quantized: &[(String, Arc<QTensor>)]) -> Result<()> {
    let mut tensors: Vec<(String, Arc<QTensor>)> = quantized.to_vec();
    for (name, t) in plain {
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
        tensors.push((name.clone(), Arc::new(QTensor::quantize(&t, plain_storage_type(&t))?)));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let architecture = Value::String(config.get("model_type").and_then(|v| v.as_str()).unwrap_or("unknown").to_string());
    let quantization = Value::String(qtype.name().to_string());
    let config_text = Value::String(serde_json::to_string(config)?);
    let metadata = [("general.architecture", &architecture), (QUANTIZATION_KEY, &quantization), (CONFIG_KEY, &config_text)];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q.as_ref())).collect();
    crate::weights::write_with(path, &|tmp| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        gguf_file::write(&mut out, &metadata, &refs)?;
        std::io::Write::flush(&mut out)?;
        Ok(())
    })
}
