//! The loops of [`super`]'s products, written once (the `kernels!` macro) and compiled for each
//! instruction-set level: AVX-512 (16 lanes), AVX2 + FMA + F16C (8 lanes) and portable Rust
//! (8-lane arrays the compiler vectorises as the baseline target allows). Each level's module
//! defines the same few vector primitives (`zero`, `splat`, `fma`, `load_f32`, `store`, `hsum`,
//! and `load::<W>`, which widens 8 or 16 weights of any stored type to f32); the macro builds the
//! register tiles and the loops over a task's columns from them.
//!
//! Every kernel accumulates into `y` (`y += x·W`), which the caller fills with the bias rows or
//! zeros, so a tile loads its accumulators, adds a block of the sum and stores them back.

// The kernels take raw pointers with their strides and sizes: more than clippy's 7 arguments.
#![allow(clippy::too_many_arguments)]

use super::{Kind, Weight};

/// Rows of W per block in the (in, out) product, for a weight of `kind` (rows of `row_bytes`)
/// times `m` rows of x. The tiles sweep a task's columns block by block: the block's rows are
/// read as that many streams (the next block's prefetched), while each tile's accumulators are
/// loaded and stored once per block. Few streams suit memory: f32 weights read 25–40% faster in
/// blocks of 4 rows than of 16 (`benches/matvec`, GPT-2 shapes, AMD Zen 3, 1 and 2 threads).
/// One row of x (decoding) takes blocks of about [`ONE_ROW_BLOCK_BYTES`]: one row of GPT-2's
/// wide weights (2304 and 3072 columns), 4 of its 768-column ones. On an AMD EPYC (Zen 5) that
/// read the wide bf16 weights at 30–36 GB/s against 20–26 in blocks of 4 (one thread), and
/// decoded bf16 GPT-2 10–19% faster (two threads, four alternating pairs; `notes/cpu-speed.md`,
/// session 18). Widened f16/bf16 weights times several rows are bound by arithmetic, and there
/// the accumulators' loads and stores cost more: 16 rows ran up to 1.8× faster than 4.
pub(super) fn block_rows(kind: Kind, m: usize, row_bytes: usize) -> usize {
    if m == 1 {
        (ONE_ROW_BLOCK_BYTES / row_bytes.max(1)).clamp(1, 4)
    } else if kind == Kind::F32 {
        4
    } else {
        16
    }
}

/// The weight bytes a block of [`block_rows`] holds, about, for one row of x.
const ONE_ROW_BLOCK_BYTES: usize = 6144;

