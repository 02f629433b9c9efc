//! Pruning: unstructured (magnitude) and structured (FFN neurons; whole layers are
//! [`super::layers`]).
//!
//! - Unstructured: the linear weights of the transformer layers with the smallest magnitudes are
//!   set to zero, to a target sparsity over all of them at once ([`Scope::Global`]) or in each
//!   weight matrix ([`Scope::PerMatrix`]). Embeddings (and GPT-2's LM head, tied to them), the
//!   pooler, the task head, LayerNorms and biases are never pruned: they are a small share of the
//!   weights and the model is most sensitive to them. A [`Masks`] keeps the pruned weights at
//!   exactly zero during recovery fine-tuning: the Trainer calls it after every optimizer step
//!   (AdamW's weight decay and momentum would otherwise move them) and after a resume. The model
//!   is saved dense, zeros included.
//! - Structured: the same number of FFN neurons is kept in every layer (so the config stays
//!   standard: one `intermediate_size`), the rows of the up-projection (and its bias) and the
//!   columns of the down-projection of the most important neurons. Importance is the product of
//!   the two weight norms (a neuron whose down-projection column is zero contributes nothing and
//!   scores zero), or the first-order score of Michel et al. 2019 (`|∂L/∂ξ|` of a gate ξ on the
//!   neuron, summed over batches); the gate's gradient needs no gate in the model:
//!   `∂L/∂ξ_j = Σ_i W_down[i, j] · ∂L/∂W_down[i, j]`.

use super::layers::layer_of;
use super::{Checkpoint, Compressible};
use crate::train::TrainModel;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;

/// Where the sparsity target applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One magnitude threshold over every prunable weight: layers differ in sparsity.
    Global,
    /// Each weight matrix pruned to the target on its own.
    PerMatrix,
}

/// The weights unstructured pruning touches: the 2-D weights inside the transformer layers.
pub fn prunable<M: Compressible>(tensors: &HashMap<String, Tensor>) -> Vec<String> {
    let mut names: Vec<String> = tensors
        .iter()
        .filter(|(name, t)| layer_of::<M>(name).is_some() && name.ends_with(".weight") && t.rank() == 2)
        .map(|(name, _)| name.clone())
        .collect();
    names.sort();
    names
}

/// Checks a sparsity target: in [0, 1).
pub fn check_sparsity(sparsity: f64) -> Result<()> {
    if !(0.0..1.0).contains(&sparsity) {
        bail!("--sparsity {sparsity}: must be at least 0 and below 1 (the fraction of linear weights set to zero)");
    }
    Ok(())
}

/// One 0/1 mask (f32, the weight's shape) per pruned weight, by its variable's name.
#[derive(Clone, Debug, Default)]
pub struct Masks {
    pub masks: Vec<(String, Tensor)>,
}

