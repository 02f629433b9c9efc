//! `wick quantize`: a model folder (or Hub id) → a quantized model folder (`config.json`, the
//! tokenizer files and `model.gguf`) that `generate`, `predict`, `embed` and `info` load like
//! any other. The work is [`crate::quant::folder::quantize_folder`].

use crate::cli::ModelArgs;
use crate::quant::QuantType;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Quantize every linear layer of a GPT-2 or BERT model to 8, 6 or 4 bits (GGUF), for faster,
/// smaller inference on the CPU.
///
/// Embeddings are stored in f16, biases and LayerNorms in f32; GPT-2's LM head is quantized as a
/// tensor of its own. A layer's input width must be a multiple of the type's block (32 for
/// q8_0/q4_0, 256 for q4_k/q6_k): MiniLM (384 wide) takes only q8_0 and q4_0. Quantized models
/// are for inference only.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Weight format: q8_0 (8.5 bits a weight), q4_0 (4.5), q4_k (4.5, 256-blocks), q6_k (6.56, 256-blocks).
    #[arg(long = "type", value_enum)]
    pub qtype: QuantType,
    /// The folder to write (created if needed; not the model's own folder). Not the shared
    /// training `--output` flag: there is nothing to resume.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let files = args.model.resolve(args.json).with_context(|| format!("cannot get the model {:?}", args.model.model))?;
    let report = crate::quant::folder::quantize_folder(&files, args.qtype, &args.output)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{} → {}: {} linear layers ({:.2} M weights) in {}, weights {:.1} MB → {:.1} MB",
        args.model.model,
        report.output,
        report.layers,
        report.quantized_weights as f64 / 1e6,
        report.quantization,
        report.bytes_before as f64 / 1e6,
        report.bytes_after as f64 / 1e6
    );
    Ok(())
}
