//! Custom operations with CPU implementations of our own (and, with `--features cuda`, kernels).
//!
//! Every fused op has a plain-candle formulation of the same function: other devices (CUDA)
//! and dtypes take it, and so does the CPU when the environment says `WICK_OPS=reference`
//! (default `fused`). That one switch lets the parity tests check, on the CPU, the code a GPU
//! runs. Each op's dispatch asks [`fused_path`]; attention, which has a CUDA kernel of its own,
//! asks [`OpsPath::current`]. Tests that compare the two formulations call both explicitly.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod conv_pool;
pub mod cross_entropy;
pub mod dropout;
pub mod gemm;
pub mod heads;
pub mod linear;
pub mod lstm;
pub mod lstm_layer;
pub mod math;
pub mod matvec;
pub mod norm;
pub mod pool;

use candle_core::{CpuStorage, Device, Layout, Result};
use std::sync::OnceLock;

/// Which formulation of the ops runs: `WICK_OPS=fused|reference`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpsPath {
    /// Our fused CPU ops (and the CUDA attention kernel): the default.
    Fused,
    /// The plain-candle formulations, on every device: what the fused CPU ops fall back to on
    /// a GPU.
    Reference,
}

impl OpsPath {
    /// The environment variable that chooses the path.
    pub const ENV: &'static str = "WICK_OPS";

    /// A `WICK_OPS` value: "fused" (or empty) or "reference", any case; anything else is an
    /// error naming the allowed values.
    pub fn parse(value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "fused" => Ok(Self::Fused),
            "reference" => Ok(Self::Reference),
            _ => candle_core::bail!("{}={value:?} is not a path: expected \"fused\" (the default) or \"reference\"", Self::ENV),
        }
    }

    /// The path the environment asks for now (unset: fused), or the error of [`OpsPath::parse`]
    /// (a command can call this at start to refuse a misspelt value).
    pub fn from_env() -> Result<Self> {
        std::env::var(Self::ENV).map_or(Ok(Self::Fused), |v| Self::parse(&v))
    }

    /// The path of this process: `WICK_OPS`, read once. An unknown value is reported on stderr
    /// and the fused path taken.
    pub fn current() -> Self {
        static PATH: OnceLock<OpsPath> = OnceLock::new();
        *PATH.get_or_init(|| {
            Self::from_env().unwrap_or_else(|e| {
                eprintln!("warning: {e}; using fused");
                Self::Fused
            })
        })
    }
}

/// Whether an op on `device` takes its fused CPU implementation: the CPU, unless
/// `WICK_OPS=reference`. (Each op also checks the dtypes its kernel takes.)
pub fn fused_path(device: &Device) -> bool {
    device.is_cpu() && OpsPath::current() == OpsPath::Fused
}

/// Runs `f` (a whole decoding step: dozens of short parallel products) on a worker of a rayon
/// pool, so that the step's products fork from a pool thread (which takes a share of the work
/// itself) instead of handing each one over from the calling thread and waking it again: one
/// hand-over a step instead of one a product (GPT-2-small f32 decoding on 2 threads: 66–68% →
/// 69–72% of the bandwidth limit, three alternating pairs of runs). A caller that is a pool
/// worker already (the main thread after [`crate::cpu::join_thread_pool`], as in the `wick`
/// command) runs the step right there, on its own pool: no hand-over at all (45 µs a step, a
/// 2-layer bf16 GPT-2 whose weights stay in cache: 1,900 against 1,750 tok/s, ten alternating
/// pairs in one process on the Zen 5 EPYC, session 19); any other caller (a server's
/// scheduler thread) hands the step to candle's CPU pool. For the step, the pool's other
/// threads spin instead of sleeping between its products ([`crate::cpu::KeepPoolAwake`]: bf16
/// batch 1 72.1–72.9 tok/s against 66.5–69.5 (a third pair's 44.5 was an outlier), f32 batch 1
/// 41.1–43.7 against 37.3–40.3, batch 8 mostly ahead too; three alternating pairs on the 2-core
/// Xeon, session 17). Elsewhere `f` runs as it is; `WICK_STEP_POOL=0` turns all of it off, for
/// comparing.
pub fn on_cpu_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    static ON: OnceLock<bool> = OnceLock::new();
    if !(device.is_cpu() && *ON.get_or_init(|| std::env::var("WICK_STEP_POOL").map_or(true, |v| v != "0"))) {
        return f();
    }
    let step = || {
        let _awake = crate::cpu::KeepPoolAwake::new();
        f()
    };
    if rayon::current_thread_index().is_some() {
        step()
    } else {
        device.with_context(step)
    }
}

