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
    static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `c (m×n, row stride ldc) = [c +] scale · a · b` on the calling thread.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` addresses m×k elements, `b` k×n and `c` m rows of n (row stride
/// `ldc`), all valid, and `c` overlaps neither.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_serial(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: *mut f32, ldc: usize, accumulate: bool, scale: f32) {
    BUFFERS.with_borrow_mut(|(ap, bp)| {
        let kc_max = KC.min(k);
        // Grown, never shrunk: the packing overwrites every element it later reads.
        let (a_len, b_len) = (MC.min(m).div_ceil(MR) * MR * kc_max, NC.min(n).div_ceil(NR) * NR * kc_max);
        if ap.len() < a_len {
            ap.resize(a_len, 0.0);
        }
        if bp.len() < b_len {
            bp.resize(b_len, 0.0);
        }
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let load_c = accumulate || pc > 0;
                pack_b(bp, Mat { ptr: b.ptr.offset(pc as isize * b.rs + jc as isize * b.cs), ..b }, kc, nc);
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    pack_a(ap, Mat { ptr: a.ptr.offset(ic as isize * a.rs + pc as isize * a.cs), ..a }, mc, kc);
                    for jr in (0..nc).step_by(NR) {
                        let cols = NR.min(nc - jr);
                        let bpanel = bp.as_ptr().add(jr / NR * NR * kc);
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

/// C's pointer, shared by the tasks of [`gemm`], each writing its own rows or columns.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint parts of C.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// (A method, so that closures capture the whole Send wrapper, not its raw field.)
    fn get(self) -> *mut f32 {
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
pub(crate) unsafe fn gemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: *mut f32, ldc: usize, accumulate: bool, scale: f32, threads: usize) {
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
            gemm_serial(m, size, k, a, Mat { ptr: b.ptr.offset(start as isize * b.cs), ..b }, cp.get().add(start), ldc, accumulate, scale);
        }
    });
}
