//! A whole LSTM layer (every time step, forwards and backwards through time) as one op on the
//! CPU in f32, the way cuDNN and oneDNN run it.
//!
//! Algorithm (B batch rows, T steps, I inputs, H hidden units, gates i, f, g, o as PyTorch):
//! - Forward: the input part of every step's gates in ONE GEMM, bias + X·W_ihᵀ ((B·T) × I by
//!   I × 4H); then per step gates_t += h_{t−1}·W_hhᵀ (B × H by H × 4H) and the elementwise cell
//!   ([`cell`]). The activated gates, c_t, tanh c_t and [x_t | h_{t−1}] are kept for the backward
//!   pass (8·B·T·H floats at I = H), so nothing is recomputed.
//! - Backward: back through time only the truly sequential part: d gates_t from dh_t and dc_t,
//!   then dh_{t−1} = d gates_t·W_hh (one GEMM a step). The weight gradient of all steps is then
//!   ONE GEMM, [dW_ih | dW_hh] = d Gatesᵀ·[X | H_prev] (4H × (I + H), inner size B·T), dX =
//!   d Gates·W_ih one more, and d bias the column sums of d Gates, which the cell kernel adds up
//!   while the rows are in cache.
//! - Threads: batch rows are independent through time, so the rows are split into one block per
//!   thread and each thread runs its block through all steps with single-threaded GEMMs: one
//!   fork-join per pass instead of one around every step's small GEMM (2·T a training step).
//!   Only the all-steps weight-gradient GEMM runs on all threads at once.
//!
//! Memory traffic: per step and block, W_hh (16·H² bytes, 1 MB at H = 256) streams from L2/L3
//! once forwards and once backwards; everything else is the block's own rows, touched a few
//! times each. W_hh is copied once per pass, transposed (H × 4H) for the forward pass, so that
//! gemm reads it column-major without packing it again at every step, and with rows padded by
//! one cache line: at a row stride of 4 KB (4H = 1024) every row of a column block would fall
//! into the same L1 set. Large buffers are reused from step to step ([`buffers`]).
//!
//! Why one op: with candle ops the layer is a dozen graph nodes a step forwards and more
//! backwards, each allocating (with zero-filled gradient buffers and adds in candle 0.11.1 as
//! released), and the weight gradient arrives as T small GEMMs added one by one.
//!
//! Interface: candle's custom ops take at most three tensors, so the op takes x (B, T, I),
//! W = [W_ih | W_hh] (4H, I + H) and aux = [b_ih + b_hh (4H) | h0 (B·H) | c0 (B·H)], made by
//! small concatenations whose backward passes split the gradients again, and returns
//! [h of every step (B·T·H) | c_T (B·H)] flat. The saved activations live in the op, not in its
//! output: as an output, candle would give them a gradient as large as themselves.

use super::cpu_f32;
use crate::cpu::Isa;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use crate::ops::gemm::View;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

mod buffers;
mod cell;

/// An LSTM layer's parameters in PyTorch's layout: w_ih (4H, I), w_hh (4H, H), b_ih, b_hh (4H).
#[derive(Clone, Copy, Debug)]
pub struct LstmWeights<'a> {
    pub w_ih: &'a Tensor,
    pub w_hh: &'a Tensor,
    pub b_ih: &'a Tensor,
    pub b_hh: &'a Tensor,
}

/// Runs x (B, T, I) through one layer from the state (h0, c0) (each (B, H), zeros when `None`).
/// Returns the hidden state of every step (B, T, H) and the final h and c (B, H), all
/// differentiable in every input. CPU f32 runs the fused op; other devices and dtypes, and
/// `WICK_OPS=reference`, run [`lstm_layer_ops`].
pub fn lstm_layer(x: &Tensor, w: LstmWeights, h0: Option<&Tensor>, c0: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
    let tensors = [x, w.w_ih, w.w_hh, w.b_ih, w.b_hh].into_iter().chain(h0).chain(c0);
    if tensors.clone().all(|t| super::fused_path(t.device()) && t.dtype() == DType::F32) {
        fused_lstm_layer(x, w, h0, c0, Kernel { isa: crate::cpu::isa(), threads: candle_core::utils::get_num_threads() })
    } else {
        lstm_layer_ops(x, w, h0, c0)
    }
}

