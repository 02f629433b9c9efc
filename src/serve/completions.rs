//! Continuous batching for completions: one scheduler thread owns a GPT-2 model and decodes
//! every running request together.
//!
//! Requests arrive over a bounded channel (full: the handler answers 503). At each token
//! boundary the scheduler admits waiting requests up to `max_batch` running ones: their prompts
//! run as one pass ([`GPT2LMHeadModel::feed_rows`]; one request at a time for quantized models),
//! each into its own [`KvCache`], which also yields its first token's logits.
//! Then one step samples every running request's next token (each with its own settings and
//! seeded generator, over the rayon pool), sends the new text, retires the finished ones (end
//! of text, a stop string, `max_tokens`, or a client that went away), and feeds the rest to one
//! [`GPT2LMHeadModel::decode_rows`] pass: the weights are read once per step for all of them,
//! which is why throughput grows with concurrency while decoding is bound by memory traffic.
//!
//! A request's tokens are those `wick generate` picks for the same prompt, settings and seed:
//! the same prompt, sampler and generator. Only the batching of the products changes, which
//! moves logits by float rounding (~1e-6): a token can differ only where two candidates tie to
//! that precision.
//! Its text follows OpenAI: a stop string ends the text and is not part of it; text is sent only
//! once it can no longer be cut by a stop string or end in half a UTF-8 character, so the
//! streamed pieces always concatenate to the unstreamed text.

use super::metrics::Metrics;
use crate::generate::{choose, GenerationConfig};
use crate::models::gpt2::{GPT2LMHeadModel, KvCache};
use crate::pretrained::Pretrained;
use anyhow::{Context, Result};
use candle_core::DType;
use rand::SeedableRng;
use rayon::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// Most prompt tokens one prompt pass takes (the activations of a pass grow with its tokens).
const PROMPT_PASS_TOKENS: usize = 2048;

/// What the scheduler tells a request's handler, tagged with the prompt's index in the request.
#[derive(Debug)]
pub enum Event {
    /// More text (never empty).
    Text(String),
    /// Generation ended: OpenAI's `finish_reason` ("stop" or "length") and the token count.
    Done { finish_reason: &'static str, completion_tokens: usize },
    Failed(String),
}

/// One prompt to continue.
pub struct Job {
    /// Which prompt of its request this is (`choices[].index`).
    pub index: usize,
    pub prompt_ids: Vec<u32>,
    /// Sampling settings, `max_new_tokens`, stop strings, end-of-text ids and seed.
    pub config: GenerationConfig,
    /// Shared by the prompts of one request; closed when the client goes away.
    pub events: UnboundedSender<(usize, Event)>,
}

/// The handlers' side of a completion model: its queue.
pub struct CompletionQueue {
    queue: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl CompletionQueue {
    /// Starts the scheduler thread for `model`; it ends once this queue is dropped and the
    /// running requests are finished.
    pub fn start(mut model: GPT2LMHeadModel, tokenizer: Arc<tokenizers::Tokenizer>, queue_size: usize, max_batch: usize, metrics: Arc<Metrics>) -> Result<(Self, std::thread::JoinHandle<()>)> {
        let (queue, jobs) = std::sync::mpsc::sync_channel(queue_size);
        let quantized = model.linear_layers().iter().any(|(_, layer)| layer.quantized().is_some());
        let scheduler = Scheduler { model, tokenizer, max_batch, quantized, metrics: metrics.clone(), running: vec![] };
        let thread = std::thread::Builder::new().name("wick-completions".into()).spawn(move || scheduler.run(jobs)).context("starting the completion scheduler")?;
        Ok((Self { queue, metrics }, thread))
    }

    /// Queues `job`; `Err` gives it back when the queue is full (or the scheduler has stopped).
    pub fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        self.metrics.completion_queue.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                self.metrics.completion_queue.fetch_sub(1, Ordering::Relaxed);
                Err(job)
            }
        }
    }
}

/// A request being decoded.
struct Sequence {
    job: Job,
    cache: KvCache,
    rng: rand::rngs::StdRng,
    generated: Vec<u32>,
    /// Prompt and generated ids, for the repetition penalty.
    seen: Vec<u32>,
    /// Logits of the next token (from the prompt pass or the last step).
    logits: Vec<f32>,
    visible: VisibleText,
}

/// What one sampling step did to a sequence.
enum Outcome {
    /// Feed this token to the next step.
    Continue(u32),
    Finished,
    /// The client went away.
    Cancelled,
}

struct Scheduler {
    model: GPT2LMHeadModel,
    /// Some linear layer is quantized: prompt passes run one request at a time (see `admit`).
    quantized: bool,
    tokenizer: Arc<tokenizers::Tokenizer>,
    max_batch: usize,
    metrics: Arc<Metrics>,
    running: Vec<Sequence>,
}

