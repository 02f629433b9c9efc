//! `y = x·W (+ b)` for a weight stored in f32, f16 or bf16, used as stored: GPT-2's `Conv1D`
//! layout (in, out) or `Linear`'s (out, in) (which also reads a tied embedding (vocab, n_embd)
//! as the LM head). The activations are f32; the result is f32.
//!
//! Why: decoding multiplies one or a few rows by every weight of the model once per token, so it
//! is bound by reading the weights from memory. candle's matrix product runs such a product on
//! one thread, converts f16 weights on the fly through a slow path, and has no bf16 kernel on the
//! CPU at all. Reading 2-byte weights instead of 4 halves the traffic, if the conversion is free.
//!
//! Few rows (m ≤ [`MATVEC_ROWS`]): our kernels (`matvec/kernels.rs`) widen 8 or 16 weights at a
//! time to f32 inside the product (F16C's `vcvtph2ps` for f16, a 16-bit shift for bf16) and
//! accumulate in f32 registers, in tiles of up to 4 rows of x so that each weight loaded serves
//! every row (and 8 independent accumulators for a single row). The work is split over the rayon
//! pool by rows of W either way: in the (in, out) layout each task streams a contiguous part of W
//! (blocks of a few rows, every column) into its own partial sum, added up at the end; in the
//! (out, in) layout each task takes dot products of whole contiguous rows, its own outputs.
//! Memory traffic: the weight once, x and y (m·(k + n) floats, cache-resident) a few times; no
//! allocation but the output and, for (in, out), one partial sum per task.
//!
//! Many rows (the prompt pass): compute-bound, so the weight is converted to f32 in blocks of
//! 256 × 128 (per rayon task, into a buffer that stays in L2) and each block goes through
//! `ops::gemm` (our AVX2 product or the `gemm` crate); f32 weights go there directly.
//!
//! Kernels exist for AVX-512, AVX2+FMA+F16C and portable Rust, chosen by [`crate::cpu::isa`].
//! [`matmul_weight`] is the autograd op (its backward pass: dx by the same product with the
//! weight read in the other layout, dW and db with candle ops in f32).

use super::cpu_f32;
use super::linear::WeightLayout;
use crate::cpu::Isa;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::ops::Range;

pub(crate) mod kernels;
mod q4_decode;
mod qgemm;
pub(crate) mod quantized;

pub(crate) use q4_decode::RepackedQ4;
#[cfg(test)]
mod tests;

/// Products with at most this many rows run our kernels; more rows go through a GEMM. At 16 rows
/// (batch-16 decoding) ours stream the weight once where the `gemm` crate first copies it into
/// panels: GPT-2-small decoding measured 201–212 tok/s through ours against 116–160 through
/// `gemm`; at 32 rows `gemm` was ahead (142–151 against 126–134).
pub const MATVEC_ROWS: usize = 16;

/// A stored weight element type, for the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    F32,
    F16,
    Bf16,
}

pub(crate) trait Weight: 'static {
    /// The stored element: f32, or the bits of an f16 / bf16.
    type Raw: Copy + Send + Sync + 'static;
    const KIND: Kind;
    fn to_f32(raw: Self::Raw) -> f32;
}

pub(crate) struct F32W;
pub(crate) struct F16W;
pub(crate) struct Bf16W;

impl Weight for F32W {
    type Raw = f32;
    const KIND: Kind = Kind::F32;
    #[inline(always)]
    fn to_f32(raw: f32) -> f32 {
        raw
    }
}

impl Weight for F16W {
    type Raw = u16;
    const KIND: Kind = Kind::F16;
    #[inline(always)]
    fn to_f32(raw: u16) -> f32 {
        f16_to_f32(raw)
    }
}

impl Weight for Bf16W {
    type Raw = u16;
    const KIND: Kind = Kind::Bf16;
    #[inline(always)]
    fn to_f32(raw: u16) -> f32 {
        f32::from_bits((raw as u32) << 16)
    }
}

/// IEEE half → f32 (exact; the portable path and the last columns).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => {
            // zero or subnormal: man · 2⁻²⁴, exact in f32
            let v = man as f32 * (1.0 / 16_777_216.0);
            if sign != 0 {
                -v
            } else {
                v
            }
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// A weight's elements (f16 and bf16 as their bits: the `half` types are candle's).
#[derive(Clone, Copy)]
pub(crate) enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

