//! A weight packed once, for inference, into the panels of the products it will serve
//! ([`Panels`]): for decoding the panels our AVX2 kernel reads (16 columns by 256 depths), for
//! encoder batches the 12×32 AVX-512 kernel's (32 by 384) at that level and the 6×16 AVX2
//! kernel's at AVX2. Products with it skip the packing every product otherwise repeats, and the
//! panels stream from memory in order. With a few rows of activations (batched decoding) this is
//! what makes the difference: the matrix-vector kernels, which read the weight as stored, run
//! 8–16 rows at 40–75 GFLOP/s, where panels keep the kernel's accumulators in registers over 256
//! depths (`notes/cpu-speed.md`): up to 8 rows in a kernel that reads the panels straight, more
//! in the 6×16 tiles; at the AVX-512 level one row runs the few-rows kernel and more run 4-, 8-,
//! 16- or 28-row AVX-512 tiles on the same panels (`Avx512Narrow`).
//!
//! Decoding's panels may also hold an f16 or bf16 weight in its own 2 bytes (the same layout, each
//! element its bits): the few-rows kernel widens them to f32 as it loads them, so a product reads
//! half the bytes of f32 panels in the same order. The matrix-vector kernels read half-precision
//! weights as stored at 60–90% of the read bandwidth where f32 panels stream at 100–130%
//! (`benches/matvec`, GPT-2-small's shapes, AMD Zen 3, `notes/cpu-speed.md`, session 15).
//! Products of more than 16 rows (a prompt) widen blocks of the panels to f32 for our GEMM.

#[cfg(target_arch = "x86_64")]
use super::{bias_base, blis, blis_avx2, blis_avx512, Base};
use super::{fits, View};
use crate::ops::matvec::{Bf16W, F16W, F32W, Weight};
use candle_core::{DType, Result};

/// A weight packed once for the products it will serve (see the module's documentation).
pub struct PackedWeight {
    #[cfg(target_arch = "x86_64")]
    data: Elements,
    k: usize,
    n: usize,
    panels: Panels,
    /// Whether `data` holds the 12×32 AVX-512 kernel's panels (else the AVX2 level's).
    pub(super) wide: bool,
}

/// The panels' elements, in the weight's own type.
#[cfg(target_arch = "x86_64")]
enum Elements {
    F32(blis::LineAligned),
    /// The bits of f16 or bf16 elements (`DType::F16` / `DType::BF16`).
    Half(DType, Vec<u16>),
}

/// What a weight is packed for, and so in whose panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panels {
    /// Decoding's few rows a product: the AVX2 level's 16-wide panels (256 depths), which the
    /// few-rows kernel and the narrow AVX-512 tiles read; f32, f16 or bf16.
    FewRows,
    /// An encoder's hundreds of rows a product, through the level's own kernel: at AVX-512 the
    /// 12×32 kernel's 32-wide panels (384 depths), which it reads as it reads a B it packed
    /// itself; at AVX2 the 6×16 kernel's (the layout of `FewRows`), the bias added in the
    /// product's last pass. f32 only.
    ManyRows,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({}×{}, {:?}, {}, {:?})", self.k, self.n, self.panels, if self.wide { "12×32" } else { "6×16" }, self.dtype())
    }
}

impl PackedWeight {
    /// Whether weights can be packed (in either [`Panels`]) at the current level: AVX2 and
    /// AVX-512. For decoding ([`Panels::FewRows`]) they are packed in the AVX2 level's
    /// panels (16 columns by 256 depths). At AVX2 the few-rows kernel reads them for up to 8 rows
    /// and the 6×16 tiles beyond; at AVX-512 the few-rows kernel takes one row and the 4×16,
    /// 8×16, 16×16 and 28×16 tiles of `blis_avx512::Avx512Narrow` 2–4, 5–8, 9–32 and more (a
    /// prompt's hundreds of rows: as fast as the 12×32 kernel on the weight as stored, measured
    /// with `benches/matvec --dtype f32-packed,f32 --rows 256,1024`).
    pub fn available() -> bool {
        cfg!(target_arch = "x86_64") && crate::cpu::isa() >= crate::cpu::Isa::Avx2
    }

    /// Packs W, the right operand of `x · W` (k × n), read through `w`, in `panels`; `None`
    /// where they are not available ([`PackedWeight::available`]).
    pub(crate) fn new(w: View, k: usize, n: usize, panels: Panels) -> Result<Option<Self>> {
        if !fits(w.data.len(), k, n, w.rs, w.cs) {
            candle_core::bail!("packing a {k}×{n} weight: it does not fit its buffer")
        }
        #[cfg(target_arch = "x86_64")]
        if Self::available() && k > 0 && n > 0 {
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
            return Ok(Some(Self { data: Elements::F32(data), k, n, panels, wide }));
        }
        Ok(None)
    }

