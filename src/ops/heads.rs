//! The reshuffles between a transformer's token layout (batch, time, heads·head_dim) and the
//! attention op's head layout (batch, heads, time, head_dim), as one op each way.
//!
//! With candle ops each direction is reshape → transpose → contiguous: three graph nodes, and in
//! the backward pass each node's gradient costs a buffer of its own (candle 0.11.1 as released
//! summed every incoming gradient into a fresh zeros tensor; `vendor/README.md`), so a BERT
//! layer's four reshuffles made about a dozen activation-sized passes backwards. Here each is one copy forwards and the
//! inverse copy backwards (f32 on the CPU; candle ops elsewhere and with `WICK_OPS=reference`).

use super::cpu_f32;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// (batch, time, heads·head_dim) → (batch, heads, time, head_dim), contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    if heads == 0 || hd % heads != 0 {
        candle_core::bail!("split_heads: width {hd} is not a multiple of {heads} heads")
    }
    if super::fused_path(x.device()) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Reshuffle { to_heads: true, heads })
    } else {
        x.reshape((b, t, heads, hd / heads))?.transpose(1, 2)?.contiguous()
    }
}

/// (batch, heads, time, head_dim) → (batch, time, heads·head_dim), contiguous.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    if super::fused_path(x.device()) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Reshuffle { to_heads: false, heads: h })
    } else {
        x.transpose(1, 2)?.reshape((b, t, h * d))
    }
}

#[derive(Clone, Copy)]
struct Reshuffle {
    /// token layout → head layout (else the reverse)
    to_heads: bool,
    heads: usize,
}

impl CustomOp1 for Reshuffle {
    fn name(&self) -> &'static str {
        "wick-reshuffle-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "split/merge heads")?;
        let (b, h) = (l.dims()[0], self.heads);
        let (t, d, shape) = if self.to_heads {
            let (_, t, hd) = l.shape().dims3()?;
            (t, hd / h, Shape::from((b, h, t, hd / h)))
        } else {
            let (_, _, t, d) = l.shape().dims4()?;
            (t, d, Shape::from((b, t, h * d)))
        };
        if x.len() != b * t * h * d {
            candle_core::bail!("split/merge heads: {:?} into {h} heads", l.dims())
        }
        // One task per batch element (b·t·h·d = x.len(), checked above), whose every row of
        // the token layout it reads or writes whole (h·d contiguous floats there, h runs of d
        // in the head layout): so every element of y is written once.
        // SAFETY: as just said.
        let y = unsafe {
            crate::ops::written_once(x.len(), |y| {
                if self.to_heads {
                    // y[b][h][t][:] = x[b][t][h·d..]
                    y.par_chunks_mut(h * t * d).zip(x.par_chunks(t * h * d)).for_each(|(db, sb)| {
                        for (ti, row) in sb.chunks(h * d).enumerate() {
                            for (hi, part) in row.chunks(d).enumerate() {
                                db[(hi * t + ti) * d..][..d].write_copy_of_slice(part);
                            }
                        }
                    });
                } else {
                    y.par_chunks_mut(t * h * d).zip(x.par_chunks(h * t * d)).for_each(|(db, sb)| {
                        for (ti, row) in db.chunks_mut(h * d).enumerate() {
                            for (hi, part) in row.chunks_mut(d).enumerate() {
                                part.write_copy_of_slice(&sb[(hi * t + ti) * d..][..d]);
                            }
                        }
                    });
                }
            })
        };
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Reshuffle { to_heads: !self.to_heads, heads: self.heads };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn both_directions_match_the_candle_ops_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 5, 3 * 4), &dev)?;
        // The op itself (the dispatchers may take the candle ops under WICK_OPS=reference).
        let split = x.apply_op1(Reshuffle { to_heads: true, heads: 3 })?;
        let reference = x.reshape((2, 5, 3, 4))?.transpose(1, 2)?.contiguous()?;
        assert_eq!(split.dims(), &[2, 3, 5, 4]);
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert_eq!(close(&split, &reference)?, 0.0);
        let merged = split.apply_op1(Reshuffle { to_heads: false, heads: 3 })?;
        assert_eq!(close(&merged, &x)?, 0.0);
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
        let g = (split * &probe)?.sum_all()?.backward()?;
        let expected = probe.transpose(1, 2)?.reshape((2, 5, 12))?;
        assert_eq!(close(g.get(&x).unwrap(), &expected)?, 0.0);
        let y = Var::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 5, 12), &dev)?;
        let g = (y.apply_op1(Reshuffle { to_heads: false, heads: 3 })? * &probe)?.sum_all()?.backward()?;
        let expected = probe.reshape((2, 5, 3, 4))?.transpose(1, 2)?;
        assert_eq!(close(g.get(&y).unwrap(), &expected)?, 0.0);
        assert!(split_heads(&x, 5).is_err());
        Ok(())
    }
}