/// The 2-byte elements of an f16 or bf16 slice as their bits.
pub(crate) fn bits_of<T>(v: &[T]) -> &[u16] {
    assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2);
    // SAFETY: f16 and bf16 are 2-byte plain-old-data (repr(transparent) over u16).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) }
}

/// The elements of a contiguous f32/f16/bf16 CPU weight.
pub(crate) fn weight_data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<WeightData<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("the weight of a product must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => WeightData::F32(&v[a..b]),
        CpuStorage::F16(v) => WeightData::F16(bits_of(&v[a..b])),
        CpuStorage::BF16(v) => WeightData::Bf16(bits_of(&v[a..b])),
        _ => bail!("weight products take f32, f16 or bf16 weights"),
    })
}

/// Sizes of a product: x is (m, k), y is (m, n), W is (k, n) (InOut) or (n, k) (OutIn).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub layout: WeightLayout,
}

/// Rayon tasks for a product with few rows: one per thread, or none for small weights (where
/// waking the pool would cost more than the product).
fn default_tasks(p: &Problem) -> usize {
    if p.k * p.n < 1 << 16 {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// y (m×n, holding the bias rows or zeros) += x (m×k) · W, at kernel level `isa` (at most the
/// CPU's), split into `tasks` rayon tasks when m ≤ [`MATVEC_ROWS`].
pub(crate) fn product(isa: Isa, x: &[f32], w: WeightData, p: Problem, y: &mut [f32], tasks: usize) -> Result<()> {
    if isa > crate::cpu::detected_isa() {
        bail!("kernel level {} is not supported by this CPU", isa.name())
    }
    let w_len = match w {
        WeightData::F32(v) => v.len(),
        WeightData::F16(v) | WeightData::Bf16(v) => v.len(),
    };
    if x.len() != p.m * p.k || y.len() != p.m * p.n || w_len != p.k * p.n {
        bail!("product {p:?}: x has {} elements, W {w_len}, y {}", x.len(), y.len())
    }
    if p.m == 0 || p.n == 0 || p.k == 0 {
        return Ok(());
    }
    match w {
        WeightData::F32(v) => run::<F32W>(isa, x, v, p, y, tasks),
        WeightData::F16(v) => run::<F16W>(isa, x, v, p, y, tasks),
        WeightData::Bf16(v) => run::<Bf16W>(isa, x, v, p, y, tasks),
    }
    Ok(())
}

/// A pointer that rayon tasks share; each writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only to write disjoint columns of y from different tasks.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn run<W: Weight>(isa: Isa, x: &[f32], w: &[W::Raw], p: Problem, y: &mut [f32], tasks: usize) {
    if p.m > MATVEC_ROWS {
        return many_rows::<W>(isa, x, w, p, y);
    }
    if p.layout == WeightLayout::InOut && tasks > 1 {
        return in_out_by_rows::<W>(isa, x, w, p, y, tasks);
    }
    // Column ranges aligned to whole strips (8 vectors of 16 lanes) or whole groups of 8 rows.
    let align = if p.layout == WeightLayout::InOut { 128 } else { 8 };
    by_columns(p.n, tasks, align, y, |j0, j1, y| {
        // SAFETY: x, w and y hold m·k, k·n and m·n elements (checked by `product`); the level
        // is supported by this CPU; tasks write disjoint columns [j0, j1) of y.
        unsafe { columns::<W>(isa, x.as_ptr(), w.as_ptr(), p, 0..p.k, j0..j1, y) }
    })
}

/// Runs `task(j0, j1, y)` over the n columns of y split into `tasks` rayon tasks, each a whole
/// number of `align` columns (a single task runs on this thread); `task` must write only
/// columns [j0, j1) of y (row length n), so that tasks never write the same element.
fn by_columns(n: usize, tasks: usize, align: usize, y: &mut [f32], task: impl Fn(usize, usize, *mut f32) + Sync) {
    if n == 0 {
        return;
    }
    let per = n.div_ceil(align).div_ceil(tasks.max(1)) * align;
    let out = SharedMut(y.as_mut_ptr());
    let run = |t: usize| task(t * per, ((t + 1) * per).min(n), out.get());
    let tasks = n.div_ceil(per);
    if tasks <= 1 {
        run(0)
    } else {
        (0..tasks).into_par_iter().for_each(run)
    }
}

/// The (in, out) layout split over tasks by rows of W: each task streams one contiguous part of
/// the weight (every column of its rows) into its own partial sum, and the partial sums are
/// added at the end (m·n floats each, cache-resident).
fn in_out_by_rows<W: Weight>(isa: Isa, x: &[f32], w: &[W::Raw], p: Problem, y: &mut [f32], tasks: usize) {
    // Whole blocks of rows per task (16 is the largest `kernels::block_rows`).
    let per = p.k.div_ceil(tasks).next_multiple_of(16);
    let tasks = p.k.div_ceil(per);
    let partial: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let rows = t * per..((t + 1) * per).min(p.k);
            let mut part = if t == 0 { y.to_vec() } else { vec![0f32; y.len()] };
            // SAFETY: as in `run`; each task writes only its own buffer.
            unsafe { columns::<W>(isa, x.as_ptr(), w.as_ptr(), p, rows, 0..p.n, part.as_mut_ptr()) };
            part
        })
        .collect();
    y.copy_from_slice(&partial[0]);
    for part in &partial[1..] {
        for (a, b) in y.iter_mut().zip(part) {
            *a += b;
        }
    }
}

