//! A bounds-checked front for `gemm::gemm` on f32 slices, shared by the fused linear and conv ops.
//!
//! `gemm::gemm` takes raw pointers and strides; every caller here used to repeat the same unsafe
//! block. [`matmul`] checks that each strided view stays inside its slice (so a shape mistake is
//! an error, not memory corruption) and picks candle's thread count for the product.

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
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    product(dst, dst_rs, m, n, k, lhs, rhs, accumulate, 1.0, parallelism)
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
    if !(fits(dst.len(), m, n, dst_rs, 1) && fits(lhs.data.len(), m, k, lhs.rs, lhs.cs) && fits(rhs.data.len(), k, n, rhs.rs, rhs.cs)) {
        candle_core::bail!("matmul: a {m}×{k} by {k}×{n} product does not fit its buffers")
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: `fits` checked that every element the three strided views address lies inside its
    // slice; dst is written only through its own pointer and does not alias the inputs (it is
    // borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
