//! Our f32 matrix product for AVX2 + FMA CPUs, BLIS-style (Goto's algorithm): what
//! `ops::gemm::product` runs at the AVX2 level. On this project's AMD EPYC (Zen 3, 2 threads) it
//! ran 1.15–1.7× the `gemm` crate on the products of BERT-base and MiniLM training steps
//! (`benches/matmul`, notes/cpu-speed.md); `gemm` stays the product at the AVX-512 level (its
//! x86-v4 kernels), at the portable one, and for products too short or narrow for this one.
//!
//! Algorithm: C (m×n) = [C +] scale · A (m×k) · B (k×n), any strides for A and B, C row-major.
//!   for each block of KC depths:                      (B block KC×NC and A block MC×KC packed)
//!     for each block of NC columns: pack B[kc, nc] into NR-wide panels (k-major)
//!       for each block of MC rows:   pack A[mc, kc] into MR-tall panels (k-major)
//!         for each NR panel × MR panel: the micro-kernel keeps an MR×NR tile of C in 12 ymm
//!         registers for all KC depths, then adds it to C once.
//! Memory traffic: each C element is read and written once per KC block (k/KC times); A is read
//! from memory once per NC block, B once per MC block; the micro-kernel itself reads only packed
//! panels that sit in L1 (B panel: KC·NR·4 = 16 KB) and L2 (A block: MC·KC·4 = 144 KB).
//! Per depth step the micro-kernel does 2 loads of B, 6 broadcasts of A and 12 FMAs: two FMA
//! ports are busy every cycle, which is the CPU's peak.

use super::Mat;
use std::arch::x86_64::*;

pub(crate) const MR: usize = 6;
pub(crate) const NR: usize = 16;
const KC: usize = 256;
const MC: usize = 144;
const NC: usize = 4080;

impl Mat {
    #[inline(always)]
    unsafe fn at(&self, r: usize, c: usize) -> f32 {
        *self.ptr.offset(r as isize * self.rs + c as isize * self.cs)
    }
}

/// Loads 8 floats from each of 8 rows and returns the 8 columns: `out[p][r] = rows[r][p]`.
#[inline(always)]
unsafe fn load_transposed_8x8(rows: &[*const f32; 8]) -> [__m256; 8] {
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i]));
    // Pairs of rows interleaved, then pairs of pairs: each 128-bit lane holds 4 rows of a column.
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (x, y) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
        if i % 2 == 0 { _mm256_unpacklo_ps(x, y) } else { _mm256_unpackhi_ps(x, y) }
    });
    let s = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    // s[c] holds columns c (low lane) and c + 4 (high lane) of rows 0–3; s[c + 4] of rows 4–7.
    std::array::from_fn(|c| {
        if c < 4 { _mm256_permute2f128_ps::<0x20>(s[c], s[c + 4]) } else { _mm256_permute2f128_ps::<0x31>(s[c - 4], s[c]) }
    })
}

/// `dst[p·width + x] = sources[x][p]` for depths [from, kc): contiguous runs (rows of A, columns
/// of a transposed B) gathered into a panel's interleaved layout, one element at a time.
#[inline(always)]
unsafe fn gather(dst: &mut [f32], width: usize, sources: &[*const f32], from: usize, kc: usize) {
    for p in from..kc {
        for (x, src) in sources.iter().enumerate() {
            *dst.get_unchecked_mut(p * width + x) = *src.add(p);
        }
    }
}

/// Packs rows [0, mc) × depths [0, kc) of `a` into MR-tall panels: panel q holds
/// `ap[q·MR·kc + p·MR + i] = a[q·MR + i, p]`, rows past `mc` as zeros.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a(ap: &mut [f32], a: Mat, mc: usize, kc: usize) {
    for q in 0..mc.div_ceil(MR) {
        let rows = MR.min(mc - q * MR);
        let dst = &mut ap[q * MR * kc..(q + 1) * MR * kc];
        if rows < MR {
            dst.fill(0.0);
        }
        if a.cs == 1 {
            // Rows of A are contiguous (x in x·W).
            let src: [*const f32; MR] = std::array::from_fn(|i| a.ptr.offset((q * MR + i.min(rows - 1)) as isize * a.rs));
            let mut p = 0;
            if rows == MR {
                // 8 depths of the 6 rows at a time, transposed in registers (rows 6 and 7 read
                // zeros). Each store of 8 spills 2 zeros into the next depth's run, which the next
                // store overwrites; the panel's last store keeps its 6 (a masked store is
                // microcoded and slow on AMD's cores).
                const ZEROS: [f32; 8] = [0.0; 8];
                while p + 8 <= kc {
                    let at: [*const f32; 8] = std::array::from_fn(|i| if i < MR { src[i].add(p) } else { ZEROS.as_ptr() });
                    for (d, col) in load_transposed_8x8(&at).iter().enumerate() {
                        if p + d + 1 < kc {
                            _mm256_storeu_ps(dst.as_mut_ptr().add((p + d) * MR), *col);
                        } else {
                            let mut last = [0f32; 8];
                            _mm256_storeu_ps(last.as_mut_ptr(), *col);
                            dst[(p + d) * MR..(p + d + 1) * MR].copy_from_slice(&last[..MR]);
                        }
                    }
                    p += 8;
                }
            }
            gather(dst, MR, &src[..rows], p, kc);
        } else if a.rs == 1 && rows == MR {
            // Columns of A are contiguous (dZᵀ in dZᵀ·x): a run of 6 per depth, 8 depths ahead
            // prefetched (each depth is a different row of the stored matrix, often a new page).
            let src = a.ptr.add(q * MR);
            for p in 0..kc {
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_offset((p + 8) as isize * a.cs) as *const i8);
                std::ptr::copy_nonoverlapping(src.offset(p as isize * a.cs), dst.as_mut_ptr().add(p * MR), MR);
            }
        } else {
            for p in 0..kc {
                for i in 0..rows {
                    *dst.get_unchecked_mut(p * MR + i) = a.at(q * MR + i, p);
                }
            }
        }
    }
}

