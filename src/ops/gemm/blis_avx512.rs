//! Our f32 micro-kernels for AVX-512 CPUs for the BLIS-style product of `blis.rs`: 12×32 in zmm
//! registers, what `ops::gemm` runs at the AVX-512 level, and MR×16 on weights packed once in
//! the AVX2 level's 16-wide panels ([`Avx512Narrow`], 4 to 28 rows).
//!
//! The 12×32 kernel, per depth step: 2 loads of B (32 floats), 12 broadcasts of A, 24 FMAs into
//! 24 accumulators (of the 32 zmm registers): BLIS's Skylake-X shape, transposed for row-major C.
//! Two 512-bit FMA ports busy every cycle is the CPU's peak. Blocks, as BLIS keeps them for
//! its Skylake-X kernel: the 12-row A panel (MR·KC·4 = 18 KB) stays in L1 while B's panels (48
//! KB each) stream past it from B's block in L2 (KC·NC·4 = 768 KB, beside A's block of
//! MC·KC·4 = 360 KB); B is packed whole once a product (`blis::gemm`). The other order, with
//! B's panel in L1 (KC = 256: 32 KB of a 48 KB L1) and A's panels streaming past, slowed down
//! when the other core worked too: one single-threaded `benches/matmul` a core at once, medians
//! over its shapes 132 and 91 GFLOP/s that order, 145 and 144 this one (PyTorch 150–155 the
//! same way; `notes/cpu-speed.md`, session 13). The C tile's lines are prefetched before the
//! depth loop.
//! Edges (rows < 12, cols < 32) load and store C (and a bias row) through masks: no scratch
//! tile.

use super::blis::{Base, MicroKernel};
use std::arch::x86_64::*;

/// The 12×32 kernel of the AVX-512 level.
pub(crate) struct Avx512;

impl MicroKernel for Avx512 {
    const MR: usize = 12;
    const NR: usize = 32;
    const KC: usize = 384;
    const MC: usize = 240;
    const NC: usize = 512;
    const A_PANEL_IN_L1: bool = true;
    #[inline(always)]
    unsafe fn tile(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, base: Base, scale: f32) {
        kernel::<12, 2>(kc, ap, bp, c, ldc, rows, cols, base, scale)
    }
}

/// MR×16 kernels on the panels of the AVX2 level (16 columns, 256 depths), for weights packed
/// once in that layout ([`super::PackedWeight`]): MR = 4, 8, 16 for batched decoding's 2–4, 5–8
/// and 9–32 rows, 28 for a prompt's hundreds. One B load and MR broadcasts (embedded in the FMAs)
/// per depth for MR FMAs, where the 12×32 tile takes 14 loads for 24 FMAs; but they read the
/// packed weight where the wide kernel would pack it again every product. The panels stream
/// from memory, fetched 64 depths ahead; MC (224) is a multiple of every MR.
pub(crate) struct Avx512Narrow<const MR: usize>;

impl<const MR: usize> MicroKernel for Avx512Narrow<MR> {
    const MR: usize = MR;
    const NR: usize = super::blis_avx2::NR;
    const KC: usize = super::blis_avx2::KC;
    const MC: usize = 8 * 28;
    const NC: usize = 4096;
    #[inline(always)]
    unsafe fn tile(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, base: Base, scale: f32) {
        kernel::<MR, 1>(kc, ap, bp, c, ldc, rows, cols, base, scale)
    }
}