impl Scheduler {
    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            let mut arrived = vec![];
            if self.running.is_empty() {
                // Idle: wait for work; every queue handle gone means shutdown.
                match jobs.recv() {
                    Ok(job) => arrived.push(job),
                    Err(_) => return,
                }
            }
            while self.running.len() + arrived.len() < self.max_batch {
                match jobs.try_recv() {
                    Ok(job) => arrived.push(job),
                    Err(_) => break,
                }
            }
            self.admit(arrived);
            self.metrics.decoding.store(self.running.len(), Ordering::Relaxed);
            // A bug in one step must not take the server down: its requests fail, the rest go on.
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("the decoding step panicked".to_string()),
            };
            if let Some(message) = failure {
                for seq in self.running.drain(..) {
                    let _ = seq.job.events.send((seq.job.index, Event::Failed(message.clone())));
                }
            }
            self.metrics.decoding.store(self.running.len(), Ordering::Relaxed);
        }
    }

    /// The prompt passes of new requests; they join the running set. Prompts that arrived
    /// together run as one pass over all their tokens (up to [`PROMPT_PASS_TOKENS`]), which
    /// reads the weights once for all of them, except for quantized models: their products over
    /// more than 32 rows round the activations to 7 bits instead of 8 (`ops::matvec::qgemm`), so
    /// each of their prompts runs alone and gets the tokens `wick generate` gives it.
    fn admit(&mut self, jobs: Vec<Job>) {
        let mut ready = Vec::with_capacity(jobs.len());
        for job in jobs {
            self.metrics.completion_queue.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.metrics.prompt_tokens.fetch_add(job.prompt_ids.len() as u64, Ordering::Relaxed);
            if job.config.max_new_tokens == 0 {
                let _ = job.events.send((job.index, Event::Done { finish_reason: "length", completion_tokens: 0 }));
                continue;
            }
            ready.push(job);
        }
        let limit = if self.quantized { 1 } else { PROMPT_PASS_TOKENS };
        while !ready.is_empty() {
            // As many as fit the pass (at least one).
            let mut take = 1;
            let mut tokens = ready[0].prompt_ids.len();
            while take < ready.len() && tokens + ready[take].prompt_ids.len() <= limit {
                tokens += ready[take].prompt_ids.len();
                take += 1;
            }
            let group: Vec<Job> = ready.drain(..take).collect();
            match self.prompt_pass(&group) {
                Ok(results) => {
                    for (job, (cache, logits)) in group.into_iter().zip(results) {
                        self.start(job, cache, logits);
                    }
                }
                // One failing prompt must not fail the others: each alone, with its own error.
                Err(_) if group.len() > 1 => {
                    for job in group {
                        match self.prompt_pass(std::slice::from_ref(&job)) {
                            Ok(mut results) => {
                                let (cache, logits) = results.remove(0);
                                self.start(job, cache, logits);
                            }
                            Err(e) => {
                                let _ = job.events.send((job.index, Event::Failed(e)));
                            }
                        }
                    }
                }
                Err(e) => {
                    let job = &group[0];
                    let _ = job.events.send((job.index, Event::Failed(e)));
                }
            }
        }
    }

    /// One pass over the prompts of `jobs`: each one's cache and its next token's logits.
    fn prompt_pass(&self, jobs: &[Job]) -> std::result::Result<Vec<(KvCache, Vec<f32>)>, String> {
        let pass = || -> Result<Vec<(KvCache, Vec<f32>)>> {
            let mut caches: Vec<KvCache> = jobs.iter().map(|j| self.model.new_cache(j.prompt_ids.len() + j.config.max_new_tokens)).collect();
            let prompts: Vec<&[u32]> = jobs.iter().map(|j| j.prompt_ids.as_slice()).collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let logits = self.model.feed_rows(&prompts, &mut refs)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            Ok(caches.into_iter().zip(logits).collect())
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(pass)) {
            Ok(Ok(results)) => Ok(results),
            Ok(Err(e)) => Err(format!("the prompt pass failed: {e:#}")),
            Err(_) => Err("the prompt pass panicked".into()),
        }
    }

    /// A request whose prompt has been read joins the running set.
    fn start(&mut self, job: Job, cache: KvCache, logits: Vec<f32>) {
        let hold = job.config.stop_strings.iter().map(String::len).max().unwrap_or(1).saturating_sub(1);
        self.running.push(Sequence {
            rng: rand::rngs::StdRng::seed_from_u64(job.config.seed),
            seen: job.prompt_ids.clone(),
            generated: vec![],
            cache,
            logits,
            visible: VisibleText { emitted: 0, hold },
            job,
        });
    }

    /// Samples every running sequence's next token, retires the finished ones and runs one
    /// decoding pass for the others.
    fn step(&mut self) -> Result<()> {
        let tokenizer = &self.tokenizer;
        let outcomes: Vec<Result<Outcome>> = self.running.par_iter_mut().map(|seq| seq.advance(tokenizer)).collect();
        let mut next = Vec::with_capacity(outcomes.len());
        let mut kept = Vec::with_capacity(outcomes.len());
        let mut sampled = 0;
        for (seq, outcome) in self.running.drain(..).zip(outcomes) {
            match outcome {
                Ok(Outcome::Continue(token)) => {
                    sampled += 1;
                    next.push(token);
                    kept.push(seq);
                }
                Ok(Outcome::Finished) => sampled += 1,
                Ok(Outcome::Cancelled) => {
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let _ = seq.job.events.send((seq.job.index, Event::Failed(format!("{e:#}"))));
                }
            }
        }
        self.running = kept;
        self.metrics.tokens_generated.fetch_add(sampled, Ordering::Relaxed);
        if self.running.is_empty() {
            return Ok(());
        }
        self.metrics.record_batch("completions", self.running.len());
        let mut caches: Vec<&mut KvCache> = self.running.iter_mut().map(|s| &mut s.cache).collect();
        let logits = self.model.decode_rows(&next, &mut caches)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (seq, row) in self.running.iter_mut().zip(logits) {
            seq.logits = row;
        }
        Ok(())
    }
}

