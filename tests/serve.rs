//! `wick serve` end to end over loopback with the tiny fixtures: servers start in-process on an
//! ephemeral port (and once as the binary, for SIGTERM), requests go over plain HTTP.
//!
//! Checked: greedy and seeded completions equal `wick generate`'s; a stream concatenates to the
//! unstreamed text; concurrent requests give what the same requests give one at a time; stop
//! strings; embeddings equal `wick embed`'s; classification; every error path's status and
//! error object; a full queue answers 503 and recovers; a client that disconnects cancels its
//! generation; SIGTERM finishes the stream in flight and exits.

mod common;

use anyhow::Result;
use common::fixture_path;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wick::serve::{ModelSpec, ServeOptions, Server};

fn spec(id: &str, fixture: &str) -> ModelSpec {
    ModelSpec { id: id.into(), files: wick::weights::ModelFiles::from_dir(&fixture_path(fixture)).unwrap() }
}

fn serve(models: Vec<ModelSpec>, options: ServeOptions) -> Server {
    Server::start(models, candle_core::DType::F32, &candle_core::Device::Cpu, &ServeOptions { port: 0, ..options }).expect("starting the server")
}

/// gpt2-tiny as "gpt2-tiny" and bert-tiny-cls as "bert".
fn default_server() -> Server {
    serve(vec![spec("gpt2-tiny", "hf/gpt2-tiny"), spec("bert", "hf/bert-tiny-cls")], ServeOptions::default())
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request (`Connection: close`), the whole answer read (chunked bodies decoded).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Content-Type: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = vec![];
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, rest) = text.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines.filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Reply { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    http(addr, "POST", path, &[], &body.to_string())
}

/// The text of a completion (the first choice), failing the test on an error.
fn complete(addr: SocketAddr, body: &Value) -> Value {
    let reply = post(addr, "/v1/completions", body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))).map(str::to_string).collect()
}

