//! `POST /v1/embeddings` (OpenAI's shape; vectors as floats or, with `encoding_format:
//! "base64"`, as base64 of little-endian f32 bytes) and `POST /v1/classify` (labels,
//! probabilities and logits per text, as `wick predict --json` gives them). Both go through an
//! encoder batcher, which joins concurrent requests into one forward pass.

use super::{read_json, AppState, EncoderEndpoint, Task};
use crate::serve::api::{ApiError, EncodeRequest, Texts};
use crate::serve::encoders::{Arrival, Encoded};
use axum::body::Body;
use axum::extract::State;
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use std::sync::Arc;

/// Texts per request at most (OpenAI's limit for embeddings).
const MAX_INPUTS: usize = 2048;

pub async fn embeddings(State(state): State<Arc<AppState>>, body: Body) -> Result<Json<Value>, ApiError> {
    let (model_id, request, out, endpoint) = encode(&state, body, Task::Embeddings).await?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::invalid("encoding_format", format!("encoding_format must be \"float\" or \"base64\", got {other:?}"))),
    };
    if let Some(d) = request.dimensions.filter(|&d| d != endpoint.width) {
        return Err(ApiError::invalid("dimensions", format!("this model's embeddings have {} dimensions, not {d}", endpoint.width)));
    }
    let data: Vec<Value> = out
        .rows
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    let tokens: usize = out.tokens.iter().sum();
    Ok(Json(json!({ "object": "list", "data": data, "model": model_id, "usage": { "prompt_tokens": tokens, "total_tokens": tokens } })))
}

pub async fn classify(State(state): State<Arc<AppState>>, body: Body) -> Result<Json<Value>, ApiError> {
    let (model_id, _, out, endpoint) = encode(&state, body, Task::Classify).await?;
    let labels: Vec<&str> = out.rows.iter().map(|probs| endpoint.labels.get(argmax(probs)).map_or("", String::as_str)).collect();
    let tokens: usize = out.tokens.iter().sum();
    Ok(Json(json!({
        "object": "classification",
        "model": model_id,
        "labels": labels,
        "probs": out.rows,
        "logits": out.logits,
        "label_names": endpoint.labels,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })))
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
}

/// Parses and checks an encoder request, queues its texts and waits for their rows.
async fn encode<'s>(state: &'s AppState, body: Body, task: Task) -> Result<(String, EncodeRequest, Encoded, &'s EncoderEndpoint), ApiError> {
    // Counted from before parsing, so that the batcher waits for it if it is busy gathering.
    let arrival = Arrival::new(&state.encoder_arrivals);
    let mut request: EncodeRequest = read_json(state, body).await?;
    let served = state.model_for(request.model.as_deref(), task)?;
    let endpoint = match task {
        Task::Classify => served.classifier.as_ref(),
        _ => served.embeddings.as_ref(),
    }
    .expect("model_for checked the task");
    let texts = match request.input.take() {
        None => return Err(ApiError::invalid("input", "input is required (a string or a list of strings)")),
        Some(Texts::One(s)) => vec![s],
        Some(Texts::Many(v)) => v,
        Some(Texts::Tokens(_) | Texts::ManyTokens(_)) => return Err(ApiError::invalid("input", "token-id input is not supported: send text")),
    };
    if texts.is_empty() || texts.len() > MAX_INPUTS {
        return Err(ApiError::invalid("input", format!("give 1 to {MAX_INPUTS} texts, got {}", texts.len())));
    }
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ApiError::invalid("input", format!("input {i} is an empty string")));
    }
    let answer = endpoint.queue.submit(texts, arrival).ok_or_else(|| ApiError::overloaded(task.name()))?;
    let out = answer.await.map_err(|_| ApiError::internal("the encoder stopped"))?.map_err(|e| ApiError::internal(format!("the forward pass failed: {e}")))?;
    Ok((served.id.clone(), request, out, endpoint))
}
