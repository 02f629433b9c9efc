//! The CPU forward pass with AVX2+FMA micro-kernels of our own: the 8-lane twin of
//! `avx512.rs`'s forward (the backward pass runs the `gemm`-crate path on AVX2 machines). It
//! replaces tiles of small `gemm` products (64 × 256 × 64, each packing its operands), which
//! reached about half the FMA rate, by register-blocked loops over data already laid out for
//! them.
//!
//! One task = one (batch, head) and a block of up to [`BQ`] = 64 query rows. The task keeps
//! scale·Qᵀ packed (head_dim × 64, queries along the vector lanes) and, per tile of [`BK`] keys:
//!
//! 1. Sᵀ (BK × 64) = K·(scale·Qᵀ): each key row of K is broadcast one element at a time
//!    against two 8-query vectors of Qᵀ; a 6-key × 2-vector register block (12 ymm
//!    accumulators + 2 Qᵀ vectors + 1 broadcast = 15 of the 16 registers) per micro-kernel
//!    call, four calls for 64 queries (the key rows stay in L1 between them).
//! 2. The online softmax on Sᵀ: padding and causality become −∞ by lane masks, then the running
//!    max m, the correction exp(m_old − m_new), P = exp(S − m_new) and the running sum l, all
//!    elementwise on 8-query vectors (no horizontal reductions).
//! 3. O (64 × head_dim, row-major, the task's slice of the output) = corr·O + P·V: Pᵀ's row j
//!    holds P[i][j] for consecutive queries i, so 6 of them are broadcast against 2 vectors of V's
//!    row j (16 columns of head_dim), again 12 accumulators; O is loaded and stored once per
//!    tile and 16 columns.
//!
//! Memory traffic per tile: K and V tiles (BK·head_dim floats each, 32 KiB at head_dim 64) read
//! from L2 once per 16 queries (Sᵀ) or 16 columns (P·V); Sᵀ (32 KiB) written twice and read
//! twice, in L1/L2. Extra memory per task: Qᵀ (64·head_dim floats), Sᵀ (BK·64) and three
//! 64-float vectors. The block bounds, packing, tile walk and final normalisation are shared with
//! `avx512.rs` (in `attention.rs`).

use super::Problem;
use std::arch::x86_64::*;

/// Query rows per task: eight 8-lane vectors.
pub const BQ: usize = 64;
/// Keys per tile.
pub const BK: usize = 128;
/// Keys (for Sᵀ) and query rows (for P·V) per micro-kernel call.
const MR: usize = 6;
/// Blocks of at most this many query rows (decoding) compute Sᵀ by dot products.
const DOT_ROWS: usize = 4;

/// Whether this path applies: AVX2 chosen (`wick::cpu::isa`) and head_dim a multiple of 8.
pub fn usable(d: usize) -> bool {
    d.is_multiple_of(8) && d > 0 && crate::cpu::isa() == crate::cpu::Isa::Avx2
}

/// e^x lane-wise (Cephes' expf polynomial after a Cody-Waite reduction, 2^n built in the
/// exponent bits); 0 for x < −87, for −∞ and for NaN.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp(x: __m256) -> __m256 {
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
    let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
    // n ∈ [−126, 127] after the clamp: 2^n is the normal float with biased exponent n + 127
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_and_ps(_mm256_mul_ps(e, pow2), keep)
}

/// st[j][8t..8t+8] = Σ_c k[j][c]·qt[c][8t..] for the R keys j < R and NR vectors t.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn qk<const R: usize, const NR: usize>(k: *const f32, d: usize, qt: *const f32, st: *mut f32) {
    let mut acc = [[_mm256_setzero_ps(); NR]; R];
    for c in 0..d {
        let mut qv = [_mm256_setzero_ps(); NR];
        for (t, q) in qv.iter_mut().enumerate() {
            *q = unsafe { _mm256_loadu_ps(qt.add(c * BQ + 8 * t)) };
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let kb = _mm256_set1_ps(unsafe { *k.add(r * d + c) });
            for t in 0..NR {
                a[t] = _mm256_fmadd_ps(kb, qv[t], a[t]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (t, v) in a.iter().enumerate() {
            unsafe { _mm256_storeu_ps(st.add(r * BQ + 8 * t), *v) };
        }
    }
}

/// Sᵀ for n keys and the query vectors 0..nr, [`MR`] keys × 2 vectors at a time.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn qk_tile(k: *const f32, n: usize, d: usize, qt: *const f32, st: *mut f32, nr: usize) {
    let mut t = 0;
    while t < nr {
        let (qt, st) = unsafe { (qt.add(8 * t), st.add(8 * t)) };
        if nr - t >= 2 {
            unsafe { qk_keys::<2>(k, n, d, qt, st) };
        } else {
            unsafe { qk_keys::<1>(k, n, d, qt, st) };
        }
        t += 2;
    }
}

/// [`qk`] over n keys, NR query vectors.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn qk_keys<const NR: usize>(k: *const f32, n: usize, d: usize, qt: *const f32, st: *mut f32) {
    let mut j = 0;
    unsafe {
        while j + MR <= n {
            qk::<MR, NR>(k.add(j * d), d, qt, st.add(j * BQ));
            j += MR;
        }
        let (k, st) = (k.add(j * d), st.add(j * BQ));
        match n - j {
            0 => {}
            1 => qk::<1, NR>(k, d, qt, st),
            2 => qk::<2, NR>(k, d, qt, st),
            3 => qk::<3, NR>(k, d, qt, st),
            4 => qk::<4, NR>(k, d, qt, st),
            _ => qk::<5, NR>(k, d, qt, st),
        }
    }
}

