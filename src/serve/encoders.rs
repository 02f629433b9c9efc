//! Dynamic batching for encoder models (BERT): sentence embeddings and sequence classification.
//!
//! One thread per model and task takes requests from a bounded channel (full: 503) and gathers
//! the ones that come together into one forward pass, up to `max_batch` texts. It waits (at most
//! `max_wait`) only for requests that have already reached the server and are being parsed
//! (`arriving`): a lone request goes at once, a burst goes as one batch. Each request then gets
//! its own rows back. Batching pads every text to the batch's longest, so results match an
//! unbatched pass to float rounding (padding is masked out).

use super::metrics::Metrics;
use crate::embed::SentenceEmbedder;
use crate::models::bert::{self, BertForSequenceClassification};
use crate::weights::ModelFiles;
use anyhow::{Context, Result};
use candle_core::{DType, Device, D};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A model loaded for one encoder task.
pub enum EncoderModel {
    Embeddings { embedder: SentenceEmbedder },
    Classifier { model: BertForSequenceClassification, config: bert::Config, tokenizer: tokenizers::Tokenizer, device: Device },
}

impl EncoderModel {
    pub fn embeddings(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::Embeddings { embedder: SentenceEmbedder::load(files, dtype, device)? })
    }

    pub fn classifier(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let (mut model, config) = crate::pretrained::load::<BertForSequenceClassification>(files, dtype, device)?;
        crate::pretrained::pack_for_inference(&mut model, crate::ops::linear::Panels::ManyRows)?;
        Ok(Self::Classifier { model, config, tokenizer: files.tokenizer()?, device: device.clone() })
    }

    /// Embeddings on this classifier's encoder (the same weights in memory, not a second copy).
    pub fn embeddings_of_classifier(&self, files: &ModelFiles) -> Result<Option<Self>> {
        match self {
            Self::Classifier { model, config, device, .. } => Ok(Some(Self::Embeddings { embedder: SentenceEmbedder::with_encoder(files, model.bert.clone(), config.clone(), device)? })),
            Self::Embeddings { .. } => Ok(None),
        }
    }

    /// The classifier's label names (none for embeddings).
    pub fn labels(&self) -> Vec<String> {
        match self {
            Self::Embeddings { .. } => vec![],
            Self::Classifier { config, .. } => config.labels(),
        }
    }

    /// The embedding size, or the number of classes.
    pub fn width(&self) -> usize {
        match self {
            Self::Embeddings { embedder, .. } => embedder.dim(),
            Self::Classifier { config, .. } => config.num_labels(),
        }
    }

    /// One forward pass over `texts`.
    fn run(&self, texts: &[&str]) -> Result<Encoded> {
        match self {
            Self::Embeddings { embedder } => {
                // The token counts come from the embedder's own tokenization: one pass, not two.
                let embedded = embedder.embed(texts)?;
                Ok(Encoded { rows: embedded.vectors, logits: vec![], tokens: embedded.tokens })
            }
            Self::Classifier { model, config, tokenizer, device } => {
                let batch = crate::tokenizer::encode_batch(tokenizer, texts, config.max_position_embeddings, config.pad_token_id, device)?;
                let tokens = batch.attention_mask.to_dtype(DType::U32)?.sum(1)?.to_vec1::<u32>()?;
                let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), Some(&batch.token_type_ids), false)?.to_dtype(DType::F32)?;
                let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
                Ok(Encoded { rows: probs.to_vec2()?, logits: logits.to_vec2()?, tokens: tokens.into_iter().map(|n| n as usize).collect() })
            }
        }
    }
}

/// Per text: an embedding or class probabilities, the logits (classifiers), the token count.
#[derive(Debug, Default)]
pub struct Encoded {
    pub rows: Vec<Vec<f32>>,
    pub logits: Vec<Vec<f32>>,
    pub tokens: Vec<usize>,
}

impl Encoded {
    fn split_off_front(&mut self, n: usize) -> Encoded {
        let take = |v: &mut Vec<_>| -> Vec<_> { v.drain(..n.min(v.len())).collect() };
        Encoded { rows: take(&mut self.rows), logits: take(&mut self.logits), tokens: self.tokens.drain(..n.min(self.tokens.len())).collect() }
    }
}

