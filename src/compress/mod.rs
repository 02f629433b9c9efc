//! Model compression by training: knowledge distillation ([`distill`]) and pruning ([`prune`]),
//! on top of [`layers`], which keeps a subset of a model's layers (a distilled student's start,
//! and structured pruning's `--drop-layers`). Quantization, the inference-only kind, is
//! [`crate::quant`].
//!
//! Everything here works on a checkpoint's tensors by the names [`Pretrained::build`] reads
//! (`bert.encoder.layer.3.intermediate.dense.weight`, `transformer.h.3.mlp.c_fc.weight`) and on
//! the typed config, so a compressed model is saved by [`crate::pretrained::save`] as a standard
//! Hugging Face folder (fewer layers, a smaller `intermediate_size`/`n_inner`, zeros in the
//! weights) that transformers and every `wick` command load as they load any other.

pub mod distill;
pub mod layers;
pub mod prune;
pub mod recovery;

use crate::models::bert::{self, BertForSequenceClassification};
use crate::models::gpt2::{self, GPT2LMHeadModel};
use crate::pretrained::Pretrained;
use crate::weights::ModelFiles;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;

/// One tensor of a feed-forward block indexed by its hidden neurons: its name inside a layer and
/// the dimension that runs over the neurons.
#[derive(Clone, Copy, Debug)]
pub struct NeuronAxis {
    pub name: &'static str,
    pub dim: usize,
}

/// What compression needs to know of a model family: where its layers are, which tensors make up
/// a feed-forward block, and the config fields that count them.
pub trait Compressible: Pretrained {
    /// The tensor-name prefix followed by a layer's index (`bert.encoder.layer.`).
    const LAYER_PREFIX: &'static str;
    /// The FFN's up-projection weight (neurons are its outputs).
    const FFN_UP: NeuronAxis;
    /// The FFN's down-projection weight (neurons are its inputs).
    const FFN_DOWN: NeuronAxis;
    /// Every tensor of a layer with one slice per FFN neuron (both weights and the up bias).
    const FFN_TENSORS: &'static [NeuronAxis];
    fn num_layers(config: &Self::Config) -> usize;
    fn set_num_layers(config: &mut Self::Config, n: usize);
    fn ffn_size(config: &Self::Config) -> usize;
    fn set_ffn_size(config: &mut Self::Config, n: usize);
}

impl Compressible for BertForSequenceClassification {
    const LAYER_PREFIX: &'static str = "bert.encoder.layer.";
    const FFN_UP: NeuronAxis = NeuronAxis { name: "intermediate.dense.weight", dim: 0 };
    const FFN_DOWN: NeuronAxis = NeuronAxis { name: "output.dense.weight", dim: 1 };
    const FFN_TENSORS: &'static [NeuronAxis] = &[Self::FFN_UP, NeuronAxis { name: "intermediate.dense.bias", dim: 0 }, Self::FFN_DOWN];
    fn num_layers(config: &bert::Config) -> usize {
        config.num_hidden_layers
    }
    fn set_num_layers(config: &mut bert::Config, n: usize) {
        config.num_hidden_layers = n;
    }
    fn ffn_size(config: &bert::Config) -> usize {
        config.intermediate_size
    }
    fn set_ffn_size(config: &mut bert::Config, n: usize) {
        config.intermediate_size = n;
    }
}

/// GPT-2's `Conv1D` weights are stored (in, out): `c_fc` runs over neurons in its columns.
impl Compressible for GPT2LMHeadModel {
    const LAYER_PREFIX: &'static str = "transformer.h.";
    const FFN_UP: NeuronAxis = NeuronAxis { name: "mlp.c_fc.weight", dim: 1 };
    const FFN_DOWN: NeuronAxis = NeuronAxis { name: "mlp.c_proj.weight", dim: 0 };
    const FFN_TENSORS: &'static [NeuronAxis] = &[Self::FFN_UP, NeuronAxis { name: "mlp.c_fc.bias", dim: 0 }, Self::FFN_DOWN];
    fn num_layers(config: &gpt2::Config) -> usize {
        config.n_layer
    }
    fn set_num_layers(config: &mut gpt2::Config, n: usize) {
        config.n_layer = n;
    }
    fn ffn_size(config: &gpt2::Config) -> usize {
        config.inner_size()
    }
    fn set_ffn_size(config: &mut gpt2::Config, n: usize) {
        config.n_inner = Some(n);
    }
}

/// A model's config and its tensors by the names `build` reads (f32, on `device`).
pub struct Checkpoint<M: Pretrained> {
    pub config: M::Config,
    pub tensors: HashMap<String, Tensor>,
}

impl<M: Pretrained> Clone for Checkpoint<M> {
    fn clone(&self) -> Self {
        Self { config: self.config.clone(), tensors: self.tensors.clone() }
    }
}

impl<M: Compressible> Checkpoint<M> {
    /// Reads a model folder (a quantized one is refused: compression trains f32 weights).
    pub fn read(files: &ModelFiles, device: &Device) -> Result<Self> {
        if let crate::weights::WeightFiles::Gguf(path) = &files.weights {
            bail!("{} is a quantized model: distil or prune the f32 model, then quantize the result", path.display());
        }
        files.check_model_type(M::MODEL_TYPES)?;
        let config: M::Config = files.config()?;
        let tensors = M::canonical_names(files.load_tensors(device)?, &config)
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self { config, tensors })
    }

    /// The name of tensor `name` (a name inside a layer, `output.dense.weight`) of layer `layer`.
    pub fn layer_tensor_name(layer: usize, name: &str) -> String {
        format!("{}{layer}.{name}", M::LAYER_PREFIX)
    }

    /// The model as trainable variables, every one of them from these tensors (a variable the
    /// tensors lack, or a tensor of the wrong shape, is an error naming it).
    pub fn trainable(&self, device: &Device) -> Result<(M, VarMap)> {
        let varmap = VarMap::new();
        let model = M::build(crate::nn::var_builder(&varmap, DType::F32, device, 0), &self.config).with_context(|| format!("building {}", M::ARCHITECTURE))?;
        let report = crate::weights::copy_into_varmap(&varmap, &self.tensors)?;
        if !report.newly_initialized.is_empty() {
            bail!("the compressed checkpoint lacks {:?}", report.newly_initialized);
        }
        Ok((model, varmap))
    }

    /// The model for inference (no gradients).
    pub fn model(&self, device: &Device) -> Result<M> {
        let vb = crate::weights::inference_var_builder(self.tensors.clone(), DType::F32, device);
        Ok(M::build(vb, &self.config)?)
    }

    /// Writes the checkpoint as a Hugging Face folder with the tokenizer files of `tokenizer_from`.
    pub fn save(&self, dir: &std::path::Path, tokenizer_from: Option<&std::path::Path>) -> Result<()> {
        crate::pretrained::save::<M>(dir, &self.config, self.tensors.clone(), tokenizer_from)
    }
}

/// Bytes of f32 weights of `tensors` (what a saved folder's `model.safetensors` holds), and the
/// count of non-zero values among them.
pub fn weight_stats(tensors: &HashMap<String, Tensor>) -> Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut nonzero = 0u64;
    for t in tensors.values() {
        bytes += 4 * t.elem_count() as u64;
        nonzero += t.ne(0f32)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as u64;
    }
    Ok((bytes, nonzero))
}
