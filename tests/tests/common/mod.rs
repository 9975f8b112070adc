//! Starting a server in-process on a free loopback port, and small HTTP helpers.
#![allow(dead_code)]

use easel_engine::NodeRegistry;
use easel_server::api::router;
use easel_server::cli::ExecutionArgs;
use easel_server::state::{AppState, ServerSettings};
use easel_server::store::Store;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A running server and its base directory (removed when dropped).
pub struct Server {
    pub api: Api,
    pub base: tempfile::TempDir,
}

/// How to reach the server; cheap to clone into blocking tasks.
#[derive(Clone)]
pub struct Api {
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Starts a server with the bundled input files, on its own runtime thread.
pub fn start() -> Server {
    start_with(ServerSettings::default())
}

/// As [`start`], with these settings (API keys, CORS, limits).
pub fn start_with(settings: ServerSettings) -> Server {
    start_custom(new_base(), settings, None)
}

/// As [`start_with`], in a base directory the test has prepared.
pub fn start_in(base: tempfile::TempDir, settings: ServerSettings) -> Server {
    start_custom(base, settings, None)
}

/// As [`start`], with another node registry.
pub fn start_with_registry(registry: NodeRegistry) -> Server {
    start_custom(new_base(), ServerSettings::default(), Some(registry))
}

fn new_base() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn start_custom(base: tempfile::TempDir, settings: ServerSettings, registry: Option<NodeRegistry>) -> Server {
    let mut args = ExecutionArgs::default();
    args.directories.base_directory = base.path().to_path_buf();
    // A copy of the bundled inputs: uploads must not touch the checkout.
    let input = base.path().join("input");
    std::fs::create_dir_all(&input).expect("input dir");
    for entry in std::fs::read_dir(workspace().join("workflows/input")).expect("bundled inputs") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), input.join(entry.file_name())).expect("copy input");
    }
    let mut runtime = easel_server::setup::runtime(&args).expect("runtime");
    if let Some(registry) = registry {
        runtime.registry = std::sync::Arc::new(registry);
    }
    let store = Store::open(&base.path().join("user/easel.db"), 10000).expect("database");
    let state = AppState::start(runtime, settings, store).expect("state");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio");
        tokio.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            sender
                .send(listener.local_addr().expect("address"))
                .expect("report address");
            axum::serve(listener, router(state)).await.expect("serve");
        });
    });
    let address = receiver.recv_timeout(Duration::from_secs(10)).expect("server started");
    Server {
        api: Api {
            url: format!("http://{address}"),
        },
        base,
    }
}

/// An HTTP client that returns error statuses instead of failing on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

impl Api {
    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.url.replacen("http://", "ws://", 1))
    }

    /// (status, content type, body) of a request, `body` making it a POST.
    pub fn request(&self, path: &str, body: Option<&str>) -> (u16, String, Vec<u8>) {
        let url = format!("{}{path}", self.url);
        let mut response = match body {
            Some(body) => agent().post(url).header("Content-Type", "application/json").send(body),
            None => agent().get(url).call(),
        }
        .expect("request");
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        (
            response.status().as_u16(),
            content_type,
            response.body_mut().read_to_vec().expect("body"),
        )
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, String, String) {
        let (status, content_type, bytes) = self.request(path, Some(body));
        (status, content_type, String::from_utf8(bytes).expect("UTF-8 body"))
    }

    pub fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        self.request(path, None)
    }

    pub fn get_json(&self, path: &str) -> Json {
        let (status, _, body) = self.get(path);
        assert_eq!(status, 200, "{path}");
        serde_json::from_slice(&body).expect("JSON body")
    }

    /// Polls `/history/{id}` until the prompt has finished.
    pub fn wait_for_history(&self, prompt_id: &str) -> Json {
        let started = Instant::now();
        loop {
            let history = self.get_json(&format!("/history/{prompt_id}"));
            if let Some(entry) = history.get(prompt_id) {
                return entry.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "prompt {prompt_id} never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