/// How an encoder batches.
#[derive(Clone, Debug)]
pub struct BatchLimits {
    /// Requests waiting at most (more: 503).
    pub queue_size: usize,
    /// Texts per forward pass at most.
    pub max_batch: usize,
    /// How long to wait for requests already arriving.
    pub max_wait: Duration,
}

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<std::result::Result<Encoded, String>>,
}

/// The handlers' side of an encoder: its queue.
pub struct EncoderQueue {
    queue: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

/// Counts an encoder request as arriving (parsed, not yet queued) while it lives; the counter
/// is shared by every encoder queue of a server.
pub struct Arrival(Arc<AtomicUsize>);

impl Arrival {
    pub fn new(arriving: &Arc<AtomicUsize>) -> Self {
        arriving.fetch_add(1, Ordering::Relaxed);
        Self(arriving.clone())
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EncoderQueue {
    /// Starts the batching thread for `model` (`kind`: the metrics label); it ends once this
    /// queue is dropped and the queued requests are answered. `arriving` counts the encoder
    /// requests being parsed ([`Arrival`]).
    pub fn start(model: EncoderModel, kind: &'static str, limits: &BatchLimits, arriving: Arc<AtomicUsize>, metrics: Arc<Metrics>) -> Result<(Self, std::thread::JoinHandle<()>)> {
        let (queue, jobs) = std::sync::mpsc::sync_channel(limits.queue_size);
        let batcher = Batcher { model, kind, max_batch: limits.max_batch, max_wait: limits.max_wait, arriving, metrics: metrics.clone() };
        let thread = std::thread::Builder::new().name(format!("wick-{kind}")).spawn(move || batcher.run(jobs)).context("starting an encoder batcher")?;
        Ok((Self { queue, metrics }, thread))
    }

    /// Queues `texts` (the request's [`Arrival`] ends here); `None` when the queue is full (or
    /// the batcher has stopped).
    pub fn submit(&self, texts: Vec<String>, arrival: Arrival) -> Option<oneshot::Receiver<std::result::Result<Encoded, String>>> {
        let (reply, answer) = oneshot::channel();
        self.metrics.encoder_queue.fetch_add(1, Ordering::Relaxed);
        let sent = match self.queue.try_send(Job { texts, reply }) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.encoder_queue.fetch_sub(1, Ordering::Relaxed);
                false
            }
        };
        drop(arrival);
        sent.then_some(answer)
    }
}

struct Batcher {
    model: EncoderModel,
    kind: &'static str,
    max_batch: usize,
    max_wait: Duration,
    arriving: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    fn run(self, jobs: Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut texts = first.texts.len();
            let mut batch = vec![first];
            let deadline = Instant::now() + self.max_wait;
            while texts < self.max_batch {
                let next = match jobs.try_recv() {
                    Ok(job) => Some(job),
                    // Wait only for requests already at the server.
                    Err(_) if self.arriving.load(Ordering::Relaxed) > 0 => match jobs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(job) => Some(job),
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
                    },
                    Err(_) => None,
                };
                match next {
                    Some(job) => {
                        texts += job.texts.len();
                        batch.push(job);
                    }
                    None => break,
                }
            }
            self.metrics.encoder_queue.fetch_sub(batch.len(), Ordering::Relaxed);
            self.answer(batch);
        }
    }

    /// Runs the texts of `batch` (`max_batch` at a time) and sends each job its rows.
    fn answer(&self, batch: Vec<Job>) {
        let batch: Vec<Job> = batch.into_iter().filter(|job| !job.reply.is_closed()).collect();
        let texts: Vec<&str> = batch.iter().flat_map(|job| job.texts.iter().map(String::as_str)).collect();
        let mut all = Encoded::default();
        let mut failure = None;
        for chunk in texts.chunks(self.max_batch) {
            self.metrics.record_batch(self.kind, chunk.len());
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.model.run(chunk))) {
                Ok(Ok(out)) => {
                    all.rows.extend(out.rows);
                    all.logits.extend(out.logits);
                    all.tokens.extend(out.tokens);
                }
                Ok(Err(e)) => failure = Some(format!("{e:#}")),
                Err(_) => failure = Some("the forward pass panicked".into()),
            }
            if failure.is_some() {
                break;
            }
        }
        for job in batch {
            let answer = match &failure {
                Some(message) => Err(message.clone()),
                None => Ok(all.split_off_front(job.texts.len())),
            };
            let _ = job.reply.send(answer);
        }
    }
}
