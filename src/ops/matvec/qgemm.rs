//! `y += x · Wᵀ` for many rows of x (encoder batches, prompts) and a `q8_0` / `q4_0` weight W
//! (n, k), in 8-bit integers on AVX2, and on AVX-512 VNNI where the CPU has it (`avx512_vnni`).
//!
//! Why: with hundreds of rows the product is bound by arithmetic, not by reading W. AVX2's
//! `vpmaddubsw` multiplies 32 byte pairs per instruction (u8 × i8, adjacent pairs summed to i16)
//! and `vpmaddwd` by ones adds those pairs up to i32: on a Zen 3 core that pair of instructions
//! does 1.8–2.0× the multiply-adds per second of f32 FMAs, where converting W to f32 for `gemm`
//! (the path before this one) ran a little slower than f32 weights (`notes/cpu-speed.md`).
//!
//! Algorithm (fbgemm's, on GGML's blocks of 32): each row of x is quantized per block to 7 bits,
//! `q = round(x / dx)` with `dx = max|x| / 63`, and stored offset as a byte `q + 64` (1..=127),
//! so a pair of u8 × i8 products is at most 2·127·127 < 2¹⁵ and `vpmaddubsw` cannot saturate
//! (8 bits, as the few-rows path [`super::quantized`] uses, would need a sign instruction per
//! product and measured 1.5× FMA instead of 2×). The offset comes out per block with each
//! column's Σw: Σ (q + 64)·w = Σ q·w + 64·Σw. A block's integer sum is converted to f32 once and
//! added into an f32 accumulator scaled by `dx · dw`. Seven bits per block of 32 activations is
//! finer than PyTorch's `quantize_dynamic` (7 bits, one scale per tensor); the tests bound the
//! rounding against the f32 product.
//!
//! Layout: W is repacked per call into panels of [`NR`] = 16 output columns; per block, 8 steps
//! of 4 k-values, each step 16 columns × 4 bytes (two vectors of 8 columns), then the panel's 16
//! `dw` and 16 corrections `64·Σw` per block. x goes into groups of [`MR`] = 4 rows; per step,
//! 4 rows × 4 bytes, which the kernel broadcasts. Tile: 4 rows × 16 columns, taken a row at a
//! time (two integer and two f32 accumulators); per step 1 broadcast of x, 2 loads of W (L1),
//! 2 × (`vpmaddubsw`, `vpmaddwd`, `vpaddd`); per block 2 conversions and FMAs into the f32
//! accumulators.
//! Memory traffic: W once per call into its packed copy (n·k bytes), x once into its packed copy
//! (m·k bytes); rayon tasks take column panels and sweep the packed rows in chunks of
//! [`ROW_CHUNK`] so a chunk stays in L2 while the task's panels pass over it, each panel in
//! slices of [`DEPTH_BLOCKS`] blocks that stay in L1 while the chunk's rows pass over them; y
//! read and written once per slice.

use super::quantized::{QFormat, BLOCK};
use super::SharedMut;
use rayon::prelude::*;

/// Rows of x per tile.
const MR: usize = 4;
/// Columns (rows of W) per tile and packed panel.
const NR: usize = 16;
/// 4-value steps per block.
const STEPS: usize = BLOCK / 4;
/// The 7-bit range of the activations and their offset to unsigned bytes.
const QMAX: f32 = 63.0;
const OFFSET: i32 = 64;
/// Rows of packed x swept by a task before it moves to its next panels: 128 rows × k = 3072 is
/// 384 KB, inside a Zen 3 or Skylake-SP L2.
const ROW_CHUNK: usize = 128;

/// Blocks of depth a tile covers before the next group of rows: a panel's slice of 24 blocks
/// (16 × 768 bytes, 12 KB) stays in L1 while the chunk's rows pass over it. Whole depths of 3072
/// (BERT's and GPT-2's FFN output) made the panel 48 KB, read again from L2 for every row:
/// in one-thread runs of whole products (1,024 rows), depth 3072 ran at 40 G multiply-adds/s
/// where depth 768 ran at 52; the chunks made the depth-3072 product 8% faster.
const DEPTH_BLOCKS: usize = 24;

/// Whether this product can run here: an n that fills whole panels, k whole blocks.
pub(crate) fn fits(n: usize, k: usize) -> bool {
    n.is_multiple_of(NR) && k.is_multiple_of(BLOCK) && n > 0 && k > 0
}

