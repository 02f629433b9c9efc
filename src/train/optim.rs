//! Optimizers with state that can be saved and restored: SGD (momentum, weight decay) and
//! AdamW (decoupled weight decay; Adam is AdamW with no decay). Updates follow
//! `torch.optim.SGD` / `torch.optim.AdamW` step for step, and tests hold them to PyTorch's numbers.
//!
//! On the CPU with f32 parameters the update runs in place (candle's tensor ops would allocate a
//! new tensor for each of a dozen elementwise steps, which costs more than the forward pass of a
//! small model): AdamW in one pass over parameter, gradient and both moments, SGD in one pass per
//! state tensor, and tensors under 16k elements on the calling thread; elsewhere it uses candle ops.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One trainable tensor, its checkpoint name, and whether weight decay applies to it.
#[derive(Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

/// The usual exclusion from weight decay: biases (also the RNNs' `bias_ih_l0`, `bias_hh_l0`,
/// ..., any `bias_*` name) and normalisation layers' scales and shifts.
pub fn is_bias_or_norm(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    let rnn_bias = n.rsplit('.').next().is_some_and(|last| last.starts_with("bias_"));
    n.ends_with("bias") || rnn_bias || n.ends_with(".beta") || n.ends_with(".gamma") || n.contains("layernorm")
        || n.contains("layer_norm") || n.contains(".ln_") || n.starts_with("ln_") || n.contains(".bn.") || n.contains("norm.")
}

/// Buffers live in the VarMap beside parameters (batch-norm running statistics) but are not trained.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var") || name.ends_with("num_batches_tracked")
}

/// Every trainable variable of `varmap`, sorted by name (a stable order for state files);
/// `no_decay` picks the ones weight decay must skip.
pub fn params(varmap: &VarMap, no_decay: impl Fn(&str) -> bool) -> Vec<Param> {
    let data = varmap.data().lock().unwrap();
    let mut out: Vec<Param> = data
        .iter()
        .filter(|(name, _)| !is_buffer(name))
        .map(|(name, var)| Param { name: name.clone(), var: var.clone(), decay: !no_decay(name) })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    Sgd { momentum: f64, weight_decay: f64 },
    AdamW { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
}

impl OptimizerConfig {
    pub fn sgd() -> Self {
        Self::Sgd { momentum: 0.0, weight_decay: 0.0 }
    }
    /// PyTorch's `Adam` defaults (AdamW with no weight decay is the same update).
    pub fn adam() -> Self {
        Self::adamw(0.0)
    }
    pub fn adamw(weight_decay: f64) -> Self {
        Self::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }
    pub fn build(&self, params: Vec<Param>) -> Result<Box<dyn Optimizer>> {
        Ok(match *self {
            Self::Sgd { momentum, weight_decay } => Box::new(Sgd::new(params, momentum, weight_decay)?),
            Self::AdamW { beta1, beta2, eps, weight_decay } => Box::new(AdamW::new(params, beta1, beta2, eps, weight_decay)?),
        })
    }
}

pub trait Optimizer {
    /// Applies one update with learning rate `lr`; `grads[i]` belongs to `params()[i]`, and a
    /// parameter without a gradient is left alone.
    fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()>;
    fn params(&self) -> &[Param];
    /// Named state tensors (for a safetensors file) and the number of steps taken; copies, so
    /// that later steps do not change them (a failed copy, e.g. on a device, is an error).
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

/// Elementwise updates that run in place on contiguous f32 CPU storage.
fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    crate::ops::cpu_f32_mut(s, l, "in-place optimizer update")
}
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    crate::ops::cpu_f32(s, l, "in-place optimizer update")
}

/// Elements per parallel task; a tensor this small is updated on the calling thread, since
/// handing one task to rayon's pool (a wake-up and a wait) costs more than the update.
const CHUNK: usize = 1 << 14;

