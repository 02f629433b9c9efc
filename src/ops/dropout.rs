//! Dropout whose mask is a function of (seed, element index): a counter-based hash (splitmix64's
//! finaliser, FlashAttention's approach with Philox) decides keep or drop for every element, so
//! the backward pass regenerates the mask instead of keeping it. That makes dropout one pass
//! forwards and one backwards with no mask tensor held between them (candle's formulation draws
//! a mask tensor, multiplies, and keeps the mask for the backward pass: an activation-sized
//! buffer per dropout), and it lets the fused attention apply dropout to probabilities it never
//! materialises, tile by tile, identically in both passes.
//!
//! The seed of each call is drawn from wick's dropout generator, so `wick::nn::reseed` makes the
//! masks a function of (seed, step) and a resumed run draws the masks of the uninterrupted one.
//! Kept elements are scaled by 1/(1−p), as in `torch.nn.functional.dropout`.

use super::{cpu_f32, math::run_vectorised};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// One call's mask: element `i` is dropped when the high 32 bits of hash(seed, i) fall below
/// `threshold` = p·2³².
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    pub seed: u64,
    pub threshold: u64,
    /// 1/(1−p), the multiplier of kept elements.
    pub scale: f32,
}

impl DropoutMask {
    /// Dropout with probability `p` in (0, 1), seeded from wick's dropout generator.
    pub fn new(p: f64) -> Result<Self> {
        if !(p > 0.0 && p < 1.0) {
            candle_core::bail!("dropout probability must be in (0, 1) here, got {p}")
        }
        Ok(Self::with_seed(p, crate::nn::draw_dropout_seed()))
    }

    pub fn with_seed(p: f64, seed: u64) -> Self {
        Self { seed, threshold: (p * 4_294_967_296.0) as u64, scale: (1.0 / (1.0 - p)) as f32 }
    }

    /// The dropout probability p.
    pub fn probability(&self) -> f64 {
        self.threshold as f64 / 4_294_967_296.0
    }

    /// The multiplier of element `index`: 0 or 1/(1−p).
    #[inline(always)]
    pub fn multiplier(&self, index: u64) -> f32 {
        if (mix(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 32) >= self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// The mask of elements `first..first + n` as a tensor of 0 and 1/(1−p) (the reference
    /// formulations and the tests use it).
    pub fn tensor(&self, first: u64, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count() as u64).map(|i| self.multiplier(first + i)).collect();
        Tensor::from_vec(v, shape, device)
    }
}

/// splitmix64's output function: a bijection of u64 with full avalanche.
#[inline(always)]
fn mix(x: u64) -> u64 {
    let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const CHUNK: usize = 16 * 1024;

/// `x ∘ mask` (+ `residual`) over contiguous f32 slices, in parallel chunks.
fn masked(mask: &DropoutMask, x: &[f32], residual: Option<&[f32]>) -> Vec<f32> {
    // SAFETY: the chunks of y and x pair up one to one (same length and chunk size), and each
    // element of a chunk of y is written from its element of x.
    unsafe {
        crate::ops::written_once(x.len(), |y| {
            y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(c, (ys, xs))| {
                let first = (c * CHUNK) as u64;
                let rs = residual.map(|r| &r[c * CHUNK..c * CHUNK + xs.len()]);
                run_vectorised(#[inline(always)] || match rs {
                    Some(rs) => {
                        for (i, ((y, &x), &r)) in ys.iter_mut().zip(xs).zip(rs).enumerate() {
                            y.write(x.mul_add(mask.multiplier(first + i as u64), r));
                        }
                    }
                    None => {
                        for (i, (y, &x)) in ys.iter_mut().zip(xs).enumerate() {
                            y.write(x * mask.multiplier(first + i as u64));
                        }
                    }
                })
            })
        })
    }
}

