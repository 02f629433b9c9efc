//! q4_0 weights repacked once for decoding on AVX-512 VNNI: `y += x·Wᵀ` for one or two rows of x.
//!
//! Why: GGML's q4_0 block (an f16 scale, then 16 bytes of nibbles: 18 bytes) puts each block at
//! an 18-byte stride, so [`super::quantized`]'s tiles load a pair of blocks as two 16-byte halves,
//! shuffle them into element order and convert two scalar scales: ~20 instructions per 64
//! weights, which kept batch-1 decoding near 60% of the memory limit. Here a row of W is stored
//! as its nibbles, 16 bytes a block, contiguous (four blocks = one 64-byte line = one zmm load,
//! block i in 128-bit lane i), and its f16 scales apart (four = one 8-byte load). The same bytes
//! as GGML's (18 a block), in another order.
//!
//! Algorithm, per four blocks (128 weights) and row of W:
//! - `lo = line & 0x0f`, `hi = (line >> 4) & 0x0f`: lane i holds block i's elements 0–15 (lo) and
//!   16–31 (hi), unsigned 0–15.
//! - x is rearranged once per product to match: `xlo` / `xhi` hold each block's first / last 16
//!   int8 values in the block's lane, and `start` holds per 4-element dword `−8·Σ qx` over its
//!   elements of both halves, so `vpdpbusd(vpdpbusd(start, lo, xlo), hi, xhi)` gives per dword
//!   `Σ (q − 8)·qx`, the weights' true values (the trick of the VNNI tiles in `quantized`).
//! - converted to f32, times x's block scale (per lane, pre-expanded) and W's four scales
//!   (`vcvtph2ps`, then `vpermps` spreads each to its lane), accumulated with one FMA.
//!
//! 12 instructions (and a prefetch) per 128 weights and row of W (R = 1), x's four vectors
//! loaded once per group for all J rows. Memory traffic: W once (18 bytes per 32 weights), x's rearranged rows (L1).
//! Tiles: 1 row of x × 4 rows of W, 2 × 2; tasks split the rows of W as in `quantized`. The same
//! integer sums as `quantized`'s tiles, scaled and summed in another order: results agree to f32
//! rounding (tested against its portable level).

use super::quantized::{quantize_rows, QFormat, BLOCK};
use candle_core::{bail, Result};

/// Rows of x this path takes (batch-1 and batch-2 decoding); more go to `quantized`'s tiles.
pub(crate) const ROWS: usize = 2;

/// One 64-byte line: the nibbles of four blocks.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A q4_0 weight (n × k, (out, in)) in the decoding layout.
pub(crate) struct RepackedQ4 {
    n: usize,
    k: usize,
    /// n rows × k/128 lines.
    lines: Vec<Line>,
    /// n rows × k/32 f16 scales.
    scales: Vec<u16>,
}

impl std::fmt::Debug for RepackedQ4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepackedQ4 {{ n: {}, k: {} }}", self.n, self.k)
    }
}

impl RepackedQ4 {
    /// Whether this CPU runs the repacked product (AVX-512 VNNI at the chosen kernel level).
    pub(crate) fn available() -> bool {
        cfg!(target_arch = "x86_64") && crate::cpu::isa() == crate::cpu::Isa::Avx512 && crate::cpu::has_avx512_vnni()
    }

    /// W's GGML q4_0 `blocks` (n rows of k/32 blocks) repacked; `None` where this layout does not
    /// apply (k not a multiple of 128).
    pub(crate) fn new(blocks: &[u8], n: usize, k: usize) -> Result<Option<Self>> {
        let bb = QFormat::Q4_0.block_bytes();
        if k == 0 || !k.is_multiple_of(4 * BLOCK) {
            return Ok(None);
        }
        let nb = k / BLOCK;
        if blocks.len() != n * nb * bb {
            bail!("q4_0 weight ({n}, {k}): {} bytes where {} were expected", blocks.len(), n * nb * bb)
        }
        let mut lines = vec![Line([0; 64]); n * nb / 4];
        let mut scales = vec![0u16; n * nb];
        for (b, block) in blocks.chunks_exact(bb).enumerate() {
            scales[b] = u16::from_le_bytes([block[0], block[1]]);
            lines[b / 4].0[(b % 4) * 16..][..16].copy_from_slice(&block[2..]);
        }
        Ok(Some(Self { n, k, lines, scales }))
    }