/// Packs depths [0, kc) × columns [0, nc) of `b` into NR-wide panels: panel q holds
/// `bp[q·NR·kc + p·NR + j] = b[p, q·NR + j]`, columns past `nc` as zeros.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_b(bp: &mut [f32], b: Mat, kc: usize, nc: usize) {
    for q in 0..nc.div_ceil(NR) {
        let cols = NR.min(nc - q * NR);
        let dst = &mut bp[q * NR * kc..(q + 1) * NR * kc];
        if cols < NR {
            dst.fill(0.0);
        }
        if b.cs == 1 && cols == NR {
            // Rows of B are contiguous (W in x·W): one copy of 16 per depth.
            for p in 0..kc {
                let src = b.ptr.offset(p as isize * b.rs + (q * NR) as isize);
                std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr().add(p * NR), NR);
            }
        } else if b.rs == 1 {
            // Columns of B are contiguous (Wᵀ in x·Wᵀ).
            let src: [*const f32; NR] = std::array::from_fn(|j| b.ptr.offset((q * NR + j.min(cols - 1)) as isize * b.cs));
            let mut p = 0;
            if cols == NR {
                // 8 depths × 8 columns at a time, transposed in registers.
                while p + 8 <= kc {
                    for h in 0..2 {
                        let at: [*const f32; 8] = std::array::from_fn(|j| src[8 * h + j].add(p));
                        for (d, row) in load_transposed_8x8(&at).iter().enumerate() {
                            _mm256_storeu_ps(dst.as_mut_ptr().add((p + d) * NR + 8 * h), *row);
                        }
                    }
                    p += 8;
                }
            }
            gather(dst, NR, &src[..cols], p, kc);
        } else {
            for p in 0..kc {
                for j in 0..cols {
                    *dst.get_unchecked_mut(p * NR + j) = b.at(p, q * NR + j);
                }
            }
        }
    }
}

/// The MR×NR micro-kernel: `c[i·ldc + j] = (load_c ? c : 0) + scale · Σ_p ap[p·MR+i]·bp[p·NR+j]`
/// for i < rows, j < cols.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::needless_range_loop)]
unsafe fn kernel(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, load_c: bool, scale: f32) {
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
                let mut v = _mm256_mul_ps(acc[i][h], s);
                if load_c {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(row.add(8 * h)));
                }
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
                *row.add(j) = if load_c { *row.add(j) + v } else { v };
            }
        }
    }
}

thread_local! {
    static BUFFERS: std::cell::RefCell<(LineAligned, LineAligned)> = const { std::cell::RefCell::new((LineAligned::new(), LineAligned::new())) };
}

/// Floats whose first one starts a cache line (64 bytes), whatever the allocator gives: the
/// kernels load each panel row of NR = 16 floats as two 32-byte vectors, which then never
/// straddle two lines. (The system allocator puts large blocks 16 bytes past a page, where
/// every second load would be split; mimalloc, which the `wick` binary uses, happens to align
/// them, library users' allocators need not.)
pub(crate) struct LineAligned {
    data: Vec<f32>,
    offset: usize,
    len: usize,
}

impl LineAligned {
    const LINE: usize = 64 / std::mem::size_of::<f32>();

    pub(crate) const fn new() -> Self {
        Self { data: Vec::new(), offset: 0, len: 0 }
    }

    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        let data = vec![0f32; len + Self::LINE - 1];
        let offset = data.as_ptr().align_offset(64).min(Self::LINE - 1);
        Self { data, offset, len }
    }

    /// At least `len` floats (grown, never shrunk; what it held is not kept when it grows).
    fn grow(&mut self, len: usize) {
        if self.len < len {
            *self = Self::zeroed(len);
        }
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        &self.data[self.offset..self.offset + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data[self.offset..self.offset + self.len]
    }
}

