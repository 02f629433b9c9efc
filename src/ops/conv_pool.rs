//! Convolution + bias + ReLU + k×k max pooling as one autograd node (CPU, f32): LeNet's block.
//!
//! Forwards, per image (images in parallel): the padded image is unfolded into patch rows
//! (P pixels × (C·kh·kw taps + a ones column that carries the bias)), one GEMM with the kernel
//! gives the (P × O) convolution in a cache-sized scratch buffer, and the epilogue pools each
//! channel's windows, applies ReLU and records which pixel won. Only the pooled output (a
//! quarter of the convolution for 2×2 pooling) is written as a tensor; the patch rows and the
//! winners are kept in the op for the backward pass.
//!
//! Backwards: ReLU after pooling passes a window's gradient only to its winner, and only when the
//! pooled value is positive. So the kernel gradient is a sum over windows of `g · patch row`
//! (one short axpy per window, bias included through the ones column) instead of a dense
//! (O × P) · (P × taps) product that is three quarters zeros, and the input gradient adds
//! `g · kernel row` into the winner's patch row before folding the patches back onto the image
//! (skipped when the input is untracked, as for the first layer). Per step this replaces six
//! graph nodes (unfold, product, transpose, ReLU, pool, reshape), each with an activation-sized
//! gradient buffer, by one.
//!
//! Gradients follow PyTorch's `max_pool2d(relu(conv2d(x)))`: the first maximum of a window wins,
//! NaN wins over numbers, and an output of exactly 0 passes no gradient.

use super::gemm::{matmul_serial, View};
use crate::cpu::Isa;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Marks a window whose pooled output is ≤ 0: ReLU stops its gradient.
const BLOCKED: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    channels: usize,
    h: usize,
    w: usize,
    out_channels: usize,
    k_h: usize,
    k_w: usize,
    padding: usize,
    stride: usize,
    pool: usize,
}

impl Geometry {
    fn padded_h(&self) -> usize {
        self.h + 2 * self.padding
    }
    fn padded_w(&self) -> usize {
        self.w + 2 * self.padding
    }
    fn out_h(&self) -> usize {
        (self.padded_h() - self.k_h) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.padded_w() - self.k_w) / self.stride + 1
    }
    fn pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }
    fn taps(&self) -> usize {
        self.channels * self.k_h * self.k_w
    }
    /// Values per patch row: the taps and a 1 for the bias.
    fn row(&self) -> usize {
        self.taps() + 1
    }
    /// Distance between patch rows: `row` rounded up to whole 8-lane vectors, so the backward
    /// pass accumulates rows in full vectors (the padding is never read as data).
    fn row_stride(&self) -> usize {
        self.row().next_multiple_of(8)
    }
    fn pooled_h(&self) -> usize {
        self.out_h() / self.pool
    }
    fn pooled_w(&self) -> usize {
        self.out_w() / self.pool
    }
    fn windows(&self) -> usize {
        self.pooled_h() * self.pooled_w()
    }
    fn image(&self) -> usize {
        self.channels * self.h * self.w
    }

    /// Copies one image into the interior of `padded` (whose border stays zero).
    fn pad(&self, image: &[f32], padded: &mut [f32]) {
        let (pw, p) = (self.padded_w(), self.padding);
        for c in 0..self.channels {
            for y in 0..self.h {
                let dst = (c * self.padded_h() + y + p) * pw + p;
                padded[dst..dst + self.w].copy_from_slice(&image[(c * self.h + y) * self.w..][..self.w]);
            }
        }
    }

    /// Patch rows of one padded image: row `p` holds pixel `p`'s taps in (c, i, j) order (the
    /// kernel's own order) and a 1.
    fn unfold(&self, padded: &[f32], cols: &mut [f32]) {
        let (pw, ow, row) = (self.padded_w(), self.out_w(), self.row());
        for (p, patch) in cols.chunks_exact_mut(self.row_stride()).enumerate() {
            let (y, x) = ((p / ow) * self.stride, (p % ow) * self.stride);
            for c in 0..self.channels {
                for i in 0..self.k_h {
                    let src = (c * self.padded_h() + y + i) * pw + x;
                    let dst = (c * self.k_h + i) * self.k_w;
                    copy_run(&mut patch[dst..dst + self.k_w], &padded[src..src + self.k_w]);
                }
            }
            patch[row - 1] = 1.0;
        }
    }

    /// The adjoint of [`Self::unfold`] without the ones column: adds every patch entry of
    /// `dcols` (P × taps) into the padded pixel it was read from.
    fn fold(&self, dcols: &[f32], dpadded: &mut [f32]) {
        let (pw, ow, taps) = (self.padded_w(), self.out_w(), self.taps());
        for (p, patch) in dcols.chunks_exact(taps).enumerate() {
            let (y, x) = ((p / ow) * self.stride, (p % ow) * self.stride);
            for c in 0..self.channels {
                for i in 0..self.k_h {
                    let dst = (c * self.padded_h() + y + i) * pw + x;
                    let src = (c * self.k_h + i) * self.k_w;
                    add_run(&mut dpadded[dst..dst + self.k_w], &patch[src..src + self.k_w]);
                }
            }
        }
    }

    /// Pools one image's convolution `conv` (P × O): writes ReLU(window max) per channel and
    /// window to `pooled` (O × windows) and the winning pixel (or [`BLOCKED`]) to `winners`.
    #[inline(always)]
    fn pool_relu(&self, conv: &[f32], pooled: &mut [f32], winners: &mut [u32]) {
        let (o_n, ow, k, pw, windows) = (self.out_channels, self.out_w(), self.pool, self.pooled_w(), self.windows());
        for q in 0..windows {
            let first = (q / pw) * k * ow + (q % pw) * k;
            for o in 0..o_n {
                let (mut best, mut at) = (conv[first * o_n + o], first as u32);
                for i in 0..k {
                    for j in 0..k {
                        let p = first + i * ow + j;
                        let v = conv[p * o_n + o];
                        // The first maximum wins; NaN beats numbers (it must not vanish). Bit
                        // masks, not branches: on real data the comparison is a coin toss, and
                        // a mispredicted branch per element cost more than the rest of the op.
                        #[allow(clippy::eq_op)]
                        let take = (v > best) as u32 | ((v != v) as u32 & (best == best) as u32);
                        let mask = take.wrapping_neg();
                        best = f32::from_bits((v.to_bits() & mask) | (best.to_bits() & !mask));
                        at = (p as u32 & mask) | (at & !mask);
                    }
                }
                // `best <= 0` is false for NaN: NaN stays and passes its gradient, as in PyTorch.
                let blocked = best <= 0.0;
                pooled[o * windows + q] = if blocked { 0.0 } else { best };
                winners[o * windows + q] = if blocked { BLOCKED } else { at };
            }
        }
    }
}

