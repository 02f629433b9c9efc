//! The server's counters, rendered at `GET /metrics` in Prometheus' text format (version 0.0.4):
//! requests and errors by endpoint and status, a latency histogram per endpoint, tokens
//! generated, queue depths, requests decoding, cancelled generations, and histograms of the
//! batch sizes the batchers achieve (rows per decoding step, texts per encoder pass).
//!
//! Everything is a few atomics or a short map behind a mutex, touched once per request or per
//! batch: never in the per-token inner loops.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Request latency buckets, in seconds.
const LATENCY_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Batch size buckets.
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

struct Histogram {
    bounds: &'static [f64],
    /// Per bound, the observations ≤ it (not cumulative here; summed when rendered).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, label: &str) {
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{label},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{label}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{label}}} {}", self.count);
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status) → requests answered.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// "completions" (rows per decoding step) or "embeddings"/"classify" (texts per pass).
    batch_sizes: Mutex<BTreeMap<&'static str, Histogram>>,
    pub tokens_generated: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Generations stopped because their client went away.
    pub cancelled: AtomicU64,
    /// Requests waiting in a queue, by queue.
    pub completion_queue: AtomicUsize,
    pub encoder_queue: AtomicUsize,
    /// Sequences in the running decoding batch.
    pub decoding: AtomicUsize,
}

/// Locks a metrics map; a panic elsewhere while holding it leaves counts that are still valid.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16, seconds: f64) {
        *lock(&self.requests).entry((endpoint.to_string(), status)).or_default() += 1;
        lock(&self.latency).entry(endpoint.to_string()).or_insert_with(|| Histogram::new(LATENCY_BOUNDS)).observe(seconds);
    }

    pub fn record_batch(&self, kind: &'static str, size: usize) {
        lock(&self.batch_sizes).entry(kind).or_insert_with(|| Histogram::new(BATCH_BOUNDS)).observe(size as f64);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let requests = lock(&self.requests).clone();
        out.push_str("# HELP wick_requests_total HTTP requests answered, by endpoint and status.\n# TYPE wick_requests_total counter\n");
        for ((endpoint, status), n) in &requests {
            let _ = writeln!(out, "wick_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP wick_errors_total Requests answered with a 4xx or 5xx status.\n# TYPE wick_errors_total counter\n");
        for ((endpoint, status), n) in requests.iter().filter(|((_, s), _)| *s >= 400) {
            let _ = writeln!(out, "wick_errors_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP wick_request_duration_seconds Time from request to complete answer.\n# TYPE wick_request_duration_seconds histogram\n");
        for (endpoint, h) in lock(&self.latency).iter() {
            h.render(&mut out, "wick_request_duration_seconds", &format!("endpoint=\"{endpoint}\""));
        }
        out.push_str("# HELP wick_batch_size Rows per decoding step (completions) or texts per encoder pass.\n# TYPE wick_batch_size histogram\n");
        for (kind, h) in lock(&self.batch_sizes).iter() {
            h.render(&mut out, "wick_batch_size", &format!("kind=\"{kind}\""));
        }
        let counters = [
            ("wick_tokens_generated_total", "Completion tokens generated.", self.tokens_generated.load(Ordering::Relaxed)),
            ("wick_prompt_tokens_total", "Prompt tokens read by completions.", self.prompt_tokens.load(Ordering::Relaxed)),
            ("wick_cancelled_total", "Generations stopped because the client disconnected.", self.cancelled.load(Ordering::Relaxed)),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        out.push_str("# HELP wick_queue_depth Requests waiting for a batcher.\n# TYPE wick_queue_depth gauge\n");
        let _ = writeln!(out, "wick_queue_depth{{queue=\"completions\"}} {}", self.completion_queue.load(Ordering::Relaxed));
        let _ = writeln!(out, "wick_queue_depth{{queue=\"encoder\"}} {}", self.encoder_queue.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP wick_decoding Sequences in the running decoding batch.\n# TYPE wick_decoding gauge\nwick_decoding {}", self.decoding.load(Ordering::Relaxed));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.record_request("/v1/completions", 200, 0.003);
        m.record_request("/v1/completions", 200, 0.2);
        m.record_request("/v1/completions", 400, 100.0);
        let text = m.render();
        assert!(text.contains("wick_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2"), "{text}");
        assert!(text.contains("wick_errors_total{endpoint=\"/v1/completions\",status=\"400\"} 1"), "{text}");
        assert!(text.contains("wick_request_duration_seconds_bucket{endpoint=\"/v1/completions\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("wick_request_duration_seconds_bucket{endpoint=\"/v1/completions\",le=\"0.25\"} 2"), "{text}");
        assert!(text.contains("wick_request_duration_seconds_bucket{endpoint=\"/v1/completions\",le=\"+Inf\"} 3"), "{text}");
    }
}
