//! `wick generate`: continue prompts with a GPT-2 checkpoint (a Hub repo id, downloaded into the
//! HF cache, or a local folder saved by transformers or by `wick train gpt2`).

use crate::cli::{self, ModelArgs, RunArgs};
use crate::generate::{self, GenerationConfig};
use crate::models::gpt2::GPT2LMHeadModel;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// Generate text with GPT-2 (any GPT2LMHeadModel checkpoint: gpt2, gpt2-medium/large/xl,
/// distilgpt2, or a folder saved by transformers or `wick train gpt2`).
///
/// With one prompt the text is streamed to stdout as it is generated; with several they run as
/// one left-padded batch and are printed at the end. Speed (tokens/s) goes to stderr.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
#[command(mut_arg("model", |a| a.default_value("openai-community/gpt2").required(false)))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to continue; repeat the flag for a batch of prompts.
    #[arg(long, default_value = "Hello, I'm a language model,")]
    pub prompt: Vec<String>,
    /// Tokens to generate per prompt (fewer if EOS or a stop string comes first).
    #[arg(long, default_value_t = 50)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long, default_value_t = 1.0, value_parser = cli::non_negative)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// Nucleus sampling: only among the most likely tokens whose probabilities add up to P
    /// (0 < P ≤ 1; 1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = cli::probability)]
    pub top_p: f64,
    /// Penalise tokens already in the text (transformers' semantics; 1 = off, 1.2 is typical).
    #[arg(long, default_value_t = 1.0, value_parser = cli::positive)]
    pub repetition_penalty: f64,
    /// Stop a prompt's generation once its text contains this (non-empty) string; repeatable.
    #[arg(long, value_parser = cli::non_empty)]
    pub stop: Vec<String>,
    /// Keep going past the end-of-text token (for timing a fixed number of tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Save the logits of the (first) prompt, (1, tokens, vocab) f32, with its ids, to this
    /// safetensors file (to compare with another implementation: scripts/check_gpt2_export.py).
    #[arg(long)]
    pub save_logits: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // On the CPU f16/bf16 weights stay in their format and are widened inside the products.
    let (device, dtype) = args.run.device_and_dtype(&[DType::F32, DType::F16, DType::BF16])?;
    let files = args.model.resolve(args.run.json).with_context(|| format!("cannot get the model {:?}", args.model.model))?;
    let (mut model, cfg) = crate::pretrained::load::<GPT2LMHeadModel>(&files, dtype, &device)?;
    crate::pretrained::pack_for_inference(&mut model, crate::ops::linear::Panels::FewRows)?;
    let tokenizer = files.tokenizer()?;
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
        seed: args.run.seed,
    };
    let prompts: Vec<&str> = args.prompt.iter().map(String::as_str).collect();
    if prompts.is_empty() {
        bail!("no --prompt given");
    }
    let prompt_ids = generate::encode_prompts(&tokenizer, &prompts)?;

    if let Some(path) = &args.save_logits {
        let ids = Tensor::new(prompt_ids[0].as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.forward(&ids, None, None, None, false)?.to_dtype(DType::F32)?;
        let ids64 = ids.to_dtype(DType::I64)?;
        let tensors = [("logits", logits), ("input_ids", ids64)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        candle_core::safetensors::save(&tensors, path).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("saved the prompt's logits to {}", path.display());
    }

    let single = prompts.len() == 1;
    // The prompt is shown with the first streamed piece, so that a request the model refuses
    // (too long for its context) prints only the error.
    let mut prompt_shown = false;
    let mut stream = |_row: usize, piece: &str| {
        if !std::mem::replace(&mut prompt_shown, true) {
            print!("{}", prompts[0]);
        }
        print!("{piece}");
        let _ = std::io::stdout().flush();
    };
    let out = generate::generate(&model, &prompt_ids, &config, Some(&tokenizer), if single { Some(&mut stream) } else { None })?;
    if single {
        if !prompt_shown {
            print!("{}", prompts[0]);
        }
        println!();
    } else {
        for (i, (p, t)) in prompts.iter().zip(&out.texts).enumerate() {
            println!("[{i}] {p}{t}");
        }
    }
    let device_name = crate::device::device_name(&device);
    eprintln!(
        "{} new tokens in {:.2} s: {:.1} tokens/s ({:.1} tokens/s after the {:.0} ms prompt pass; {device_name}, {}, {} threads)",
        out.new_tokens,
        out.seconds,
        out.tokens_per_s,
        out.decode_tokens_per_s,
        out.prefill_seconds * 1e3,
        dtype.as_str(),
        rayon::current_num_threads()
    );
    if args.run.json {
        let pick = |v: serde_json::Value| if single { v[0].clone() } else { v };
        let summary = serde_json::json!({
            "model": args.model.model,
            "prompt": pick(serde_json::json!(prompts)),
            "prompt_ids": pick(serde_json::json!(out.prompt_ids)),
            "generated_ids": pick(serde_json::json!(out.generated_ids)),
            "text": pick(serde_json::json!(out.texts)),
            "finish_reason": pick(serde_json::json!(out.finish_reasons)),
            "new_tokens": out.new_tokens,
            "seconds": out.seconds,
            "tokens_per_s": out.tokens_per_s,
            "decode_tokens_per_s": out.decode_tokens_per_s,
            "device": device_name,
            "dtype": dtype.as_str(),
        });
        println!("{summary}");
    }
    Ok(())
}
