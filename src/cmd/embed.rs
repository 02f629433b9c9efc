//! `wick embed`: sentence embeddings (mean-pooled, normalised as sentence-transformers does for
//! all-MiniLM-L6-v2), for texts given as flags or one per line of a file.

use crate::cli::{self, ModelArgs, RunArgs};
use crate::embed::SentenceEmbedder;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use std::io::BufRead;
use std::path::PathBuf;

/// Turn texts into sentence embeddings with a BERT-family encoder (sentence-transformers
/// folders such as all-MiniLM-L6-v2: mean pooling, then L2 normalisation when the folder's
/// modules.json has a Normalize module).
///
/// With --json, stdout has one JSON array of floats per line, in input order, then one summary
/// object as the last line; otherwise one line per text with the vector's first values.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
#[command(mut_arg("model", |a| a.default_value("sentence-transformers/all-MiniLM-L6-v2").required(false)))]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A text to embed; repeatable.
    #[arg(long = "text")]
    pub texts: Vec<String>,
    /// A file with one text per line (`-` for stdin); empty lines are skipped.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, value_parser = cli::at_least_one)]
    pub batch_size: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let (device, dtype) = args.run.device_and_dtype(&[DType::F32])?;
    let mut texts = args.texts.clone();
    if let Some(path) = &args.input {
        texts.extend(read_lines(path)?);
    }
    if texts.is_empty() {
        bail!("nothing to embed: give --text TEXT (repeatable) or --input FILE");
    }
    let files = args.model.resolve(args.run.json).with_context(|| format!("cannot get the model {:?}", args.model.model))?;
    let embedder = SentenceEmbedder::load(&files, dtype, &device)?;
    let bar = super::progress_bar(texts.len(), "texts", args.run.json || texts.len() <= args.batch_size);
    let start = std::time::Instant::now();
    let mut truncated = 0;
    for chunk in texts.chunks(args.batch_size) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let embedded = embedder.embed(&refs)?;
        truncated += embedded.truncated;
        let vectors = embedded.vectors;
        bar.suspend(|| {
            for (text, v) in chunk.iter().zip(&vectors) {
                if args.run.json {
                    println!("{}", serde_json::json!(v));
                } else {
                    let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.4}")).collect();
                    println!("[{} … ] {} dims\t{text}", head.join(", "), v.len());
                }
            }
        });
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if truncated > 0 {
        eprintln!("note: {truncated} text(s) cut to {} tokens", embedder.max_len);
    }
    if args.run.json {
        let summary = serde_json::json!({
            "model": args.model.model,
            "rows": texts.len(),
            "dim": embedder.dim(),
            "normalized": embedder.normalize,
            "truncated": truncated,
            "seconds": start.elapsed().as_secs_f64(),
            "device": crate::device::device_name(&device),
        });
        println!("{summary}");
    }
    Ok(())
}

/// Non-empty lines of `path` (`-`: stdin), trailing whitespace removed.
fn read_lines(path: &std::path::Path) -> Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?))
    };
    let mut lines = vec![];
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {} is not UTF-8 text", path.display(), i + 1))?;
        let line = line.trim_end();
        if !line.is_empty() {
            lines.push(line.to_string());
        }
    }
    Ok(lines)
}