/// [`Geometry::pool_relu`] compiled for AVX2 (the channel loop in 8-lane vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pool_relu_avx2(g: &Geometry, conv: &[f32], pooled: &mut [f32], winners: &mut [u32]) {
    g.pool_relu(conv, pooled, winners)
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// Patch rows of the whole batch (batch·P × row).
    cols: Vec<f32>,
    /// Winning pixel per (image, channel, window), or [`BLOCKED`].
    winners: Vec<u32>,
}

/// Patch buffers of finished steps, for the next forward pass. They are megabytes (10 MB for
/// LeNet's first layer at batch 128); a fresh one each step is fresh pages from the OS, which
/// the kernel zero-fills page by page: that cost more than the unfold that fills them.
static SPARE_COLS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
/// Kept at most: one per conv block of a small network.
const MAX_SPARE: usize = 4;

/// A buffer of `len` elements with unspecified (but initialised) contents.
fn take_cols(len: usize) -> Vec<f32> {
    let mut spare = SPARE_COLS.lock().unwrap_or_else(|e| e.into_inner());
    let mut buf = match spare.iter().position(|b| b.capacity() >= len) {
        Some(i) => spare.swap_remove(i),
        None => spare.pop().unwrap_or_default(),
    };
    drop(spare);
    buf.resize(len, 0.0);
    buf
}

impl Drop for Saved {
    fn drop(&mut self) {
        let mut spare = SPARE_COLS.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < MAX_SPARE {
            spare.push(std::mem::take(&mut self.cols));
        }
    }
}

struct ConvReluPool {
    g: Geometry,
    level: Isa,
    saved: Mutex<Option<Arc<Saved>>>,
}

/// (x, W, dY) → one flat buffer [dX (only with `need_dx`) | dW | db].
struct ConvReluPoolBackward {
    g: Geometry,
    level: Isa,
    saved: Arc<Saved>,
    need_dx: bool,
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    super::cpu_f32(s, l, "conv2d_relu_max_pool")
}

