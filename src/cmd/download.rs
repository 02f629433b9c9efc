//! `wick download`: fetch a Hub repo's model files into the Hugging Face cache, as
//! `huggingface-cli download` does, so later commands (and Python) find them offline.

use crate::cli::ModelArgs;
use anyhow::{bail, Result};
use clap::Args;

/// Download a model (config, weights, tokenizer files) from the Hugging Face Hub into the HF
/// cache ($HF_HOME/hub, default ~/.cache/huggingface/hub); prints the folder it is in.
///
/// HF_TOKEN is used for private and gated repos, HF_ENDPOINT for a mirror.
#[derive(Args, Debug)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object instead of text (and no download progress bar).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DownloadArgs) -> Result<()> {
    if std::path::Path::new(&args.model.model).exists() {
        bail!("{} is a local path: there is nothing to download (give a Hub repo id like openai-community/gpt2)", args.model.model);
    }
    if args.model.offline {
        bail!("--offline and download contradict each other");
    }
    let files = args.model.resolve(args.json)?;
    let info = super::info::describe(&args.model.model, &files)?;
    if args.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!("{}", files.dir.display());
        eprintln!("{} ({:.1} MB of weights) is in the cache", args.model.model, info.size_on_disk as f64 / 1e6);
    }
    Ok(())
}
