//! f32 matrix-product throughput on the shapes of a BERT-base (b8 s128) and MiniLM (b32 s64)
//! training step: x·W, the weight gradient with a transposed left operand (dYᵀ·X) and a linear
//! layer's x·Wᵀ with W stored (out, in);
//! once through candle's matmul (the `gemm` crate) and once through `wick::ops::gemm` (what wick's
//! fused ops run: our AVX-512 or AVX2 kernel by the CPU's level).
//!
//! cargo bench --bench matmul -- [--reps N]
//! Threads: RAYON_NUM_THREADS. One JSON object a line: {"name": "1024x768x768", "gflops": ..}

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;

const SHAPES: [(usize, usize, usize); 7] =
    [(1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (2048, 2048, 2048)];

fn best_seconds(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> Result<()> {
    // Parallel ops run on this thread instead of a round trip to the pool's (see the function).
    wick::cpu::join_thread_pool();
    let mut reps = 10;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => reps = it.next().unwrap_or_default().parse()?,
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?} (expected --reps)"),
        }
    }
    eprintln!("{}", wick::cpu::describe());
    let dev = Device::Cpu;
    for (m, k, n) in SHAPES {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let at = Tensor::randn(0f32, 1.0, (k, m), &dev)?.t()?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let bt = Tensor::randn(0f32, 1.0, (n, k), &dev)?.t()?;
        let flops = 2.0 * (m * k * n) as f64;
        let threads = candle_core::utils::get_num_threads();
        // x·W, the weight gradient dYᵀ·X (lhsT) and a linear layer's x·Wᵀ with W stored (out, in)
        // (rhsT).
        let variants = [("", &a, false, &b, false), (" lhsT", &at, true, &b, false), (" rhsT", &a, false, &bt, true)];
        for (suffix, lhs, lhs_transposed, rhs, rhs_transposed) in variants {
            let name = format!("{m}x{k}x{n}{suffix}");
            let s = best_seconds(reps, || {
                lhs.matmul(rhs)?;
                Ok(())
            })?;
            println!("{}", serde_json::json!({"name": name, "impl": "candle matmul (gemm crate)", "threads": threads, "gflops": flops / s / 1e9}));
            // The same product on the same values, through wick's ops.
            let stored = |t: &Tensor, transposed: bool| -> Result<Vec<f32>> {
                let t = if transposed { t.t()?.contiguous()? } else { t.contiguous()? };
                Ok(t.flatten_all()?.to_vec1::<f32>()?)
            };
            let (lhs_values, rhs_values) = (stored(lhs, lhs_transposed)?, stored(rhs, rhs_transposed)?);
            let mut dst = vec![0f32; m * n];
            let s = best_seconds(reps, || Ok(wick::ops::gemm::matmul_f32(&mut dst, m, n, k, &lhs_values, lhs_transposed, &rhs_values, rhs_transposed)?))?;
            println!("{}", serde_json::json!({"name": name, "impl": wick::ops::gemm::kernel_name(), "threads": threads, "gflops": flops / s / 1e9}));
        }
    }
    Ok(())
}
