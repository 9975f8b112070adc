//! `easel bench rest`: what the REST API adds over `POST /prompt`. The same SD1.x text-to-image
//! request on the tiny model, posted as the API prompt the REST API
//! builds (`POST /prompt`) and as a `/v1/generate` request answered at once (`"async": true`):
//! request to queued, p50 and p99 of each and the difference, by one client (each request's own
//! cost) and by 64 at once (the cost under contention), five rounds of each, alternating; each
//! measurement starts with an empty queue. Then the memory of a request uploading a 4 MP PNG (`rest_upload`).

use super::server::{client_runtime, http_client, load, print_header, report, start_server, wait_for_empty_queue};
use crate::cli::BenchArgs;
use axum::body::Bytes;
use http_body_util::Full;
use hyper::Request;
use serde_json::{json, Value as Json};

/// Measurements of each kind, alternating.
const ROUNDS: usize = 5;

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
    // The prompt the REST API builds for these fields (its history entry has it).
    let workflow =
        crate::api::bundled_workflow("rest/v1/sd_text2img.json").ok_or_else(|| anyhow::anyhow!("no workflow"))?;
    let mut prompt = workflow;
    for (node, input, value) in [
        ("1", "ckpt_name", json!(easel_models::testmodels::TINY_SD1_CHECKPOINT)),
        ("2", "text", fields["prompt"].clone()),
        ("3", "text", fields["negative_prompt"].clone()),
        ("4", "width", json!(64)),
        ("4", "height", json!(64)),
        ("5", "steps", json!(1)),
    ] {
        prompt[node]["inputs"][input] = value;
    }
    // Built prompts leave the manifests out.
    for node in prompt.as_object_mut().into_iter().flat_map(|nodes| nodes.values_mut()) {
        if let Some(meta) = node.get_mut("_meta").and_then(Json::as_object_mut) {
            meta.remove("easel");
        }
    }
    let prompt_body = json!({"prompt": prompt}).to_string();
    let rest_body = fields.to_string();

    print_header();
    client_runtime()?.block_on(async {
        let client = http_client(args.clients);
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
            let [prompt, rest] = p50.map(median);
            overheads.push((clients, rest - prompt));
        }
        println!();
        for (clients, overhead) in overheads {
            println!("REST overhead at p50 (median of {ROUNDS} rounds), {clients} client(s): {overhead:+.2} ms");
        }
        // Its worker's allocations would count in the memory measured next.
        wait_for_empty_queue(&client, &url).await
    })?;
    super::rest_upload::measure()?;
    Ok(std::process::ExitCode::SUCCESS)
}
