//! The AVX-512 level of the fused attention's CPU kernels (`kernels.rs`): 16-lane vectors,
//! register blocks of 6 × 4 vectors (24 of the 32 zmm registers as accumulators), lane masks in
//! mask registers, and the exponential scaled by `vscalefps`.

use super::kernels::{self, Lanes, Start, Strided};
use super::Problem;
use std::arch::x86_64::*;

/// Whether this level applies: AVX-512 chosen (`wick::cpu::isa`) and head_dim a multiple of 16.
pub fn usable(d: usize) -> bool {
    d.is_multiple_of(16) && d > 0 && crate::cpu::isa() == crate::cpu::Isa::Avx512
}

#[derive(Clone, Copy)]
#[repr(transparent)]
pub(super) struct Avx512(__m512);

impl Lanes for Avx512 {
    const N: usize = 16;
    const BLOCK: usize = 4;
    type Mask = __mmask16;
    type Limits = __m512i;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self(unsafe { _mm512_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(unsafe { _mm512_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        // bf16 is the top half of an f32: widen to 32 bits and shift into place.
        Self(unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))) })
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        Self(unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Self(unsafe { _mm512_add_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Self(unsafe { _mm512_sub_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        Self(unsafe { _mm512_mul_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        Self(unsafe { _mm512_max_ps(self.0, b.0) })
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Self(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        unsafe {
            let x = self.0;
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
            let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
            Self(_mm512_maskz_mov_ps(keep, _mm512_scalef_ps(e, n)))
        }
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        unsafe { _mm512_reduce_add_ps(self.0) }
    }
    #[inline(always)]
    unsafe fn load_limits(p: *const i32) -> __m512i {
        unsafe { _mm512_loadu_si512(p as *const _) }
    }
    #[inline(always)]
    unsafe fn sees(limits: __m512i, j: usize) -> __mmask16 {
        unsafe { _mm512_cmplt_epi32_mask(_mm512_set1_epi32(j as i32), limits) }
    }
    #[inline(always)]
    unsafe fn is_neg_inf(self) -> __mmask16 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(self.0, _mm512_set1_ps(f32::NEG_INFINITY)) }
    }
    #[inline(always)]
    unsafe fn select(mask: __mmask16, a: Self, b: Self) -> Self {
        Self(unsafe { _mm512_mask_blend_ps(mask, b.0, a.0) })
    }
    unsafe fn product(a: Strided, b: *const f32, ldb: usize, nt: usize, c: *mut f32, ldc: usize, start: Start, rows: usize, vectors: usize) {
        unsafe { product_at_level(a, b, ldb, nt, c, ldc, start, rows, vectors) }
    }
}

kernels::entry_points!(Avx512, "avx512f");
