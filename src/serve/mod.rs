//! `wick serve`: models behind an OpenAI-compatible HTTP server (axum on tokio), with dynamic
//! batching, so that OpenAI's client libraries work against it unchanged.
//!
//! - [`api`]: the request/response bodies and OpenAI's error object.
//! - [`routes`]: the axum router, API key check, request metrics, handlers.
//! - [`completions`]: continuous batching for GPT-2 (one scheduler thread per model).
//! - [`encoders`]: dynamic batching for BERT embeddings and classification.
//! - [`metrics`]: Prometheus counters and histograms.
//!
//! Threads: the tokio runtime (two workers: the HTTP side only parses, checks and waits), one
//! thread per batcher owning its model, and the rayon pool the models compute on. Shutdown
//! (SIGTERM, ctrl-c, or [`Server::shutdown`]): the listener stops accepting, requests in flight
//! are answered (streams included), then every batcher drains its queue and its thread ends.

pub mod api;
pub mod completions;
pub mod encoders;
pub mod metrics;
pub mod routes;

use crate::models::gpt2::GPT2LMHeadModel;
use crate::weights::ModelFiles;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use encoders::{BatchLimits, EncoderModel, EncoderQueue};
use metrics::Metrics;
use routes::{AppState, CompletionModel, EncoderEndpoint, ServedModel};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How the server listens, limits and batches.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0: any free port (see [`Server::addr`]).
    pub port: u16,
    /// Required as `Authorization: Bearer <key>` on every endpoint but `/health`.
    pub api_key: Option<String>,
    /// Requests waiting per model (more: 503 with Retry-After).
    pub queue_size: usize,
    /// Completion sequences decoding together at most.
    pub max_batch: usize,
    /// Texts per encoder forward pass at most.
    pub encoder_batch: usize,
    /// How long an encoder batcher waits for requests already arriving.
    pub batch_wait: Duration,
    pub max_body_bytes: usize,
    /// Seeds the seeds of requests that give none.
    pub seed: u64,
    /// Stop on SIGTERM and ctrl-c (the command; not in-process tests).
    pub handle_signals: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            queue_size: 256,
            max_batch: 64,
            encoder_batch: 64,
            batch_wait: Duration::from_millis(5),
            max_body_bytes: 4 << 20,
            seed: 42,
            handle_signals: false,
        }
    }
}

/// A model folder to serve under `id` (its Hub id, or its folder's name).
pub struct ModelSpec {
    pub id: String,
    pub files: ModelFiles,
}

/// What a model folder is served as, from its config: GPT-2 for completions; BERT for
/// embeddings, and also for classification when it is a `*ForSequenceClassification`.
fn kinds(files: &ModelFiles) -> Result<(bool, bool, bool)> {
    let config: serde_json::Value = files.config()?;
    let classifier = config["architectures"].as_array().is_some_and(|a| a.iter().any(|v| v.as_str().is_some_and(|s| s.ends_with("ForSequenceClassification"))));
    match files.model_type()?.as_deref() {
        Some("gpt2") => Ok((true, false, false)),
        Some("bert") => Ok((false, true, classifier)),
        other => bail!(
            "{}: wick serve serves GPT-2 (completions) and BERT (embeddings, classification) models; this one has model_type {:?}",
            files.dir.display(),
            other.unwrap_or("(none)")
        ),
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// Loads `models`, starts their batchers and listens (the port is bound when this returns).
    pub fn start(models: Vec<ModelSpec>, dtype: DType, device: &Device, options: &ServeOptions) -> Result<Self> {
        if models.is_empty() {
            bail!("no model to serve: give --model ID|DIR (repeatable)");
        }
        let metrics = Arc::new(Metrics::default());
        let arrivals = Arc::new(AtomicUsize::new(0));
        let limits = BatchLimits { queue_size: options.queue_size, max_batch: options.encoder_batch, max_wait: options.batch_wait };
        let mut served = vec![];
        let mut batchers = vec![];
        for spec in models {
            if served.iter().any(|m: &ServedModel| m.id == spec.id) {
                bail!("the model id {:?} is given twice", spec.id);
            }
            let (completes, embeds, classifies) = kinds(&spec.files)?;
            let mut model = ServedModel { id: spec.id.clone(), completions: None, embeddings: None, classifier: None };
            if completes {
                let (mut gpt2, config) = crate::pretrained::load::<GPT2LMHeadModel>(&spec.files, dtype, device)?;
                crate::pretrained::pack_for_inference(&mut gpt2, crate::ops::linear::Panels::FewRows)?;
                let tokenizer = Arc::new(spec.files.tokenizer()?);
                let eos = config.eos_ids();
                let (queue, thread) = completions::CompletionQueue::start(gpt2, tokenizer.clone(), options.queue_size, options.max_batch, metrics.clone())?;
                batchers.push(thread);
                model.completions = Some(CompletionModel {
                    queue,
                    tokenizer,
                    context: config.n_positions,
                    vocab_size: config.vocab_size,
                    pad_token_id: config.pad_token_id.or(eos.first().copied()).unwrap_or(0),
                    eos_token_ids: eos,
                });
            }
            let mut encoder = |model: EncoderModel, kind: &'static str| -> Result<EncoderEndpoint> {
                let (width, labels) = (model.width(), model.labels());
                let (queue, thread) = EncoderQueue::start(model, kind, &limits, arrivals.clone(), metrics.clone())?;
                batchers.push(thread);
                Ok(EncoderEndpoint { queue, width, labels })
            };
            // A classifier's embeddings run on its own encoder: the weights are loaded once.
            let classifier = classifies.then(|| EncoderModel::classifier(&spec.files, dtype, device)).transpose()?;
            if embeds {
                let embedder = match classifier.as_ref().map(|c| c.embeddings_of_classifier(&spec.files)).transpose()?.flatten() {
                    Some(shared) => shared,
                    None => EncoderModel::embeddings(&spec.files, dtype, device)?,
                };
                model.embeddings = Some(encoder(embedder, "embeddings")?);
            }
            if let Some(classifier) = classifier {
                model.classifier = Some(encoder(classifier, "classify")?);
            }
            served.push(model);
        }
        let state = Arc::new(AppState::new(served, metrics, options.api_key.clone(), options.max_body_bytes, options.seed, arrivals));

        let listener = std::net::TcpListener::bind((options.host.as_str(), options.port)).with_context(|| format!("cannot listen on {}:{}", options.host, options.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle_signals = options.handle_signals;
        let thread = std::thread::Builder::new().name("wick-http".into()).spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the tokio runtime")?;
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let app = routes::router(state);
                axum::serve(listener, app).with_graceful_shutdown(shutdown_signal(stopped, handle_signals)).await.context("serving")
            });
            // Dropping the runtime drops any task still holding the router (and its queues);
            // then the batchers finish what they hold and end.
            drop(runtime);
            served?;
            for thread in batchers {
                let _ = thread.join();
            }
            Ok(())
        })?;
        Ok(Self { addr, stop: Some(stop), thread: Some(thread) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish, and returns when everything has ended.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait()
    }

    /// Returns when the server has stopped (on a signal, with `handle_signals`).
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the HTTP thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Resolves when `stop` fires or (with `signals`) on SIGTERM or ctrl-c.
async fn shutdown_signal(stop: tokio::sync::oneshot::Receiver<()>, signals: bool) {
    let os = async {
        if !signals {
            return std::future::pending::<()>().await;
        }
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending::<()>().await,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::select! {
        _ = stop => {}
        _ = os => {}
    }
    eprintln!("wick serve: stopping (finishing the requests in flight)");
}
