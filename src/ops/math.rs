//! Branch-free f32 functions for our CPU kernels: written without branches or calls so that the
//! loops around them vectorise (libm's `expf`/`erff` are scalar calls, one per element), and
//! compiled inside each caller's `#[target_feature]` functions (AVX-512 or AVX2+FMA).
//!
//! [`run_vectorised`] picks the widest variant of a loop the CPU supports, through `wick::cpu`.

/// e^x (Cephes' expf polynomial after a Cody-Waite reduction, ~2 ulp) for x ≤ 88; exactly 0
/// below −87 (and for −∞).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // n = x·log2(e) rounded to an integer by adding 1.5·2²³ + 127, which also leaves n + 127, the
    // biased exponent of 2ⁿ, in the low mantissa bits. Not `n as i32`: Rust's float-to-int cast
    // saturates and maps NaN to 0, which LLVM cannot vectorise; it compiled to 16 scalar
    // `vcvttss2si` + `cmov` pairs a vector and made GELU ~100 cycles a vector.
    const SHIFT: f32 = 12_582_912.0 + 127.0;
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * std::f32::consts::LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let two_n = f32::from_bits(shifted.to_bits() << 23);
    let r = n.mul_add(-0.693_359_4, xc);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    if x < -87.0 {
        0.0
    } else {
        e * two_n
    }
}

/// [`exp`]'s twin for kernels whose every ISA level must give bit-identical results (the LSTM
/// cell): the same polynomial with plain multiplies and adds (no FMA, whose contraction differs
/// between levels), and x clamped to [−87, 88] so that the result is always finite and positive
/// (e^−87 ≈ 1.6e−38 stands in for 0: a sigmoid or tanh built on it needs no special cases).
#[inline(always)]
pub fn exp_exact_ops(x: f32) -> f32 {
    // 1.5·2²³ + 127: adding it rounds x·log2(e) to an integer n (ties to even, in the low
    // mantissa bits) and leaves n + 127, the biased exponent of 2ⁿ, in those bits.
    const SHIFT: f32 = 12_582_912.0 + 127.0;
    let xc = x.clamp(-87.0, 88.0);
    let shifted = xc * std::f32::consts::LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let two_n = f32::from_bits(shifted.to_bits() << 23);
    // r = x − n·ln 2 in two parts (0.693359375 has 9 significant bits: n·it is exact).
    let r = xc - n * 0.693_359_4;
    let r = r + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * two_n
}

/// erf(x) to 5e-7 absolute in f32, branch-free: Abramowitz & Stegun 7.1.26 (1.5e-7 in exact
/// arithmetic), 1 − t·P(t)·e^(−x²) with t = 1/(1 + p|x|), and the sign restored.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_and_gaussian(x).0
}

/// (erf(x), e^(−x²)): [`erf`] and the exponential it computes on the way, for GELU's slope,
/// whose density term e^(−x²/2) is that exponential at x/√2 (one `exp` instead of two: the
/// slope was 2.5% of a MiniLM training step, most of it in its two `exp`s).
#[inline(always)]
pub fn erf_and_gaussian(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let mut p = 1.061_405_4f32;
    p = p.mul_add(t, -1.453_152_1);
    p = p.mul_add(t, 1.421_413_8);
    p = p.mul_add(t, -0.284_496_74);
    p = p.mul_add(t, 0.254_829_6);
    let gaussian = exp(-a * a);
    let y = 1.0 - p * t * gaussian;
    (y.copysign(x), gaussian)
}

/// Σ f(a[i], b[i]) over equal-length slices in 16 lane-wise partial sums, added up at the end:
/// under [`run_vectorised`] this compiles to vector adds, where a plain `.sum()` keeps f32's
/// strict order, one dependent add per element (LayerNorm's row sums, scalar, were 2–3% of a
/// MiniLM training step).
#[inline(always)]
pub fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for t in 0..LANES {
            acc[t] += f(x[t], y[t]);
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum::<f32>()
}

/// Runs `f` compiled for the widest instruction set the CPU has (`wick::cpu::isa()`): the
/// closure is inlined into a `#[target_feature]` function per level, so the branch-free math
/// above vectorises at that width. The closure must be marked `#[inline(always)]`: otherwise it
/// is compiled for the baseline target and every `mul_add` becomes a call to libm's `fmaf`.
#[inline(always)]
pub fn run_vectorised<R>(f: impl FnOnce() -> R) -> R {
    run_at(crate::cpu::isa(), f)
}

/// [`run_vectorised`] at a given level (capped by what the CPU has): tests run every level.
#[inline(always)]
pub fn run_at<R>(level: crate::cpu::Isa, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match level.min(crate::cpu::detected_isa()) {
            // SAFETY: the level is capped by what the CPU reports.
            crate::cpu::Isa::Avx512 => unsafe { avx512(f) },
            crate::cpu::Isa::Avx2 => unsafe { avx2(f) },
            crate::cpu::Isa::Portable => f(),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        for i in 0..=40000 {
            let x = -90.0 + i as f32 * 0.0044;
            let (a, b) = (exp(x), (x as f64).exp() as f32);
            if x < -87.0 {
                assert_eq!(a, 0.0);
            } else {
                assert!((a - b).abs() <= 4.0 * f32::EPSILON * b, "exp({x}) = {a}, expected {b}");
            }
            let x = x / 10.0;
            let e = candle_core::cpu::erf::erf_f64(x as f64);
            assert!((erf(x) as f64 - e).abs() < 5e-7, "erf({x}) = {}, expected {e}", erf(x));
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        // NaN stays NaN (a diverged loss must show as one); +∞ saturates at e^88, as before.
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::INFINITY).is_finite() && exp(f32::INFINITY) > 1e38);
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
    }

    /// The same loop compiled for every level the CPU has gives the same results (up to the
    /// rounding FMA contraction changes).
    #[test]
    fn every_level_agrees_with_the_portable_one() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.031).collect();
        let run = |level| {
            run_at(level, #[inline(always)] || xs.iter().map(|&x| erf(x) + exp(-x * x)).collect::<Vec<f32>>())
        };
        let portable = run(crate::cpu::Isa::Portable);
        for level in crate::cpu::available_levels() {
            for (a, b) in run(level).iter().zip(&portable) {
                assert!((a - b).abs() < 1e-6, "{level:?}: {a} vs {b}");
            }
        }
    }
}
