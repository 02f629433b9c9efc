//! The CPU forward pass with AVX-512 micro-kernels of our own (the `gemm` crate, as candle
//! builds it, runs AVX2 kernels only).
//!
//! One task = one (batch, head) and a block of up to [`BQ`] = 64 query rows. The task keeps
//! scale·Qᵀ packed (head_dim × 64, queries along the vector lanes) and, per tile of [`BK`] keys:
//!
//! 1. Sᵀ (BK × 64) = K·(scale·Qᵀ): each key row of K is broadcast one element at a time
//!    against four 16-query vectors of Qᵀ; a 6-key × 4-vector register block (24 zmm
//!    accumulators) per micro-kernel call. Queries along the lanes make step 2 vertical.
//! 2. The online softmax on Sᵀ: padding and causality become −∞ by lane masks, then the running
//!    max m, the correction exp(m_old − m_new), P = exp(S − m_new) and the running sum l, all
//!    elementwise on 16-query vectors (no horizontal reductions at all).
//! 3. O (64 × head_dim, row-major, the task's slice of the output) = corr·O + P·V: Pᵀ's row j
//!    holds P[i][j] for consecutive queries i, so 6 of them are broadcast against 4 vectors of V's
//!    row j (64 columns of head_dim), again 24 accumulators; O is loaded and stored once per tile.
//!
//! Extra memory per task: Qᵀ (64·head_dim floats), Sᵀ (BK·64) and three 64-float vectors.

use super::Problem;
use std::arch::x86_64::*;

/// Query rows per task: four 16-lane vectors.
pub const BQ: usize = 64;
/// Keys per tile.
pub const BK: usize = 128;
/// Keys (for Sᵀ) and query rows (for P·V) per micro-kernel call.
const MR: usize = 6;
/// Blocks of at most this many query rows (decoding) compute Sᵀ by dot products.
const DOT_ROWS: usize = 4;

/// Whether this path applies: AVX-512 chosen (`wick::cpu::isa`) and head_dim a multiple of 16.
pub fn usable(d: usize) -> bool {
    d.is_multiple_of(16) && d > 0 && crate::cpu::isa() == crate::cpu::Isa::Avx512
}

/// e^x lane-wise (Cephes' expf polynomial after a Cody-Waite reduction, scaled with vscalefps);
/// 0 for x < −87 and for −∞.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp(x: __m512) -> __m512 {
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
    let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
    _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(e, n))
}

/// st[j][16t..16t+16] = Σ_c k[j][c]·qt[c][16t..] for the R keys j < R and NR vectors t.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn qk<const R: usize, const NR: usize>(k: *const f32, d: usize, qt: *const f32, st: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); NR]; R];
    for c in 0..d {
        let mut qv = [_mm512_setzero_ps(); NR];
        for (t, q) in qv.iter_mut().enumerate() {
            *q = unsafe { _mm512_loadu_ps(qt.add(c * BQ + 16 * t)) };
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let kb = _mm512_set1_ps(unsafe { *k.add(r * d + c) });
            for t in 0..NR {
                a[t] = _mm512_fmadd_ps(kb, qv[t], a[t]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (t, v) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(st.add(r * BQ + 16 * t), *v) };
        }
    }
}

/// Sᵀ for n keys, with NR query vectors.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn qk_tile<const NR: usize>(k: *const f32, n: usize, d: usize, qt: *const f32, st: *mut f32) {
    let mut j = 0;
    unsafe {
        while j + MR <= n {
            qk::<MR, NR>(k.add(j * d), d, qt, st.add(j * BQ));
            j += MR;
        }
        match n - j {
            0 => {}
            1 => qk::<1, NR>(k.add(j * d), d, qt, st.add(j * BQ)),
            2 => qk::<2, NR>(k.add(j * d), d, qt, st.add(j * BQ)),
            3 => qk::<3, NR>(k.add(j * d), d, qt, st.add(j * BQ)),
            4 => qk::<4, NR>(k.add(j * d), d, qt, st.add(j * BQ)),
            _ => qk::<5, NR>(k.add(j * d), d, qt, st.add(j * BQ)),
        }
    }
}

