//! Max pooling over non-overlapping k×k windows as one op each way (CPU, f32).
//!
//! Forwards: one pass over the input. Backwards: the whole gradient of each window goes to the
//! first position holding its maximum, as in PyTorch. Composed from candle ops the same pooling
//! is two reductions forwards and about ten full-size elementwise ops backwards (masks,
//! broadcasts, products), which dominated a LeNet training step.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy)]
struct MaxPool {
    k: usize,
}

/// (input, d output) → d input.
struct MaxPoolBackward {
    k: usize,
}

impl MaxPool {
    /// Calls `f(window index, input index of the window's first maximum)` for every window of
    /// one (H, W) plane.
    fn for_each_window(&self, plane: &[f32], h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
        let (oh, ow, k) = (h / self.k, w / self.k, self.k);
        for y in 0..oh {
            for x in 0..ow {
                let mut best = (y * k) * w + x * k;
                for i in 0..k {
                    for j in 0..k {
                        let at = (y * k + i) * w + x * k + j;
                        // NaN wins, as in PyTorch: it must not vanish from the output.
                        if plane[at] > plane[best] || plane[at].is_nan() && !plane[best].is_nan() {
                            best = at;
                        }
                    }
                }
                f(y * ow + x, best);
            }
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "wick-max-pool2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32(s, l, "max_pool2d")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = (h / self.k, w / self.k);
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(p, o)| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            self.for_each_window(plane, h, w, |win, at| o[win] = plane[at]);
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolBackward { k: self.k })?))
    }
}

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "wick-max-pool2d-backward"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, grad) = (super::cpu_f32(s1, l1, "max_pool2d backward")?, super::cpu_f32(s2, l2, "max_pool2d backward")?);
        let (b, c, h, w) = l1.shape().dims4()?;
        let (oh, ow) = (h / self.k, w / self.k);
        let mut dx = vec![0f32; b * c * h * w];
        let pool = MaxPool { k: self.k };
        dx.par_chunks_mut(h * w).enumerate().for_each(|(p, d)| {
            let (plane, g) = (&x[p * h * w..(p + 1) * h * w], &grad[p * oh * ow..(p + 1) * oh * ow]);
            pool.for_each_window(plane, h, w, |win, at| d[at] += g[win]);
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Max pooling over non-overlapping `k`×`k` windows (stride `k`; a remainder row or column is
/// dropped, PyTorch's floor mode). candle's own `max_pool2d` backward scales the gradient by
/// the fraction of maxima in the window (1/k² for a unique maximum) instead of passing it on.
pub fn max_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / k.max(1), w / k.max(1));
    if k == 0 || oh == 0 || ow == 0 {
        candle_core::bail!("max_pool2d: a {k}×{k} window does not fit a {h}×{w} input")
    }
    if super::fused_path(x.device()) && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(MaxPool { k });
    }
    // Elsewhere (and with `WICK_OPS=reference`): two max-reductions. candle passes the gradient whole to every tied maximum
    // (PyTorch: to the first only); with continuous inputs ties are rare.
    let x = if h % k != 0 || w % k != 0 { x.narrow(2, 0, oh * k)?.narrow(3, 0, ow * k)? } else { x.clone() };
    x.reshape((b, c, oh, k, ow, k))?.max(5)?.max(3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_forward_and_passes_the_whole_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w, k) in [(9, 8, 2), (6, 6, 3), (5, 7, 2)] {
            let x = Var::randn(0f32, 1.0, (2, 3, h, w), &dev)?;
            let ours = x.apply_op1(MaxPool { k })?;
            let theirs = x.max_pool2d(k)?;
            assert_eq!(ours.flatten_all()?.to_vec1::<f32>()?, theirs.flatten_all()?.to_vec1::<f32>()?);
            let probe = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
            let g = (&ours * &probe)?.sum_all()?.backward()?;
            let g = g.get(&x).unwrap();
            // Each window's gradient lands, whole, on its maximum: the sums agree and the
            // non-zero entries are exactly the probe's values.
            let total = probe.sum_all()?.to_scalar::<f32>()?;
            assert!((g.sum_all()?.to_scalar::<f32>()? - total).abs() < 1e-4);
            assert_eq!(g.ne(0f32)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?, probe.elem_count() as f32);
            // The reduction-based path (other devices) agrees.
            let reduced = x.narrow(2, 0, (h / k) * k)?.narrow(3, 0, (w / k) * k)?.reshape((2, 3, h / k, k, w / k, k))?.max(5)?.max(3)?;
            assert_eq!(reduced.flatten_all()?.to_vec1::<f32>()?, ours.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(())
    }
}
