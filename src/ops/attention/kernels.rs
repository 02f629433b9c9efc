//! The fused attention's CPU forward and backward passes with micro-kernels of our own, written
//! once over a vector type ([`Lanes`]): 16-lane AVX-512 (`avx512.rs`) and 8-lane AVX2+FMA
//! (`avx2.rs`). Each level's `#[target_feature]` entry points call the `#[inline(always)]`
//! generic code here, so it is compiled once per level with that level's instructions.
//!
//! One forward task = one (batch, head) and a block of up to [`BQ`] = 64 query rows. The task
//! keeps scale·Qᵀ packed (head_dim × 64, queries along the vector lanes) and, per tile of [`BK`]
//! keys:
//!
//! 1. Sᵀ (BK × 64) = K·(scale·Qᵀ): each key row of K is broadcast one element at a time against
//!    vectors of Qᵀ, in register blocks of [`MR`] = 6 keys × `BLOCK` vectors (6×4 zmm = 24 of 32
//!    registers; 6×2 ymm = 12 of 16). Queries along the lanes make step 2 vertical.
//! 2. The online softmax on Sᵀ: padding and causality become −∞ by lane masks, then the running
//!    max m, the correction exp(m_old − m_new), P = exp(S − m_new) and the running sum l, all
//!    elementwise on query vectors (no horizontal reductions at all).
//! 3. O (64 × head_dim, row-major, the task's slice of the output) = corr·O + P·V: Pᵀ's row j
//!    holds P[i][j] for consecutive queries i, so 6 of them are broadcast against `BLOCK` vectors
//!    of V's row j, again 6 × `BLOCK` accumulators; O is loaded and stored once per tile and
//!    block of columns.
//!
//! Both steps 1 and 3 are one micro-kernel ([`product`]): C = start + A·B with A read by
//! broadcasts through strides and B by vectors. Memory traffic per tile: the K and V tiles
//! (BK·head_dim floats each, 32 KiB at head_dim 64) read from L2 once per column block; Sᵀ
//! (32 KiB) written twice and read twice, in L1/L2. Extra memory per task: Qᵀ (64·head_dim
//! floats), Sᵀ (BK·64) and three 64-float vectors on the stack.
//!
//! The backward pass (flash-attention 2's) runs the same products on the same layouts; see
//! [`backward_head`].

use super::Problem;
use crate::ops::dropout::DropoutMask;

/// The dropout multipliers (0 or 1/(1−p)) of `V::N` consecutive query rows at one key: the
/// hashed mask's elements `first`, `first + lk`, … (row-major batch × heads × q_len × kv_len, as
/// the portable path and the reference index them). One hash a lane, as there.
#[inline(always)]
unsafe fn keep_lanes<V: Lanes>(dropout: &DropoutMask, first: usize, lk: usize) -> V {
    let mut keep = [0f32; 16];
    for (lane, x) in keep.iter_mut().enumerate().take(V::N) {
        *x = dropout.multiplier((first + lane * lk) as u64);
    }
    unsafe { V::load(keep.as_ptr()) }
}

/// Query rows per task (4 AVX-512 vectors, 8 AVX2 ones).
pub const BQ: usize = 64;
/// Keys per tile.
pub const BK: usize = 128;
/// Rows of A (keys for Sᵀ, query rows for P·V) per micro-kernel call.
const MR: usize = 6;
/// Blocks of at most this many query rows (decoding) take [`few_rows`]: keys along the lanes.
pub(super) const FEW_ROWS: usize = 4;

