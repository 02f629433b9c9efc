//! Goto's algorithm as BLIS does it, for any micro-kernel ([`MicroKernel`]): the blocking, the
//! packing and the thread split of our f32 matrix product. The kernels are `blis_avx2` (6×16 in
//! ymm registers) and `blis_avx512` (12×32 in zmm registers); `ops::gemm::product` picks one by
//! the CPU's level. A weight packed once (`ops::gemm::PackedWeight`, [`Rhs::Packed`]) is read in
//! the 6×16 kernel's panels, at AVX-512 by `blis_avx512::Avx512Narrow`'s MR×16 tiles, or (for
//! encoder batches) in the 12×32 kernel's own panels; its panels then stream from memory
//! instead of sitting in L1.
//!
//! Algorithm: C (m×n) = base + scale · A (m×k) · B (k×n), any strides for A and B, C row-major,
//! the base zero, C itself or a bias row ([`Base`]).
//!   for each block of NC columns:
//!     for each block of KC depths:  pack B[kc, nc] into NR-wide panels (k-major)
//!       for each block of MC rows:  pack A[mc, kc] into MR-tall panels (k-major)
//!         for each NR panel × MR panel: the micro-kernel keeps an MR×NR tile of C in registers
//!         for all KC depths, then adds it to the base once.
//! Memory traffic: each C element is read and written once per KC block (k/KC times); A is read
//! from memory once per NC block, B once per MC block; the micro-kernel itself reads only packed
//! panels: B's (KC·NR floats) stays in L1 while the MR-tall panels of A's block (MC·KC floats,
//! in L2) stream past it. A kernel may instead keep A's panel in L1
//! ([`MicroKernel::A_PANEL_IN_L1`]): then B is packed whole first and the loops run depth block,
//! row block, column block, A panel, B panel ([`gemm_serial_a_in_l1`]), each panel of B streaming
//! from its block in L2. Parallel products pack B once for all threads and hand out chunks of
//! rows ([`gemm`]).

pub(crate) use super::{Base, Mat};
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
    /// Which panel stays in L1 while the other streams past it, on a B packed whole
    /// ([`Rhs::Packed`]): A's (MR·KC floats; B's KC·NC block then sits in L2) or, without this,
    /// B's (KC·NR floats; A's MC·KC block in L2). A product packing B block by block always
    /// keeps B's panel in L1.
    const A_PANEL_IN_L1: bool = false;
    /// `c[i·ldc + j] = base[i][j] + scale · Σ_p ap[p·MR+i]·bp[p·NR+j]` for i < rows, j < cols,
    /// where `base` is zero, c itself or a row repeated ([`Base`]).
    ///
    /// # Safety
    /// The CPU has the kernel's instructions; `ap` holds kc·MR floats, `bp` kc·NR, `c` rows rows
    /// of cols (`ldc` apart), a `Base::Row` cols floats. Only with `Base::C` is c read.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(kc: usize, ap: *const f32, bp: *const f32, c: *mut f32, ldc: usize, rows: usize, cols: usize, base: Base, scale: f32);
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

/// A k × n matrix `b` packed whole for [`Rhs::Packed`] ([`pack_whole_b_into`]).
///
/// # Safety
/// The CPU has AVX2 and FMA; `b` addresses k×n valid elements.
pub(crate) unsafe fn pack_whole_b<K: MicroKernel>(b: Mat, k: usize, n: usize) -> LineAligned {
    let mut data = LineAligned::zeroed(k * n.div_ceil(K::NR) * K::NR);
    pack_whole_b_into::<K>(data.as_mut_slice(), b, k, n, true);
    data
}

