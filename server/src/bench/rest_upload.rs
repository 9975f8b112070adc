//! `easel bench rest`, second part: the memory one `/v1/generate` request with a 4 MP PNG holds
//! from its first byte to its prompt queued, as multipart (the file as a part) and as JSON (the
//! file as base64): the peak of the bytes held in large blocks over the request, less what was
//! held before (the binary's allocator counts them, [`crate::allocator`]). The worker is kept
//! busy meanwhile, so no image is decoded for running.

use super::server::{client_runtime, http_client, send_json, start_server, HttpClient};
use crate::allocator::{large_blocks, reset_large_block_peak};
use anyhow::Context;
use axum::body::Bytes;
use base64::Engine;
use easel_nodes::image::io::PngCompression;
use http_body_util::Full;
use hyper::Request;
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

/// The uploaded image's side: 2048² is 4 MP.
const SIDE: usize = 2048;

pub fn measure() -> anyhow::Result<()> {
    let base = tempfile::tempdir()?;
    easel_models::testmodels::write_test_models(&base.path().join("models"))?;
    let url = start_server(base.path())?;
    let png = noise_png(SIDE)?;
    let image = fields(json!({"mode": "img2img", "denoise": 0.5}));
    let multipart = multipart_body(&image, &png);
    let mut inline = image.clone();
    inline["image"] = json!(base64::engine::general_purpose::STANDARD.encode(&png));
    let inline = Bytes::from(inline.to_string());
    client_runtime()?.block_on(async {
        let client = http_client(1);
        // A long task holds the worker; the requests measured queue behind it.
        let blocker = post(
            &client,
            &url,
            "application/json",
            Bytes::from(fields(json!({"steps": 1000})).to_string()),
        )
        .await?;
        let blocker = blocker["id"].as_str().context("no task id")?.to_string();
        wait_until_running(&client, &url, &blocker).await?;
        // Once with a small image, so nothing measured is a first use.
        let small = multipart_body(&image, &noise_png(64)?);
        post(&client, &url, MULTIPART, small).await?;
        println!();
        println!(
            "| upload of a 4 MP PNG ({:.1} MB) | held at most, request to queued | × the file |",
            mb(png.len())
        );
        println!("|---|---:|---:|");
        for (name, content_type, body) in [
            ("multipart/form-data", MULTIPART, multipart),
            ("JSON, base64", "application/json", inline),
        ] {
            // The client's copy of the body is held throughout (this clone keeps it), so it
            // counts in `before` and nowhere else.
            let (before, _) = large_blocks();
            reset_large_block_peak();
            post(&client, &url, content_type, body.clone()).await?;
            let held = large_blocks().1.saturating_sub(before);
            drop(body);
            println!(
                "| {name} | {:.1} MB | {:.2} |",
                mb(held),
                held as f64 / png.len() as f64
            );
        }
        let request = Request::get(format!("{url}/v1/tasks/{blocker}")).body(Full::new(Bytes::new()))?;
        anyhow::ensure!(
            send_json(&client, request).await?["status"] == "running",
            "the worker was not busy the whole time: the numbers may include decoding"
        );
        Ok(())
    })
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// The request's fields on the tiny SD1 checkpoint, queued at once.
fn fields(extra: Json) -> Json {
    let mut fields = json!({
        "family": "sd15", "model": easel_models::testmodels::TINY_SD1_CHECKPOINT,
        "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1, "seed": 1, "async": true,
    });
    if let (Some(fields), Json::Object(extra)) = (fields.as_object_mut(), extra) {
        fields.extend(extra);
    }
    fields
}

/// A PNG of noise, `side` pixels square (noise does not compress: at 4 MP the file is as large as
/// a photo's).
fn noise_png(side: usize) -> anyhow::Result<Vec<u8>> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let pixels: Vec<u8> = (0..side * side * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    Ok(easel_nodes::image::io::encode_png(
        &pixels,
        side,
        side,
        3,
        &[],
        PngCompression::Fast,
    )?)
}

const MULTIPART: &str = "multipart/form-data; boundary=easel-bench-boundary";

/// A multipart body of these fields and the PNG as the `image` file.
fn multipart_body(fields: &Json, png: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(png.len() + 2048);
    for (name, value) in fields.as_object().into_iter().flatten() {
        let value = value.as_str().map_or_else(|| value.to_string(), str::to_string);
        body.extend(
            format!("--easel-bench-boundary\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    body.extend(
        b"--easel-bench-boundary\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.png\"\r\n\
          Content-Type: image/png\r\n\r\n",
    );
    body.extend(png);
    body.extend(b"\r\n--easel-bench-boundary--\r\n");
    Bytes::from(body)
}

/// Posts a `/v1/generate` request; its JSON answer.
pub(super) async fn post(client: &HttpClient, url: &str, content_type: &str, body: Bytes) -> anyhow::Result<Json> {
    let request = Request::post(format!("{url}/v1/generate"))
        .header("Content-Type", content_type)
        .body(Full::new(body))?;
    send_json(client, request).await
}

async fn wait_until_running(client: &HttpClient, url: &str, id: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let request = Request::get(format!("{url}/v1/tasks/{id}")).body(Full::new(Bytes::new()))?;
        if send_json(client, request).await?["status"] == "running" {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "the task did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
