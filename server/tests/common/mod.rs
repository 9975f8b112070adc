//! Helpers shared by the tests that start the `easel` binary.
#![allow(dead_code)]

use serde_json::Value as Json;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on (free when asked; the test binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// An HTTP client that returns error statuses instead of failing on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// A running `easel serve` process, killed when dropped.
pub struct Easel {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Drop for Easel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Easel {
    /// Starts `easel serve` on `port` in `base` with `extra` options; returns once it answers.
    pub fn start(base: &Path, port: u16, extra: &[&str]) -> Easel {
        let child = Command::new(env!("CARGO_BIN_EXE_easel"))
            .args(["serve", "--port", &port.to_string(), "--base-directory"])
            .arg(base)
            .args(extra)
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

    pub fn get(&self, path: &str) -> Json {
        let mut response = agent().get(format!("{}{path}", self.url)).call().unwrap();
        serde_json::from_reader(response.body_mut().as_reader()).unwrap()
    }

    /// A JSON POST: the status and the JSON answer (`null` when it is not JSON).
    pub fn post(&self, path: &str, body: &Json) -> (u16, Json) {
        let mut response = agent()
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        (
            response.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Json::Null),
        )
    }

    /// Stops the process at once (`kill -9`).
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}
