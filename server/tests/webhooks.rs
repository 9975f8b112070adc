//! Webhooks of REST tasks, end to end with the `easel` binary and a receiver on a loopback port:
//! the delivery is signed as Standard Webhooks specifies, a failing receiver is retried with the
//! same id and body, and a `kill -9` between a task's end and its delivery delivers it exactly once
//! after the restart.

mod common;

use base64::Engine;
use common::free_port;
use hmac::{Hmac, Mac};
use serde_json::{json, Value as Json};
use sha2::Sha256;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A webhook receiver: records each request (headers, body) and fails the first `failures`.
struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<(Vec<(String, String)>, String)>>>,
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

    fn wait_for(&self, count: usize, within: Duration) -> Vec<(Vec<(String, String)>, String)> {
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

struct Easel {
    child: Child,
    url: String,
}

impl Drop for Easel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn start(base: &std::path::Path) -> Easel {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_easel"))
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--base-directory",
            base.to_str().unwrap(),
        ])
        .args(["--webhook-secret", SECRET, "--webhook-allow-private"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("easel starts");
    let easel = Easel {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let started = Instant::now();
    while agent().get(format!("{}/healthz", easel.url)).call().is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the server never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    easel
}

impl Easel {
    fn generate(&self, webhook_port: u16) -> String {
        let request = json!({
            "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "async": true,
            "webhook_url": format!("http://127.0.0.1:{webhook_port}/hook"),
        });
        let mut response = agent()
            .post(format!("{}/v1/generate", self.url))
            .header("Content-Type", "application/json")
            .send(request.to_string())
            .unwrap();
        let body: Json = serde_json::from_reader(response.body_mut().as_reader()).unwrap();
        assert_eq!(response.status().as_u16(), 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    fn wait_until_ended(&self, id: &str) -> Json {
        let started = Instant::now();
        loop {
            let mut response = agent().get(format!("{}/v1/tasks/{id}", self.url)).call().unwrap();
            let task: Json = serde_json::from_reader(response.body_mut().as_reader()).unwrap();
            if task["status"] != "pending" && task["status"] != "running" {
                return task;
            }
            assert!(started.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(50));
        }
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
    let id = easel.generate(receiver.port);
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
    let mut easel = start(base.path());
    // Nobody listens yet: the first attempt fails, the delivery waits in the store.
    let id = easel.generate(port);
    assert_eq!(easel.wait_until_ended(&id)["status"], "succeeded");
    std::thread::sleep(Duration::from_millis(300));
    easel.child.kill().unwrap();
    easel.child.wait().unwrap();
    let receiver = Receiver::start(port, 0);
    let _restarted = start(base.path());
    let received = receiver.wait_for(1, Duration::from_secs(60));
    verify(&received[0].0, &received[0].1);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(receiver.received.lock().unwrap().len(), 1, "delivered more than once");
}
