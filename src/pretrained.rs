//! One way to load and save every model: the [`Pretrained`] trait each model family implements
//! (beside its model, in `models/`), and three functions on top of it.
//!
//! - [`load`]: a model folder's weights as fixed tensors, for inference, in any dtype.
//! - [`load_trainable`]: the same weights as trainable variables in a `VarMap`, for fine-tuning;
//!   variables the checkpoint lacks (a new classifier head) are freshly initialised from a seed.
//! - [`save`]: a Hugging Face folder (`config.json` with `model_type` and `architectures`,
//!   `model.safetensors` by transformers' names, the tokenizer files) that `from_pretrained` and
//!   [`load`] both read, written atomically.
//!
//! Checkpoints name their tensors in several ways (a `bert.` prefix or none, legacy `gamma`/`beta`,
//! GPT-2's `transformer.` prefix, tied or untied LM heads); each family's
//! [`Pretrained::canonical_names`] maps them onto the names its `load(vb, &config)` asks for.
//! A checkpoint with more layers than its config (`n_layer: 1` over three layers' weights) is an
//! error, not a model that silently drops weights.
//!
//! A folder with a quantized `model.gguf` (`wick quantize`) loads through [`load`] like any
//! other: its quantized weights reach the model's linear layers ([`Pretrained::linear_layers`])
//! after `build`, which sees zero-memory stand-ins of their shape (see [`crate::quant`]).

use crate::ops::linear::{Dense, Panels};
use crate::weights::{copy_into_varmap, CopyReport, ModelFiles, WeightFiles};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A model family that loads Hugging Face checkpoints and saves them back.
pub trait Pretrained: Sized {
    type Config: serde::de::DeserializeOwned + serde::Serialize + Clone;
    /// The `model_type`s of `config.json` this loads (a config without one is accepted).
    const MODEL_TYPES: &'static [&'static str];
    /// transformers' class for this model (`architectures` in a saved `config.json`).
    const ARCHITECTURE: &'static str;

    /// Builds the model from tensors named as [`Pretrained::canonical_names`] names them.
    fn build(vb: VarBuilder, config: &Self::Config) -> candle_core::Result<Self>;

    /// The checkpoint's tensors renamed to the names [`Pretrained::build`] asks for; tensors the
    /// model never reads by design (another task's head, a tied LM head, buffers) are dropped.
    /// Families whose checkpoints have one naming (wick's own small models) keep the default.
    fn canonical_names(tensors: HashMap<String, Tensor>, _config: &Self::Config) -> HashMap<String, Tensor> {
        tensors
    }

    /// The model's variables (by the names `build` gave them) renamed to the names transformers
    /// writes. Most families use the same names.
    fn checkpoint_names(tensors: HashMap<String, Tensor>, _config: &Self::Config) -> HashMap<String, Tensor> {
        tensors
    }

    /// Every linear layer, by the name of its weight as [`Pretrained::build`] reads it
    /// (`transformer.h.0.attn.c_attn.weight`): what [`crate::quant`] quantizes. Families that
    /// list none cannot be quantized.
    fn linear_layers(&mut self) -> Vec<(String, &mut Dense)> {
        Vec::new()
    }
}

/// Packs every f32 (and, for decoding, q4_0, and at AVX2 f16 and bf16) linear layer of `model` for inference on the CPU
/// ([`Dense::pack_for_inference`]: the weight once in the panels of our product instead of once
/// per product), in the panels of the products the model will run:
/// - [`Panels::FewRows`], decoding (`wick generate` and `wick serve` for GPT-2), at the AVX2 and
///   AVX-512 levels: on AVX2, GPT-2-small decoding measured 1.1–1.6× faster packed at batch 1
///   and 1.2–1.3× at batch 16, 0.8–1.0× at batch 8; on an AVX-512 Xeon 0.95–1.0× at batches
///   1–4, 1.1× at 8, 1.4× at 16, 1.7–2.1× at 32 (alternating runs, `notes/cpu-speed.md`). A
///   tied LM head keeps a packed copy of its own (GPT-2 small: 154 MB more). q4_0 layers keep
///   their blocks and gain a copy in the decoding layout of `ops::matvec::q4_decode` on AVX-512
///   VNNI (GPT-2 small: 70 MB more), which its one- and two-row products read: q4_0 decoding at
///   batch 1 measured 1.8–2.2× faster. f16 and bf16 layers pack in their own 2 bytes at AVX2
///   (f16 GPT-2 at batch 1 on the AMD EPYC: ~48.7 tok/s packed against ~45.4 as stored, bf16
///   even), not at AVX-512, where the weight as stored decodes faster.
/// - [`Panels::ManyRows`], encoder batches (`wick predict`, `wick embed`, and `wick serve`'s
///   embeddings and classifiers): the level's own kernel's panels (12×32 at AVX-512, 6×16 at
///   AVX2), so a product skips the packing of its right operand and adds the bias in its last
///   pass. A BERT-base forward measured 0.96–1.40× (median 1.15×, six alternating pairs) on an
///   AVX-512 Xeon and 0.95–1.15× (median 1.06×, ten pairs) on an AVX2 EPYC. Layers of fewer
///   than 64 outputs (a classifier's head) stay as stored.
///
/// Returns how many layers it packed; `WICK_PACK_WEIGHTS=0` leaves the weights as stored (to
/// compare).
pub fn pack_for_inference<M: Pretrained>(model: &mut M, panels: Panels) -> Result<usize> {
    if std::env::var("WICK_PACK_WEIGHTS").is_ok_and(|v| v == "0") {
        return Ok(0);
    }
    let mut packed = 0;
    for (name, dense) in model.linear_layers() {
        packed += dense.pack_for_inference(panels).with_context(|| format!("packing {name}"))? as usize;
    }
    Ok(packed)
}