/// c[r][..8NV] = corr[r]·c[r][..] + Σ_{t < nt} a[r + t·BQ]·b[t·d ..] for the R rows r < R
/// (a is Pᵀ: query r's probability of key t at a[t·BQ + r]).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rank_update<const R: usize, const NV: usize>(a: *const f32, b: *const f32, d: usize, nt: usize, c: *mut f32, corr: *const f32) {
    let mut acc = [[_mm256_setzero_ps(); NV]; R];
    for (r, x) in acc.iter_mut().enumerate() {
        let cr = _mm256_set1_ps(unsafe { *corr.add(r) });
        for (t, y) in x.iter_mut().enumerate() {
            *y = _mm256_mul_ps(cr, unsafe { _mm256_loadu_ps(c.add(r * d + 8 * t)) });
        }
    }
    for t in 0..nt {
        let mut bv = [_mm256_setzero_ps(); NV];
        for (u, x) in bv.iter_mut().enumerate() {
            *x = unsafe { _mm256_loadu_ps(b.add(t * d + 8 * u)) };
        }
        for (r, x) in acc.iter_mut().enumerate() {
            let ab = _mm256_set1_ps(unsafe { *a.add(r + t * BQ) });
            for u in 0..NV {
                x[u] = _mm256_fmadd_ps(ab, bv[u], x[u]);
            }
        }
    }
    for (r, x) in acc.iter().enumerate() {
        for (t, y) in x.iter().enumerate() {
            unsafe { _mm256_storeu_ps(c.add(r * d + 8 * t), *y) };
        }
    }
}

/// [`rank_update`] for `rows` rows, NV vectors of columns.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rank_update_rows<const NV: usize>(a: *const f32, b: *const f32, d: usize, nt: usize, c: *mut f32, corr: *const f32, rows: usize) {
    let mut i = 0;
    unsafe {
        while i + MR <= rows {
            rank_update::<MR, NV>(a.add(i), b, d, nt, c.add(i * d), corr.add(i));
            i += MR;
        }
        let (a, c, corr) = (a.add(i), c.add(i * d), corr.add(i));
        match rows - i {
            0 => {}
            1 => rank_update::<1, NV>(a, b, d, nt, c, corr),
            2 => rank_update::<2, NV>(a, b, d, nt, c, corr),
            3 => rank_update::<3, NV>(a, b, d, nt, c, corr),
            4 => rank_update::<4, NV>(a, b, d, nt, c, corr),
            _ => rank_update::<5, NV>(a, b, d, nt, c, corr),
        }
    }
}

/// O (rows × d) = corr∘O + P·V with P(i, t) = pt[t·BQ + i] (t < nt), V nt × d; d a multiple
/// of 8, 16 columns at a time.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv(pt: *const f32, v: *const f32, nt: usize, o: *mut f32, corr: *const f32, rows: usize, d: usize) {
    let mut c0 = 0;
    while c0 < d {
        let (vc, oc) = unsafe { (v.add(c0), o.add(c0)) };
        if d - c0 >= 16 {
            unsafe { rank_update_rows::<2>(pt, vc, d, nt, oc, corr, rows) };
        } else {
            unsafe { rank_update_rows::<1>(pt, vc, d, nt, oc, corr, rows) };
        }
        c0 += 16;
    }
}

