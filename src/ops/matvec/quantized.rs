//! `y += x·Wᵀ` for a weight quantized to GGML's `q8_0` or `q4_0` blocks, read as stored (rows of
//! W along the input dimension, (out, in)), for the few rows of a decoding step.
//!
//! Why our own: candle's CPU kernels for these types convert each block's f16 scale through a
//! function call and take one column at a time; on an AVX2 core they read about 5 GB/s of
//! weight, a third of what one core's memory bandwidth allows, so q8_0 decoding was bound by
//! arithmetic while it reads 28% of f32's bytes.
//!
//! Algorithm (llama.cpp's): each row of x is quantized once per product to blocks of 32 int8
//! with one f32 scale `dx = max|x| / 127` (the `Q8_0` activation format candle uses for these
//! types too, with the scale kept in f32 rather than f16). A block's dot product is then exact
//! in integers: `Σ qw·qx` through `vpmaddubsw` (u8 × i8 pairs → i16; |qw| as the unsigned side,
//! qx carrying qw's sign, at most 2·128·127 < 2¹⁵) and `vpmaddwd` (pairs → i32), converted to f32
//! once and scaled by `dw · dx`. q4_0's nibbles (low nibble = element i, high = element i + 16)
//! are widened to int8 minus 8 in registers.
//!
//! More than [`INTEGER_ROWS`] rows: on AVX2 the 7-bit integer product of [`super::qgemm`] (when
//! n is a multiple of 16); otherwise blocks of W are converted to f32 and multiplied by `gemm`
//! (exact in x: no activation rounding), as `super`'s many-rows path does for f16.
//!
//! Tiles: R rows of x × J rows of W (4×1, 2×2, 1×4; and 8×1 on AVX-512 VNNI, where
//! `vpdpbusd` does a pair of blocks at once: `avx512_vnni`): each weight block loaded and its
//! sign taken once serves R rows, and J independent accumulator chains hide the latency for a
//! single row.
//! Tasks split the rows of W over the rayon pool. Memory traffic: the weight once (34 or 18 bytes
//! per 32 weights), x's quantized rows (m·k bytes, L1-resident) R-way reused, y once.

use crate::cpu::Isa;
use candle_core::quantized::GgmlDType;
use candle_core::{bail, Result};
use rayon::prelude::*;

/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// The quantized block formats our kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QFormat {
    /// f16 scale + 32 int8.
    Q8_0,
    /// f16 scale + 16 bytes of nibbles (value − 8).
    Q4_0,
}

impl QFormat {
    pub(crate) fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            _ => None,
        }
    }

    /// Bytes of one block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
        }
    }
}

/// x's rows quantized: `qs` (m·k int8) and one scale per block (m·k/32); `scales8` holds each
/// scale broadcast to 8 lanes, so that the AVX2 tiles scale with one memory operand (and the
/// VNNI tiles take two neighbouring blocks' scales as one load of 16). `nibble_offsets`, where
/// asked for (q4_0 on VNNI), holds per block the 8 lanes of `vpdpbusd` each starting at
/// `-8 · Σ qx` over its 4 elements: a lane that adds the unsigned nibbles' products `Σ q·qx`
/// to it gets `Σ (q - 8)·qx`, the weights' true values. Built once per product, before the tasks
/// that share it.
pub(crate) struct QuantizedRows {
    pub qs: Vec<i8>,
    pub scales: Vec<f32>,
    pub scales8: Vec<f32>,
    pub nibble_offsets: Vec<i32>,
}

/// Rows of x (m × k, k a multiple of 32) as int8 blocks with f32 scales: `round(x / dx)` with
/// `dx = max|x| / 127` per block (0 for an all-zero block); with `nibble_offsets`, those too.
pub(crate) fn quantize_rows(x: &[f32], nibble_offsets: bool) -> QuantizedRows {
    let mut qs = vec![0i8; x.len()];
    let mut scales = Vec::with_capacity(x.len() / BLOCK);
    for (block, q) in x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in q.iter_mut().zip(block) {
            *q = (v * id).round() as i8;
        }
        scales.push(d);
    }
    let scales8 = scales.iter().flat_map(|&d| [d; 8]).collect();
    let nibble_offsets = if nibble_offsets { qs.chunks_exact(4).map(|lane| -8 * lane.iter().map(|&q| q as i32).sum::<i32>()).collect() } else { Vec::new() };
    QuantizedRows { qs, scales, scales8, nibble_offsets }
}

