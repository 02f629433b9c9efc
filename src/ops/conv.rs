//! 2-D convolution for training on the CPU as im2col + one matrix product.
//!
//! candle's own CPU conv2d is fine forwards, but its backward pass goes through a direct
//! `conv_transpose2d` loop that is several times slower than the forward. Here the patches are
//! unfolded by [`Im2Col`] (whose backward is the matching fold, [`Col2Im`]) and the product runs
//! in candle's GEMM, so the backward pass is two GEMMs and a fold. Other devices use candle's
//! conv2d, which has real kernels there.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    channels: usize,
    h: usize,
    w: usize,
    k_h: usize,
    k_w: usize,
    padding: usize,
    stride: usize,
    /// A last column of ones per patch, so the bias rides in the matrix product (and its
    /// gradient comes out of the kernel-gradient product instead of a slow strided reduction).
    ones_column: bool,
}

impl Geometry {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k_h) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.k_w) / self.stride + 1
    }
    /// Kernel entries per patch.
    fn taps(&self) -> usize {
        self.channels * self.k_h * self.k_w
    }
    /// Values stored per patch: the taps and, with `ones_column`, a 1.
    fn rows(&self) -> usize {
        self.taps() + self.ones_column as usize
    }
    /// For every (kernel row i, output row oh), the input row read, or None in the padding.
    fn source(&self, i: usize, o: usize, size: usize) -> Option<usize> {
        (o * self.stride + i).checked_sub(self.padding).filter(|&r| r < size)
    }
}

/// (batch, C, H, W) → (batch·out_h·out_w, C·kh·kw): row `n` holds the patch output pixel `n` reads.
/// Patch-major rows make the convolution one tall matrix product for the whole batch, and its
/// kernel gradient one product with a long inner dimension: both shapes GEMM runs well, where
/// per-image products with `out_channels` rows (6 for LeNet's first layer) do not.
struct Im2Col(Geometry);
/// The adjoint of [`Im2Col`]: sums every patch entry back into the pixel it was read from.
struct Col2Im(Geometry);