/// The same with candle ops, one step at a time (any device and dtype; the tests' reference).
pub fn lstm_layer_ops(x: &Tensor, w: LstmWeights, h0: Option<&Tensor>, c0: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, _) = x.dims3()?;
    let hidden = w.w_hh.dim(1)?;
    let zeros = || Tensor::zeros((b, hidden), x.dtype(), x.device());
    let mut h = h0.map_or_else(zeros, |h| Ok(h.clone()))?;
    let mut c = c0.map_or_else(zeros, |c| Ok(c.clone()))?;
    let (w_ih_t, w_hh_t) = (w.w_ih.t()?, w.w_hh.t()?);
    let bias = (w.b_ih + w.b_hh)?;
    let mut outputs = Vec::with_capacity(t);
    for step in 0..t {
        let x_t = x.narrow(1, step, 1)?.squeeze(1)?;
        let gates = (x_t.matmul(&w_ih_t)? + h.matmul(&w_hh_t)?)?.broadcast_add(&bias)?;
        (h, c) = super::lstm::lstm_cell_ops(&gates, &c)?;
        outputs.push(h.clone());
    }
    Ok((Tensor::stack(&outputs, 1)?, h, c))
}

/// The instruction-set level of the cell kernels and the number of row blocks (threads).
#[derive(Clone, Copy, Debug)]
struct Kernel {
    isa: Isa,
    threads: usize,
}

fn fused_lstm_layer(x: &Tensor, w: LstmWeights, h0: Option<&Tensor>, c0: Option<&Tensor>, kernel: Kernel) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, i) = x.dims3()?;
    let (h4, h) = w.w_hh.dims2()?;
    let fits = h4 == 4 * h && w.w_ih.dims() == [h4, i] && w.b_ih.dims() == [h4] && w.b_hh.dims() == [h4];
    if !fits || b == 0 || t == 0 || h == 0 {
        bail!(
            "lstm layer: input {:?}, w_ih {:?}, w_hh {:?}, b_ih {:?}, b_hh {:?} do not fit (or a size is 0)",
            x.dims(),
            w.w_ih.dims(),
            w.w_hh.dims(),
            w.b_ih.dims(),
            w.b_hh.dims()
        )
    }
    let state = |s: Option<&Tensor>| -> Result<Tensor> {
        match s {
            Some(s) if s.dims() == [b, h] => s.flatten_all(),
            Some(s) => bail!("lstm layer: initial state {:?}, expected {:?}", s.dims(), [b, h]),
            None => Tensor::zeros(b * h, DType::F32, x.device()),
        }
    };
    let weights = Tensor::cat(&[w.w_ih, w.w_hh], 1)?;
    let aux = Tensor::cat(&[&(w.b_ih + w.b_hh)?, &state(h0)?, &state(c0)?], 0)?;
    let out = x.contiguous()?.apply_op3(&weights, &aux, LstmLayer { kernel, saved: OnceLock::new() })?;
    let hs = out.narrow(0, 0, b * t * h)?.reshape((b, t, h))?;
    let c_last = out.narrow(0, b * t * h, b * h)?.reshape((b, h))?;
    let h_last = hs.narrow(1, t - 1, 1)?.squeeze(1)?;
    Ok((hs, h_last, c_last))
}

const NAME: &str = "lstm layer";

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    i: usize,
    h: usize,
}

impl Dims {
    fn new(x: &Layout, w: &Layout, aux: &Layout) -> Result<Self> {
        let (b, t, i) = x.shape().dims3()?;
        let (h4, ih) = w.shape().dims2()?;
        let h = h4 / 4;
        if h4 != 4 * h || ih != i + h || aux.shape().elem_count() != h4 + 2 * b * h {
            bail!("{NAME}: x {:?}, [W_ih | W_hh] {:?}, [bias | h0 | c0] {:?} do not fit", x.dims(), w.dims(), aux.dims())
        }
        Ok(Self { b, t, i, h })
    }

