//! Every kernel [`product`] can run (ours with the AVX2 or the AVX-512 micro-kernel, the `gemm`
//! crate) against an f64 reference and against each other, on shapes that cross every block edge
//! of ours (the 6×16 and 12×32 tiles, MC = 144 and 240 rows, KC = 256 and 384 depths, NC = 4080
//! and 512 columns, the pieces of a B packed to share, which tests make small), with transposed
//! operands, with and without accumulation, on one thread and split over two (in halves or in
//! chunks of rows). Our kernels are called directly, so they are checked on the short and narrow
//! shapes `product` gives the gemm crate as well.

use super::*;

use crate::ops::test_values as values;

/// `dst = [dst +] scale·lhs·rhs` in f64.
#[allow(clippy::too_many_arguments)]
fn reference(dst: &[f32], m: usize, n: usize, k: usize, lhs: View, rhs: View, accumulate: bool, scale: f32) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for r in 0..m {
        for c in 0..n {
            let dot: f64 = (0..k).map(|p| lhs.data[r * lhs.rs + p * lhs.cs] as f64 * rhs.data[p * rhs.rs + c * rhs.cs] as f64).sum();
            out[r * n + c] = scale as f64 * dot + if accumulate { dst[r * n + c] as f64 } else { 0.0 };
        }
    }
    out
}

/// (m, n, k, lhs transposed, rhs transposed, accumulate, scale)
const CASES: [(usize, usize, usize, bool, bool, bool, f32); 22] = [
    (12, 32, 1, false, false, false, 1.0),
    (13, 35, 7, false, true, true, 1.0),
    (37, 45, 29, true, false, false, 0.5),
    (150, 33, 300, false, true, true, 1.0),
    (149, 70, 513, true, true, false, 2.0),
    (20, 4100, 9, false, false, true, 1.0),
    (64, 64, 64, false, true, false, 0.125),
    (7, 300, 50, true, true, true, 1.0),
    (300, 5, 40, false, false, false, 1.0),
    // Row counts that end in a partial tile of full-width panels, across a KC edge.
    (16, 45, 300, false, false, true, 1.0),
    (24, 130, 270, false, false, false, 1.0),
    (25, 40, 260, false, true, true, 1.0),
    // Across the AVX-512 blocks: MC = 240 rows with a partial 12-row tile, NC = 512 (12×32) and
    // 4096 (the narrow tiles) columns.
    (253, 70, 40, true, false, true, 1.0),
    (30, 4130, 20, false, true, false, 1.0),
    (12, 64, 17, false, false, false, 1.0),
    // A last 12×32 tile whose second half holds 9 of its 16 columns.
    (30, 57, 20, false, true, true, 1.0),
    // Chunks of rows on two threads with B shared, packed in pieces of fewer depths (B of
    // 700 × 160 past the tests' limit, 384 depths of it within), whole (600 columns across
    // NC = 512), and of fewer columns over several depth chunks (accumulating, and not).
    (60, 150, 700, false, true, true, 1.0),
    (100, 600, 50, true, false, false, 1.0),
    (250, 90, 130, false, false, true, 0.5),
    (70, 300, 800, false, true, true, 1.0),
    (40, 2000, 500, false, false, false, 1.0),
    // Too few rows for chunks: halves along m (the 12×32 kernel on a B packed whole; AVX2's).
    (40, 30, 1200, true, false, true, 1.0),
];