/// Packs a k × n matrix `b` into `out` for [`Rhs::Packed`]: per depth chunk of KC, every
/// NR-column panel of [`pack_b`] (columns past n as zeros): k · n-rounded-up-to-NR floats. Runs
/// of panels are packed in parallel, or all on the calling thread (a serial product, which may
/// itself be one task of a parallel loop).
///
/// # Safety
/// The CPU has AVX2 and FMA; `b` addresses k×n valid elements; `out` holds at least
/// k · n-rounded-up-to-NR floats.
unsafe fn pack_whole_b_into<K: MicroKernel>(out: &mut [f32], b: Mat, k: usize, n: usize, parallel: bool) {
    use rayon::prelude::*;
    const PANELS_PER_TASK: usize = 8;
    let padded = n.div_ceil(K::NR) * K::NR;
    let b = &b; // (the closure shares the whole Mat, which is Sync, not its raw pointer)
    // Depth chunk `chunk`'s run `run` of panels: within a chunk panel q starts at q·NR·kc, so a
    // run of panels is a run of the chunk's floats.
    let pack_run = |chunk: usize, run: usize, part: &mut [f32]| {
        let (pc, col) = (chunk * K::KC, run * PANELS_PER_TASK * K::NR);
        let (kc, cols) = (K::KC.min(k - pc), (PANELS_PER_TASK * K::NR).min(n - col));
        // SAFETY: rows pc..pc + kc and columns col..col + cols of b lie inside its k × n.
        unsafe { pack_b::<K>(part, Mat { ptr: b.ptr.offset(pc as isize * b.rs + col as isize * b.cs), ..*b }, kc, cols) };
    };
    let run_len = |chunk: usize| PANELS_PER_TASK * K::NR * K::KC.min(k - chunk * K::KC);
    let out = &mut out[..k * padded];
    if parallel {
        out.par_chunks_mut(K::KC * padded).enumerate().for_each(|(chunk, block)| block.par_chunks_mut(run_len(chunk)).enumerate().for_each(|(run, part)| pack_run(chunk, run, part)));
    } else {
        out.chunks_mut(K::KC * padded).enumerate().for_each(|(chunk, block)| block.chunks_mut(run_len(chunk)).enumerate().for_each(|(run, part)| pack_run(chunk, run, part)));
    }
}

/// `c (m×n, row stride ldc) = base + scale · a · b` on the calling thread; every element of c is
/// written (k > 0).
///
/// # Safety
/// The CPU has the kernel's instructions; `a` addresses m×k elements, `b` k×n and `c` m rows of n (row stride
/// `ldc`), all valid, `base` a row of n if it is one, and `c` overlaps none of them; k > 0.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_serial<K: MicroKernel>(m: usize, n: usize, k: usize, a: Mat, b: Rhs, c: *mut f32, ldc: usize, base: Base, scale: f32) {
    if let (true, Rhs::Packed { ptr, padded, col0 }) = (K::A_PANEL_IN_L1, b) {
        return gemm_serial_a_in_l1::<K>(m, n, k, a, (ptr, padded, col0), c, ldc, base, scale);
    }
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
                // The first depth block starts from the base, the later ones add to what it wrote.
                let block_base = if pc == 0 { base } else { Base::C };
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
                            K::tile(kc, ap.as_ptr().add(ir * kc), bpanel, c.add((ic + ir) * ldc + jc + jr), ldc, rows, cols, block_base.at_col(jc + jr), scale);
                        }
                    }
                }
            }
        }
    })
}

