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

/// A weight packed once, for inference, into the panels of the products it will serve
/// ([`Panels`]): for decoding the panels our AVX2 kernel reads (16 columns by 256 depths), for
/// encoder batches the 12×32 AVX-512 kernel's (32 by 384) at that level and the 6×16 AVX2
/// kernel's at AVX2. Products with it skip the packing
/// every product otherwise repeats,
/// and the panels stream from memory in order. With a few rows of activations (batched
/// decoding) this is what makes the difference: the matrix-vector kernels, which read the weight
/// as stored, run 8–16 rows at 40–75 GFLOP/s, where panels keep the kernel's accumulators in
/// registers over 256 depths (`notes/cpu-speed.md`): up to 8 rows in a kernel that reads the
/// panels straight, more in the 6×16 tiles; at the AVX-512 level one row runs the few-rows
/// kernel and more run 4-, 8-, 16- or 28-row AVX-512 tiles on the same panels (`Avx512Narrow`).
pub struct PackedWeight {
    #[cfg(target_arch = "x86_64")]
    data: blis::LineAligned,
    k: usize,
    n: usize,
    panels: Panels,
    /// Whether `data` holds the 12×32 AVX-512 kernel's panels (else the AVX2 level's).
    wide: bool,
}

/// What a weight is packed for, and so in whose panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panels {
    /// Decoding's few rows a product: the AVX2 level's 16-wide panels (256 depths), which the
    /// few-rows kernel and the narrow AVX-512 tiles read.
    FewRows,
    /// An encoder's hundreds of rows a product, through the level's own kernel: at AVX-512 the
    /// 12×32 kernel's 32-wide panels (384 depths), which it reads as it reads a B it packed
    /// itself; at AVX2 the 6×16 kernel's (the layout of `FewRows`), the bias added in the
    /// product's last pass.
    ManyRows,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({}×{}, {:?}, {})", self.k, self.n, self.panels, if self.wide { "12×32" } else { "6×16" })
    }
}

impl PackedWeight {
    /// Whether weights can be packed for decoding ([`Panels::FewRows`]) at the current level:
    /// AVX2 and AVX-512, in the AVX2 level's
    /// panels (16 columns by 256 depths). At AVX2 the few-rows kernel reads them for up to 8 rows
    /// and the 6×16 tiles beyond; at AVX-512 the few-rows kernel takes one row and the 4×16,
    /// 8×16, 16×16 and 28×16 tiles of `blis_avx512::Avx512Narrow` 2–4, 5–8, 9–32 and more (a
    /// prompt's hundreds of rows: as fast as the 12×32 kernel on the weight as stored, measured
    /// with `benches/matvec --dtype f32-packed,f32 --rows 256,1024`).
    pub fn available() -> bool {
        cfg!(target_arch = "x86_64") && crate::cpu::isa() >= crate::cpu::Isa::Avx2
    }

    /// Whether weights can be packed in `panels` at the current level: both at AVX2 and
    /// AVX-512 ([`Self::available`]).
    pub fn available_for(_panels: Panels) -> bool {
        Self::available()
    }

    /// Packs W, the right operand of `x · W` (k × n), read through `w`, in `panels`; `None`
    /// where they are not available ([`PackedWeight::available_for`]).
    pub(crate) fn new(w: View, k: usize, n: usize, panels: Panels) -> Result<Option<Self>> {
        if !fits(w.data.len(), k, n, w.rs, w.cs) {
            candle_core::bail!("packing a {k}×{n} weight: it does not fit its buffer")
        }
        #[cfg(target_arch = "x86_64")]
        if Self::available_for(panels) && k > 0 && n > 0 {
            let wide = panels == Panels::ManyRows && crate::cpu::isa() == crate::cpu::Isa::Avx512;
            // SAFETY: the level is at least AVX2 (so the CPU has it and FMA), AVX-512 for the
            // 12×32 kernel's panels; `fits` checked the view.
            let data = unsafe {
                if wide {
                    blis::pack_whole_b::<blis_avx512::Avx512>(w.into(), k, n)
                } else {
                    blis::pack_whole_b::<blis_avx2::Avx2>(w.into(), k, n)
                }
            };
            return Ok(Some(Self { data, k, n, panels, wide }));
        }
        Ok(None)
    }

    /// `y (m × n) = base + x (m × k) · W` through the kernel whose panels these are (the 12×32
    /// AVX-512 one or the 6×16 AVX2 one, [`Panels::ManyRows`]), on candle's thread count.
    ///
    /// # Safety
    /// Packed in [`Panels::ManyRows`] (at the level whose instructions the CPU has); x holds m×k
    /// elements, y m×n, a `Base::Row` n.
    #[cfg(target_arch = "x86_64")]
    unsafe fn many_rows_product(&self, x: &[f32], m: usize, y: *mut f32, base: Base) {
        use blis::MicroKernel;
        let (k, n) = (self.k, self.n);
        debug_assert_eq!(self.panels, Panels::ManyRows);
        let nr = if self.wide { blis_avx512::Avx512::NR } else { blis_avx2::NR };
        let rhs = blis::Rhs::Packed { ptr: self.data.as_slice().as_ptr(), padded: n.div_ceil(nr) * nr, col0: 0 };
        let (x, threads) = (View::rows(x, k).into(), candle_core::utils::get_num_threads());
        if self.wide {
            blis::gemm::<blis_avx512::Avx512>(m, n, k, x, rhs, y, n, base, 1.0, threads)
        } else {
            blis::gemm::<blis_avx2::Avx2>(m, n, k, x, rhs, y, n, base, 1.0, threads)
        }
    }