/// Runs every case through `run` (which fills `dst` like [`product`]) and checks it against the
/// reference: within 1e-5 of the largest product term sum, relative.
fn check(name: &str, run: impl Fn(&mut [f32], usize, usize, usize, View, View, bool, f32)) {
    for (i, &(m, n, k, lt, rt, acc, scale)) in CASES.iter().enumerate() {
        let (a, b) = (values(m * k, 3 * i as u64 + 1), values(k * n, 3 * i as u64 + 2));
        let lhs = if lt { View::transposed(&a, m) } else { View::rows(&a, k) };
        let rhs = if rt { View::transposed(&b, k) } else { View::rows(&b, n) };
        let mut dst = values(m * n, 3 * i as u64 + 3);
        let want = reference(&dst, m, n, k, lhs, rhs, acc, scale);
        run(&mut dst, m, n, k, lhs, rhs, acc, scale);
        let bound = 1e-5 * (k as f64 * scale.abs() as f64 + 1.0);
        for (j, (&got, &want)) in dst.iter().zip(&want).enumerate() {
            assert!((got as f64 - want).abs() <= bound, "{name}: case {i} ({m}×{n}×{k}), element {j}: {got} vs {want}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_crate(dst: &mut [f32], m: usize, n: usize, k: usize, lhs: View, rhs: View, acc: bool, scale: f32) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    // SAFETY: the views come from slices of the right sizes.
    pool.install(|| unsafe { with_gemm_crate(dst.as_mut_ptr(), n, m, n, k, lhs.into(), rhs.into(), acc, scale, gemm::Parallelism::Rayon(2)) });
}

#[test]
fn the_gemm_crate_matches_the_reference() {
    check("gemm crate", gemm_crate);
}

/// Our product with micro-kernel K on `threads` threads, as a [`check`] runner.
#[cfg(target_arch = "x86_64")]
fn ours<K: blis::MicroKernel>(threads: usize) -> impl Fn(&mut [f32], usize, usize, usize, View, View, bool, f32) {
    move |dst: &mut [f32], m: usize, n: usize, k: usize, lhs: View, rhs: View, acc: bool, scale: f32| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        // SAFETY: the callers checked the CPU's level; the views come from slices of the right sizes.
        pool.install(|| unsafe { blis::gemm::<K>(m, n, k, lhs.into(), blis::Rhs::Mat(rhs.into()), dst.as_mut_ptr(), n, if acc { blis::Base::C } else { blis::Base::Zero }, scale, threads) });
    }
}

/// Kernel K against the reference on every case, on one and two threads, and against the gemm
/// crate: the two agree with each other as closely as each agrees with the reference.
#[cfg(target_arch = "x86_64")]
fn check_kernel<K: blis::MicroKernel>(name: &str) {
    check(&format!("{name}, 1 thread"), ours::<K>(1));
    check(&format!("{name}, 2 threads"), ours::<K>(2));
    let (m, n, k) = (150, 200, 300);
    let (a, b) = (values(m * k, 7), values(k * n, 8));
    let (lhs, rhs) = (View::rows(&a, k), View::transposed(&b, k));
    let (mut x, mut y) = (vec![0f32; m * n], vec![0f32; m * n]);
    ours::<K>(2)(&mut x, m, n, k, lhs, rhs, false, 1.0);
    gemm_crate(&mut y, m, n, k, lhs, rhs, false, 1.0);
    let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "{name}: the kernels differ by {worst}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn our_avx2_kernel_matches_the_reference_and_the_gemm_crate_on_one_and_two_threads() {
    if crate::cpu::detected_isa() < crate::cpu::Isa::Avx2 {
        eprintln!("skipped: this CPU has no AVX2 + FMA");
        return;
    }
    check_kernel::<blis_avx2::Avx2>("avx2 6x16");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn our_avx512_kernels_match_the_reference_and_the_gemm_crate_on_one_and_two_threads() {
    if crate::cpu::detected_isa() < crate::cpu::Isa::Avx512 {
        eprintln!("skipped: this CPU has no AVX-512");
        return;
    }
    check_kernel::<blis_avx512::Avx512>("avx512 12x32");
    check_kernel::<blis_avx512::Avx512Narrow<16>>("avx512 16x16");
    check_kernel::<blis_avx512::Avx512Narrow<8>>("avx512 8x16");
    check_kernel::<blis_avx512::Avx512Narrow<4>>("avx512 4x16");
    check_kernel::<blis_avx512::Avx512Narrow<28>>("avx512 28x16");
}

/// A weight packed once gives what the product with the weight as stored gives, added to y: on
/// every case's shape (depths across KC, widths that are no multiple of the panel), 1 to 4 and
/// 8 rows (at AVX2 the few-rows kernel; at AVX-512 one row, then the 4×16 and 8×16 tiles) and
/// 9, 16 and the case's rows (AVX2's 6×16 tiles; AVX-512's 16×16 up to 32 rows and 28×16
/// beyond), both layouts of the weight, and a
/// width across NC = 4080 columns (the packed offsets of a second column block) split over the
/// threads; and the same packed for encoder batches ([`Panels::ManyRows`]: the 12×32 kernel's
/// panels at AVX-512, the 6×16 kernel's at AVX2).
#[cfg(target_arch = "x86_64")]
#[test]
fn a_packed_weight_gives_the_product_of_the_weight_as_stored() -> Result<()> {
    if !PackedWeight::available() {
        eprintln!("skipped: weights are packed at the AVX2 and AVX-512 levels only");
        return Ok(());
    }
    let shapes = CASES.iter().map(|&(m, n, k, _, rt, _, _)| (m, n, k, rt)).chain([(3, 4100, 300, false), (20, 4100, 40, true)]);
    let panel_kinds = [Panels::FewRows, Panels::ManyRows].into_iter().filter(|_| PackedWeight::available());
    for (panels, (i, (m, n, k, transposed))) in panel_kinds.flat_map(|p| shapes.clone().enumerate().map(move |s| (p, s))) {
        let b = values(k * n, 5 * i as u64 + 1);
        let rhs = if transposed { View::transposed(&b, k) } else { View::rows(&b, n) };
        let packed = PackedWeight::new(rhs, k, n, panels)?.expect("available");
        assert_eq!(packed.dims(), (k, n));
        assert_eq!(packed.f32_panels().expect("f32 panels").as_ptr() as usize % 64, 0, "panels start a cache line");
        let width = if packed.wide { <blis_avx512::Avx512 as blis::MicroKernel>::NR } else { blis_avx2::NR };
        assert_eq!(packed.wide, panels == Panels::ManyRows && crate::cpu::isa() == crate::cpu::Isa::Avx512);
        assert_eq!(packed.f32_panels().expect("f32 panels").len(), k * n.div_ceil(width) * width);
        for rows in [1, 2, 3, 4, 8, 9, 16, m] {
            assert_packed_product_adds(&packed, rows, rhs, 5 * i as u64, &format!("{panels:?} case {i}"))?;
        }
    }
    let packed = PackedWeight::new(View::rows(&[1.0; 6], 3), 2, 3, Panels::FewRows)?.expect("available");
    assert!(packed.product(&[1.0; 3], 2, &mut [0.0; 6]).is_err(), "x of the wrong length");
    assert!(PackedWeight::new(View::rows(&[1.0; 5], 3), 2, 3, Panels::FewRows).is_err(), "a weight that does not fit its buffer");
    Ok(())
}

/// `packed.product` adds `x · W` to y for `rows` rows of random x and y (from `seed`), W given
/// as stored by `rhs`, within 1e-5 per depth of the f64 reference.
#[cfg(target_arch = "x86_64")]
fn assert_packed_product_adds(packed: &PackedWeight, rows: usize, rhs: View, seed: u64, what: &str) -> Result<()> {
    let (k, n) = packed.dims();
    let a = values(rows * k, seed + 2);
    let mut y = values(rows * n, seed + 3);
    let want = reference(&y, rows, n, k, View::rows(&a, k), rhs, true, 1.0);
    packed.product(&a, rows, &mut y)?;
    let bound = 1e-5 * (k as f64 + 1.0);
    for (j, (&got, &want)) in y.iter().zip(&want).enumerate() {
        assert!((got as f64 - want).abs() <= bound, "{what} ({rows}×{n}×{k}), element {j}: {got} vs {want}");
    }
    Ok(())
}

/// A weight packed in half precision (f16 or bf16 bits, [`PackedWeight::new_half`]) gives the
/// product of the weight widened to f32, in both storage orders, for the few-rows kernel (1–8
/// rows), its passes of 8 rows (9–16) and the widened blocks of the GEMM (17 and more: across
/// the 256-depth chunks and the 128-column blocks, with a last panel of fewer than 16 columns);
/// it keeps its elements in 2 bytes. Also the errors of a bad dtype or a short buffer.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_weight_packed_in_half_precision_gives_the_product_of_its_f32_values() -> Result<()> {
    if !PackedWeight::available() {
        eprintln!("skipped: weights are packed at the AVX2 and AVX-512 levels only");
        return Ok(());
    }
    for (i, &(n, k, transposed)) in [(45, 300, false), (300, 600, true), (16, 256, false), (529, 40, true)].iter().enumerate() {
        for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
            // The values rounded to the type by candle: their bits, and the rounded values as f32.
            let rounded = candle_core::Tensor::new(values(k * n, 7 * i as u64 + 1), &candle_core::Device::Cpu)?.to_dtype(dtype)?;
            let widened = rounded.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
            let bits: Vec<u16> = {
                let (storage, layout) = rounded.storage_and_layout();
                let candle_core::Storage::Cpu(storage) = &*storage else { unreachable!("a CPU tensor") };
                match crate::ops::matvec::weight_data(storage, layout)? {
                    crate::ops::matvec::WeightData::F16(b) | crate::ops::matvec::WeightData::Bf16(b) => b.to_vec(),
                    crate::ops::matvec::WeightData::F32(_) => unreachable!("a half-precision tensor"),
                }
            };
            let (rs, cs) = if transposed { (1, k) } else { (n, 1) };
            let packed = PackedWeight::new_half(&bits, rs, cs, k, n, dtype)?.expect("available");
            assert_eq!((packed.dtype(), packed.dims()), (dtype, (k, n)));
            assert!(packed.f32_panels().is_none(), "kept in 2 bytes");
            let rhs = View { data: &widened, rs, cs };
            for rows in [1, 2, 5, 8, 9, 16, 17, 40] {
                assert_packed_product_adds(&packed, rows, rhs, 7 * i as u64, &format!("{dtype:?} case {i}"))?;
            }
        }
    }
    assert!(PackedWeight::new_half(&[0; 6], 3, 1, 2, 3, candle_core::DType::F32).is_err(), "f32 is not a half type");
    assert!(PackedWeight::new_half(&[0; 5], 3, 1, 2, 3, candle_core::DType::F16).is_err(), "a weight that does not fit its buffer");
    Ok(())
}

/// `matmul_new` and `matmul_into` with and without a bias row give the reference plus the bias,
/// and write every element of memory they are given uninitialised (here: NaN, which any read of
/// it would carry into the result): through our kernels and, for the short, narrow and empty
/// products, through the gemm crate.
#[test]
fn a_product_into_fresh_memory_adds_its_bias_and_writes_every_element() -> Result<()> {
    for (i, &(m, n, k)) in [(150, 70, 300), (100, 600, 50), (100, 600, 200), (5, 40, 30), (70, 20, 10), (64, 64, 0), (130, 90, 700)].iter().enumerate() {
        let (a, b, bias) = (values(m * k, 11 * i as u64 + 1), values(k * n, 11 * i as u64 + 2), values(n, 11 * i as u64 + 3));
        let (lhs, rhs) = (View::rows(&a, k), View::transposed(&b, k));
        let zeros = vec![0f32; m * n];
        let want = reference(&zeros, m, n, k, lhs, rhs, false, 1.0);
        let bound = 1e-5 * (k as f64 + 1.0);
        for with_bias in [false, true] {
            let row = with_bias.then_some(bias.as_slice());
            let fresh = matmul_new(m, n, k, lhs, rhs, row)?;
            let mut into = vec![std::mem::MaybeUninit::new(f32::NAN); m * n + 3];
            matmul_into(&mut into, n, m, n, k, lhs, rhs, row)?;
            for (j, &w) in want.iter().enumerate() {
                let w = w + if with_bias { bias[j % n] as f64 } else { 0.0 };
                // SAFETY: the slots were initialised (to NaN) when the vector was made.
                let got_into = unsafe { into[j].assume_init() };
                for got in [fresh[j], got_into] {
                    assert!((got as f64 - w).abs() <= bound, "{m}×{n}×{k}, bias {with_bias}, element {j}: {got} vs {w}");
                }
            }
            // SAFETY: as above.
            assert!(unsafe { into[m * n].assume_init() }.is_nan(), "written past the product");
        }
    }
    // Accumulating without depth leaves dst as it was.
    let mut dst = values(64 * 64, 99);
    let before = dst.clone();
    matmul(&mut dst, 64, 64, 64, 0, View::rows(&[], 0), View::rows(&[], 64), true)?;
    assert_eq!(dst, before, "a product without depth changed what it accumulates into");
    assert!(matmul_new(4, 3, 2, View::rows(&[1.0; 8], 2), View::rows(&[1.0; 6], 3), Some(&[0.0; 2])).is_err(), "a bias of the wrong width");
    assert!(matmul_new(4, 3, 2, View::rows(&[1.0; 7], 2), View::rows(&[1.0; 6], 3), None).is_err(), "a view past its slice");
    Ok(())
}

#[test]
fn a_view_outside_its_slice_is_an_error() {
    let (a, b, mut c) = (vec![0f32; 10], vec![0f32; 12], vec![0f32; 12]);
    let err = matmul(&mut c, 4, 3, 4, 4, View::rows(&a, 4), View::rows(&b, 4), false).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}