/// An MR × 16·H tile: MR rows of H zmm accumulators. The B panel is fetched 64 depths ahead:
/// it streams, from B's block in L2 (the 12×32 kernel, which keeps A's panel in L1: 2–4% faster
/// so, two single-threaded `benches/matmul` at once) or from memory (a weight packed once).
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::needless_range_loop)]
unsafe fn kernel<const MR: usize, const H: usize>(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, base: Base, scale: f32) {
    let nr = 16 * H;
    for i in 0..rows {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + 16) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + nr - 1) as *const i8);
    }
    let mut acc = [[_mm512_setzero_ps(); H]; MR];
    let (mut a, mut b) = (ap, bp);
    #[inline(always)]
    unsafe fn step<const MR: usize, const H: usize>(acc: &mut [[__m512; H]; MR], a: *const f32, b: *const f32) {
        let bv: [__m512; H] = std::array::from_fn(|h| _mm512_loadu_ps(b.add(16 * h)));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i));
            for h in 0..H {
                row[h] = _mm512_fmadd_ps(ai, bv[h], row[h]);
            }
        }
    }
    for _ in 0..kc / 4 {
        // 4 depths of A, fetched 8 depths ahead (MR floats a depth: 3 or 4 lines for 4 depths).
        for line in (0..4 * MR).step_by(16) {
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(8 * MR + line) as *const i8);
        }
        // 4 depths of B, 64 depths ahead.
        for line in (0..4 * nr).step_by(16) {
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(64 * nr + line) as *const i8);
        }
        for u in 0..4 {
            step(&mut acc, a.add(u * MR), b.add(u * nr));
        }
        a = a.add(4 * MR);
        b = b.add(4 * nr);
    }
    for _ in 0..kc % 4 {
        step(&mut acc, a, b);
        a = a.add(MR);
        b = b.add(nr);
    }
    let s = _mm512_set1_ps(scale);
    // Lanes of each 16-column part that lie inside the tile's columns.
    let masks: [__mmask16; H] = std::array::from_fn(|h| {
        let valid = cols.saturating_sub(16 * h).min(16);
        ((1u32 << valid) - 1) as __mmask16
    });
    // (A constant bound with a test inside, so that the accumulators stay in registers.)
    for i in 0..MR {
        if i >= rows {
            break;
        }
        let row = c.add(i * ldc);
        for h in 0..H {
            // (A tile narrower than this part stops here: `row + 16·h` may lie past C's end.)
            if masks[h] == 0 {
                break;
            }
            let v = _mm512_mul_ps(acc[i][h], s);
            let v = match base {
                Base::Zero => v,
                Base::C => _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], row.add(16 * h))),
                Base::Row(b) => _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], b.add(16 * h))),
            };
            _mm512_mask_storeu_ps(row.add(16 * h), masks[h], v);
        }
    }
}

/// Depths ahead of the one being read that [`few_rows_tile`] prefetches in each panel: 1 KB of
/// f32 (16 lines), 512 bytes of f16 / bf16.
const FEW_ROWS_PREFETCH: usize = 16;

/// [`super::blis_avx2::few_rows_packed`]'s tile in zmm registers, on the same 16-wide panels:
/// `y[r][j] += Σ_{d<kc} x[r][d]·B[d][j]` for the R rows of x (row stride ldx) and the P panels at
/// `panels` (each kc × 16 elements of W's type, `stride` apart), the last holding `last_cols`
/// valid columns; y's rows `ldy` apart. One panel row is one zmm (f32, or 16 f16 / bf16 widened
/// as they load): half the instructions of the ymm tile, and the panels prefetched
/// [`FEW_ROWS_PREFETCH`] depths ahead, since decoding streams them from memory. One thread on an
/// AMD EPYC (Zen 5) read GPT-2's f32 weights packed at 29.5–31.9 GB/s through this tile against
/// 27.5–28.2 through the ymm one (`benches/matvec --dtype f32-packed --rows 1`, three alternating
/// rounds, `notes/cpu-speed.md`, session 18).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL, AVX2, FMA and F16C; the P panels hold kc depths each; x holds R
/// rows of kc elements; y R rows of the panels' columns.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn few_rows_tile<W: crate::ops::matvec::Weight, const R: usize, const P: usize>(x: *const f32, ldx: usize, kc: usize, panels: *const W::Raw, stride: usize, y: *mut f32, ldy: usize, last_cols: usize) {
    use crate::ops::matvec::kernels::avx512::load;
    const NR: usize = super::blis_avx2::NR;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    // One prefetch a cache line: every depth of f32 panels, every other of half precision.
    let line = (64 / (NR * std::mem::size_of::<W::Raw>())).max(1);
    for d in 0..kc {
        if d % line == 0 {
            for p in 0..P {
                _mm_prefetch::<_MM_HINT_T0>(panels.wrapping_add(p * stride + (d + FEW_ROWS_PREFETCH) * NR) as *const i8);
            }
        }
        let b: [__m512; P] = std::array::from_fn(|p| load::<W>(panels.add(p * stride + d * NR)));
        for (r, row) in acc.iter_mut().enumerate() {
            let xr = _mm512_set1_ps(*x.add(r * ldx + d));
            for (a, bp) in row.iter_mut().zip(&b) {
                *a = _mm512_fmadd_ps(xr, *bp, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (p, a) in row.iter().enumerate() {
            let out = y.add(r * ldy + p * NR);
            let mask: __mmask16 = if p + 1 == P && last_cols < NR { (1 << last_cols) - 1 } else { 0xFFFF };
            _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), *a));
        }
    }
}