/// c[r][..16NV] = base_r + Σ_{t < nt} a[r·ar + t·at]·b[t·ldb ..] for the R rows r < R, where
/// base_r = corr[r]·c[r][..] (or c[r][..] when `corr` is null: plain accumulation).
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rank_update<const R: usize, const NV: usize>(a: *const f32, ar: usize, at: usize, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, corr: *const f32) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for (r, x) in acc.iter_mut().enumerate() {
        for (t, y) in x.iter_mut().enumerate() {
            *y = unsafe { _mm512_loadu_ps(c.add(r * ldc + 16 * t)) };
            if !corr.is_null() {
                *y = _mm512_mul_ps(_mm512_set1_ps(unsafe { *corr.add(r) }), *y);
            }
        }
    }
    for t in 0..nt {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (u, x) in bv.iter_mut().enumerate() {
            *x = unsafe { _mm512_loadu_ps(b.add(t * ldb + 16 * u)) };
        }
        for (r, x) in acc.iter_mut().enumerate() {
            let ab = _mm512_set1_ps(unsafe { *a.add(r * ar + t * at) });
            for u in 0..NV {
                x[u] = _mm512_fmadd_ps(ab, bv[u], x[u]);
            }
        }
    }
    for (r, x) in acc.iter().enumerate() {
        for (t, y) in x.iter().enumerate() {
            unsafe { _mm512_storeu_ps(c.add(r * ldc + 16 * t), *y) };
        }
    }
}

/// [`rank_update`] for `rows` rows and NV vectors of columns.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rank_update_rows<const NV: usize>(a: *const f32, ar: usize, at: usize, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, corr: *const f32, rows: usize) {
    let mut i = 0;
    let cr = |i: usize| if corr.is_null() { corr } else { unsafe { corr.add(i) } };
    unsafe {
        while i + MR <= rows {
            rank_update::<MR, NV>(a.add(i * ar), ar, at, b, ldb, nt, c.add(i * ldc), ldc, cr(i));
            i += MR;
        }
        let (a, c, corr) = (a.add(i * ar), c.add(i * ldc), cr(i));
        match rows - i {
            0 => {}
            1 => rank_update::<1, NV>(a, ar, at, b, ldb, nt, c, ldc, corr),
            2 => rank_update::<2, NV>(a, ar, at, b, ldb, nt, c, ldc, corr),
            3 => rank_update::<3, NV>(a, ar, at, b, ldb, nt, c, ldc, corr),
            4 => rank_update::<4, NV>(a, ar, at, b, ldb, nt, c, ldc, corr),
            _ => rank_update::<5, NV>(a, ar, at, b, ldb, nt, c, ldc, corr),
        }
    }
}

/// C (rows × d, row stride d) = corr∘C + A·B, where A(r, t) = a[r·ar + t·at] (t < nt) and B is
/// nt × d with row stride d; or C += A·B when `corr` is null. d a multiple of 16.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn product(a: *const f32, ar: usize, at: usize, b: *const f32, nt: usize, c: *mut f32, corr: *const f32, rows: usize, d: usize) {
    let mut c0 = 0;
    while c0 < d {
        let (bc, cc) = (unsafe { b.add(c0) }, unsafe { c.add(c0) });
        match ((d - c0) / 16).min(4) {
            1 => unsafe { rank_update_rows::<1>(a, ar, at, bc, d, nt, cc, d, corr, rows) },
            2 => unsafe { rank_update_rows::<2>(a, ar, at, bc, d, nt, cc, d, corr, rows) },
            3 => unsafe { rank_update_rows::<3>(a, ar, at, bc, d, nt, cc, d, corr, rows) },
            _ => unsafe { rank_update_rows::<4>(a, ar, at, bc, d, nt, cc, d, corr, rows) },
        }
        c0 += 64;
    }
}

/// Sᵀ[j][i] = scale·q_i·k_j for a few query rows (decoding): dot products along head_dim, four
/// keys at a time, instead of [`qk_tile`]'s 16-query vectors, which would be mostly empty lanes.
/// Lanes `rows..16` of Sᵀ are left as they were (finite, never used for output).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn qk_dot(q: *const f32, rows: usize, k: *const f32, n: usize, d: usize, scale: f32, st: *mut f32) {
    for i in 0..rows {
        let qi = unsafe { q.add(i * d) };
        let mut j = 0;
        while j < n {
            let u_n = (n - j).min(4);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut c = 0;
            while c < d {
                let qv = unsafe { _mm512_loadu_ps(qi.add(c)) };
                for (u, a) in acc.iter_mut().enumerate().take(u_n) {
                    *a = _mm512_fmadd_ps(qv, unsafe { _mm512_loadu_ps(k.add((j + u) * d + c)) }, *a);
                }
                c += 16;
            }
            for (u, a) in acc.iter().enumerate().take(u_n) {
                unsafe { *st.add((j + u) * BQ + i) = _mm512_reduce_add_ps(*a) * scale };
            }
            j += u_n;
        }
    }
}