/// One SIMD vector of f32 lanes and what the kernels do with it. Every method is unsafe: the
/// caller guarantees that the CPU has the level's features (the entry points check `usable`)
/// and that pointers are valid for [`Lanes::N`] lanes.
pub(super) trait Lanes: Copy {
    /// f32 lanes per vector.
    const N: usize;
    /// Vectors of columns per register block (with [`MR`] rows: the accumulators).
    const BLOCK: usize;
    /// A per-lane condition.
    type Mask: Copy;
    /// N i32 lanes (the keys each query row sees).
    type Limits: Copy;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// N bf16 (raw bits) widened to f32.
    unsafe fn load_bf16(p: *const u16) -> Self;
    /// N f16 (raw bits) widened to f32.
    unsafe fn load_f16(p: *const u16) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    /// self·b + c, fused.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// e^x lane-wise (Cephes' expf polynomial after a Cody-Waite reduction); 0 for x < −87,
    /// for −∞ and for NaN.
    unsafe fn exp(self) -> Self;
    /// The sum of the lanes.
    unsafe fn sum(self) -> f32;
    unsafe fn load_limits(p: *const i32) -> Self::Limits;
    /// The lanes whose limit is above `j` (the rows that see key j).
    unsafe fn sees(limits: Self::Limits, j: usize) -> Self::Mask;
    unsafe fn is_neg_inf(self) -> Self::Mask;
    /// Lane-wise `if mask { a } else { b }`.
    unsafe fn select(mask: Self::Mask, a: Self, b: Self) -> Self;
    /// [`product`] compiled for this level (one call per tile product, not inlined into every
    /// caller: 24 register-block shapes are too much code to repeat five times).
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(a: Strided, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, start: Start, rows: usize, vectors: usize);
}

/// An element type of keys and values that the few-rows kernel reads: f32, or the f16/bf16 of
/// a KV cache kept in the model's dtype (widened as it is loaded).
pub(super) trait KvElem: Copy {
    /// N elements from `p`, as f32.
    unsafe fn lanes<V: Lanes>(p: *const Self) -> V;
}

impl KvElem for f32 {
    #[inline(always)]
    unsafe fn lanes<V: Lanes>(p: *const f32) -> V {
        unsafe { V::load(p) }
    }
}

/// The bits of a bf16.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct Bf16Bits(u16);

/// The bits of an f16.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct F16Bits(u16);

impl KvElem for Bf16Bits {
    #[inline(always)]
    unsafe fn lanes<V: Lanes>(p: *const Self) -> V {
        unsafe { V::load_bf16(p.cast()) }
    }
}

impl KvElem for F16Bits {
    #[inline(always)]
    unsafe fn lanes<V: Lanes>(p: *const Self) -> V {
        unsafe { V::load_f16(p.cast()) }
    }
}

/// 16-bit elements as one of the marker types above.
fn marked<E: KvElem>(bits: &[u16]) -> &[E] {
    assert_eq!(std::mem::size_of::<E>(), 2);
    // SAFETY: E is repr(transparent) over u16 (the two marker types).
    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len()) }
}

/// A read through strides: A(r, t) = a[r·rs + t·ts].
#[derive(Clone, Copy)]
pub(super) struct Strided {
    pub a: *const f32,
    pub rs: usize,
    pub ts: usize,
}

impl Strided {
    unsafe fn rows_from(self, r: usize) -> Self {
        Self { a: unsafe { self.a.add(r * self.rs) }, ..self }
    }
}

/// What a product adds to: zero, C itself, or C scaled per row by corr[r] (the online softmax's
/// correction of O).
#[derive(Clone, Copy)]
pub(super) enum Start {
    Zero,
    Add,
    Scale(*const f32),
}

impl Start {
    unsafe fn rows_from(self, r: usize) -> Self {
        match self {
            Start::Scale(corr) => Start::Scale(unsafe { corr.add(r) }),
            other => other,
        }
    }
}

/// c[r][..N·NV] = start_r + Σ_{t < nt} A(r, t)·b[t·ldb ..] for the R rows r < R.
#[inline(always)]
unsafe fn micro<V: Lanes, const R: usize, const NV: usize>(a: Strided, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, start: Start) {
    unsafe {
        let mut acc = [[V::splat(0.0); NV]; R];
        match start {
            Start::Zero => {}
            Start::Add => {
                for (r, x) in acc.iter_mut().enumerate() {
                    for (u, y) in x.iter_mut().enumerate() {
                        *y = V::load(c.add(r * ldc + V::N * u));
                    }
                }
            }
            Start::Scale(corr) => {
                for (r, x) in acc.iter_mut().enumerate() {
                    let cr = V::splat(*corr.add(r));
                    for (u, y) in x.iter_mut().enumerate() {
                        *y = cr.mul(V::load(c.add(r * ldc + V::N * u)));
                    }
                }
            }
        }
        for t in 0..nt {
            let mut bv = [V::splat(0.0); NV];
            for (u, x) in bv.iter_mut().enumerate() {
                *x = V::load(b.add(t * ldb + V::N * u));
            }
            for (r, x) in acc.iter_mut().enumerate() {
                let ab = V::splat(*a.a.add(r * a.rs + t * a.ts));
                for u in 0..NV {
                    x[u] = ab.mul_add(bv[u], x[u]);
                }
            }
        }
        for (r, x) in acc.iter().enumerate() {
            for (u, y) in x.iter().enumerate() {
                y.store(c.add(r * ldc + V::N * u));
            }
        }
    }
}