    /// Packs for decoding ([`Panels::FewRows`]) a half-precision W (k × n) given as the bits of
    /// its elements (`dtype` F16 or BF16), read through `w` (strides as in [`View`]), keeping
    /// them in 2 bytes; `None` where packing is not available.
    pub(crate) fn new_half(bits: &[u16], rs: usize, cs: usize, k: usize, n: usize, dtype: DType) -> Result<Option<Self>> {
        if !matches!(dtype, DType::F16 | DType::BF16) {
            candle_core::bail!("half-precision panels hold f16 or bf16, not {dtype:?}")
        }
        if !fits(bits.len(), k, n, rs, cs) {
            candle_core::bail!("packing a {k}×{n} weight: it does not fit its buffer")
        }
        if !Self::available() || k == 0 || n == 0 {
            return Ok(None);
        }
        // The packing only moves elements (and pads with +0.0, whose bits are 0 in both
        // types): pack the bits as f32 integers, exact below 2²⁴, and take them back.
        let as_f32: Vec<f32> = bits.iter().map(|&b| b as f32).collect();
        let Some(packed) = Self::new(View { data: &as_f32, rs, cs }, k, n, Panels::FewRows)? else { return Ok(None) };
        #[cfg(target_arch = "x86_64")]
        if let Elements::F32(panels) = &packed.data {
            let halves = panels.as_slice().iter().map(|&v| v as u16).collect();
            return Ok(Some(Self { data: Elements::Half(dtype, halves), ..packed }));
        }
        Ok(None)
    }

    /// The type of the panels' elements.
    pub fn dtype(&self) -> DType {
        #[cfg(target_arch = "x86_64")]
        if let Elements::Half(dtype, _) = self.data {
            return dtype;
        }
        DType::F32
    }

    /// (k, n): the product's depth and width.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The f32 panels (those of [`Panels::ManyRows`] always are).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn f32_panels(&self) -> Option<&[f32]> {
        match &self.data {
            Elements::F32(data) => Some(data.as_slice()),
            Elements::Half(..) => None,
        }
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
        let data = self.f32_panels().expect("ManyRows panels are f32");
        let nr = if self.wide { blis_avx512::Avx512::NR } else { blis_avx2::NR };
        let rhs = blis::Rhs::Packed { ptr: data.as_ptr(), padded: n.div_ceil(nr) * nr, col0: 0 };
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
        // At AVX2 both kinds of panels share one layout, and a few rows run faster in the
        // few-rows kernel (through `product`) than in the 6×16 tiles.
        #[cfg(target_arch = "x86_64")]
        if self.panels == Panels::ManyRows && (self.wide || m > blis_avx2::FEW_ROWS) {
            let base = bias_base(bias, n)?;
            // SAFETY: x holds m×k elements and the bias n (checked above); the product writes
            // all m·n elements without reading them (the base is not C).
            return Ok(unsafe { crate::ops::written_once(m * n, |y| self.many_rows_product(x, m, y.as_mut_ptr().cast(), base)) });
        }
        let mut y = crate::ops::repeated_rows(bias, m, n);
        self.product(x, m, &mut y)?;
        Ok(y)
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
        {
            if self.wide {
                // SAFETY: the 12×32 kernel's panels (`wide`); x and y hold m×k and m×n elements
                // (checked above).
                unsafe { self.many_rows_product(x, m, y.as_mut_ptr(), Base::C) };
                return Ok(());
            }
            match &self.data {
                Elements::F32(data) => self.f32_product(data.as_slice(), x, m, y),
                Elements::Half(DType::F16, bits) => self.half_product::<F16W>(bits, x, m, y),
                Elements::Half(_, bits) => self.half_product::<Bf16W>(bits, x, m, y),
            }
            Ok(())
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("weights are packed on x86_64 only")
    }

