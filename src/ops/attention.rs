//! Scaled dot-product attention as one fused op (flash attention), with a reference made of
//! plain candle ops; [`attention`] takes the reference with `WICK_OPS=reference` (see
//! [`super::OpsPath`]).
//!
//! Shapes: q is (batch, heads, q_len, head_dim); k and v are (batch, heads, kv_len, head_dim);
//! `key_mask`, when given, is (batch, kv_len) of any dtype, nonzero where a key may be attended
//! to and 0 for padding. With `causal`, query i (0-based in q) sees key j iff
//! `j <= i + (kv_len - q_len)`: a prefill (q_len = kv_len) is the usual lower triangle and a
//! KV-cache decoding step (q_len = 1) sees every cached key.
//!
//! **A query row that sees no key at all** (every key padded, or causal with q_len > kv_len)
//! **outputs 0** and gets zero gradients, in both implementations (a plain softmax would give NaN
//! or the mean of V).
//!
//! ## The fused op on the CPU
//!
//! Flash attention: for each (batch, head, block of 64 query rows), a rayon task walks the keys
//! in tiles, computes the score tile S = scale·Q·Kᵀ (in cache), folds it into a running row
//! maximum m and row sum l (the online softmax: the output accumulator is rescaled by
//! exp(m_old − m_new) when the maximum grows), and adds P·V. The q_len×kv_len matrix is never
//! materialised: the extra memory is one score tile and the packed queries per task plus the
//! logsumexp (see [`fused_attention_extra_bytes`]). Tiles that causality or the padding mask hide
//! entirely are skipped, and on the causal diagonal only the visible keys are computed. The
//! logsumexp m + ln l of every row is saved for the backward pass.
//!
//! On CPUs with AVX-512 (head_dim a multiple of 16) or AVX2+FMA (a multiple of 8), both passes
//! run micro-kernels of our own with the queries along the vector lanes, written once over the
//! vector width (`attention/kernels.rs`, which explains the layout; the levels in
//! `attention/avx512.rs` and `attention/avx2.rs`), dropout included. Elsewhere (other head sizes,
//! `WICK_CPU_ISA=portable`) the same algorithm runs with the `gemm` crate (candle's CPU matrix
//! product) and 16-lane chunked softmax loops compiled for AVX-512 or AVX2+FMA, chosen at run
//! time.
//!
//! The backward pass is fused too (flash-attention 2's): per (batch, head), for each key tile
//! and each query block that sees it, P is recomputed from the saved logsumexp and
//! dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP − rowsum(dO∘O)), dQ += scale·dS·K, dK += scale·dSᵀ·Q,
//! five tile products, again without any q_len×kv_len buffer.
//!
//! f16 and bf16 inputs are converted to f32 on the CPU (the work is f32 throughout) and the
//! output converted back (to q's dtype). Keys and values are read in place when each head's
//! rows are contiguous, whatever the distance between heads: a KV cache narrowed to the
//! positions it holds is not copied per decoding step (which cost ~10% of GPT-2's decoding
//! time, batch 1 and 16). Other layouts are copied first. Keys and values may be in f16/bf16
//! while q is f32 (a KV cache kept in the model's dtype): for at most 4 query rows the AVX-512
//! and AVX2 kernels read them in place, widening as they load; otherwise they are widened
//! first.
//!
//! ## CUDA
//!
//! With `--features cuda`, the forward pass is our kernel in `src/kernels/fused_attention.cu`
//! (see the comment blocks there), compiled to PTX by `build.rs`: CUDA cores by default, tensor
//! cores (WMMA) for f16/bf16 with `WICK_ATTENTION_CUDA_KERNEL=wmma`. Its backward pass recomputes
//! the attention matrix with candle ops, in query chunks of at most 2^27 scores (a fused CUDA
//! backward is future work).

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
use super::matvec::bits_of;
use super::OpsPath;
use rayon::prelude::*;
use std::sync::Mutex;

/// Query rows per CPU task in the portable kernel (they share every K/V tile load).
const BR: usize = 64;
/// Keys per tile in the portable kernel.
const BC: usize = 256;
/// Query rows and keys per tile in the CPU backward pass.
const BWD_BR: usize = 64;
const BWD_BC: usize = 128;

/// Attention as models call it: [`fused_attention`] (on the CPU and CUDA), or
/// [`reference_attention`] with `WICK_OPS=reference` (on every device). Same arguments and
/// result as both.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool) -> Result<Tensor> {
    match OpsPath::current() {
        OpsPath::Fused => fused_attention(q, k, v, key_mask, scale, causal),
        OpsPath::Reference => reference_attention(q, k, v, key_mask, scale, causal),
    }
}

/// (batch, heads, q_len, kv_len, head_dim), after checking every shape and dtype.
fn dims(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, h, lq, d) = q.dims4()?;
    let (bk, hk, lk, dk) = k.dims4()?;
    if (bk, hk, dk) != (b, h, d) || v.dims() != k.dims() {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit (batch, heads, len, head_dim)", q.dims(), k.dims(), v.dims());
    }
    // Keys and values may be stored in another float dtype than the queries (f32 queries
    // against a KV cache in f16/bf16); the work is f32 on the CPU either way.
    if v.dtype() != k.dtype() {
        candle_core::bail!("attention: k and v dtypes differ ({:?}, {:?})", k.dtype(), v.dtype());
    }
    for t in [q, k] {
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            candle_core::bail!("attention: unsupported dtype {:?} (f32, f16, bf16)", t.dtype());
        }
    }
    if let Some(m) = key_mask {
        if m.dims() != [b, lk] {
            candle_core::bail!("attention: key_mask is {:?}, expected (batch, kv_len) = ({b}, {lk})", m.dims());
        }
    }
    Ok((b, h, lq, lk, d))
}

/// How many keys query row `i` sees when causal (keys 0..n): `i + 1 + kv_len - q_len`, clamped.
fn causal_limit(i: usize, lq: usize, lk: usize) -> usize {
    (i + 1 + lk).saturating_sub(lq).min(lk)
}

/// The visibility of every (query, key) as 0/1 f32, broadcastable to (batch, heads, q_len,
/// kv_len), or None when everything is visible.
fn visibility(key_mask: Option<&Tensor>, causal: bool, b: usize, lq: usize, lk: usize, device: &Device) -> Result<Option<Tensor>> {
    visibility_rows(key_mask, causal, b, lq, lk, 0, lq, device)
}

/// [`visibility`] for the query rows `first..first + rows` only.
#[allow(clippy::too_many_arguments)]
fn visibility_rows(key_mask: Option<&Tensor>, causal: bool, b: usize, lq: usize, lk: usize, first: usize, rows: usize, device: &Device) -> Result<Option<Tensor>> {
    let keys = match key_mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.ne(0f64)?.to_dtype(DType::F32)?.reshape((b, 1, 1, lk))?),
        None => None,
    };
    let tri = if causal {
        let v: Vec<f32> = (first..first + rows).flat_map(|i| (0..lk).map(move |j| (j < causal_limit(i, lq, lk)) as u8 as f32)).collect();
        Some(Tensor::from_vec(v, (1, 1, rows, lk), device)?)
    } else {
        None
    };
    Ok(match (keys, tri) {
        (Some(a), Some(t)) => Some(a.broadcast_mul(&t)?),
        (a, t) => a.or(t),
    })
}