/// y = x∘M; its gradient is again a masked product.
struct Dropout(DropoutMask);
/// y = x∘M + residual.
struct DropoutAdd(DropoutMask);

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "wick-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(masked(&self.0, cpu_f32(s, l, "dropout")?, None)), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Dropout(self.0))?))
    }
}

impl CustomOp2 for DropoutAdd {
    fn name(&self) -> &'static str {
        "wick-dropout-add"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("dropout_add: x {:?} and residual {:?} differ", l1.dims(), l2.dims())
        }
        let (x, r) = (cpu_f32(s1, l1, "dropout_add")?, cpu_f32(s2, l2, "dropout_add")?);
        Ok((CpuStorage::F32(masked(&self.0, x, Some(r))), l1.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _r: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.contiguous()?.apply_op1_no_bwd(&Dropout(self.0))?), Some(grad.clone())))
    }
}

fn fused(x: &Tensor) -> bool {
    super::fused_path(x.device()) && x.dtype() == DType::F32
}

/// Inverted dropout of `x` with probability `p` (in (0, 1)): one fused pass each way on the CPU
/// in f32, the same mask (built on the host) times `x` with candle ops otherwise (other dtypes
/// and devices, and `WICK_OPS=reference`: the masks are the same on both paths); models call it
/// through `wick::nn::dropout`, which uses the device's own generator off the CPU.
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    let mask = DropoutMask::new(p)?;
    if fused(x) {
        x.contiguous()?.apply_op1(Dropout(mask))
    } else {
        x.mul(&mask.tensor(0, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }
}

/// `dropout(x, p) + residual` as one op (the residual connections of transformer layers).
pub fn dropout_add(x: &Tensor, residual: &Tensor, p: f64) -> Result<Tensor> {
    let mask = DropoutMask::new(p)?;
    if fused(x) && residual.dtype() == DType::F32 && fused(residual) && x.shape() == residual.shape() {
        x.contiguous()?.apply_op2(&residual.contiguous()?, DropoutAdd(mask))
    } else {
        x.mul(&mask.tensor(0, x.shape(), x.device())?.to_dtype(x.dtype())?)?.broadcast_add(residual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn drops_the_requested_fraction_and_depends_on_the_seed() {
        let d = DropoutMask::with_seed(0.1, 7);
        let n = 200_000;
        let frac = (0..n).filter(|&i| d.multiplier(i) == 0.0).count() as f64 / n as f64;
        assert!((frac - 0.1).abs() < 0.005, "dropped {frac}");
        let other = DropoutMask::with_seed(0.1, 8);
        let same = (0..1000).filter(|&i| d.multiplier(i) == other.multiplier(i)).count();
        assert!(same < 900, "seeds 7 and 8 agree on {same} of 1000");
    }

    #[test]
    fn fused_ops_match_the_mask_tensor_formulation_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 7, 2 * CHUNK / 7 + 5), &dev)?;
        let r = Var::randn(0f32, 1.0, x.shape(), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, x.shape(), &dev)?;
        let mask = DropoutMask::with_seed(0.3, 99);
        let m = mask.tensor(0, x.shape(), &dev)?;
        let y = x.apply_op2(&r, DropoutAdd(mask))?;
        let reference = ((x.as_tensor() * &m)? + r.as_tensor())?;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(close(&y, &reference)? < 1e-6);
        let (g1, g2) = ((&y * &probe)?.sum_all()?.backward()?, (&reference * &probe)?.sum_all()?.backward()?);
        for v in [&x, &r] {
            assert!(close(g1.get(v).unwrap(), g2.get(v).unwrap())? < 1e-6);
        }
        let y = x.apply_op1(Dropout(mask))?;
        assert!(close(&y, &(x.as_tensor() * &m)?)? < 1e-6);
        let g = (&y * &probe)?.sum_all()?.backward()?;
        assert!(close(g.get(&x).unwrap(), &(&probe * &m)?)? < 1e-6);
        Ok(())
    }
}