/// [`gemm_serial`] on a B packed whole (`packed`: its panels, their padded width, the column
/// where this product's B starts; as in [`Rhs::Packed`]) with A's panel in L1:
///   for each block of KC depths:
///     for each block of MC rows:   pack A[mc, kc] into MR-tall panels (in L2)
///       for each block of NC columns (B's KC·NC block, read from where it was packed, in L2):
///         for each MR panel of A (in L1) × NR panel of B (streaming from L2): the micro-kernel.
/// Each A panel serves NC/NR tiles from L1, where the other order keeps B's panel there (with
/// the 12×32 kernel at the KC of 256 that order had, B's panel was 32 KB of a 48 KB L1, and
/// the A panels streaming past evicted it).
/// A block is packed once per depth block (not once per column block), and B's blocks come from
/// the packed whole, so a product packs nothing twice.
///
/// # Safety
/// As [`gemm_serial`]; `packed` holds the chunks of [`pack_whole_b_into`] for k depths, with
/// the n columns of this product from `col0` on.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial_a_in_l1<K: MicroKernel>(m: usize, n: usize, k: usize, a: Mat, packed: (*const f32, usize, usize), c: *mut f32, ldc: usize, base: Base, scale: f32) {
    let (ptr, padded, col0) = packed;
    BUFFERS.with_borrow_mut(|(ap, _)| {
        let (mr, nr) = (K::MR, K::NR);
        ap.grow(K::MC.min(m).div_ceil(mr) * mr * K::KC.min(k));
        let ap = ap.as_mut_slice();
        for pc in (0..k).step_by(K::KC) {
            let kc = K::KC.min(k - pc);
            // The first depth block starts from the base, the later ones add to what it wrote.
            let block_base = if pc == 0 { base } else { Base::C };
            // This depth chunk's panel of the product's column j starts at j·kc from here.
            let chunk = ptr.add(pc * padded + col0 * kc);
            for ic in (0..m).step_by(K::MC) {
                let mc = K::MC.min(m - ic);
                pack_a::<K>(ap, Mat { ptr: a.ptr.offset(ic as isize * a.rs + pc as isize * a.cs), ..a }, mc, kc);
                for jc in (0..n).step_by(K::NC) {
                    let nc = K::NC.min(n - jc);
                    for ir in (0..mc).step_by(mr) {
                        let rows = mr.min(mc - ir);
                        for jr in (jc..jc + nc).step_by(nr) {
                            let cols = nr.min(jc + nc - jr);
                            K::tile(kc, ap.as_ptr().add(ir * kc), chunk.add(jr * kc), c.add((ic + ir) * ldc + jr), ldc, rows, cols, block_base.at_col(jr), scale);
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

/// Floats of B packed at a time for all tasks to share (16 MB): the forward products of BERT-base
/// and GPT-2 small but the LM head pack their whole right operand at once; a weight gradient
/// over many tokens (k = 2048 by 3072) comes in pieces of fewer depths. (Small in tests, so
/// that their shapes cross it.)
const SHARED_B_MAX: usize = if cfg!(test) { 1 << 16 } else { 1 << 22 };

thread_local! {
    /// The calling thread's buffer for the B that its product's tasks share.
    static SHARED_B: std::cell::RefCell<LineAligned> = const { std::cell::RefCell::new(LineAligned::new()) };
}

/// `c = base + scale · a · b` over `threads` rayon tasks ([`gemm_serial`] each). With rows
/// enough, B is packed once (in parallel) and shared, and the rows of C are handed out in
/// small chunks that the pool's threads take as they come free: the cores of one machine do
/// not run at one speed (on this project's 2-core Xeon VM one core ran a fixed half of a
/// product 25–30% slower than the other, and the split into one half a thread waited for it).
/// With few rows, the longer of m and n is split in equal parts instead. B is packed once for
/// all tasks whenever rows go out in chunks, and always for a kernel that keeps A's panel in
/// L1; otherwise (the AVX2 kernel's halves) each task packs its share; a weight packed once is
/// never packed again.
///
/// # Safety
/// As [`gemm_serial`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<K: MicroKernel>(m: usize, n: usize, k: usize, a: Mat, b: Rhs, c: *mut f32, ldc: usize, base: Base, scale: f32, threads: usize) {
    debug_assert!(k > 0, "a product without depth writes only its base (product_raw)");
    let threads = if m * n * k < PARALLEL_MIN_WORK { 1 } else { threads.max(1) };
    // Rows enough to hand out in chunks, two or more a thread.
    let chunked = threads > 1 && m >= 2 * threads * K::MR;
    let run = |b: Rhs, n: usize, k: usize, a: Mat, c: *mut f32, base: Base| match (chunked, threads > 1) {
        (true, _) => gemm_row_chunks::<K>(m, n, k, a, b, c, ldc, base, scale, threads),
        (false, true) => gemm_halves::<K>(m, n, k, a, b, c, ldc, base, scale, threads),
        (false, false) => gemm_serial::<K>(m, n, k, a, b, c, ldc, base, scale),
    };
    let b = match b {
        Rhs::Mat(b) if chunked || K::A_PANEL_IN_L1 => b,
        b => return run(b, n, k, a, c, base),
    };
    SHARED_B.with(|cell| {
        // (A task that this thread runs while it waits may be a product of its own: it packs
        // into a buffer of its own.)
        let mut own = None;
        let mut shared = cell.try_borrow_mut().ok();
        let buf: &mut LineAligned = match shared.as_deref_mut() {
            Some(buf) => buf,
            None => own.insert(LineAligned::new()),
        };
        // Pieces of B of at most SHARED_B_MAX floats: all of it, or all columns for fewer
        // depths, or fewer columns for KC depths (an LM head's 50,257).
        let padded_n = n.div_ceil(K::NR) * K::NR;
        let (width, span) = if k * padded_n <= SHARED_B_MAX {
            (n, k)
        } else if K::KC * padded_n <= SHARED_B_MAX {
            (n, SHARED_B_MAX / (padded_n * K::KC) * K::KC)
        } else {
            ((SHARED_B_MAX / K::KC / K::NR * K::NR).max(K::NR), K::KC)
        };
        for jc in (0..n).step_by(width) {
            let nc = width.min(n - jc);
            let padded = nc.div_ceil(K::NR) * K::NR;
            for p0 in (0..k).step_by(span) {
                let depth = span.min(k - p0);
                buf.grow(depth * padded);
                let b_part = Mat { ptr: b.ptr.offset(p0 as isize * b.rs + jc as isize * b.cs), ..b };
                pack_whole_b_into::<K>(buf.as_mut_slice(), b_part, depth, nc, threads > 1);
                let a_part = Mat { ptr: a.ptr.offset(p0 as isize * a.cs), ..a };
                let part_base = if p0 == 0 { base.at_col(jc) } else { Base::C };
                let packed = Rhs::Packed { ptr: buf.as_slice().as_ptr(), padded, col0: 0 };
                run(packed, nc, depth, a_part, c.add(jc), part_base);
            }
        }
    })
}

/// [`gemm_serial`] on chunks of C's rows, which the pool's threads take as they come free.
///
/// # Safety
/// As [`gemm_serial`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_row_chunks<K: MicroKernel>(m: usize, n: usize, k: usize, a: Mat, b: Rhs, c: *mut f32, ldc: usize, base: Base, scale: f32, threads: usize) {
    use rayon::prelude::*;
    // About 8 chunks a thread, whole tiles each, at most one block of A.
    let chunk = (m.div_ceil(8 * threads).div_ceil(K::MR) * K::MR).min(K::MC);
    let (a, cp) = (&a, SendPtr(c)); // (closures then share the whole Mat, not its raw pointer)
    (0..m.div_ceil(chunk)).into_par_iter().for_each(|t| {
        let start = t * chunk;
        let rows = chunk.min(m - start);
        gemm_serial::<K>(rows, n, k, Mat { ptr: a.ptr.offset(start as isize * a.rs), ..*a }, b, cp.get().add(start * ldc), ldc, base, scale);
    });
}

/// [`gemm_serial`] split over `threads` equal rayon tasks along the longer of m and n, so the
/// operand that every task packs for itself is the smaller one.
///
/// # Safety
/// As [`gemm_serial`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_halves<K: MicroKernel>(m: usize, n: usize, k: usize, a: Mat, b: Rhs, c: *mut f32, ldc: usize, base: Base, scale: f32, threads: usize) {
    use rayon::prelude::*;
    let split_m = m >= n;
    let (len, unit) = if split_m { (m, K::MR) } else { (n, K::NR) };
    let tasks = threads.min(len.div_ceil(unit)).max(1);
    let per = len.div_ceil(unit).div_ceil(tasks) * unit;
    let cp = SendPtr(c);
    (0..tasks).into_par_iter().for_each(|t| {
        let start = t * per;
        if start >= len {
            return;
        }
        let size = per.min(len - start);
        if split_m {
            gemm_serial::<K>(size, n, k, Mat { ptr: a.ptr.offset(start as isize * a.rs), ..a }, b, cp.get().add(start * ldc), ldc, base, scale);
        } else {
            let b = match b {
                Rhs::Mat(b) => Rhs::Mat(Mat { ptr: b.ptr.offset(start as isize * b.cs), ..b }),
                Rhs::Packed { ptr, padded, col0 } => Rhs::Packed { ptr, padded, col0: col0 + start },
            };
            gemm_serial::<K>(m, size, k, a, b, cp.get().add(start), ldc, base.at_col(start), scale);
        }
    });
}