/// Runs `f` on the f32 CPU storage of `dst` (mutably) and `src`: how the fused Adam update gets
/// at its tensors. Nested calls borrow several tensors mutably at once (each its own lock).
struct WithSlices<F>(std::cell::RefCell<Option<F>>);
impl<F: FnOnce(&mut [f32], &[f32]) -> candle_core::Result<()>> candle_core::InplaceOp2 for WithSlices<F> {
    fn name(&self) -> &'static str {
        "optimizer-update"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let Some(f) = self.0.borrow_mut().take() else { candle_core::bail!("optimizer-update ran twice") };
        let (dst, src) = (f32_slice_mut(s1, l1)?, f32_slice(s2, l2)?);
        if dst.len() != src.len() {
            candle_core::bail!("optimizer-update: {:?} and {:?} differ", l1.dims(), l2.dims())
        }
        f(dst, src)
    }
}

/// [`WithSlices`] for `dst` alone.
struct WithSlice<F>(std::cell::RefCell<Option<F>>);
impl<F: FnOnce(&mut [f32]) -> candle_core::Result<()>> candle_core::InplaceOp1 for WithSlice<F> {
    fn name(&self) -> &'static str {
        "optimizer-update"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some(f) = self.0.borrow_mut().take() else { candle_core::bail!("optimizer-update ran twice") };
        f(f32_slice_mut(s, l)?)
    }
}

fn with_slice(dst: &Tensor, f: impl FnOnce(&mut [f32]) -> candle_core::Result<()>) -> candle_core::Result<()> {
    dst.inplace_op1(&WithSlice(std::cell::RefCell::new(Some(f))))
}

fn with_slices(dst: &Tensor, src: &Tensor, f: impl FnOnce(&mut [f32], &[f32]) -> candle_core::Result<()>) -> candle_core::Result<()> {
    dst.inplace_op2(src, &WithSlices(std::cell::RefCell::new(Some(f))))
}

/// AdamW's step for one parameter in one pass over (w, g, m, v), in parallel chunks for large
/// tensors: three passes (m, then v, then w) read the gradient twice and the moments twice more.
#[allow(clippy::too_many_arguments)]
fn adamw_in_place(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, b1: f32, b2: f32, eps: f32, decay: f32, step_size: f32, sqrt_bias2: f32) -> candle_core::Result<()> {
    // Compiled per instruction set (8 or 16 lanes; the baseline target has 4); separate multiplies
    // and adds (Rust does not fuse them), so every level gives the same bits.
    let update = move |w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        crate::ops::math::run_vectorised(
            #[inline(always)]
            || {
                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *w = *w * decay - step_size * *m / (v.sqrt() / sqrt_bias2 + eps);
                }
            },
        )
    };
    // Each tensor has its own lock: m and v are held for writing while w is updated.
    with_slice(m, |m| {
        with_slice(v, |v| {
            with_slices(w, g, |w, g| {
                if w.len() != m.len() || w.len() != v.len() {
                    candle_core::bail!("AdamW: parameter and moments differ in size")
                }
                if w.len() <= CHUNK {
                    update(w, g, m, v);
                } else {
                    w.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                        .for_each(|((w, g), (m, v))| update(w, g, m, v));
                }
                Ok(())
            })
        })
    })
}

/// `dst = f(dst, a)` elementwise, in parallel chunks.
struct Update2<F: Fn(f32, f32) -> f32 + Sync>(F);
impl<F: Fn(f32, f32) -> f32 + Sync> candle_core::InplaceOp2 for Update2<F> {
    fn name(&self) -> &'static str {
        "optimizer-update2"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (dst, a) = (f32_slice_mut(s1, l1)?, f32_slice(s2, l2)?);
        let update = |(d, a): (&mut [f32], &[f32])| d.iter_mut().zip(a).for_each(|(d, &a)| *d = (self.0)(*d, a));
        if dst.len() <= CHUNK {
            update((dst, a));
        } else {
            dst.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(update);
        }
        Ok(())
    }
}