/// y[.., cols] += x[.., rows] · W[rows, cols] at level `isa`; only the (in, out) layout takes
/// part of the rows (the (out, in) kernels sum whole rows of W).
unsafe fn columns<W: Weight>(isa: Isa, x: *const f32, w: *const W::Raw, p: Problem, rows: Range<usize>, cols: Range<usize>, y: *mut f32) {
    let Problem { m, k, n, layout } = p;
    debug_assert!(layout == WeightLayout::InOut || rows == (0..k));
    let (j0, j1) = (cols.start, cols.end);
    unsafe {
        match (isa, layout) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, WeightLayout::InOut) => kernels::avx512::in_out::<W>(x, m, k, w, n, rows, j0, j1, y),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, WeightLayout::OutIn) => kernels::avx512::out_in::<W>(x, m, k, w, n, j0, j1, y),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightLayout::InOut) => kernels::avx2::in_out::<W>(x, m, k, w, n, rows, j0, j1, y),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, WeightLayout::OutIn) => kernels::avx2::out_in::<W>(x, m, k, w, n, j0, j1, y),
            (_, WeightLayout::InOut) => kernels::portable::in_out::<W>(x, m, k, w, n, rows, j0, j1, y),
            (_, WeightLayout::OutIn) => kernels::portable::out_in::<W>(x, m, k, w, n, j0, j1, y),
        }
    }
}

/// dst = src as f32 at level `isa`.
pub(crate) fn convert<W: Weight>(isa: Isa, src: &[W::Raw], dst: &mut [f32]) {
    let len = src.len().min(dst.len());
    // SAFETY: both slices hold `len` elements; the level is supported (checked by `product`).
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => kernels::avx512::convert::<W>(src.as_ptr(), dst.as_mut_ptr(), len),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => kernels::avx2::convert::<W>(src.as_ptr(), dst.as_mut_ptr(), len),
            _ => kernels::portable::convert::<W>(src.as_ptr(), dst.as_mut_ptr(), len),
        }
    }
}

/// Columns (output features) per task, and rows of W per gemm call, of the many-rows path.
const GEMM_NB: usize = 128;
/// A multiple of the quantized block (32), so that blocks of quantized weights convert whole.
pub(crate) const GEMM_KB: usize = 256;

/// Many rows: gemm, on f32 blocks of the weight converted per task.
pub(crate) fn many_rows<W: Weight>(isa: Isa, x: &[f32], w: &[W::Raw], p: Problem, y: &mut [f32]) {
    let Problem { m, k, n, layout } = p;
    let threads = rayon::current_num_threads();
    if W::KIND == Kind::F32 {
        // SAFETY: Raw is f32 for this kind.
        let w = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) };
        let (cs, rs) = match layout {
            WeightLayout::InOut => (1, n as isize),
            WeightLayout::OutIn => (k as isize, 1),
        };
        let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        // SAFETY: sizes checked by `product`; element (i, j) of W is w[i·rs + j·cs].
        unsafe { gemm_acc(m, n, k, y.as_mut_ptr(), n, x.as_ptr(), k, w.as_ptr(), cs, rs, par) };
        return;
    }
    // The block W[i0.., j0..] as f32 into `buf`, and its strides there.
    let convert_block = |buf: &mut [f32], i0: usize, kb: usize, j0: usize, nb: usize| match layout {
        WeightLayout::InOut => {
            for ii in 0..kb {
                let row = (i0 + ii) * n + j0;
                convert::<W>(isa, &w[row..row + nb], &mut buf[ii * nb..(ii + 1) * nb]);
            }
            (1, nb as isize)
        }
        WeightLayout::OutIn => {
            for jj in 0..nb {
                let row = (j0 + jj) * k + i0;
                convert::<W>(isa, &w[row..row + kb], &mut buf[jj * kb..(jj + 1) * kb]);
            }
            (kb as isize, 1)
        }
    };
    gemm_by_blocks(x, p, y, convert_block);
}

