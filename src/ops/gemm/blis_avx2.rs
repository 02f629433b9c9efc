//! Our f32 micro-kernel for AVX2 + FMA CPUs (6×16 in ymm registers) for the BLIS-style product
//! of `blis.rs`, and the few-rows product of decoding straight from weights packed once: what
//! `ops::gemm` runs at the AVX2 level. On this project's AMD EPYC (Zen 3, 2 threads) the product
//! ran 1.15–1.7× the `gemm` crate on the products of BERT-base and MiniLM training steps
//! (`benches/matmul`, notes/cpu-speed.md).
//!
//! Per depth step the micro-kernel does 2 loads of B, 6 broadcasts of A and 12 FMAs: two FMA
//! ports are busy every cycle, which is the CPU's peak. Blocks: the B panel (KC·NR·4 = 16 KB) in
//! L1, A's block (MC·KC·4 = 144 KB) in L2.

use super::blis::{Base, MicroKernel};
use crate::ops::matvec::kernels::avx2::load;
use crate::ops::matvec::Weight;
use std::arch::x86_64::*;

pub(crate) const MR: usize = 6;
pub(crate) const NR: usize = 16;
pub(crate) const KC: usize = 256;

/// The 6×16 kernel of the AVX2 level.
pub(crate) struct Avx2;

impl MicroKernel for Avx2 {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = KC;
    const MC: usize = 144;
    const NC: usize = 4080;
    #[inline(always)]
    unsafe fn tile(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, base: Base, scale: f32) {
        kernel(kc, ap, bp, c, ldc, rows, cols, base, scale)
    }
}

/// The MR×NR micro-kernel: `c[i·ldc + j] = base[i][j] + scale · Σ_p ap[p·MR+i]·bp[p·NR+j]`
/// for i < rows, j < cols ([`MicroKernel::tile`]).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::needless_range_loop)]
unsafe fn kernel(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, base: Base, scale: f32) {
    // The C tile is read once at the end: start its cache lines on their way now.
    for i in 0..rows {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + NR - 1) as *const i8);
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (ap, bp);
    #[inline(always)]
    unsafe fn step(acc: &mut [[__m256; 2]; MR], a: *const f32, b: *const f32) {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*a.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    }
    for _ in 0..kc / 4 {
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(8 * MR) as *const i8);
        for u in 0..4 {
            step(&mut acc, a.add(u * MR), b.add(u * NR));
        }
        a = a.add(4 * MR);
        b = b.add(4 * NR);
    }
    for _ in 0..kc % 4 {
        step(&mut acc, a, b);
        a = a.add(MR);
        b = b.add(NR);
    }
    let s = _mm256_set1_ps(scale);
    if cols == NR {
        // (A constant bound with a test inside, so that the accumulators stay in registers.)
        for i in 0..MR {
            if i >= rows {
                break;
            }
            let row = c.add(i * ldc);
            for h in 0..2 {
                let v = _mm256_mul_ps(acc[i][h], s);
                let v = match base {
                    Base::Zero => v,
                    Base::C => _mm256_add_ps(v, _mm256_loadu_ps(row.add(8 * h))),
                    Base::Row(b) => _mm256_add_ps(v, _mm256_loadu_ps(b.add(8 * h))),
                };
                _mm256_storeu_ps(row.add(8 * h), v);
            }
        }
    } else {
        let mut tile = [0f32; MR * NR];
        for i in 0..MR {
            for h in 0..2 {
                _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR + 8 * h), _mm256_mul_ps(acc[i][h], s));
            }
        }
        for i in 0..rows {
            let row = c.add(i * ldc);
            for j in 0..cols {
                let v = tile[i * NR + j];
                *row.add(j) = match base {
                    Base::Zero => v,
                    Base::C => *row.add(j) + v,
                    Base::Row(b) => *b.add(j) + v,
                };
            }
        }
    }
}

/// Rows of x up to which [`few_rows_packed`] runs instead of the 6-row tiles (which would also
/// compute the empty rows of their last tile, and copy x into panels). Past 8 rows the tiles'
/// 12 accumulators win: GPT-2 decoding at batch 16 ran 249 tok/s on average with 16 here, 287
/// with 8 (four and five alternating runs); batch 8 about the same with 4 (201 against 197).
pub(crate) const FEW_ROWS: usize = 8;

