//! `POST /v1/completions`: checks the request (every value, and prompt + `max_tokens` against
//! the context: 400, never a panic in the model), queues one job per prompt, and answers with
//! one `text_completion` object, or with server-sent chunks (`data: {...}`, then `data: [DONE]`)
//! when `stream` is set. Dropping the answer (the client went away) closes the jobs' event
//! channel, which the scheduler sees at its next step: the generation stops.

use super::{read_json, AppState, CompletionModel, Task};
use crate::generate::GenerationConfig;
use crate::serve::api::{unix_now, ApiError, Choice, Completion, CompletionRequest, Prompt, Stop, Texts, Usage};
use crate::serve::completions::{Event, Job};
use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Prompts per request at most.
const MAX_PROMPTS: usize = 128;
/// Stop strings per request at most (OpenAI's limit).
const MAX_STOPS: usize = 4;

pub async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let mut request: CompletionRequest = read_json(&state, body).await?;
    request.check_unsupported()?;
    let served = state.model_for(request.model.as_deref(), Task::Completions)?;
    let model = served.completions.as_ref().expect("model_for checked the task");
    let prompts = prompt_ids(model, take_prompts(request.prompt.take())?)?;
    let config = generation_config(&state, model, &request)?;
    for (i, ids) in prompts.iter().enumerate() {
        check_context(model, i, ids.len(), config.max_new_tokens)?;
    }

    let (events, answers) = unbounded_channel();
    for (index, prompt_ids) in prompts.iter().enumerate() {
        let job = Job { index, prompt_ids: prompt_ids.clone(), config: config.clone(), events: events.clone() };
        // On a full queue the jobs already queued are dropped with `answers`: they are cancelled.
        model.queue.submit(job).map_err(|_| ApiError::overloaded("completion"))?;
    }
    drop(events);
    let meta = Meta { id: state.response_id("cmpl"), created: unix_now(), model: served.id.clone() };
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let stream = ChunkStream { answers, remaining: prompts.len(), pending: VecDeque::new(), meta, prompt_tokens, completion_tokens: 0, include_usage };
        return Ok(Sse::new(stream.into_stream()).into_response());
    }
    collect(answers, prompts.len(), meta, prompt_tokens).await.map(|c| Json(c).into_response())
}

fn take_prompts(prompt: Option<Texts>) -> Result<Vec<Prompt>, ApiError> {
    let prompts = prompt.ok_or_else(|| ApiError::invalid("prompt", "prompt is required (a string or a list of strings)"))?.into_prompts();
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid("prompt", format!("give 1 to {MAX_PROMPTS} prompts, got {}", prompts.len())));
    }
    Ok(prompts)
}

/// Each prompt's token ids (text is tokenized as `wick generate` does).
fn prompt_ids(model: &CompletionModel, prompts: Vec<Prompt>) -> Result<Vec<Vec<u32>>, ApiError> {
    let mut all = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let ids = match prompt {
            Prompt::Text(text) => crate::generate::encode_prompts(&model.tokenizer, &[&text]).map_err(ApiError::internal)?.remove(0),
            Prompt::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= model.vocab_size) {
                    return Err(ApiError::invalid("prompt", format!("prompt {i} has the token id {bad}, past the vocabulary of {}", model.vocab_size)));
                }
                ids
            }
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", format!("prompt {i} is empty: GPT-2 needs at least one token to continue")));
        }
        all.push(ids);
    }
    Ok(all)
}

/// The sampling settings of a request, every value checked; OpenAI's defaults (16 tokens,
/// temperature 1, no top-k) where it gives none, and a fresh seed unless it gives one.
fn generation_config(state: &AppState, model: &CompletionModel, request: &CompletionRequest) -> Result<GenerationConfig, ApiError> {
    let temperature = request.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::invalid("temperature", format!("temperature must be a number ≥ 0 (0 = greedy), got {temperature}")));
    }
    let top_p = request.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("top_p must be in (0, 1], got {top_p}")));
    }
    let repetition_penalty = request.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(ApiError::invalid("repetition_penalty", format!("repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")));
    }
    let stop_strings = match &request.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop_strings.len() > MAX_STOPS || stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", format!("stop takes up to {MAX_STOPS} non-empty strings")));
    }
    let max_tokens = request.max_tokens.unwrap_or(16);
    Ok(GenerationConfig {
        // Past the context anyway: check_context refuses it with the numbers.
        max_new_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
        temperature,
        top_k: request.top_k.filter(|&k| k > 0),
        top_p: (top_p < 1.0).then_some(top_p),
        repetition_penalty,
        eos_token_ids: model.eos_token_ids.clone(),
        pad_token_id: model.pad_token_id,
        stop_strings,
        seed: request.seed.unwrap_or_else(|| state.random_seed()),
    })
}