/// Products with more rows than this (prompts, encoder batches) run [`super::qgemm`]'s tiles
/// (the weight repacked once per product, x in 7 bits) or convert blocks of W to f32 for `gemm`;
/// with fewer rows the repacking is not paid back, and these tiles, which read W as stored once
/// per 4 rows (8 on VNNI), win.
pub(crate) const INTEGER_ROWS: usize = 32;

/// Whether an x (m × k) · Wᵀ (W n × k) product at kernel level `isa` runs [`super::qgemm`]'s
/// 7-bit integer tiles (the rule [`product`] follows).
pub(crate) fn takes_seven_bit_product(isa: Isa, m: usize, n: usize, k: usize) -> bool {
    m > INTEGER_ROWS && isa >= Isa::Avx2 && super::qgemm::fits(n, k)
}

/// From this many rows (encoder batches) a weight of at most [`WHOLE_WEIGHT_BYTES`] as f32 is
/// converted whole for one `gemm`: BERT-base forward b8 s128 in q8_0 went from 0.85× the speed
/// of f32 weights (blocks) to 0.94–0.97× (two alternating pairs of runs, while a build ran).
const WHOLE_WEIGHT_ROWS: usize = 256;
const WHOLE_WEIGHT_BYTES: usize = 64 << 20;

/// `blocks` (whole blocks of `format`) as f32 values into `out`.
pub(crate) fn dequantize(format: QFormat, blocks: &[u8], out: &mut [f32]) {
    for (block, out) in blocks.chunks_exact(format.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
        let d = block_scale(block);
        for (o, v) in out.iter_mut().zip(block_values(format, block)) {
            *o = v as f32 * d;
        }
    }
}

/// y (m × n, holding the bias rows or zeros) += x (m × k) · Wᵀ for W (n × k) stored as `format`
/// blocks in `w`, at kernel level `isa`, in `tasks` rayon tasks over the rows of W.
pub(crate) fn product(isa: Isa, format: QFormat, x: &[f32], m: usize, k: usize, w: &[u8], n: usize, y: &mut [f32], tasks: usize) -> Result<()> {
    if isa > crate::cpu::detected_isa() {
        bail!("kernel level {} is not supported by this CPU", isa.name())
    }
    if k % BLOCK != 0 {
        bail!("a {format:?} product needs an input width that is a multiple of {BLOCK}, not {k}")
    }
    let row_bytes = k / BLOCK * format.block_bytes();
    if x.len() != m * k || y.len() != m * n || w.len() != n * row_bytes {
        bail!("{format:?} product (m {m}, k {k}, n {n}): x has {} elements, W {} bytes, y {}", x.len(), w.len(), y.len())
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    if m > INTEGER_ROWS {
        if takes_seven_bit_product(isa, m, n, k) {
            super::qgemm::product(format, x, m, k, w, n, y);
            return Ok(());
        }
        let p = super::Problem { m, k, n, layout: super::WeightLayout::OutIn };
        if m >= WHOLE_WEIGHT_ROWS && n * k * 4 <= WHOLE_WEIGHT_BYTES {
            // The whole weight as f32 once, then one product over every row: gemm packs x once
            // instead of once per block of W.
            let mut wf = vec![0f32; n * k];
            wf.par_chunks_mut(k).zip(w.par_chunks(row_bytes)).for_each(|(out, row)| dequantize(format, row, out));
            super::many_rows::<super::F32W>(isa, x, &wf, p, y);
            return Ok(());
        }
        super::gemm_by_blocks(x, p, y, |buf, i0, kb, j0, nb| {
            for jj in 0..nb {
                let row = &w[(j0 + jj) * row_bytes..(j0 + jj + 1) * row_bytes];
                let blocks = &row[i0 / BLOCK * format.block_bytes()..(i0 + kb) / BLOCK * format.block_bytes()];
                dequantize(format, blocks, &mut buf[jj * kb..(jj + 1) * kb]);
            }
            (kb as isize, 1)
        });
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    let nibbles_unsigned = format == QFormat::Q4_0 && isa == Isa::Avx512 && crate::cpu::has_avx512_vnni();
    #[cfg(not(target_arch = "x86_64"))]
    let nibbles_unsigned = false;
    let xq = quantize_rows(x, nibbles_unsigned);
    super::by_columns(n, tasks, 4, y, |j0, j1, y| {
        // SAFETY: sizes checked above; the level is supported by this CPU; tasks write disjoint
        // columns [j0, j1) of y.
        unsafe { columns(isa, format, &xq, m, k, w, row_bytes, n, j0, j1, y) }
    });
    Ok(())
}

/// y[.., j0..j1] += x · W[j0..j1]ᵀ at level `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(isa: Isa, format: QFormat, x: &QuantizedRows, m: usize, k: usize, w: &[u8], row_bytes: usize, n: usize, j0: usize, j1: usize, y: *mut f32) {
    let nb = k / BLOCK;
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if crate::cpu::has_avx512_vnni() => match format {
                QFormat::Q8_0 => avx2::columns::<avx512_vnni::VnniTiles, false>(x, m, nb, w.as_ptr(), row_bytes, n, j0, j1, y),
                QFormat::Q4_0 => avx2::columns::<avx512_vnni::VnniTiles, true>(x, m, nb, w.as_ptr(), row_bytes, n, j0, j1, y),
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => match format {
                QFormat::Q8_0 => avx2::columns::<avx2::Avx2Tiles, false>(x, m, nb, w.as_ptr(), row_bytes, n, j0, j1, y),
                QFormat::Q4_0 => avx2::columns::<avx2::Avx2Tiles, true>(x, m, nb, w.as_ptr(), row_bytes, n, j0, j1, y),
            },
            _ => portable::columns(format, x, m, nb, w, row_bytes, n, j0, j1, y),
        }
    }
}