impl Sequence {
    /// Picks the next token, sends whatever text became final, and says whether to go on.
    fn advance(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<Outcome> {
        let events = &self.job.events;
        if events.is_closed() {
            return Ok(Outcome::Cancelled);
        }
        let config = &self.job.config;
        let token = choose(std::mem::take(&mut self.logits), &self.seen, config, &mut self.rng)?;
        self.generated.push(token);
        self.seen.push(token);
        let text = tokenizer.decode(&self.generated, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        let stop_at = config.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min();
        let finish_reason = if config.eos_token_ids.contains(&token) || stop_at.is_some() {
            Some("stop")
        } else if self.generated.len() >= config.max_new_tokens {
            Some("length")
        } else {
            None
        };
        if let Some(piece) = self.visible.advance(&text, stop_at.unwrap_or(text.len()), finish_reason.is_some()) {
            let _ = events.send((self.job.index, Event::Text(piece)));
        }
        Ok(match finish_reason {
            Some(finish_reason) => {
                let _ = events.send((self.job.index, Event::Done { finish_reason, completion_tokens: self.generated.len() }));
                Outcome::Finished
            }
            None => Outcome::Continue(token),
        })
    }
}

/// How much of a sequence's decoded text has been sent: text is held back while it ends in an
/// incomplete UTF-8 character (U+FFFD) or could still be the start of a stop string.
struct VisibleText {
    emitted: usize,
    /// Bytes held back: the longest stop string's length less one.
    hold: usize,
}

impl VisibleText {
    /// The text to send now, given the decoding of every generated token, where the visible
    /// text ends (a stop string's start, else its length), and whether generation is over.
    fn advance(&mut self, text: &str, end: usize, finished: bool) -> Option<String> {
        let mut upto = end;
        if !finished {
            upto = text[..end].trim_end_matches('\u{FFFD}').len().saturating_sub(self.hold);
            while !text.is_char_boundary(upto) {
                upto -= 1;
            }
        }
        if upto <= self.emitted || !text.is_char_boundary(self.emitted) {
            return None;
        }
        let piece = text[self.emitted..upto].to_string();
        self.emitted = upto;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::VisibleText;

    #[test]
    fn text_is_held_back_until_no_stop_string_can_cut_it() {
        // Stop string "END" (hold 2 bytes).
        let mut v = VisibleText { emitted: 0, hold: 2 };
        assert_eq!(v.advance("abc", 3, false).as_deref(), Some("a"));
        assert_eq!(v.advance("abcE", 4, false).as_deref(), Some("b"));
        assert_eq!(v.advance("abcEN", 5, false).as_deref(), Some("c"));
        // "END" completes: the text ends before it.
        assert_eq!(v.advance("abcEND", 3, true), None);
        // Incomplete characters wait; the end releases everything.
        let mut v = VisibleText { emitted: 0, hold: 0 };
        assert_eq!(v.advance("é\u{FFFD}", "é\u{FFFD}".len(), false).as_deref(), Some("é"));
        assert_eq!(v.advance("é\u{FFFD}", "é\u{FFFD}".len(), true).as_deref(), Some("\u{FFFD}"));
    }
}