/// Loads `M` for inference: weights in `dtype` on `device`, not trainable.
pub fn load<M: Pretrained>(files: &ModelFiles, dtype: DType, device: &Device) -> Result<(M, M::Config)> {
    load_with_tensors(files, dtype, device).map(|(model, config, _)| (model, config))
}

/// [`load`], also returning the checkpoint's tensors by the names `build` read them under
/// (quantized weights as their stand-ins).
pub(crate) fn load_with_tensors<M: Pretrained>(files: &ModelFiles, dtype: DType, device: &Device) -> Result<(M, M::Config, HashMap<String, Tensor>)> {
    files.check_model_type(M::MODEL_TYPES)?;
    let config: M::Config = files.config()?;
    let (tensors, quantized) = match &files.weights {
        WeightFiles::Gguf(path) => {
            let read = crate::quant::gguf::read(path, device)?;
            (read.tensors, read.quantized)
        }
        _ => (files.load_tensors(device)?, HashMap::new()),
    };
    let tensors = M::canonical_names(tensors, &config);
    let quantized = crate::quant::gguf::GgufWeights::by_name(&tensors, quantized);
    check_finite(&tensors, &quantized.keys().cloned().collect(), files)?;
    let names: BTreeSet<String> = tensors.keys().cloned().collect();
    let used = Arc::new(Mutex::new(BTreeSet::new()));
    let stand_ins = quantized.keys().cloned().collect();
    let backend = UseTracking { tensors: tensors.clone(), used: used.clone(), stand_ins };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let mut model = M::build(vb, &config).with_context(|| format!("loading {} from {} (its config.json and weights)", M::ARCHITECTURE, files.dir.display()))?;
    let used = used.lock().map_err(|_| anyhow::anyhow!("poisoned lock"))?.clone();
    check_no_extra_layers(&names, &used, files)?;
    crate::quant::attach(&mut model, quantized, &used).with_context(|| format!("loading {} from {}", M::ARCHITECTURE, files.dir.display()))?;
    let unused: Vec<&String> = names.difference(&used).collect();
    if !unused.is_empty() {
        // What transformers prints in the same case: legitimate (a base model from a checkpoint
        // with a task head), but worth knowing.
        let shown: Vec<&str> = unused.iter().take(4).map(|s| s.as_str()).collect();
        eprintln!("note: {} checkpoint tensor(s) not used by {}: {}{}", unused.len(), M::ARCHITECTURE, shown.join(", "), if unused.len() > 4 { ", ..." } else { "" });
    }
    Ok((model, config, tensors))
}

/// A model whose weights are trainable variables.
pub struct Trainable<M> {
    pub model: M,
    /// The model's variables, by the names `build` gave them: hand it to the trainer.
    pub varmap: VarMap,
    /// Which variables the checkpoint had no value for, and which checkpoint tensors went unused.
    pub report: CopyReport,
}

/// Loads `M` for training with `config` (the folder's own, or one changed by the caller: new
/// labels, a different dropout). Checkpoint tensors for which `keep` is false are left out (their
/// variables start fresh, e.g. a classifier head for other labels); every fresh variable is drawn
/// from `seed`. Shapes that do not match the config are an error naming the tensor.
pub fn load_trainable<M: Pretrained>(
    files: &ModelFiles,
    config: &M::Config,
    device: &Device,
    seed: u64,
    keep: impl Fn(&str) -> bool,
) -> Result<Trainable<M>> {
    if let WeightFiles::Gguf(path) = &files.weights {
        bail!("{} is a quantized model, for inference only (quantized layers have no gradients): train or fine-tune the f32 model, then quantize the result with `wick quantize`", path.display());
    }
    files.check_model_type(M::MODEL_TYPES)?;
    let mut tensors = M::canonical_names(files.load_tensors(device)?, config);
    let mut left_out: Vec<String> = tensors.keys().filter(|name| !keep(name)).cloned().collect();
    left_out.sort();
    tensors.retain(|name, _| keep(name));
    check_finite(&tensors, &HashSet::new(), files)?;
    let varmap = VarMap::new();
    let model = M::build(crate::nn::var_builder(&varmap, DType::F32, device, seed), config)
        .with_context(|| format!("building {} for {}", M::ARCHITECTURE, files.dir.display()))?;
    let report = CopyReport { left_out, ..copy_into_varmap(&varmap, &tensors)? };
    let used: BTreeSet<String> = tensors.keys().filter(|k| !report.unused.contains(k)).cloned().collect();
    check_no_extra_layers(&tensors.keys().cloned().collect(), &used, files)?;
    Ok(Trainable { model, varmap, report })
}

