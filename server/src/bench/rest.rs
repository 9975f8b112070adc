//! `easel bench rest`: what the REST API adds over `POST /prompt`. The same SD1.x text-to-image
//! request on the tiny model, posted as the API prompt the REST API builds (`POST /prompt`; read
//! back from the history entry of a first request) and as a `/v1/generate` request answered at
//! once (`"async": true`): request to queued, p50 and p99 of each and the difference, by one client
//! (each request's own cost) and by 64 at once (the cost under contention), eleven rounds of each,
//! alternating, the overhead being the median of each round's difference (the run-to-run spread of
//! one 64-client round is a few tenths of a millisecond); each measurement starts with an empty
//! queue. Then the memory of a request uploading a 4 MP PNG (`rest_upload`).

use super::server::{
    client_runtime, http_client, load, print_header, report, send_json, start_server, wait_for_empty_queue, HttpClient,
};
use crate::cli::BenchArgs;
use axum::body::Bytes;
use http_body_util::Full;
use hyper::Request;
use serde_json::json;

/// Measurements of each kind, alternating.
const ROUNDS: usize = 11;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let base = tempfile::tempdir()?;
    easel_models::testmodels::write_test_models(&base.path().join("models"))?;
    let url = start_server(base.path())?;
    let fields = json!({
        "family": "sd15", "model": easel_models::testmodels::TINY_SD1_CHECKPOINT,
        "prompt": "a lighthouse on a cliff", "negative_prompt": "blurry",
        "width": 64, "height": 64, "steps": 1, "sampler": "euler", "scheduler": "normal", "seed": 1,
        "async": true,
    });
    let rest_body = fields.to_string();

    print_header();
    client_runtime()?.block_on(async {
        let client = http_client(args.clients);
        let prompt_body = built_prompt(&client, &url, &rest_body).await?;
        let mut overheads = Vec::new();
        // One client shows each request's own cost; many show it under contention.
        for clients in [1, args.clients] {
            let requests = if clients == 1 {
                args.requests.min(500)
            } else {
                args.requests
            };
            // The two alternate, so a drift of the machine's speed reaches both alike.
            let mut p50 = [Vec::new(), Vec::new()];
            for _ in 0..ROUNDS {
                for (kind, (name, path, body)) in [
                    ("POST /prompt (the built prompt)", "/prompt", &prompt_body),
                    ("POST /v1/generate (async)", "/v1/generate", &rest_body),
                ]
                .into_iter()
                .enumerate()
                {
                    wait_for_empty_queue(&client, &url).await?;
                    let target = format!("{url}{path}");
                    let body = Bytes::from(body.clone());
                    let (timings, answers) = load(&client, clients, requests, move |_, _| {
                        Request::post(target.as_str())
                            .header("Content-Type", "application/json")
                            .body(Full::new(body.clone()))
                            .map_err(anyhow::Error::from)
                    })
                    .await?;
                    let accepted = answers
                        .iter()
                        .filter_map(|answer| serde_json::from_slice::<serde_json::Value>(answer).ok())
                        .filter(|answer| answer.get("prompt_id").or_else(|| answer.get("id")).is_some())
                        .count();
                    anyhow::ensure!(
                        accepted == answers.len(),
                        "{name}: {} of {} requests were refused",
                        answers.len() - accepted,
                        answers.len()
                    );
                    report(name, clients, &timings);
                    p50[kind].push(timings.percentile(0.5));
                }
            }
            let [prompt, rest] = p50;
            let differences = rest.iter().zip(&prompt).map(|(rest, prompt)| rest - prompt).collect();
            overheads.push((clients, median(differences)));
        }
        println!();
        for (clients, overhead) in overheads {
            println!(
                "REST overhead at p50 (median of {ROUNDS} rounds' differences), {clients} client(s): {overhead:+.2} ms"
            );
        }
        // Its worker's allocations would count in the memory measured next.
        wait_for_empty_queue(&client, &url).await
    })?;
    super::rest_upload::measure()?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// The body of a `POST /prompt` queuing exactly the prompt the REST API builds for `rest_body`:
/// the one its history entry shows.
async fn built_prompt(client: &HttpClient, url: &str, rest_body: &str) -> anyhow::Result<String> {
    let task = super::rest_upload::post(client, url, "application/json", Bytes::from(rest_body.to_string())).await?;
    let id = task["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no task id in {task}"))?;
    wait_for_empty_queue(client, url).await?;
    let request = Request::get(format!("{url}/history/{id}")).body(Full::new(Bytes::new()))?;
    let history = send_json(client, request).await?;
    let prompt = &history[id]["prompt"][2];
    anyhow::ensure!(prompt.is_object(), "no prompt in the history entry of {id}");
    Ok(json!({"prompt": prompt}).to_string())
}
