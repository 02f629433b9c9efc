//! The AVX2+FMA level of the fused attention's CPU kernels (`kernels.rs`): 8-lane vectors,
//! register blocks of 6 × 2 vectors (12 ymm accumulators + 2 B vectors + 1 broadcast = 15 of
//! the 16 registers), and the exponential with 2^n built in the exponent bits.

use super::kernels::{self, Lanes, Start, Strided};
use super::Problem;
use std::arch::x86_64::*;

/// Whether this level applies: AVX2 chosen (`wick::cpu::isa`) and head_dim a multiple of 8.
pub fn usable(d: usize) -> bool {
    d.is_multiple_of(8) && d > 0 && crate::cpu::isa() == crate::cpu::Isa::Avx2
}

#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct Avx2(__m256);

impl Lanes for Avx2 {
    const N: usize = 8;
    const BLOCK: usize = 2;
    type Mask = __m256;
    type Limits = __m256i;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self(unsafe { _mm256_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        Self(unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))) })
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        Self(unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Self(unsafe { _mm256_add_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Self(unsafe { _mm256_sub_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        Self(unsafe { _mm256_mul_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        Self(unsafe { _mm256_max_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Self(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        unsafe {
            let x = self.0;
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
            let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)));
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
            // n ∈ [−126, 127] after the clamp: 2^n is the normal float with biased exponent n + 127
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
            Self(_mm256_and_ps(_mm256_mul_ps(e, pow2), keep))
        }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }
    #[inline(always)]
    unsafe fn load_limits(p: *const i32) -> __m256i {
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }
    #[inline(always)]
    unsafe fn sees(limits: __m256i, j: usize) -> __m256 {
        unsafe { _mm256_castsi256_ps(_mm256_cmpgt_epi32(limits, _mm256_set1_epi32(j as i32))) }
    }
    #[inline(always)]
    unsafe fn is_neg_inf(self) -> __m256 {
        unsafe { _mm256_cmp_ps::<_CMP_EQ_OQ>(self.0, _mm256_set1_ps(f32::NEG_INFINITY)) }
    }
    #[inline(always)]
    unsafe fn select(mask: __m256, a: Self, b: Self) -> Self {
        Self(unsafe { _mm256_blendv_ps(b.0, a.0, mask) })
    }
    unsafe fn product(a: Strided, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, start: Start, rows: usize, vectors: usize) {
        unsafe { product_at_level(a, b, ldb, nt, c, ldc, start, rows, vectors) }
    }
}

kernels::entry_points!(Avx2, "avx2,fma,f16c");
