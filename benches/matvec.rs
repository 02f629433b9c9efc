//! Weight-bandwidth of the products decoding runs (`ops::matvec`): one or a few rows times each
//! of GPT-2-small's weight shapes, with the weight stored as f32, f16, bf16 or a quantized type,
//! or packed for inference as `wick generate` holds them (`f32-packed`: f32 in the product's
//! panels; `q4_0-packed`: q4_0 in the decoding layout on AVX-512 VNNI),
//! in both layouts the models use ((in, out) for GPT-2's Conv1D, (out, in) for Linear and the LM
//! head). Each product reads its whole weight once, so its speed is the GB/s of weight it
//! reads; the bench prints that beside the machine's read bandwidth (the limit), measured the
//! same way the decoding bench does. Enough copies of each weight are cycled that none stays in
//! cache between calls.
//!
//! cargo bench --bench matvec -- [--dtype f32,f32-packed,f16,bf16,q8_0,q4_0,q4_0-packed] [--rows 1,8] [--layers lm_head,mlp.c_fc] [--reps N]
//! Threads: RAYON_NUM_THREADS. One JSON object a line.

use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;
use wick::ops::linear::{Dense, WeightLayout};

/// (in, out) of GPT-2-small's linear layers, and its LM head; the MLP's two also stored
/// transposed (`.T`, the (out, in) layout), to compare the two layouts' kernels on one shape.
const SHAPES: [(&str, usize, usize, WeightLayout); 7] = [
    ("attn.c_attn", 768, 2304, WeightLayout::InOut),
    ("attn.c_proj", 768, 768, WeightLayout::InOut),
    ("mlp.c_fc", 768, 3072, WeightLayout::InOut),
    ("mlp.c_proj", 3072, 768, WeightLayout::InOut),
    ("lm_head", 768, 50257, WeightLayout::OutIn),
    ("mlp.c_fc.T", 768, 3072, WeightLayout::OutIn),
    ("mlp.c_proj.T", 3072, 768, WeightLayout::OutIn),
];

/// Weight bytes cycled per shape: past the last-level cache of any current CPU.
const CYCLE_BYTES: usize = 256 << 20;

fn layer(d_in: usize, d_out: usize, layout: WeightLayout, dtype: &str, dev: &Device) -> Result<(Dense, usize)> {
    let shape = match layout {
        WeightLayout::InOut => (d_in, d_out),
        WeightLayout::OutIn => (d_out, d_in),
    };
    let w = Tensor::randn(0f32, 0.02, shape, dev)?;
    let mut dense = Dense::new(w, None, layout);
    // "-packed": the weight as `wick generate` holds it, packed for inference once.
    let (dtype, packed) = match dtype.strip_suffix("-packed") {
        Some(base) => (base, true),
        None => (dtype, false),
    };
    let bytes = match wick::quant::QuantType::parse(dtype) {
        Some(q) => {
            let qw = wick::quant::quantize_weight(&dense, q)?;
            let bytes = qw.storage_size_in_bytes();
            dense.set_quantized(std::sync::Arc::new(qw))?;
            bytes
        }
        None if dtype == "f32" => d_in * d_out * 4,
        None => {
            let dt = wick::device::parse_dtype(dtype)?;
            dense = Dense::new(dense.weight.to_dtype(dt)?, None, layout);
            d_in * d_out * dt.size_in_bytes()
        }
    };
    if packed {
        anyhow::ensure!(dense.pack_for_inference(wick::ops::linear::Panels::FewRows)?, "this CPU has no packed product for {dtype} weights of shape {shape:?}");
    }
    Ok((dense, bytes))
}

fn main() -> Result<()> {
    // Parallel ops run on this thread instead of a round trip to the pool's (see the function).
    wick::cpu::join_thread_pool();
    let (mut dtypes, mut rows, mut reps) = (vec!["f32".to_string(), "f16".into(), "bf16".into()], vec![1usize, 8], 20usize);
    let mut layers_wanted: Option<Vec<String>> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dtype" => dtypes = it.next().unwrap_or_default().split(',').map(String::from).collect(),
            "--rows" => rows = it.next().unwrap_or_default().split(',').map(|r| r.parse()).collect::<Result<_, _>>()?,
            "--reps" => reps = it.next().unwrap_or_default().parse()?,
            "--layers" => layers_wanted = Some(it.next().unwrap_or_default().split(',').map(String::from).collect()),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?} (expected --dtype, --rows, --layers, --reps)"),
        }
    }
    eprintln!("{}", wick::cpu::describe());
    let bandwidth = wick::cpu::read_bandwidth();
    eprintln!("read bandwidth ({} threads): {:.1} GB/s", rayon::current_num_threads(), bandwidth / 1e9);
    let dev = Device::Cpu;
    for dtype in &dtypes {
        for &(name, d_in, d_out, layout) in &SHAPES {
            if layers_wanted.as_ref().is_some_and(|l| !l.iter().any(|w| w == name)) {
                continue;
            }
            let (first, bytes) = layer(d_in, d_out, layout, dtype, &dev)?;
            let cycle = std::env::var("MATVEC_CYCLE_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(CYCLE_BYTES);
            let copies = cycle.div_ceil(bytes).max(2);
            let mut layers = vec![first];
            for _ in 1..copies {
                layers.push(layer(d_in, d_out, layout, dtype, &dev)?.0);
            }
            for &m in &rows {
                let x = Tensor::randn(0f32, 1.0, (m, d_in), &dev)?;
                // On the pool that decoding runs its steps on, with its threads kept awake
                // between products as there (`ops::on_cpu_pool`).
                let run = |n: usize| -> Result<f64> {
                    wick::ops::on_cpu_pool(&dev, || {
                        let start = Instant::now();
                        for l in layers.iter().cycle().take(n) {
                            std::hint::black_box(candle_core::Module::forward(l, &x)?);
                        }
                        Ok(start.elapsed().as_secs_f64() / n as f64)
                    })
                };
                run(copies)?;
                let seconds = (0..3).map(|_| run(reps.max(copies))).collect::<Result<Vec<_>>>()?.into_iter().fold(f64::INFINITY, f64::min);
                let gbs = bytes as f64 / seconds / 1e9;
                println!(
                    "{}",
                    serde_json::json!({"bench": "matvec", "layer": name, "in": d_in, "out": d_out, "layout": format!("{layout:?}"), "dtype": dtype,
                        "rows": m, "us": seconds * 1e6, "weight_gb_s": gbs, "of_bandwidth": gbs * 1e9 / bandwidth, "threads": rayon::current_num_threads(), "cpu": wick::cpu::describe_json()})
                );
                eprintln!("{dtype:5} {name:12} {layout:?} rows {m}: {:8.1} us  {gbs:6.1} GB/s  {:4.0}% of read bandwidth", seconds * 1e6, gbs * 1e9 / bandwidth * 100.0);
            }
        }
    }
    Ok(())
}
