//! Greedy decoding speed of GPT-2 small's shape (n_embd 768, 12 layers, 12 heads, vocab 50257,
//! random weights): a 16-token prompt and 128 new tokens (never stopping early) per row, through
//! `wick::generate`, for batch 1 and batch 8 (8 prompts of the same length).
//! `scripts/bench_gpt2.py` runs the same in transformers; `scripts/bench_gpt2.sh` runs both and
//! prints them side by side.
//!
//! Decoding reads every weight once per step, so its speed limit is the memory bandwidth divided
//! by the bytes of weights per step: the bench measures the machine's read bandwidth (a sum over
//! a 1 GiB buffer on the rayon pool's threads, the best of 5) and prints that limit beside the
//! measured rates. On the CPU it measures the bandwidth again right before every timed run and
//! takes the limit from the median of those: on a shared VM it moved between 34 and 64 GB/s
//! from one minute to the next (an AMD EPYC, session 18), so a figure from the start of the
//! bench compared decoding with a moment it did not run in. `of_limit` is the median over the
//! runs of each run's decoding rate over the limit measured just before it.
//!
//! Each repetition runs every requested format once, one after another (in alternating order),
//! so that `decode_vs_f32`, a format's decoding rate over f32's, is the median of ratios taken
//! from runs next to each other: with the formats run one whole set after another, the same
//! binary's bf16 over f32 read anywhere from 1.47× to 2.01× (session 18).
//!
//! `--dtype q8_0,q4_0,q4_k,q6_k` quantizes every linear layer (LM head included) of the f32
//! model in memory (`wick::quant`), as `wick quantize` does; the limit then counts the
//! quantized bytes (scales included).
//!
//! cargo bench --bench gpt2_decode -- [--dtype f32,f16,bf16,q8_0,q4_0,q4_k] [--batch 1,8] [--reps N]
//!     [--new-tokens N] [--prompt N] [--device D]
//! Threads: RAYON_NUM_THREADS (default: all cores). `wick::cpu::describe()` and a table go to
//! stderr; one JSON object a line on stdout:
//! {"bench":"gpt2_greedy_b1_p16_n128","impl":"wick","dtype":"f32","batch":1,"threads":2,"tokens_per_s":..}
//! `tokens_per_s` is batch · new tokens / the median wall time of the generate call (prompt pass
//! included), as scripts/bench_gpt2.py measures it; `decode_tokens_per_s` leaves the prompt pass
//! out; `limit_tokens_per_s` = batch · bandwidth / weight bytes per step; `decode_vs_f32` (with
//! f32 among the formats) as above.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use wick::generate::{generate, GenerationConfig, GenerationOutput};
use wick::models::gpt2::{Config, GPT2LMHeadModel};
use wick::quant::{quantize_model, QuantType};

struct Args {
    dtypes: Vec<String>,
    batches: Vec<usize>,
    reps: usize,
    new_tokens: usize,
    prompt: usize,
    device: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { dtypes: vec!["f32".into(), "f16".into(), "bf16".into()], batches: vec![1, 8], reps: 3, new_tokens: 128, prompt: 16, device: "cpu".into() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dtype" => args.dtypes = it.next().unwrap_or_default().split(',').map(String::from).collect(),
            "--batch" => args.batches = it.next().unwrap_or_default().split(',').map(|b| b.parse()).collect::<Result<_, _>>()?,
            "--reps" => args.reps = it.next().unwrap_or_default().parse()?,
            "--new-tokens" => args.new_tokens = it.next().unwrap_or_default().parse()?,
            "--prompt" => args.prompt = it.next().unwrap_or_default().parse()?,
            "--device" => args.device = it.next().unwrap_or_default(),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?} (expected --dtype, --batch, --reps, --new-tokens, --prompt, --device)"),
        }
    }
    Ok(args)
}