    /// Columns of [W_ih | W_hh] and of the saved [x_t | h_{t−1}] rows.
    fn ih(self) -> usize {
        self.i + self.h
    }

    /// Gate columns.
    fn g(self) -> usize {
        4 * self.h
    }

    /// The batch rows cut into `threads` blocks as even as can be (at least one row each).
    fn blocks(self, threads: usize) -> Vec<Range<usize>> {
        let n = threads.clamp(1, self.b);
        let (base, extra) = (self.b / n, self.b % n);
        let mut start = 0;
        (0..n)
            .map(|k| {
                let len = base + usize::from(k < extra);
                start += len;
                start - len..start
            })
            .collect()
    }
}

/// What the forward pass keeps for the backward pass, all batch-major (row = b·T + t).
struct Saved {
    dims: Dims,
    isa: Isa,
    threads: usize,
    /// [x_t | h_{t−1}] (B·T, I + H), h_{−1} = h0: the right operand of the weight gradient.
    xh: Vec<f32>,
    /// Activated gates i, f, g, o (B·T, 4H).
    gates: Vec<f32>,
    /// c_t and tanh c_t (B·T, H).
    c: Vec<f32>,
    tanh_c: Vec<f32>,
    /// c0 (B, H).
    c0: Vec<f32>,
}

impl Drop for Saved {
    fn drop(&mut self) {
        for v in [&mut self.xh, &mut self.gates, &mut self.c, &mut self.tanh_c] {
            buffers::give(std::mem::take(v));
        }
    }
}

/// (x, [W_ih | W_hh], [bias | h0 | c0]) → [h of every step | c_T].
struct LstmLayer {
    kernel: Kernel,
    saved: OnceLock<Arc<Saved>>,
}

/// ([W_ih | W_hh], d[h of every step | c_T]) → [dx (unless not needed) | d[W_ih | W_hh] | d[bias | h0 | c0]].
struct LstmLayerBackward {
    saved: Arc<Saved>,
    need_dx: bool,
}

