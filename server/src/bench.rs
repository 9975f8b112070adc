//! `easel bench server`: the HTTP API under load on loopback. 64 clients post prompts (latency
//! p50/p99 of `POST /prompt`), then fetch history entries and images (requests per second).

use crate::api::router;
use crate::cli::{BenchArgs, ExecutionArgs};
use crate::setup;
use crate::state::{AppState, ServerSettings};
use crate::store::Store;
use anyhow::Context;
use easel_nodes::image_io::PngCompression;
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

pub fn bench(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let base = tempfile::tempdir()?;
    let mut execution = ExecutionArgs::default();
    execution.directories.base_directory = base.path().to_path_buf();
    let runtime = setup::runtime(&execution)?;
    let store = Store::open(&base.path().join("user/easel.db"), 10000)?;
    let state = AppState::start(runtime, ServerSettings::default(), store)?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        tokio.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            sender.send(listener.local_addr()?)?;
            axum::serve(listener, router(state)).await?;
            Ok(())
        })
    });
    let url = format!(
        "http://{}",
        receiver
            .recv_timeout(Duration::from_secs(10))
            .context("the server did not start")?
    );

    println!("| measurement | clients | requests | p50 (ms) | p99 (ms) | requests/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    // Cheap to execute and writes nothing, so the worker barely competes with the clients.
    let prompt = |client: usize, index: usize| {
        json!({"client_id": format!("bench-{client}"), "prompt": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": client * 1000 + index}},
            "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
        }})
        .to_string()
    };
    let sample = easel_nodes::image_io::encode_png(&[128; 8 * 8 * 3], 8, 8, 3, &[], PngCompression::Fast)?;
    for index in 1..=100 {
        std::fs::write(base.path().join(format!("output/bench_{index:05}_.png")), &sample)?;
    }
    let (posted, ids) = load(&url, args.clients, args.requests, |agent, url, client, index| {
        let mut response = agent
            .post(format!("{url}/prompt"))
            .header("Content-Type", "application/json")
            .send(prompt(client, index))?;
        let body: Json = serde_json::from_reader(response.body_mut().as_reader())?;
        Ok(body["prompt_id"].as_str().unwrap_or_default().to_string())
    })?;
    report("POST /prompt", args.clients, &posted);

    // Let the queue drain, then read what the prompts left.
    let agent = http_agent();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let mut response = agent.get(format!("{url}/prompt")).call()?;
        let status: Json = serde_json::from_reader(response.body_mut().as_reader())?;
        if status["exec_info"]["queue_remaining"] == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (history, _) = load(&url, args.clients, args.requests, |agent, url, client, index| {
        let id = &ids[(client * 7919 + index) % ids.len()];
        agent
            .get(format!("{url}/history/{id}"))
            .call()?
            .body_mut()
            .read_to_vec()?;
        Ok(String::new())
    })?;
    report("GET /history/{id}", args.clients, &history);
    let (view, _) = load(&url, args.clients, args.requests, |agent, url, _, index| {
        let name = format!("bench_{:05}_.png", index % 100 + 1);
        agent
            .get(format!("{url}/view?filename={name}"))
            .call()?
            .body_mut()
            .read_to_vec()?;
        Ok(String::new())
    })?;
    report("GET /view", args.clients, &view);
    Ok(std::process::ExitCode::SUCCESS)
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

struct Timings {
    latencies: Vec<Duration>,
    wall: Duration,
}

/// Latencies of `requests` calls spread over `clients` threads, and whatever the calls returned.
fn load<F>(url: &str, clients: usize, requests: usize, call: F) -> anyhow::Result<(Timings, Vec<String>)>
where
    F: Fn(&ureq::Agent, &str, usize, usize) -> anyhow::Result<String> + Sync,
{
    let call = &call;
    let per_client = requests.div_ceil(clients.max(1));
    let started = Instant::now();
    let results: Vec<anyhow::Result<(Vec<Duration>, Vec<String>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|client| {
                scope.spawn(move || {
                    let agent = http_agent();
                    let mut latencies = Vec::with_capacity(per_client);
                    let mut outputs = Vec::with_capacity(per_client);
                    for index in 0..per_client {
                        let start = Instant::now();
                        outputs.push(call(&agent, url, client, index)?);
                        latencies.push(start.elapsed());
                    }
                    Ok((latencies, outputs))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a client panicked"))))
            .collect()
    });
    let wall = started.elapsed();
    let mut latencies = Vec::new();
    let mut outputs = Vec::new();
    for result in results {
        let (l, o) = result?;
        latencies.extend(l);
        outputs.extend(o);
    }
    latencies.sort();
    Ok((Timings { latencies, wall }, outputs))
}

fn report(name: &str, clients: usize, timings: &Timings) {
    let percentile = |p: f64| {
        let index = ((timings.latencies.len() as f64 - 1.0) * p).round() as usize;
        timings.latencies.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let rate = timings.latencies.len() as f64 / timings.wall.as_secs_f64();
    println!(
        "| {name} | {clients} | {} | {:.2} | {:.2} | {rate:.0} |",
        timings.latencies.len(),
        percentile(0.5),
        percentile(0.99)
    );
}
