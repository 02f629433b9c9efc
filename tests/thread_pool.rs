//! `wick::cpu::join_thread_pool` on the main thread, as the `wick` command and the benches call
//! it: the thread becomes worker 0 of rayon's global pool, the fused ops give the reference's
//! numbers from it, and work that other threads hand the pool still runs. Its own binary with
//! no libtest harness, because the global pool is process-wide and libtest runs tests on threads
//! that end.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use wick::ops::linear::{linear, reference_linear, WeightLayout};

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn main() -> Result<()> {
    ensure!(wick::cpu::join_thread_pool(), "the global pool existed before main's first line");
    ensure!(rayon::current_thread_index() == Some(0), "main is not worker 0 of the pool");
    ensure!(!wick::cpu::join_thread_pool(), "a second call must change nothing");

    // A product big enough to be split over the pool, from main and from a thread outside it.
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (256, 384), &dev)?;
    let w = Tensor::randn(0f32, 0.05, (512, 384), &dev)?;
    let b = Tensor::randn(0f32, 1.0, 512, &dev)?;
    let expected = reference_linear(&x, &w, Some(&b), WeightLayout::OutIn)?;
    let on_main = linear(&x, &w, Some(&b), WeightLayout::OutIn)?;
    ensure!(max_diff(&on_main, &expected)? < 1e-4, "the product on main differs from the reference");
    let from_outside = std::thread::scope(|s| s.spawn(|| linear(&x, &w, Some(&b), WeightLayout::OutIn)).join().expect("the outside thread panicked"))?;
    ensure!(max_diff(&from_outside, &expected)? < 1e-4, "the product from another thread differs from the reference");
    println!("thread_pool: main thread is worker 0 of {} and the fused product matches from both sides", rayon::current_num_threads());
    Ok(())
}