/// x (m × k) packed: per group of MR rows, per block, STEPS × MR × 4 bytes (`q + 64`); one scale
/// per row and block (rows past m are zeros with scale 0).
struct PackedRows {
    qs: Vec<u8>,
    scales: Vec<f32>,
}

fn pack_rows(x: &[f32], m: usize, k: usize) -> PackedRows {
    let nb = k / BLOCK;
    let groups = m.div_ceil(MR);
    let mut qs = vec![OFFSET as u8; groups * nb * BLOCK * MR];
    let mut scales = vec![0f32; groups * nb * MR];
    // Decided once per call, not per block of 32 values.
    let vector = crate::cpu::isa() >= crate::cpu::Isa::Avx2;
    qs.par_chunks_mut(nb * BLOCK * MR).zip(scales.par_chunks_mut(nb * MR)).enumerate().for_each(|(g, (qs, scales))| {
        for r in 0..MR.min(m - g * MR) {
            let row = &x[(g * MR + r) * k..(g * MR + r + 1) * k];
            for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                let (d, bytes) = offset_block(block, vector);
                scales[b * MR + r] = d;
                // Step s's 4 bytes of this row sit at [s][r].
                let out = &mut qs[b * BLOCK * MR..(b + 1) * BLOCK * MR];
                for (s, word) in bytes.chunks_exact(4).enumerate() {
                    out[(s * MR + r) * 4..(s * MR + r + 1) * 4].copy_from_slice(word);
                }
            }
        }
    });
    PackedRows { qs, scales }
}

/// One block of activations as the kernel's bytes `q + 64` and its scale: in AVX2 when `vector`
/// (the CPU's level is AVX2 or above; the plain loop, compiled for the baseline target, was 7% of
/// a BERT-base q8_0 forward pass, its maximum a chain of scalar `maxss`), else
/// [`quantize_block`]'s.
#[inline(always)]
fn offset_block(block: &[f32], vector: bool) -> (f32, [u8; BLOCK]) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: the caller saw AVX2 (and so FMA) in `cpu::isa()`; the block holds BLOCK values.
        return unsafe { avx2::offset_block(block.try_into().expect("a block of 32")) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = vector;
    let (d, q) = quantize_block(block);
    (d, q.map(|v| (v + OFFSET as i8) as u8))
}

/// One block of activations as 7-bit integers (rounded to nearest, ties to even) and their scale
/// `max|x| / 63` (0 for zeros).
#[inline(always)]
fn quantize_block(block: &[f32]) -> (f32, [i8; BLOCK]) {
    let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (d, id) = scale_and_inverse(amax);
    // Adding and taking away 1.5·2²³ rounds |v| < 2²² to the nearest integer, ties to even, in
    // the default rounding mode: `round_ties_even` without libm's `rintf`, so it vectorises.
    const ROUND: f32 = 12_582_912.0;
    let mut q = [0i8; BLOCK];
    for (q, v) in q.iter_mut().zip(block) {
        *q = ((v * id + ROUND) - ROUND).clamp(-QMAX, QMAX) as i8;
    }
    (d, q)
}

/// A block's scale `max|x| / 63` and its inverse; both 0 for a block of zeros, and for one so
/// small (max below ~1.9e-37) that the inverse would overflow: its values count as zeros.
#[inline(always)]
fn scale_and_inverse(amax: f32) -> (f32, f32) {
    let d = amax / QMAX;
    if d > 0.0 && (1.0 / d).is_finite() { (d, 1.0 / d) } else { (0.0, 0.0) }
}

/// W (n × k, `format` blocks) packed into panels of NR columns: per panel and block, the values
/// (STEPS × NR × 4 bytes), then NR scales and NR corrections `64·Σw` in their own arrays.
struct PackedWeight {
    qs: Vec<i8>,
    scales: Vec<f32>,
    corrections: Vec<i32>,
}

