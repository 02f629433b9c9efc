//! Goto's algorithm as BLIS does it, for any micro-kernel ([`MicroKernel`]): the blocking, the
//! packing and the thread split of our f32 matrix product. The kernels are `blis_avx2` (6×16 in
//! ymm registers) and `blis_avx512` (12×32 in zmm registers); `ops::gemm::product` picks one by
//! the CPU's level. A weight packed once (`ops::gemm::PackedWeight`, [`Rhs::Packed`]) is read in
//! the 6×16 kernel's panels, at AVX-512 by `blis_avx512::Avx512Narrow`'s MR×16 tiles; its
//! panels then stream from memory instead of sitting in L1.
//!
//! Algorithm: C (m×n) = [C +] scale · A (m×k) · B (k×n), any strides for A and B, C row-major.
//!   for each block of NC columns:
//!     for each block of KC depths:  pack B[kc, nc] into NR-wide panels (k-major)
//!       for each block of MC rows:  pack A[mc, kc] into MR-tall panels (k-major)
//!         for each NR panel × MR panel: the micro-kernel keeps an MR×NR tile of C in registers
//!         for all KC depths, then adds it to C once.
//! Memory traffic: each C element is read and written once per KC block (k/KC times); A is read
//! from memory once per NC block, B once per MC block; the micro-kernel itself reads only packed
//! panels: B's (KC·NR floats) stays in L1 while the MR-tall panels of A's block (MC·KC floats,
//! in L2) stream past it.

use super::Mat;
use std::arch::x86_64::*;

/// A register-tile kernel and the block sizes that keep its operands in cache.
pub(crate) trait MicroKernel {
    /// Rows and columns of the C tile the kernel keeps in registers (MR ≤ 32, NR ≤ 32, NR a
    /// multiple of 8).
    const MR: usize;
    const NR: usize;
    /// Depths of a packed block; rows of A and columns of B packed at a time (multiples of MR, NR).
    const KC: usize;
    const MC: usize;
    const NC: usize;
    /// `c[i·ldc + j] = (load_c ? c : 0) + scale · Σ_p ap[p·MR+i]·bp[p·NR+j]` for i < rows,
    /// j < cols.
    ///
    /// # Safety
    /// The CPU has the kernel's instructions; `ap` holds kc·MR floats, `bp` kc·NR, `c` rows rows
    /// of cols (`ldc` apart).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, load_c: bool, scale: f32);
}

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
unsafe fn pack_a<K: MicroKernel>(ap: &mut [f32], a: Mat, mc: usize, kc: usize) {
    let mr = K::MR;
    for q in 0..mc.div_ceil(mr) {
        let rows = mr.min(mc - q * mr);
        let dst = &mut ap[q * mr * kc..(q + 1) * mr * kc];
        if rows < mr {
            dst.fill(0.0);
        }
        if a.cs == 1 {
            // Rows of A are contiguous (x in x·W).
            let mut src = [std::ptr::null::<f32>(); 32];
            for (i, s) in src.iter_mut().enumerate().take(mr) {
                *s = a.ptr.offset((q * mr + i.min(rows - 1)) as isize * a.rs);
            }
            let mut p = 0;
            if rows == mr {
                // 8 depths of up to 8 rows at a time, transposed in registers (missing rows read
                // zeros). A group of fewer than 8 rows alone in the panel (MR = 6) stores 8 and
                // spills 2 zeros into the next depth's run, which the next store overwrites; the
                // panel's last store keeps its 6 (a masked store is microcoded and slow on AMD's
                // cores).
                const ZEROS: [f32; 8] = [0.0; 8];
                while p + 8 <= kc {
                    for g in (0..mr).step_by(8) {
                        let width = (mr - g).min(8);
                        let at: [*const f32; 8] = std::array::from_fn(|i| if i < width { src[g + i].add(p) } else { ZEROS.as_ptr() });
                        for (d, col) in load_transposed_8x8(&at).iter().enumerate() {
                            let out = dst.as_mut_ptr().add((p + d) * mr + g);
                            if width == 8 || (mr < 8 && p + d + 1 < kc) {
                                _mm256_storeu_ps(out, *col);
                            } else if width == 4 {
                                _mm_storeu_ps(out, _mm256_castps256_ps128(*col));
                            } else {
                                let mut last = [0f32; 8];
                                _mm256_storeu_ps(last.as_mut_ptr(), *col);
                                std::ptr::copy_nonoverlapping(last.as_ptr(), out, width);
                            }
                        }
                    }
                    p += 8;
                }
            }
            gather(dst, mr, &src[..rows], p, kc);
        } else if a.rs == 1 && rows == mr {
            // Columns of A are contiguous (dZᵀ in dZᵀ·x): a run of MR per depth, 8 depths ahead
            // prefetched (each depth is a different row of the stored matrix, often a new page).
            let src = a.ptr.add(q * mr);
            for p in 0..kc {
                _mm_prefetch::<_MM_HINT_T0>(src.wrapping_offset((p + 8) as isize * a.cs) as *const i8);
                std::ptr::copy_nonoverlapping(src.offset(p as isize * a.cs), dst.as_mut_ptr().add(p * mr), mr);
            }
        } else {
            for p in 0..kc {
                for i in 0..rows {
                    *dst.get_unchecked_mut(p * mr + i) = a.at(q * mr + i, p);
                }
            }
        }
    }
}