/// The right operand of a product: a strided matrix, packed by every product into the panels
/// of [`pack_b`], or packed once ([`pack_whole_b`]) for every product with it.
#[derive(Clone, Copy)]
pub(crate) enum Rhs {
    Mat(Mat),
    /// Panels of a whole k × n matrix: depth chunk pc (KC deep) starts at `ptr + pc·padded`,
    /// `padded` = n rounded up to NR; this view starts at column `col0` (a multiple of NR).
    Packed { ptr: *const f32, padded: usize, col0: usize },
}
// SAFETY: as for Mat: only read, while the caller's buffer is borrowed.
unsafe impl Send for Rhs {}
unsafe impl Sync for Rhs {}

/// A k × n matrix `b` packed whole for [`Rhs::Packed`]: per depth chunk of KC, every NR-column
/// panel of [`pack_b`] (columns past n as zeros): k · n-rounded-up-to-NR floats. Chunks are
/// packed in parallel.
///
/// # Safety
/// The CPU has AVX2 and FMA; `b` addresses k×n valid elements.
pub(crate) unsafe fn pack_whole_b(b: Mat, k: usize, n: usize) -> LineAligned {
    use rayon::prelude::*;
    let padded = n.div_ceil(NR) * NR;
    let mut data = LineAligned::zeroed(k * padded);
    let b = &b; // (the closure shares the whole Mat, which is Sync, not its raw pointer)
    data.as_mut_slice().par_chunks_mut(KC * padded).enumerate().for_each(|(chunk, out)| {
        let pc = chunk * KC;
        let kc = KC.min(k - pc);
        // SAFETY: rows pc..pc + kc of b lie inside its k rows.
        unsafe { pack_b(out, Mat { ptr: b.ptr.offset(pc as isize * b.rs), ..*b }, kc, n) };
    });
    data
}

/// Rows of x up to which [`few_rows_packed`] runs instead of the 6-row tiles (which would also
/// compute the empty rows of their last tile, and copy x into panels). Past 8 rows the tiles'
/// 12 accumulators win: GPT-2 decoding at batch 16 ran 249 tok/s on average with 16 here, 287
/// with 8 (four and five alternating runs); batch 8 about the same with 4 (201 against 197).
pub(crate) const FEW_ROWS: usize = 8;