/// A block's f16 scale (its first two bytes) as f32.
#[inline(always)]
pub(super) fn block_scale(block: &[u8]) -> f32 {
    super::f16_to_f32(u16::from_le_bytes([block[0], block[1]]))
}

/// The 32 int8 values of a block.
#[inline(always)]
pub(super) fn block_values(format: QFormat, block: &[u8]) -> [i8; BLOCK] {
    let mut v = [0i8; BLOCK];
    match format {
        QFormat::Q8_0 => {
            for (v, b) in v.iter_mut().zip(&block[2..2 + BLOCK]) {
                *v = *b as i8;
            }
        }
        QFormat::Q4_0 => {
            for (i, b) in block[2..2 + BLOCK / 2].iter().enumerate() {
                v[i] = (b & 0x0f) as i8 - 8;
                v[i + BLOCK / 2] = (b >> 4) as i8 - 8;
            }
        }
    }
    v
}

/// Plain Rust: the same integer sums, one block at a time; the reference the SIMD level is
/// tested against.
mod portable {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns(format: QFormat, x: &QuantizedRows, m: usize, nb: usize, w: &[u8], row_bytes: usize, n: usize, j0: usize, j1: usize, y: *mut f32) {
        let bb = format.block_bytes();
        for j in j0..j1 {
            let row = &w[j * row_bytes..(j + 1) * row_bytes];
            for r in 0..m {
                let mut s = 0f32;
                for b in 0..nb {
                    let block = &row[b * bb..(b + 1) * bb];
                    let xq = &x.qs[(r * nb + b) * BLOCK..(r * nb + b + 1) * BLOCK];
                    let dot: i32 = block_values(format, block).iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
                    s += dot as f32 * (block_scale(block) * x.scales[r * nb + b]);
                }
                // SAFETY: (r, j) is inside y (m × n) and j is in this task's columns.
                unsafe { *y.add(r * n + j) += s };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::ops::matvec::kernels::avx2::hsum;
    use std::arch::x86_64::*;

    /// One q4_0 block's 16 bytes of nibbles as its 32 unsigned values in order (low nibbles are
    /// elements 0–15, high ones 16–31).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn nibbles(packed: __m128i) -> __m256i {
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    /// A block's 32 values as int8 (q4_0: nibbles widened, minus 8).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn load_values<const Q4: bool>(block: *const u8) -> __m256i {
        unsafe {
            if Q4 {
                _mm256_sub_epi8(nibbles(_mm_loadu_si128(block.add(2) as *const __m128i)), _mm256_set1_epi8(8))
            } else {
                _mm256_loadu_si256(block.add(2) as *const __m256i)
            }
        }
    }

    /// A block's f16 scale through F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn load_scale(block: *const u8) -> f32 {
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(block as *const u16) as i32))) }
    }

    /// y[r][j] += Σ_blocks dw·dx·Σ qw·qx for r < R rows of x, j < J rows of W. Per block and
    /// row of x: 7 instructions (load, sign, two multiply-adds in integers, convert, scale by
    /// dx (a pre-broadcast memory operand), accumulate with dw); per block of W: load, scale,
    /// absolute value, and a prefetch of the same block of the next tile's rows (the rows of W
    /// are contiguous, so tiles sweep the weight front to back).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<const Q4: bool, const R: usize, const J: usize>(xq: *const i8, xd8: *const f32, nb: usize, w: *const u8, row_bytes: usize, bb: usize, y: *mut f32, ldy: usize) {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_ps(); J]; R];
            for b in 0..nb {
                for j in 0..J {
                    let block = w.add(j * row_bytes + b * bb);
                    _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(J * row_bytes) as *const i8);
                    let wq = load_values::<Q4>(block);
                    let dw = _mm256_set1_ps(load_scale(block));
                    let wabs = _mm256_sign_epi8(wq, wq);
                    for r in 0..R {
                        let xv = _mm256_loadu_si256(xq.add((r * nb + b) * BLOCK) as *const __m256i);
                        let pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wq));
                        let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                        let dot = _mm256_mul_ps(dot, _mm256_loadu_ps(xd8.add((r * nb + b) * 8)));
                        acc[r][j] = _mm256_fmadd_ps(dot, dw, acc[r][j]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (j, v) in a.iter().enumerate() {
                    *y.add(r * ldy + j) += hsum(*v);
                }
            }
        }
    }

    /// The AVX2 tiles, for [`columns`].
    pub(super) struct Avx2Tiles;

    impl Tiles for Avx2Tiles {
        const EIGHT_ROWS: bool = false;
        #[inline(always)]
        unsafe fn tile<const Q4: bool, const R: usize, const J: usize>(xq: *const i8, xd8: *const f32, _xo: *const i32, nb: usize, w: *const u8, row_bytes: usize, bb: usize, y: *mut f32, ldy: usize) {
            unsafe { tile::<Q4, R, J>(xq, xd8, nb, w, row_bytes, bb, y, ldy) }
        }
    }

    /// Rows [j0, j1) of W against all m rows of x with T's tiles: 8 rows of x (8×1, where T
    /// takes them), 4 (4×1), 2 (2×2) and 1 (1×4), and single rows of W at the end of the range.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn columns<T: Tiles, const Q4: bool>(x: &QuantizedRows, m: usize, nb: usize, w: *const u8, row_bytes: usize, n: usize, j0: usize, j1: usize, y: *mut f32) {
        let bb = if Q4 { 18 } else { 34 };
        let (qs, ds, offsets) = (x.qs.as_ptr(), x.scales8.as_ptr(), x.nibble_offsets.as_ptr());
        unsafe {
            let mut r = 0;
            while r < m {
                let rows = if T::EIGHT_ROWS && m - r >= 8 { 8 } else if m - r >= 4 { 4 } else if m - r >= 2 { 2 } else { 1 };
                // (The offsets are empty where the tiles do not read them.)
                let (xq, xd, xo, yr) = (qs.add(r * nb * BLOCK), ds.add(r * nb * 8), offsets.wrapping_add(r * nb * 8), y.add(r * n));
                let mut j = j0;
                let jt = match rows {
                    8 | 4 => 1,
                    2 => 2,
                    _ => 4,
                };
                while j + jt <= j1 {
                    let wj = w.add(j * row_bytes);
                    match rows {
                        8 => T::tile::<Q4, 8, 1>(xq, xd, xo, nb, wj, row_bytes, bb, yr.add(j), n),
                        4 => T::tile::<Q4, 4, 1>(xq, xd, xo, nb, wj, row_bytes, bb, yr.add(j), n),
                        2 => T::tile::<Q4, 2, 2>(xq, xd, xo, nb, wj, row_bytes, bb, yr.add(j), n),
                        _ => T::tile::<Q4, 1, 4>(xq, xd, xo, nb, wj, row_bytes, bb, yr.add(j), n),
                    }
                    j += jt;
                }
                while j < j1 {
                    let wj = w.add(j * row_bytes);
                    match rows {
                        8 => T::tile::<Q4, 8, 1>(xq, xd, xo, nb, wj, row_bytes, bb, yr.add(j), n),
                        4 => T::tile::<Q4, 4, 1>(xq, xd, xo, nb, wj, row_bytes, bb, yr.add(j), n),
                        2 => T::tile::<Q4, 2, 1>(xq, xd, xo, nb, wj, row_bytes, bb, yr.add(j), n),
                        _ => T::tile::<Q4, 1, 1>(xq, xd, xo, nb, wj, row_bytes, bb, yr.add(j), n),
                    }
                    j += 1;
                }
                r += rows;
            }
        }
    }
}

