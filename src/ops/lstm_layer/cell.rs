//! The elementwise part of one LSTM step for one batch row, forwards and backwards, compiled for
//! AVX-512, AVX2 and the baseline target and chosen by the caller's [`Isa`].
//!
//! The kernels are plain loops over the hidden units with a branch-free `exp`, so that LLVM
//! vectorises them at every level (the target features only widen the vectors). Only IEEE
//! operations that round exactly (no FMA contraction, no reciprocal approximations) are used,
//! so every level gives bit-identical results and the levels differ only in speed.
//!
//! Forward per hidden unit: five exponentials (σ of i, f, o; tanh of g and of c). libm's `expf`
//! and `tanhf` are scalar calls; at char-RNN sizes (B·H = 8192 units a step) they cost more than
//! the step's GEMM share, which is why the exponentials are written out here.

use crate::cpu::Isa;
use crate::ops::math::exp_exact_ops as exp;

#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// tanh through one `exp`: ±1 at the extremes (the clamped exp stays finite), ~1e−7 absolute.
#[inline(always)]
pub(super) fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// One row of the forward step. `gates` holds the pre-activations (i, f, g, o) on entry and the
/// activations on return; c, tanh c and h = o·tanh c are written.
#[inline(always)]
fn forward_impl(gates: &mut [f32], c_prev: &[f32], c: &mut [f32], tanh_c: &mut [f32], h: &mut [f32]) {
    let n = c.len();
    let (gi, rest) = gates.split_at_mut(n);
    let (gf, rest) = rest.split_at_mut(n);
    let (gg, go) = rest.split_at_mut(n);
    // Equal lengths up front let LLVM drop the bounds checks and vectorise.
    let (go, c_prev, tanh_c, h) = (&mut go[..n], &c_prev[..n], &mut tanh_c[..n], &mut h[..n]);
    for j in 0..n {
        let i = sigmoid(gi[j]);
        let f = sigmoid(gf[j]);
        let g = tanh(gg[j]);
        let o = sigmoid(go[j]);
        let cj = f * c_prev[j] + i * g;
        let tc = tanh(cj);
        gi[j] = i;
        gf[j] = f;
        gg[j] = g;
        go[j] = o;
        c[j] = cj;
        tanh_c[j] = tc;
        h[j] = o * tc;
    }
}

/// What the backward step of one row reads.
pub(super) struct BackwardRow<'a> {
    /// The loss's gradient with respect to this step's output h (from the layer above or the head).
    pub dh_out: &'a [f32],
    /// The gradient reaching h through the next step's recurrence: d gates_{t+1}·W_hh.
    pub dh_next: &'a [f32],
    /// Activated gates (i, f, g, o), c_{t−1} and tanh c_t, as the forward pass saved them.
    pub gates: &'a [f32],
    pub c_prev: &'a [f32],
    pub tanh_c: &'a [f32],
}