impl CustomOp3 for ConvReluPool {
    fn name(&self) -> &'static str {
        "wick-conv2d-relu-max-pool"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let (x, w, b) = (f32s(xs, xl)?, f32s(ws, wl)?, f32s(bs, bl)?);
        let batch = xl.dims()[0];
        let (row, pixels, o_n, windows) = (g.row(), g.pixels(), g.out_channels, g.windows());
        // [W | b]: row o is output channel o's taps and bias, matching the patch rows.
        let mut kernel = Vec::with_capacity(o_n * row);
        for o in 0..o_n {
            kernel.extend_from_slice(&w[o * g.taps()..(o + 1) * g.taps()]);
            kernel.push(b[o]);
        }
        // Every entry is written by `unfold`: a recycled buffer needs no clearing.
        let mut cols = take_cols(batch * pixels * g.row_stride());
        let mut pooled = vec![0f32; batch * o_n * windows];
        let mut winners = vec![0u32; batch * o_n * windows];
        let scratch = || (vec![0f32; g.channels * g.padded_h() * g.padded_w()], vec![0f32; pixels * o_n]);
        cols.par_chunks_mut(pixels * g.row_stride())
            .zip(pooled.par_chunks_mut(o_n * windows).zip(winners.par_chunks_mut(o_n * windows)))
            .zip(x.par_chunks(g.image()))
            .try_for_each_init(scratch, |(padded, conv), ((cols, (pooled, winners)), image)| -> Result<()> {
                g.pad(image, padded);
                g.unfold(padded, cols);
                matmul_serial(conv, o_n, pixels, o_n, row, View::rows(cols, g.row_stride()), View::transposed(&kernel, row), false)?;
                match self.level {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `level` is at least AVX2 only when the CPU has AVX2 (crate::cpu).
                    Isa::Avx2 | Isa::Avx512 => unsafe { pool_relu_avx2(&g, conv, pooled, winners) },
                    _ => g.pool_relu(conv, pooled, winners),
                }
                Ok(())
            })?;
        *self.saved.lock().unwrap() = Some(Arc::new(Saved { cols, winners }));
        Ok((CpuStorage::F32(pooled), Shape::from((batch, o_n, g.pooled_h(), g.pooled_w()))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.lock().unwrap().clone() else {
            candle_core::bail!("conv2d_relu_max_pool: backward without a CPU forward pass")
        };
        let need_dx = x.track_op();
        let op = ConvReluPoolBackward { g: self.g, level: self.level, saved, need_dx };
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let dx_len = if need_dx { x.elem_count() } else { 0 };
        let dw = packed.narrow(0, dx_len, w.elem_count())?.reshape(w.shape())?;
        let db = packed.narrow(0, dx_len + w.elem_count(), b.elem_count())?;
        let dx = if need_dx { Some(packed.narrow(0, 0, dx_len)?.reshape(x.shape())?) } else { None };
        Ok((dx, Some(dw), Some(db)))
    }
}

impl CustomOp3 for ConvReluPoolBackward {
    fn name(&self) -> &'static str {
        "wick-conv2d-relu-max-pool-backward"
    }

    fn cpu_fwd(&self, _xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, level, saved) = (self.g, self.level, &self.saved);
        let (w, dy) = (f32s(ws, wl)?, f32s(gs, gl)?);
        let batch = xl.dims()[0];
        let (row, taps, o_n, windows) = (g.row(), g.taps(), g.out_channels, g.windows());
        if dy.len() != batch * o_n * windows || saved.winners.len() != dy.len() || w.len() != o_n * taps {
            candle_core::bail!("conv2d_relu_max_pool backward: gradient {:?} does not fit the forward pass", gl.dims())
        }
        // Images in a fixed number of contiguous groups, one partial [dW | db] each, summed in
        // order: the result does not depend on how rayon schedules the groups.
        let groups = candle_core::utils::get_num_threads().clamp(1, batch.max(1));
        let per_group = batch.div_ceil(groups.max(1)).max(1);
        let dx_len = if self.need_dx { batch * g.image() } else { 0 };
        let mut out = vec![0f32; dx_len + o_n * taps + o_n];
        let (dx, dwb) = out.split_at_mut(dx_len);
        let mut dx_groups: Vec<&mut [f32]> = if self.need_dx { dx.chunks_mut(per_group * g.image()).collect() } else { Vec::new() };
        dx_groups.resize_with(batch.div_ceil(per_group), || &mut []);
        let partials = dx_groups
            .into_par_iter()
            .enumerate()
            .map(|(group, dx)| {
                let images = group * per_group..((group + 1) * per_group).min(batch);
                match level {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `level` is at least AVX2 only when the CPU has AVX2 and FMA (crate::cpu).
                    Isa::Avx2 | Isa::Avx512 => unsafe { self.images_avx2(images, w, dy, dx) },
                    _ => self.images::<false>(images, w, dy, dx),
                }
            })
            .collect::<Vec<_>>();
        let stride = g.row_stride();
        let mut dkernel = vec![0f32; o_n * stride];
        for p in partials {
            dkernel.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
        // [dW | db] from the (O × row_stride) [dW_o | db_o | padding] rows.
        let (dw, db) = dwb.split_at_mut(o_n * taps);
        for o in 0..o_n {
            dw[o * taps..(o + 1) * taps].copy_from_slice(&dkernel[o * stride..o * stride + taps]);
            db[o] = dkernel[o * stride + taps];
        }
        Ok((CpuStorage::F32(out), Shape::from(dx_len + o_n * row)))
    }
}