impl CustomOp3 for LstmLayer {
    fn name(&self) -> &'static str {
        "wick-lstm-layer"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, auxs: &CpuStorage, auxl: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(xl, wl, auxl)?;
        let (x, w, aux) = (cpu_f32(xs, xl, NAME)?, cpu_f32(ws, wl, NAME)?, cpu_f32(auxs, auxl, NAME)?);
        let (bias, state) = aux.split_at(d.g());
        let (h0, c0) = state.split_at(d.b * d.h);
        let rows = d.b * d.t;
        // W_hh transposed (H × 4H, padded rows): see the module documentation.
        let ld_w_hh_t = padded(d.g());
        let mut w_hh_t = buffers::take(d.h * ld_w_hh_t);
        for (j, w_row) in w.chunks_exact(d.ih()).enumerate() {
            for (k, &v) in w_row[d.i..].iter().enumerate() {
                w_hh_t[k * ld_w_hh_t + j] = v;
            }
        }
        let mut xh = buffers::take(rows * d.ih());
        let mut gates = buffers::take(rows * d.g());
        let mut c = buffers::take(rows * d.h);
        let mut tanh_c = buffers::take(rows * d.h);
        let mut out = vec![0f32; (rows + d.b) * d.h];
        let (hs, c_last) = out.split_at_mut(rows * d.h);
        let blocks = d.blocks(self.kernel.threads);
        let (t, g, ih, h) = (d.t, d.g(), d.ih(), d.h);
        let work: Vec<ForwardBlock> = blocks
            .iter()
            .zip(split_rows(&mut xh, t * ih, &blocks))
            .zip(split_rows(&mut gates, t * g, &blocks))
            .zip(split_rows(&mut c, t * h, &blocks))
            .zip(split_rows(&mut tanh_c, t * h, &blocks))
            .zip(split_rows(hs, t * h, &blocks))
            .zip(split_rows(c_last, h, &blocks))
            .map(|((((((rows, xh), gates), c), tanh_c), hs), c_last)| ForwardBlock { rows: rows.clone(), xh, gates, c, tanh_c, hs, c_last })
            .collect();
        let inputs = ForwardInputs { d, isa: self.kernel.isa, x, w, w_hh_t: &w_hh_t, ld_w_hh_t, bias, h0, c0 };
        run_blocks(work, |block| forward_block(&inputs, block));
        buffers::give(w_hh_t);
        let saved = Saved { dims: d, isa: self.kernel.isa, threads: self.kernel.threads, xh, gates, c, tanh_c, c0: c0.to_vec() };
        if self.saved.set(Arc::new(saved)).is_err() {
            bail!("{NAME}: the op ran forwards twice")
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, aux: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.get() else { bail!("{NAME}: backward pass without a CPU forward pass") };
        // The first layer's input often needs no gradient (data, not an embedding).
        let need_dx = x.track_op();
        let flat = w.apply_op2_no_bwd(&grad.contiguous()?, &LstmLayerBackward { saved: saved.clone(), need_dx })?;
        let nx = if need_dx { x.elem_count() } else { 0 };
        let nw = w.elem_count();
        let dx = if need_dx { Some(flat.narrow(0, 0, nx)?.reshape(x.shape())?) } else { None };
        let dw = flat.narrow(0, nx, nw)?.reshape(w.shape())?;
        let daux = flat.narrow(0, nx + nw, aux.elem_count())?;
        Ok((dx, Some(dw), Some(daux)))
    }
}

impl CustomOp2 for LstmLayerBackward {
    fn name(&self) -> &'static str {
        "wick-lstm-layer-backward"
    }

    fn cpu_fwd(&self, ws: &CpuStorage, wl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = &*self.saved;
        let d = s.dims;
        let (w, grad) = (cpu_f32(ws, wl, NAME)?, cpu_f32(gs, gl, NAME)?);
        let rows = d.b * d.t;
        if w.len() != d.g() * d.ih() || grad.len() != (rows + d.b) * d.h {
            bail!("{NAME} backward: weights {:?} and gradient {:?} do not fit the forward pass", wl.dims(), gl.dims())
        }
        let (dhs, dc_last) = grad.split_at(rows * d.h);
        let x_cols = if self.need_dx { d.i } else { 0 };
        let mut out = vec![0f32; rows * x_cols + d.g() * d.ih() + d.g() + 2 * d.b * d.h];
        let mut dgates = buffers::take(rows * d.g());
        // W_hh with padded rows (see the module documentation).
        let ld_w_hh = padded(d.h);
        let mut w_hh = buffers::take(d.g() * ld_w_hh);
        for (dst, src) in w_hh.chunks_exact_mut(ld_w_hh).zip(w.chunks_exact(d.ih())) {
            dst[..d.h].copy_from_slice(&src[d.i..]);
        }
        let (dx, rest) = out.split_at_mut(rows * x_cols);
        let (dw, daux) = rest.split_at_mut(d.g() * d.ih());
        let (dbias, state) = daux.split_at_mut(d.g());
        let (dh, dc) = state.split_at_mut(d.b * d.h);
        // dc carries dL/dc_t back through time, from c_T's gradient; both end as d h0 and d c0.
        dc.copy_from_slice(dc_last);
        let blocks = d.blocks(s.threads);
        let work: Vec<BackwardBlock> = blocks
            .iter()
            .zip(split_rows(&mut dgates, d.t * d.g(), &blocks))
            .zip(split_rows(dx, d.t * x_cols, &blocks))
            .zip(split_rows(dh, d.h, &blocks))
            .zip(split_rows(dc, d.h, &blocks))
            .map(|((((rows, dgates), dx), dh), dc)| BackwardBlock { rows: rows.clone(), dgates, dx, dh, dc })
            .collect();
        let weights = BackwardWeights { w, w_hh: &w_hh, ld_w_hh };
        for partial in run_blocks(work, |block| backward_block(s, &weights, dhs, block)) {
            for (a, v) in dbias.iter_mut().zip(&partial) {
                *a += v;
            }
        }
        // [dW_ih | dW_hh] = d Gatesᵀ·[X | H_prev], all steps in one GEMM on all threads.
        gemm(parallelism(s.threads), d.g(), d.ih(), rows, dw, d.ih(), false, &dgates, 1, d.g(), &s.xh, d.ih(), 1);
        buffers::give(dgates);
        buffers::give(w_hh);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// What every forward block reads.
struct ForwardInputs<'a> {
    d: Dims,
    isa: Isa,
    x: &'a [f32],
    w: &'a [f32],
    w_hh_t: &'a [f32],
    ld_w_hh_t: usize,
    bias: &'a [f32],
    h0: &'a [f32],
    c0: &'a [f32],
}

