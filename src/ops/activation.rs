//! GELU, exact (erf: BERT's) and tanh-approximated (GPT-2's), each as one autograd node. candle's
//! backward of either builds the derivative from ~8 ops, each a full pass over the (tokens ×
//! 4·hidden) activations; here it is one pass, with a branch-free erf and exp (`ops::math`) that
//! vectorise (candle's `erf_f32` and `gelu` call scalar libm functions per element: `tanhf` and
//! `expm1f` were 9% of a batch-16 GPT-2 decoding step).

use super::cpu_f32;
use super::math::{erf, erf_and_gaussian, exp, run_vectorised};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
/// √(2/π), the tanh approximation's scale
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_TANH_CUBIC: f32 = 0.044_715;
const CHUNK: usize = 16 * 1024;

/// x·Φ(x), differentiable; f32 CPU tensors take the fused op, others (and `WICK_OPS=reference`)
/// candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::fused_path(x.device()) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Gelu { tanh: false })
    } else {
        x.gelu_erf()
    }
}

/// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), transformers' "gelu_new", differentiable; f32 CPU
/// tensors take the fused op, others (and `WICK_OPS=reference`) candle's `gelu`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if super::fused_path(x.device()) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Gelu { tanh: true })
    } else {
        x.gelu()
    }
}

/// tanh(u) = 1 − 2/(e^{2u} + 1): ±1 past the range of exp, no branch.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

#[inline(always)]
fn gelu_erf_at(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_erf_slope(x: f32) -> f32 {
    // erf(x/√2) and e^(−(x/√2)²) = e^(−x²/2), the normal density's exponential, from one `exp`.
    let (erf, gaussian) = erf_and_gaussian(x * FRAC_1_SQRT_2);
    let cdf = 0.5 * (1.0 + erf);
    let pdf = FRAC_1_SQRT_2PI * gaussian;
    cdf + x * pdf
}

#[inline(always)]
fn gelu_tanh_at(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x)))
}

#[inline(always)]
fn gelu_tanh_slope(x: f32) -> f32 {
    let t = tanh(SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_CUBIC * x * x)
}

/// `out[i] = f(a[i], b[i])` in parallel chunks, compiled for the CPU's instruction set (`f` is
/// inlined into the vectorised loop, so it must be `#[inline(always)]` itself). The output is
/// written once, into uninitialised capacity: zero-filling it first (`vec![0.0; n]`, a serial
/// `memset` of megabytes for an FFN's activations) was 1.4% of a BERT-base forward pass.
#[inline(always)]
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send + Copy) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "map2: inputs of different lengths");
    let mut out: Vec<f32> = Vec::with_capacity(a.len());
    out.spare_capacity_mut()[..a.len()].par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(os, (xs, ys))| {
        run_vectorised(
            #[inline(always)]
            || {
                for ((o, &x), &y) in os.iter_mut().zip(xs).zip(ys) {
                    o.write(f(x, y));
                }
            },
        )
    });
    // SAFETY: the chunks cover all a.len() elements (equal-length inputs, zipped chunk by chunk),
    // and each was written above.
    unsafe { out.set_len(a.len()) };
    out
}

/// GELU, erf or tanh form.
struct Gelu {
    tanh: bool,
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        if self.tanh {
            "wick-gelu-tanh"
        } else {
            "wick-gelu-erf"
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, self.name())?;
        // (x paired with itself: one loop serves both maps.)
        let y = if self.tanh { map2(x, x, |x, _| gelu_tanh_at(x)) } else { map2(x, x, |x, _| gelu_erf_at(x)) };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward { tanh: self.tanh })?))
    }
}

/// (x, dL/dy) → dL/dx of [`Gelu`].
struct GeluBackward {
    tanh: bool,
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "wick-gelu-backward"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (cpu_f32(xs, xl, "gelu backward")?, cpu_f32(gs, gl, "gelu backward")?);
        if x.len() != g.len() {
            candle_core::bail!("gelu backward: input {:?} and gradient {:?} differ", xl.dims(), gl.dims())
        }
        let dx = if self.tanh { map2(x, g, |x, g| g * gelu_tanh_slope(x)) } else { map2(x, g, |x, g| g * gelu_erf_slope(x)) };
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Both forms against candle's (its erf GELU, its tanh GELU), values and gradients, on
    /// values out to ±12 (where tanh and erf saturate).
    #[test]
    fn matches_candles_gelus_and_their_gradients() -> Result<()> {
        for tanh in [false, true] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 4., (5, 301), &Device::Cpu)?.clamp(-12f32, 12f32)?))?;
            let probe = Tensor::randn(0f32, 1., (5, 301), &Device::Cpu)?;
            let ours = x.apply_op1(Gelu { tanh })?;
            let theirs = if tanh { x.gelu()? } else { x.gelu_erf()? };
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
            assert!(diff(&ours, &theirs)? < 1e-5, "tanh {tanh}: {}", diff(&ours, &theirs)?);
            let g1 = (ours * &probe)?.sum_all()?.backward()?;
            let g2 = (theirs * &probe)?.sum_all()?.backward()?;
            let d = diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap())?;
            assert!(d < 1e-4, "tanh {tanh}: gradients differ by {d}");
        }
        Ok(())
    }
}