    /// (n, k).
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// y (m × n, holding the bias rows or zeros) += x (m × k) · Wᵀ for m ≤ [`ROWS`], in `tasks`
    /// rayon tasks over the rows of W.
    pub(crate) fn product(&self, x: &[f32], m: usize, y: &mut [f32], tasks: usize) -> Result<()> {
        let (n, k) = (self.n, self.k);
        if !Self::available() {
            bail!("the repacked q4_0 product needs AVX-512 VNNI")
        }
        if m > ROWS || x.len() != m * k || y.len() != m * n {
            bail!("repacked q4_0 product (n {n}, k {k}): {m} rows, x of {} elements, y of {}", x.len(), y.len())
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let xg = GroupedRows::new(x, m, k);
        super::by_columns(n, tasks, 4, y, |j0, j1, y| {
            // SAFETY: the CPU has AVX-512 VNNI (checked above); sizes checked above; tasks write
            // disjoint columns [j0, j1) of y.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                vnni::columns(self, &xg, m, j0, j1, y)
            }
        });
        Ok(())
    }
}

/// x's rows quantized (q8_0 activations, as in `quantized`) and rearranged per group of four
/// blocks into the lanes of W's lines: for row r and group g, 64 bytes `lo` (block i's elements
/// 0–15 in lane i), 64 bytes `hi` (16–31), 16 `start` dwords and 16 scales (block i's in lane i).
struct GroupedRows {
    lo: Vec<Line>,
    hi: Vec<Line>,
    start: Vec<i32>,
    scale: Vec<f32>,
}

