//! `easel bench server`: the HTTP API under load on loopback. 64 concurrent clients (async tasks
//! on their own runtime) post prompts (latency p50/p99 of `POST /prompt`), then fetch history
//! entries and images.

use crate::api::router;
use crate::cli::{BenchArgs, ExecutionArgs};
use crate::listen::Incoming;
use crate::setup;
use crate::state::{AppState, ServerSettings};
use crate::store::Store;
use anyhow::Context;
use axum::body::Bytes;
use easel_nodes::image::io::PngCompression;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value as Json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Starts a server in `base` on a loopback port, on its own thread; its URL.
pub(super) fn start_server(base: &std::path::Path) -> anyhow::Result<String> {
    let mut execution = ExecutionArgs::default();
    execution.directories.base_directory = base.to_path_buf();
    let runtime = setup::runtime(&execution)?;
    let store = Store::open(&base.join("user/easel.db"), 10000)?;
    let state = AppState::start(runtime, ServerSettings::default(), store)?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let tokio = setup::server_runtime()?;
        tokio.block_on(async move {
            let incoming = Incoming::bind(&[SocketAddr::from(([127, 0, 0, 1], 0))], None)?;
            sender.send(axum::serve::Listener::local_addr(&incoming)?)?;
            axum::serve(incoming, router(state)).await?;
            Ok(())
        })
    });
    Ok(format!(
        "http://{}",
        receiver
            .recv_timeout(Duration::from_secs(10))
            .context("the server did not start")?
    ))
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let base = tempfile::tempdir()?;
    let url = start_server(base.path())?;

    print_header();
    let sample = easel_nodes::image::io::encode_png(&[128; 8 * 8 * 3], 8, 8, 3, &[], PngCompression::Fast)?;
    for index in 1..=100 {
        std::fs::write(base.path().join(format!("output/bench_{index:05}_.png")), &sample)?;
    }
    client_runtime()?.block_on(async {
        let client = http_client(args.clients);
        let target = url.clone();
        let (posted, ids) = load(&client, args.clients, args.requests, move |client, index| {
            let request = Request::post(format!("{target}/prompt"))
                .header("Content-Type", "application/json")
                .body(Full::new(Bytes::from(prompt(client, index))));
            request.map_err(anyhow::Error::from)
        })
        .await?;
        report("POST /prompt", args.clients, &posted);
        let ids: Vec<String> = ids
            .iter()
            .filter_map(|body| {
                serde_json::from_slice::<Json>(body).ok()?["prompt_id"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        anyhow::ensure!(!ids.is_empty(), "no prompt was accepted");

        // Let the queue drain, then read what the prompts left.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            let response = client.get(format!("{url}/prompt").parse()?).await?;
            let body = response.into_body().collect().await?.to_bytes();
            let status: Json = serde_json::from_slice(&body)?;
            if status["exec_info"]["queue_remaining"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let target = url.clone();
        let (history, _) = load(&client, args.clients, args.requests, move |client, index| {
            let id = &ids[(client * 7919 + index) % ids.len()];
            Request::get(format!("{target}/history/{id}"))
                .body(Full::new(Bytes::new()))
                .map_err(anyhow::Error::from)
        })
        .await?;
        report("GET /history/{id}", args.clients, &history);
        let target = url.clone();
        let (view, _) = load(&client, args.clients, args.requests, move |_, index| {
            let name = format!("bench_{:05}_.png", index % 100 + 1);
            Request::get(format!("{target}/view?filename={name}"))
                .body(Full::new(Bytes::new()))
                .map_err(anyhow::Error::from)
        })
        .await?;
        report("GET /view", args.clients, &view);
        Ok(std::process::ExitCode::SUCCESS)
    })
}

/// A small prompt that is cheap to execute and writes nothing, so the worker barely competes with
/// the clients.
fn prompt(client: usize, index: usize) -> String {
    json!({"client_id": format!("bench-{client}"), "prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": client * 1000 + index}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
    }})
    .to_string()
}

pub(super) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The clients' own runtime (two threads, beside the server's).
pub(super) fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// An HTTP client keeping a connection per concurrent client.
pub(super) fn http_client(clients: usize) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build_http()
}

pub(super) struct Timings {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Timings {
    /// The latency at `p` (0–1), in milliseconds.
    pub(super) fn percentile(&self, p: f64) -> f64 {
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }
}

/// Sends `requests` requests from `clients` concurrent tasks; returns the latencies and bodies.
pub(super) async fn load<F>(
    client: &HttpClient,
    clients: usize,
    requests: usize,
    make: F,
) -> anyhow::Result<(Timings, Vec<Bytes>)>
where
    F: Fn(usize, usize) -> anyhow::Result<Request<Full<Bytes>>> + Send + Sync + 'static,
{
    let make = std::sync::Arc::new(make);
    let per_client = requests.div_ceil(clients.max(1));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|index| {
            let (client, make) = (client.clone(), make.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                let mut bodies = Vec::with_capacity(per_client);
                for request_index in 0..per_client {
                    let request = make(index, request_index)?;
                    let start = Instant::now();
                    let response = client.request(request).await?;
                    let body = response.into_body().collect().await?.to_bytes();
                    latencies.push(start.elapsed());
                    bodies.push(body);
                }
                anyhow::Ok((latencies, bodies))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut bodies = Vec::new();
    for task in tasks {
        let (l, b) = task.await??;
        latencies.extend(l);
        bodies.extend(b);
    }
    let wall = started.elapsed();
    latencies.sort();
    Ok((Timings { latencies, wall }, bodies))
}

/// Waits until the server's queue is empty, so a measurement does not share the machine with
/// the worker running what the previous one queued.
pub(super) async fn wait_for_empty_queue(client: &HttpClient, url: &str) -> anyhow::Result<()> {
    loop {
        let request = Request::get(format!("{url}/prompt")).body(Full::new(Bytes::new()))?;
        let status = send_json(client, request).await?;
        if status["exec_info"]["queue_remaining"].as_u64() == Some(0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends a request and reads its JSON answer; a status other than success is an error.
pub(super) async fn send_json(client: &HttpClient, request: Request<Full<Bytes>>) -> anyhow::Result<Json> {
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
    Ok(serde_json::from_slice(&body)?)
}

/// The header of the table [`report`] prints rows of.
pub(super) fn print_header() {
    println!("| measurement | clients | requests | p50 (ms) | p99 (ms) | requests/s |");
    println!("|---|---:|---:|---:|---:|---:|");
}

pub(super) fn report(name: &str, clients: usize, timings: &Timings) {
    let rate = timings.latencies.len() as f64 / timings.wall.as_secs_f64();
    println!(
        "| {name} | {clients} | {} | {:.2} | {:.2} | {rate:.0} |",
        timings.latencies.len(),
        timings.percentile(0.5),
        timings.percentile(0.99)
    );
}
