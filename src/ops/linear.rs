//! A linear layer as one autograd node: `y = x·Wᵀ + b` (PyTorch `Linear`, W is (out, in)) or
//! `y = x·W + b` (GPT-2's `Conv1D`, W is (in, out)).
//!
//! Why not `x.matmul(&w.t())?.broadcast_add(&b)`: in candle that is three graph nodes, and its
//! backward adds the weight gradient through a transposed (strided) view and reduces the bias
//! gradient over a strided dimension, both slow on the CPU, and each node's gradient costs a
//! zero-filled buffer plus an add. Here the forward is one GEMM with the bias preloaded into the
//! output, and the backward is three GEMMs whose results come out contiguous in the weight's own
//! layout (the bias gradient is `1ᵀ·dY`).

use super::cpu_f32;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// How the weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// (out, in), as `torch.nn.Linear`.
    OutIn,
    /// (in, out), as GPT-2's `Conv1D`.
    InOut,
}

/// `x` (..., in) → (..., out). Differentiable in `x`, `weight` and `bias`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let fused = x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    match bias {
        Some(b) if fused && b.dtype() == DType::F32 => x.contiguous()?.apply_op3(&weight.contiguous()?, &b.contiguous()?, Linear(layout)),
        _ => reference_linear(x, weight, bias, layout),
    }
}

/// The same with plain candle ops (other devices and dtypes, and the tests' reference).
pub fn reference_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let d_in = x.dim(D::Minus1)?;
    let w = match layout {
        WeightLayout::OutIn => weight.t()?,
        WeightLayout::InOut => weight.clone(),
    };
    let mut dims = x.dims().to_vec();
    let y = x.reshape(((), d_in))?.matmul(&w)?;
    *dims.last_mut().unwrap() = y.dim(1)?;
    let y = y.reshape(dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A linear layer's parameters (checkpoint names `weight`, `bias`) and their layout.
#[derive(Clone, Debug)]
pub struct Dense {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub layout: WeightLayout,
}

impl Dense {
    pub fn new(weight: Tensor, bias: Option<Tensor>, layout: WeightLayout) -> Self {
        Self { weight, bias, layout }
    }
}

impl candle_core::Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref(), self.layout)
    }
}

struct Linear(WeightLayout);

impl Linear {
    /// (in, out) of the weight.
    fn dims(&self, w: &Layout) -> Result<(usize, usize)> {
        let (a, b) = w.shape().dims2()?;
        Ok(match self.0 {
            WeightLayout::OutIn => (b, a),
            WeightLayout::InOut => (a, b),
        })
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "wick-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d_in, d_out) = self.dims(wl)?;
        let x = cpu_f32(xs, xl, "linear")?;
        let w = cpu_f32(ws, wl, "linear")?;
        let b = cpu_f32(bs, bl, "linear")?;
        let x_in = *xl.shape().dims().last().unwrap_or(&0);
        if x_in != d_in || b.len() != d_out {
            candle_core::bail!("linear: input {:?}, weight {:?} ({:?}), bias {:?} do not fit", xl.dims(), wl.dims(), self.0, bl.dims())
        }
        let rows = x.len() / d_in.max(1);
        let mut y: Vec<f32> = Vec::with_capacity(rows * d_out);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        // Element (k, j) of the right operand is W[j, k] (OutIn) or W[k, j] (InOut).
        let (rhs_cs, rhs_rs) = match self.0 {
            WeightLayout::OutIn => (d_in as isize, 1),
            WeightLayout::InOut => (1, d_out as isize),
        };
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        if rows > 0 && d_out > 0 {
            // SAFETY: the pointers cover rows×d_in, d_in×d_out and rows×d_out f32 elements with
            // the strides given; y is written only through dst.
            unsafe {
                gemm::gemm(
                    rows,
                    d_out,
                    d_in,
                    y.as_mut_ptr(),
                    1,
                    d_out as isize,
                    true, // y = 1·y (the bias rows) + 1·x·W
                    x.as_ptr(),
                    1,
                    d_in as isize,
                    w.as_ptr(),
                    rhs_cs,
                    rhs_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = d_out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_in = x.dim(D::Minus1)?;
        let d_out = b.dim(0)?;
        let g = grad.reshape(((), d_out))?;
        let x2 = x.reshape(((), d_in))?;
        let (dx, dw) = match self.0 {
            WeightLayout::OutIn => (g.matmul(w)?, g.t()?.matmul(&x2)?),
            WeightLayout::InOut => (g.matmul(&w.t()?)?, x2.t()?.matmul(&g)?),
        };
        let ones = Tensor::ones((1, g.dim(0)?), DType::F32, g.device())?;
        let db = ones.matmul(&g)?.reshape(d_out)?;
        Ok((Some(dx.reshape(x.shape())?), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn matches_plain_ops_forward_and_backward_in_both_layouts() -> Result<()> {
        let dev = Device::Cpu;
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5, 7), &dev)?)?;
            let shape = if layout == WeightLayout::OutIn { (3, 7) } else { (7, 3) };
            let w = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1., 3, &dev)?)?;
            let probe = Tensor::randn(0f32, 1., (2, 5, 3), &dev)?;
            let fused = linear(&x, &w, Some(&b), layout)?;
            let plain = reference_linear(&x, &w, Some(&b), layout)?;
            assert!(max_diff(&fused, &plain) < 1e-5);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gp = (plain * &probe)?.sum_all()?.backward()?;
            for v in [&x, &w, &b] {
                let (a, r) = (gf.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap());
                assert!(max_diff(a, r) < 1e-4, "{layout:?} {:?}", v.dims());
            }
        }
        Ok(())
    }
}
