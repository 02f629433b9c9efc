//! Greedy decoding speed of GPT-2 small's shape (n_embd 768, 12 layers, 12 heads, vocab 50257,
//! random weights): batch 1, a 16-token prompt, 128 new tokens (never stopping early), through
//! `wick::generate`. `scripts/bench_gpt2.py` runs the same in transformers; `scripts/bench_gpt2.sh`
//! runs both and prints the ratio.
//!
//! cargo bench --bench gpt2_decode -- [--dtype f32,f16,bf16] [--reps N] [--new-tokens N] [--device D]
//! Threads: RAYON_NUM_THREADS (default: all cores). One JSON object a line on stdout:
//! {"bench":"gpt2_greedy_b1_p16_n128","impl":"wick","dtype":"f32","threads":2,"tokens_per_s":..}
//! `tokens_per_s` is new tokens / the median wall time of the generate call (prompt pass included),
//! as scripts/bench_gpt2.py measures it.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use wick::generate::{generate, GenerationConfig};
use wick::models::gpt2::{Config, GPT2LMHeadModel};

struct Args {
    dtypes: Vec<String>,
    reps: usize,
    new_tokens: usize,
    prompt: usize,
    device: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { dtypes: vec!["f32".into(), "f16".into(), "bf16".into()], reps: 3, new_tokens: 128, prompt: 16, device: "cpu".into() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dtype" => args.dtypes = it.next().unwrap_or_default().split(',').map(String::from).collect(),
            "--reps" => args.reps = it.next().unwrap_or_default().parse()?,
            "--new-tokens" => args.new_tokens = it.next().unwrap_or_default().parse()?,
            "--prompt" => args.prompt = it.next().unwrap_or_default().parse()?,
            "--device" => args.device = it.next().unwrap_or_default(),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?} (expected --dtype, --reps, --new-tokens, --prompt, --device)"),
        }
    }
    Ok(args)
}

/// GPT-2 small with seeded random weights (transformers' init), as plain (untracked) tensors.
fn random_gpt2(dtype: DType, device: &Device) -> Result<GPT2LMHeadModel> {
    let cfg = Config::new(50257, 1024, 768, 12, 12);
    let varmap = VarMap::new();
    GPT2LMHeadModel::load(wick::nn::var_builder(&varmap, DType::F32, &Device::Cpu, 0), &cfg)?;
    let tensors = wick::train::checkpoint::varmap_tensors(&varmap)?
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect();
    Ok(GPT2LMHeadModel::load(wick::hub::inference_var_builder(tensors, dtype, device), &cfg)?)
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    let args = parse_args()?;
    let device = wick::device::device(&args.device)?;
    let threads = rayon::current_num_threads();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let prompt: Vec<u32> = (0..args.prompt).map(|_| rng.random_range(0..50257)).collect();
    let config = GenerationConfig { max_new_tokens: args.new_tokens, ..GenerationConfig::greedy(args.new_tokens) };
    for dtype_name in &args.dtypes {
        let dtype = wick::device::parse_dtype(dtype_name)?;
        let model = match random_gpt2(dtype, &device) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("skipping {dtype_name}: {}", e.to_string().lines().next().unwrap_or_default());
                continue;
            }
        };
        // Warm-up (allocator, caches, CUDA kernels).
        generate(&model, std::slice::from_ref(&prompt), &GenerationConfig { max_new_tokens: 8, ..config.clone() }, None, None)?;
        let mut runs = vec![];
        for _ in 0..args.reps {
            let out = generate(&model, std::slice::from_ref(&prompt), &config, None, None)?;
            assert_eq!(out.new_tokens, args.new_tokens);
            runs.push(out);
        }
        runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        let median = &runs[runs.len() / 2];
        println!(
            "{}",
            serde_json::json!({
                "bench": format!("gpt2_greedy_b1_p{}_n{}", args.prompt, args.new_tokens),
                "impl": "wick",
                "dtype": dtype_name,
                "threads": threads,
                "device": wick::device::device_name(&device),
                "tokens_per_s": median.tokens_per_s,
                "ms_per_token": median.seconds / args.new_tokens as f64 * 1e3,
                "decode_tokens_per_s": median.decode_tokens_per_s,
                "prefill_seconds": median.prefill_seconds,
                "runs": args.reps,
            })
        );
    }
    Ok(())
}