fn pack_weight(format: QFormat, w: &[u8], n: usize, k: usize) -> PackedWeight {
    let nb = k / BLOCK;
    let bb = format.block_bytes();
    let mut qs = vec![0i8; n * k];
    let mut scales = vec![0f32; n * nb];
    let mut corrections = vec![0i32; n * nb];
    let chunks = qs.par_chunks_mut(NR * k).zip(scales.par_chunks_mut(NR * nb)).zip(corrections.par_chunks_mut(NR * nb));
    chunks.enumerate().for_each(|(p, ((qs, scales), corrections))| {
        crate::ops::math::run_vectorised(#[inline(always)] || {
            for j in 0..NR {
                let row = &w[(p * NR + j) * nb * bb..(p * NR + j + 1) * nb * bb];
                for (b, block) in row.chunks_exact(bb).enumerate() {
                    let values = super::quantized::block_values(format, block);
                    scales[b * NR + j] = super::quantized::block_scale(block);
                    corrections[b * NR + j] = OFFSET * values.iter().map(|&v| v as i32).sum::<i32>();
                    // Step s's 4 values of this column sit at [s][j].
                    let out = &mut qs[b * BLOCK * NR..(b + 1) * BLOCK * NR];
                    for (s, word) in values.chunks_exact(4).enumerate() {
                        out[(s * NR + j) * 4..(s * NR + j + 1) * 4].copy_from_slice(word);
                    }
                }
            }
        })
    });
    PackedWeight { qs, scales, corrections }
}

/// y (m × n, holding the bias rows or zeros) += x (m × k) · Wᵀ, W (n × k) in `format` blocks, in
/// rayon tasks over panels of W. The caller checks the sizes and [`fits`], and that the CPU has
/// AVX2, FMA and F16C.
pub(crate) fn product(format: QFormat, x: &[f32], m: usize, k: usize, w: &[u8], n: usize, y: &mut [f32]) {
    debug_assert!(fits(n, k) && x.len() == m * k && y.len() == m * n);
    let nb = k / BLOCK;
    let (xp, wp) = rayon::join(|| pack_rows(x, m, k), || pack_weight(format, w, n, k));
    let groups = m.div_ceil(MR);
    let panels = n / NR;
    let out = SharedMut(y.as_mut_ptr());
    // Four ranges of panels a thread, to balance; each sweeps the rows a chunk at a time. On VNNI
    // the ranges hold whole pairs of panels (the two-panel tile).
    #[cfg(target_arch = "x86_64")]
    let vnni = avx512_vnni::usable();
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    let unit = if vnni { 2 } else { 1 };
    let per = panels.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(unit).max(unit);
    (0..panels.div_ceil(per)).into_par_iter().for_each(|t| {
        let my_panels = t * per..((t + 1) * per).min(panels);
        for chunk in (0..groups).step_by(ROW_CHUNK / MR) {
            // Panels a tile covers: two on VNNI (each broadcast of x then serves two
            // multiply-adds), one otherwise and for a task's odd last panel.
            let mut p = my_panels.start;
            while p < my_panels.end {
                let span = if vnni && p + 1 < my_panels.end { 2 } else { 1 };
                let wq = &wp.qs[p * NR * k..(p + span) * NR * k];
                let wd = &wp.scales[p * NR * nb..(p + span) * NR * nb];
                let wc = &wp.corrections[p * NR * nb..(p + span) * NR * nb];
                for kb in (0..nb).step_by(DEPTH_BLOCKS) {
                    let blocks = DEPTH_BLOCKS.min(nb - kb);
                    let (wq, wd, wc) = (&wq[kb * BLOCK * NR..], &wd[kb * NR..], &wc[kb * NR..]);
                    for g in chunk..(chunk + ROW_CHUNK / MR).min(groups) {
                        let xq = &xp.qs[(g * nb + kb) * BLOCK * MR..(g * nb + kb + blocks) * BLOCK * MR];
                        let xd = &xp.scales[(g * nb + kb) * MR..(g * nb + kb + blocks) * MR];
                        let rows = MR.min(m - g * MR);
                        // SAFETY: rows g·MR.. + rows ≤ m and columns p·NR.. + span·NR ≤ n lie
                        // inside y (m × n); tasks write disjoint columns. The caller checked the
                        // CPU's features; the slices hold `blocks` blocks of `span` panels (the
                        // second a panel's k bytes and nb scales after the first).
                        unsafe {
                            let y = out.get().add(g * MR * n + p * NR);
                            #[cfg(target_arch = "x86_64")]
                            match (vnni, span) {
                                (true, 2) => avx512_vnni::tile::<2>(xq, xd, wq, wd, wc, blocks, y, n, rows, NR * k, NR * nb),
                                (true, _) => avx512_vnni::tile::<1>(xq, xd, wq, wd, wc, blocks, y, n, rows, NR * k, NR * nb),
                                _ => avx2::tile(xq, xd, wq, wd, wc, blocks, y, n, rows),
                            }
                            #[cfg(not(target_arch = "x86_64"))]
                            add_tile(&reference_tile(xq, xd, wq, wd, wc, blocks), y, n, rows);
                        }
                    }
                }
                p += span;
            }
        }
    });
}

