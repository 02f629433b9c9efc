//! `wick serve`: models behind an OpenAI-compatible HTTP server (see [`crate::serve`]).

use crate::cli::{self, ModelArgs, RunArgs};
use crate::serve::{ModelSpec, ServeOptions, Server};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use std::path::Path;
use std::time::Duration;

/// Serve models over HTTP with OpenAI's API, so that OpenAI's client libraries work unchanged:
/// GPT-2 models answer POST /v1/completions (continuous batching: concurrent requests share
/// decoding steps), BERT models POST /v1/embeddings, and BERT classifiers also POST
/// /v1/classify (concurrent requests share forward passes). Also GET /v1/models, /health and
/// /metrics (Prometheus).
///
/// It stops on SIGTERM or ctrl-c: no new connections, requests in flight are finished.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct ServeArgs {
    /// A model to serve: a Hub repo id or a local folder; repeatable. `ID@REV` serves a Hub
    /// branch, tag or commit (default: main). Its id in the API is the Hub id (without @REV),
    /// or the folder's name.
    #[arg(long = "model", value_name = "ID[@REV]|DIR", required = true)]
    pub models: Vec<String>,
    /// Use only files already in the Hugging Face cache; never touch the network.
    #[arg(long)]
    pub offline: bool,
    /// The address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free one; the address is printed on startup).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (default: the
    /// WICK_API_KEY environment variable; none: no key needed).
    #[arg(long, value_name = "KEY", value_parser = cli::non_empty)]
    pub api_key: Option<String>,
    /// Requests waiting per model at most; past it, 503 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = cli::at_least_one)]
    pub queue_size: usize,
    /// Completions decoding together at most (the others wait at the front of the queue).
    #[arg(long, default_value_t = 64, value_parser = cli::at_least_one)]
    pub max_batch: usize,
    /// Texts per embedding or classification forward pass at most.
    #[arg(long, default_value_t = 64, value_parser = cli::at_least_one)]
    pub encoder_batch: usize,
    /// Milliseconds an encoder batch waits for requests already arriving (0: never waits).
    #[arg(long, default_value_t = 5.0, value_parser = cli::non_negative)]
    pub batch_wait_ms: f64,
    /// Request bodies larger than this many bytes are refused (413).
    #[arg(long, default_value_t = 4 << 20, value_parser = cli::at_least_one)]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

/// The API id of a `--model` value and where to get it: a local folder (its name), or a Hub id
/// with an optional `@REV` (a folder whose name has an `@` is still a folder).
fn model_source(name: &str, offline: bool) -> Result<(String, ModelArgs)> {
    let folder = Path::new(name);
    if folder.is_dir() {
        let id = folder.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| name.into());
        return Ok((id, ModelArgs { offline, ..ModelArgs::new(name) }));
    }
    let (repo, revision) = match name.rsplit_once('@') {
        Some((repo, rev)) if repo.is_empty() || rev.is_empty() => bail!("--model {name:?}: give ID@REV with both parts (like openai-community/gpt2@main)"),
        Some((repo, rev)) => (repo, Some(rev.to_string())),
        None => (name, None),
    };
    Ok((repo.into(), ModelArgs { revision, offline, ..ModelArgs::new(repo) }))
}

pub fn run(args: ServeArgs) -> Result<()> {
    let (device, dtype) = args.run.device_and_dtype(&[DType::F32, DType::F16, DType::BF16])?;
    let api_key = match args.api_key.clone().or_else(|| std::env::var("WICK_API_KEY").ok()) {
        Some(key) if key.is_empty() => bail!("WICK_API_KEY is set but empty: unset it or give a key"),
        key => key,
    };
    if args.batch_wait_ms > 60_000.0 {
        bail!("--batch-wait-ms {} is more than a minute: give milliseconds (5 is typical)", args.batch_wait_ms);
    }
    let mut models = vec![];
    for name in &args.models {
        let (id, model_args) = model_source(name, args.offline)?;
        let files = model_args.resolve(args.run.json).with_context(|| format!("cannot get the model {name:?}"))?;
        models.push(ModelSpec { id, files });
    }
    let options = ServeOptions {
        host: args.host.clone(),
        port: args.port,
        api_key,
        queue_size: args.queue_size,
        max_batch: args.max_batch,
        encoder_batch: args.encoder_batch,
        batch_wait: Duration::from_secs_f64(args.batch_wait_ms / 1e3),
        max_body_bytes: args.max_body_bytes,
        seed: args.run.seed,
        handle_signals: true,
    };
    let server = Server::start(models, dtype, &device, &options)?;
    let addr = server.addr();
    if args.run.json {
        println!("{}", serde_json::json!({ "listening": addr.to_string(), "url": format!("http://{addr}/v1") }));
    } else {
        eprintln!("wick serve: listening on http://{addr}/v1 ({} threads; ctrl-c to stop)", rayon::current_num_threads());
    }
    server.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_values_name_a_folder_or_a_hub_id_with_an_optional_revision() -> Result<()> {
        let (id, m) = model_source("openai-community/gpt2@v1.0", true)?;
        assert_eq!((id.as_str(), m.model.as_str(), m.revision.as_deref(), m.offline), ("openai-community/gpt2", "openai-community/gpt2", Some("v1.0"), true));
        let (id, m) = model_source("gpt2", false)?;
        assert_eq!((id.as_str(), m.revision), ("gpt2", None));
        for bad in ["gpt2@", "@main"] {
            assert!(model_source(bad, false).unwrap_err().to_string().contains("both parts"), "{bad}");
        }
        let dir = tempfile::tempdir()?;
        let folder = dir.path().join("tuned@2");
        std::fs::create_dir(&folder)?;
        let (id, m) = model_source(folder.to_str().unwrap(), false)?;
        assert_eq!((id.as_str(), m.revision), ("tuned@2", None));
        Ok(())
    }
}