/// The f32 elements a contiguous CPU tensor covers; other layouts and dtypes are an error naming `op`.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op} needs contiguous f32 tensors"),
    }
}

/// A vector of `len` floats that `write` fills, given them uninitialised: for outputs that are
/// written whole, where a zero fill first (`vec![0.0; len]`) is a pass over memory for nothing
/// (activation-sized buffers: in a MiniLM training step the fills were 2–3% of the time).
///
/// # Safety
/// `write` writes every element.
pub(crate) unsafe fn written_once(len: usize, write: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    write(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the caller's promise.
    unsafe { out.set_len(len) };
    out
}

/// `chunk` zero-filled, as initialised floats: for buffers that a parallel op's tasks zero chunk
/// by chunk just before they accumulate into them (in cache), instead of a serial
/// `vec![0.0; len]` pass over all of it first (attention's outputs and gradients: 2% of a
/// MiniLM training step in `memset`).
pub(crate) fn zeroed(chunk: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    chunk.iter_mut().for_each(|v| _ = v.write(0.0));
    // SAFETY: every element was written above, and MaybeUninit<f32> has the layout of f32.
    unsafe { &mut *(chunk as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// `rows` copies of `row` (n values; or of n zeros): the output buffer of a product, which adds
/// into it. Written in one pass, by the rayon pool when it is large: for an encoder batch
/// (megabytes) a serial `repeat` or zero-fill was a few percent of a forward pass, with the other
/// threads idle (BERT-base q8_0 forward b8 s128, two alternating pairs: 7.08/6.59 → 8.01/7.37
/// seq/s). Callers check the row's length; a wrong one is a bug, and panics.
pub(crate) fn repeated_rows(row: Option<&[f32]>, rows: usize, n: usize) -> Vec<f32> {
    assert!(row.is_none_or(|b| b.len() == n), "repeated_rows: a row of {} values for {n} columns", row.map_or(0, <[f32]>::len));
    // A chunk starts at a row boundary (below), so its rows line up with `row`.
    let fill = |out: &mut [std::mem::MaybeUninit<f32>]| match row {
        Some(b) => out.chunks_mut(n).for_each(|r| r.iter_mut().zip(b).for_each(|(v, &x)| _ = v.write(x))),
        None => out.iter_mut().for_each(|v| _ = v.write(0.0)),
    };
    if n == 0 {
        return vec![];
    }
    let mut y: Vec<f32> = Vec::with_capacity(rows * n);
    if rows * n < 1 << 16 {
        fill(y.spare_capacity_mut());
    } else {
        use rayon::prelude::*;
        // Whole rows per chunk (zeros: any length), ~16K elements each.
        let chunk = if row.is_some() { n * (1usize << 14).div_ceil(n) } else { 1 << 14 };
        y.spare_capacity_mut().par_chunks_mut(chunk).for_each(fill);
    }
    // SAFETY: all rows·n elements were written above.
    unsafe { y.set_len(rows * n) };
    y
}

/// [`cpu_f32`] for a tensor updated in place.
pub(crate) fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op} needs contiguous f32 tensors"),
    }
}

/// Deterministic values in [-1, 1).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_path_values_parse_and_unknown_ones_name_the_allowed_values() {
        assert_eq!(OpsPath::parse("Reference").unwrap(), OpsPath::Reference);
        assert_eq!(OpsPath::parse("fused").unwrap(), OpsPath::Fused);
        assert_eq!(OpsPath::parse("").unwrap(), OpsPath::Fused);
        let err = OpsPath::parse("refrence").unwrap_err().to_string();
        assert!(err.contains("WICK_OPS") && err.contains("\"refrence\"") && err.contains("fused") && err.contains("reference"), "{err}");
    }

    /// Serial (small) and parallel (from 2¹⁶ elements) fills, rows of every width, and zeros.
    #[test]
    fn repeated_rows_repeats_the_row_or_zeros() {
        for (rows, n) in [(3, 5), (1, 7), (1000, 77), (70_000, 1), (3, 30_000)] {
            let row: Vec<f32> = (0..n).map(|j| j as f32 + 0.5).collect();
            let y = repeated_rows(Some(&row), rows, n);
            assert_eq!(y.len(), rows * n);
            assert!(y.chunks_exact(n).all(|r| r == row.as_slice()), "({rows}, {n})");
            let z = repeated_rows(None, rows, n);
            assert!(z.len() == rows * n && z.iter().all(|&v| v == 0.0), "({rows}, {n})");
        }
        assert!(repeated_rows(None, 4, 0).is_empty() && repeated_rows(Some(&[]), 0, 0).is_empty());
    }
}