/// Xᵀ (n × BQ, queries along the lanes) = rows·Pᵀ for the n rows of `rows` (row-major, d
/// columns) against the packed d × BQ matrix `packed`, with `nr` 16-lane vectors.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn times_packed(rows: *const f32, n: usize, d: usize, packed: *const f32, out: *mut f32, nr: usize) {
    match nr {
        1 => unsafe { qk_tile::<1>(rows, n, d, packed, out) },
        2 => unsafe { qk_tile::<2>(rows, n, d, packed, out) },
        3 => unsafe { qk_tile::<3>(rows, n, d, packed, out) },
        _ => unsafe { qk_tile::<4>(rows, n, d, packed, out) },
    }
}

/// Rows `r0..r0 + lse.len()` (at most [`BQ`]) of head `bh`: writes their output and logsumexp.
/// The caller checks [`usable`].
pub fn forward_block(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: `usable` checked the CPU features; every pointer below stays inside its buffer
    // (tiles of n ≤ BK keys of k/v, rows ≤ BQ, head_dim a multiple of 16).
    unsafe { forward_block_impl(p, bh, r0, o, lse) }
}

#[target_feature(enable = "avx512f")]
unsafe fn forward_block_impl(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
    let d = p.d;
    let rows = lse.len();
    assert!(rows <= BQ && o.len() == rows * d && d.is_multiple_of(16));
    let nr = rows.div_ceil(16);
    let (q, k, v) = p.block(bh, r0, rows);
    let keys = p.keys(bh);
    // scale·Qᵀ, zero in the lanes past `rows`
    let mut qt = vec![0f32; if rows <= DOT_ROWS { 0 } else { d * BQ }];
    if rows > DOT_ROWS {
        p.pack_scaled_t(q, &mut qt, BQ);
    }
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
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    for (j0, n, tile_keys) in super::key_tiles(keys, end, BK) {
        let kt = k[j0 * d..(j0 + n) * d].as_ptr();
        if rows <= DOT_ROWS {
            unsafe { qk_dot(q.as_ptr(), rows, kt, n, d, p.scale, st.as_mut_ptr()) };
        } else {
            unsafe { times_packed(kt, n, d, qt.as_ptr(), st.as_mut_ptr(), nr) };
        }
        let diagonal = j0 + n > first_full;
        for t in 0..nr {
            let lim = unsafe { _mm512_loadu_si512(limit.as_ptr().add(16 * t) as *const _) };
            let base = st.as_mut_ptr();
            let col = |j: usize| unsafe { base.add(j * BQ + 16 * t) };
            // hide, and the tile's max
            let mut mx = unsafe { _mm512_loadu_ps(m.as_ptr().add(16 * t)) };
            let m_old = mx;
            for j in 0..n {
                let mut s = unsafe { _mm512_loadu_ps(col(j)) };
                if tile_keys.is_some_and(|ks| ks[j] == 0.0) {
                    s = neg_inf;
                } else if diagonal {
                    let seen = _mm512_cmplt_epi32_mask(_mm512_set1_epi32((j0 + j) as i32), lim);
                    s = _mm512_mask_blend_ps(seen, neg_inf, s);
                }
                unsafe { _mm512_storeu_ps(col(j), s) };
                mx = _mm512_max_ps(mx, s);
            }
            // lanes that have seen nothing yet keep m = −∞; subtract 0 there instead (P = 0)
            let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(mx, neg_inf);
            let sub = _mm512_mask_blend_ps(none, mx, _mm512_setzero_ps());
            let c = _mm512_mask_blend_ps(none, exp(_mm512_sub_ps(m_old, sub)), _mm512_set1_ps(1.0));
            let mut sum = _mm512_setzero_ps();
            for j in 0..n {
                let e = exp(_mm512_sub_ps(unsafe { _mm512_loadu_ps(col(j)) }, sub));
                unsafe { _mm512_storeu_ps(col(j), e) };
                sum = _mm512_add_ps(sum, e);
            }
            unsafe {
                let lp = l.as_mut_ptr().add(16 * t);
                _mm512_storeu_ps(lp, _mm512_fmadd_ps(_mm512_loadu_ps(lp), c, sum));
                _mm512_storeu_ps(m.as_mut_ptr().add(16 * t), mx);
                _mm512_storeu_ps(corr.as_mut_ptr().add(16 * t), c);
            }
        }
        let vt = v[j0 * d..(j0 + n) * d].as_ptr();
        // O = corr∘O + P·V, P(i, j) = Sᵀ[j][i]
        unsafe { product(st.as_ptr(), 1, BQ, vt, n, o.as_mut_ptr(), corr.as_ptr(), rows, d) };
    }
    super::finish_rows(o, d, &m, &l, lse);
}