/// Writes `tensors` (a model's variables by the names `build` gave them, e.g. a `VarMap`'s) and
/// `config` as a Hugging Face folder in `dir`, with the tokenizer files of `tokenizer_from`.
/// Weights are written in f32, the dtype transformers loads by default.
pub fn save<M: Pretrained>(dir: &Path, config: &M::Config, tensors: HashMap<String, Tensor>, tokenizer_from: Option<&Path>) -> Result<()> {
    let mut json = serde_json::to_value(config).context("the model config does not serialise")?;
    let object = json.as_object_mut().context("the model config is not a JSON object")?;
    if let Some(model_type) = M::MODEL_TYPES.first() {
        object.insert("model_type".into(), (*model_type).into());
    }
    object.insert("architectures".into(), serde_json::json!([M::ARCHITECTURE]));
    object.entry("dtype").or_insert_with(|| "float32".into());
    let tensors = M::checkpoint_names(tensors, config)
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    crate::weights::save_pretrained(dir, &json, &tensors, tokenizer_from)
}

/// Saves the variables of `varmap` (see [`save`]).
pub fn save_varmap<M: Pretrained>(dir: &Path, config: &M::Config, varmap: &VarMap, tokenizer_from: Option<&Path>) -> Result<()> {
    save::<M>(dir, config, crate::train::checkpoint::varmap_tensors(varmap)?, tokenizer_from)
}

/// Errors when the checkpoint holds layers the config did not build: an unused tensor whose name
/// has a layer index (`h.2.attn.c_attn.weight`) under a path the model does use (`h.0...`).
/// Other unused tensors (another task's head) are what a base model legitimately skips.
fn check_no_extra_layers(all: &BTreeSet<String>, used: &BTreeSet<String>, files: &ModelFiles) -> Result<()> {
    let layer_path = |name: &str| -> Option<String> {
        let parts: Vec<&str> = name.split('.').collect();
        let index = parts.iter().position(|p| p.parse::<usize>().is_ok())?;
        Some(parts[..index].join("."))
    };
    let used_paths: BTreeSet<String> = used.iter().filter_map(|n| layer_path(n)).collect();
    let extra: Vec<&String> =
        all.iter().filter(|n| !used.contains(*n)).filter(|n| layer_path(n).is_some_and(|p| used_paths.contains(&p))).collect();
    if let Some(first) = extra.first() {
        bail!(
            "{}: the weights have {} tensor(s) the config does not build, such as {first}: config.json and the weights do not belong together (is the number of layers right?)",
            files.dir.display(),
            extra.len()
        );
    }
    Ok(())
}

/// Errors on the first tensor holding a NaN or an infinity, naming it: such a checkpoint (a run
/// that diverged, a corrupt file) would otherwise predict NaN without a word. Stand-ins of
/// quantized weights (`skip`) were checked when read.
fn check_finite(tensors: &HashMap<String, Tensor>, skip: &HashSet<String>, files: &ModelFiles) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().filter(|n| !skip.contains(*n)).collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if !t.dtype().is_float() {
            continue;
        }
        // A sum is finite when every element is (short of overflow, which the exact check below
        // rules out): one cheap pass for the common case.
        let t32 = t.to_dtype(DType::F32)?;
        if t32.sum_all()?.to_scalar::<f32>()?.is_finite() {
            continue;
        }
        let values = t32.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            bail!("{}: tensor {name} holds {bad} values: the checkpoint is damaged or comes from a run that diverged", files.dir.display());
        }
    }
    Ok(())
}

/// candle's tensor-map backend, recording which names the model asked for.
struct UseTracking {
    tensors: HashMap<String, Tensor>,
    used: Arc<Mutex<BTreeSet<String>>>,
    /// Names of quantized weights: asked for in any shape with their number of elements (a
    /// layer stored (in, out) asks for the transpose of the quantized (out, in)), they are
    /// served as stand-ins of that shape.
    stand_ins: HashSet<String>,
}

impl UseTracking {
    fn record(&self, name: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
    }
}

impl SimpleBackend for UseTracking {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.record(name);
        if let Some(t) = self.tensors.get(name).filter(|_| self.stand_ins.contains(name)) {
            if t.elem_count() != s.elem_count() {
                candle_core::bail!("shape mismatch for {name}: the quantized weight is {:?}, the model expects {s:?}", t.dims())
            }
            return crate::ops::linear::stand_in(&s, dtype, dev);
        }
        SimpleBackend::get(&self.tensors, s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.record(name);
        self.tensors.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
