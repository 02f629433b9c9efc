//! BERT speed, the same workloads as `scripts/bench_bert.py` (transformers); `scripts/bench_bert.sh`
//! runs both with the same threads and prints the ratios.
//!
//!   bert_base_forward_b8_s128  BertModel, BERT-base shape, inference, batch 8 × 128 tokens
//!   bert_base_train_b8_s128    BertForSequenceClassification (2 labels), BERT-base shape, one
//!                              training step (dropout on, cross-entropy, backward, AdamW)
//!   bert_base_forward_b8_s128_q8_0  the same forward with every linear layer in q8_0 (PyTorch's
//!                              twin: `quantize_dynamic` to int8 on the `nn.Linear`s)
//!   minilm_train_b32_s64       the same step, MiniLM-L6 shape, batch 32 × 64
//!
//! Random weights, random ids, no padding. `cargo bench --bench bert -- [--iters N] [--warmup W]
//! [--only NAME[,NAME...]] [--device D]`. Threads: RAYON_NUM_THREADS. One JSON object a line on stdout.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::time::Instant;
use wick::models::bert::{BertForSequenceClassification, Config};
use wick::quant::QuantType;
use wick::train::optim::{self, grads_of, OptimizerConfig};

struct Args {
    iters: usize,
    warmup: usize,
    only: Option<String>,
    device: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { iters: 10, warmup: 2, only: None, device: "cpu".into() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--iters" => args.iters = it.next().unwrap_or_default().parse()?,
            "--warmup" => args.warmup = it.next().unwrap_or_default().parse()?,
            "--only" => args.only = it.next(),
            "--device" => args.device = it.next().unwrap_or_default(),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?} (expected --iters, --warmup, --only, --device)"),
        }
    }
    Ok(args)
}

fn config(hidden: usize, layers: usize, intermediate: usize) -> Result<Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 12,
        "intermediate_size": intermediate, "max_position_embeddings": 512, "num_labels": 2,
    }))?)
}

/// Median milliseconds of `f` over `iters` runs after `warmup` runs.
fn time_ms(args: &Args, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..args.warmup {
        f()?;
    }
    let mut times: Vec<f64> = (0..args.iters)
        .map(|_| {
            let start = Instant::now();
            f().map(|_| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn run(name: &str, args: &Args, device: &Device, cfg: &Config, batch: usize, seq: usize, train: bool, quant: Option<QuantType>) -> Result<()> {
    if args.only.as_deref().is_some_and(|o| !o.split(',').any(|o| o == name)) {
        return Ok(());
    }
    let varmap = VarMap::new();
    let model = BertForSequenceClassification::load(wick::nn::var_builder(&varmap, DType::F32, device, 0), cfg)?;
    let ids = Tensor::rand(0f32, cfg.vocab_size as f32 - 1.0, (batch, seq), device)?.to_dtype(DType::U32)?;
    let mask = Tensor::ones((batch, seq), DType::U32, device)?;
    let types = Tensor::zeros((batch, seq), DType::U32, device)?;
    let labels = Tensor::zeros(batch, DType::U32, device)?;
    let ms = if train {
        let mut opt = OptimizerConfig::adamw(0.01).build(optim::params(&varmap, optim::is_bias_or_norm))?;
        let mut step = 0u64;
        time_ms(args, || {
            wick::nn::reseed(device, 0, step)?;
            step += 1;
            let logits = model.forward(&ids, Some(&mask), Some(&types), true)?;
            let loss = wick::nn::cross_entropy(&logits, &labels)?;
            let grads = grads_of(opt.params(), &loss.backward()?);
            opt.step(&grads, 5e-5)?;
            loss.to_scalar::<f32>()?;
            Ok(())
        })?
    } else {
        // Inference: plain tensors, so no autograd graph is built (as under torch.no_grad()).
        // (Detached from the variables, as tensors read from a checkpoint are.)
        let tensors = wick::train::checkpoint::varmap_tensors(&varmap)?.into_iter().map(|(name, t)| (name, t.detach())).collect();
        let mut frozen = BertForSequenceClassification::load(wick::weights::inference_var_builder(tensors, DType::F32, device), cfg)?;
        if let Some(q) = quant {
            wick::quant::quantize_model(&mut frozen.bert, q)?;
        }
        // As `wick predict` and `wick embed` run it (`WICK_PACK_WEIGHTS=0` to compare without).
        let packed = wick::pretrained::pack_for_inference(&mut frozen.bert, wick::ops::linear::Panels::ManyRows)?;
        eprintln!("{name}: {packed} linear layers packed for inference");
        time_ms(args, || {
            let out = frozen.bert.forward(&ids, Some(&mask), Some(&types), false)?;
            out.last_hidden_state.sum_all()?.to_scalar::<f32>()?;
            Ok(())
        })?
    };
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{}",
        serde_json::json!({
            "bench": name, "impl": "wick", "threads": threads, "ms": ms, "seq_per_s": batch as f64 * 1e3 / ms,
            "device": wick::device::device_name(device), "iters": args.iters, "isa": wick::cpu::isa().name(),
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    wick::cpu::join_thread_pool();
    let args = parse_args()?;
    eprintln!("{}", wick::cpu::describe());
    let device = wick::device::device(&args.device)?;
    let base = config(768, 12, 3072)?;
    let minilm = config(384, 6, 1536)?;
    run("bert_base_forward_b8_s128", &args, &device, &base, 8, 128, false, None)?;
    run("bert_base_forward_b8_s128_q8_0", &args, &device, &base, 8, 128, false, Some(QuantType::Q8_0))?;
    run("bert_base_train_b8_s128", &args, &device, &base, 8, 128, true, None)?;
    run("minilm_train_b32_s64", &args, &device, &minilm, 32, 64, true, None)?;
    Ok(())
}