/// `dst = f(dst, a, b)` elementwise, in parallel chunks.
struct Update3<F: Fn(f32, f32, f32) -> f32 + Sync>(F);
impl<F: Fn(f32, f32, f32) -> f32 + Sync> candle_core::InplaceOp3 for Update3<F> {
    fn name(&self) -> &'static str {
        "optimizer-update3"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<()> {
        let (dst, a, b) = (f32_slice_mut(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let update = |((d, a), b): ((&mut [f32], &[f32]), &[f32])| {
            for i in 0..d.len() {
                d[i] = (self.0)(d[i], a[i], b[i]);
            }
        };
        if dst.len() <= CHUNK {
            update(((dst, a), b));
        } else {
            dst.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(update);
        }
        Ok(())
    }
}

/// Whether this parameter can take the in-place CPU path (not with `WICK_OPS=reference`, which
/// runs the candle-ops updates other devices take).
fn in_place(var: &Var) -> bool {
    crate::ops::fused_path(var.device()) && var.dtype() == DType::F32 && var.is_contiguous()
}

/// The gradients of `params` from a backward pass, in the same order.
pub fn grads_of(params: &[Param], store: &GradStore) -> Vec<Option<Tensor>> {
    params.iter().map(|p| store.get(p.var.as_tensor()).cloned()).collect()
}

fn grad_for(grads: &[Option<Tensor>], i: usize, p: &Param) -> Result<Option<Tensor>> {
    match grads.get(i).and_then(Option::as_ref) {
        None => Ok(None),
        Some(g) if g.dims() != p.var.dims() => bail!("gradient of {} has shape {:?}, the parameter {:?}", p.name, g.dims(), p.var.dims()),
        Some(g) => Ok(Some(g.to_dtype(DType::F32)?.contiguous()?)),
    }
}

/// Optimizer state is kept in f32 whatever the parameters' dtype: in f16, eps = 1e-8 and the
/// squares of small gradients round to 0, and Adam's update becomes 0/0.
fn f32_zeros(p: &Param) -> candle_core::Result<Var> {
    Var::zeros(p.var.shape(), DType::F32, p.var.device())
}

/// Sets a parameter from an f32 value computed by the candle-ops path.
fn set_param(p: &Param, value: Tensor) -> Result<()> {
    Ok(p.var.set(&value.to_dtype(p.var.dtype())?)?)
}

fn load_named(state: &HashMap<String, Tensor>, key: &str, like: &Var) -> Result<Tensor> {
    let t = state.get(key).with_context(|| format!("optimizer state has no {key:?}"))?;
    if t.dims() != like.dims() {
        bail!("optimizer state {key:?} has shape {:?}, the parameter {:?}", t.dims(), like.dims());
    }
    Ok(t.to_device(like.device())?.to_dtype(DType::F32)?)
}

pub struct Sgd {
    params: Vec<Param>,
    momentum: f64,
    weight_decay: f64,
    buffers: Vec<Var>,
}

impl Sgd {
    pub fn new(params: Vec<Param>, momentum: f64, weight_decay: f64) -> Result<Self> {
        if momentum < 0.0 || weight_decay < 0.0 {
            bail!("SGD momentum and weight decay must be non-negative");
        }
        let buffers = params.iter().map(f32_zeros).collect::<candle_core::Result<_>>()?;
        Ok(Self { params, momentum, weight_decay, buffers })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let (mu, wd) = (self.momentum, self.weight_decay);
        for (i, (p, buf)) in self.params.iter().zip(&self.buffers).enumerate() {
            let Some(g) = grad_for(grads, i, p)? else { continue };
            let wd = if p.decay { wd } else { 0.0 };
            if in_place(&p.var) {
                let (lr, mu, wdf) = (lr as f32, mu as f32, wd as f32);
                if mu == 0.0 {
                    p.var.inplace_op2(&g, &Update2(move |w, g| w - lr * (g + wdf * w)))?;
                } else {
                    buf.inplace_op3(&g, &p.var, &Update3(move |b, g, w| mu * b + g + wdf * w))?;
                    p.var.inplace_op2(buf, &Update2(move |w, b| w - lr * b))?;
                }
            } else {
                let w = p.var.as_tensor().to_dtype(DType::F32)?;
                let g = if wd > 0.0 { (g + (&w * wd)?)? } else { g };
                let update = if mu == 0.0 {
                    g
                } else {
                    buf.set(&((buf.as_tensor() * mu)? + g)?)?;
                    buf.as_tensor().clone()
                };
                set_param(p, (w - (update * lr)?)?)?;
            }
        }
        Ok(())
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        self.params.iter().zip(&self.buffers).map(|(p, b)| Ok((format!("momentum.{}", p.name), b.as_tensor().copy()?))).collect()
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (p, b) in self.params.iter().zip(&self.buffers) {
            b.set(&load_named(state, &format!("momentum.{}", p.name), &p.var)?)?;
        }
        Ok(())
    }
}

pub struct AdamW {
    params: Vec<Param>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// First and second moment estimates, one pair per parameter.
    moments: Vec<(Var, Var)>,
    /// Updates each parameter has had (as in PyTorch, a step without a gradient does not count).
    steps: Vec<u64>,
}

impl AdamW {
    pub fn new(params: Vec<Param>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            bail!("AdamW betas must be in [0, 1), got ({beta1}, {beta2})");
        }
        if eps <= 0.0 || weight_decay < 0.0 {
            bail!("AdamW eps must be positive and weight decay non-negative");
        }
        let moments = params.iter().map(|p| Ok((f32_zeros(p)?, f32_zeros(p)?))).collect::<candle_core::Result<_>>()?;
        let steps = vec![0; params.len()];
        Ok(Self { params, beta1, beta2, eps, weight_decay, moments, steps })
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        for (i, (p, (m, v))) in self.params.iter().zip(&self.moments).enumerate() {
            let Some(g) = grad_for(grads, i, p)? else { continue };
            self.steps[i] += 1;
            let t = self.steps[i] as i32;
            let sqrt_bias2 = (1.0 - b2.powi(t)).sqrt();
            let step_size = lr / (1.0 - b1.powi(t));
            let decay = if p.decay { 1.0 - lr * self.weight_decay } else { 1.0 };
            if in_place(&p.var) {
                let (b1, b2, eps, decay, step_size, sqrt_bias2) = (b1 as f32, b2 as f32, eps as f32, decay as f32, step_size as f32, sqrt_bias2 as f32);
                adamw_in_place(p.var.as_tensor(), &g, m.as_tensor(), v.as_tensor(), b1, b2, eps, decay, step_size, sqrt_bias2)?;
            } else {
                m.set(&((m.as_tensor() * b1)? + (&g * (1.0 - b1))?)?)?;
                v.set(&((v.as_tensor() * b2)? + (g.sqr()? * (1.0 - b2))?)?)?;
                let denom = ((v.as_tensor().sqrt()? / sqrt_bias2)? + eps)?;
                let w = (p.var.as_tensor().to_dtype(DType::F32)? * decay)?;
                set_param(p, (w - ((m.as_tensor() / denom)? * step_size)?)?)?;
            }
        }
        Ok(())
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for ((p, (m, v)), &t) in self.params.iter().zip(&self.moments).zip(&self.steps) {
            out.push((format!("step.{}", p.name), Tensor::new(&[t as f64], &candle_core::Device::Cpu)?));
            out.push((format!("exp_avg.{}", p.name), m.as_tensor().copy()?));
            out.push((format!("exp_avg_sq.{}", p.name), v.as_tensor().copy()?));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (p, (m, v))) in self.params.iter().zip(&self.moments).enumerate() {
            let key = format!("step.{}", p.name);
            let t = state.get(&key).with_context(|| format!("optimizer state has no {key:?}"))?;
            self.steps[i] = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0] as u64;
            m.set(&load_named(state, &format!("exp_avg.{}", p.name), &p.var)?)?;
            v.set(&load_named(state, &format!("exp_avg_sq.{}", p.name), &p.var)?)?;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients, and (when `max_norm` is given and exceeded) the
/// gradients scaled by `max_norm / (norm + 1e-6)`, as `torch.nn.utils.clip_grad_norm_` does.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: Option<f64>) -> Result<f64> {
    let squares = grads.iter().flatten().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    let norm = Tensor::stack(&squares, 0)?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}