/// Attention with plain differentiable candle ops: scale·Q·Kᵀ, −1e30 added where hidden,
/// `candle_nn::ops::softmax` over the keys, rows that see nothing zeroed, times V. f16 and bf16
/// are computed in f32 (like the fused op) and the result converted back. Materialises the
/// (batch, heads, q_len, kv_len) scores.
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool) -> Result<Tensor> {
    reference_attention_with_dropout(q, k, v, key_mask, scale, causal, None)
}

/// Attention as models train it: with dropout `p` on the attention probabilities when `train`
/// (as transformers' BERT and GPT-2 do); otherwise [`attention`]. The mask comes from a hash of
/// (seed, position) (`ops/dropout.rs`), so the fused CPU op applies it tile by tile in both
/// passes and the CPU reference path (`WICK_OPS=reference`) draws the same mask; other
/// devices run the reference path with their own generator.
#[allow(clippy::too_many_arguments)]
pub fn attention_with_dropout(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool, p: f64, train: bool) -> Result<Tensor> {
    if !(train && p > 0.0) {
        return attention(q, k, v, key_mask, scale, causal);
    }
    let dropout = DropoutMask::new(p)?;
    if super::fused_path(q.device()) {
        fused_attention_impl(q, k, v, key_mask, scale, causal, Some(dropout), false)
    } else {
        reference_attention_with_dropout(q, k, v, key_mask, scale, causal, Some(&dropout))
    }
}

fn reference_attention_with_dropout(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool, dropout: Option<&DropoutMask>) -> Result<Tensor> {
    let (b, h, lq, lk, _d) = dims(q, k, v, key_mask)?;
    let dtype = q.dtype();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let p = reference_attention_probs(q, k, key_mask, scale, causal)?;
    let p = match dropout {
        // The hashed mask on the CPU (the fused op's, so both paths train alike); the device's
        // own generator elsewhere (a host-built mask would be batch·heads·q_len·kv_len floats).
        Some(d) if q.device().is_cpu() => (p * d.tensor(0, (b, h, lq, lk), q.device())?)?,
        Some(d) => crate::nn::dropout(&p, d.probability(), true)?,
        None => p,
    };
    p.matmul(&f32(v)?)?.to_dtype(dtype)
}

/// The attention probabilities (f32, batch × heads × q_len × kv_len) with plain candle ops:
/// softmax(scale·Q·Kᵀ) over the visible keys, rows that see nothing all 0.
fn reference_attention_probs(q: &Tensor, k: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, _h, lq, _d) = q.dims4()?;
    let lk = k.dim(2)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let s = (f32(q)?.matmul(&f32(k)?.t()?)? * scale)?;
    Ok(match visibility(key_mask, causal, b, lq, lk, q.device())? {
        None => candle_nn::ops::softmax(&s, D::Minus1)?,
        Some(vis) => {
            let bias = vis.affine(1e30, -1e30)?;
            let p = candle_nn::ops::softmax(&s.broadcast_add(&bias)?, D::Minus1)?;
            p.broadcast_mul(&vis.max_keepdim(D::Minus1)?)?
        }
    })
}

/// Attention as one op: flash attention on the CPU (and on CUDA with `--features cuda`), with
/// a fused backward pass on the CPU. f32, f16 and bf16 in (accumulating in f32), the result in
/// the input dtype. Other devices, and CUDA head sizes other than 32, 64 and 128, fall back to
/// [`reference_attention`].
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool) -> Result<Tensor> {
    fused_attention_impl(q, k, v, key_mask, scale, causal, None, false)
}

/// [`fused_attention`], with dropout on the probabilities (CPU only) and, for the tests, the
/// portable kernel forced where the AVX-512 or AVX2 one would run.
#[allow(clippy::too_many_arguments)]
fn fused_attention_impl(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool, dropout: Option<DropoutMask>, portable: bool) -> Result<Tensor> {
    let (b, h, _lq, _lk, d) = dims(q, k, v, key_mask)?;
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        candle_core::bail!("attention: unsupported dtype {dtype:?} (f32, f16, bf16)");
    }
    let mask = match key_mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.contiguous()?.detach()),
        None => None,
    };
    match q.device() {
        Device::Cpu => {
            let mask_cpu = match &mask {
                Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
                None => None,
            };
            let op = FusedAttention { scale: scale as f32, causal, mask, mask_cpu, lse: Mutex::new(None), portable, dropout };
            let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
            // Keys and values whose heads are each contiguous are read in place: a decoding
            // step's KV cache (a view of the positions held so far) is not copied per step,
            // nor widened when it is kept in f16/bf16 and the few-rows kernel reads it.
            let in_place = matches!(k.dtype(), DType::F16 | DType::BF16) && !portable && few_rows_kernel(q.dim(2)?, d);
            let heads = |t: &Tensor| {
                let t = if in_place { t.clone() } else { t.to_dtype(DType::F32)? };
                if head_stride(t.layout()).is_some() { Ok(t) } else { t.contiguous() }
            };
            let out = f32(q)?.apply_op3(&heads(k)?, &heads(v)?, op)?;
            out.to_dtype(dtype)
        }
        #[cfg(feature = "cuda")]
        // (batch·heads is the grid's y dimension: at most 65535)
        Device::Cuda(_) if matches!(d, 32 | 64 | 128) && b * h <= 65535 && dropout.is_none() => {
            let op = FusedAttention { scale: scale as f32, causal, mask, mask_cpu: None, lse: Mutex::new(None), portable, dropout: None };
            let same = |t: &Tensor| t.to_dtype(dtype)?.contiguous();
            q.contiguous()?.apply_op3(&same(k)?, &same(v)?, op)
        }
        _ => {
            let _ = (b, h, d);
            reference_attention_with_dropout(q, k, v, key_mask, scale, causal, dropout.as_ref())
        }
    }
}

/// Whether `q_len` query rows of head_dim `d` run the few-rows kernel (AVX-512 or AVX2 level),
/// which reads f16/bf16 keys and values in place.
fn few_rows_kernel(q_len: usize, d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return q_len <= kernels::FEW_ROWS && (avx512::usable(d) || avx2::usable(d));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q_len, d);
        false
    }
}

/// The distance between the heads of a (batch, heads, len, head_dim) layout that holds each
/// head's rows one after another, as a contiguous tensor does (len·head_dim) and a KV cache
/// narrowed to its first positions does (its capacity·head_dim); None for other layouts.
fn head_stride(l: &Layout) -> Option<usize> {
    let (&[b, h, len, d], &[sb, sh, sl, sd]) = (l.shape().dims(), l.stride()) else { return None };
    if l.is_contiguous() {
        return Some(len * d);
    }
    let rows_contiguous = (sd == 1 || d <= 1) && (sl == d || len <= 1);
    // (batch, heads) as one index: one stride, whichever of the two dims is 1.
    let stride = match (b, h) {
        (_, 1) => sb,
        (1, _) => sh,
        _ if sb == h * sh => sh,
        _ => return None,
    };
    (rows_contiguous && stride >= len * d).then_some(stride)
}