macro_rules! kernels {
    ($(#[$attr:meta])*) => {
        /// y[r][c·L + l] += Σ_{i<kb} x[r][i] · w[i][c·L + l] for r < R, c < C, l < L: all
        /// pointers at the tile's origin; x rows `ldx` apart, w rows `ldw`, y rows `ldy`.
        $(#[$attr])*
        unsafe fn in_out_tile<W: Weight, const R: usize, const C: usize>(x: *const f32, ldx: usize, w: *const W::Raw, ldw: usize, kb: usize, y: *mut f32, ldy: usize) {
            unsafe {
                let mut acc = [[zero(); C]; R];
                for (r, a) in acc.iter_mut().enumerate() {
                    for (c, v) in a.iter_mut().enumerate() {
                        *v = load_f32(y.add(r * ldy + c * L));
                    }
                }
                // Prefetch the tile's columns of the next block of rows, one cache line each.
                let step = (64 / (L * std::mem::size_of::<W::Raw>())).max(1);
                for i in 0..kb {
                    let wi = w.add(i * ldw);
                    for c in (0..C).step_by(step) {
                        prefetch(wi.wrapping_add(kb * ldw + c * L));
                    }
                    let mut xr = [zero(); R];
                    for (r, v) in xr.iter_mut().enumerate() {
                        *v = splat(*x.add(r * ldx + i));
                    }
                    for c in 0..C {
                        let wv = load::<W>(wi.add(c * L));
                        for r in 0..R {
                            acc[r][c] = fma(xr[r], wv, acc[r][c]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    for (c, v) in a.iter().enumerate() {
                        store(y.add(r * ldy + c * L), *v);
                    }
                }
            }
        }

        /// One strip of C vectors (8 or 1) for all m rows: rows in tiles of 4 (as 4×2 tiles), 2 (as
        /// 2×4) and 1 (1×8): at most 8 accumulators (they and the loads fit in 16 registers), and
        /// 8 independent FMA chains for a single row (one chain per tile would wait on the FMA
        /// latency).
        $(#[$attr])*
        unsafe fn in_out_strip<W: Weight, const C: usize>(x: *const f32, m: usize, ldx: usize, w: *const W::Raw, ldw: usize, kb: usize, y: *mut f32, ldy: usize) {
            unsafe {
                let mut r = 0;
                while r + 4 <= m {
                    let (xr, yr) = (x.add(r * ldx), y.add(r * ldy));
                    if C >= 2 {
                        for c in (0..C).step_by(2) {
                            in_out_tile::<W, 4, 2>(xr, ldx, w.add(c * L), ldw, kb, yr.add(c * L), ldy);
                        }
                    } else {
                        in_out_tile::<W, 4, 1>(xr, ldx, w, ldw, kb, yr, ldy);
                    }
                    r += 4;
                }
                if m - r >= 2 {
                    let (xr, yr) = (x.add(r * ldx), y.add(r * ldy));
                    if C >= 4 {
                        for c in (0..C).step_by(4) {
                            in_out_tile::<W, 2, 4>(xr, ldx, w.add(c * L), ldw, kb, yr.add(c * L), ldy);
                        }
                    } else {
                        in_out_tile::<W, 2, C>(xr, ldx, w, ldw, kb, yr, ldy);
                    }
                    r += 2;
                }
                if m - r == 1 {
                    in_out_tile::<W, 1, C>(x.add(r * ldx), ldx, w, ldw, kb, y.add(r * ldy), ldy);
                }
            }
        }

        /// y[.., j0..j1] += x[.., rows] · w[rows, j0..j1] for x (m, k) and w (k, n) row-major,
        /// y (m, n).
        $(#[$attr])*
        pub(crate) unsafe fn in_out<W: Weight>(x: *const f32, m: usize, k: usize, w: *const W::Raw, n: usize, rows: std::ops::Range<usize>, j0: usize, j1: usize, y: *mut f32) {
            unsafe {
                let block = block_rows(W::KIND, m, n * std::mem::size_of::<W::Raw>());
                let mut i0 = rows.start;
                while i0 < rows.end {
                    let kb = block.min(rows.end - i0);
                    let (xb, wb) = (x.add(i0), w.add(i0 * n));
                    let mut j = j0;
                    while j + 8 * L <= j1 {
                        in_out_strip::<W, 8>(xb, m, k, wb.add(j), n, kb, y.add(j), n);
                        j += 8 * L;
                    }
                    while j + L <= j1 {
                        in_out_strip::<W, 1>(xb, m, k, wb.add(j), n, kb, y.add(j), n);
                        j += L;
                    }
                    // The last columns when n is not a multiple of the lanes.
                    for jj in j..j1 {
                        for r in 0..m {
                            let mut s = 0f32;
                            for i in 0..kb {
                                s += *xb.add(r * k + i) * W::to_f32(*wb.add(i * n + jj));
                            }
                            *y.add(r * n + jj) += s;
                        }
                    }
                    i0 += kb;
                }
            }
        }

        /// y[r][j] += x[r] · w[j] (dot products of length k) for r < R, j < J.
        $(#[$attr])*
        unsafe fn out_in_tile<W: Weight, const R: usize, const J: usize>(x: *const f32, ldx: usize, w: *const W::Raw, k: usize, y: *mut f32, ldy: usize) {
            unsafe {
                let mut acc = [[zero(); J]; R];
                let step = (64 / (L * std::mem::size_of::<W::Raw>())).max(1) * L;
                let mut i = 0;
                while i + L <= k {
                    // The next J rows (the next tile's), one cache line at a time.
                    if i % step == 0 {
                        for j in 0..J {
                            prefetch(w.wrapping_add((J + j) * k + i));
                        }
                    }
                    let mut xv = [zero(); R];
                    for (r, v) in xv.iter_mut().enumerate() {
                        *v = load_f32(x.add(r * ldx + i));
                    }
                    for j in 0..J {
                        let wv = load::<W>(w.add(j * k + i));
                        for r in 0..R {
                            acc[r][j] = fma(xv[r], wv, acc[r][j]);
                        }
                    }
                    i += L;
                }
                for (r, a) in acc.iter().enumerate() {
                    for (j, v) in a.iter().enumerate() {
                        let mut s = hsum(*v);
                        for ii in i..k {
                            s += *x.add(r * ldx + ii) * W::to_f32(*w.add(j * k + ii));
                        }
                        *y.add(r * ldy + j) += s;
                    }
                }
            }
        }

        /// J rows of w (8 or 1) for all m rows of x: tiles of 4 rows (as 4×2), 2 (as 2×4) and 1
        /// (1×8), as for the strips above.
        $(#[$attr])*
        unsafe fn out_in_rows<W: Weight, const J: usize>(x: *const f32, m: usize, k: usize, w: *const W::Raw, y: *mut f32, ldy: usize) {
            unsafe {
                let mut r = 0;
                while r + 4 <= m {
                    let (xr, yr) = (x.add(r * k), y.add(r * ldy));
                    if J >= 2 {
                        for j in (0..J).step_by(2) {
                            out_in_tile::<W, 4, 2>(xr, k, w.add(j * k), k, yr.add(j), ldy);
                        }
                    } else {
                        out_in_tile::<W, 4, 1>(xr, k, w, k, yr, ldy);
                    }
                    r += 4;
                }
                if m - r >= 2 {
                    let (xr, yr) = (x.add(r * k), y.add(r * ldy));
                    if J >= 4 {
                        for j in (0..J).step_by(4) {
                            out_in_tile::<W, 2, 4>(xr, k, w.add(j * k), k, yr.add(j), ldy);
                        }
                    } else {
                        out_in_tile::<W, 2, J>(xr, k, w, k, yr, ldy);
                    }
                    r += 2;
                }
                if m - r == 1 {
                    out_in_tile::<W, 1, J>(x.add(r * k), k, w, k, y.add(r * ldy), ldy);
                }
            }
        }

        /// y[.., j0..j1] += x · w[j0..j1]ᵀ for x (m, k), w (n, k) row-major, y (m, n).
        $(#[$attr])*
        pub(crate) unsafe fn out_in<W: Weight>(x: *const f32, m: usize, k: usize, w: *const W::Raw, n: usize, j0: usize, j1: usize, y: *mut f32) {
            unsafe {
                let mut j = j0;
                if m == 1 {
                    // One row of x (decoding) reads 4 rows of W at a time, 4 streams: GPT-2's
                    // LM head in f16/bf16 at 28–32 GB/s against 27–29 in 8 (one thread on an
                    // AMD EPYC, Zen 5, three alternating rounds; two threads the same, 31–35).
                    while j + 4 <= j1 {
                        out_in_rows::<W, 4>(x, m, k, w.add(j * k), y.add(j), n);
                        j += 4;
                    }
                }
                while j + 8 <= j1 {
                    out_in_rows::<W, 8>(x, m, k, w.add(j * k), y.add(j), n);
                    j += 8;
                }
                while j < j1 {
                    out_in_rows::<W, 1>(x, m, k, w.add(j * k), y.add(j), n);
                    j += 1;
                }
            }
        }

        /// dst[..len] = src[..len] as f32.
        $(#[$attr])*
        pub(crate) unsafe fn convert<W: Weight>(src: *const W::Raw, dst: *mut f32, len: usize) {
            unsafe {
                let mut i = 0;
                while i + L <= len {
                    store(dst.add(i), load::<W>(src.add(i)));
                    i += L;
                }
                for i in i..len {
                    *dst.add(i) = W::to_f32(*src.add(i));
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    const L: usize = 16;
    type V = __m512;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn zero() -> V {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn splat(v: f32) -> V {
        _mm512_set1_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fma(a: V, b: V, c: V) -> V {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum(v: V) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_f32(p: *const f32) -> V {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, v: V) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    /// 16 weights widened to f32: F16C's conversion for f16, a word permute for bf16 (bf16 is the
    /// top half of an f32).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn load<W: Weight>(p: *const W::Raw) -> V {
        unsafe {
            match W::KIND {
                Kind::F32 => _mm512_loadu_ps(p as *const f32),
                Kind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                Kind::Bf16 => {
                    // Word i of the 16 to the top half of lane i, the bottom halves zeroed: one
                    // permute instead of a zero-extension and a shift. One thread, GPT-2's four
                    // block shapes and LM head, six alternating rounds of the old and new
                    // binaries (AMD EPYC Zen 5): the sum of their GB/s ahead in four (median
                    // ~140 against ~136), the LM head in all six (24.0–27.9 against 22.6–25.3).
                    let idx = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
                    _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAA_AAAA, idx, _mm512_castsi256_si512(_mm256_loadu_si256(p as *const __m256i))))
                }
            }
        }
    }

    #[inline(always)]
    fn prefetch<T>(p: *const T) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }

    kernels!(#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    const L: usize = 8;
    type V = __m256;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn zero() -> V {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn splat(v: f32) -> V {
        _mm256_set1_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fma(a: V, b: V, c: V) -> V {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::ops::matvec) fn hsum(v: V) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32(p: *const f32) -> V {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut f32, v: V) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    /// 8 weights widened to f32 (`vcvtph2ps` for f16, a 16-bit shift for bf16); also what the
    /// few-rows product of weights packed in half precision reads (`ops::gemm::blis_avx2`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn load<W: Weight>(p: *const W::Raw) -> V {
        unsafe {
            match W::KIND {
                Kind::F32 => _mm256_loadu_ps(p as *const f32),
                Kind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                Kind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)))),
            }
        }
    }

    #[inline(always)]
    fn prefetch<T>(p: *const T) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }

    kernels!(#[target_feature(enable = "avx2,fma,f16c")]);
}

pub(super) mod portable {
    use super::*;

    const L: usize = 8;
    type V = [f32; L];

    #[inline(always)]
    fn zero() -> V {
        [0.0; L]
    }
    #[inline(always)]
    fn splat(v: f32) -> V {
        [v; L]
    }
    /// a·b + c lane-wise (two roundings: `mul_add` without hardware FMA is a library call).
    #[inline(always)]
    fn fma(a: V, b: V, c: V) -> V {
        std::array::from_fn(|l| a[l] * b[l] + c[l])
    }
    #[inline(always)]
    fn hsum(v: V) -> f32 {
        v.iter().sum()
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> V {
        unsafe { (p as *const V).read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: V) {
        unsafe { (p as *mut V).write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn load<W: Weight>(p: *const W::Raw) -> V {
        std::array::from_fn(|l| W::to_f32(unsafe { *p.add(l) }))
    }

    #[inline(always)]
    fn prefetch<T>(_: *const T) {}

    kernels!(#[inline]);
}