/// The stdout lines of `wick args` (which must succeed).
fn wick_lines(args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_wick")).args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(out.status.success(), "wick {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

fn generate_text(prompt: &str, extra: &[&str]) -> String {
    let model = fixture_path("hf/gpt2-tiny");
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--json"];
    args.extend_from_slice(extra);
    let summary: Value = serde_json::from_str(wick_lines(&args).last().unwrap()).unwrap();
    summary["text"].as_str().unwrap().to_string()
}

#[test]
fn completions_equal_wick_generate_and_streams_concatenate() {
    let server = default_server();
    let addr = server.addr();
    let prompt = "the cat sat on";
    // Greedy.
    let greedy = generate_text(prompt, &["--temperature", "0", "--max-new-tokens", "30"]);
    let got = complete(addr, &json!({ "model": "gpt2-tiny", "prompt": prompt, "max_tokens": 30, "temperature": 0 }));
    assert_eq!(got["choices"][0]["text"], greedy.as_str());
    assert_eq!(got["object"], "text_completion");
    assert_eq!(got["usage"]["completion_tokens"].as_u64().unwrap() + got["usage"]["prompt_tokens"].as_u64().unwrap(), got["usage"]["total_tokens"].as_u64().unwrap());
    // Sampled with a seed (top-k off on both sides: OpenAI has none).
    let sampled = generate_text(prompt, &["--temperature", "0.9", "--top-p", "0.95", "--top-k", "0", "--seed", "7", "--max-new-tokens", "30"]);
    let body = json!({ "prompt": prompt, "max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "seed": 7 });
    let got = complete(addr, &body);
    assert_eq!(got["choices"][0]["text"], sampled.as_str());
    assert_ne!(sampled, greedy, "the seeded sample should differ from greedy for this check to mean anything");

    // The same request streamed: chunks concatenate to the text, then [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let reply = post(addr, "/v1/completions", &streamed);
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").unwrap().starts_with("text/event-stream"));
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(text, sampled);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks.last().unwrap()["usage"], got["usage"]);
    let finish: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| &c["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, vec![&got["choices"][0]["finish_reason"]]);
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let server = default_server();
    let addr = server.addr();
    let full = complete(addr, &json!({ "prompt": "one two three", "max_tokens": 40, "temperature": 0 }))["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the greedy text (on a character boundary).
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 12, "greedy text too short: {full:?}");
    let stop: String = chars[6..9].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let body = json!({ "prompt": "one two three", "max_tokens": 40, "temperature": 0, "stop": [stop.clone()], "stream": stream });
        let reply = post(addr, "/v1/completions", &body);
        let (text, finish) = if stream {
            let data = sse_data(&reply.body);
            let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
            let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap().to_string()).collect();
            (text, chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v = reply.json();
            (v["choices"][0]["text"].as_str().unwrap().to_string(), v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(text, cut, "stream {stream}, stop {stop:?}");
        assert_eq!(finish, "stop");
    }
}

#[test]
fn concurrent_requests_equal_sequential_ones() {
    let server = default_server();
    let addr = server.addr();
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            let prompt = ["hello there", "a", "the quick brown fox jumps over", "once upon a time"][i % 4];
            let temperature = if i % 2 == 0 { 0.0 } else { 1.0 };
            json!({ "prompt": prompt, "max_tokens": 20 + 3 * i, "temperature": temperature, "seed": i, "stream": i % 3 == 0 })
        })
        .collect();
    let text_of = |reply: Reply, stream: bool| -> String {
        assert_eq!(reply.status, 200, "{}", reply.body);
        if stream {
            let data = sse_data(&reply.body);
            data[..data.len() - 1].iter().map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_string()).collect()
        } else {
            reply.json()["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let one_at_a_time: Vec<String> = bodies.iter().map(|b| text_of(post(addr, "/v1/completions", b), b["stream"] == true)).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies.iter().map(|b| s.spawn(move || text_of(post(addr, "/v1/completions", b), b["stream"] == true))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, one_at_a_time);
    // A list of prompts: one choice each, in order, the same texts.
    let prompts: Vec<&Value> = bodies.iter().filter(|b| b["temperature"] == 0.0).map(|b| &b["prompt"]).collect();
    let listed = complete(addr, &json!({ "prompt": prompts, "max_tokens": 20, "temperature": 0 }));
    for (i, choice) in listed["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(choice["index"], i);
        let single = complete(addr, &json!({ "prompt": prompts[i], "max_tokens": 20, "temperature": 0 }));
        assert_eq!(choice["text"], single["choices"][0]["text"]);
    }
    // Some decoding step ran several requests together.
    let metrics = http(addr, "GET", "/metrics", &[], "").body;
    let value = |prefix: &str| -> f64 { metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).unwrap().parse().unwrap() };
    let (sum, count) = (value("wick_batch_size_sum{kind=\"completions\"}"), value("wick_batch_size_count{kind=\"completions\"}"));
    assert!(sum > count, "no decoding step had more than one row:\n{metrics}");
}

#[test]
fn embeddings_equal_wick_embed_and_classify_answers() {
    let server = default_server();
    let addr = server.addr();
    let texts = ["the movie was great", "a dull film", "ok"];
    let model = fixture_path("hf/bert-tiny-cls");
    let mut args = vec!["embed", "--model", model.to_str().unwrap(), "--json"];
    for t in texts {
        args.extend(["--text", t]);
    }
    let expected: Vec<Vec<f32>> = wick_lines(&args)[..texts.len()].iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let close = |got: &[f32], want: &[f32]| got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5);

    let reply = post(addr, "/v1/embeddings", &json!({ "model": "bert", "input": texts }));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = reply.json();
    assert_eq!(v["object"], "list");
    for (i, want) in expected.iter().enumerate() {
        let got: Vec<f32> = serde_json::from_value(v["data"][i]["embedding"].clone()).unwrap();
        assert!(close(&got, want), "text {i}");
        assert_eq!(v["data"][i]["index"], i);
    }
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    // One string, base64 (what OpenAI's Python client asks for), concurrently.
    std::thread::scope(|s| {
        for (text, want) in texts.iter().zip(&expected) {
            s.spawn(move || {
                use base64::Engine;
                let v = post(addr, "/v1/embeddings", &json!({ "input": text, "encoding_format": "base64", "model": "bert" })).json();
                let bytes = base64::engine::general_purpose::STANDARD.decode(v["data"][0]["embedding"].as_str().unwrap()).unwrap();
                let got: Vec<f32> = bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                assert!(close(&got, want));
            });
        }
    });

    let v = post(addr, "/v1/classify", &json!({ "input": texts })).json();
    let names = ["negative", "neutral", "positive"];
    assert_eq!(v["label_names"], json!(names));
    for i in 0..texts.len() {
        let probs: Vec<f32> = serde_json::from_value(v["probs"][i].clone()).unwrap();
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(v["labels"][i], names[best]);
        let single = post(addr, "/v1/classify", &json!({ "input": texts[i] })).json();
        let p: Vec<f32> = serde_json::from_value(single["probs"][0].clone()).unwrap();
        assert!(close(&p, &probs));
    }
}

/// Every error is `{"error": {"message", "type", "param", "code"}}` with the status.
fn assert_error(reply: &Reply, status: u16, param: Option<&str>) {
    assert_eq!(reply.status, status, "{}", reply.body);
    let v = reply.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

#[test]
fn every_error_path_answers_its_status_and_an_error_object() {
    let server = serve(vec![spec("gpt2-tiny", "hf/gpt2-tiny"), spec("bert", "hf/bert-tiny-cls")], ServeOptions { max_body_bytes: 2000, ..Default::default() });
    let addr = server.addr();
    let c = "/v1/completions";
    assert_error(&http(addr, "POST", c, &[], "{not json"), 400, None);
    let cases = [
        (json!({ "max_tokens": 4 }), "prompt"),
        (json!({ "prompt": "" }), "prompt"),
        (json!({ "prompt": [] }), "prompt"),
        (json!({ "prompt": [100000] }), "prompt"),
        (json!({ "prompt": "hi", "temperature": -1 }), "temperature"),
        (json!({ "prompt": "hi", "top_p": 1.5 }), "top_p"),
        (json!({ "prompt": "hi", "top_p": 0 }), "top_p"),
        (json!({ "prompt": "hi", "repetition_penalty": 0 }), "repetition_penalty"),
        (json!({ "prompt": "hi", "stop": "" }), "stop"),
        (json!({ "prompt": "hi", "stop": ["a", "b", "c", "d", "e"] }), "stop"),
        (json!({ "prompt": "hi", "n": 2 }), "n"),
        (json!({ "prompt": "hi", "logprobs": 2 }), "logprobs"),
        // The context is 64 positions.
        (json!({ "prompt": "hi", "max_tokens": 64 }), "max_tokens"),
        (json!({ "prompt": "hi", "max_tokens": u64::MAX }), "max_tokens"),
        (json!({ "prompt": vec![5u32; 65] }), "prompt"),
        (json!({ "prompt": "hi", "model": "bert" }), "model"),
    ];
    for (body, param) in cases {
        assert_error(&post(addr, c, &body), 400, Some(param));
    }
    assert_error(&post(addr, c, &json!({ "prompt": "hi", "max_tokens": "many" })), 400, None);
    // The longest allowed request works.
    let ok = complete(addr, &json!({ "prompt": vec![5u32; 60], "max_tokens": 5, "temperature": 0 }));
    assert_eq!(ok["usage"]["prompt_tokens"], 60);
    assert_error(&post(addr, c, &json!({ "prompt": "hi", "model": "nope" })), 404, Some("model"));
    assert_error(&http(addr, "GET", "/v1/nothing", &[], ""), 404, None);
    assert_error(&http(addr, "GET", c, &[], ""), 405, None);
    assert_error(&post(addr, c, &json!({ "prompt": "x".repeat(3000) })), 413, None);
    let e = "/v1/embeddings";
    assert_error(&post(addr, e, &json!({ "input": [] })), 400, Some("input"));
    assert_error(&post(addr, e, &json!({ "input": ["a", ""] })), 400, Some("input"));
    assert_error(&post(addr, e, &json!({ "input": "a", "encoding_format": "hex" })), 400, Some("encoding_format"));
    assert_error(&post(addr, e, &json!({ "input": "a", "dimensions": 3 })), 400, Some("dimensions"));
    assert_error(&post(addr, e, &json!({ "input": "a", "model": "gpt2-tiny" })), 400, Some("model"));
    assert_error(&post(addr, "/v1/classify", &json!({ "input": "a", "model": "gpt2-tiny" })), 400, Some("model"));
    let metrics = http(addr, "GET", "/metrics", &[], "").body;
    assert!(metrics.contains("wick_errors_total{endpoint=\"/v1/completions\",status=\"400\"}"), "{metrics}");
    assert!(metrics.contains("wick_errors_total{endpoint=\"other\",status=\"404\"} 1"), "{metrics}");

    // /v1/models lists both ids.
    let models = http(addr, "GET", "/v1/models", &[], "").json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gpt2-tiny", "bert"]);
    assert_eq!(http(addr, "GET", "/health", &[], "").status, 200);
}

#[test]
fn an_api_key_is_required_when_set() {
    let server = serve(vec![spec("gpt2-tiny", "hf/gpt2-tiny")], ServeOptions { api_key: Some("s3cret".into()), ..Default::default() });
    let addr = server.addr();
    let body = json!({ "prompt": "hi", "max_tokens": 2 }).to_string();
    assert_error(&http(addr, "POST", "/v1/completions", &[], &body), 401, None);
    assert_error(&http(addr, "POST", "/v1/completions", &[("Authorization", "Bearer s3cres")], &body), 401, None);
    assert_error(&http(addr, "GET", "/v1/models", &[("Authorization", "s3cret")], ""), 401, None);
    assert_error(&http(addr, "GET", "/metrics", &[], ""), 401, None);
    assert_eq!(http(addr, "POST", "/v1/completions", &[("Authorization", "Bearer s3cret")], &body).status, 200);
    assert_eq!(http(addr, "GET", "/health", &[], "").status, 200);
}

#[test]
fn a_full_queue_answers_503_and_recovers() {
    // One request decodes at a time and one waits: a list of ten prompts overflows at once.
    let server = serve(vec![spec("gpt2-tiny", "hf/gpt2-tiny")], ServeOptions { queue_size: 1, max_batch: 1, ..Default::default() });
    let addr = server.addr();
    let prompts: Vec<String> = (0..10).map(|i| format!("prompt number {i}")).collect();
    let reply = post(addr, "/v1/completions", &json!({ "prompt": prompts, "max_tokens": 40 }));
    assert_error(&reply, 503, None);
    assert_eq!(reply.header("retry-after"), Some("1"));
    // The queued jobs of the refused request are dropped; the server answers again.
    let start = Instant::now();
    loop {
        let reply = post(addr, "/v1/completions", &json!({ "prompt": "again", "max_tokens": 5 }));
        if reply.status == 200 {
            break;
        }
        assert_error(&reply, 503, None);
        assert!(start.elapsed() < Duration::from_secs(10), "still 503 after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// gpt2-tiny with a 4096-position context (random position embeddings) and no end-of-text
/// token, so that a generation lasts long enough to disconnect from or signal in the middle of.
fn long_context_model(dir: &Path) -> Result<()> {
    let src = fixture_path("hf/gpt2-tiny");
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(&src)? {
        let path = entry?.path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap()))?;
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    config["n_positions"] = json!(4096);
    config["eos_token_id"] = Value::Null;
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)?;
    let key = tensors.keys().find(|k| k.ends_with("wpe.weight")).unwrap().clone();
    let width = tensors[&key].dim(1)?;
    tensors.insert(key, candle_core::Tensor::randn(0f32, 0.2, (4096, width), &candle_core::Device::Cpu)?);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// Opens a stream of `max_tokens` tokens and returns the socket once its first chunk arrived.
fn start_stream(addr: SocketAddr, max_tokens: usize) -> BufReader<TcpStream> {
    let body = json!({ "prompt": "tell me", "max_tokens": max_tokens, "stream": true, "stream_options": { "include_usage": true } }).to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(stream, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !line.contains("data: {") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended before its first chunk");
    }
    reader
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = http(addr, "GET", "/metrics", &[], "").body;
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).map_or(0.0, |v| v.parse().unwrap())
}

/// A server of the long-context model; the client `disconnect` makes must cancel a 4,000-token
/// generation: the metrics count it cancelled, short of 4,000 tokens, nothing left decoding.
fn check_disconnect_cancels(disconnect: impl FnOnce(SocketAddr)) -> Result<()> {
    let dir = tempfile::tempdir()?;
    long_context_model(dir.path())?;
    let files = wick::weights::ModelFiles::from_dir(dir.path())?;
    let server = serve(vec![ModelSpec { id: "long".into(), files }], ServeOptions::default());
    let addr = server.addr();
    disconnect(addr);
    let start = Instant::now();
    while metric(addr, "wick_cancelled_total") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(20), "the generation was not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(metric(addr, "wick_tokens_generated_total") < 4000.0);
    assert_eq!(metric(addr, "wick_decoding"), 0.0);
    Ok(())
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() -> Result<()> {
    check_disconnect_cancels(|addr| drop(start_stream(addr, 4000)))
}

#[test]
fn a_client_that_disconnects_before_a_plain_answer_cancels_its_generation() -> Result<()> {
    // Not streamed: the answer would come only at the end, so the server learns of the
    // disconnect from the connection itself.
    check_disconnect_cancels(|addr| {
        let body = json!({ "prompt": "tell me", "max_tokens": 4000 }).to_string();
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let start = Instant::now();
        while metric(addr, "wick_decoding") < 1.0 {
            assert!(start.elapsed() < Duration::from_secs(20), "the generation did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(stream);
    })
}

#[test]
fn sigterm_finishes_the_stream_in_flight_and_exits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    long_context_model(dir.path())?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["serve", "--model", dir.path().to_str().unwrap(), "--port", "0", "--json"])
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first)?;
    let addr: SocketAddr = serde_json::from_str::<Value>(&first)?["listening"].as_str().unwrap().parse()?;
    let mut stream = start_stream(addr, 4000);
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(status.success());
    let mut rest = String::new();
    stream.read_to_string(&mut rest)?;
    let data = sse_data(&rest);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "the stream was cut:\n{rest}");
    let usage = &serde_json::from_str::<Value>(&data[data.len() - 2])?["usage"];
    assert_eq!(usage["completion_tokens"], 4000, "the stream in flight was finished in full");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            assert!(status.success(), "wick serve exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "wick serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(TcpStream::connect(addr).is_err(), "still accepting after SIGTERM");
    Ok(())
}

/// Prompts of different lengths fed together (`feed_rows`, one pass over ragged rows), then
/// decoding steps of every sequence together (`decode_rows`), give each sequence the logits it
/// gets alone.
#[test]
fn feed_rows_and_decode_rows_equal_one_sequence_at_a_time() -> Result<()> {
    use candle_core::{Device, Tensor};
    use wick::models::gpt2::GPT2LMHeadModel;
    let files = wick::weights::ModelFiles::from_dir(&fixture_path("hf/gpt2-tiny"))?;
    let (model, _) = wick::pretrained::load::<GPT2LMHeadModel>(&files, candle_core::DType::F32, &Device::Cpu)?;
    let prompts: [&[u32]; 3] = [&[5, 6, 7, 8, 9], &[10], &[11, 12, 13]];
    let prefill = |cache: &mut wick::models::gpt2::KvCache, ids: &[u32]| model.forward_last(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?, None, None, Some(cache));
    let mut batched: Vec<wick::models::gpt2::KvCache> = prompts.iter().map(|_| model.new_cache(16)).collect();
    let mut refs: Vec<&mut wick::models::gpt2::KvCache> = batched.iter_mut().collect();
    let together = model.feed_rows(&prompts, &mut refs)?;
    let mut single = vec![];
    for (r, p) in prompts.iter().enumerate() {
        let mut cache = model.new_cache(16);
        let alone = prefill(&mut cache, p)?;
        let diff = (together.get(r)? - alone.squeeze(0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "prompt {r}: logits differ by {diff}");
        single.push(cache);
    }
    // Three steps: every row together, then each row alone with its own cache.
    for step in 0..3u32 {
        let tokens: Vec<u32> = (0..3).map(|r| 20 + 3 * step + r).collect();
        let mut refs: Vec<&mut wick::models::gpt2::KvCache> = batched.iter_mut().collect();
        let together = model.decode_rows(&tokens, &mut refs)?;
        for (r, cache) in single.iter_mut().enumerate() {
            let alone = prefill(cache, &tokens[r..r + 1])?;
            let diff = (together.get(r)? - alone.squeeze(0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "step {step} row {r}: logits differ by {diff}");
        }
    }
    Ok(())
}

/// A quantized model folder (q8_0, written by `wick quantize`) serves like any other: greedy
/// completions equal `wick generate`'s on the same folder, alone and in a batch of concurrent
/// requests (the quantized products give each row the same sums whatever rows share a step).
#[test]
fn a_quantized_model_serves_what_wick_generate_gives() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let quantized = dir.path().join("gpt2-q8_0");
    let source = fixture_path("hf/gpt2-tiny");
    wick_lines(&["quantize", "--model", source.to_str().unwrap(), "--type", "q8_0", "--output", quantized.to_str().unwrap()]);
    let server = serve(vec![ModelSpec { id: "gpt2-q8".into(), files: wick::weights::ModelFiles::from_dir(&quantized)? }], ServeOptions::default());
    let addr = server.addr();
    let prompts = ["the cat sat on", "hello there", "once upon a time", "a"];
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            let args = ["generate", "--model", quantized.to_str().unwrap(), "--prompt", p, "--temperature", "0", "--max-new-tokens", "16", "--json"];
            let summary: Value = serde_json::from_str(wick_lines(&args).last().unwrap()).unwrap();
            summary["text"].as_str().unwrap().to_string()
        })
        .collect();
    let body = |p: &str| json!({ "model": "gpt2-q8", "prompt": p, "max_tokens": 16, "temperature": 0 });
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(move || complete(addr, &body(p))["choices"][0]["text"].as_str().unwrap().to_string())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, expected);
    assert_eq!(complete(addr, &body(prompts[0]))["choices"][0]["text"], expected[0].as_str());
    Ok(())
}
