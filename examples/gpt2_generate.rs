//! Generate text with GPT-2 through the library: resolve a model (Hub id or folder), load it,
//! stream a continuation. The full-featured command is `wick generate`.
//!
//! cargo run --release --example gpt2_generate -- [MODEL] [PROMPT]
//! (MODEL defaults to openai-community/gpt2, downloaded into the Hugging Face cache)

use anyhow::Result;
use std::io::Write;
use wick::generate::{generate_text, GenerationConfig};
use wick::hub::{self, HubOptions};
use wick::models::gpt2::GPT2LMHeadModel;

fn main() -> Result<()> {
    // Parallel ops run on this thread instead of a round trip to the pool's (see the function).
    wick::cpu::join_thread_pool();
    let mut args = std::env::args().skip(1);
    let model_id = args.next().unwrap_or_else(|| "openai-community/gpt2".into());
    let prompt = args.next().unwrap_or_else(|| "Hello, I'm a language model,".into());

    let device = wick::device::device("auto")?;
    let files = hub::resolve(&model_id, &HubOptions::default())?;
    let (model, config) = wick::pretrained::load::<GPT2LMHeadModel>(&files, candle_core::DType::F32, &device)?;
    let tokenizer = files.tokenizer()?;

    // Greedy decoding, 40 new tokens, stopping at GPT-2's end-of-text token.
    let generation = GenerationConfig { eos_token_ids: config.eos_ids(), ..GenerationConfig::greedy(40) };
    print!("{prompt}");
    let mut show = |_row: usize, piece: &str| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    };
    let out = generate_text(&model, &tokenizer, &[prompt.as_str()], &generation, Some(&mut show))?;
    println!();
    eprintln!("{} tokens, {:.1} tokens/s", out.new_tokens, out.tokens_per_s);
    Ok(())
}
