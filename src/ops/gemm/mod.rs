//! The f32 matrix product of wick's fused ops (linear, conv, attention tiles, LSTM layer): a
//! bounds-checked front that picks the kernel at run time.
//!
//! [`product`] checks that each strided view stays inside its slice (so a shape mistake is an
//! error, not memory corruption), then runs our BLIS-style product ([`blis`]) with the AVX-512
//! micro-kernel ([`blis_avx512`]) or the AVX2 one ([`blis_avx2`]) by the CPU's level, and the
//! `gemm` crate (candle's own product) at the portable level. Products of fewer than 64 rows or
//! two tiles' width go to `gemm` too (`blis_kernel` says why), but those with a weight packed
//! once ([`PackedWeight`]), which always run our kernels.

#[cfg(target_arch = "x86_64")]
mod blis;
#[cfg(target_arch = "x86_64")]
mod blis_avx2;
#[cfg(target_arch = "x86_64")]
mod blis_avx512;
mod packed;

pub use packed::{PackedWeight, Panels};

use candle_core::Result;

/// A strided view of a row-major or column-major matrix: element (r, c) is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns: (r, c) is `data[c·cols + r]`.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self { data, rs: 1, cs: cols }
    }
}

/// Whether an `rows`×`cols` matrix with strides (rs, cs) fits in `len` elements.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// `dst (m×n, row-major with row stride dst_rs) = [dst +] lhs (m×k) · rhs (k×n)`; with
/// `accumulate` the product is added to what `dst` holds. Runs on candle's thread count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(dst: &mut [f32], dst_rs: usize, m: usize, n: usize, k: usize, lhs: View, rhs: View, accumulate: bool) -> Result<()> {
    product(dst, dst_rs, m, n, k, lhs, rhs, accumulate, 1.0, default_parallelism())
}

/// [`matmul`] on the calling thread only: for small products inside a parallel loop.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_serial(dst: &mut [f32], dst_rs: usize, m: usize, n: usize, k: usize, lhs: View, rhs: View, accumulate: bool) -> Result<()> {
    product(dst, dst_rs, m, n, k, lhs, rhs, accumulate, 1.0, gemm::Parallelism::None)
}

/// `dst = [dst +] scale·lhs·rhs` with the given parallelism: what [`matmul`] and
/// [`matmul_serial`] call, and the kernels that pick their own thread split.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(dst: &mut [f32], dst_rs: usize, m: usize, n: usize, k: usize, lhs: View, rhs: View, accumulate: bool, scale: f32, parallelism: gemm::Parallelism) -> Result<()> {
    check_fits(dst.len(), dst_rs, m, n, k, &lhs, &rhs)?;
    let base = if accumulate { Base::C } else { Base::Zero };
    // SAFETY: `check_fits` checked that every element the three strided views address lies
    // inside its slice; dst does not alias the inputs (it is borrowed mutably).
    unsafe { product_raw(dst.as_mut_ptr(), dst_rs, m, n, k, lhs.into(), rhs.into(), base, scale, parallelism) };
    Ok(())
}

/// `dst = bias row (or 0) + lhs·rhs` on candle's thread count into memory that need not be
/// initialised: every element of the m×n (row stride `dst_rs`) part of dst is written, and
/// only written, so an output needs no fill before the product (the bias is added in the
/// product's last pass over it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_into(dst: &mut [std::mem::MaybeUninit<f32>], dst_rs: usize, m: usize, n: usize, k: usize, lhs: View, rhs: View, bias: Option<&[f32]>) -> Result<()> {
    check_fits(dst.len(), dst_rs, m, n, k, &lhs, &rhs)?;
    let base = bias_base(bias, n)?;
    // SAFETY: as in `product`; with a base other than `Base::C` dst is written before it is read.
    unsafe { product_raw(dst.as_mut_ptr().cast(), dst_rs, m, n, k, lhs.into(), rhs.into(), base, 1.0, default_parallelism()) };
    Ok(())
}

/// [`matmul_into`] a new m×n row-major matrix.
pub(crate) fn matmul_new(m: usize, n: usize, k: usize, lhs: View, rhs: View, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    check_fits(m * n, n, m, n, k, &lhs, &rhs)?;
    let base = bias_base(bias, n)?;
    // SAFETY: the views fit (checked above) and a base other than `Base::C` makes the product
    // write all m·n elements without reading them.
    Ok(unsafe { crate::ops::written_once(m * n, |out| product_raw(out.as_mut_ptr().cast(), n, m, n, k, lhs.into(), rhs.into(), base, 1.0, default_parallelism())) })
}

/// The base of a product with an optional bias row of n.
fn bias_base(bias: Option<&[f32]>, n: usize) -> Result<Base> {
    match bias {
        Some(b) if b.len() != n => candle_core::bail!("matmul: a bias of {} for {n} columns", b.len()),
        Some(b) => Ok(Base::Row(b.as_ptr())),
        None => Ok(Base::Zero),
    }
}

/// Candle's thread count as the products' parallelism.
fn default_parallelism() -> gemm::Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None }
}

/// That an m×k by k×n product into `dst_len` elements (rows `dst_rs` apart) stays inside every
/// buffer: a shape mistake is then an error, not memory corruption.
fn check_fits(dst_len: usize, dst_rs: usize, m: usize, n: usize, k: usize, lhs: &View, rhs: &View) -> Result<()> {
    if !(fits(dst_len, m, n, dst_rs, 1) && fits(lhs.data.len(), m, k, lhs.rs, lhs.cs) && fits(rhs.data.len(), k, n, rhs.rs, rhs.cs)) {
        candle_core::bail!("matmul: a {m}×{k} by {k}×{n} product does not fit its buffers")
    }
    Ok(())
}