/// The f32 data of a (batch, heads, len, head_dim) tensor whose heads are each contiguous
/// ([`head_stride`]), from its first element, and the distance between its heads.
fn cpu_f32_heads<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<(&'a [f32], usize)> {
    match s {
        CpuStorage::F32(data) => heads(data, l, op),
        _ => candle_core::bail!("{op} needs f32 keys and values (or f16/bf16 ones, both alike)"),
    }
}

/// [`cpu_f32_heads`] for data of any element type.
fn heads<'a, E>(data: &'a [E], l: &Layout, op: &str) -> Result<(&'a [E], usize)> {
    let (b, h, len, d) = l.shape().dims4()?;
    let Some(stride) = head_stride(l) else {
        candle_core::bail!("{op} needs keys and values whose heads' rows are each contiguous ({l:?})")
    };
    let end = l.start_offset() + if b * h == 0 { 0 } else { (b * h - 1) * stride + len * d };
    match data.get(l.start_offset()..end) {
        Some(slice) => Ok((slice, stride)),
        None => candle_core::bail!("{op}: a layout past its storage ({l:?})"),
    }
}

/// The extra memory the fused CPU forward pass allocates beyond its inputs and output, in bytes,
/// with `threads` tasks in flight: the saved logsumexp (4·batch·heads·q_len) and, per task, one
/// score tile (and on the AVX-512 and AVX2 paths the task's packed queries; the running max and sum live
/// on the stack). (f16/bf16 inputs also take an f32
/// copy of q, k, v and of the output.)
pub fn fused_attention_extra_bytes(batch: usize, heads: usize, q_len: usize, kv_len: usize, head_dim: usize, threads: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if avx512::usable(head_dim) || avx2::usable(head_dim) {
        // scale·Qᵀ (BQ × head_dim) and Sᵀ (BK × BQ) per task
        let task = (kernels::BQ * head_dim + kernels::BK * kernels::BQ) * 4;
        return 4 * batch * heads * q_len + threads * task;
    }
    let _ = head_dim;
    let task = (BR.min(q_len) * BC.min(kv_len)) * 4;
    4 * batch * heads * q_len + threads * task
}

/// The op: q, k, v (contiguous, f32 on the CPU) → the attention output.
struct FusedAttention {
    scale: f32,
    causal: bool,
    /// (batch, kv_len) f32 on the op's device, nonzero = attend.
    mask: Option<Tensor>,
    /// The same on the CPU.
    mask_cpu: Option<Vec<f32>>,
    /// The logsumexp of every row's scaled scores (+inf for rows that see no key), saved by the
    /// CPU forward pass for the backward pass.
    lse: Mutex<Option<Vec<f32>>>,
    /// Use the portable CPU kernel even where the AVX-512 or AVX2 one applies (for tests).
    portable: bool,
    /// Dropout on the probabilities (CPU; it runs the portable kernel, which supports it).
    dropout: Option<DropoutMask>,
}

/// One attention problem, f32 and contiguous, on the CPU.
#[derive(Clone, Copy)]
struct Problem<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: Option<&'a [f32]>,
    /// Elements from one head's keys to the next, and values: lk·d, or more when k or v is a
    /// view of a longer buffer (a KV cache narrowed to the positions it holds).
    k_stride: usize,
    v_stride: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    scale: f32,
    causal: bool,
    dropout: Option<DropoutMask>,
    /// Keys and values kept in 16 bits instead of `k` and `v` (then empty): a KV cache in the
    /// model's f16/bf16, read by the few-rows kernel with widening loads (same strides).
    half: Option<HalfKv<'a>>,
}

/// Keys and values in f16 or bf16 (see [`Problem::half`]).
#[derive(Clone, Copy)]
enum HalfKv<'a> {
    /// (keys, values) as their bits.
    F16(&'a [u16], &'a [u16]),
    Bf16(&'a [u16], &'a [u16]),
}

impl Problem<'_> {
    /// How many leading keys row `i` may see (before the padding mask).
    fn limit(&self, i: usize) -> usize {
        if self.causal {
            causal_limit(i, self.lq, self.lk)
        } else {
            self.lk
        }
    }
    /// The padding mask of batch entry `bh / heads`, if any.
    fn keys(&self, bh: usize) -> Option<&[f32]> {
        self.mask.map(|m| &m[(bh / self.h) * self.lk..][..self.lk])
    }
    /// Head `bh`'s queries, keys and values.
    fn head(&self, bh: usize) -> (&[f32], &[f32], &[f32]) {
        let (d, lq, lk) = (self.d, self.lq, self.lk);
        (&self.q[bh * lq * d..][..lq * d], &self.k[bh * self.k_stride..][..lk * d], &self.v[bh * self.v_stride..][..lk * d])
    }
    /// Head `bh`'s part of keys `k` and values `v` laid out as `self.k` and `self.v` are (the
    /// 16-bit ones of [`Problem::half`]).
    fn kv_head<'b, E>(&self, k: &'b [E], v: &'b [E], bh: usize) -> (&'b [E], &'b [E]) {
        let n = self.lk * self.d;
        (&k[bh * self.k_stride..][..n], &v[bh * self.v_stride..][..n])
    }
    /// Rows `r0..r0 + rows` of head `bh`'s queries, and the head's keys and values.
    fn block(&self, bh: usize, r0: usize, rows: usize) -> (&[f32], &[f32], &[f32]) {
        let (q, k, v) = self.head(bh);
        (&q[r0 * self.d..][..rows * self.d], k, v)
    }
    /// qt[c·ld + i] = scale·q[i][c] for the rows of `q` (queries along the vector lanes of the
    /// micro-kernels); the lanes past them stay as they are (zero when fresh).
    fn pack_scaled_t(&self, q: &[f32], qt: &mut [f32], ld: usize) {
        let d = self.d;
        for (i, row) in q.chunks_exact(d).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                qt[c * ld + i] = x * self.scale;
            }
        }
    }
    /// limit[i] = how many leading keys row r0 + i sees, as i32 (lanes past the last row: as
    /// the last row), for lane-wise causal masks.
    fn lane_limits(&self, r0: usize, limit: &mut [i32]) {
        for (i, x) in limit.iter_mut().enumerate() {
            *x = self.limit((r0 + i).min(self.lq - 1)) as i32;
        }
    }
}