/// One row of the backward step: `dc` holds dL/dc_t from later steps on entry and dL/dc_{t−1}
/// on return; d gates (pre-activation) is written and added into `dbias`.
#[inline(always)]
fn backward_impl(row: &BackwardRow, dc: &mut [f32], dgates: &mut [f32], dbias: &mut [f32]) {
    let n = dc.len();
    let (dh_out, dh_next, c_prev, tanh_c) = (&row.dh_out[..n], &row.dh_next[..n], &row.c_prev[..n], &row.tanh_c[..n]);
    let (gi, gf, gg, go) = (&row.gates[..n], &row.gates[n..2 * n], &row.gates[2 * n..3 * n], &row.gates[3 * n..4 * n]);
    let (di, rest) = dgates.split_at_mut(n);
    let (df, rest) = rest.split_at_mut(n);
    let (dg, d_o) = rest.split_at_mut(n);
    let d_o = &mut d_o[..n];
    let (bi, rest) = dbias.split_at_mut(n);
    let (bf, rest) = rest.split_at_mut(n);
    let (bg, bo) = rest.split_at_mut(n);
    let bo = &mut bo[..n];
    for j in 0..n {
        let (i, f, g, o, tc) = (gi[j], gf[j], gg[j], go[j], tanh_c[j]);
        let dh = dh_out[j] + dh_next[j];
        let dcj = dc[j] + dh * o * (1.0 - tc * tc);
        let (vi, vf, vg, vo) = (dcj * g * i * (1.0 - i), dcj * c_prev[j] * f * (1.0 - f), dcj * i * (1.0 - g * g), dh * tc * o * (1.0 - o));
        di[j] = vi;
        df[j] = vf;
        dg[j] = vg;
        d_o[j] = vo;
        bi[j] += vi;
        bf[j] += vf;
        bg[j] += vg;
        bo[j] += vo;
        dc[j] = dcj * f;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
unsafe fn forward_avx512(gates: &mut [f32], c_prev: &[f32], c: &mut [f32], tanh_c: &mut [f32], h: &mut [f32]) {
    forward_impl(gates, c_prev, c, tanh_c, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(gates: &mut [f32], c_prev: &[f32], c: &mut [f32], tanh_c: &mut [f32], h: &mut [f32]) {
    forward_impl(gates, c_prev, c, tanh_c, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
unsafe fn backward_avx512(row: &BackwardRow, dc: &mut [f32], dgates: &mut [f32], dbias: &mut [f32]) {
    backward_impl(row, dc, dgates, dbias)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(row: &BackwardRow, dc: &mut [f32], dgates: &mut [f32], dbias: &mut [f32]) {
    backward_impl(row, dc, dgates, dbias)
}

/// The forward step of one row (`gates` 4H, the rest H) at instruction-set level `isa`, which
/// must not exceed what the CPU has ([`crate::cpu::isa`] never does).
pub(super) fn forward(isa: Isa, gates: &mut [f32], c_prev: &[f32], c: &mut [f32], tanh_c: &mut [f32], h: &mut [f32]) {
    debug_assert!(isa <= crate::cpu::detected_isa());
    match isa {
        // SAFETY: the CPU has the features (isa ≤ detected_isa).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { forward_avx512(gates, c_prev, c, tanh_c, h) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { forward_avx2(gates, c_prev, c, tanh_c, h) },
        _ => forward_impl(gates, c_prev, c, tanh_c, h),
    }
}

/// The backward step of one row at level `isa` (see [`forward`]).
pub(super) fn backward(isa: Isa, row: &BackwardRow, dc: &mut [f32], dgates: &mut [f32], dbias: &mut [f32]) {
    debug_assert!(isa <= crate::cpu::detected_isa());
    match isa {
        // SAFETY: the CPU has the features (isa ≤ detected_isa).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { backward_avx512(row, dc, dgates, dbias) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { backward_avx2(row, dc, dgates, dbias) },
        _ => backward_impl(row, dc, dgates, dbias),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_sigmoid_and_tanh_are_accurate_and_finite() {
        for k in 0..=40_000 {
            let x = -100.0 + k as f32 * 0.005;
            let (e, r) = (exp(x), (x.clamp(-87.0, 88.0) as f64).exp());
            assert!(((e as f64) - r).abs() <= 4.0 * f32::EPSILON as f64 * r, "exp({x}) = {e}, expected {r}");
            let s = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - s).abs() < 4e-7, "sigmoid({x})");
            assert!((tanh(x) as f64 - (x as f64).tanh()).abs() < 4e-7, "tanh({x})");
        }
        for x in [f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30] {
            assert!(sigmoid(x).is_finite() && tanh(x).abs() <= 1.0);
        }
    }

    /// Odd lengths exercise the vector loops' remainders; every level must give the same bits.
    #[test]
    fn every_level_gives_the_portable_result() {
        let n = 37;
        let val = |k: usize, s: f32| (k as f32 * 0.731 + s).sin() * 4.0;
        let pre: Vec<f32> = (0..4 * n).map(|k| val(k, 0.1)).collect();
        let c_prev: Vec<f32> = (0..n).map(|k| val(k, 0.7)).collect();
        let run = |isa: Isa| {
            let mut gates = pre.clone();
            let (mut c, mut tc, mut h) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            forward(isa, &mut gates, &c_prev, &mut c, &mut tc, &mut h);
            let dh_out: Vec<f32> = (0..n).map(|k| val(k, 1.3)).collect();
            let dh_next: Vec<f32> = (0..n).map(|k| val(k, 2.9)).collect();
            let mut dc: Vec<f32> = (0..n).map(|k| val(k, 3.7)).collect();
            let (mut dg, mut db) = (vec![0.0; 4 * n], vec![1.0; 4 * n]);
            let row = BackwardRow { dh_out: &dh_out, dh_next: &dh_next, gates: &gates, c_prev: &c_prev, tanh_c: &tc };
            backward(isa, &row, &mut dc, &mut dg, &mut db);
            [gates, c, tc, h, dc, dg, db]
        };
        let reference = run(Isa::Portable);
        // The portable kernel against the plain formulas.
        for j in 0..n {
            let (i, f, g, o) = (sigmoid(pre[j]), sigmoid(pre[n + j]), tanh(pre[2 * n + j]), sigmoid(pre[3 * n + j]));
            let c = f * c_prev[j] + i * g;
            assert_eq!(reference[1][j], c);
            assert_eq!(reference[3][j], o * tanh(c));
        }
        for isa in crate::cpu::available_levels() {
            assert_eq!(run(isa), reference, "{isa:?}");
        }
    }
}