/// One block's rows of the forward pass's outputs and saved arrays.
struct ForwardBlock<'a> {
    rows: Range<usize>,
    xh: &'a mut [f32],
    gates: &'a mut [f32],
    c: &'a mut [f32],
    tanh_c: &'a mut [f32],
    hs: &'a mut [f32],
    c_last: &'a mut [f32],
}

/// Runs the block's rows through every step (indices inside a block are local: r·T + t).
fn forward_block(p: &ForwardInputs, blk: ForwardBlock) {
    let Dims { t, i, h, .. } = p.d;
    let (ih, g) = (p.d.ih(), p.d.g());
    let (first, nb) = (blk.rows.start, blk.rows.len());
    for r in 0..nb {
        let b = first + r;
        for s in 0..t {
            blk.xh[(r * t + s) * ih..][..i].copy_from_slice(&p.x[(b * t + s) * i..][..i]);
        }
        blk.xh[r * t * ih + i..][..h].copy_from_slice(&p.h0[b * h..][..h]);
    }
    for row in blk.gates.chunks_exact_mut(g) {
        row.copy_from_slice(p.bias);
    }
    // Every step's input part at once: gates = bias + X·W_ihᵀ.
    gemm(Parallelism::None, nb * t, g, i, blk.gates, g, true, blk.xh, ih, 1, p.w, 1, ih);
    for s in 0..t {
        // gates_t += h_{t−1}·W_hhᵀ, h_{t−1} read from the [x | h_prev] rows.
        gemm(Parallelism::None, nb, g, h, &mut blk.gates[s * g..], t * g, true, &blk.xh[s * ih + i..], t * ih, 1, p.w_hh_t, p.ld_w_hh_t, 1);
        for r in 0..nb {
            let row = r * t + s;
            let (done, now) = blk.c[r * t * h..(r + 1) * t * h].split_at_mut(s * h);
            let c_prev = if s == 0 { &p.c0[(first + r) * h..][..h] } else { &done[(s - 1) * h..] };
            cell::forward(p.isa, &mut blk.gates[row * g..][..g], c_prev, &mut now[..h], &mut blk.tanh_c[row * h..][..h], &mut blk.hs[row * h..][..h]);
            if s + 1 < t {
                blk.xh[(row + 1) * ih + i..][..h].copy_from_slice(&blk.hs[row * h..][..h]);
            }
        }
    }
    for r in 0..nb {
        blk.c_last[r * h..][..h].copy_from_slice(&blk.c[(r * t + t - 1) * h..][..h]);
    }
}

/// One block's rows of the backward pass's outputs.
struct BackwardBlock<'a> {
    rows: Range<usize>,
    dgates: &'a mut [f32],
    /// Empty when x needs no gradient.
    dx: &'a mut [f32],
    /// dL/dh_{t−1} through the recurrence; d h0 at the end.
    dh: &'a mut [f32],
    /// dL/dc_t, from c_T's gradient; d c0 at the end.
    dc: &'a mut [f32],
}