/// `y[r][j] += Σ_{d<kc} x[r][d]·B[d][j]` for the R rows of x (row stride ldx) and the P panels
/// at `panels` (each a run of kc × NR elements of W's type, f32 or the bits of f16 / bf16,
/// `stride` apart), the last of them holding `last_cols` valid columns; y's rows `ldy` apart.
/// The accumulators (R × 2P vectors) stay in registers over the depth; per depth, P panels' two
/// vectors are loaded (and widened to f32) and R broadcasts of x.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows_tile<W: Weight, const R: usize, const P: usize>(x: *const f32, ldx: usize, kc: usize, panels: *const W::Raw, stride: usize, y: *mut f32, ldy: usize, last_cols: usize) {
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
    for d in 0..kc {
        let b: [[__m256; 2]; P] = std::array::from_fn(|p| [load::<W>(panels.add(p * stride + d * NR)), load::<W>(panels.add(p * stride + d * NR + 8))]);
        for (r, row) in acc.iter_mut().enumerate() {
            let xr = _mm256_broadcast_ss(&*x.add(r * ldx + d));
            for (a, bp) in row.iter_mut().zip(&b) {
                a[0] = _mm256_fmadd_ps(xr, bp[0], a[0]);
                a[1] = _mm256_fmadd_ps(xr, bp[1], a[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (p, a) in row.iter().enumerate() {
            let out = y.add(r * ldy + p * NR);
            let cols = if p + 1 == P { last_cols } else { NR };
            if cols == NR {
                _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), a[0]));
                _mm256_storeu_ps(out.add(8), _mm256_add_ps(_mm256_loadu_ps(out.add(8)), a[1]));
            } else {
                let mut tile = [0f32; NR];
                _mm256_storeu_ps(tile.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(tile.as_mut_ptr().add(8), a[1]);
                for (j, v) in tile.iter().enumerate().take(cols) {
                    *out.add(j) += v;
                }
            }
        }
    }
}

/// [`few_rows_tile`], or its zmm twin [`super::blis_avx512::few_rows_tile`] where `zmm` (the
/// level is AVX-512).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<W: Weight, const R: usize, const P: usize>(zmm: bool, x: *const f32, ldx: usize, kc: usize, panels: *const W::Raw, stride: usize, y: *mut f32, ldy: usize, last_cols: usize) {
    if zmm {
        // SAFETY (of the zmm tile's extra requirement): the AVX-512 level means the CPU has
        // AVX-512 F/BW/DQ/VL (`cpu::detected_isa`).
        super::blis_avx512::few_rows_tile::<W, R, P>(x, ldx, kc, panels, stride, y, ldy, last_cols)
    } else {
        few_rows_tile::<W, R, P>(x, ldx, kc, panels, stride, y, ldy, last_cols)
    }
}

/// `y (m × n, row stride ldy) += x (m × k) · B` for m ≤ [`FEW_ROWS`] rows straight from a whole
/// packed B ([`super::blis::pack_whole_b`], `padded` columns), for the panels `panels` (columns from
/// panels.start·NR): the products of decoding, bound by reading B, which stream it in panel order
/// with no copy of x or B. Per group of P panels and depth chunk, rows go 4 at a time (8
/// accumulators or more), the chunk's panels staying in L1 for the next rows; one row takes 4
/// panels at once instead.
///
/// The panels hold W's type: f32, or the bits of f16 / bf16 (widened to f32 as they are loaded,
/// so half-precision panels read half the bytes).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; x addresses m×k elements, `packed` the k × `padded`
/// elements of a whole packed B of n columns, y m rows of n; the panels lie inside n.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn few_rows_packed<W: Weight>(m: usize, n: usize, k: usize, x: *const f32, packed: *const W::Raw, padded: usize, panels: std::ops::Range<usize>, y: *mut f32, ldy: usize) {
    debug_assert!(m <= FEW_ROWS && panels.end <= n.div_ceil(NR));
    let cols_of = |q: usize| NR.min(n - q * NR);
    // The same tiles in zmm registers at the AVX-512 level (the panels are the same).
    let zmm = crate::cpu::isa() == crate::cpu::Isa::Avx512;
    // P panels from q: every depth chunk, every group of rows.
    let group = |q: usize, p: usize| {
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let first = packed.add(pc * padded + q * NR * kc);
            let last_cols = cols_of(q + p - 1);
            for r0 in (0..m).step_by(4) {
                let (x, y) = (x.add(r0 * k + pc), y.add(r0 * ldy + q * NR));
                match ((m - r0).min(4), p) {
                    (1, 4) => tile::<W, 1, 4>(zmm, x, k, kc, first, NR * kc, y, ldy, last_cols),
                    (1, _) => tile::<W, 1, 1>(zmm, x, k, kc, first, NR * kc, y, ldy, last_cols),
                    (2, _) => tile::<W, 2, 1>(zmm, x, k, kc, first, NR * kc, y, ldy, last_cols),
                    (3, _) => tile::<W, 3, 1>(zmm, x, k, kc, first, NR * kc, y, ldy, last_cols),
                    _ => tile::<W, 4, 1>(zmm, x, k, kc, first, NR * kc, y, ldy, last_cols),
                }
            }
        }
    };
    let mut q = panels.start;
    if m == 1 {
        while q + 4 <= panels.end {
            group(q, 4);
            q += 4;
        }
    }
    while q < panels.end {
        group(q, 1);
        q += 1;
    }
}