/// GPT-2 small with seeded random weights (transformers' init), as plain (untracked) tensors.
fn random_gpt2(cfg: &Config, dtype: DType, device: &Device) -> Result<GPT2LMHeadModel> {
    let varmap = VarMap::new();
    GPT2LMHeadModel::load(wick::nn::var_builder(&varmap, DType::F32, &Device::Cpu, 0), cfg)?;
    let tensors = wick::train::checkpoint::varmap_tensors(&varmap)?
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect();
    Ok(GPT2LMHeadModel::load(wick::weights::inference_var_builder(tensors, dtype, device), cfg)?)
}

/// Bytes of weight matrices a decoding step reads: every layer's four products and the tied LM
/// head (biases, LayerNorms and the two embedding rows are negligible), at `bytes_per_weight`.
fn weight_bytes_per_step(cfg: &Config, bytes_per_weight: f64) -> f64 {
    let (h, inner) = (cfg.n_embd, cfg.inner_size());
    let per_layer = h * 3 * h + h * h + h * inner + inner * h;
    (cfg.n_layer * per_layer + cfg.vocab_size * h) as f64 * bytes_per_weight
}

/// The model in `name`'s format: a dtype, or f32 with its linear layers quantized.
fn model_in(cfg: &Config, name: &str, device: &Device) -> Result<(GPT2LMHeadModel, f64)> {
    if let Some(qtype) = QuantType::parse(name) {
        let mut model = random_gpt2(cfg, DType::F32, device)?;
        quantize_model(&mut model, qtype)?;
        // q4_0 layers gain their decoding layout, as in `wick generate`.
        wick::pretrained::pack_for_inference(&mut model, wick::ops::linear::Panels::FewRows)?;
        return Ok((model, qtype.bytes_per_weight()));
    }
    let dtype = wick::device::parse_dtype(name)?;
    let mut model = random_gpt2(cfg, dtype, device)?;
    // As `wick generate` and `wick serve` run it (`WICK_PACK_WEIGHTS=0` to compare without).
    wick::pretrained::pack_for_inference(&mut model, wick::ops::linear::Panels::FewRows)?;
    Ok((model, dtype.size_in_bytes() as f64))
}

