//! LayerNorm over the last dimension as one autograd node with a real backward pass.
//!
//! candle-nn's fused LayerNorm has no backward (gradients silently stop), and the version built
//! from plain ops is ~10 graph nodes, each a full pass over the activations forward and
//! backward. Here the forward is one pass per row (mean, variance, normalise, scale, shift) and
//! the backward one pass per row plus a reduction for the weight and bias gradients:
//!   x̂ = (x − μ)·r,  r = 1/√(σ² + ε),  g = dy·w
//!   dx = r·(g − mean(g) − x̂·mean(g·x̂)),  dw = Σ_rows dy·x̂,  db = Σ_rows dy
//! μ and r are recomputed in the backward (one extra read of x) instead of being stored.

use super::cpu_f32;
use super::math::{lane_sum, run_vectorised};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// LayerNorm of `x` (..., d) with `weight` and `bias` (d). f32 CPU tensors take the fused op
/// (unless `WICK_OPS=reference`); anything else the plain-op version.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if super::fused_path(x.device()) && [x.dtype(), weight.dtype(), bias.dtype()].iter().all(|&d| d == DType::F32) {
        fused_layer_norm(x, weight, bias, eps)
    } else {
        crate::nn::layer_norm_plain(x, weight, Some(bias), eps)
    }
}

/// The fused op itself (f32 CPU tensors), whatever the path: what the tests compare.
fn fused_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

/// Mean and reciprocal standard deviation of a row (in lane-wise sums: callers run under
/// `run_vectorised`).
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row, row, |v, _| v) / n;
    let var = lane_sum(row, row, |v, _| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn check(xl: &Layout, wl: &Layout, bl: &Layout) -> Result<usize> {
    let d = *xl.dims().last().unwrap_or(&0);
    if d == 0 || wl.shape().elem_count() != d || bl.shape().elem_count() != d {
        candle_core::bail!("layer_norm: input {:?} with weight {:?} and bias {:?}", xl.dims(), wl.dims(), bl.dims())
    }
    Ok(d)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "wick-layer-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = check(xl, wl, bl)?;
        let (x, w, b) = (cpu_f32(xs, xl, "layer_norm")?, cpu_f32(ws, wl, "layer_norm")?, cpu_f32(bs, bl, "layer_norm")?);
        let write = |y: &mut [std::mem::MaybeUninit<f32>]| {
            y.par_chunks_mut(d * 16).zip(x.par_chunks(d * 16)).for_each(|(ys, xs)| {
                run_vectorised(
                    #[inline(always)]
                    || {
                        for (yr, xr) in ys.chunks_mut(d).zip(xs.chunks(d)) {
                            let (mean, rstd) = row_stats(xr, self.eps);
                            for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                                y.write((x - mean) * rstd * w + b);
                            }
                        }
                    },
                )
            })
        };
        // SAFETY: the chunks of y and x pair up whole rows, and every element of each is written.
        let y = unsafe { crate::ops::written_once(x.len(), write) };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let rows = x.elem_count() / d;
        // One op computes all three gradients; its output is [dx | dw | db] flattened.
        let packed = x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &grad.contiguous()?, &LayerNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows * d)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows * d, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, rows * d + d, d)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "wick-layer-norm-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = check(xl, wl, wl)?;
        let (x, w, dy) = (cpu_f32(xs, xl, "layer_norm backward")?, cpu_f32(ws, wl, "layer_norm backward")?, cpu_f32(gs, gl, "layer_norm backward")?);
        let rows = x.len() / d;
        let mut out = crate::ops::repeated_rows(None, 1, rows * d + 2 * d);
        let (dx, _) = out.split_at_mut(rows * d);
        const ROWS_PER_TASK: usize = 16;
        // Each task writes its rows of dx and returns its partial sums of dw and db.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK).zip(dy.par_chunks(d * ROWS_PER_TASK)))
            .map(|(dxs, (xs, dys))| {
                let mut sums = vec![0f32; 2 * d];
                let (mut xhat, mut g) = (vec![0f32; d], vec![0f32; d]);
                run_vectorised(
                    #[inline(always)]
                    || {
                        for ((dxr, xr), dyr) in dxs.chunks_mut(d).zip(xs.chunks(d)).zip(dys.chunks(d)) {
                            let (mean, rstd) = row_stats(xr, self.eps);
                            let (dw_sums, db_sums) = sums.split_at_mut(d);
                            // (Zipped, not indexed: indexing four buffers kept these loops scalar.)
                            let per_element = xhat.iter_mut().zip(g.iter_mut()).zip(dw_sums.iter_mut().zip(db_sums.iter_mut()));
                            for (((xh, gi), (dw, db)), ((&x, &dy), &w)) in per_element.zip(xr.iter().zip(dyr).zip(w)) {
                                *xh = (x - mean) * rstd;
                                *gi = dy * w;
                                *dw += dy * *xh;
                                *db += dy;
                            }
                            let mean_g = lane_sum(&g, &g, |g, _| g) / d as f32;
                            let mean_gx = lane_sum(&g, &xhat, |g, x| g * x) / d as f32;
                            for ((dx, &g), &xh) in dxr.iter_mut().zip(&g).zip(&xhat) {
                                *dx = rstd * (g - mean_g - xh * mean_gx);
                            }
                        }
                    },
                );
                sums
            })
            .collect();
        let tail = &mut out[rows * d..];
        for p in partials {
            for (t, v) in tail.iter_mut().zip(p) {
                *t += v;
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_plain_ops_forward_and_backward() -> Result<()> {
        // Widths below, across and at multiples of the 16 lanes of the row sums.
        for d in [7, 24, 64, 389] {
            matches_plain_ops_at_width(d)?;
        }
        Ok(())
    }

    fn matches_plain_ops_at_width(d: usize) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (3, 37, d), &dev)? + 0.5)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, d, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, d, &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (3, 37, d), &dev)?;
        let fused = fused_layer_norm(&x, &w, &b, 1e-5)?;
        let plain = crate::nn::layer_norm_plain(&x, &w, Some(&b), 1e-5)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
        assert!(diff(&fused, &plain)? < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gp = (plain * &probe)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let diff = diff(gf.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap())?;
            assert!(diff < 1e-4, "width {d}: gradient of {:?} differs by {diff}", v.dims());
        }
        Ok(())
    }
}