/// Prompt `i` (`len` tokens) plus `max_tokens` must fit the context (the last token is sampled
/// but never fed back, as in `wick generate`).
fn check_context(model: &CompletionModel, i: usize, len: usize, max_tokens: usize) -> Result<(), ApiError> {
    let ctx = model.context;
    if len > ctx {
        return Err(ApiError::invalid("prompt", format!("prompt {i} has {len} tokens but the model's context is {ctx} tokens: shorten it")));
    }
    if len.saturating_add(max_tokens) > ctx + 1 {
        return Err(ApiError::invalid(
            "max_tokens",
            format!("prompt {i} ({len} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {ctx} tokens: ask for at most {}", ctx + 1 - len),
        ));
    }
    Ok(())
}

/// The fields every chunk and completion repeat.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    fn completion(&self, choices: Vec<Choice>, usage: Option<Usage>) -> Completion {
        Completion { id: self.id.clone(), object: "text_completion", created: self.created, model: self.model.clone(), choices, usage }
    }
}

/// Waits for every prompt's text: one completion.
async fn collect(mut answers: UnboundedReceiver<(usize, Event)>, n: usize, meta: Meta, prompt_tokens: usize) -> Result<Completion, ApiError> {
    let mut choices: Vec<Choice> = (0..n).map(|index| Choice { text: String::new(), index, logprobs: None, finish_reason: None }).collect();
    let (mut remaining, mut completion_tokens) = (n, 0);
    while remaining > 0 {
        match answers.recv().await {
            Some((i, Event::Text(text))) => choices[i].text.push_str(&text),
            Some((i, Event::Done { finish_reason, completion_tokens: tokens })) => {
                choices[i].finish_reason = Some(finish_reason);
                completion_tokens += tokens;
                remaining -= 1;
            }
            Some((_, Event::Failed(message))) => return Err(ApiError::internal(format!("generation failed: {message}"))),
            None => return Err(ApiError::internal("the completion scheduler stopped")),
        }
    }
    Ok(meta.completion(choices, Some(Usage::new(prompt_tokens, completion_tokens))))
}

/// Turns scheduler events into server-sent chunks.
struct ChunkStream {
    answers: UnboundedReceiver<(usize, Event)>,
    remaining: usize,
    /// Events ready to send before reading more.
    pending: VecDeque<SseEvent>,
    meta: Meta,
    prompt_tokens: usize,
    completion_tokens: usize,
    include_usage: bool,
}

impl ChunkStream {
    fn into_stream(self) -> impl futures_util::Stream<Item = Result<SseEvent, Infallible>> {
        futures_util::stream::unfold(Some(self), |state| async move {
            let mut s = state?;
            loop {
                if let Some(event) = s.pending.pop_front() {
                    return Some((Ok(event), Some(s)));
                }
                if s.remaining == 0 {
                    return None;
                }
                s.receive().await;
            }
        })
    }

    /// Reads one scheduler event and queues the chunks it makes.
    async fn receive(&mut self) {
        let chunk = |meta: &Meta, index, text, finish_reason| json_event(&meta.completion(vec![Choice { text, index, logprobs: None, finish_reason }], None));
        match self.answers.recv().await {
            Some((i, Event::Text(text))) => self.pending.push_back(chunk(&self.meta, i, text, None)),
            Some((i, Event::Done { finish_reason, completion_tokens })) => {
                self.completion_tokens += completion_tokens;
                self.remaining -= 1;
                self.pending.push_back(chunk(&self.meta, i, String::new(), Some(finish_reason)));
                if self.remaining == 0 {
                    if self.include_usage {
                        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
                        self.pending.push_back(json_event(&self.meta.completion(vec![], Some(usage))));
                    }
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                }
            }
            failed => {
                let message = match failed {
                    Some((_, Event::Failed(m))) => format!("generation failed: {m}"),
                    _ => "the completion scheduler stopped".into(),
                };
                self.remaining = 0;
                let error = serde_json::json!({ "error": { "message": message, "type": "server_error", "param": null, "code": null } });
                self.pending.push_back(SseEvent::default().data(error.to_string()));
            }
        }
    }
}

fn json_event(value: &impl serde::Serialize) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(value).unwrap_or_default())
}
