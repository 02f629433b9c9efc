//! Quantized inference: every linear layer's weight stored in 8 or 4 bits (GGML's block formats,
//! through `candle_core::quantized`), the rest of the model unchanged.
//!
//! Formats ([`QuantType`]): `q8_0` (blocks of 32 weights: 32 int8 and one f16 scale, 8.5 bits a
//! weight), `q4_0` (blocks of 32: 4-bit values and one f16 scale, 4.5 bits), and the k-quants
//! `q4_k` (super-blocks of 256 in 8 sub-blocks with 6-bit scales and minimums, 4.5 bits) and
//! `q6_k` (256, 6.56 bits). A weight's rows are quantized along the input dimension, so a layer
//! fits a type only when its input width divides the block: MiniLM's 384 takes only the 32-block
//! types. GPT-2's `Conv1D` weights, stored (in, out), are transposed once, when quantized.
//!
//! Why this is fast: decoding is a matrix-vector product per layer, bound by the bytes of weight
//! it reads; q8_0 reads 28% of f32's bytes and q4_0/q4_k 14%. The products quantize the
//! activations too, so that the dot products run in integers: for q8_0 and q4_0 the activations
//! become Q8_0 (blocks of 32 int8 with one scale), or, in products of more than 32 rows on AVX2,
//! blocks of 32 in 7 bits (`ops::matvec::qgemm`); for the k-quants Q8K (blocks of 256 int8, f32
//! scale, partial sums). [`QuantType::activation_format`] says which one a product runs. q8_0 and
//! q4_0 run our kernels (`ops::matvec::quantized`: AVX2 or portable, picked at run time); the
//! k-quants run candle's (AVX2, AVX-512 VNNI where present). Both round the activations once per
//! product, which is the second source of error next to the weights' rounding; `tests/quant.rs`
//! checks both kinds, and both code paths, against the f32 model.
//!
//! What stays unquantized: embeddings (stored in f16 in the file, read back in the model's
//! dtype), biases and LayerNorms (f32). GPT-2's LM head, tied to `wte` in the f32 model, is
//! quantized as a tensor of its own (`lm_head.weight`): it is 31% of GPT-2 small's weight bytes
//! and is read at every step, while the embedding is only looked up.
//!
//! A quantized [`Dense`] has no backward pass, so quantized models are inference-only:
//! [`crate::pretrained::load_trainable`] refuses a quantized folder. The file format is GGUF
//! ([`gguf`]); [`folder`] turns a model folder into a quantized one.

pub mod folder;
pub mod gguf;

use crate::ops::linear::{Dense, WeightLayout};
use crate::pretrained::Pretrained;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// The weight formats `wick quantize` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantType {
    /// 8-bit, blocks of 32 (8.5 bits a weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit, blocks of 32 (4.5 bits a weight).
    #[value(name = "q4_0")]
    Q4_0,
    /// 4-bit k-quant, super-blocks of 256 (4.5 bits a weight).
    #[value(name = "q4_k")]
    Q4K,
    /// 6-bit k-quant, super-blocks of 256 (6.56 bits a weight).
    #[value(name = "q6_k")]
    Q6K,
}