/// `y[r][j] += Σ_{d<kc} x[r][d]·B[d][j]` for the R rows of x (row stride ldx) and the P panels
/// at `panels` (each a run of kc × NR floats, `stride` apart), the last of them holding
/// `last_cols` valid columns; y's rows `ldy` apart. The accumulators (R × 2P vectors) stay in
/// registers over the depth; per depth, P panels' two vectors are loaded and R broadcasts of x.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows_tile<const R: usize, const P: usize>(x: *const f32, ldx: usize, kc: usize, panels: *const f32, stride: usize, y: *mut f32, ldy: usize, last_cols: usize) {
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
    for d in 0..kc {
        let b: [[__m256; 2]; P] = std::array::from_fn(|p| [_mm256_loadu_ps(panels.add(p * stride + d * NR)), _mm256_loadu_ps(panels.add(p * stride + d * NR + 8))]);
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

/// `y (m × n, row stride ldy) += x (m × k) · B` for m ≤ [`FEW_ROWS`] rows straight from a whole
/// packed B ([`pack_whole_b`], `padded` columns), for the panels `panels` (columns from
/// panels.start·NR): the products of decoding, bound by reading B, which stream it in panel order
/// with no copy of x or B. Per group of P panels and depth chunk, rows go 4 at a time (8
/// accumulators or more), the chunk's panels staying in L1 for the next rows; one row takes 4
/// panels at once instead.
///
/// # Safety
/// The CPU has AVX2 and FMA; x addresses m×k elements, `packed` the k × `padded` floats of a
/// whole packed B of n columns, y m rows of n; the panels lie inside n.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn few_rows_packed(m: usize, n: usize, k: usize, x: *const f32, packed: *const f32, padded: usize, panels: std::ops::Range<usize>, y: *mut f32, ldy: usize) {
    debug_assert!(m <= FEW_ROWS && panels.end <= n.div_ceil(NR));
    let cols_of = |q: usize| NR.min(n - q * NR);
    // P panels from q: every depth chunk, every group of rows.
    let group = |q: usize, p: usize| {
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let first = packed.add(pc * padded + q * NR * kc);
            let last_cols = cols_of(q + p - 1);
            for r0 in (0..m).step_by(4) {
                let (x, y) = (x.add(r0 * k + pc), y.add(r0 * ldy + q * NR));
                match ((m - r0).min(4), p) {
                    (1, 4) => few_rows_tile::<1, 4>(x, k, kc, first, NR * kc, y, ldy, last_cols),
                    (1, _) => few_rows_tile::<1, 1>(x, k, kc, first, NR * kc, y, ldy, last_cols),
                    (2, _) => few_rows_tile::<2, 1>(x, k, kc, first, NR * kc, y, ldy, last_cols),
                    (3, _) => few_rows_tile::<3, 1>(x, k, kc, first, NR * kc, y, ldy, last_cols),
                    _ => few_rows_tile::<4, 1>(x, k, kc, first, NR * kc, y, ldy, last_cols),
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

/// `c (m×n, row stride ldc) = [c +] scale · a · b` on the calling thread.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` addresses m×k elements, `b` k×n and `c` m rows of n (row stride
/// `ldc`), all valid, and `c` overlaps neither.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_serial(m: usize, n: usize, k: usize, a: Mat, b: Rhs, c: *mut f32, ldc: usize, accumulate: bool, scale: f32) {
    BUFFERS.with_borrow_mut(|(ap, bp)| {
        let kc_max = KC.min(k);
        // Grown, never shrunk: the packing overwrites every element it later reads.
        let (a_len, b_len) = (MC.min(m).div_ceil(MR) * MR * kc_max, NC.min(n).div_ceil(NR) * NR * kc_max);
        ap.grow(a_len);
        if matches!(b, Rhs::Mat(_)) {
            bp.grow(b_len);
        }
        let (ap, bp) = (ap.as_mut_slice(), bp.as_mut_slice());
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let load_c = accumulate || pc > 0;
                // This block's panels: packed now, or where they were packed once.
                let block = match b {
                    Rhs::Mat(b) => {
                        pack_b(bp, Mat { ptr: b.ptr.offset(pc as isize * b.rs + jc as isize * b.cs), ..b }, kc, nc);
                        bp.as_ptr()
                    }
                    Rhs::Packed { ptr, padded, col0 } => ptr.add(pc * padded + (col0 + jc) * kc),
                };
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    pack_a(ap, Mat { ptr: a.ptr.offset(ic as isize * a.rs + pc as isize * a.cs), ..a }, mc, kc);
                    for jr in (0..nc).step_by(NR) {
                        let cols = NR.min(nc - jr);
                        let bpanel = block.add(jr / NR * NR * kc);
                        for ir in (0..mc).step_by(MR) {
                            let rows = MR.min(mc - ir);
                            kernel(kc, ap.as_ptr().add(ir / MR * MR * kc), bpanel, c.add((ic + ir) * ldc + jc + jr), ldc, rows, cols, load_c, scale);
                        }
                    }
                }
            }
        }
    })
}

/// C's pointer, shared by the tasks of [`gemm`] (and of a packed weight's product), each writing
/// its own rows or columns.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: the tasks write disjoint parts of C.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// (A method, so that closures capture the whole Send wrapper, not its raw field.)
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Below this many multiply-adds a product runs on the calling thread: handing work to the pool
/// (a wake-up and a join, some microseconds) costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// [`gemm_serial`] split over `threads` rayon tasks along the longer of m and n, so the operand
/// that every task packs for itself is the smaller one.
///
/// # Safety
/// As [`gemm_serial`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(m: usize, n: usize, k: usize, a: Mat, b: Rhs, c: *mut f32, ldc: usize, accumulate: bool, scale: f32, threads: usize) {
    use rayon::prelude::*;
    let split_m = m >= n;
    let (len, unit) = if split_m { (m, MR) } else { (n, NR) };
    let tasks = threads.min(len.div_ceil(unit)).max(1);
    if tasks == 1 || m * n * k < PARALLEL_MIN_WORK {
        return gemm_serial(m, n, k, a, b, c, ldc, accumulate, scale);
    }
    let per = len.div_ceil(unit).div_ceil(tasks) * unit;
    let cp = SendPtr(c);
    (0..tasks).into_par_iter().for_each(|t| {
        let start = t * per;
        if start >= len {
            return;
        }
        let size = per.min(len - start);
        if split_m {
            gemm_serial(size, n, k, Mat { ptr: a.ptr.offset(start as isize * a.rs), ..a }, b, cp.get().add(start * ldc), ldc, accumulate, scale);
        } else {
            let b = match b {
                Rhs::Mat(b) => Rhs::Mat(Mat { ptr: b.ptr.offset(start as isize * b.cs), ..b }),
                Rhs::Packed { ptr, padded, col0 } => Rhs::Packed { ptr, padded, col0: col0 + start },
            };
            gemm_serial(m, size, k, a, b, cp.get().add(start), ldc, accumulate, scale);
        }
    });
}
