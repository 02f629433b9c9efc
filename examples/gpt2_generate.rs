//! Generate text with a GPT-2 checkpoint: a Hugging Face Hub repo id (downloaded into the HF
//! cache) or a local folder (transformers' `save_pretrained` layout, or `train_gpt2`'s output).
//!
//! cargo run --release --example gpt2_generate -- --prompt "Hello, my dog" [--model openai-community/gpt2]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use wick::generate::{self, GenerationConfig};
use wick::hub::HubOptions;
use wick::models::gpt2;

/// Generate text with GPT-2 (any GPT2LMHeadModel checkpoint: gpt2, gpt2-medium/large/xl,
/// distilgpt2, or a folder saved by transformers or train_gpt2).
///
/// With one prompt the text is streamed to stdout as it is generated; with several they run as
/// one left-padded batch and are printed at the end. Speed (tokens/s) goes to stderr.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A Hub repo id (e.g. openai-community/gpt2, distilbert/distilgpt2) or a local folder with
    /// config.json, the weights and the tokenizer files.
    #[arg(long, default_value = "openai-community/gpt2")]
    model: String,
    /// Branch, tag or commit of a Hub repo (default main).
    #[arg(long)]
    revision: Option<String>,
    /// Use only the local Hugging Face cache (as HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// The text to continue; repeat the flag for a batch of prompts.
    #[arg(long, default_value = "Hello, I'm a language model,")]
    prompt: Vec<String>,
    /// Tokens to generate per prompt (fewer if EOS or a stop string comes first).
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample only among the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling: only among the most likely tokens whose probabilities add up to P (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Penalise tokens already in the text (transformers' semantics; 1 = off, 1.2 is typical).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Stop a prompt's generation once its text contains this string; repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past the end-of-text token (for timing a fixed number of tokens).
    #[arg(long)]
    ignore_eos: bool,
    /// Seed of the sampler (same seed, same text).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to run: cpu, cuda, cuda:N, or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights' dtype: f32, f16, or bf16 (bf16 on CUDA only: candle has no bf16 matmul on the CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Save the logits of the (first) prompt, (1, tokens, vocab) f32, with its ids, to this
    /// safetensors file (to compare with another implementation: scripts/check_gpt2_export.py).
    #[arg(long)]
    save_logits: Option<PathBuf>,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    wick::keep_freed_memory();
    let args = Args::parse();
    let device = wick::device::device(&args.device)?;
    let dtype = wick::device::parse_dtype(&args.dtype)?;
    if device.is_cpu() && dtype == DType::BF16 {
        bail!("--dtype bf16 needs --device cuda: candle 0.11 has no bf16 matrix product on the CPU (use f32 or f16)");
    }
    if args.prompt.is_empty() {
        bail!("no --prompt given");
    }
    let options = HubOptions { offline: args.offline.then_some(true), quiet: args.json, ..Default::default() }.revision(args.revision.clone());
    let files = wick::hub::resolve(&args.model, &options).with_context(|| format!("cannot get the model {:?}", args.model))?;
    let model = gpt2::load_lm(&files, dtype, &device)?;
    let tokenizer = files.tokenizer()?;
    let cfg = model.config();
    let eos = cfg.eos_ids();
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        top_p: (args.top_p < 1.0).then_some(args.top_p),
        repetition_penalty: args.repetition_penalty,
        eos_token_ids: if args.ignore_eos { vec![] } else { eos.clone() },
        pad_token_id: cfg.pad_token_id.or(eos.first().copied()).unwrap_or(0),
        stop_strings: args.stop.clone(),
        seed: args.seed,
    };
    let prompts: Vec<&str> = args.prompt.iter().map(String::as_str).collect();
    let prompt_ids = generate::encode_prompts(&tokenizer, &prompts)?;

    if let Some(path) = &args.save_logits {
        let ids = Tensor::new(prompt_ids[0].as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.forward(&ids, None, None, None, false)?.to_dtype(DType::F32)?;
        let ids64 = ids.to_dtype(DType::I64)?;
        candle_core::safetensors::save(&[("logits", logits), ("input_ids", ids64)].into_iter().map(|(k, v)| (k.to_string(), v)).collect(), path)?;
        eprintln!("saved the prompt's logits to {}", path.display());
    }

    let single = prompts.len() == 1;
    let mut stdout = std::io::stdout();
    if single {
        print!("{}", prompts[0]);
        stdout.flush()?;
    }
    let mut stream = |_row: usize, piece: &str| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    };
    let out = generate::generate(&model, &prompt_ids, &config, Some(&tokenizer), if single { Some(&mut stream) } else { None })?;
    if single {
        println!();
    } else {
        for (i, (p, t)) in prompts.iter().zip(&out.texts).enumerate() {
            println!("[{i}] {p}{t}");
        }
    }
    eprintln!(
        "{} new tokens in {:.2} s: {:.1} tokens/s ({:.1} tokens/s after the {:.0} ms prompt pass; {}, {}, {} threads)",
        out.new_tokens,
        out.seconds,
        out.tokens_per_s,
        out.decode_tokens_per_s,
        out.prefill_seconds * 1e3,
        wick::device::device_name(&device),
        args.dtype,
        rayon::current_num_threads()
    );
    if args.json {
        let pick = |v: serde_json::Value| if single { v[0].clone() } else { v };
        let summary = serde_json::json!({
            "model": args.model,
            "prompt": pick(serde_json::json!(prompts)),
            "prompt_ids": pick(serde_json::json!(out.prompt_ids)),
            "generated_ids": pick(serde_json::json!(out.generated_ids)),
            "text": pick(serde_json::json!(out.texts)),
            "finish_reason": pick(serde_json::json!(out.finish_reasons)),
            "new_tokens": out.new_tokens,
            "seconds": out.seconds,
            "tokens_per_s": out.tokens_per_s,
            "decode_tokens_per_s": out.decode_tokens_per_s,
            "device": wick::device::device_name(&device),
            "dtype": args.dtype,
        });
        println!("{summary}");
    }
    Ok(())
}