/// The key tiles (first key, length, the tile's slice of the padding mask) of at most `bk` keys
/// below `end`, without those the padding mask hides entirely.
fn key_tiles(keys: Option<&[f32]>, end: usize, bk: usize) -> impl Iterator<Item = (usize, usize, Option<&[f32]>)> {
    (0..end).step_by(bk).map(move |j0| (j0, bk.min(end - j0), keys.map(|ks| &ks[j0..bk.min(end - j0) + j0]))).filter(|(_, _, ks)| !ks.is_some_and(|ks| ks.iter().all(|&x| x == 0.0)))
}

/// The end of an online softmax: each row of `o` (d columns) divided by its sum l, and lse =
/// m + ln l; rows that saw no key get 0 and lse = +∞.
fn finish_rows(o: &mut [f32], d: usize, m: &[f32], l: &[f32], lse: &mut [f32]) {
    for (i, row) in o.chunks_exact_mut(d).enumerate() {
        if l[i] > 0.0 {
            let inv = 1.0 / l[i];
            row.iter_mut().for_each(|x| *x *= inv);
            lse[i] = m[i] + l[i].ln();
        } else {
            row.fill(0.0);
            lse[i] = f32::INFINITY;
        }
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "wick-fused-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = "fused attention";
        let q = super::cpu_f32(s1, l1, name)?;
        let (b, h, lq, d) = l1.shape().dims4()?;
        let lk = l2.shape().dims4()?.2;
        let none: &[f32] = &[];
        let (k, v, half, k_stride, v_stride) = match (s2, s3) {
            (CpuStorage::BF16(kd), CpuStorage::BF16(vd)) => {
                let ((k, ks), (v, vs)) = (heads(bits_of(kd), l2, name)?, heads(bits_of(vd), l3, name)?);
                (none, none, Some(HalfKv::Bf16(k, v)), ks, vs)
            }
            (CpuStorage::F16(kd), CpuStorage::F16(vd)) => {
                let ((k, ks), (v, vs)) = (heads(bits_of(kd), l2, name)?, heads(bits_of(vd), l3, name)?);
                (none, none, Some(HalfKv::F16(k, v)), ks, vs)
            }
            _ => {
                let ((k, ks), (v, vs)) = (cpu_f32_heads(s2, l2, name)?, cpu_f32_heads(s3, l3, name)?);
                (k, v, None, ks, vs)
            }
        };
        let p = Problem { q, k, v, mask: self.mask_cpu.as_deref(), k_stride, v_stride, h, lq, lk, d, scale: self.scale, causal: self.causal, dropout: self.dropout, half };
        // Zeroed by the tasks that write them (`super::zeroed`), not in a serial pass first.
        let (mut out, mut lse) = (Vec::with_capacity(b * h * lq * d), Vec::with_capacity(b * h * lq));
        let (out_chunks, lse_chunks) = (&mut out.spare_capacity_mut()[..b * h * lq * d], &mut lse.spare_capacity_mut()[..b * h * lq]);
        if lq == 0 || d == 0 {
            (super::zeroed(out_chunks), super::zeroed(lse_chunks));
        } else {
            // our micro-kernels, or the `gemm`-crate tiles
            #[cfg(target_arch = "x86_64")]
            let (fast512, fast2) = {
                let ours = !self.portable;
                (ours && avx512::usable(d), ours && avx2::usable(d))
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (fast512, fast2) = {
                let _ = self.portable;
                (false, false)
            };
            if half.is_some() && !((fast512 || fast2) && lq <= kernels::FEW_ROWS) {
                candle_core::bail!("{name}: f16/bf16 keys and values are read in place only for at most {} query rows on the AVX-512 and AVX2 levels (the op's caller widens them otherwise)", kernels::FEW_ROWS);
            }
            let br = if fast512 || fast2 { kernels::BQ } else { BR };
            out_chunks.par_chunks_mut(lq * d).zip(lse_chunks.par_chunks_mut(lq)).enumerate().for_each(|(bh, (o, l))| {
                o.par_chunks_mut(br * d).zip(l.par_chunks_mut(br)).enumerate().for_each(|(qb, (o, l))| {
                    let (o, l) = (super::zeroed(o), super::zeroed(l));
                    #[cfg(target_arch = "x86_64")]
                    if fast512 {
                        return avx512::forward_block(&p, bh, qb * br, o, l);
                    } else if fast2 {
                        return avx2::forward_block(&p, bh, qb * br, o, l);
                    }
                    simd::forward_block(&p, bh, qb * br, o, l);
                })
            });
        }
        // SAFETY: every element of both was zeroed above (by a task, or all at once).
        unsafe { (out.set_len(b * h * lq * d), lse.set_len(b * h * lq)) };
        *self.lse.lock().unwrap() = Some(lse);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap().clone();
        match (q.device(), lse) {
            (Device::Cpu, Some(lse)) => {
                let (dq, dk, dv) = cpu_backward(self, q, k, v, out, grad, &lse)?;
                Ok((Some(dq), Some(dk), Some(dv)))
            }
            _ => {
                let (dq, dk, dv) = recompute_backward(q, k, v, self.mask.as_ref(), out, grad, self.scale as f64, self.causal, RECOMPUTE_SCORES)?;
                Ok((Some(dq), Some(dk), Some(dv)))
            }
        }
    }
}

/// Score elements (f32) the candle-ops backward materialises at a time: 2^27, 512 MiB.
const RECOMPUTE_SCORES: usize = 1 << 27;

/// The backward pass with candle ops, recomputing P from q, k, v, the output and its gradient;
/// any device (CUDA uses it). Works through the queries in chunks so that at most
/// `max_scores` score elements (batch·heads·rows·kv_len) exist at once. Gradients in q's dtype.
#[allow(clippy::too_many_arguments)]
fn recompute_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    out: &Tensor,
    grad: &Tensor,
    scale: f64,
    causal: bool,
    max_scores: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, lq, lk, _d) = dims(q, k, v, mask)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let (qf, kf, vf, of, go) = (f32(q)?, f32(k)?, f32(v)?, f32(out)?, f32(grad)?);
    let (kt, vt) = (kf.t()?, vf.t()?);
    let rows = (max_scores / (b * h * lk).max(1)).clamp(1, lq.max(1));
    let (mut dk, mut dv) = (kf.zeros_like()?, vf.zeros_like()?);
    let mut dqs = Vec::new();
    for first in (0..lq).step_by(rows) {
        let n = rows.min(lq - first);
        let chunk = |t: &Tensor| t.narrow(2, first, n)?.contiguous();
        let (qc, oc, gc) = (chunk(&qf)?, chunk(&of)?, chunk(&go)?);
        let s = (qc.matmul(&kt)? * scale)?;
        let p = match visibility_rows(mask, causal, b, lq, lk, first, n, q.device())? {
            None => candle_nn::ops::softmax_last_dim(&s)?,
            Some(vis) => {
                let p = candle_nn::ops::softmax_last_dim(&s.broadcast_add(&vis.affine(1e30, -1e30)?)?)?;
                p.broadcast_mul(&vis.max_keepdim(D::Minus1)?)?
            }
        };
        dv = (dv + p.t()?.matmul(&gc)?)?;
        let dp = gc.matmul(&vt)?;
        let delta = (&gc * &oc)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&delta)?)?;
        dqs.push((ds.matmul(&kf)? * scale)?);
        dk = (dk + (ds.t()?.matmul(&qc)? * scale)?)?;
    }
    let dq = if dqs.is_empty() { qf.zeros_like()? } else { Tensor::cat(&dqs, 2)? };
    let dt = q.dtype();
    Ok((dq.to_dtype(dt)?, dk.to_dtype(dt)?, dv.to_dtype(dt)?))
}

