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

/// Whether this path applies: AVX-512 on the CPU and head_dim a multiple of 16.
pub fn usable(d: usize) -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    d % 16 == 0 && d > 0 && *OK.get_or_init(|| is_x86_feature_detected!("avx512f"))
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
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
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

/// o[i][..16NV] = corr[i]·o[i][..] + Σ_j pt[j][i]·v[j][..] for the R rows i < R, over n keys.
/// `pt` points at column i0 of Pᵀ, `v` and `o` at column c0.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pv<const R: usize, const NV: usize>(pt: *const f32, v: *const f32, n: usize, d: usize, o: *mut f32, corr: *const f32) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for (r, a) in acc.iter_mut().enumerate() {
        let c = _mm512_set1_ps(unsafe { *corr.add(r) });
        for (t, x) in a.iter_mut().enumerate() {
            *x = _mm512_mul_ps(c, unsafe { _mm512_loadu_ps(o.add(r * d + 16 * t)) });
        }
    }
    for j in 0..n {
        let mut vv = [_mm512_setzero_ps(); NV];
        for (t, x) in vv.iter_mut().enumerate() {
            *x = unsafe { _mm512_loadu_ps(v.add(j * d + 16 * t)) };
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let pb = _mm512_set1_ps(unsafe { *pt.add(j * BQ + r) });
            for t in 0..NV {
                a[t] = _mm512_fmadd_ps(pb, vv[t], a[t]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (t, x) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(o.add(r * d + 16 * t), *x) };
        }
    }
}

/// P·V for `rows` query rows and the NV-vector column chunk at `v`/`o`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pv_chunk<const NV: usize>(pt: *const f32, v: *const f32, n: usize, d: usize, o: *mut f32, corr: *const f32, rows: usize) {
    let mut i = 0;
    unsafe {
        while i + MR <= rows {
            pv::<MR, NV>(pt.add(i), v, n, d, o.add(i * d), corr.add(i));
            i += MR;
        }
        let (pt, o, corr) = (pt.add(i), o.add(i * d), corr.add(i));
        match rows - i {
            0 => {}
            1 => pv::<1, NV>(pt, v, n, d, o, corr),
            2 => pv::<2, NV>(pt, v, n, d, o, corr),
            3 => pv::<3, NV>(pt, v, n, d, o, corr),
            4 => pv::<4, NV>(pt, v, n, d, o, corr),
            _ => pv::<5, NV>(pt, v, n, d, o, corr),
        }
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
    let (d, lk) = (p.d, p.lk);
    let rows = lse.len();
    assert!(rows <= BQ && o.len() == rows * d && d % 16 == 0);
    let nr = rows.div_ceil(16);
    let q = &p.q[(bh * p.lq + r0) * d..][..rows * d];
    let k = &p.k[bh * lk * d..][..lk * d];
    let v = &p.v[bh * lk * d..][..lk * d];
    let keys = p.keys(bh);
    // scale·Qᵀ, zero in the lanes past `rows`
    let mut qt = vec![0f32; d * BQ];
    for i in 0..rows {
        for c in 0..d {
            qt[c * BQ + i] = q[i * d + c] * p.scale;
        }
    }
    let mut st = vec![0f32; BK * BQ];
    let mut m = [f32::NEG_INFINITY; BQ];
    let mut l = [0f32; BQ];
    let mut corr = [1f32; BQ];
    // per lane: how many keys the query row sees (causal), as i32
    let mut limit = [0i32; BQ];
    for (i, x) in limit.iter_mut().enumerate() {
        *x = p.limit((r0 + i).min(p.lq - 1)) as i32;
    }
    o.fill(0.0);
    let end = p.limit(r0 + rows - 1);
    let first_full = p.limit(r0); // keys below this are visible to every row of the block
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut j0 = 0;
    while j0 < end {
        let n = BK.min(end - j0);
        let tile_keys = keys.map(|ks| &ks[j0..j0 + n]);
        if tile_keys.is_some_and(|ks| ks.iter().all(|&x| x == 0.0)) {
            j0 += n;
            continue;
        }
        let kt = k[j0 * d..(j0 + n) * d].as_ptr();
        match nr {
            1 => unsafe { qk_tile::<1>(kt, n, d, qt.as_ptr(), st.as_mut_ptr()) },
            2 => unsafe { qk_tile::<2>(kt, n, d, qt.as_ptr(), st.as_mut_ptr()) },
            3 => unsafe { qk_tile::<3>(kt, n, d, qt.as_ptr(), st.as_mut_ptr()) },
            _ => unsafe { qk_tile::<4>(kt, n, d, qt.as_ptr(), st.as_mut_ptr()) },
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
        let mut c0 = 0;
        while c0 < d {
            let (vc, oc) = (unsafe { vt.add(c0) }, unsafe { o.as_mut_ptr().add(c0) });
            match ((d - c0) / 16).min(4) {
                1 => unsafe { pv_chunk::<1>(st.as_ptr(), vc, n, d, oc, corr.as_ptr(), rows) },
                2 => unsafe { pv_chunk::<2>(st.as_ptr(), vc, n, d, oc, corr.as_ptr(), rows) },
                3 => unsafe { pv_chunk::<3>(st.as_ptr(), vc, n, d, oc, corr.as_ptr(), rows) },
                _ => unsafe { pv_chunk::<4>(st.as_ptr(), vc, n, d, oc, corr.as_ptr(), rows) },
            }
            c0 += 64;
        }
        j0 += n;
    }
    for i in 0..rows {
        let row = &mut o[i * d..(i + 1) * d];
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