/// A strided read-only matrix on a raw pointer: element (r, c) at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}
// SAFETY: a Mat is only read, and only while the slice it was made from is borrowed by the caller.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// What a product adds to: nothing (C is only written, so it may start uninitialised), C as it
/// is, or one row (a bias) repeated down every row of C: the bias is added in the product's
/// last pass over C instead of a pass of its own that fills C first.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Base {
    Zero,
    C,
    /// The row's element for column 0 of the C it is given with.
    Row(*const f32),
}

impl Base {
    /// This base for the columns from `col` on.
    #[inline(always)]
    pub(crate) fn at_col(self, col: usize) -> Self {
        match self {
            Base::Row(r) => Base::Row(r.wrapping_add(col)),
            other => other,
        }
    }
}
// SAFETY: a row is only read, while the caller's slice is borrowed.
unsafe impl Send for Base {}
unsafe impl Sync for Base {}

impl From<View<'_>> for Mat {
    fn from(v: View) -> Self {
        Mat { ptr: v.data.as_ptr(), rs: v.rs as isize, cs: v.cs as isize }
    }
}

/// `dst = base + scale·lhs·rhs` on raw pointers, without [`product`]'s checks: for callers
/// whose parallel tasks write disjoint column blocks of one output (the many-rows path of
/// `ops::matvec`). Every element of the m×n part of dst is written; only `Base::C` reads it.
///
/// # Safety
/// `lhs` addresses m×k valid elements, `rhs` k×n, `dst` m rows of n (`dst_rs` apart, column
/// stride 1) that nothing else reads or writes meanwhile, a `Base::Row` n elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product_raw(dst: *mut f32, dst_rs: usize, m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, base: Base, scale: f32, parallelism: gemm::Parallelism) {
    if m == 0 || n == 0 {
        return;
    }
    // dst = base: what a product without depth gives, and where the `gemm` crate (which takes
    // no bias row) starts. (Zeros too, though the crate overwrites dst without reading it: it
    // does not promise that for memory that was never written.)
    let write_base = || {
        for r in 0..m {
            let row = std::slice::from_raw_parts_mut(dst.add(r * dst_rs), n);
            match base {
                Base::Row(b) => row.copy_from_slice(std::slice::from_raw_parts(b, n)),
                Base::Zero => row.fill(0.0),
                Base::C => {}
            }
        }
    };
    if k == 0 {
        return write_base();
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(level) = blis_kernel(m, n) {
        let threads = match parallelism {
            gemm::Parallelism::None => 1,
            gemm::Parallelism::Rayon(t) => t.max(1),
        };
        let rhs = blis::Rhs::Mat(rhs);
        return match level {
            crate::cpu::Isa::Avx512 => blis::gemm::<blis_avx512::Avx512>(m, n, k, lhs, rhs, dst, dst_rs, base, scale, threads),
            _ => blis::gemm::<blis_avx2::Avx2>(m, n, k, lhs, rhs, dst, dst_rs, base, scale, threads),
        };
    }
    write_base();
    with_gemm_crate(dst, dst_rs, m, n, k, lhs, rhs, !matches!(base, Base::Zero), scale, parallelism)
}

/// [`product_raw`] on the `gemm` crate, whatever the level.
///
/// # Safety
/// As [`product_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn with_gemm_crate(dst: *mut f32, dst_rs: usize, m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, accumulate: bool, scale: f32, parallelism: gemm::Parallelism) {
    gemm::gemm(m, n, k, dst, 1, dst_rs as isize, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 1.0, scale, false, false, false, parallelism)
}

/// Which of our micro-kernels [`product`] runs, if any: the one of the level (AVX-512 or AVX2,
/// detected or capped by `WICK_CPU_ISA`), for products of at least 64 rows and two tiles' width.
/// With fewer rows each element of the right operand serves few multiply-adds and packing it (a
/// copy of the whole weight, as `gemm` does not make for short products) costs more than it
/// saves: batch-16 q8_0 decoding measured 199 tok/s through ours against 219 through `gemm`; and
/// below two tiles' width the zero padding of a tile wastes more than `gemm`'s smaller tiles do.
#[cfg(target_arch = "x86_64")]
fn blis_kernel(m: usize, n: usize) -> Option<crate::cpu::Isa> {
    use crate::cpu::Isa;
    let level = crate::cpu::isa();
    let width = match level {
        Isa::Avx512 => <blis_avx512::Avx512 as blis::MicroKernel>::NR,
        Isa::Avx2 => blis_avx2::NR,
        Isa::Portable => return None,
    };
    (m >= 64 && n >= 2 * width).then_some(level)
}

/// `dst (m×n) = lhs (m×k, or its transpose stored k×m) · rhs (k×n, or its transpose stored n×k)`,
/// all row-major, through [`product`] on candle's thread count: the entry `benches/matmul` times.
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32(dst: &mut [f32], m: usize, n: usize, k: usize, lhs: &[f32], lhs_transposed: bool, rhs: &[f32], rhs_transposed: bool) -> Result<()> {
    let lhs = if lhs_transposed { View::transposed(lhs, m) } else { View::rows(lhs, k) };
    let rhs = if rhs_transposed { View::transposed(rhs, k) } else { View::rows(rhs, n) };
    matmul(dst, n, m, n, k, lhs, rhs, false)
}

/// The kernel [`product`] runs at the current level, for benchmark output.
pub fn kernel_name() -> &'static str {
    match crate::cpu::isa() {
        crate::cpu::Isa::Avx2 => "wick avx2 6x16 (gemm crate below 64x32)",
        crate::cpu::Isa::Avx512 => "wick avx512 12x32 (gemm crate below 64x64)",
        crate::cpu::Isa::Portable => "gemm crate",
    }
}

#[cfg(test)]
mod tests;