    /// `y += x · W` for f32 panels in the AVX2 level's layout: the few-rows kernel, or the
    /// 6×16 tiles (at AVX-512 the narrow AVX-512 tiles) for more rows. Sizes checked by `product`.
    #[cfg(target_arch = "x86_64")]
    fn f32_product(&self, data: &[f32], x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        let avx512 = crate::cpu::isa() == crate::cpu::Isa::Avx512;
        if m <= if avx512 { FEW_ROWS_AVX512 } else { blis_avx2::FEW_ROWS } {
            return self.few_rows::<F32W>(data, x, m, y);
        }
        let padded = n.div_ceil(blis_avx2::NR) * blis_avx2::NR;
        let threads = candle_core::utils::get_num_threads();
        let rhs = blis::Rhs::Packed { ptr: data.as_ptr(), padded, col0: 0 };
        let (x, y) = (View::rows(x, k).into(), y.as_mut_ptr());
        // SAFETY: the panels were packed in the AVX2 level's layout (the CPU has AVX2, and
        // AVX-512 where that is the level); x and y hold m×k and m×n elements (checked by
        // `product`); y is borrowed mutably, so it aliases nothing.
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
        }
    }

    /// `y += x · W` for half-precision panels: up to [`HALF_FEW_ROWS`] rows through the
    /// few-rows kernel, 8 rows a pass (each pass reads the panels once; two passes of half the
    /// bytes still read no more than f32 panels once); more rows (a prompt) through our GEMM on
    /// blocks of the panels widened to f32. Sizes checked by `product`.
    #[cfg(target_arch = "x86_64")]
    fn half_product<W: Weight<Raw = u16>>(&self, bits: &[u16], x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        if m <= HALF_FEW_ROWS {
            for r0 in (0..m).step_by(blis_avx2::FEW_ROWS) {
                let rows = blis_avx2::FEW_ROWS.min(m - r0);
                self.few_rows::<W>(bits, &x[r0 * k..(r0 + rows) * k], rows, &mut y[r0 * n..(r0 + rows) * n]);
            }
            return;
        }
        use crate::ops::matvec::{gemm_by_blocks, Problem, GEMM_KB};
        use blis_avx2::{KC, NR};
        const { assert!(GEMM_KB == KC, "a block of the GEMM is one depth chunk of the panels") };
        let padded = n.div_ceil(NR) * NR;
        let isa = crate::cpu::isa();
        // The block of depths i0.. (a whole chunk: i0 is a multiple of KC) and columns j0..
        // (whole panels) as a row-major kb × nb matrix of f32.
        let widen = |buf: &mut [f32], i0: usize, kb: usize, j0: usize, nb: usize| {
            let chunk = &bits[i0 * padded..][..kb * padded];
            for q in 0..nb.div_ceil(NR) {
                let (panel, cols) = (&chunk[(j0 / NR + q) * NR * kb..][..NR * kb], NR.min(nb - q * NR));
                for d in 0..kb {
                    crate::ops::matvec::convert::<W>(isa, &panel[d * NR..d * NR + cols], &mut buf[d * nb + q * NR..][..cols]);
                }
            }
            (1, nb as isize)
        };
        gemm_by_blocks(x, Problem { m, k, n, layout: crate::ops::linear::WeightLayout::InOut }, y, widen);
    }

    /// `y += x · W` for m ≤ 8 rows through the few-rows kernel over the AVX2 level's panels
    /// (`data`, elements of W's type): contiguous ranges of panels a task, a few per thread
    /// (whole runs of each chunk). Sizes checked by `product`.
    #[cfg(target_arch = "x86_64")]
    fn few_rows<W: Weight>(&self, data: &[W::Raw], x: &[f32], m: usize, y: &mut [f32]) {
        use blis_avx2::NR;
        let (k, n) = (self.k, self.n);
        let (panels, padded) = (n.div_ceil(NR), n.div_ceil(NR) * NR);
        debug_assert!(m <= blis_avx2::FEW_ROWS && data.len() == k * padded);
        let per = panels.div_ceil(4 * candle_core::utils::get_num_threads()).max(4);
        let out = blis::SendPtr(y.as_mut_ptr());
        let task = |t: usize| {
            let range = t * per..((t + 1) * per).min(panels);
            // SAFETY: packed in the AVX2 level's layout (the CPU has AVX2, FMA and F16C: the
            // level's requirement); x and y hold m×k and m×n elements; tasks write disjoint
            // columns of y.
            unsafe { blis_avx2::few_rows_packed::<W>(m, n, k, x.as_ptr(), data.as_ptr(), padded, range, out.get(), n) };
        };
        let tasks = panels.div_ceil(per);
        if tasks == 1 || m * n * k < 1 << 18 {
            (0..tasks).for_each(task);
        } else {
            use rayon::prelude::*;
            (0..tasks).into_par_iter().for_each(task);
        }
    }
}

/// Rows up to which a packed weight's product runs the AVX2 few-rows kernel at the AVX-512
/// level too (2–4 rows take the 4×16 AVX-512 tiles, 5–8 the 8×16 ones): measured against the
/// matvec kernels on the weights as stored, it held batch 1 and the tiles batches 2–4
/// (`notes/cpu-speed.md`, session 11).
#[cfg(target_arch = "x86_64")]
const FEW_ROWS_AVX512: usize = 1;

/// Rows up to which half-precision panels go through the few-rows kernel (8 rows a pass), as
/// the matrix-vector kernels take up to [`crate::ops::matvec::MATVEC_ROWS`] rows of a weight
/// as stored.
#[cfg(target_arch = "x86_64")]
const HALF_FEW_ROWS: usize = crate::ops::matvec::MATVEC_ROWS;