impl QuantType {
    pub const ALL: [QuantType; 4] = [Self::Q8_0, Self::Q4_0, Self::Q4K, Self::Q6K];

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.ggml() == dtype)
    }

    /// The name on the command line and in the file's metadata (`q8_0`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Weights per block: a layer's input width must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes a weight takes, scales included.
    pub fn bytes_per_weight(self) -> f64 {
        self.ggml().type_size() as f64 / self.block_size() as f64
    }

    /// The format the CPU kernels quantize the activations to, on this CPU, in a product of
    /// `rows` rows with a weight of this type that has `outputs` outputs and `inputs` inputs:
    /// Q8K for the k-quants (candle's kernels); for q8_0 and q4_0 (ours) Q8_0, or, for more than
    /// 32 rows on AVX2 with `outputs` a multiple of 16, blocks of 32 in 7 bits (the integer batch
    /// product, whose activations' rounding error is twice Q8_0's).
    pub fn activation_format(self, rows: usize, outputs: usize, inputs: usize) -> &'static str {
        match self {
            Self::Q8_0 | Self::Q4_0 if crate::ops::matvec::quantized::takes_seven_bit_product(crate::cpu::isa(), rows, outputs, inputs) => "7-bit blocks of 32",
            Self::Q8_0 | Self::Q4_0 => "Q8_0",
            Self::Q4K | Self::Q6K => "Q8K",
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors unless every layer's input width divides `qtype`'s block, naming the first that does
/// not and the types that would fit.
pub fn check_fits(layers: &[(String, &mut Dense)], qtype: QuantType) -> Result<()> {
    for (name, dense) in layers {
        let (d_out, d_in) = dense.out_in()?;
        if d_in % qtype.block_size() != 0 {
            let fitting: Vec<&str> = QuantType::ALL.iter().filter(|t| d_in % t.block_size() == 0).map(|t| t.name()).collect();
            let advice = if fitting.is_empty() { "no quantized type fits it".to_string() } else { format!("this model takes {}", fitting.join(" or ")) };
            bail!(
                "{name} (out {d_out}, in {d_in}) cannot be quantized to {qtype}: its input width {d_in} is not a multiple of {qtype}'s block of {} weights ({advice})",
                qtype.block_size()
            );
        }
    }
    Ok(())
}

/// `dense`'s weight as an (out, in) matrix quantized to `qtype`, on the CPU.
pub fn quantize_weight(dense: &Dense, qtype: QuantType) -> Result<QTensor> {
    let w = dense.weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let w = match dense.layout {
        WeightLayout::OutIn => w.contiguous()?,
        WeightLayout::InOut => w.t()?.contiguous()?,
    };
    Ok(QTensor::quantize(&w, qtype.ggml())?)
}

/// Quantizes every linear layer of `model` in place (nothing is changed when one does not fit);
/// returns the (name, quantized weight) of each, for writing. The quantized weights go to the
/// device the layers were on.
pub fn quantize_model<M: Pretrained>(model: &mut M, qtype: QuantType) -> Result<Vec<(String, Arc<QTensor>)>> {
    let mut layers = model.linear_layers();
    if layers.is_empty() {
        bail!("{} has no linear layers wick can quantize", M::ARCHITECTURE);
    }
    check_fits(&layers, qtype)?;
    let mut out = Vec::with_capacity(layers.len());
    for (name, dense) in layers.iter_mut() {
        if dense.quantized().is_some() {
            bail!("{name} is quantized already");
        }
        let q = quantize_weight(dense, qtype).with_context(|| format!("quantizing {name}"))?;
        let device = dense.weight.device().clone();
        let q = Arc::new(if device.is_cpu() { q } else { QTensor::quantize(&q.dequantize(&device)?, qtype.ggml())? });
        dense.set_quantized(q.clone()).with_context(|| format!("quantizing {name}"))?;
        out.push((name.clone(), q));
    }
    Ok(out)
}

/// Hands the quantized weights read from a file (by the names `build` asked for) to the
/// model's linear layers. A quantized tensor the model read as something other than a linear
/// layer's weight is an error; one it never read is another task's layer (a classifier head
/// under a base model) and is dropped, as unused checkpoint tensors are.
pub(crate) fn attach<M: Pretrained>(model: &mut M, mut quantized: HashMap<String, Arc<QTensor>>, used: &BTreeSet<String>) -> Result<()> {
    if quantized.is_empty() {
        return Ok(());
    }
    for (name, dense) in model.linear_layers() {
        if let Some(q) = quantized.remove(&name) {
            dense.set_quantized(q).with_context(|| format!("the quantized tensor {name}"))?;
        }
    }
    if let Some(name) = quantized.keys().filter(|n| used.contains(*n)).min() {
        bail!("the quantized tensor {name} is not a linear layer's weight in {} (only linear layers can be quantized)", M::ARCHITECTURE);
    }
    Ok(())
}