/// y += x · W by gemm on blocks of W (GEMM_KB rows × GEMM_NB columns) that `convert_block`
/// writes as f32 into a per-task buffer (returning their column and row strides there); rayon
/// tasks take blocks of columns.
pub(crate) fn gemm_by_blocks(x: &[f32], p: Problem, y: &mut [f32], convert_block: impl Fn(&mut [f32], usize, usize, usize, usize) -> (isize, isize) + Sync) {
    let Problem { m, k, n, .. } = p;
    let out = SharedMut(y.as_mut_ptr());
    (0..n.div_ceil(GEMM_NB)).into_par_iter().for_each_init(
        || vec![0f32; GEMM_KB * GEMM_NB],
        |buf, b| {
            let (j0, nb) = (b * GEMM_NB, GEMM_NB.min(n - b * GEMM_NB));
            let mut i0 = 0;
            while i0 < k {
                let kb = GEMM_KB.min(k - i0);
                let (cs, rs) = convert_block(buf, i0, kb, j0, nb);
                // SAFETY: y's columns [j0, j0 + nb) belong to this task; x is m×k; buf holds
                // the kb×nb block with the strides given.
                unsafe { gemm_acc(m, nb, kb, out.get().add(j0), n, x.as_ptr().add(i0), k, buf.as_ptr(), cs, rs, gemm::Parallelism::None) };
                i0 += kb;
            }
        },
    );
}

/// y (m×n, rows `ldy` apart) += x (m×k, rows `ldx` apart) · W (element (i, j) at w[i·rs + j·cs]),
/// through `ops::gemm` (our AVX-512 or AVX2 kernel or the gemm crate, by level and shape).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_acc(m: usize, n: usize, k: usize, y: *mut f32, ldy: usize, x: *const f32, ldx: usize, w: *const f32, cs: isize, rs: isize, par: gemm::Parallelism) {
    let (x, w) = (super::gemm::Mat { ptr: x, rs: ldx as isize, cs: 1 }, super::gemm::Mat { ptr: w, rs, cs });
    unsafe { super::gemm::product_raw(y, ldy, m, n, k, x, w, super::gemm::Base::C, 1.0, par) }
}

/// `x` (..., k) times the weight `w` as stored ((k, n) for `InOut`, (n, k) for `OutIn`) plus
/// `bias` (n): (..., n) in x's dtype. Our kernels on the CPU for f32/f16/bf16 weights (x and the
/// bias are taken in f32), [`reference_matmul_weight`] elsewhere and with `WICK_OPS=reference`.
/// Differentiable in all three.
pub fn matmul_weight(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    let ours = super::fused_path(x.device()) && w.device().is_cpu() && float(x.dtype()) && float(w.dtype()) && bias.is_none_or(|b| float(b.dtype()));
    if !ours {
        return reference_matmul_weight(x, w, bias, layout);
    }
    fused_matmul_weight(x, w, bias, layout)
}

/// Our op itself (CPU tensors of float dtypes), whatever the path: what the tests compare.
pub(crate) fn fused_matmul_weight(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let w = w.contiguous()?;
    let y = match bias {
        Some(b) => x32.apply_op3(&w, &b.to_dtype(DType::F32)?.contiguous()?, WeightProduct(layout))?,
        None => x32.apply_op2(&w, WeightProduct(layout))?,
    };
    y.to_dtype(x.dtype())
}

/// The same with plain candle ops: in f32 on the CPU (candle has no bf16 product there), in x's
/// dtype elsewhere. Other devices, and the tests' reference.
pub fn reference_matmul_weight(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let dtype = if x.device().is_cpu() { DType::F32 } else { x.dtype() };
    let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
    super::linear::reference_linear(&x.to_dtype(dtype)?, &w.to_dtype(dtype)?, bias.as_ref(), layout)?.to_dtype(x.dtype())
}