/// The sum of a vector's 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sum_lanes(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Sᵀ[j][i] = scale·q_i·k_j for a few query rows (decoding): dot products along head_dim, four
/// keys at a time, instead of [`qk_tile`]'s 8-query vectors, which would be mostly empty lanes.
/// Lanes `rows..` of Sᵀ are left as they were (finite, never used for output).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn qk_dot(q: *const f32, rows: usize, k: *const f32, n: usize, d: usize, scale: f32, st: *mut f32) {
    for i in 0..rows {
        let qi = unsafe { q.add(i * d) };
        let mut j = 0;
        while j < n {
            let u_n = (n - j).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < d {
                let qv = unsafe { _mm256_loadu_ps(qi.add(c)) };
                for (u, a) in acc.iter_mut().enumerate().take(u_n) {
                    *a = _mm256_fmadd_ps(qv, unsafe { _mm256_loadu_ps(k.add((j + u) * d + c)) }, *a);
                }
                c += 8;
            }
            for (u, a) in acc.iter().enumerate().take(u_n) {
                unsafe { *st.add((j + u) * BQ + i) = sum_lanes(*a) * scale };
            }
            j += u_n;
        }
    }
}

/// Rows `r0..r0 + lse.len()` (at most [`BQ`]) of head `bh`: writes their output and logsumexp.
/// The caller checks [`usable`].
pub fn forward_block(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: `usable` checked the CPU features; every pointer below stays inside its buffer
    // (tiles of n ≤ BK keys of k/v, rows ≤ BQ, head_dim a multiple of 8).
    unsafe { forward_block_impl(p, bh, r0, o, lse) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn forward_block_impl(p: &Problem, bh: usize, r0: usize, o: &mut [f32], lse: &mut [f32]) {
    let d = p.d;
    let rows = lse.len();
    assert!(rows <= BQ && o.len() == rows * d && d.is_multiple_of(8));
    let nr = rows.div_ceil(8);
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
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    for (j0, n, tile_keys) in super::key_tiles(keys, end, BK) {
        let kt = k[j0 * d..(j0 + n) * d].as_ptr();
        if rows <= DOT_ROWS {
            unsafe { qk_dot(q.as_ptr(), rows, kt, n, d, p.scale, st.as_mut_ptr()) };
        } else {
            unsafe { qk_tile(kt, n, d, qt.as_ptr(), st.as_mut_ptr(), nr) };
        }
        let diagonal = j0 + n > first_full;
        for t in 0..nr {
            let lim = unsafe { _mm256_loadu_si256(limit.as_ptr().add(8 * t) as *const _) };
            let base = st.as_mut_ptr();
            let col = |j: usize| unsafe { base.add(j * BQ + 8 * t) };
            // hide, and the tile's max
            let mut mx = unsafe { _mm256_loadu_ps(m.as_ptr().add(8 * t)) };
            let m_old = mx;
            for j in 0..n {
                let mut s = unsafe { _mm256_loadu_ps(col(j)) };
                if tile_keys.is_some_and(|ks| ks[j] == 0.0) {
                    s = neg_inf;
                } else if diagonal {
                    let seen = _mm256_cmpgt_epi32(lim, _mm256_set1_epi32((j0 + j) as i32));
                    s = _mm256_blendv_ps(neg_inf, s, _mm256_castsi256_ps(seen));
                }
                unsafe { _mm256_storeu_ps(col(j), s) };
                mx = _mm256_max_ps(mx, s);
            }
            // lanes that have seen nothing yet keep m = −∞; subtract 0 there instead (P = 0)
            let none = _mm256_cmp_ps::<_CMP_EQ_OQ>(mx, neg_inf);
            let sub = _mm256_blendv_ps(mx, _mm256_setzero_ps(), none);
            let c = _mm256_blendv_ps(exp(_mm256_sub_ps(m_old, sub)), _mm256_set1_ps(1.0), none);
            let mut sum = _mm256_setzero_ps();
            for j in 0..n {
                let e = exp(_mm256_sub_ps(unsafe { _mm256_loadu_ps(col(j)) }, sub));
                unsafe { _mm256_storeu_ps(col(j), e) };
                sum = _mm256_add_ps(sum, e);
            }
            unsafe {
                let lp = l.as_mut_ptr().add(8 * t);
                _mm256_storeu_ps(lp, _mm256_fmadd_ps(_mm256_loadu_ps(lp), c, sum));
                _mm256_storeu_ps(m.as_mut_ptr().add(8 * t), mx);
                _mm256_storeu_ps(corr.as_mut_ptr().add(8 * t), c);
            }
        }
        let vt = v[j0 * d..(j0 + n) * d].as_ptr();
        // O = corr∘O + P·V, P(i, j) = Sᵀ[j][i]
        unsafe { pv(st.as_ptr(), vt, n, o.as_mut_ptr(), corr.as_ptr(), rows, d) };
    }
    super::finish_rows(o, d, &m, &l, lse);
}
