//! Model downloads from a local HTTP server (never the network): `easel models download` and
//! `POST /v1/models/download` resume a dropped transfer with a `Range` request, check the SHA-256,
//! rename the file into its folder only when complete, and report progress as server-sent events
//! and on the WebSocket.

mod common;

use common::{free_port, Easel};
use futures_util::StreamExt;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The served model: 3 MB of varied bytes.
fn blob() -> Vec<u8> {
    (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A file server that honours `Range` and drops the first transfer halfway. Each request's
/// `Range` header (or none) is recorded.
struct FileServer {
    url: String,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

fn serve_file(bytes: Vec<u8>) -> FileServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/files/tiny%20model.safetensors",
        listener.local_addr().unwrap().port()
    );
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let log = ranges.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = None;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|read| read > 2) {
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = value.trim().trim_end_matches('-').parse::<usize>().ok();
                }
                line.clear();
            }
            let first = {
                let mut log = log.lock().unwrap();
                log.push(range.map(|start| format!("bytes={start}-")));
                log.len() == 1
            };
            let start = range.unwrap_or(0);
            let (status, extra) = match range {
                Some(start) => (
                    "206 Partial Content",
                    format!("content-range: bytes {start}-{}/{}\r\n", bytes.len() - 1, bytes.len()),
                ),
                None => ("200 OK", String::new()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n",
                bytes.len() - start
            );
            let _ = stream.write_all(head.as_bytes());
            // The first transfer breaks off halfway.
            let end = if first { bytes.len() / 2 } else { bytes.len() };
            let _ = stream.write_all(&bytes[start..end]);
        }
    });
    FileServer { url, ranges }
}

#[test]
fn the_cli_downloads_resumes_and_checks_the_checksum() {
    let bytes = blob();
    let files = serve_file(bytes.clone());
    let base = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_easel"))
            .args(["models", "download", &files.url, "--folder", "vae", "--base-directory"])
            .arg(base.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let output = run(&["--sha256", &sha256_hex(&bytes)]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let saved = base.path().join("models/vae/tiny model.safetensors");
    assert_eq!(std::fs::read(&saved).unwrap(), bytes);
    assert_eq!(
        *files.ranges.lock().unwrap(),
        [None, Some(format!("bytes={}-", bytes.len() / 2))]
    );
    // Again: the file exists, nothing is fetched.
    let output = run(&[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
    // A wrong checksum leaves nothing behind.
    let output = run(&["--name", "other.safetensors", "--sha256", &"0".repeat(64)]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("SHA-256"));
    let names: Vec<_> = std::fs::read_dir(base.path().join("models/vae"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["tiny model.safetensors"]);
}

/// `POST /v1/models/download` on the server at `url`: the status and the body's text (a stream's
/// events, or JSON).
fn post(url: &str, body: Json) -> (u16, String) {
    let mut response = common::agent()
        .post(format!("{url}/v1/models/download"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    (
        response.status().as_u16(),
        response.body_mut().read_to_string().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_download_route_streams_progress_and_tells_websocket_clients() {
    let bytes = blob();
    let files = serve_file(bytes.clone());
    let base = tempfile::tempdir().unwrap();
    let easel = Easel::start(base.path(), free_port(), &["--download-allow-private"]);
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{}/ws?clientId=watcher", easel.url.replacen("http", "ws", 1)))
            .await
            .unwrap();
    let request = json!({"url": files.url, "folder": "loras", "sha256": sha256_hex(&bytes), "stream": true});
    let address = easel.url.clone();
    let (status, text) = tokio::task::spawn_blocking(move || post(&address, request))
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let events: Vec<Json> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| serde_json::from_str(data.trim()).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(
        (last["status"].as_str(), last["percent"].as_f64()),
        (Some("done"), Some(100.0)),
        "{events:?}"
    );
    assert_eq!(last["sha256"], sha256_hex(&bytes));
    let saved = base.path().join("models/loras/tiny model.safetensors");
    assert_eq!(std::fs::read(saved).unwrap(), bytes);
    // The WebSocket client heard about it.
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(frame)) = socket.next().await {
            if let Ok(message) = serde_json::from_str::<Json>(frame.to_text().unwrap_or_default()) {
                if message["type"] == "easel_download" && message["data"]["status"] == "done" {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(heard, Ok(true));

    let address = easel.url.clone();
    let files_url = files.url.clone();
    tokio::task::spawn_blocking(move || {
        // The same file again: 409; bad folder, checksum or name: 400 naming the field.
        let (status, text) = post(&address, json!({"url": files_url, "folder": "loras"}));
        assert_eq!(status, 409, "{text}");
        for (body, field) in [
            (json!({"url": files_url, "folder": "nowhere"}), "folder"),
            (json!({"url": files_url, "sha256": "abc"}), "sha256"),
            (json!({"url": files_url, "name": "../escape.safetensors"}), "name"),
            (json!({"url": files_url, "name": "notes.txt"}), "name"),
            (json!({"url": "ftp://example.com/model.safetensors"}), "url"),
        ] {
            let (status, text) = post(&address, body.clone());
            let error: Json = serde_json::from_str(&text).unwrap();
            assert_eq!(
                (status, error["error"]["field"].as_str()),
                (400, Some(field)),
                "{body}: {text}"
            );
        }
    })
    .await
    .unwrap();

    // Without --download-allow-private, a loopback URL is refused.
    let strict = Easel::start(base.path(), free_port(), &[]);
    let address = strict.url.clone();
    let files_url = files.url.clone();
    tokio::task::spawn_blocking(move || {
        let (status, text) = post(&address, json!({"url": files_url, "name": "x.safetensors"}));
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("private"), "{text}");
    })
    .await
    .unwrap();
}
