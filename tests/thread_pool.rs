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

/// GPT-2 with 2 layers of width 32, seeded random weights.
fn tiny_gpt2() -> Result<wick::models::gpt2::GPT2LMHeadModel> {
    let varmap = candle_nn::VarMap::new();
    let cfg = wick::models::gpt2::Config::new(50, 16, 32, 2, 2);
    Ok(wick::models::gpt2::GPT2LMHeadModel::load(wick::nn::var_builder(&varmap, candle_core::DType::F32, &Device::Cpu, 7), &cfg)?)
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

    // A decoding step from main runs right on main (its own pool, no hand-over to candle's);
    // from a thread outside any pool it is handed to candle's. Both give the same logits.
    let main_id = std::thread::current().id();
    ensure!(wick::ops::on_cpu_pool(&dev, || std::thread::current().id()) == main_id, "a step from main left the main thread");
    let model = tiny_gpt2()?;
    let decode = || -> Result<Tensor> {
        let mut cache = model.new_cache(8);
        let ids = Tensor::new(&[[3u32, 14, 15, 9]], &dev)?;
        model.forward_last(&ids, None, None, Some(&mut cache))?;
        Ok(model.forward_last(&Tensor::new(&[[26u32]], &dev)?, None, None, Some(&mut cache))?)
    };
    let (here, outside) = (decode()?, std::thread::scope(|s| s.spawn(decode).join().expect("the outside thread panicked"))?);
    ensure!(max_diff(&here, &outside)? < 1e-5, "a decoding step from main differs from one handed to candle's pool");
    println!("thread_pool: main thread is worker 0 of {} and the fused product and a decoding step match from both sides", rayon::current_num_threads());
    Ok(())
}
