//! Custom operations with CPU implementations of our own (and, with `--features cuda`, kernels).

pub mod activation;
pub mod attention;
pub mod conv;
pub mod conv_pool;
pub mod cross_entropy;
pub mod dropout;
pub(crate) mod gemm;
pub mod heads;
pub mod linear;
pub mod lstm;
pub mod lstm_layer;
pub mod math;
pub mod matvec;
pub mod norm;
pub mod pool;

use candle_core::{CpuStorage, Layout, Result};

/// The f32 elements a contiguous CPU tensor covers; other layouts and dtypes are an error naming `op`.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op} needs contiguous f32 tensors"),
    }
}

/// [`cpu_f32`] for a tensor updated in place.
pub(crate) fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op} needs contiguous f32 tensors"),
    }
}