/// The median of `v` (sorted in place; NaN for none).
fn median_of(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    wick::cpu::join_thread_pool();
    let args = parse_args()?;
    let device = wick::device::device(&args.device)?;
    let threads = rayon::current_num_threads();
    eprintln!("{}", wick::cpu::describe());
    let bandwidth = if device.is_cpu() { wick::cpu::read_bandwidth() } else { f64::NAN };
    eprintln!("read bandwidth ({threads} threads): {:.1} GB/s", bandwidth / 1e9);
    let cfg = Config::new(50257, 1024, 768, 12, 12);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let prompts: Vec<Vec<u32>> = (0..max_batch).map(|_| (0..args.prompt).map(|_| rng.random_range(0..50257)).collect()).collect();
    let config = GenerationConfig { max_new_tokens: args.new_tokens, ..GenerationConfig::greedy(args.new_tokens) };
    // Every format's model is built first, so that each repetition runs them all one after
    // another (in alternating order): a format's rate over f32's is then taken from runs
    // minutes apart at most, not from two ends of the bench while the bandwidth drifts.
    let mut models = vec![];
    for dtype_name in &args.dtypes {
        match model_in(&cfg, dtype_name, &device) {
            Ok((model, bytes_per_weight)) => models.push((dtype_name.clone(), model, weight_bytes_per_step(&cfg, bytes_per_weight))),
            Err(e) => eprintln!("skipping {dtype_name}: {}", e.to_string().lines().next().unwrap_or_default()),
        }
    }
    eprintln!("{:6} {:>5} {:>10} {:>13} {:>12} {:>9}", "dtype", "batch", "tok/s", "decode tok/s", "limit tok/s", "of limit");
    for &batch in &args.batches {
        let rows = &prompts[..batch];
        for (_, model, _) in &models {
            // Warm-up (allocator, caches, CUDA kernels).
            generate(model, rows, &GenerationConfig { max_new_tokens: 8, ..config.clone() }, None, None)?;
        }
        // runs[i]: model i's (output, bandwidth just before it), one a repetition.
        let mut runs: Vec<Vec<(GenerationOutput, f64)>> = models.iter().map(|_| vec![]).collect();
        for rep in 0..args.reps {
            let order: Vec<usize> = if rep % 2 == 0 { (0..models.len()).collect() } else { (0..models.len()).rev().collect() };
            for i in order {
                let bw = if device.is_cpu() { wick::cpu::read_bandwidth() } else { bandwidth };
                let out = generate(&models[i].1, rows, &config, None, None)?;
                assert_eq!(out.new_tokens, batch * args.new_tokens);
                runs[i].push((out, bw));
            }
        }
        let f32_runs = models.iter().position(|(name, _, _)| name == "f32").map(|i| &runs[i]);
        for ((dtype_name, _, bytes), runs) in models.iter().zip(&runs) {
            let mut of_limit: Vec<f64> = runs.iter().map(|(out, bw)| out.decode_tokens_per_s / (batch as f64 * bw / bytes)).collect();
            let bandwidths: Vec<f64> = runs.iter().map(|r| r.1).collect();
            // This format's decoding rate over f32's in the same repetition, the median of those.
            let vs_f32 = f32_runs.filter(|_| dtype_name != "f32").map(|f32_runs| {
                let mut ratios: Vec<f64> = runs.iter().zip(f32_runs).map(|(a, b)| a.0.decode_tokens_per_s / b.0.decode_tokens_per_s).collect();
                median_of(&mut ratios)
            });
            let mut by_time: Vec<&GenerationOutput> = runs.iter().map(|r| &r.0).collect();
            by_time.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
            let median = by_time[by_time.len() / 2];
            let bw = median_of(&mut bandwidths.clone());
            let limit = batch as f64 * bw / bytes;
            let of_limit = median_of(&mut of_limit);
            eprintln!(
                "{dtype_name:6} {batch:>5} {:>10.1} {:>13.1} {:>12.1} {:>8.0}%   (read bandwidth {:.1}–{:.1} GB/s){}",
                median.tokens_per_s,
                median.decode_tokens_per_s,
                limit,
                100.0 * of_limit,
                bandwidths.iter().copied().fold(f64::INFINITY, f64::min) / 1e9,
                bandwidths.iter().copied().fold(0.0, f64::max) / 1e9,
                vs_f32.map_or(String::new(), |r| format!("  {r:.2}× f32 (paired runs)")),
            );
            let mut line = serde_json::json!({
                "bench": format!("gpt2_greedy_b{batch}_p{}_n{}", args.prompt, args.new_tokens),
                "impl": "wick",
                "dtype": dtype_name,
                "batch": batch,
                "threads": threads,
                "device": wick::device::device_name(&device),
                "tokens_per_s": median.tokens_per_s,
                "ms_per_token": median.seconds / (batch * args.new_tokens) as f64 * 1e3,
                "decode_tokens_per_s": median.decode_tokens_per_s,
                "decode_tokens_per_s_each_run": runs.iter().map(|r| r.0.decode_tokens_per_s).collect::<Vec<_>>(),
                "prefill_seconds": median.prefill_seconds,
                "read_bandwidth_gb_s": bw / 1e9,
                "read_bandwidth_gb_s_each_run": bandwidths.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
                "weight_bytes_per_step": bytes,
                "limit_tokens_per_s": limit,
                "of_limit": of_limit,
                "decode_vs_f32": vs_f32,
                "runs": args.reps,
            });
            if let (Some(o), serde_json::Value::Object(cpu)) = (line.as_object_mut(), wick::cpu::describe_json()) {
                o.extend(cpu);
            }
            println!("{line}");
        }
    }
    Ok(())
}