/// Packs depths [0, kc) × columns [0, nc) of `b` into NR-wide panels: panel q holds
/// `bp[q·NR·kc + p·NR + j] = b[p, q·NR + j]`, columns past `nc` as zeros.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_b<K: MicroKernel>(bp: &mut [f32], b: Mat, kc: usize, nc: usize) {
    let nr = K::NR;
    for q in 0..nc.div_ceil(nr) {
        let cols = nr.min(nc - q * nr);
        let dst = &mut bp[q * nr * kc..(q + 1) * nr * kc];
        if cols < nr {
            dst.fill(0.0);
        }
        if b.cs == 1 && cols == nr {
            // Rows of B are contiguous (W in x·W): one copy of NR per depth.
            for p in 0..kc {
                let src = b.ptr.offset(p as isize * b.rs + (q * nr) as isize);
                std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr().add(p * nr), nr);
            }
        } else if b.rs == 1 {
            // Columns of B are contiguous (Wᵀ in x·Wᵀ).
            let mut src = [std::ptr::null::<f32>(); 32];
            for (j, s) in src.iter_mut().enumerate().take(nr) {
                *s = b.ptr.offset((q * nr + j.min(cols - 1)) as isize * b.cs);
            }
            let mut p = 0;
            if cols == nr {
                // 8 depths × 8 columns at a time, transposed in registers.
                while p + 8 <= kc {
                    for h in 0..nr / 8 {
                        let at: [*const f32; 8] = std::array::from_fn(|j| src[8 * h + j].add(p));
                        for (d, row) in load_transposed_8x8(&at).iter().enumerate() {
                            _mm256_storeu_ps(dst.as_mut_ptr().add((p + d) * nr + 8 * h), *row);
                        }
                    }
                    p += 8;
                }
            }
            gather(dst, nr, &src[..cols], p, kc);
        } else {
            for p in 0..kc {
                for j in 0..cols {
                    *dst.get_unchecked_mut(p * nr + j) = b.at(p, q * nr + j);
                }
            }
        }
    }
}

thread_local! {
    static BUFFERS: std::cell::RefCell<(LineAligned, LineAligned)> = const { std::cell::RefCell::new((LineAligned::new(), LineAligned::new())) };
}

/// Floats whose first one starts a cache line (64 bytes), whatever the allocator gives: the
/// kernels load each panel row of NR floats as 32- or 64-byte vectors, which then never
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
pub(crate) unsafe fn pack_whole_b<K: MicroKernel>(b: Mat, k: usize, n: usize) -> LineAligned {
    use rayon::prelude::*;
    let padded = n.div_ceil(K::NR) * K::NR;
    let mut data = LineAligned::zeroed(k * padded);
    let b = &b; // (the closure shares the whole Mat, which is Sync, not its raw pointer)
    data.as_mut_slice().par_chunks_mut(K::KC * padded).enumerate().for_each(|(chunk, out)| {
        let pc = chunk * K::KC;
        let kc = K::KC.min(k - pc);
        // SAFETY: rows pc..pc + kc of b lie inside its k rows.
        unsafe { pack_b::<K>(out, Mat { ptr: b.ptr.offset(pc as isize * b.rs), ..*b }, kc, n) };
    });
    data
}

