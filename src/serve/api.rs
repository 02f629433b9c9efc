//! The wire format: OpenAI's request and response bodies for `/v1/completions`,
//! `/v1/embeddings` and `/v1/models` (the fields the official clients send and read), wick's
//! `/v1/classify`, and OpenAI's error object, which every failure answers with:
//! `{"error": {"message", "type", "param", "code"}}` and a matching HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A failed request: its status, OpenAI's error `type`, the offending parameter if any.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    /// Seconds the client should wait before retrying (503 on a full queue).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, retry_after: None }
    }

    /// 400 about one request parameter.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self { param: Some(param), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }

    /// 503: the model's queue is full; retry after a second.
    pub fn overloaded(what: &str) -> Self {
        Self { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, format!("the {what} queue is full: retry later")) }
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}"))
    }

    /// OpenAI's error `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            413 | 400 | 405 | 415 | 422 => "invalid_request_error",
            429 | 503 => "server_overloaded",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "message": self.message, "type": self.kind(), "param": self.param, "code": null } });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A string or a list of strings (`prompt`, `input`), or token ids (one list or a list of them).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Texts {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

/// What a list of prompts is made of.
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl Texts {
    pub fn into_prompts(self) -> Vec<Prompt> {
        match self {
            Self::One(s) => vec![Prompt::Text(s)],
            Self::Many(v) => v.into_iter().map(Prompt::Text).collect(),
            Self::Tokens(ids) => vec![Prompt::Tokens(ids)],
            Self::ManyTokens(v) => v.into_iter().map(Prompt::Tokens).collect(),
        }
    }
}

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`. Fields OpenAI defines that change the output and that wick does not
/// implement (`n` > 1, `best_of` > 1, `logprobs`, `echo`, `suffix`, `logit_bias`, presence and
/// frequency penalties) are refused with a 400 rather than silently ignored.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Texts>,
    /// OpenAI's default is 16.
    pub max_tokens: Option<u64>,
    /// OpenAI's default is 1; 0 is greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI's: `wick generate --top-k` (off by default, as OpenAI has none).
    pub top_k: Option<usize>,
    /// Not OpenAI's: transformers' repetition penalty (`wick generate --repetition-penalty`).
    pub repetition_penalty: Option<f64>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub logprobs: Option<serde_json::Value>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Ignored, as the field only tags requests for the caller.
    #[allow(dead_code)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

impl CompletionRequest {
    /// Refuses the OpenAI options wick does not implement.
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        let refuse = |param, what: &str| Err(ApiError::invalid(param, format!("{param} {what} is not supported by wick serve")));
        if self.n.is_some_and(|n| n != 1) {
            return refuse("n", "other than 1");
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return refuse("best_of", "other than 1");
        }
        if self.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("logprobs", "(token log-probabilities)");
        }
        if self.echo == Some(true) {
            return refuse("echo", "true");
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return refuse("suffix", "(insertion)");
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("logit_bias", "(token biases)");
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return refuse("presence_penalty", "other than 0 (use repetition_penalty)");
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return refuse("frequency_penalty", "other than 0 (use repetition_penalty)");
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// One choice of a completion or of a streamed chunk.
#[derive(Debug, Serialize)]
pub struct Choice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<()>,
    /// "stop" (end of text or a stop string) or "length"; null in chunks before the last.
    pub finish_reason: Option<&'static str>,
}

/// A completion, and (with `stream`) each server-sent chunk: OpenAI's `text_completion`.
#[derive(Debug, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `POST /v1/embeddings` and `POST /v1/classify`.
#[derive(Debug, Deserialize)]
pub struct EncodeRequest {
    pub model: Option<String>,
    pub input: Option<Texts>,
    /// "float" (default) or "base64" (little-endian f32 bytes; OpenAI's Python client asks for it).
    pub encoding_format: Option<String>,
    /// OpenAI's: only the model's own size is accepted.
    pub dimensions: Option<usize>,
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// Seconds since the Unix epoch (`created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