impl Geometry {
    /// Calls `f(patch index, pixel index)` for every patch entry of one image that reads a real
    /// pixel (not padding); both indices are relative to that image.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize)) {
        let (oh, ow, rows) = (self.out_h(), self.out_w(), self.rows());
        for y in 0..oh {
            for x in 0..ow {
                let patch = (y * ow + x) * rows;
                for c in 0..self.channels {
                    for i in 0..self.k_h {
                        let Some(sy) = self.source(i, y, self.h) else { continue };
                        for j in 0..self.k_w {
                            if let Some(sx) = self.source(j, x, self.w) {
                                f(patch + (c * self.k_h + i) * self.k_w + j, (c * self.h + sy) * self.w + sx);
                            }
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "wick-im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = super::cpu_f32(s, l, "im2col")?;
        let batch = l.dims()[0];
        let pixels = g.out_h() * g.out_w();
        let mut cols = vec![0f32; batch * pixels * g.rows()];
        let image = g.channels * g.h * g.w;
        cols.par_chunks_mut(pixels * g.rows()).enumerate().for_each(|(b, out)| {
            let img = &x[b * image..(b + 1) * image];
            g.for_each_tap(|dst, src| out[dst] = img[src]);
            if g.ones_column {
                out.chunks_mut(g.rows()).for_each(|patch| patch[g.taps()] = 1.0);
            }
        });
        Ok((CpuStorage::F32(cols), Shape::from((batch * pixels, g.rows()))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "wick-col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = super::cpu_f32(s, l, "col2im")?;
        let per_image = g.out_h() * g.out_w() * g.rows();
        let batch = l.dims()[0] * l.dims()[1] / per_image;
        let image = g.channels * g.h * g.w;
        let mut x = vec![0f32; batch * image];
        x.par_chunks_mut(image).enumerate().for_each(|(b, img)| {
            let src = &cols[b * per_image..(b + 1) * per_image];
            g.for_each_tap(|from, to| img[to] += src[from]);
        });
        Ok((CpuStorage::F32(x), Shape::from((batch, g.channels, g.h, g.w))))
    }
}

/// Convolution of `x` (batch, C, H, W) with `kernel` (O, C, kh, kw), plus an optional bias (O),
/// with equal padding on every side and a stride. Differentiable in all its inputs. f32 CPU
/// tensors take the im2col op; others (and `WICK_OPS=reference`) candle's `conv2d`.
pub fn conv2d(x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    if super::fused_path(x.device()) && x.dtype() == DType::F32 && kernel.dtype() == DType::F32 {
        return im2col_conv2d(x, kernel, bias, padding, stride);
    }
    reference_conv2d(x, kernel, bias, padding, stride)
}

/// The same with candle's `conv2d` (other devices and dtypes, and the tests' reference).
///
/// candle's backward pass (a transposed convolution) returns an input gradient short by the
/// rows and columns no window reaches when (size + 2·padding − kernel) is not a multiple of the
/// stride, and then fails on the shape; so with a stride those are cut off first (the padding
/// made explicit), which changes nothing forwards.
pub fn reference_conv2d(x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, k_h, k_w) = kernel.dims4()?;
    // (A kernel larger than the input, or stride 0, is left to candle's own error.)
    let unreached = |size: usize, k: usize| (size + 2 * padding).checked_sub(k).filter(|_| stride > 0).map_or(0, |d| d % stride);
    let (cut_h, cut_w) = (unreached(h, k_h), unreached(w, k_w));
    let out = if cut_h + cut_w > 0 {
        let padded = x.pad_with_zeros(2, padding, padding)?.pad_with_zeros(3, padding, padding)?;
        padded.narrow(2, 0, h + 2 * padding - cut_h)?.narrow(3, 0, w + 2 * padding - cut_w)?.conv2d(kernel, 0, stride, 1, 1)?
    } else {
        x.conv2d(kernel, padding, stride, 1, 1)?
    };
    match bias {
        Some(b) => out.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(out),
    }
}

/// The im2col convolution itself (f32 CPU tensors), whatever the path: what the tests compare.
fn im2col_conv2d(x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let (batch, channels, h, w) = x.dims4()?;
    let (o, c, k_h, k_w) = kernel.dims4()?;
    if c != channels {
        candle_core::bail!("conv2d: input has {channels} channels, the kernel expects {c}")
    }
    if h + 2 * padding < k_h || w + 2 * padding < k_w || stride == 0 {
        candle_core::bail!("conv2d: a {k_h}×{k_w} kernel does not fit a {h}×{w} input with padding {padding}")
    }
    let g = Geometry { channels, h, w, k_h, k_w, padding, stride, ones_column: bias.is_some() };
    let cols = x.contiguous()?.apply_op1(Im2Col(g))?;
    let mut weights = kernel.reshape((o, g.taps()))?.t()?; // (taps, O)
    if let Some(b) = bias {
        weights = Tensor::cat(&[&weights, &b.reshape((1, o))?], 0)?;
    }
    let y = cols.matmul(&weights)?; // (batch·pixels, O)
    y.reshape((batch, g.out_h() * g.out_w(), o))?.transpose(1, 2)?.reshape((batch, o, g.out_h(), g.out_w()))
}

/// A conv layer with candle-nn's `Conv2d` parameter names (`weight`, `bias`) and our conv2d.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    /// Loads `weight` (out, in, k, k) and, when `bias`, `bias` (out).
    pub fn load(vb: candle_nn::VarBuilder, c_in: usize, c_out: usize, k: usize, padding: usize, stride: usize, bias: bool) -> Result<Self> {
        // PyTorch's Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform { lo: -bound, up: bound };
        let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", init)?;
        let bias = if bias { Some(vb.get_with_hints(c_out, "bias", init)?) } else { None };
        Ok(Self { weight, bias, padding, stride })
    }
}

impl Conv2d {
    /// `max_pool2d(relu(self.forward(x)), pool)` as one node on the CPU (see
    /// [`super::conv_pool`]): LeNet's conv block.
    pub fn forward_relu_max_pool(&self, x: &Tensor, pool: usize) -> Result<Tensor> {
        match &self.bias {
            Some(b) => super::conv_pool::conv2d_relu_max_pool(x, &self.weight, b, self.padding, self.stride, pool),
            None => super::pool::max_pool2d(&conv2d(x, &self.weight, None, self.padding, self.stride)?.relu()?, pool),
        }
    }
}

impl candle_nn::Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.bias.as_ref(), self.padding, self.stride)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn matches_candle_conv2d_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        // The last two: (size + 2·padding − kernel) not a multiple of the stride, where candle's
        // own backward pass fails on the shape (see `reference_conv2d`).
        let cases = [(3, 9, 7, 4, 3, 1, 1), (2, 8, 8, 5, 5, 2, 1), (6, 5, 5, 2, 5, 0, 1), (1, 12, 12, 4, 3, 1, 1), (1, 28, 28, 6, 5, 2, 1), (6, 14, 14, 16, 5, 0, 1), (4, 6, 6, 8, 3, 1, 1), (3, 11, 10, 4, 3, 1, 2), (3, 9, 9, 4, 2, 0, 3)];
        for (c, h, w, o, k, pad, stride) in cases {
            let x = Var::randn(0f32, 1.0, (2, c, h, w), &dev)?;
            let k_ = Var::randn(0f32, 1.0, (o, c, k, k), &dev)?;
            let b = Var::randn(0f32, 1.0, o, &dev)?;
            let ours = im2col_conv2d(&x, &k_, Some(&b), pad, stride)?;
            let theirs = reference_conv2d(&x, &k_, Some(&b), pad, stride)?;
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-4);
            let probe = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
            let g1 = (&ours * &probe)?.sum_all()?.backward()?;
            let g2 = (&theirs * &probe)?.sum_all()?.backward()?;
            for v in [&x, &k_, &b] {
                let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(d < 1e-3, "grad diff {d} for shape {:?}", v.dims());
            }
        }
        Ok(())
    }

