//! Webhooks of REST tasks, end to end with the `easel` binary and a receiver on a loopback port:
//! the delivery is signed as Standard Webhooks specifies, a failing receiver is retried with the
//! same id and body, and a `kill -9` between a task's end and its delivery delivers it exactly once
//! after the restart.

mod common;

use base64::Engine;
use common::{free_port, Easel};
use hmac::{Hmac, Mac};
use serde_json::{json, Value as Json};
use sha2::Sha256;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A request the receiver got: its headers (names lower-cased) and body.
type Received = (Vec<(String, String)>, String);

/// A webhook receiver: records each request and fails the first `failures`.
struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(port: u16, failures: usize) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("receiver binds");
        let received = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(AtomicUsize::new(0));
        let log = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut headers = Vec::new();
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    let Some((name, value)) = line.trim_end().split_once(':') else {
                        break;
                    };
                    headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
                }
                let length: usize = headers
                    .iter()
                    .find(|(name, _)| name == "content-length")
                    .map_or(0, |(_, value)| value.parse().unwrap());
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                log.lock().unwrap().push((headers, String::from_utf8(body).unwrap()));
                let status = if answered.fetch_add(1, Ordering::SeqCst) < failures {
                    "500 Internal Server Error"
                } else {
                    "204 No Content"
                };
                let _ = stream.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                );
            }
        });
        Receiver { port, received }
    }

    fn wait_for(&self, count: usize, within: Duration) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let received = self.received.lock().unwrap().clone();
            if received.len() >= count {
                return received;
            }
            assert!(
                started.elapsed() < within,
                "{} of {count} webhooks arrived",
                received.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_default()
}

/// Checks the `webhook-signature` of a delivery.
fn verify(headers: &[(String, String)], body: &str) {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let signed = format!(
        "{}.{}.{body}",
        header(headers, "webhook-id"),
        header(headers, "webhook-timestamp")
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(signed.as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(header(headers, "webhook-signature"), expected);
}

/// Starts `easel serve` signing webhooks and allowing them to loopback receivers.
fn start(base: &std::path::Path) -> Easel {
    Easel::start(
        base,
        free_port(),
        &["--webhook-secret", SECRET, "--webhook-allow-private"],
    )
}

/// Queues an async task reporting to a webhook on `webhook_port`; its id.
fn generate(easel: &Easel, webhook_port: u16) -> String {
    let request = json!({
        "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "async": true,
        "webhook_url": format!("http://127.0.0.1:{webhook_port}/hook"),
    });
    let (status, body) = easel.post("/v1/generate", &request);
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_string()
}

fn wait_until_ended(easel: &Easel, id: &str) -> Json {
    let started = Instant::now();
    loop {
        let task = easel.get(&format!("/v1/tasks/{id}"));
        if task["status"] != "pending" && task["status"] != "running" {
            return task;
        }
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn base_with_models() -> tempfile::TempDir {
    let base = tempfile::tempdir().unwrap();
    easel_models::testmodels::write_test_models(&base.path().join("models")).unwrap();
    base
}

#[test]
fn deliveries_are_signed_and_a_failing_receiver_is_retried_with_the_same_id() {
    let base = base_with_models();
    let easel = start(base.path());
    let receiver = Receiver::start(free_port(), 1);
    let id = generate(&easel, receiver.port);
    let received = receiver.wait_for(2, Duration::from_secs(60));
    let ((first_headers, first_body), (headers, body)) = (&received[0], &received[1]);
    assert_eq!(header(first_headers, "webhook-id"), header(headers, "webhook-id"));
    assert_eq!(first_body, body);
    verify(headers, body);
    verify(first_headers, first_body);
    let task: Json = serde_json::from_str(body).unwrap();
    assert_eq!(
        (task["id"].as_str(), task["status"].as_str()),
        (Some(id.as_str()), Some("succeeded"))
    );
    assert!(task["images"][0]["url"].is_string());
    // Delivered: no third attempt.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(receiver.received.lock().unwrap().len(), 2);
}

#[test]
fn a_restart_between_the_end_of_a_task_and_its_delivery_delivers_it_once() {
    let base = base_with_models();
    let port = free_port();
    let easel = start(base.path());
    // Nobody listens yet: the first attempt fails, the delivery waits in the store.
    let id = generate(&easel, port);
    assert_eq!(wait_until_ended(&easel, &id)["status"], "succeeded");
    std::thread::sleep(Duration::from_millis(300));
    easel.kill();
    let receiver = Receiver::start(port, 0);
    let _restarted = start(base.path());
    let received = receiver.wait_for(1, Duration::from_secs(60));
    verify(&received[0].0, &received[0].1);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(receiver.received.lock().unwrap().len(), 1, "delivered more than once");
}