/// Copies one kernel row's worth of values. Kernel rows are a few values long: a `memcpy` call
/// per row (what `copy_from_slice` of a run-time length becomes) costs more than the copy, so
/// the usual widths get fixed-size copies the compiler turns into a few moves.
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
        let (d, s): (&mut [f32; N], &[f32; N]) = (dst.try_into().unwrap(), src.try_into().unwrap());
        for i in 0..N {
            d[i] = s[i];
        }
    }
    match dst.len() {
        3 => fixed::<3>(dst, src),
        5 => fixed::<5>(dst, src),
        7 => fixed::<7>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

/// `dst += src` for one kernel row (fixed sizes as in [`copy_run`]).
#[inline(always)]
fn add_run(dst: &mut [f32], src: &[f32]) {
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
        let (d, s): (&mut [f32; N], &[f32; N]) = (dst.try_into().unwrap(), src.try_into().unwrap());
        for i in 0..N {
            d[i] += s[i];
        }
    }
    match dst.len() {
        3 => fixed::<3>(dst, src),
        5 => fixed::<5>(dst, src),
        7 => fixed::<7>(dst, src),
        _ => dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s),
    }
}

impl ConvReluPoolBackward {
    /// The backward pass of `images` (dX into `dx`, which starts at the first of them); returns
    /// their [dW_o | db_o] rows. `FMA`: the axpys use fused multiply-add (AVX2 build only).
    #[inline(always)]
    fn images<const FMA: bool>(&self, images: std::ops::Range<usize>, w: &[f32], dy: &[f32], dx: &mut [f32]) -> Vec<f32> {
        let (g, saved) = (&self.g, &self.saved);
        let (stride, taps, pixels, o_n, windows) = (g.row_stride(), g.taps(), g.pixels(), g.out_channels, g.windows());
        let mut dkernel = vec![0f32; o_n * stride];
        let mut dcols = vec![0f32; if self.need_dx { pixels * taps } else { 0 }];
        let mut dpadded = vec![0f32; if self.need_dx { g.channels * g.padded_h() * g.padded_w() } else { 0 }];
        let mut passing: Vec<(u32, f32)> = Vec::with_capacity(windows);
        for (n, img) in images.enumerate() {
            let cols = &saved.cols[img * pixels * stride..(img + 1) * pixels * stride];
            let grads = &dy[img * o_n * windows..(img + 1) * o_n * windows];
            let winners = &saved.winners[img * o_n * windows..(img + 1) * o_n * windows];
            if self.need_dx {
                dcols.fill(0.0);
            }
            for o in 0..o_n {
                passing.clear();
                let ws = winners[o * windows..(o + 1) * windows].iter().zip(&grads[o * windows..(o + 1) * windows]);
                passing.extend(ws.filter(|(&p, _)| p != BLOCKED).map(|(&p, &gv)| (p, gv)));
                // dW_o (and db_o, the ones column) = Σ g · patch row, 32 lanes at a time with
                // the sums in registers; stride is a multiple of 8, so every block is whole.
                let dk = &mut dkernel[o * stride..(o + 1) * stride];
                let mut start = 0;
                while start < stride {
                    match stride - start {
                        8 => gather_rows::<FMA, 8>(dk, cols, stride, start, &passing),
                        16 => gather_rows::<FMA, 16>(dk, cols, stride, start, &passing),
                        24 => gather_rows::<FMA, 24>(dk, cols, stride, start, &passing),
                        _ => gather_rows::<FMA, 32>(dk, cols, stride, start, &passing),
                    }
                    start += 32;
                }
                if self.need_dx {
                    let w_o = &w[o * taps..(o + 1) * taps];
                    for &(p, gv) in &passing {
                        let p = p as usize;
                        axpy::<FMA>(&mut dcols[p * taps..(p + 1) * taps], gv, w_o);
                    }
                }
            }
            if self.need_dx {
                dpadded.fill(0.0);
                g.fold(&dcols, &mut dpadded);
                crop(g, &dpadded, &mut dx[n * g.image()..(n + 1) * g.image()]);
            }
        }
        dkernel
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn images_avx2(&self, images: std::ops::Range<usize>, w: &[f32], dy: &[f32], dx: &mut [f32]) -> Vec<f32> {
        self.images::<true>(images, w, dy, dx)
    }
}

/// The interior of a padded image.
fn crop(g: &Geometry, padded: &[f32], image: &mut [f32]) {
    let (pw, p) = (g.padded_w(), g.padding);
    for c in 0..g.channels {
        for y in 0..g.h {
            let src = (c * g.padded_h() + y + p) * pw + p;
            image[(c * g.h + y) * g.w..][..g.w].copy_from_slice(&padded[src..src + g.w]);
        }
    }
}

/// `dk[start..start + W] += Σ g · cols[p·stride + start..][..W]` over the (p, g) pairs, with the
/// W sums held in registers (W/8 independent vector chains) instead of in `dk`.
#[inline(always)]
fn gather_rows<const FMA: bool, const W: usize>(dk: &mut [f32], cols: &[f32], stride: usize, start: usize, passing: &[(u32, f32)]) {
    let mut acc = [0f32; W];
    for &(p, g) in passing {
        let src: &[f32; W] = cols[p as usize * stride + start..][..W].try_into().unwrap();
        for i in 0..W {
            acc[i] = if FMA { g.mul_add(src[i], acc[i]) } else { acc[i] + g * src[i] };
        }
    }
    for (d, a) in dk[start..start + W].iter_mut().zip(acc) {
        *d += a;
    }
}

/// `dst += a · src`, with one rounding per element when `FMA` (compiled for FMA only).
#[inline(always)]
fn axpy<const FMA: bool>(dst: &mut [f32], a: f32, src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = if FMA { a.mul_add(s, *d) } else { *d + a * s };
    }
}