/// The fused CPU backward pass (see the module docs); parallel over (batch, head).
fn cpu_backward(op: &FusedAttention, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor, lse: &[f32]) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    // Borrow the (contiguous f32) storages rather than copying them.
    let tensors = [q, k, v, out, grad].map(|t| t.to_dtype(DType::F32).and_then(|t| t.contiguous()));
    let [qt, kt, vt, ot, gt] = tensors;
    let (qt, kt, vt, ot, gt) = (qt?, kt?, vt?, ot?, gt?);
    let guards = [&qt, &kt, &vt, &ot, &gt].map(|t| t.storage_and_layout());
    let mut slices = Vec::with_capacity(5);
    for (storage, layout) in &guards {
        match &**storage {
            candle_core::Storage::Cpu(s) => slices.push(super::cpu_f32(s, layout, "fused attention backward")?),
            _ => candle_core::bail!("fused attention backward: tensors not on the CPU"),
        }
    }
    let (qv, kv, vv, ov, gv) = (slices[0], slices[1], slices[2], slices[3], slices[4]);
    let p = Problem { q: qv, k: kv, v: vv, mask: op.mask_cpu.as_deref(), k_stride: lk * d, v_stride: lk * d, h, lq, lk, d, scale: op.scale, causal: op.causal, dropout: op.dropout, half: None };
    // Zeroed by the tasks that accumulate into them (`super::zeroed`), not in a serial pass first.
    let (nq, nk) = (b * h * lq * d, b * h * lk * d);
    let (mut dq, mut dk, mut dv) = (Vec::with_capacity(nq), Vec::with_capacity(nk), Vec::with_capacity(nk));
    let (dq_chunks, dk_chunks, dv_chunks) = (&mut dq.spare_capacity_mut()[..nq], &mut dk.spare_capacity_mut()[..nk], &mut dv.spare_capacity_mut()[..nk]);
    if lq == 0 || lk == 0 || d == 0 {
        (super::zeroed(dq_chunks), super::zeroed(dk_chunks), super::zeroed(dv_chunks));
    } else {
        dq_chunks
            .par_chunks_mut(lq * d)
            .zip(dk_chunks.par_chunks_mut(lk * d))
            .zip(dv_chunks.par_chunks_mut(lk * d))
            .enumerate()
            .for_each(|(bh, ((dq, dk), dv))| {
                let (dq, dk, dv) = (super::zeroed(dq), super::zeroed(dk), super::zeroed(dv));
                let o = &ov[bh * lq * d..][..lq * d];
                let g = &gv[bh * lq * d..][..lq * d];
                let lse = &lse[bh * lq..][..lq];
                #[cfg(target_arch = "x86_64")]
                if !op.portable {
                    if avx512::usable(d) {
                        return avx512::backward_head(&p, bh, o, g, lse, dq, dk, dv);
                    } else if avx2::usable(d) {
                        return avx2::backward_head(&p, bh, o, g, lse, dq, dk, dv);
                    }
                }
                simd::backward_head(&p, bh, o, g, lse, dq, dk, dv);
            });
    }
    // SAFETY: every element of the three was zeroed above (by a task, or all at once).
    unsafe { (dq.set_len(nq), dk.set_len(nk), dv.set_len(nk)) };
    let dev = Device::Cpu;
    Ok((Tensor::from_vec(dq, q.shape(), &dev)?, Tensor::from_vec(dk, k.shape(), &dev)?, Tensor::from_vec(dv, v.shape(), &dev)?))
}

/// dst (m×n) = [dst +] beta·lhs (m×k)·rhs (k×n), every matrix given by (slice, row stride,
/// column stride); single-threaded (the callers are rayon tasks already). Through `ops::gemm`,
/// which checks the bounds.
#[allow(clippy::too_many_arguments)]
#[inline]
fn gemm(m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, read_dst: bool, lhs: &[f32], lhs_rs: usize, lhs_cs: usize, rhs: &[f32], rhs_rs: usize, rhs_cs: usize, beta: f32) {
    use super::gemm::{product, View};
    let (lhs, rhs) = (View { data: lhs, rs: lhs_rs, cs: lhs_cs }, View { data: rhs, rs: rhs_rs, cs: rhs_cs });
    // The kernels' tile arithmetic keeps every view inside its slice; a failure is a bug here.
    if let Err(e) = product(dst, dst_rs, m, n, k, lhs, rhs, read_dst, beta, gemm::Parallelism::None) {
        panic!("fused attention: {e}")
    }
}

/// The per-task kernels, compiled for AVX-512 and AVX2+FMA and chosen at run time.
mod simd {
    use super::{gemm, Problem, BC, BR, BWD_BC, BWD_BR};

    const LANES: usize = 16;

    use crate::ops::math::exp;