impl Masks {
    /// Magnitude pruning of `checkpoint`'s prunable weights to `sparsity`: the masks that zero
    /// the smallest `sparsity` share (by absolute value; ties at the threshold are pruned too).
    pub fn magnitude<M: Compressible>(checkpoint: &Checkpoint<M>, sparsity: f64, scope: Scope) -> Result<Self> {
        check_sparsity(sparsity)?;
        let names = prunable::<M>(&checkpoint.tensors);
        if names.is_empty() {
            bail!("the model has no prunable linear weights");
        }
        let abs: Vec<(String, Tensor)> = names.into_iter().map(|n| Ok((n.clone(), checkpoint.tensors[&n].abs()?))).collect::<Result<_>>()?;
        let threshold_of = |tensors: &[&Tensor]| -> Result<Option<f32>> {
            let mut values = Vec::new();
            for t in tensors {
                values.extend(t.flatten_all()?.to_vec1::<f32>()?);
            }
            let k = (sparsity * values.len() as f64).round() as usize;
            if k == 0 {
                return Ok(None);
            }
            let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| a.total_cmp(b));
            Ok(Some(*kth))
        };
        let mask_of = |t: &Tensor, threshold: Option<f32>| -> Result<Tensor> {
            Ok(match threshold {
                Some(th) => t.gt(th)?.to_dtype(DType::F32)?,
                None => t.ones_like()?,
            })
        };
        let masks = match scope {
            Scope::Global => {
                let threshold = threshold_of(&abs.iter().map(|(_, t)| t).collect::<Vec<_>>())?;
                abs.iter().map(|(n, t)| Ok((n.clone(), mask_of(t, threshold)?))).collect::<Result<_>>()?
            }
            Scope::PerMatrix => abs.iter().map(|(n, t)| Ok((n.clone(), mask_of(t, threshold_of(&[t])?)?))).collect::<Result<_>>()?,
        };
        Ok(Self { masks })
    }

    /// Masks re-derived from the zeros of the prunable weights (what a pruned checkpoint holds):
    /// every weight that is exactly zero stays zero.
    pub fn from_zeros<M: Compressible>(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let masks = prunable::<M>(tensors).into_iter().map(|n| Ok((n.clone(), tensors[&n].ne(0f32)?.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
        Ok(Self { masks })
    }

    /// `tensors` with the masks applied.
    pub fn apply_to_tensors(&self, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
        for (name, mask) in &self.masks {
            let t = tensors.get_mut(name).with_context(|| format!("no weight {name} to mask"))?;
            *t = t.mul(mask)?;
        }
        Ok(())
    }

    /// Zeroes the pruned weights of the model's variables: the Trainer's after-update hook.
    pub fn apply_to_varmap(&self, varmap: &VarMap) -> Result<()> {
        let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("the model's variables are poisoned by an earlier panic"))?;
        for (name, mask) in &self.masks {
            let var = vars.get(name).with_context(|| format!("the model has no variable {name} to mask"))?;
            var.set(&var.as_tensor().mul(&mask.to_device(var.device())?)?)?;
        }
        Ok(())
    }

    /// The share of masked-out weights (over the masked tensors).
    pub fn sparsity(&self) -> Result<f64> {
        let (mut zeros, mut total) = (0f64, 0f64);
        for (_, m) in &self.masks {
            total += m.elem_count() as f64;
            zeros += m.elem_count() as f64 - m.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(if total > 0.0 { zeros / total } else { 0.0 })
    }
}

/// The number of FFN neurons `keep` (a fraction in (0, 1]) leaves of `size`: at least one.
pub fn ffn_keep_count(size: usize, keep: f64) -> Result<usize> {
    if !(keep > 0.0 && keep <= 1.0) {
        bail!("--ffn-keep {keep}: must be greater than 0 and at most 1 (the fraction of FFN neurons kept in every layer)");
    }
    Ok(((size as f64 * keep).round() as usize).clamp(1, size))
}

/// The importance of every FFN neuron of every layer by weights alone:
/// `‖W_up[j]‖ · ‖W_down[:, j]‖`.
pub fn ffn_norm_scores<M: Compressible>(checkpoint: &Checkpoint<M>) -> Result<Vec<Vec<f32>>> {
    let norms = |layer: usize, axis: super::NeuronAxis| -> Result<Tensor> {
        let name = Checkpoint::<M>::layer_tensor_name(layer, axis.name);
        let t = checkpoint.tensors.get(&name).with_context(|| format!("the checkpoint has no {name}"))?;
        // Sum of squares over the other dimension leaves one value per neuron.
        Ok(t.sqr()?.sum(1 - axis.dim)?.sqrt()?)
    };
    (0..M::num_layers(&checkpoint.config))
        .map(|layer| Ok(norms(layer, M::FFN_UP)?.mul(&norms(layer, M::FFN_DOWN)?)?.to_vec1::<f32>()?))
        .collect()
}

/// Michel et al. 2019's first-order importance of every FFN neuron: `Σ_batches |∂L/∂ξ_j|` for a
/// gate ξ on the neuron's output, from the gradients of the down-projection (evaluation mode:
/// no dropout). `model` must have been built from `varmap`.
pub fn ffn_gradient_scores<M: Compressible + TrainModel>(model: &M, varmap: &VarMap, layers: usize, batches: &[M::Batch]) -> Result<Vec<Vec<f32>>> {
    if batches.is_empty() {
        bail!("the gradient importance score needs at least one batch");
    }
    let vars = varmap.data().lock().map_err(|_| anyhow::anyhow!("poisoned variables"))?.clone();
    let downs: Vec<candle_core::Var> = (0..layers)
        .map(|l| {
            let name = Checkpoint::<M>::layer_tensor_name(l, M::FFN_DOWN.name);
            vars.get(&name).cloned().with_context(|| format!("the model has no variable {name}"))
        })
        .collect::<Result<_>>()?;
    let mut scores: Vec<Option<Tensor>> = vec![None; layers];
    for batch in batches {
        let grads = model.loss(batch, false)?.backward()?;
        for (score, var) in scores.iter_mut().zip(&downs) {
            let g = grads.get(var.as_tensor()).context("no gradient reached the FFN down-projection")?;
            // Σ over the non-neuron dimension of W ⊙ ∂L/∂W: the gate's gradient per neuron.
            let gate = var.as_tensor().mul(g)?.sum(1 - M::FFN_DOWN.dim)?.abs()?;
            *score = Some(match score.take() {
                Some(s) => (s + gate)?,
                None => gate,
            });
        }
    }
    scores.into_iter().map(|s| Ok(s.context("no score")?.to_vec1::<f32>()?)).collect()
}

/// `checkpoint` with only the `keep` most important FFN neurons of every layer (`scores[layer]`
/// per neuron; the kept neurons stay in their original order, so their outputs are unchanged).
pub fn keep_ffn_neurons<M: Compressible>(checkpoint: &Checkpoint<M>, keep: usize, scores: &[Vec<f32>]) -> Result<Checkpoint<M>> {
    let size = M::ffn_size(&checkpoint.config);
    let layers = M::num_layers(&checkpoint.config);
    if keep == 0 || keep > size {
        bail!("cannot keep {keep} of {size} FFN neurons");
    }
    if scores.len() != layers || scores.iter().any(|s| s.len() != size) {
        bail!("FFN importance scores do not match {layers} layers of {size} neurons");
    }
    let mut out = checkpoint.clone();
    let device = checkpoint.tensors.values().next().context("empty checkpoint")?.device().clone();
    for (layer, layer_scores) in scores.iter().enumerate() {
        let mut order: Vec<usize> = (0..size).collect();
        // Most important first; equal scores keep the lower index (a stable, reproducible choice).
        order.sort_by(|&a, &b| layer_scores[b].total_cmp(&layer_scores[a]).then(a.cmp(&b)));
        let mut kept: Vec<u32> = order[..keep].iter().map(|&i| i as u32).collect();
        kept.sort_unstable();
        let index = Tensor::new(kept.as_slice(), &device)?;
        for axis in M::FFN_TENSORS {
            let name = Checkpoint::<M>::layer_tensor_name(layer, axis.name);
            let t = out.tensors.get_mut(&name).with_context(|| format!("the checkpoint has no {name}"))?;
            *t = t.index_select(&index, axis.dim)?.contiguous()?;
        }
    }
    M::set_ffn_size(&mut out.config, keep);
    Ok(out)
}

/// The share of exactly-zero values over the prunable weights of `tensors`.
pub fn measured_sparsity<M: Compressible>(tensors: &HashMap<String, Tensor>) -> Result<f64> {
    Masks::from_zeros::<M>(tensors)?.sparsity()
}

