//! Cross-entropy over a large vocabulary, fused on the CPU: the forward pass reads the logits
//! once per row (max, log-sum-exp, the target's logit) and the backward pass writes
//! `softmax - one_hot` in one pass. The composition of candle ops it replaces (log-softmax, gather,
//! mean, and their gradients) allocates and touches a dozen (items × classes) temporaries, which
//! for a 50,257-token vocabulary cost more than the model's matrix products.

use super::cpu_f32;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Mean cross-entropy of `logits` (items, classes), contiguous f32 on the CPU, against `targets`
/// (items) u32. Differentiable with respect to the logits.
pub fn cross_entropy_cpu(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(&targets.contiguous()?, FusedCrossEntropy)
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("cross-entropy targets must be contiguous u32"),
    }
}

/// Checks shapes; returns (items, classes).
fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize)> {
    let (n, c) = l1.shape().dims2()?;
    if l2.shape().dims1()? != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows of logits", l2.shape().dims1()?)
    }
    Ok((n, c))
}

/// (row max, log Σ exp(x - max)) of one row.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
    (max, sum.ln() as f32)
}

fn check_target(t: u32, classes: usize) -> Result<usize> {
    if t as usize >= classes {
        candle_core::bail!("cross_entropy: target {t} is out of range for {classes} classes")
    }
    Ok(t as usize)
}

struct FusedCrossEntropy;

impl CustomOp2 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = dims(l1, l2)?;
        let logits = cpu_f32(s1, l1, "cross_entropy")?;
        let targets = targets_of(s2, l2)?;
        let losses: Vec<Result<f64>> = logits
            .par_chunks(c)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let t = check_target(t, c)?;
                let (max, lse) = log_sum_exp(row);
                Ok((max + lse - row[t]) as f64)
            })
            .collect();
        let mut total = 0f64;
        for l in losses {
            total += l?;
        }
        Ok((CpuStorage::F32(vec![(total / n.max(1) as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = logits.dim(0)?;
        let scale = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? / n.max(1) as f32;
        Ok((Some(logits.apply_op2_no_bwd(targets, &CrossEntropyGrad { scale })?), None))
    }
}

/// `scale · (softmax(logits) - one_hot(targets))`, (items, classes).
struct CrossEntropyGrad {
    scale: f32,
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = dims(l1, l2)?;
        let logits = cpu_f32(s1, l1, "cross_entropy")?;
        let targets = targets_of(s2, l2)?;
        let mut grad = Vec::<f32>::with_capacity(n * c);
        // Every element is written below before it is read.
        #[allow(clippy::uninit_vec)]
        unsafe {
            grad.set_len(n * c)
        };
        let scale = self.scale;
        grad.par_chunks_mut(c).zip(logits.par_chunks(c)).zip(targets.par_iter()).try_for_each(|((g, row), &t)| -> Result<()> {
            let t = check_target(t, c)?;
            let (max, lse) = log_sum_exp(row);
            let shift = max + lse;
            for (g, &x) in g.iter_mut().zip(row) {
                *g = (x - shift).exp() * scale;
            }
            g[t] -= scale;
            Ok(())
        })?;
        Ok((CpuStorage::F32(grad), Shape::from((n, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Var::randn(0f32, 3.0, (7, 300), &dev)?;
        let targets = Tensor::new(&[0u32, 299, 5, 17, 17, 200, 1], &dev)?;
        let ours = cross_entropy_cpu(&(logits.as_tensor() * 2.0)?, &targets)?;
        let theirs = candle_nn::loss::cross_entropy(&(logits.as_tensor() * 2.0)?, &targets)?;
        let diff = (ours.to_scalar::<f32>()? - theirs.to_scalar::<f32>()?).abs();
        assert!(diff < 1e-5, "{diff}");
        let g1 = (ours * 3.0)?.backward()?.get(&logits).unwrap().clone();
        let g2 = (theirs * 3.0)?.backward()?.get(&logits).unwrap().clone();
        let gd = (g1 - g2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(gd < 1e-6, "{gd}");
        assert!(cross_entropy_cpu(logits.as_tensor(), &Tensor::new(&[300u32, 0, 0, 0, 0, 0, 0], &dev)?).is_err());
        Ok(())
    }
}
