//! The exact (erf) GELU as one autograd node. candle's `gelu_erf` backward builds the derivative
//! 0.5 + 0.5·erf(x/√2) + x·φ(x) from ~8 ops, each a full pass over the (tokens × 4·hidden)
//! activations; here it is one pass, with a branch-free erf and exp (`ops::math`) that vectorise
//! (candle's `erf_f32` is one scalar libm-style call per element).

use super::cpu_f32;
use super::math::{erf, exp, run_vectorised};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
const CHUNK: usize = 16 * 1024;

/// x·Φ(x), differentiable; f32 CPU tensors take the fused op, others (and `WICK_OPS=reference`)
/// candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::fused_path(x.device()) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "wick-gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "gelu_erf")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(ys, xs)| {
            run_vectorised(#[inline(always)] || {
                for (y, &x) in ys.iter_mut().zip(xs) {
                    *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
                }
            })
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)?))
    }
}

struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "wick-gelu-erf-backward"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (cpu_f32(xs, xl, "gelu_erf backward")?, cpu_f32(gs, gl, "gelu_erf backward")?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).for_each(|(ds, (xs, gs))| {
            run_vectorised(#[inline(always)] || {
                for ((d, &x), &g) in ds.iter_mut().zip(xs).zip(gs) {
                    let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
                    let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * x * x);
                    *d = g * (cdf + x * pdf);
                }
            })
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_gelu_erf_and_its_gradient() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 2., (5, 301), &Device::Cpu)?)?;
        let probe = Tensor::randn(0f32, 1., (5, 301), &Device::Cpu)?;
        let ours = x.apply_op1(GeluErf)?;
        let theirs = x.gelu_erf()?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&ours, &theirs)? < 1e-6);
        let g1 = (ours * &probe)?.sum_all()?.backward()?;
        let g2 = (theirs * &probe)?.sum_all()?.backward()?;
        assert!(diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap())? < 1e-4);
        Ok(())
    }
}