/// [`micro`] over `rows` rows, [`MR`] at a time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn micro_rows<V: Lanes, const NV: usize>(a: Strided, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, start: Start, rows: usize) {
    let mut i = 0;
    unsafe {
        while i + MR <= rows {
            micro::<V, MR, NV>(a.rows_from(i), b, ldb, nt, c.add(i * ldc), ldc, start.rows_from(i));
            i += MR;
        }
        if i == rows {
            return; // (the pointers below would point past the buffers)
        }
        let (a, c, start) = (a.rows_from(i), c.add(i * ldc), start.rows_from(i));
        match rows - i {
            1 => micro::<V, 1, NV>(a, b, ldb, nt, c, ldc, start),
            2 => micro::<V, 2, NV>(a, b, ldb, nt, c, ldc, start),
            3 => micro::<V, 3, NV>(a, b, ldb, nt, c, ldc, start),
            4 => micro::<V, 4, NV>(a, b, ldb, nt, c, ldc, start),
            _ => micro::<V, 5, NV>(a, b, ldb, nt, c, ldc, start),
        }
    }
}

/// C (rows × N·vectors, row stride ldc) = start + A·B with A(r, t) read through `a` (t < nt) and
/// B's row t at b[t·ldb ..]: column blocks of `BLOCK` vectors, each over all rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn product<V: Lanes>(a: Strided, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, start: Start, rows: usize, vectors: usize) {
    let mut u = 0;
    while u < vectors {
        let (b, c) = unsafe { (b.add(V::N * u), c.add(V::N * u)) };
        unsafe {
            match (vectors - u).min(V::BLOCK) {
                1 => micro_rows::<V, 1>(a, b, ldb, nt, c, ldc, start, rows),
                2 => micro_rows::<V, 2>(a, b, ldb, nt, c, ldc, start, rows),
                3 => micro_rows::<V, 3>(a, b, ldb, nt, c, ldc, start, rows),
                _ => micro_rows::<V, 4>(a, b, ldb, nt, c, ldc, start, rows),
            }
        }
        u += V::BLOCK;
    }
}

/// Xᵀ (n × BQ, queries along the lanes) = rows·Pᵀ for the n rows of `rows` (row-major, d
/// columns) against the packed d × BQ matrix `packed`, `nr` vectors of lanes.
#[inline(always)]
unsafe fn times_packed<V: Lanes>(rows: *const f32, n: usize, d: usize, packed: *const f32, out: *mut f32, nr: usize) {
    unsafe { V::product(Strided { a: rows, rs: d, ts: 1 }, packed, BQ, d, out, BQ, Start::Zero, n, nr) }
}