    #[test]
    fn kernel_gradient_with_an_untracked_input() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 1, 12, 12), &dev)?;
        let k_ = Var::randn(0f32, 1.0, (4, 1, 3, 3), &dev)?;
        let ours = im2col_conv2d(&x, &k_, None, 1, 1)?;
        let theirs = x.conv2d(&k_, 1, 1, 1, 1)?;
        let probe = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
        let g1 = (&ours * &probe)?.sum_all()?.backward()?;
        let g2 = (&theirs * &probe)?.sum_all()?.backward()?;
        let d = max_diff(g1.get(&k_).unwrap(), g2.get(&k_).unwrap());
        assert!(d < 1e-3, "grad diff {d}");
        Ok(())
    }

    #[test]
    fn fold_is_the_adjoint_of_unfold_with_stride() -> Result<()> {
        // <im2col(x), c> == <x, col2im(c)> for any x, c: what makes col2im the right gradient.
        let dev = Device::Cpu;
        let g = Geometry { channels: 2, h: 10, w: 11, k_h: 3, k_w: 3, padding: 1, stride: 2, ones_column: false };
        let x = Tensor::randn(0f32, 1.0, (2, 2, 10, 11), &dev)?;
        let cols = x.apply_op1_no_bwd(&Im2Col(g))?;
        let c = Tensor::randn(0f32, 1.0, cols.shape(), &dev)?;
        let lhs = (&cols * &c)?.sum_all()?.to_scalar::<f32>()?;
        let rhs = (&x * c.apply_op1_no_bwd(&Col2Im(g))?)?.sum_all()?.to_scalar::<f32>()?;
        assert!((lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
        assert_eq!(cols.dims(), &[2 * 5 * 6, 18]);
        Ok(())
    }
}