/// `x` (..., k) times a `q8_0` / `q4_0` weight (n, k) plus `bias` (n), in f32, through our
/// kernels ([`quantized`]) on the CPU's fused path; `None` for anything else (other types,
/// other devices), which candle computes. Prompts too: 4.6× candle's kernel at 16 and 64 rows
/// of GPT-2's MLP on one AVX2 core.
/// `repacked`, W in the decoding layout of [`RepackedQ4`] where the layer has it, serves
/// products of up to [`q4_decode::ROWS`] rows. No backward pass: quantized layers are
/// inference-only.
pub(crate) fn quantized_matmul(x: &Tensor, w: &candle_core::quantized::QTensor, repacked: Option<&RepackedQ4>, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some(format) = quantized::QFormat::of(w.dtype()) else { return Ok(None) };
    let &[n, k] = w.shape().dims() else { return Ok(None) };
    let rows = x.elem_count() / k.max(1);
    if !(x.device().is_cpu() && super::fused_path(x.device()) && x.dim(D::Minus1)? == k) {
        return Ok(None);
    }
    let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
    if bias.as_ref().is_some_and(|b| b.len() != n) {
        bail!("quantized product: a bias of {} for {n} outputs", bias.map_or(0, |b| b.len()))
    }
    let mut y = super::repeated_rows(bias.as_deref(), rows, n);
    let data = w.data()?;
    let p = Problem { m: rows, k, n, layout: WeightLayout::OutIn };
    // x read in place when it is contiguous f32 (an encoder batch is megabytes: no copy).
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = x32.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else { return Ok(None) };
    let xv = cpu_f32(storage, layout, "quantized product")?;
    match repacked {
        Some(r) if rows <= q4_decode::ROWS && r.dims() == (n, k) && format == quantized::QFormat::Q4_0 && RepackedQ4::available() => r.product(xv, rows, &mut y, default_tasks(&p))?,
        _ => quantized::product(crate::cpu::isa(), format, xv, rows, k, &data, n, &mut y, default_tasks(&p))?,
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = n;
    Ok(Some(Tensor::from_vec(y, dims, x.device())?))
}

/// The product as a candle op: x (..., k) f32, W, and optionally the bias (n) f32.
struct WeightProduct(WeightLayout);

impl WeightProduct {
    /// (k, n) of the weight.
    fn dims(&self, w: &[usize]) -> Result<(usize, usize)> {
        let &[a, b] = w else { bail!("the weight of a product must be 2-dimensional, not {w:?}") };
        Ok(match self.0 {
            WeightLayout::InOut => (a, b),
            WeightLayout::OutIn => (b, a),
        })
    }

    fn forward(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bias: Option<(&CpuStorage, &Layout)>) -> Result<(CpuStorage, Shape)> {
        let (k, n) = self.dims(wl.dims())?;
        let x = cpu_f32(xs, xl, "weight product")?;
        let w = weight_data(ws, wl)?;
        if xl.dims().last() != Some(&k) {
            bail!("weight product: input {:?} does not fit the weight {:?} ({:?})", xl.dims(), wl.dims(), self.0)
        }
        let m = xl.dims()[..xl.dims().len() - 1].iter().product();
        let b = bias.map(|(bs, bl)| cpu_f32(bs, bl, "weight product")).transpose()?;
        if let (Some(b), Some((_, bl))) = (b, bias) {
            if b.len() != n {
                bail!("weight product: bias {:?} for {n} outputs", bl.dims())
            }
        }
        let mut y = super::repeated_rows(b, m, n);
        let p = Problem { m, k, n, layout: self.0 };
        product(crate::cpu::isa(), x, w, p, &mut y, default_tasks(&p))?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// dx (x's shape, f32) and dW (W's shape and dtype).
    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, n) = self.dims(w.dims())?;
        // dx = dy·Wᵀ: the same product with W read in the other layout.
        let flipped = match self.0 {
            WeightLayout::InOut => WeightLayout::OutIn,
            WeightLayout::OutIn => WeightLayout::InOut,
        };
        let dx = fused_matmul_weight(grad, w, None, flipped)?;
        let (x2, g2) = (x.reshape(((), k))?, grad.reshape(((), n))?);
        let dw = match self.0 {
            WeightLayout::InOut => x2.t()?.matmul(&g2)?,
            WeightLayout::OutIn => g2.t()?.matmul(&x2)?,
        };
        Ok((dx, dw.to_dtype(w.dtype())?))
    }
}

impl CustomOp2 for WeightProduct {
    fn name(&self) -> &'static str {
        "wick-weight-product"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(xs, xl, ws, wl, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for WeightProduct {
    fn name(&self) -> &'static str {
        "wick-weight-product"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(xs, xl, ws, wl, Some((bs, bl)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, grad)?;
        let db = grad.reshape(((), grad.dim(D::Minus1)?))?.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