    /// `bias row (or 0) + x (m × k) · W` as a new m × n matrix, written once.
    pub(crate) fn product_new(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        let (k, n) = (self.k, self.n);
        if x.len() != m * k || bias.is_some_and(|b| b.len() != n) {
            candle_core::bail!("packed product: x has {} elements for {m}×{k}, the bias {} for {n}", x.len(), bias.map_or(n, <[f32]>::len))
        }
        #[cfg(target_arch = "x86_64")]
        if self.panels == Panels::ManyRows {
            let base = bias_base(bias, n)?;
            // SAFETY: x holds m×k elements and the bias n (checked above); the product writes
            // all m·n elements without reading them (the base is not C).
            return Ok(unsafe { crate::ops::written_once(m * n, |y| self.many_rows_product(x, m, y.as_mut_ptr().cast(), base)) });
        }
        let mut y = crate::ops::repeated_rows(bias, m, n);
        self.product(x, m, &mut y)?;
        Ok(y)
    }

    /// (k, n): the product's depth and width.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `y (m × n) += x (m × k) · W` on candle's thread count.
    pub(crate) fn product(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        let (k, n) = (self.k, self.n);
        if x.len() != m * k || y.len() != m * n {
            candle_core::bail!("packed product: x has {} elements for {m}×{k}, y {} for {m}×{n}", x.len(), y.len())
        }
        if m == 0 {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if self.panels == Panels::ManyRows {
            // SAFETY: x and y hold m×k and m×n elements (checked above).
            unsafe { self.many_rows_product(x, m, y.as_mut_ptr(), Base::C) };
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        {
            use blis_avx2::NR;
            let padded = n.div_ceil(NR) * NR;
            let threads = candle_core::utils::get_num_threads();
            let avx512 = crate::cpu::isa() == crate::cpu::Isa::Avx512;
            let few_rows = if avx512 { FEW_ROWS_AVX512 } else { blis_avx2::FEW_ROWS };
            if m <= few_rows {
                // Contiguous ranges of panels a task, a few per thread (whole runs of each chunk).
                let panels = n.div_ceil(NR);
                let per = panels.div_ceil(4 * threads).max(4);
                let out = blis::SendPtr(y.as_mut_ptr());
                let task = |t: usize| {
                    let range = t * per..((t + 1) * per).min(panels);
                    // SAFETY: packed in the AVX2 level's layout (the CPU has AVX2); x and y hold
                    // m×k and m×n elements (checked above); tasks write disjoint columns of y.
                    unsafe { blis_avx2::few_rows_packed(m, n, k, x.as_ptr(), self.data.as_slice().as_ptr(), padded, range, out.get(), n) };
                };
                let tasks = panels.div_ceil(per);
                if tasks == 1 || m * n * k < 1 << 18 {
                    (0..tasks).for_each(task);
                } else {
                    use rayon::prelude::*;
                    (0..tasks).into_par_iter().for_each(task);
                }
                return Ok(());
            }
            let rhs = blis::Rhs::Packed { ptr: self.data.as_slice().as_ptr(), padded, col0: 0 };
            let (x, y) = (View::rows(x, k).into(), y.as_mut_ptr());
            // SAFETY: the panels were packed in the AVX2 level's layout (the CPU has AVX2, and
            // AVX-512 where that is the level); x and y hold m×k and m×n elements (checked
            // above); y is borrowed mutably, so it aliases nothing.
            unsafe {
                if avx512 && m <= 4 {
                    blis::gemm::<blis_avx512::Avx512Narrow<4>>(m, n, k, x, rhs, y, n, Base::C, 1.0, threads)
                } else if avx512 && m <= blis_avx2::FEW_ROWS {
                    blis::gemm::<blis_avx512::Avx512Narrow<8>>(m, n, k, x, rhs, y, n, Base::C, 1.0, threads)
                } else if avx512 && m <= 32 {
                    blis::gemm::<blis_avx512::Avx512Narrow<16>>(m, n, k, x, rhs, y, n, Base::C, 1.0, threads)
                } else if avx512 {
                    blis::gemm::<blis_avx512::Avx512Narrow<28>>(m, n, k, x, rhs, y, n, Base::C, 1.0, threads)
                } else {
                    blis::gemm::<blis_avx2::Avx2>(m, n, k, x, rhs, y, n, Base::C, 1.0, threads)
                }
            };
            Ok(())
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("weights are packed on x86_64 only")
    }
}

/// Rows up to which a packed weight's product runs the AVX2 few-rows kernel at the AVX-512
/// level too (2–4 rows take the 4×16 AVX-512 tiles, 5–8 the 8×16 ones): measured against the
/// matvec kernels on the weights as stored, it held batch 1 and the tiles batches 2–4
/// (`notes/cpu-speed.md`, session 11).
#[cfg(target_arch = "x86_64")]
const FEW_ROWS_AVX512: usize = 1;

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