    #[inline(always)]
    fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for t in 0..LANES {
                acc[t] = acc[t].max(c[t]);
            }
        }
        rest.iter().fold(acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b))
    }

    /// x ← e^(x − m), returning the sum.
    #[inline(always)]
    fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for t in 0..LANES {
                let e = exp(c[t] - m);
                c[t] = e;
                acc[t] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for y in chunks.into_remainder() {
            *y = exp(*y - m);
            s += *y;
        }
        s
    }

    /// x ← e^(x − m) (masked entries, −∞, become 0).
    #[inline(always)]
    fn exp_sub(x: &mut [f32], m: f32) {
        for y in x.iter_mut() {
            *y = exp(*y - m);
        }
    }

    #[inline(always)]
    fn scale(x: &mut [f32], a: f32) {
        for y in x.iter_mut() {
            *y *= a;
        }
    }

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for t in 0..LANES {
                acc[t] = x[t].mul_add(y[t], acc[t]);
            }
        }
        acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
    }

    /// Hides the keys of a score row that the padding mask or causality hide (−∞), given the
    /// row's visible prefix `vis` of the tile and the tile's slice of the padding mask.
    #[inline(always)]
    fn hide(row: &mut [f32], vis: usize, keys: Option<&[f32]>, hidden: f32) {
        row[vis..].fill(hidden);
        if let Some(keys) = keys {
            for (x, &k) in row[..vis].iter_mut().zip(keys) {
                if k == 0.0 {
                    *x = hidden;
                }
            }
        }
    }

    /// Rows `r0..r0 + lse.len()` of head `bh`: writes their output and logsumexp.
    #[inline(always)]
    fn forward_block_impl(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
        let (d, lk) = (p.d, p.lk);
        let rows = lse.len();
        let (q, k, v) = p.block(bh, r0, rows);
        let keys = p.keys(bh);
        let end = p.limit(r0 + rows - 1); // keys the last (most-seeing) row sees
        let mut m = [f32::NEG_INFINITY; BR];
        let mut l = [0f32; BR];
        o.fill(0.0);
        let mut s = vec![0f32; rows * BC.min(end.max(1))];
        let mut j0 = 0;
        while j0 < end {
            let n = BC.min(end - j0);
            let tile_keys = keys.map(|ks| &ks[j0..j0 + n]);
            if tile_keys.is_some_and(|ks| ks.iter().all(|&x| x == 0.0)) {
                j0 += n;
                continue;
            }
            let s = &mut s[..rows * n];
            gemm(rows, n, d, s, n, false, q, d, 1, &k[j0 * d..], 1, d, p.scale);
            for i in 0..rows {
                let row = &mut s[i * n..(i + 1) * n];
                let vis = p.limit(r0 + i).saturating_sub(j0).min(n);
                hide(row, vis, tile_keys, f32::NEG_INFINITY);
                let mx = max(&row[..vis]);
                if mx == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let m_new = m[i].max(mx);
                let corr = exp(m[i] - m_new);
                l[i] = l[i] * corr + exp_sub_sum(row, m_new);
                m[i] = m_new;
                // Dropout after the row sum: l normalises by every key, dropped or not.
                if let Some(dr) = &p.dropout {
                    let first = ((bh * p.lq + r0 + i) * lk + j0) as u64;
                    for (j, x) in row.iter_mut().enumerate() {
                        *x *= dr.multiplier(first + j as u64);
                    }
                }
                if corr != 1.0 {
                    scale(&mut o[i * d..(i + 1) * d], corr);
                }
            }
            gemm(rows, d, n, o, d, true, s, n, 1, &v[j0 * d..], d, 1, 1.0);
            j0 += n;
        }
        for i in 0..rows {
            if l[i] > 0.0 {
                scale(&mut o[i * d..(i + 1) * d], 1.0 / l[i]);
                lse[i] = m[i] + l[i].ln();
            } else {
                o[i * d..(i + 1) * d].fill(0.0);
                lse[i] = f32::INFINITY;
            }
        }
    }

    /// The gradients of one (batch, head): dq (q_len×d), dk and dv (kv_len×d), zeroed here.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn backward_head_impl(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let (d, lq, lk) = (p.d, p.lq, p.lk);
        let (q, k, v) = p.head(bh);
        let keys = p.keys(bh);
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        // delta_i = rowsum(dO ∘ O)
        let delta: Vec<f32> = (0..lq).map(|i| dot(&g[i * d..(i + 1) * d], &o[i * d..(i + 1) * d])).collect();
        let mut pt = vec![0f32; BWD_BR * BWD_BC];
        let mut dp = vec![0f32; BWD_BR * BWD_BC];
        let mut j0 = 0;
        while j0 < lk {
            let n = BWD_BC.min(lk - j0);
            let tile_keys = keys.map(|ks| &ks[j0..j0 + n]);
            // The first query row that sees key j0 (causal), else 0.
            let first = if p.causal { (j0 + lq).saturating_sub(lk) } else { 0 };
            if tile_keys.is_some_and(|ks| ks.iter().all(|&x| x == 0.0)) || first >= lq {
                j0 += n;
                continue;
            }
            let (kt, vt) = (&k[j0 * d..(j0 + n) * d], &v[j0 * d..(j0 + n) * d]);
            let mut i0 = first;
            while i0 < lq {
                let rows = BWD_BR.min(lq - i0);
                let (qi, gi) = (&q[i0 * d..(i0 + rows) * d], &g[i0 * d..(i0 + rows) * d]);
                let pt = &mut pt[..rows * n];
                let dp = &mut dp[..rows * n];
                // P = exp(scale·Q Kᵀ − lse), hidden entries 0
                gemm(rows, n, d, pt, n, false, qi, d, 1, kt, 1, d, p.scale);
                for r in 0..rows {
                    let row = &mut pt[r * n..(r + 1) * n];
                    let vis = p.limit(i0 + r).saturating_sub(j0).min(n);
                    hide(row, vis, tile_keys, f32::NEG_INFINITY);
                    let l = lse[i0 + r];
                    if l == f32::INFINITY {
                        row.fill(0.0);
                    } else {
                        exp_sub(row, l);
                    }
                }
                // dP' = dO Vᵀ (the gradient of the dropped probabilities P' = P∘M)
                gemm(rows, n, d, dp, n, false, gi, d, 1, vt, 1, d, 1.0);
                // dS = P ∘ (M∘dP' − delta); P becomes P' for dV
                for r in 0..rows {
                    let dl = delta[i0 + r];
                    let (dpr, ptr) = (&mut dp[r * n..(r + 1) * n], &mut pt[r * n..(r + 1) * n]);
                    match &p.dropout {
                        None => {
                            for (x, &pv) in dpr.iter_mut().zip(ptr.iter()) {
                                *x = pv * (*x - dl);
                            }
                        }
                        Some(dr) => {
                            let first = ((bh * lq + i0 + r) * lk + j0) as u64;
                            for (j, (x, pv)) in dpr.iter_mut().zip(ptr.iter_mut()).enumerate() {
                                let keep = dr.multiplier(first + j as u64);
                                *x = *pv * (keep * *x - dl);
                                *pv *= keep;
                            }
                        }
                    }
                }
                // dV += P'ᵀ dO
                gemm(n, d, rows, &mut dv[j0 * d..(j0 + n) * d], d, true, pt, 1, n, gi, d, 1, 1.0);
                // dQ += scale·dS K; dK += scale·dSᵀ Q
                gemm(rows, d, n, &mut dq[i0 * d..(i0 + rows) * d], d, true, dp, n, 1, kt, d, 1, p.scale);
                gemm(n, d, rows, &mut dk[j0 * d..(j0 + n) * d], d, true, dp, 1, n, qi, d, 1, p.scale);
                i0 += rows;
            }
            j0 += n;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    unsafe fn forward_block_avx512(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
        forward_block_impl(p, bh, r0, o, lse)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_block_avx2(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
        forward_block_impl(p, bh, r0, o, lse)
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    unsafe fn backward_head_avx512(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        backward_head_impl(p, bh, o, g, lse, dq, dk, dv)
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_head_avx2(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        backward_head_impl(p, bh, o, g, lse, dq, dk, dv)
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Level {
        Avx512,
        Avx2,
        Plain,
    }

    /// Our kernel level (`wick::cpu::isa`: the CPU's best, capped by `WICK_CPU_ISA`).
    fn level() -> Level {
        match crate::cpu::isa() {
            crate::cpu::Isa::Avx512 => Level::Avx512,
            crate::cpu::Isa::Avx2 => Level::Avx2,
            crate::cpu::Isa::Portable => Level::Plain,
        }
    }

    pub(super) fn forward_block(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
        match level() {
            // SAFETY: the CPU has the features (checked by `level`).
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { forward_block_avx512(p, bh, r0, o, lse) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { forward_block_avx2(p, bh, r0, o, lse) },
            _ => forward_block_impl(p, bh, r0, o, lse),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_head(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        match level() {
            // SAFETY: the CPU has the features (checked by `level`).
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { backward_head_avx512(p, bh, o, g, lse, dq, dk, dv) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { backward_head_avx2(p, bh, o, g, lse, dq, dk, dv) },
            _ => backward_head_impl(p, bh, o, g, lse, dq, dk, dv),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod kernels;
use super::dropout::DropoutMask;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Which layouts the CPU op reads in place, and with which distance between heads.
    #[test]
    fn head_strides_of_cache_views_and_other_layouts() -> Result<()> {
        let cache = Tensor::zeros((2, 3, 10, 8), DType::F32, &Device::Cpu)?;
        assert_eq!(head_stride(cache.layout()), Some(80));
        assert_eq!(head_stride(cache.narrow(2, 0, 4)?.layout()), Some(80), "the positions a cache holds");
        assert_eq!(head_stride(cache.narrow(2, 3, 4)?.layout()), Some(80), "a view past the first position");
        assert_eq!(head_stride(cache.narrow(1, 0, 1)?.narrow(2, 0, 4)?.layout()), Some(240), "one head of each batch entry");
        assert_eq!(head_stride(cache.narrow(0, 1, 1)?.narrow(2, 0, 4)?.layout()), Some(80), "one batch entry");
        assert_eq!(head_stride(cache.narrow(3, 0, 4)?.layout()), None, "part of each row");
        assert_eq!(head_stride(cache.transpose(2, 3)?.layout()), None, "rows transposed");
        assert_eq!(head_stride(cache.narrow(1, 0, 2)?.layout()), None, "heads 0–1 of 3: no single stride between them");
        assert_eq!(head_stride(Tensor::zeros((1, 3, 4, 8), DType::F32, &Device::Cpu)?.broadcast_as((2, 3, 4, 8))?.layout()), None, "a broadcast batch");
        Ok(())
    }

    /// The candle-ops backward (what CUDA runs), in query chunks, against the reference's
    /// autograd gradients.
    #[test]
    fn recompute_backward_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, lq, lk, causal, masked, budget) in [(2, 2, 37, 50, true, true, 2 * 2 * 50 * 8), (1, 3, 9, 4, true, false, 1), (2, 1, 20, 20, false, true, 1 << 20)] {
            let d = 32;
            let q = Var::randn(0f32, 1.0, (b, h, lq, d), &dev)?;
            let k = Var::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
            let v = Var::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
            let mask = Tensor::from_vec((0..b * lk).map(|i| (i % lk < [lk, lk / 3][i / lk]) as u8).collect::<Vec<_>>(), (b, lk), &dev)?;
            let mask = masked.then_some(mask);
            let reference = reference_attention(&q, &k, &v, mask.as_ref(), 0.2, causal)?;
            let w = Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev)?;
            let g = (&reference * &w)?.sum_all()?.backward()?;
            let m32 = mask.as_ref().map(|m| m.to_dtype(DType::F32)).transpose()?;
            let (dq, dk, dv) = recompute_backward(&q, &k, &v, m32.as_ref(), &reference, &w, 0.2, causal, budget)?;
            for (ours, x) in [(&dq, &q), (&dk, &k), (&dv, &v)] {
                let err = (ours - g.get(x).unwrap())?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-4, "recompute backward off by {err}");
            }
        }
        Ok(())
    }

    /// The AVX2 kernels, called directly (on any CPU with AVX2+FMA, whatever `wick::cpu::isa`
    /// picks): the forward pass against an f64 loop and the portable kernel, the backward pass
    /// against the portable kernel's gradients, on shapes that are no multiple of the tiles:
    /// 1..300 rows and keys, head_dim 8/32/64, causal with more queries than keys (rows that see
    /// nothing), and a padding mask with a hole.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_f64_and_portable() -> Result<()> {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (b, h) = (2, 2);
        let cases = [(1, 1, 8), (7, 300, 64), (65, 65, 32), (300, 300, 64), (65, 7, 8), (300, 129, 32), (3, 130, 64), (64, 256, 64)];
        for (lq, lk, d) in cases {
            for (causal, masked) in [(false, false), (true, false), (false, true), (true, true)] {
                let rand = |l: usize| -> Result<Vec<f32>> { Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?.flatten_all()?.to_vec1() };
                let (q, k, v) = (rand(lq)?, rand(lk)?, rand(lk)?);
                // batch 1: keys past lk/2 padded, and key 2 as a hole
                let mask: Vec<f32> = (0..b * lk).map(|i| (i < lk || (i % lk <= lk / 2 && i % lk != 2)) as u8 as f32).collect();
                let p = Problem { q: &q, k: &k, v: &v, mask: masked.then_some(&mask[..]), k_stride: lk * d, v_stride: lk * d, h, lq, lk, d, scale: 0.3, causal, dropout: None, half: None };
                let (mut o, mut lse) = (vec![0f32; b * h * lq * d], vec![0f32; b * h * lq]);
                for bh in 0..b * h {
                    for r0 in (0..lq).step_by(kernels::BQ) {
                        let rows = kernels::BQ.min(lq - r0);
                        avx2::forward_block(&p, bh, r0, &mut o[(bh * lq + r0) * d..][..rows * d], &mut lse[bh * lq + r0..][..rows]);
                    }
                }
                let mut worst = 0f64;
                for bh in 0..b * h {
                    for i in 0..lq {
                        let qi = &q[(bh * lq + i) * d..][..d];
                        let seen: Vec<usize> = (0..p.limit(i)).filter(|&j| p.keys(bh).is_none_or(|ks| ks[j] != 0.0)).collect();
                        let s: Vec<f64> = seen.iter().map(|&j| 0.3 * (0..d).map(|c| qi[c] as f64 * k[(bh * lk + j) * d + c] as f64).sum::<f64>()).collect();
                        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                        let want_lse = if seen.is_empty() { f64::INFINITY } else { mx + sum.ln() };
                        let got_lse = lse[bh * lq + i] as f64;
                        assert!(got_lse == want_lse || (got_lse - want_lse).abs() < 1e-4, "lse {got_lse} vs {want_lse} ({lq}, {lk}, {d}, causal {causal}, masked {masked})");
                        for c in 0..d {
                            let want: f64 = seen.iter().zip(&s).map(|(&j, x)| (x - mx).exp() / sum * v[(bh * lk + j) * d + c] as f64).sum();
                            worst = worst.max((o[(bh * lq + i) * d + c] as f64 - want).abs());
                        }
                    }
                }
                assert!(worst < 3e-5, "off the f64 reference by {worst} ({lq}, {lk}, {d}, causal {causal}, masked {masked})");
                let t = |x: &[f32], l: usize| Tensor::from_slice(x, (b, h, l, d), &dev);
                let mt = Tensor::from_slice(&mask, (b, lk), &dev)?;
                let (qv, kv, vv) = (Var::from_tensor(&t(&q, lq)?)?, Var::from_tensor(&t(&k, lk)?)?, Var::from_tensor(&t(&v, lk)?)?);
                let portable = fused_attention_impl(&qv, &kv, &vv, masked.then_some(&mt), 0.3, causal, None, true)?;
                let err = (&portable - t(&o, lq)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 3e-5, "off the portable kernel by {err}");
                // the backward pass, from this forward's output and logsumexp, against the
                // portable kernel's gradients for the same upstream gradient
                let w = rand(lq)?;
                let grads = (&portable * t(&w, lq)?)?.sum_all()?.backward()?;
                let (mut dq, mut dk, mut dv) = (vec![0f32; b * h * lq * d], vec![0f32; b * h * lk * d], vec![0f32; b * h * lk * d]);
                for bh in 0..b * h {
                    let (qs, ks) = (bh * lq * d..(bh + 1) * lq * d, bh * lk * d..(bh + 1) * lk * d);
                    avx2::backward_head(&p, bh, &o[qs.clone()], &w[qs.clone()], &lse[bh * lq..][..lq], &mut dq[qs], &mut dk[ks.clone()], &mut dv[ks]);
                }
                for (ours, x, l, name) in [(&dq, &qv, lq, "dq"), (&dk, &kv, lk, "dk"), (&dv, &vv, lk, "dv")] {
                    let err = (grads.get(x).unwrap() - t(ours, l)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(err < 1e-4, "{name} off the portable kernel's by {err} ({lq}, {lk}, {d}, causal {causal}, masked {masked})");
                }
            }
        }
        Ok(())
    }

    /// The portable CPU kernel (the `gemm` crate's products) and our micro-kernels (AVX-512 for
    /// head_dim 32 and 64 on AVX-512 machines, AVX2 for 24 and at that level) against the
    /// reference, forwards and backwards; and dropout inside the fused op (both kernels) against
    /// the reference with the same hashed mask and the plain formula softmax(S)∘M·V, with p up
    /// to 0.9 so that tiles are mostly dropped.
    /// Keys and values kept in f16/bf16 (a KV cache in the model's dtype, narrowed to the
    /// positions it holds) against f32 queries: the few-rows kernel reads them in place, and the
    /// result is the f32 path's on the widened values and the reference's. Head sizes 64/32/16
    /// take it at both levels, 8 only at AVX2 (AVX-512 widens them first).
    #[test]
    fn half_keys_and_values_read_in_place_match_widened() -> Result<()> {
        let dev = Device::Cpu;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        for dtype in [DType::BF16, DType::F16] {
            for (lq, lk, d, causal, masked) in [(1, 37, 64, false, false), (1, 80, 32, true, true), (3, 50, 64, true, true), (4, 130, 16, false, true), (2, 5, 8, true, false), (6, 40, 64, true, true)] {
                let (b, h, capacity) = (2, 3, lk + 7);
                let q = Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev)?;
                let cache = |_| -> Result<Tensor> { Tensor::randn(0f32, 1.0, (b, h, capacity, d), &dev)?.to_dtype(dtype)?.narrow(2, 0, lk) };
                let (k, v) = (cache(0)?, cache(1)?);
                let lens = [lk, lk / 2 + 1];
                let mask = Tensor::from_vec((0..b * lk).map(|i| (i % lk < lens[i / lk]) as u8 as f32).collect::<Vec<_>>(), (b, lk), &dev)?;
                let mask = masked.then_some(mask);
                let got = fused_attention(&q, &k, &v, mask.as_ref(), 0.125, causal)?;
                assert_eq!(got.dtype(), DType::F32);
                let (kw, vw) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
                let widened = fused_attention(&q, &kw, &vw, mask.as_ref(), 0.125, causal)?;
                let reference = reference_attention(&q, &kw, &vw, mask.as_ref(), 0.125, causal)?;
                let what = format!("{dtype:?} lq {lq} lk {lk} d {d} causal {causal} masked {masked}");
                assert!(close(&got, &widened)? < 1e-5, "{what}: against the widened values");
                assert!(close(&got, &reference)? < 1e-5, "{what}: against the reference");
            }
        }
        Ok(())
    }

    #[test]
    fn kernels_and_dropout_match_reference() -> Result<()> {
        for portable in [true, false] {
            kernels_and_dropout_match_reference_on(portable)?;
        }
        Ok(())
    }

    fn kernels_and_dropout_match_reference_on(portable: bool) -> Result<()> {
        let dev = Device::Cpu;
        let cases = [
            (2, 2, 70, 300, 64, true, true, None),
            (1, 3, 1, 33, 32, false, true, None),
            (2, 1, 9, 5, 24, true, false, None),
            (2, 2, 70, 300, 64, false, true, Some(0.1)),
            (1, 3, 17, 17, 32, true, false, Some(0.5)),
            (2, 1, 9, 130, 24, false, false, Some(0.9)),
            (2, 3, 3, 40, 32, true, true, Some(0.3)), // decoding-sized blocks: keys along the lanes
        ];
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        for (b, h, lq, lk, d, causal, masked, p) in cases {
            let q = Var::randn(0f32, 1.0, (b, h, lq, d), &dev)?;
            let k = Var::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
            let v = Var::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
            let lens = [lk, lk / 2 + 1];
            let mask = Tensor::from_vec((0..b * lk).map(|i| (i % lk < lens[i / lk]) as u8 as f32).collect::<Vec<_>>(), (b, lk), &dev)?;
            let mask = masked.then_some(mask);
            let dropout = p.map(|p| DropoutMask::with_seed(p, 1234 + lq as u64));
            let fused = fused_attention_impl(&q, &k, &v, mask.as_ref(), 0.125, causal, dropout, portable)?;
            let reference = reference_attention_with_dropout(&q, &k, &v, mask.as_ref(), 0.125, causal, dropout.as_ref())?;
            assert!(close(&fused, &reference)? < 1e-5, "portable {portable}, p {p:?}, d {d}");
            if let Some(dropout) = dropout {
                let plain = (reference_attention_probs(&q, &k, mask.as_ref(), 0.125, causal)? * dropout.tensor(0, (b, h, lq, lk), &dev)?)?.matmul(&v)?;
                assert!(close(&plain, &reference)? < 1e-5);
                let without = fused_attention(&q, &k, &v, mask.as_ref(), 0.125, causal)?;
                assert!(close(&fused, &without)? > 1e-3, "dropout changed nothing");
            }
            let w = Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev)?;
            let (g1, g2) = ((&fused * &w)?.sum_all()?.backward()?, (&reference * &w)?.sum_all()?.backward()?);
            for x in [&q, &k, &v] {
                assert!(close(g1.get(x).unwrap(), g2.get(x).unwrap())? < 1e-4, "portable {portable}, p {p:?}, d {d}");
            }
        }
        Ok(())
    }
}
#[cfg(feature = "cuda")]
mod cuda;
