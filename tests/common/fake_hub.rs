//! A minimal stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for the download tests.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::time::Duration;

/// The commit every fake repo is at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `repo_dir` as the repo `org/tiny` at `main`: `GET /api/models/org/tiny/revision/main`
/// lists its files, and `GET /org/tiny/resolve/main/{file}` serves them with the headers hf-hub
/// reads (`x-repo-commit`, `etag`, `content-range`), honouring `Range`. Anything else is a 404.
/// With `throttle`, file bodies go out in 4 KiB pieces with that pause between them (to catch a
/// download midway). Each connection has its own thread. Returns the endpoint URL.
pub fn fake_hub(repo_dir: PathBuf, throttle: Option<Duration>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let repo_dir = repo_dir.clone();
            std::thread::spawn(move || serve(stream, &repo_dir, throttle));
        }
    });
    endpoint
}

fn serve(mut stream: std::net::TcpStream, repo_dir: &std::path::Path, throttle: Option<Duration>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range_start = 0usize;
    let mut range_end: Option<usize> = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some(range) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = range.trim().split_once('-').unwrap();
            range_start = a.parse().unwrap();
            range_end = b.parse().ok();
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut files: Vec<String> = std::fs::read_dir(repo_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    let mut slow = false;
    let (status, headers, body): (&str, String, Vec<u8>) = if path == "/api/models/org/tiny/revision/main" {
        let siblings: Vec<_> = files.iter().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let json = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
        ("200 OK", "content-type: application/json\r\n".into(), json.into_bytes())
    } else if let Some(file) = path.strip_prefix("/org/tiny/resolve/main/").filter(|f| files.iter().any(|x| x == f)) {
        let bytes = std::fs::read(repo_dir.join(file)).unwrap();
        let end = range_end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
        let headers = format!(
            "x-repo-commit: {COMMIT}\r\netag: \"{}-{}\"\r\ncontent-range: bytes {range_start}-{end}/{}\r\n",
            file.replace('.', "-"),
            bytes.len(),
            bytes.len()
        );
        // Only the real download (not hf-hub's 1-byte metadata probe) is slowed down.
        slow = throttle.is_some() && end > range_start;
        ("206 Partial Content", headers, bytes[range_start..=end].to_vec())
    } else {
        ("404 Not Found", String::new(), b"{\"error\":\"Repository not found\"}".to_vec())
    };
    let head = format!("HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n", body.len());
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    match throttle.filter(|_| slow) {
        None => {
            let _ = stream.write_all(&body);
        }
        Some(pause) => {
            for piece in body.chunks(4096) {
                if stream.write_all(piece).and_then(|_| stream.flush()).is_err() {
                    return;
                }
                std::thread::sleep(pause);
            }
        }
    }
}