/// The gradients of one (batch, head) (flash-attention 2's backward pass with the layouts of the
/// forward): dq (q_len × d), dk and dv (kv_len × d), zeroed here. Per key tile of [`BK`] and
/// block of [`BQ`] queries that sees it: Sᵀ = K·(scale·Q)ᵀ, Pᵀ = exp(Sᵀ − lse),
/// dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = scale·Pᵀ∘(dPᵀ − delta), dQ += dS·K, dK += dSᵀ·Q.
/// Extra memory: scale·Qᵀ and dOᵀ packed (2·q_len·d), two BK × BQ tiles, three q_len vectors.
#[allow(clippy::too_many_arguments)]
pub fn backward_head(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    // SAFETY: as for `forward_block`.
    unsafe { backward_head_impl(p, bh, o, g, lse, dq, dk, dv) }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn backward_head_impl(p: &Problem, bh: usize, o: &[f32], g: &[f32], lse: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let (d, lq, lk) = (p.d, p.lq, p.lk);
    assert!(d.is_multiple_of(16) && o.len() == lq * d && g.len() == lq * d && lse.len() == lq);
    assert!(dq.len() == lq * d && dk.len() == lk * d && dv.len() == lk * d);
    let q = &p.q[bh * lq * d..][..lq * d];
    let k = &p.k[bh * lk * d..][..lk * d];
    let v = &p.v[bh * lk * d..][..lk * d];
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
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let scale = _mm512_set1_ps(p.scale);
    let mut j0 = 0;
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
            let nr = rows.div_ceil(16);
            let diagonal = j0 + n > p.limit(i0);
            unsafe {
                times_packed(kt, n, d, qt[blk * d * BQ..].as_ptr(), pt.as_mut_ptr(), nr);
                times_packed(vt, n, d, gt[blk * d * BQ..].as_ptr(), ds.as_mut_ptr(), nr);
            }
            for t in 0..nr {
                let lane0 = i0 + 16 * t;
                let (l, lim, dl) = unsafe {
                    (
                        _mm512_loadu_ps(lse_p.as_ptr().add(lane0)),
                        _mm512_loadu_si512(limit.as_ptr().add(lane0) as *const _),
                        _mm512_loadu_ps(delta.as_ptr().add(lane0)),
                    )
                };
                for j in 0..n {
                    let (pp, dp) = unsafe { (pt.as_mut_ptr().add(j * BQ + 16 * t), ds.as_mut_ptr().add(j * BQ + 16 * t)) };
                    let pv = if tile_keys.is_some_and(|ks| ks[j] == 0.0) {
                        _mm512_setzero_ps()
                    } else {
                        let mut x = _mm512_sub_ps(unsafe { _mm512_loadu_ps(pp) }, l);
                        if diagonal {
                            let seen = _mm512_cmplt_epi32_mask(_mm512_set1_epi32((j0 + j) as i32), lim);
                            x = _mm512_mask_blend_ps(seen, neg_inf, x);
                        }
                        exp(x)
                    };
                    let dsv = _mm512_mul_ps(_mm512_mul_ps(pv, scale), _mm512_sub_ps(unsafe { _mm512_loadu_ps(dp) }, dl));
                    unsafe {
                        _mm512_storeu_ps(pp, pv);
                        _mm512_storeu_ps(dp, dsv);
                    }
                }
            }
            let null = std::ptr::null();
            unsafe {
                // dV += Pᵀ·dO, dK += dSᵀ·Q (rows: keys; sum over the block's queries)
                product(pt.as_ptr(), BQ, 1, g[i0 * d..].as_ptr(), rows, dv_t, null, n, d);
                product(ds.as_ptr(), BQ, 1, q[i0 * d..].as_ptr(), rows, dk_t, null, n, d);
                // dQ += dS·K (rows: queries; sum over the tile's keys)
                product(ds.as_ptr(), 1, BQ, kt, n, dq[i0 * d..].as_mut_ptr(), null, rows, d);
            }
        }
        j0 += n;
    }
}
