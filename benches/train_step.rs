//! Training-step throughput of wick on the three workloads of `scripts/bench_pytorch.py`, which
//! runs the same ones in PyTorch; `scripts/bench_compare.sh` runs both and prints the ratios.
//!
//!   mlp    MLP 784-512-256-10 (ReLU), batch 128, cross-entropy, Adam(lr=1e-3)
//!   lenet  LeNet-5 on (128, 1, 28, 28), cross-entropy, Adam(lr=1e-3)
//!   lstm   char LM: embedding 65×64 → LSTM 256 → linear 65, batch 32, seq 100, Adam(lr=2e-3)
//!
//! cargo bench --bench train_step -- [--seconds S] [--warmup W] [--only NAME] [--device D]
//! Threads: RAYON_NUM_THREADS (default: all cores). One JSON object a line on stdout.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use std::time::Instant;
use wick::models::cnn::{LeNet5, LeNetConfig};
use wick::models::mlp::{Mlp, MlpConfig};
use wick::models::rnn::{Cell, CharRnn, CharRnnConfig};
use wick::train::optim::{self, grads_of, OptimizerConfig};

struct Args {
    seconds: f64,
    warmup: usize,
    only: Option<String>,
    device: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { seconds: 10.0, warmup: 5, only: None, device: "cpu".into() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => args.seconds = it.next().unwrap_or_default().parse()?,
            "--warmup" => args.warmup = it.next().unwrap_or_default().parse()?,
            "--only" => args.only = it.next(),
            "--device" => args.device = it.next().unwrap_or_default(),
            "--bench" => {} // passed by `cargo bench`
            other => anyhow::bail!("unknown argument {other:?} (expected --seconds, --warmup, --only, --device)"),
        }
    }
    Ok(args)
}

/// Times full training steps (forward, loss, backward, Adam update) for at least `seconds`.
fn bench(name: &str, args: &Args, device: &Device, net: &dyn ModuleT, varmap: &VarMap, x: &Tensor, y: &Tensor, lr: f64) -> Result<()> {
    let mut opt = OptimizerConfig::adam().build(optim::params(varmap, |_| false))?;
    let mut step = || -> Result<f32> {
        let loss = wick::nn::cross_entropy(&net.forward_t(x, true)?, y)?;
        let value = loss.to_scalar::<f32>()?; // also waits for the device
        let grads = grads_of(opt.params(), &loss.backward()?);
        opt.step(&grads, lr)?;
        Ok(value)
    };
    for _ in 0..args.warmup {
        step()?;
    }
    let start = Instant::now();
    let mut steps = 0;
    while steps < 10 || start.elapsed().as_secs_f64() < args.seconds {
        step()?;
        steps += 1;
    }
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let batch = x.dim(0)?;
    println!(
        "{}",
        serde_json::json!({"name": name, "framework": "wick", "threads": candle_core::utils::get_num_threads(),
            "device": wick::device::device_name(device), "samples_per_s": (steps * batch) as f64 / secs,
            "step_ms": secs * 1e3 / steps as f64, "steps": steps, "isa": wick::cpu::isa().name()})
    );
    Ok(())
}

/// 128 class ids cycling through 0..10.
fn labels(device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec((0..128u32).map(|i| i % 10).collect::<Vec<_>>(), 128, device)?)
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    wick::cpu::join_thread_pool();
    let args = parse_args()?;
    eprintln!("{}", wick::cpu::describe());
    let device = wick::device::device(&args.device)?;
    let wanted = |n: &str| args.only.as_deref().is_none_or(|o| o == n);
    if wanted("mlp") {
        let varmap = VarMap::new();
        let net = Mlp::load(wick::nn::var_builder(&varmap, DType::F32, &device, 0), &MlpConfig::new(784, &[512, 256], 10))?;
        let x = Tensor::randn(0f32, 1.0, (128, 784), &device)?;
        let y = labels(&device)?;
        bench("mlp", &args, &device, &net, &varmap, &x, &y, 1e-3)?;
    }
    if wanted("lenet") {
        let varmap = VarMap::new();
        let net = LeNet5::load(wick::nn::var_builder(&varmap, DType::F32, &device, 0), &LeNetConfig::default())?;
        let x = Tensor::randn(0f32, 1.0, (128, 1, 28, 28), &device)?;
        let y = labels(&device)?;
        bench("lenet", &args, &device, &net, &varmap, &x, &y, 1e-3)?;
    }
    if wanted("lstm") {
        let varmap = VarMap::new();
        let net = CharRnn::load(wick::nn::var_builder(&varmap, DType::F32, &device, 0), &CharRnnConfig::new(Cell::Lstm, 65, 64, 256, 1))?;
        let ids: Vec<u32> = (0..32 * 101).map(|i| (i * 7919 % 65) as u32).collect();
        let ids = Tensor::from_vec(ids, (32, 101), &device)?;
        let (x, y) = (ids.narrow(1, 0, 100)?.contiguous()?, ids.narrow(1, 1, 100)?.contiguous()?);
        bench("lstm", &args, &device, &net, &varmap, &x, &y, 2e-3)?;
    }
    Ok(())
}