/// `rows` rows of `tile` added to y (rows `ldy` apart).
///
/// # Safety
/// y addresses `rows` rows of NR floats, `ldy` apart, that nothing else accesses meanwhile.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
unsafe fn add_tile(tile: &[[f32; NR]; MR], y: *mut f32, ldy: usize, rows: usize) {
    for (r, row) in tile.iter().enumerate().take(rows) {
        for (j, v) in row.iter().enumerate() {
            unsafe { *y.add(r * ldy + j) += v };
        }
    }
}

/// The tile in plain Rust: the same integers, the same order of block sums; what the AVX2 tile is
/// tested against.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn reference_tile(xq: &[u8], xd: &[f32], wq: &[i8], wd: &[f32], wc: &[i32], nb: usize) -> [[f32; NR]; MR] {
    let mut tile = [[0f32; NR]; MR];
    for b in 0..nb {
        for (r, row) in tile.iter_mut().enumerate() {
            for (j, out) in row.iter_mut().enumerate() {
                let mut sum = 0i32;
                for i in 0..BLOCK {
                    let x = xq[b * BLOCK * MR + (i / 4) * MR * 4 + r * 4 + i % 4] as i32;
                    let w = wq[b * BLOCK * NR + (i / 4) * NR * 4 + j * 4 + i % 4] as i32;
                    sum += x * w;
                }
                *out += (sum - wc[b * NR + j]) as f32 * (xd[b * MR + r] * wd[b * NR + j]);
            }
        }
    }
    tile
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::quantize_block`] offset by 64, in AVX2: for finite values the same scale and the
    /// same bytes (`vcvtps2dq` rounds to nearest, ties to even, in the default rounding mode; the
    /// values are clamped to ±63 before). Neither path carries a NaN activation through.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn offset_block(block: &[f32; BLOCK]) -> (f32, [u8; BLOCK]) {
        unsafe {
            let p = block.as_ptr();
            let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let sign = _mm256_set1_ps(-0.0);
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            let (d, id) = scale_and_inverse(amax);
            let id = _mm256_set1_ps(id);
            let (lo, hi) = (_mm256_set1_ps(-QMAX), _mm256_set1_ps(QMAX));
            let q = v.map(|v| _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, id), lo), hi)));
            // Packing works within 128-bit lanes: the dwords come out as v0[0..4] v1[0..4]
            // v2[0..4] v3[0..4] | v0[4..8] v1[4..8] v2[4..8] v3[4..8], put back in order.
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            let mut out = [0u8; BLOCK];
            _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, _mm256_add_epi8(bytes, _mm256_set1_epi8(OFFSET as i8)));
            (d, out)
        }
    }

    /// y[r][j] += Σ_b dx[r][b]·dw[j][b]·(Σ_i (q[r][i] + 64)·w[j][i] − 64·Σ_i w[j][i]) for the
    /// first `rows` of one group of MR packed rows and one panel of NR packed columns; y's rows
    /// `ldy` apart.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile(xq: &[u8], xd: &[f32], wq: &[i8], wd: &[f32], wc: &[i32], nb: usize, y: *mut f32, ldy: usize, rows: usize) {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let (xq, wq) = (xq.as_ptr(), wq.as_ptr());
            // Row by row over the `nb` blocks given (a depth slice of at most DEPTH_BLOCKS): the
            // row's two f32 accumulators stay in registers, and the panel's slice (16 × 32·nb
            // bytes) is read again from L1 by the next row. All four rows
            // at once kept too many vectors live: LLVM spilled the f32 accumulators, and their
            // stores were the kernel's hottest instructions. Two rows at a time (each W vector
            // loaded once for both) measured slower still: 2.8–3.1 seq/s against 4.0–4.1 for
            // BERT-base q8_0 forward b8 s128 on one Zen 3 core.
            for r in 0..rows {
                let out = y.add(r * ldy);
                let mut acc_f = [_mm256_loadu_ps(out), _mm256_loadu_ps(out.add(8))];
                for b in 0..nb {
                    let (xb, wb) = (xq.add(b * BLOCK * MR + r * 4), wq.add(b * BLOCK * NR));
                    let mut acc = [_mm256_setzero_si256(); 2];
                    for s in 0..STEPS {
                        let x = _mm256_set1_epi32(std::ptr::read_unaligned(xb.add(s * MR * 4) as *const i32));
                        for (h, acc) in acc.iter_mut().enumerate() {
                            let w = _mm256_loadu_si256(wb.add(s * NR * 4 + h * 32) as *const __m256i);
                            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), ones));
                        }
                    }
                    let dx = _mm256_set1_ps(*xd.get_unchecked(b * MR + r));
                    for (h, acc_f) in acc_f.iter_mut().enumerate() {
                        let c = _mm256_loadu_si256(wc.as_ptr().add(b * NR + h * 8) as *const __m256i);
                        let sum = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[h], c));
                        *acc_f = _mm256_fmadd_ps(sum, _mm256_mul_ps(dx, _mm256_loadu_ps(wd.as_ptr().add(b * NR + h * 8))), *acc_f);
                    }
                }
                _mm256_storeu_ps(out, acc_f[0]);
                _mm256_storeu_ps(out.add(8), acc_f[1]);
            }
        }
    }
}

/// The tile on AVX-512 VNNI (Ice Lake server, Sapphire Rapids, Zen 4 and later): `vpdpbusd`
/// multiplies 64 byte pairs (u8 × i8) and adds them four at a time into 16 i32 lanes in one
/// instruction, where AVX2 needs `vpmaddubsw` + `vpmaddwd` + `vpaddd` for half as many. A panel's
/// step (16 columns × 4 bytes) is one zmm vector. All MR rows go at once over two panels: per
/// step 2 loads of W, 4 broadcasts of x and 8 `vpdpbusd` into 8 independent integer chains, with
/// 8 f32 accumulators, of the 32 zmm registers. Loads were the limit with one panel (5 per 4
/// multiply-adds). The integer sums are the AVX2 tile's (both exact) and are scaled in the same
/// order, so the two give the same bits.
#[cfg(target_arch = "x86_64")]
mod avx512_vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// Whether the CPU has AVX-512 VNNI and the level allows AVX-512 (`WICK_CPU_ISA`).
    pub(super) fn usable() -> bool {
        crate::cpu::isa() >= crate::cpu::Isa::Avx512 && crate::cpu::has_avx512_vnni()
    }

    /// As [`super::avx2::tile`], for P panels side by side (P·16 columns of y): panel i's
    /// values, scales and corrections `i·panel_bytes` and `i·panel_scales` past the first's.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(super) unsafe fn tile<const P: usize>(
        xq: &[u8],
        xd: &[f32],
        wq: &[i8],
        wd: &[f32],
        wc: &[i32],
        nb: usize,
        y: *mut f32,
        ldy: usize,
        rows: usize,
        panel_bytes: usize,
        panel_scales: usize,
    ) {
        unsafe {
            debug_assert!(P == 1 || (wq.len() > panel_bytes && wd.len() > panel_scales && wc.len() > panel_scales));
            let (xq, wq) = (xq.as_ptr(), wq.as_ptr());
            // y's rows are a line or two each, `ldy` apart, and cold: the next two groups' (the
            // caller's next tiles) start on their way now, or this tile's loads below were a
            // fifth of the kernel's time.
            for r in 0..2 * MR {
                for i in 0..P {
                    _mm_prefetch::<_MM_HINT_T0>(y.wrapping_add((MR + r) * ldy + i * NR) as *const i8);
                }
            }
            // Rows past `rows` (the last group's padding: bytes 64, scale 0) are computed and
            // dropped.
            let mut acc_f = [[_mm512_setzero_ps(); P]; MR];
            for r in 0..rows {
                for i in 0..P {
                    acc_f[r][i] = _mm512_loadu_ps(y.add(r * ldy + i * NR));
                }
            }
            for b in 0..nb {
                let xb = xq.add(b * BLOCK * MR);
                // Each chain starts at −64·Σw (the offset's correction) instead of zero.
                let start: [__m512i; P] = std::array::from_fn(|i| {
                    let c = _mm512_loadu_si512(wc.as_ptr().add(i * panel_scales + b * NR) as *const __m512i);
                    _mm512_sub_epi32(_mm512_setzero_si512(), c)
                });
                let mut acc = [start; MR];
                for s in 0..STEPS {
                    let w: [__m512i; P] = std::array::from_fn(|i| _mm512_loadu_si512(wq.add(i * panel_bytes + b * BLOCK * NR + s * NR * 4) as *const __m512i));
                    for r in 0..MR {
                        let x = _mm512_set1_epi32(std::ptr::read_unaligned(xb.add((s * MR + r) * 4) as *const i32));
                        for i in 0..P {
                            acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], x, w[i]);
                        }
                    }
                }
                for i in 0..P {
                    let dw = _mm512_loadu_ps(wd.as_ptr().add(i * panel_scales + b * NR));
                    for r in 0..MR {
                        let dx = _mm512_set1_ps(*xd.get_unchecked(b * MR + r));
                        acc_f[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][i]), _mm512_mul_ps(dx, dw), acc_f[r][i]);
                    }
                }
            }
            for r in 0..rows {
                for i in 0..P {
                    _mm512_storeu_ps(y.add(r * ldy + i * NR), acc_f[r][i]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matvec::tests::values;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Result, Tensor};

    /// The kernel against the plain tile on the same packed data (the same integers: 1e-5
    /// relative), and both within the activations' 7-bit rounding of the f32 product with the
    /// dequantized weight: each activation is off by at most dx/2 = max|x_block|/126, so an
    /// output by at most Σ|w|·max|x|/126. The last shape has 9 panels (ranges of two panels
    /// and a last one alone on VNNI), two chunks of rows and two depth slices.
    #[test]
    fn matches_the_reference_tile_and_the_f32_product() -> Result<()> {
        if !crate::cpu::available_levels().contains(&crate::cpu::Isa::Avx2) {
            return Ok(());
        }
        for (format, dtype) in [(QFormat::Q8_0, GgmlDType::Q8_0), (QFormat::Q4_0, GgmlDType::Q4_0)] {
            for &(m, k, n) in &[(1, 32, 16), (5, 64, 32), (33, 96, 48), (130, 256, 64), (37, 1056, 32), (130, 1056, 144)] {
                let wv = values(n * k, (k + n) as u64);
                let q = QTensor::quantize(&Tensor::from_slice(&wv, (n, k), &Device::Cpu)?, dtype)?;
                let bytes = q.data()?.into_owned();
                let deq = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                let mut x = values(m * k, 11 + m as u64);
                x[..BLOCK].fill(0.0); // an all-zero block: scale 0
                let bias = values(n, 5);
                let mut got = bias.repeat(m);
                product(format, &x, m, k, &bytes, n, &mut got);

                let (xp, wp) = (pack_rows(&x, m, k), pack_weight(format, &bytes, n, k));
                let nb = k / BLOCK;
                for g in 0..m.div_ceil(MR) {
                    for p in 0..n / NR {
                        let (xq, xd) = (&xp.qs[g * nb * BLOCK * MR..], &xp.scales[g * nb * MR..]);
                        let (wq, wd, wc) = (&wp.qs[p * NR * k..], &wp.scales[p * NR * nb..], &wp.corrections[p * NR * nb..]);
                        let want = reference_tile(xq, xd, wq, wd, wc, nb);
                        for r in 0..MR.min(m - g * MR) {
                            for j in 0..NR {
                                let (row, col) = (g * MR + r, p * NR + j);
                                let (got, want) = (got[row * n + col], want[r][j] + bias[col]);
                                assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{format:?} ({m},{k},{n}) [{row},{col}]: {got} vs {want}");
                                let exact: f32 = (0..k).map(|i| x[row * k + i] * deq[col * k + i]).sum::<f32>() + bias[col];
                                let xmax = x[row * k..(row + 1) * k].iter().fold(0f32, |a, v| a.max(v.abs()));
                                let bound = (0..k).map(|i| deq[col * k + i].abs()).sum::<f32>() * xmax / 126.0 + 1e-4;
                                assert!((got - exact).abs() <= bound, "{format:?} ({m},{k},{n}) [{row},{col}]: {got} vs f32 {exact} (bound {bound})");
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The VNNI tile gives the AVX2 tile's bits (both sum the same integers exactly and scale
    /// them in the same order), over one panel and two side by side, on full and partial groups
    /// of rows and a depth past one slice.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vnni_tile_gives_the_avx2_tiles_bits() -> Result<()> {
        if !avx512_vnni::usable() {
            eprintln!("skipped: no AVX-512 VNNI here");
            return Ok(());
        }
        for &(m, k, n) in &[(4, 32, 32), (7, 1056, 32), (3, 96, 48)] {
            let wv = values(n * k, (k + n) as u64);
            let q = QTensor::quantize(&Tensor::from_slice(&wv, (n, k), &Device::Cpu)?, GgmlDType::Q8_0)?;
            let bytes = q.data()?.into_owned();
            let x = values(m * k, 3 + m as u64);
            let (xp, wp) = (pack_rows(&x, m, k), pack_weight(QFormat::Q8_0, &bytes, n, k));
            let nb = k / BLOCK;
            for g in 0..m.div_ceil(MR) {
                let (xq, xd) = (&xp.qs[g * nb * BLOCK * MR..], &xp.scales[g * nb * MR..]);
                let rows = MR.min(m - g * MR);
                for p in 0..n / NR {
                    let span = if p + 1 < n / NR { 2 } else { 1 };
                    let (wq, wd, wc) = (&wp.qs[p * NR * k..], &wp.scales[p * NR * nb..], &wp.corrections[p * NR * nb..]);
                    let ld = span * NR;
                    let (mut a, mut b) = (values(MR * ld, 9), values(MR * ld, 9));
                    // SAFETY: the CPU has AVX-512 VNNI (checked above) and so AVX2; the slices
                    // hold nb blocks of `span` panels; the outputs hold MR rows of `ld`.
                    unsafe {
                        for i in 0..span {
                            let (wq, wd, wc) = (&wq[i * NR * k..], &wd[i * NR * nb..], &wc[i * NR * nb..]);
                            avx2::tile(xq, xd, wq, wd, wc, nb, a.as_mut_ptr().add(i * NR), ld, rows);
                        }
                        if span == 2 {
                            avx512_vnni::tile::<2>(xq, xd, wq, wd, wc, nb, b.as_mut_ptr(), ld, rows, NR * k, NR * nb);
                        } else {
                            avx512_vnni::tile::<1>(xq, xd, wq, wd, wc, nb, b.as_mut_ptr(), ld, rows, NR * k, NR * nb);
                        }
                    }
                    assert_eq!(a, b, "({m},{k},{n}) group {g} panels {p}+{span}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn seven_bit_blocks_stay_in_range_and_round_to_nearest() {
        let block: Vec<f32> = (0..BLOCK).map(|i| (i as f32 - 16.0) / 8.0).collect();
        let (d, q) = quantize_block(&block);
        assert!((d - 2.0 / 63.0).abs() < 1e-7);
        assert_eq!(q[0], -63);
        for (v, &q) in block.iter().zip(&q) {
            assert!((v - q as f32 * d).abs() <= d / 2.0 + 1e-6);
        }
        assert_eq!(quantize_block(&[0.0; BLOCK]), (0.0, [0; BLOCK]));
    }

    /// The AVX2 block quantizer gives the plain one's scale and bytes: random blocks, blocks
    /// whose values fall on halves of the step (ties, to even), zeros, and a lone maximum.
    #[test]
    fn vector_block_quantizer_matches_the_plain_one() {
        if !crate::cpu::available_levels().contains(&crate::cpu::Isa::Avx2) {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = (0..64).map(|i| values(BLOCK, 100 + i).iter().map(|v| v * (i as f32 + 0.5)).collect()).collect();
        // max 31.5: the step is 0.5, and every value but the maximum lies halfway between two
        // steps
        blocks.push((0..BLOCK).map(|i| if i == 0 { 31.5 } else { (i as f32 - 16.0) / 2.0 + 0.25 }).collect());
        blocks.push(vec![0.0; BLOCK]);
        // a maximum so small that 63 / max overflows: zeros, in both paths
        blocks.push((0..BLOCK).map(|i| if i == 0 { 1e-37 } else if i % 2 == 0 { -0.0 } else { 0.0 }).collect());
        blocks.push((0..BLOCK).map(|i| if i == 7 { -3.0 } else { 1e-3 * i as f32 }).collect());
        for block in &blocks {
            let (d, q) = quantize_block(block);
            let want = (d, q.map(|v| (v + OFFSET as i8) as u8));
            // SAFETY: the CPU has AVX2 (checked above).
            let got = unsafe { avx2::offset_block(block.as_slice().try_into().unwrap()) };
            assert_eq!(got, want, "{block:?}");
        }
    }
}