/// `max_pool2d(relu(conv2d(x, kernel) + bias), pool)`, with `padding` on every side and a
/// stride; differentiable in all three inputs. CPU f32 takes the fused op, everything else
/// (and `WICK_OPS=reference`) the composition of [`super::conv::conv2d`], ReLU and
/// [`super::pool::max_pool2d`].
pub fn conv2d_relu_max_pool(x: &Tensor, kernel: &Tensor, bias: &Tensor, padding: usize, stride: usize, pool: usize) -> Result<Tensor> {
    let fused = super::fused_path(x.device()) && [x.dtype(), kernel.dtype(), bias.dtype()].iter().all(|&d| d == DType::F32);
    if !fused {
        return reference(x, kernel, bias, padding, stride, pool);
    }
    conv2d_relu_max_pool_at(crate::cpu::isa(), x, kernel, bias, padding, stride, pool)
}

/// The fused op itself (f32 CPU tensors) with the kernel level given: tests run every level the
/// CPU has, whatever the path.
fn conv2d_relu_max_pool_at(level: Isa, x: &Tensor, kernel: &Tensor, bias: &Tensor, padding: usize, stride: usize, pool: usize) -> Result<Tensor> {
    let (_, channels, h, w) = x.dims4()?;
    let (out_channels, c, k_h, k_w) = kernel.dims4()?;
    if c != channels || bias.dims1()? != out_channels || [channels, h, w, out_channels].contains(&0) {
        candle_core::bail!("conv2d_relu_max_pool: input {:?}, kernel {:?}, bias {:?} do not fit", x.dims(), kernel.dims(), bias.dims())
    }
    if h + 2 * padding < k_h || w + 2 * padding < k_w || stride == 0 || pool == 0 {
        candle_core::bail!("conv2d_relu_max_pool: a {k_h}×{k_w} kernel (stride {stride}) does not fit a {h}×{w} input with padding {padding}")
    }
    let g = Geometry { channels, h, w, out_channels, k_h, k_w, padding, stride, pool };
    if g.pooled_h() == 0 || g.pooled_w() == 0 {
        candle_core::bail!("conv2d_relu_max_pool: a {pool}×{pool} window does not fit the {}×{} convolution", g.out_h(), g.out_w())
    }
    let op = ConvReluPool { g, level, saved: Mutex::new(None) };
    x.contiguous()?.apply_op3(&kernel.contiguous()?, &bias.contiguous()?, op)
}

