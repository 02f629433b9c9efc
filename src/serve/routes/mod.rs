//! The HTTP side: axum routes, the API key check, request metrics, and the helpers every
//! handler shares (reading a size-limited JSON body, finding the model a request names).
//!
//! Routes: `GET /health` (never needs the key), `GET /metrics`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `POST /v1/completions`, `POST /v1/embeddings`, `POST /v1/classify`.
//! Anything else is a 404 (or 405) with an OpenAI error object.

mod complete;
mod encode;

use super::api::{unix_now, ApiError};
use super::completions::CompletionQueue;
use super::encoders::EncoderQueue;
use super::metrics::Metrics;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use subtle::ConstantTimeEq;

/// A GPT-2 model's queue and what handlers check requests against.
pub struct CompletionModel {
    pub queue: CompletionQueue,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// n_positions.
    pub context: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
}

/// An encoder task's queue, with its output width (embedding size or class count) and labels.
pub struct EncoderEndpoint {
    pub queue: EncoderQueue,
    pub width: usize,
    pub labels: Vec<String>,
}

/// One served model: its API id and the endpoints it answers.
pub struct ServedModel {
    pub id: String,
    pub completions: Option<CompletionModel>,
    pub embeddings: Option<EncoderEndpoint>,
    pub classifier: Option<EncoderEndpoint>,
}

/// What a request asks a model to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Completions,
    Embeddings,
    Classify,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Classify => "classification",
        }
    }

    fn serves(self, model: &ServedModel) -> bool {
        match self {
            Self::Completions => model.completions.is_some(),
            Self::Embeddings => model.embeddings.is_some(),
            Self::Classify => model.classifier.is_some(),
        }
    }
}

pub struct AppState {
    pub models: Vec<ServedModel>,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    /// Request bodies larger than this are refused (413).
    pub max_body_bytes: usize,
    /// Encoder requests being parsed ([`super::encoders::Arrival`]).
    pub encoder_arrivals: Arc<AtomicUsize>,
    started: u64,
    next_id: AtomicU64,
    /// Seeds for requests that give none (seeded from `--seed`).
    seeds: Mutex<rand::rngs::StdRng>,
}

impl AppState {
    pub fn new(models: Vec<ServedModel>, metrics: Arc<Metrics>, api_key: Option<String>, max_body_bytes: usize, seed: u64, encoder_arrivals: Arc<AtomicUsize>) -> Self {
        Self {
            models,
            metrics,
            api_key,
            max_body_bytes,
            encoder_arrivals,
            started: unix_now(),
            next_id: AtomicU64::new(1),
            seeds: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        }
    }

    /// A fresh response id with `prefix` (`cmpl`, `embd`, ...).
    fn response_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:08x}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn random_seed(&self) -> u64 {
        self.seeds.lock().unwrap_or_else(|p| p.into_inner()).random()
    }

    /// The model a request names for `task`; without a name, the only model that does it.
    fn model_for(&self, name: Option<&str>, task: Task) -> Result<&ServedModel, ApiError> {
        match name {
            Some(name) => {
                let model = self
                    .models
                    .iter()
                    .find(|m| m.id == name)
                    .ok_or_else(|| ApiError { param: Some("model"), ..ApiError::new(StatusCode::NOT_FOUND, format!("the model {name:?} does not exist (GET /v1/models lists the served ones)")) })?;
                if !task.serves(model) {
                    return Err(ApiError::invalid("model", format!("the model {name:?} does not do {}", task.name())));
                }
                Ok(model)
            }
            None => {
                let mut serving = self.models.iter().filter(|m| task.serves(m));
                match (serving.next(), serving.next()) {
                    (Some(model), None) => Ok(model),
                    (None, _) => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no served model does {}", task.name()))),
                    (Some(_), Some(_)) => Err(ApiError::invalid("model", "model is required: several served models could answer")),
                }
            }
        }
    }
}

/// Reads a JSON body of at most `max_body_bytes` (413 past it; 400 if it is not the JSON `T`).
async fn read_json<T: serde::de::DeserializeOwned>(state: &AppState, body: Body) -> Result<T, ApiError> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than {} bytes (--max-body-bytes)", state.max_body_bytes));
    let bytes = axum::body::to_bytes(body, state.max_body_bytes).await.map_err(|_| too_large())?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the request body is not valid JSON for this endpoint: {e}")))
}

/// The paths metrics are labelled with (anything else counts as "other").
const ENDPOINTS: &[&str] = &["/health", "/metrics", "/v1/models", "/v1/completions", "/v1/embeddings", "/v1/classify"];

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(one_model))
        .route("/v1/completions", post(complete::completions))
        .route("/v1/embeddings", post(encode::embeddings))
        .route("/v1/classify", post(encode::classify))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .merge(protected)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not take that method") })
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// With an API key set, requires `Authorization: Bearer <key>`, compared in constant time.
async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        // ct_eq compares every byte whatever the first difference; only the length can leak.
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key: send Authorization: Bearer <key>").into_response();
        }
    }
    next.run(request).await
}

/// Counts every request by endpoint and status, with its latency (for a streamed completion,
/// until the response starts).
async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let endpoint = ENDPOINTS.iter().find(|e| path == **e || (**e == "/v1/models" && path.starts_with("/v1/models/"))).copied().unwrap_or("other");
    let start = Instant::now();
    let response = next.run(request).await;
    state.metrics.record_request(endpoint, response.status().as_u16(), start.elapsed().as_secs_f64());
    response
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

fn model_object(state: &AppState, model: &ServedModel) -> serde_json::Value {
    let mut tasks = vec![];
    for task in [Task::Completions, Task::Embeddings, Task::Classify] {
        if task.serves(model) {
            tasks.push(task.name());
        }
    }
    json!({ "id": model.id, "object": "model", "created": state.started, "owned_by": "wick", "tasks": tasks })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let data: Vec<_> = state.models.iter().map(|m| model_object(&state, m)).collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn one_model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let model = state.models.iter().find(|m| m.id == id).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("the model {id:?} does not exist")))?;
    Ok(Json(model_object(&state, model)))
}