/// [W_ih | W_hh] as given, and W_hh alone with padded rows.
struct BackwardWeights<'a> {
    w: &'a [f32],
    w_hh: &'a [f32],
    ld_w_hh: usize,
}

/// Runs the block's rows back through time; returns the block's part of d bias.
fn backward_block(s: &Saved, weights: &BackwardWeights, dhs: &[f32], blk: BackwardBlock) -> Vec<f32> {
    let Dims { t, i, h, .. } = s.dims;
    let (ih, g) = (s.dims.ih(), s.dims.g());
    let (first, nb) = (blk.rows.start, blk.rows.len());
    let mut dbias = vec![0f32; g];
    for st in (0..t).rev() {
        for r in 0..nb {
            let b = first + r;
            let row = b * t + st;
            let c_prev = if st == 0 { &s.c0[b * h..][..h] } else { &s.c[(row - 1) * h..][..h] };
            let inputs = cell::BackwardRow {
                dh_out: &dhs[row * h..][..h],
                dh_next: &blk.dh[r * h..][..h],
                gates: &s.gates[row * g..][..g],
                c_prev,
                tanh_c: &s.tanh_c[row * h..][..h],
            };
            cell::backward(s.isa, &inputs, &mut blk.dc[r * h..][..h], &mut blk.dgates[(r * t + st) * g..][..g], &mut dbias);
        }
        // dL/dh_{t−1} = d gates_t·W_hh.
        gemm(Parallelism::None, nb, h, g, blk.dh, h, false, &blk.dgates[st * g..], t * g, 1, weights.w_hh, weights.ld_w_hh, 1);
    }
    if !blk.dx.is_empty() {
        // dX = d Gates·W_ih for the block's rows.
        gemm(Parallelism::None, nb * t, i, g, blk.dx, i, false, blk.dgates, g, 1, weights.w, ih, 1);
    }
    dbias
}

/// Runs one closure per block: on the calling thread for one block, else on rayon's pool.
fn run_blocks<T: Send, R: Send>(work: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
    if work.len() == 1 {
        work.into_iter().map(f).collect()
    } else {
        work.into_par_iter().map(f).collect()
    }
}

/// `v` (rows of `row_len` elements) cut at the block boundaries (consecutive from row 0).
fn split_rows<'a>(mut v: &'a mut [f32], row_len: usize, blocks: &[Range<usize>]) -> Vec<&'a mut [f32]> {
    blocks
        .iter()
        .map(|r| {
            let (head, tail) = std::mem::take(&mut v).split_at_mut(r.len() * row_len);
            v = tail;
            head
        })
        .collect()
}

/// A row stride of at least `n` floats that is an odd number of 64-byte cache lines, so that
/// consecutive rows of a column block fall into different L1 sets.
fn padded(n: usize) -> usize {
    let lines = n.div_ceil(16);
    (lines | 1) * 16
}

fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// dst (m × n) = [dst +] lhs (m × k)·rhs (k × n), each matrix given by (slice, row stride, column
/// stride; dst's column stride is 1), through `ops::gemm` (which checks the bounds).
#[allow(clippy::too_many_arguments)]
fn gemm(par: Parallelism, m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, read_dst: bool, lhs: &[f32], lhs_rs: usize, lhs_cs: usize, rhs: &[f32], rhs_rs: usize, rhs_cs: usize) {
    let (lhs, rhs) = (View { data: lhs, rs: lhs_rs, cs: lhs_cs }, View { data: rhs, rs: rhs_rs, cs: rhs_cs });
    // The callers' index arithmetic keeps every view inside its slice; a failure is a bug here.
    if let Err(e) = crate::ops::gemm::product(dst, dst_rs, m, n, k, lhs, rhs, read_dst, 1.0, par) {
        panic!("{NAME}: {e}")
    }
}

#[cfg(test)]
mod tests;