/// The composition with separate ops (other devices and dtypes, and the tests' reference).
pub fn reference(x: &Tensor, kernel: &Tensor, bias: &Tensor, padding: usize, stride: usize, pool: usize) -> Result<Tensor> {
    super::pool::max_pool2d(&super::conv::conv2d(x, kernel, Some(bias), padding, stride)?.relu()?, pool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    use crate::cpu::available_levels as levels;

    #[test]
    fn matches_the_composition_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, C, H, W, O, k, padding, stride, pool): LeNet's two blocks, odd sizes with a
        // dropped remainder, a stride, a 3×3 pool.
        let cases = [
            (3, 1, 28, 28, 6, 5, 2, 1, 2),
            (2, 6, 14, 14, 16, 5, 0, 1, 2),
            (2, 3, 9, 7, 4, 3, 1, 1, 2),
            (1, 2, 11, 10, 5, 3, 1, 2, 2),
            (2, 2, 8, 8, 3, 3, 0, 1, 3),
        ];
        for level in levels() {
            for (n, c, h, w, o, k, pad, stride, pool) in cases {
                let x = Var::randn(0f32, 1.0, (n, c, h, w), &dev)?;
                let kernel = Var::randn(0f32, 0.5, (o, c, k, k), &dev)?;
                let bias = Var::randn(0f32, 0.5, o, &dev)?;
                let ours = conv2d_relu_max_pool_at(level, &x, &kernel, &bias, pad, stride, pool)?;
                let theirs = reference(&x, &kernel, &bias, pad, stride, pool)?;
                assert_eq!(ours.dims(), theirs.dims());
                assert!(max_diff(&ours, &theirs) < 1e-4);
                let probe = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
                let g1 = (&ours * &probe)?.sum_all()?.backward()?;
                let g2 = (&theirs * &probe)?.sum_all()?.backward()?;
                for v in [&x, &kernel, &bias] {
                    let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
                    assert!(d < 1e-3, "{level:?} {:?}: grad diff {d} for {:?}", (n, c, h, w, o, k, pad, stride, pool), v.dims());
                }
            }
        }
        Ok(())
    }

    #[test]
    fn untracked_input_gets_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 1, 12, 12), &dev)?;
        let kernel = Var::randn(0f32, 0.5, (4, 1, 3, 3), &dev)?;
        let bias = Var::randn(0f32, 0.5, 4, &dev)?;
        let ours = conv2d_relu_max_pool_at(crate::cpu::isa(), &x, &kernel, &bias, 1, 1, 2)?;
        let theirs = reference(&x, &kernel, &bias, 1, 1, 2)?;
        let g1 = ours.sum_all()?.backward()?;
        let g2 = theirs.sum_all()?.backward()?;
        assert!(g1.get(&x).is_none());
        for v in [&kernel, &bias] {
            assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-3);
        }
        Ok(())
    }

    #[test]
    fn ties_go_to_the_first_maximum_nan_wins_and_zero_passes_nothing() -> Result<()> {
        let dev = Device::Cpu;
        // A 1×1 kernel of weight 1 and bias 0 makes the convolution the input itself.
        let kernel = Var::from_tensor(&Tensor::ones((1, 1, 1, 1), DType::F32, &dev)?)?;
        let bias = Var::from_tensor(&Tensor::zeros(1, DType::F32, &dev)?)?;
        let nan = f32::NAN;
        // Windows: a tie at 2 (first wins), NaN beside a larger number, all negative, max exactly 0.
        let x = Var::from_tensor(&Tensor::new(&[[[[2f32, 2., 5., nan, -1., -2., 0., -3.], [1., 2., 1., 1., -3., -4., -1., -1.]]]], &dev)?)?;
        let y = conv2d_relu_max_pool_at(crate::cpu::isa(), &x, &kernel, &bias, 0, 1, 2)?;
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(v[0], 2.0);
        assert!(v[1].is_nan());
        assert_eq!(&v[2..], &[0.0, 0.0]);
        let probe = Tensor::new(&[[[[10f32, 20., 30., 40.]]]], &dev)?;
        let g = (y * probe)?.sum_all()?.backward()?;
        let dx = g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let mut want = vec![0f32; 16];
        want[0] = 10.0; // the first of the two 2s
        want[3] = 20.0; // NaN beat 5
        assert_eq!(dx, want);
        Ok(())
    }
}