impl GroupedRows {
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let q = quantize_rows(x, false);
        let blocks = m * k / BLOCK;
        let mut rows = Self { lo: vec![Line([0; 64]); blocks / 4], hi: vec![Line([0; 64]); blocks / 4], start: vec![0; blocks * 4], scale: vec![0.0; blocks * 4] };
        for (b, values) in q.qs.chunks_exact(BLOCK).enumerate() {
            let (lo, hi) = values.split_at(BLOCK / 2);
            for (dst, src) in [(&mut rows.lo[b / 4].0, lo), (&mut rows.hi[b / 4].0, hi)] {
                for (d, &s) in dst[(b % 4) * 16..][..16].iter_mut().zip(src) {
                    *d = s as u8;
                }
            }
            for d in 0..4 {
                let sum: i32 = (4 * d..4 * d + 4).map(|e| lo[e] as i32 + hi[e] as i32).sum();
                rows.start[b * 4 + d] = -8 * sum;
                rows.scale[b * 4 + d] = q.scales[b];
            }
        }
        rows
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// Rows [j0, j1) of W against the m (1 or 2) rows of x: 1×4 or 2×2 tiles, then single rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn columns(w: &RepackedQ4, x: &GroupedRows, m: usize, j0: usize, j1: usize, y: *mut f32) {
        let mut j = j0;
        unsafe {
            if m == 1 {
                while j + 4 <= j1 {
                    tile::<1, 4>(w, x, j, y);
                    j += 4;
                }
                while j < j1 {
                    tile::<1, 1>(w, x, j, y);
                    j += 1;
                }
            } else {
                while j + 2 <= j1 {
                    tile::<2, 2>(w, x, j, y);
                    j += 2;
                }
                while j < j1 {
                    tile::<2, 1>(w, x, j, y);
                    j += 1;
                }
            }
        }
    }

    /// y[r][j0 + j] += row r of x · row j0 + j of W, for r < R, j < J.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const R: usize, const J: usize>(w: &RepackedQ4, x: &GroupedRows, j0: usize, y: *mut f32) {
        let (n, groups) = (w.n, w.k / (4 * BLOCK));
        unsafe {
            let nibble_mask = _mm512_set1_epi8(0x0f);
            // Lane l of the result takes scale l / 4: each block's scale across its 4 dwords.
            let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
            let lines = w.lines.as_ptr().add(j0 * groups) as *const u8;
            let scales = w.scales.as_ptr().add(j0 * groups * 4);
            let mut acc = [[_mm512_setzero_ps(); J]; R];
            for g in 0..groups {
                let mut xv = [[_mm512_setzero_si512(); 3]; R];
                let mut xd = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    let at = r * groups + g;
                    xv[r] = [
                        _mm512_load_si512(x.lo.as_ptr().add(at) as *const __m512i),
                        _mm512_load_si512(x.hi.as_ptr().add(at) as *const __m512i),
                        _mm512_loadu_si512(x.start.as_ptr().add(at * 16) as *const __m512i),
                    ];
                    xd[r] = _mm512_loadu_ps(x.scale.as_ptr().add(at * 16));
                }
                for j in 0..J {
                    let line = lines.add((j * groups + g) * 64);
                    // The same line of the next tile's rows (rows of W are contiguous).
                    _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(J * groups * 64) as *const i8);
                    let packed = _mm512_load_si512(line as *const __m512i);
                    let lo = _mm512_and_si512(packed, nibble_mask);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble_mask);
                    let four = _mm_cvtph_ps(_mm_loadl_epi64(scales.add(j * groups * 4 + g * 4) as *const __m128i));
                    let dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four));
                    for r in 0..R {
                        let sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(xv[r][2], lo, xv[r][0]), hi, xv[r][1]);
                        let dot = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), xd[r]);
                        acc[r][j] = _mm512_fmadd_ps(dot, dw, acc[r][j]);
                    }
                }
            }
            super::super::quantized::avx512_vnni::add_sums(&acc, y.add(j0), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quantized::{product, QFormat};
    use super::*;
    use crate::cpu::Isa;
    use crate::ops::matvec::tests::{assert_same_sums, values};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The repacked product gives the portable q4_0 level's sums (the same integers, scaled and
    /// summed in another order: 1e-5 relative), over widths of 1–24 groups, row counts that
    /// leave tails of the 4- and 2-row tiles, 1 and 2 rows of x, 1 and 3 tasks.
    #[test]
    fn matches_the_portable_q4_0_product() -> Result<()> {
        if !RepackedQ4::available() {
            eprintln!("skipped: no AVX-512 VNNI at the chosen kernel level");
            return Ok(());
        }
        for &(k, n) in &[(128, 1), (256, 5), (768, 13), (3072, 37)] {
            let wt = Tensor::from_slice(&values(n * k, k as u64 + n as u64), (n, k), &Device::Cpu)?;
            let bytes = QTensor::quantize(&wt, GgmlDType::Q4_0)?.data()?.into_owned();
            let repacked = RepackedQ4::new(&bytes, n, k)?.expect("k is a multiple of 128");
            for m in 1..=ROWS {
                let x = values(m * k, 7 + m as u64);
                let bias = values(n, 3);
                let mut want = bias.repeat(m);
                product(Isa::Portable, QFormat::Q4_0, &x, m, k, &bytes, n, &mut want, 1)?;
                for tasks in [1, 3] {
                    let mut got = bias.repeat(m);
                    repacked.product(&x, m, &mut got, tasks)?;
                    assert_same_sums(&got, &want, &format!("({m},{k},{n}) tasks {tasks}"));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn other_widths_and_bad_sizes() -> Result<()> {
        assert!(RepackedQ4::new(&[0; 18 * 3], 1, 96)?.is_none(), "k = 96 has 3 blocks, not whole groups of 4");
        assert!(RepackedQ4::new(&[0; 10], 1, 128).is_err());
        if RepackedQ4::available() {
            let w = RepackedQ4::new(&[0; 18 * 4], 1, 128)?.unwrap();
            assert!(w.product(&[0.0; 3 * 128], 3, &mut [0.0; 3], 1).is_err(), "3 rows");
            assert!(w.product(&[0.0; 100], 1, &mut [0.0; 1], 1).is_err(), "x too short");
        }
        Ok(())
    }
}