/// `c (m×n, row stride ldc) = [c +] scale · a · b` on the calling thread.
///
/// # Safety
/// The CPU has the kernel's instructions; `a` addresses m×k elements, `b` k×n and `c` m rows of n (row stride
/// `ldc`), all valid, and `c` overlaps neither.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_serial<K: MicroKernel>(m: usize, n: usize, k: usize, a: Mat, b: Rhs, c: *mut f32, ldc: usize, accumulate: bool, scale: f32) {
    BUFFERS.with_borrow_mut(|(ap, bp)| {
        let (mr, nr) = (K::MR, K::NR);
        let kc_max = K::KC.min(k);
        // Grown, never shrunk: the packing overwrites every element it later reads.
        let (a_len, b_len) = (K::MC.min(m).div_ceil(mr) * mr * kc_max, K::NC.min(n).div_ceil(nr) * nr * kc_max);
        ap.grow(a_len);
        if matches!(b, Rhs::Mat(_)) {
            bp.grow(b_len);
        }
        let (ap, bp) = (ap.as_mut_slice(), bp.as_mut_slice());
        for jc in (0..n).step_by(K::NC) {
            let nc = K::NC.min(n - jc);
            for pc in (0..k).step_by(K::KC) {
                let kc = K::KC.min(k - pc);
                let load_c = accumulate || pc > 0;
                // This block's panels: packed now, or where they were packed once.
                let block = match b {
                    Rhs::Mat(b) => {
                        pack_b::<K>(bp, Mat { ptr: b.ptr.offset(pc as isize * b.rs + jc as isize * b.cs), ..b }, kc, nc);
                        bp.as_ptr()
                    }
                    Rhs::Packed { ptr, padded, col0 } => ptr.add(pc * padded + (col0 + jc) * kc),
                };
                for ic in (0..m).step_by(K::MC) {
                    let mc = K::MC.min(m - ic);
                    pack_a::<K>(ap, Mat { ptr: a.ptr.offset(ic as isize * a.rs + pc as isize * a.cs), ..a }, mc, kc);
                    for jr in (0..nc).step_by(nr) {
                        let cols = nr.min(nc - jr);
                        let bpanel = block.add(jr * kc);
                        for ir in (0..mc).step_by(mr) {
                            let rows = mr.min(mc - ir);
                            K::tile(kc, ap.as_ptr().add(ir * kc), bpanel, c.add((ic + ir) * ldc + jc + jr), ldc, rows, cols, load_c, scale);
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
pub(crate) unsafe fn gemm<K: MicroKernel>(m: usize, n: usize, k: usize, a: Mat, b: Rhs, c: *mut f32, ldc: usize, accumulate: bool, scale: f32, threads: usize) {
    use rayon::prelude::*;
    let split_m = m >= n;
    let (len, unit) = if split_m { (m, K::MR) } else { (n, K::NR) };
    let tasks = threads.min(len.div_ceil(unit)).max(1);
    if tasks == 1 || m * n * k < PARALLEL_MIN_WORK {
        return gemm_serial::<K>(m, n, k, a, b, c, ldc, accumulate, scale);
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
            gemm_serial::<K>(size, n, k, Mat { ptr: a.ptr.offset(start as isize * a.rs), ..a }, b, cp.get().add(start * ldc), ldc, accumulate, scale);
        } else {
            let b = match b {
                Rhs::Mat(b) => Rhs::Mat(Mat { ptr: b.ptr.offset(start as isize * b.cs), ..b }),
                Rhs::Packed { ptr, padded, col0 } => Rhs::Packed { ptr, padded, col0: col0 + start },
            };
            gemm_serial::<K>(m, size, k, a, b, cp.get().add(start), ldc, accumulate, scale);
        }
    });
}
