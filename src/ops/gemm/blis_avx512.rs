//! Our f32 micro-kernel for AVX-512 CPUs (12×32 in zmm registers) for the BLIS-style product of
//! `blis.rs`: what `ops::gemm` runs at the AVX-512 level.
//!
//! Per depth step: 2 loads of B (32 floats), 12 broadcasts of A, 24 FMAs into 24 accumulators
//! (of the 32 zmm registers): BLIS's Skylake-X shape, transposed for row-major C. Two 512-bit FMA
//! ports busy every cycle is the CPU's peak. Blocks: the B panel (KC·NR·4 = 32 KB) stays in a
//! 48 KB L1 (Ice Lake and later; on the 32 KB L1s of Skylake-X and Zen 4 it fills the cache)
//! while 12-row A panels (12 KB each) stream past it from A's block in L2 (MC·KC·4 = 240 KB);
//! the C tile's lines are prefetched before the depth loop.
//! Edges (rows < 12, cols < 32) load and store C through masks: no scratch tile.

use super::blis::MicroKernel;
use std::arch::x86_64::*;

const MR: usize = 12;
const NR: usize = 32;

/// The 12×32 kernel of the AVX-512 level.
pub(crate) struct Avx512;

impl MicroKernel for Avx512 {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = 256;
    const MC: usize = 240;
    const NC: usize = 4096;
    #[inline(always)]
    unsafe fn tile(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, load_c: bool, scale: f32) {
        kernel(kc, ap, bp, c, ldc, rows, cols, load_c, scale)
    }
}

#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::needless_range_loop)]
unsafe fn kernel(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, load_c: bool, scale: f32) {
    for i in 0..rows {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + 16) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + NR - 1) as *const i8);
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (ap, bp);
    #[inline(always)]
    unsafe fn step(acc: &mut [[__m512; 2]; MR], a: *const f32, b: *const f32) {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    }
    for _ in 0..kc / 4 {
        // 4 depths of A are 48 floats: 3 lines, fetched 8 depths ahead.
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(8 * MR) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(8 * MR + 16) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(8 * MR + 32) as *const i8);
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
    let s = _mm512_set1_ps(scale);
    // Lanes of each half that lie inside the tile's columns.
    let mask = |h: usize| -> __mmask16 {
        let valid = cols.saturating_sub(16 * h).min(16);
        ((1u32 << valid) - 1) as __mmask16
    };
    let masks = [mask(0), mask(1)];
    // (A constant bound with a test inside, so that the accumulators stay in registers.)
    for i in 0..MR {
        if i >= rows {
            break;
        }
        let row = c.add(i * ldc);
        for h in 0..2 {
            // (A tile of at most 16 columns stops here: `row + 16` may lie past C's end.)
            if masks[h] == 0 {
                break;
            }
            let mut v = _mm512_mul_ps(acc[i][h], s);
            if load_c {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], row.add(16 * h)));
            }
            _mm512_mask_storeu_ps(row.add(16 * h), masks[h], v);
        }
    }
}