/// A block of at most [`FEW_ROWS`] query rows (a decoding step's one new token, or a few):
/// keys along the vector lanes instead of queries, which would leave all but `rows` lanes of
/// every vector empty (and zero a BK × BQ tile per head for them). Per row i, over the keys
/// below `end` (the last row's causal limit):
///
/// 1. s[i][j] = scale·q_i·k_j by dot products along head_dim, four keys at a time; −∞ where the
///    padding mask or causality hides key j, and in the lanes past `end`;
/// 2. m = max_j s, P = exp(s − m) and l = Σ_j P along the keys (two passes: all scores are in
///    hand, no online rescaling), dropout on P after the sum;
/// 3. O = P·V: each key's row of V is loaded (widened from f16/bf16 when the cache keeps
///    them so) once for all rows and multiplied by each row's broadcast P, rows × `BLOCK`
///    accumulators a column block; then O /= l.
///
/// `E` is the element type of K and V (f32, or the bits of f16/bf16: [`KvElem`]). Memory
/// traffic: K once per row, V once, the scores rows × `end` floats. The op on
/// a GPT-2-small decoding step's shape (12 heads, one query, 80 cached keys): 6 µs against 11
/// on the query-vector path, whose lanes were all but one empty and which zeroed a 32 KB tile
/// per head (`notes/cpu-speed.md`, session 19).
#[inline(always)]
unsafe fn few_rows<V: Lanes, E: KvElem>(p: &Problem, k: &[E], v: &[E], bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
    let (d, rows) = (p.d, lse.len());
    let q = &p.q[(bh * p.lq + r0) * d..][..rows * d];
    let keys = p.keys(bh);
    let end = p.limit(r0 + rows - 1);
    let ld = end.next_multiple_of(V::N).max(V::N);
    let mut s = vec![f32::NEG_INFINITY; rows * ld];
    let mut m = [f32::NEG_INFINITY; FEW_ROWS];
    let mut l = [0f32; FEW_ROWS];
    unsafe {
        for i in 0..rows {
            let (qi, si) = (q.as_ptr().add(i * d), s.as_mut_ptr().add(i * ld));
            let limit = p.limit(r0 + i);
            let mut j = 0;
            while j < limit {
                let u_n = (limit - j).min(4);
                let mut acc = [V::splat(0.0); 4];
                let mut c = 0;
                while c < d {
                    let qv = V::load(qi.add(c));
                    for (u, a) in acc.iter_mut().enumerate().take(u_n) {
                        *a = qv.mul_add(E::lanes(k.as_ptr().add((j + u) * d + c)), *a);
                    }
                    c += V::N;
                }
                for (u, a) in acc.iter().enumerate().take(u_n) {
                    if keys.is_none_or(|ks| ks[j + u] != 0.0) {
                        *si.add(j + u) = a.sum() * p.scale;
                    }
                }
                j += u_n;
            }
            let mut mx = V::splat(f32::NEG_INFINITY);
            for c in (0..ld).step_by(V::N) {
                mx = mx.max(V::load(si.add(c)));
            }
            let mut lanes = [0f32; 16];
            mx.store(lanes.as_mut_ptr());
            m[i] = lanes[..V::N].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if m[i] == f32::NEG_INFINITY {
                // sees no key: P = 0 (exp(−∞) = 0 below) and finish_rows gives 0 and lse = +∞
                m[i] = 0.0;
            }
            let (sub, mut sum) = (V::splat(m[i]), V::splat(0.0));
            for c in (0..ld).step_by(V::N) {
                let e = V::load(si.add(c)).sub(sub).exp();
                sum = sum.add(e);
                e.store(si.add(c));
            }
            l[i] = sum.sum();
            if let Some(dr) = &p.dropout {
                let first = (bh * p.lq + r0 + i) * p.lk;
                for j in 0..end {
                    *si.add(j) *= dr.multiplier((first + j) as u64);
                }
            }
        }
        // O = P·V, in column blocks of `BLOCK` vectors: rows × BLOCK accumulators.
        for c0 in (0..d).step_by(V::N * V::BLOCK) {
            let nv = ((d - c0) / V::N).min(V::BLOCK);
            let mut acc = [[V::splat(0.0); 4]; FEW_ROWS];
            for j in 0..end {
                let mut vj = [V::splat(0.0); 4];
                for (u, x) in vj.iter_mut().enumerate().take(nv) {
                    *x = E::lanes(v.as_ptr().add(j * d + c0 + u * V::N));
                }
                for (i, a) in acc.iter_mut().enumerate().take(rows) {
                    let pij = V::splat(*s.as_ptr().add(i * ld + j));
                    for u in 0..nv {
                        a[u] = pij.mul_add(vj[u], a[u]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(rows) {
                for (u, x) in a.iter().enumerate().take(nv) {
                    x.store(o.as_mut_ptr().add(i * d + c0 + u * V::N));
                }
            }
        }
    }
    super::finish_rows(o, d, &m[..rows], &l[..rows], lse);
}

/// Rows `r0..r0 + lse.len()` (at most [`BQ`]) of head `bh`: writes their output and logsumexp.
/// head_dim a multiple of N.
#[inline(always)]
pub(super) unsafe fn forward_block<V: Lanes>(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
    let d = p.d;
    let rows = lse.len();
    assert!(rows <= BQ && o.len() == rows * d && d.is_multiple_of(V::N));
    let nr = rows.div_ceil(V::N);
    if rows <= FEW_ROWS {
        return unsafe {
            match p.half {
                None => {
                    let (_, k, v) = p.head(bh);
                    few_rows::<V, f32>(p, k, v, bh, r0, o, lse)
                }
                Some(super::HalfKv::Bf16(k, v)) => {
                    let (k, v) = p.kv_head(k, v, bh);
                    few_rows::<V, Bf16Bits>(p, marked(k), marked(v), bh, r0, o, lse)
                }
                Some(super::HalfKv::F16(k, v)) => {
                    let (k, v) = p.kv_head(k, v, bh);
                    few_rows::<V, F16Bits>(p, marked(k), marked(v), bh, r0, o, lse)
                }
            }
        };
    }
    assert!(p.half.is_none(), "16-bit keys and values reach only the few-rows kernel");
    let (q, k, v) = p.block(bh, r0, rows);
    let keys = p.keys(bh);
    // scale·Qᵀ, zero in the lanes past `rows`
    let mut qt = vec![0f32; d * BQ];
    p.pack_scaled_t(q, &mut qt, BQ);
    let mut st = vec![0f32; BK * BQ];
    let mut m = [f32::NEG_INFINITY; BQ];
    let mut l = [0f32; BQ];
    let mut corr = [1f32; BQ];
    // per lane: how many keys the query row sees (causal)
    let mut limit = [0i32; BQ];
    p.lane_limits(r0, &mut limit);
    o.fill(0.0);
    let end = p.limit(r0 + rows - 1);
    let first_full = p.limit(r0); // keys below this are visible to every row of the block
    unsafe {
        let (neg_inf, zero, one) = (V::splat(f32::NEG_INFINITY), V::splat(0.0), V::splat(1.0));
        for (j0, n, tile_keys) in super::key_tiles(keys, end, BK) {
            let kt = k[j0 * d..(j0 + n) * d].as_ptr();
            times_packed::<V>(kt, n, d, qt.as_ptr(), st.as_mut_ptr(), nr);
            let diagonal = j0 + n > first_full;
            for t in 0..nr {
                let lim = V::load_limits(limit.as_ptr().add(V::N * t));
                let base = st.as_mut_ptr();
                let col = |j: usize| base.add(j * BQ + V::N * t);
                // hide, and the tile's max
                let mut mx = V::load(m.as_ptr().add(V::N * t));
                let m_old = mx;
                if tile_keys.is_none() && !diagonal {
                    for j in 0..n {
                        mx = mx.max(V::load(col(j)));
                    }
                } else {
                    for j in 0..n {
                        let mut s = V::load(col(j));
                        if tile_keys.is_some_and(|ks| ks[j] == 0.0) {
                            s = neg_inf;
                        } else if diagonal {
                            s = V::select(V::sees(lim, j0 + j), s, neg_inf);
                        }
                        s.store(col(j));
                        mx = mx.max(s);
                    }
                }
                // lanes that have seen nothing yet keep m = −∞; subtract 0 there instead (P = 0)
                let none = mx.is_neg_inf();
                let sub = V::select(none, zero, mx);
                let c = V::select(none, one, m_old.sub(sub).exp());
                let mut sum = zero;
                for j in 0..n {
                    let e = V::load(col(j)).sub(sub).exp();
                    sum = sum.add(e);
                    // Dropout on P after the row sums (softmax's normaliser is undropped).
                    match &p.dropout {
                        Some(dr) => e.mul(keep_lanes(dr, (bh * p.lq + r0 + V::N * t) * p.lk + j0 + j, p.lk)).store(col(j)),
                        None => e.store(col(j)),
                    }
                }
                let lp = l.as_mut_ptr().add(V::N * t);
                V::load(lp).mul_add(c, sum).store(lp);
                mx.store(m.as_mut_ptr().add(V::N * t));
                c.store(corr.as_mut_ptr().add(V::N * t));
            }
            // O = corr∘O + P·V, P(i, j) = Sᵀ[j][i]
            let vt = v[j0 * d..(j0 + n) * d].as_ptr();
            V::product(Strided { a: st.as_ptr(), rs: 1, ts: BQ }, vt, d, n, o.as_mut_ptr(), d, Start::Scale(corr.as_ptr()), rows, d / V::N);
        }
    }
    super::finish_rows(o, d, &m, &l, lse);
}

/// The gradients of one (batch, head) (flash-attention 2's backward pass with the layouts of the
/// forward): dq (q_len × d), dk and dv (kv_len × d), zeroed here. Per key tile of [`BK`] and
/// block of [`BQ`] queries that sees it: Sᵀ = K·(scale·Q)ᵀ, Pᵀ = exp(Sᵀ − lse),
/// dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = scale·Pᵀ∘(dPᵀ − delta), dQ += dS·K, dK += dSᵀ·Q.
/// Extra memory: scale·Qᵀ and dOᵀ packed (2·q_len·d), two BK × BQ tiles, three q_len vectors.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn backward_head<V: Lanes>(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let (d, lq, lk) = (p.d, p.lq, p.lk);
    assert!(d.is_multiple_of(V::N) && o.len() == lq * d && g.len() == lq * d && lse.len() == lq);
    assert!(dq.len() == lq * d && dk.len() == lk * d && dv.len() == lk * d);
    let (q, k, v) = p.head(bh);
    let keys = p.keys(bh);
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    let blocks = lq.div_ceil(BQ);
    let mut qt = vec![0f32; blocks * d * BQ];
    let mut gt = vec![0f32; blocks * d * BQ];
    let mut delta = vec![0f32; blocks * BQ];
    let mut lse_p = vec![f32::INFINITY; blocks * BQ];
    let mut limit = vec![0i32; blocks * BQ];
    for i in 0..lq {
        let (blk, lane) = (i / BQ, i % BQ);
        let (qi, gi, oi) = (&q[i * d..(i + 1) * d], &g[i * d..(i + 1) * d], &o[i * d..(i + 1) * d]);
        for c in 0..d {
            qt[(blk * d + c) * BQ + lane] = qi[c] * p.scale;
            gt[(blk * d + c) * BQ + lane] = gi[c];
        }
        delta[i] = gi.iter().zip(oi).map(|(a, b)| a * b).sum();
        lse_p[i] = lse[i];
        limit[i] = p.limit(i) as i32;
    }
    let mut pt = vec![0f32; BK * BQ];
    let mut ds = vec![0f32; BK * BQ];
    let mut j0 = 0;
    unsafe {
        let (neg_inf, zero, scale) = (V::splat(f32::NEG_INFINITY), V::splat(0.0), V::splat(p.scale));
        while j0 < lk {
            let n = BK.min(lk - j0);
            let tile_keys = keys.map(|ks| &ks[j0..j0 + n]);
            // the first query row that sees key j0
            let first = if p.causal { (j0 + lq).saturating_sub(lk) } else { 0 };
            if first >= lq || tile_keys.is_some_and(|ks| ks.iter().all(|&x| x == 0.0)) {
                j0 += n;
                continue;
            }
            let (kt, vt) = (k[j0 * d..].as_ptr(), v[j0 * d..].as_ptr());
            let (dk_t, dv_t) = (dk[j0 * d..].as_mut_ptr(), dv[j0 * d..].as_mut_ptr());
            for blk in first / BQ..blocks {
                let i0 = blk * BQ;
                let rows = BQ.min(lq - i0);
                let nr = rows.div_ceil(V::N);
                let diagonal = j0 + n > p.limit(i0);
                times_packed::<V>(kt, n, d, qt[blk * d * BQ..].as_ptr(), pt.as_mut_ptr(), nr);
                times_packed::<V>(vt, n, d, gt[blk * d * BQ..].as_ptr(), ds.as_mut_ptr(), nr);
                for t in 0..nr {
                    let lane0 = i0 + V::N * t;
                    let (l, lim, dl) = (V::load(lse_p.as_ptr().add(lane0)), V::load_limits(limit.as_ptr().add(lane0)), V::load(delta.as_ptr().add(lane0)));
                    for j in 0..n {
                        let (pp, dp) = (pt.as_mut_ptr().add(j * BQ + V::N * t), ds.as_mut_ptr().add(j * BQ + V::N * t));
                        let pv = if tile_keys.is_some_and(|ks| ks[j] == 0.0) {
                            zero
                        } else {
                            let mut x = V::load(pp).sub(l);
                            if diagonal {
                                x = V::select(V::sees(lim, j0 + j), x, neg_inf);
                            }
                            x.exp()
                        };
                        // With dropout M: dV takes P∘M, and dS = scale·P∘(M∘dP − δ).
                        match &p.dropout {
                            Some(dr) => {
                                let keep = keep_lanes::<V>(dr, (bh * lq + lane0) * lk + j0 + j, lk);
                                pv.mul(keep).store(pp);
                                pv.mul(scale).mul(V::load(dp).mul(keep).sub(dl)).store(dp);
                            }
                            None => {
                                pv.store(pp);
                                pv.mul(scale).mul(V::load(dp).sub(dl)).store(dp);
                            }
                        }
                    }
                }
                let g_blk = g[i0 * d..].as_ptr();
                let q_blk = q[i0 * d..].as_ptr();
                let vectors = d / V::N;
                // dV += Pᵀ·dO, dK += dSᵀ·Q (rows: keys; sum over the block's queries)
                V::product(Strided { a: pt.as_ptr(), rs: BQ, ts: 1 }, g_blk, d, rows, dv_t, d, Start::Add, n, vectors);
                V::product(Strided { a: ds.as_ptr(), rs: BQ, ts: 1 }, q_blk, d, rows, dk_t, d, Start::Add, n, vectors);
                // dQ += dS·K (rows: queries; sum over the tile's keys)
                V::product(Strided { a: ds.as_ptr(), rs: 1, ts: BQ }, kt, d, n, dq[i0 * d..].as_mut_ptr(), d, Start::Add, rows, vectors);
            }
            j0 += n;
        }
    }
}

/// A level's entry points: `product_at_level` (what its [`Lanes::product`] calls),
/// `forward_block` and `backward_head`, each a `#[target_feature]` function around the generic
/// code, and the safe wrappers the dispatcher calls after the level's `usable`.
macro_rules! entry_points {
    ($lanes:ty, $features:literal) => {
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        unsafe fn product_at_level(a: Strided, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, start: Start, rows: usize, vectors: usize) {
            unsafe { kernels::product::<$lanes>(a, b, ldb, nt, c, ldc, start, rows, vectors) }
        }

        /// Rows `r0..r0 + lse.len()` (at most [`kernels::BQ`]) of head `bh`: writes their output
        /// and logsumexp. The caller checks [`usable`].
        pub fn forward_block(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
            #[target_feature(enable = $features)]
            unsafe fn at_level(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
                unsafe { kernels::forward_block::<$lanes>(p, bh, r0, o, lse) }
            }
            // SAFETY: `usable` checked the CPU features; every pointer the kernels form stays
            // inside its buffer (tiles of n ≤ BK keys of k/v, rows ≤ BQ, head_dim a multiple of the lanes).
            unsafe { at_level(p, bh, r0, o, lse) }
        }

        /// The gradients of one (batch, head); see [`kernels::backward_head`]. The caller checks
        /// [`usable`].
        #[allow(clippy::too_many_arguments)]
        pub fn backward_head(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            unsafe fn at_level(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
                unsafe { kernels::backward_head::<$lanes>(p, bh, o, g, lse, dq, dk, dv) }
            }
            // SAFETY: as for `forward_block`.
            unsafe { at_level(p, bh, o, g, lse, dq, dk, dv) }
        }
    };
}
pub(super) use entry_points;