/// A family of R×J tiles (R rows of x, J rows of W) that [`avx2::columns`] sweeps over a range of
/// W's rows; `xd8` holds x's block scales broadcast to 8 lanes.
#[cfg(target_arch = "x86_64")]
trait Tiles {
    /// Whether the 8×1 tile is worth it (W's blocks decoded once for 8 rows of x): with 32 vector
    /// registers, not with AVX2's 16.
    const EIGHT_ROWS: bool;
    /// y[r][j] += Σ_blocks dw·dx·Σ qw·qx for r < R, j < J.
    ///
    /// # Safety
    /// The CPU has the tile's instructions; xq/xd8 hold R rows of nb blocks, w J rows of
    /// `row_bytes`, y R rows (`ldy` apart) of J; where a tile reads them (q4_0 on VNNI, R ≤ 2),
    /// `xo` holds x's `nibble_offsets` for R rows of nb blocks (8 a block).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const Q4: bool, const R: usize, const J: usize>(xq: *const i8, xd8: *const f32, xo: *const i32, nb: usize, w: *const u8, row_bytes: usize, bb: usize, y: *mut f32, ldy: usize);
}

/// The tiles on AVX-512 VNNI: two blocks at a time in one zmm vector (W's two blocks loaded
/// apart, x's two contiguous), `vpdpbusd` for AVX2's `vpmaddubsw` + `vpmaddwd`, and x's two
/// scales one load of `xd8`. Per pair of blocks and row of x: 6 instructions where AVX2 takes 14.
/// The signs move to x as in AVX2 (|w| unsigned, x negated where w < 0, by a mask); an odd last
/// block goes through 256-bit `vpdpbusd`. q4_0 in the 1- and 2-row tiles (decoding at batch 1–2)
/// skips the signs: the nibbles (0–15) are the unsigned side as they are, and each lane starts
/// from x's `nibble_offsets` (−8·Σ qx) instead of zero, which subtracts the 8; a pair of blocks
/// is split into nibbles in one ymm (`nibble_pair`). `benches/matvec --dtype q4_0 --rows 1`
/// went from 13.4 to 14.4 GB/s of weight (means of three alternating runs, 2 threads). The same
/// integer sums as the AVX2 tiles; the f32 scaling and additions run in another order (and the
/// odd block's unfused), so the results agree to rounding. With 32 registers 8 rows of x share
/// each decoded pair of W's blocks: `benches/matvec --dtype q8_0 --rows 8` went from 5.7 GB/s of weight (AVX2
/// tiles) to 6.5 (these, 4 rows) and 8.0 (8 rows), means of three alternating runs.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512_vnni {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) struct VnniTiles;

    impl Tiles for VnniTiles {
        const EIGHT_ROWS: bool = true;
        #[inline(always)]
        unsafe fn tile<const Q4: bool, const R: usize, const J: usize>(xq: *const i8, xd8: *const f32, xo: *const i32, nb: usize, w: *const u8, row_bytes: usize, bb: usize, y: *mut f32, ldy: usize) {
            unsafe { tile::<Q4, R, J>(xq, xd8, xo, nb, w, row_bytes, bb, y, ldy) }
        }
    }

    /// Rows of x up to which q4_0 tiles multiply the unsigned nibbles and start from x's
    /// `nibble_offsets` (fewer instructions per pair of W's blocks, one more load per row); the
    /// 4- and 8-row tiles keep the signed values of `avx2::load_values`.
    const UNSIGNED_NIBBLE_ROWS: usize = 2;

    /// Two neighbouring q4_0 blocks (`bb` bytes apart) as 64 unsigned values: both blocks' bytes
    /// in one ymm, split into nibbles once, the 128-bit quarters put in element order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn nibble_pair(first: *const u8, bb: usize) -> __m512i {
        unsafe {
            let bytes = _mm256_set_m128i(_mm_loadu_si128(first.add(bb + 2) as *const __m128i), _mm_loadu_si128(first.add(2) as *const __m128i));
            let low = _mm256_and_si256(bytes, _mm256_set1_epi8(0x0f));
            let high = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), _mm256_set1_epi8(0x0f));
            // [first.low, second.low, first.high, second.high] → [first.low, first.high, second.low, second.high]
            let quarters = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high);
            _mm512_shuffle_i64x2::<0b11_01_10_00>(quarters, quarters)
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const Q4: bool, const R: usize, const J: usize>(xq: *const i8, xd8: *const f32, xo: *const i32, nb: usize, w: *const u8, row_bytes: usize, bb: usize, y: *mut f32, ldy: usize) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); J]; R];
            let mut b = 0;
            while b + 2 <= nb {
                for j in 0..J {
                    let first = w.add(j * row_bytes + b * bb);
                    _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(J * row_bytes) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(J * row_bytes + 2 * bb - 1) as *const i8);
                    let dw = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(avx2::load_scale(first)), _mm512_set1_ps(avx2::load_scale(first.add(bb))));
                    if Q4 && R <= UNSIGNED_NIBBLE_ROWS {
                        let wq = nibble_pair(first, bb);
                        for r in 0..R {
                            let at = r * nb + b;
                            let xv = _mm512_loadu_si512(xq.add(at * BLOCK) as *const __m512i);
                            let start = _mm512_loadu_si512(xo.add(at * 8) as *const __m512i);
                            let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, wq, xv));
                            let dot = _mm512_mul_ps(dot, _mm512_loadu_ps(xd8.add(at * 8)));
                            acc[r][j] = _mm512_fmadd_ps(dot, dw, acc[r][j]);
                        }
                        continue;
                    }
                    let wq = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(avx2::load_values::<Q4>(first)), avx2::load_values::<Q4>(first.add(bb)));
                    let (wabs, negative) = (_mm512_abs_epi8(wq), _mm512_movepi8_mask(wq));
                    for r in 0..R {
                        let xv = _mm512_loadu_si512(xq.add((r * nb + b) * BLOCK) as *const __m512i);
                        let signed = _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv);
                        let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs, signed));
                        let dot = _mm512_mul_ps(dot, _mm512_loadu_ps(xd8.add((r * nb + b) * 8)));
                        acc[r][j] = _mm512_fmadd_ps(dot, dw, acc[r][j]);
                    }
                }
                b += 2;
            }
            if b < nb {
                for j in 0..J {
                    let block = w.add(j * row_bytes + b * bb);
                    let dw = _mm256_set1_ps(avx2::load_scale(block));
                    if Q4 && R <= UNSIGNED_NIBBLE_ROWS {
                        let wq = avx2::nibbles(_mm_loadu_si128(block.add(2) as *const __m128i));
                        for r in 0..R {
                            let at = r * nb + b;
                            let xv = _mm256_loadu_si256(xq.add(at * BLOCK) as *const __m256i);
                            let start = _mm256_loadu_si256(xo.add(at * 8) as *const __m256i);
                            let dot = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, wq, xv));
                            let dot = _mm256_mul_ps(_mm256_mul_ps(dot, _mm256_loadu_ps(xd8.add(at * 8))), dw);
                            acc[r][j] = _mm512_add_ps(acc[r][j], _mm512_zextps256_ps512(dot));
                        }
                        continue;
                    }
                    let wq = avx2::load_values::<Q4>(block);
                    let (wabs, negative) = (_mm256_abs_epi8(wq), _mm256_movepi8_mask(wq));
                    for r in 0..R {
                        let xv = _mm256_loadu_si256(xq.add((r * nb + b) * BLOCK) as *const __m256i);
                        let signed = _mm256_mask_sub_epi8(xv, negative, _mm256_setzero_si256(), xv);
                        let dot = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, signed));
                        let dot = _mm256_mul_ps(_mm256_mul_ps(dot, _mm256_loadu_ps(xd8.add((r * nb + b) * 8))), dw);
                        acc[r][j] = _mm512_add_ps(acc[r][j], _mm512_zextps256_ps512(dot));
                    }
                }
            }
            add_sums(&acc, y, ldy);
        }
    }

    /// y[r][j] += the sum of `acc[r][j]`'s lanes, for R rows `ldy` apart.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::ops::matvec) unsafe fn add_sums<const R: usize, const J: usize>(acc: &[[__m512; J]; R], y: *mut f32, ldy: usize) {
        for (r, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                // SAFETY: the caller's y holds R rows (`ldy` apart) of J.
                unsafe { *y.add(r * ldy + j) += _mm512_reduce_add_ps(*v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use crate::ops::matvec::tests::{assert_same_sums, values};

    /// Every level the CPU has gives the portable level's sums (the same integers, summed in
    /// another order: 1e-5 relative), and the portable level is within the activations' rounding
    /// of the f32 product with the dequantized weight.
    #[test]
    fn every_level_matches_portable_and_dequantized() -> Result<()> {
        for (format, dtype) in [(QFormat::Q8_0, GgmlDType::Q8_0), (QFormat::Q4_0, GgmlDType::Q4_0)] {
            for &(k, n) in &[(32, 1), (64, 5), (96, 13), (256, 37)] {
                let wv = values(n * k, k as u64 + n as u64);
                let wt = Tensor::from_slice(&wv, (n, k), &Device::Cpu)?;
                let q = QTensor::quantize(&wt, dtype)?;
                let bytes = q.data()?.into_owned();
                let deq = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                for m in [1, 2, 3, 4, 5, 8, 13, 33, 256] {
                    let x = values(m * k, 7 + m as u64);
                    let bias = values(n, 3);
                    let mut want = bias.repeat(m);
                    product(Isa::Portable, format, &x, m, k, &bytes, n, &mut want, 1)?;
                    // The f32 product with the dequantized weight: activation rounding is at most
                    // dx/2 per element, so the sum is off by ≤ Σ|w|·max|x|/254.
                    for r in 0..m {
                        for j in 0..n {
                            let exact: f32 = (0..k).map(|i| x[r * k + i] * deq[j * k + i]).sum::<f32>() + bias[j];
                            let bound: f32 = (0..k).map(|i| deq[j * k + i].abs()).sum::<f32>() / 254.0 + 1e-5;
                            let got = want[r * n + j];
                            assert!((got - exact).abs() <= bound, "{format:?} portable ({m},{k},{n}) [{r},{j}]: {got} vs {exact} (bound {bound})");
                        }
                    }
                    for isa in crate::cpu::available_levels() {
                        for tasks in [1, 3] {
                            let mut got = bias.repeat(m);
                            product(isa, format, &x, m, k, &bytes, n, &mut got, tasks)?;
                            assert_same_sums(&got, &want, &format!("{format:?} {isa:?} tasks {tasks} ({m},{k},{n})"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn quantized_rows_round_and_scale() {
        let x: Vec<f32> = (0..64).map(|i| if i < 32 { (i as f32 - 16.0) / 16.0 } else { 0.0 }).collect();
        let q = quantize_rows(&x, true);
        assert_eq!(q.scales[1], 0.0);
        assert!(q.qs[32..].iter().all(|&v| v == 0));
        assert!((q.scales[0] - 1.0 / 127.0).abs() < 1e-9);
        assert_eq!(q.qs[0], -127);
        for (v, &qv) in x[..32].iter().zip(&q.qs[..32]) {
            assert!((v - qv as f32 * q.scales[0]).abs() <= q.scales[0] / 2.0 + 1e-7);
        }
        // Lane 0 of block 0 covers x's first four values: -1, -15/16, -14/16, -13/16.
        assert_eq!(q.nibble_offsets.len(), 16);
        assert_eq!(q.nibble_offsets[0], -8 * q.qs[..4].iter().map(|&v| v as i32).sum::<i32>());
        assert!(q.nibble_offsets[0] > 0 && q.nibble_offsets[8..].iter().all(|&o| o == 0));
        assert!(quantize_rows(&x, false).nibble_offsets.is_empty());
    }

    #[test]
    fn bad_sizes_are_errors() {
        let mut y = vec![0f32; 2];
        assert!(product(Isa::Portable, QFormat::Q8_0, &[0.0; 30], 1, 30, &[0; 68], 2, &mut y, 1).is_err());
        assert!(product(Isa::Portable, QFormat::Q8_0, &[0.0; 32], 1, 32, &[0; 60], 2, &mut y, 1).is_err());
    }
}
