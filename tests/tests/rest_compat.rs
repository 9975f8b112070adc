//! The drop-in routes over real HTTP on the tiny models: requests shaped as in
//! `shared/docs/rest-api.md` for the per-family API, GenServe and FooocusAPI, answered in their
//! shapes; `--compat` switching them, and GenServe's `/models` only when it is alone.

mod common;

use base64::Engine;
use common::{agent, start, start_with, Api, Server};
use easel_server::rest::compat::Compat;
use easel_server::state::ServerSettings;
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

fn with_models(server: Server) -> Server {
    easel_models::testmodels::write_test_models(&server.base.path().join("models")).unwrap();
    server
}

/// (status, content type, body) of a JSON POST.
fn post(api: &Api, path: &str, body: &Json, accept: Option<&str>) -> (u16, String, Vec<u8>) {
    let mut request = agent()
        .post(format!("{}{path}", api.url))
        .header("Content-Type", "application/json");
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    let mut response = request.send(body.to_string()).unwrap();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        response.status().as_u16(),
        content_type,
        response.body_mut().read_to_vec().unwrap(),
    )
}

fn post_json(api: &Api, path: &str, body: &Json) -> (u16, Json) {
    let (status, _, bytes) = post(api, path, body, None);
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&bytes))),
    )
}

fn png_b64(width: u32, height: u32, white_middle: bool) -> String {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        if white_middle {
            let inside = (16..48).contains(&x) && (16..48).contains(&y);
            image::Rgb(if inside { [255; 3] } else { [0; 3] })
        } else {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 90])
        }
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes.into_inner())
}

fn decode(data: &Json) -> image::DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.as_str().unwrap())
        .unwrap();
    image::load_from_memory(&bytes).unwrap()
}

#[test]
fn the_family_routes_answer_image_base64() {
    let server = with_models(start());
    let api = &server.api;
    let small =
        json!({"width": 64, "height": 64, "steps": 2, "seed": 5, "sampler_name": "euler", "scheduler": "normal"});
    let request = |extra: Json| {
        let mut body = small.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    // SD1.5 text-to-image with a LoRA stack, as the service's clients send it.
    let (status, body) = post_json(
        api,
        "/sd15/generate",
        &request(json!({
            "checkpoint": "easel_tiny_sd1.safetensors", "prompt_positive": "a red barn", "gen_type": "t2i",
            "lora_requests": [{"lora": "easel_tiny_sd1_lora.safetensors", "strength_model": 0.7, "strength_clip": 0.7}],
        })),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (decode(&body["image_base64"]).width(), body["seed"].as_u64()),
        (64, Some(5))
    );
    // SDXL image-to-image and inpainting with base64 images.
    let (status, body) = post_json(
        api,
        "/sdxl/generate",
        &request(
            json!({"checkpoint": "easel_tiny_sdxl.safetensors", "init_image": png_b64(64, 64, false), "gen_type": "i2i", "denoise": 0.6}),
        ),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_json(
        api,
        "/sd15/generate",
        &request(json!({
            "checkpoint": "easel_tiny_sd1.safetensors", "gen_type": "inpaint",
            "init_image": png_b64(64, 64, false), "mask": png_b64(64, 64, true),
        })),
    );
    assert_eq!(status, 200, "{body}");
    // FLUX from split files, the text encoders as a pair, with two LoRAs stacked.
    let (status, body) = post_json(
        api,
        "/flux/generate",
        &request(json!({
            "unet": "easel_tiny_flux_dev-Q8_0.gguf", "vae": "easel_tiny_flux_vae.safetensors",
            "clip": ["easel_tiny_t5xxl_fp16.safetensors", "easel_tiny_clip_l.safetensors"],
            "prompt_positive": "a cat", "sampler_name": "euler", "scheduler": "simple",
            "lora_requests": [
                {"lora": "easel_tiny_flux_lora_kohya.safetensors", "strength_model": 0.8, "strength_clip": 1.0},
                {"lora": "easel_tiny_flux_lora_diffusers.safetensors", "strength_model": 0.5, "strength_clip": 1.0},
            ],
        })),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["image_base64"].is_string());
    // SD3 from its single file (the three text encoders inside).
    let (status, body) = post_json(
        api,
        "/sd3/generate",
        &request(json!({
            "checkpoint": "easel_tiny_sd3_medium_incl_clips_t5xxl.safetensors", "prompt_positive": "a red barn",
            "gen_type": "t2i",
        })),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["image_base64"].is_string());
    // Relighting with the tiny IC-Light model, the service's light-map settings and defaults.
    let (status, body) = post_json(
        api,
        "/iclight/generate",
        &json!({
            "checkpoint": "easel_tiny_sd1.safetensors", "iclight_model": "easel_tiny_sd1_iclight_fc.safetensors",
            "init_image": png_b64(64, 64, false), "light_condition": png_b64(64, 64, true), "light_strength": 0.6,
            "blending_mode_2": "soft_light", "remap_max_value": 1.2, "steps": 2, "seed": 4,
        }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(decode(&body["image_base64"]).width(), 64);
    let task = api.get_json(&format!("/v1/tasks/{}", body["task_id"].as_str().unwrap()));
    let relight = &task["request"]["relight"];
    assert_eq!(
        (
            task["mode"].as_str(),
            relight["model"].as_str(),
            relight["light_strength"].as_f64(),
            relight["remap_max"].as_f64(),
            relight["blends"].clone(),
            task["request"]["cfg"].as_f64(),
        ),
        (
            Some("relight"),
            Some("easel_tiny_sd1_iclight_fc.safetensors"),
            Some(0.6),
            Some(1.2),
            json!([{"mode": "color", "percentage": 0.1}, {"mode": "soft_light", "percentage": 0.2}]),
            Some(1.5),
        ),
        "{task}"
    );
    let (status, body) = post_json(api, "/iclight/generate", &json!({"gen_type": "t2i"}));
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("gen_type")));
    // What Easel cannot run yet is a 501 naming it; bad input a 400.
    for path in ["/upscale", "/object_remove"] {
        let (status, body) = post_json(api, path, &request(json!({"checkpoint": "x.safetensors"})));
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (501, Some("not_implemented")),
            "{path}"
        );
    }
    let (status, body) = post_json(api, "/sd15/generate", &request(json!({"gen_type": "paint"})));
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("gen_type")));
}

#[test]
fn genserve_routes_answer_in_its_shape() {
    let server = with_models(start());
    let api = &server.api;
    let (status, body) = post_json(
        api,
        "/generate",
        &json!({"prompt": "a fox in snow", "model_id": "flux1-dev", "width": 64, "height": 64, "num_inference_steps": 2}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["success"].as_bool(), body["mode"].as_str()),
        (Some(true), Some("text2img"))
    );
    assert!(body["error"].is_null() && body["elapsed_time"].as_f64().unwrap() > 0.0);
    assert_eq!(decode(&body["image_base64"]).width(), 64);
    // img2img as a multipart form, the image as a file.
    let image = base64::engine::general_purpose::STANDARD
        .decode(png_b64(64, 64, false))
        .unwrap();
    let boundary = "genserve-boundary";
    let mut form = Vec::new();
    for (name, value) in [
        ("prompt", "an oil painting"),
        ("mode", "img2img"),
        ("num_inference_steps", "2"),
        ("strength", "0.6"),
    ] {
        form.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").bytes(),
        );
    }
    form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"input_image\"; filename=\"in.png\"\r\nContent-Type: image/png\r\n\r\n").bytes());
    form.extend(&image);
    form.extend(format!("\r\n--{boundary}--\r\n").bytes());
    let mut response = agent()
        .post(format!("{}/generate/img2img", api.url))
        .header("Content-Type", format!("multipart/form-data; boundary={boundary}"))
        .send(&form[..])
        .unwrap();
    let status = response.status().as_u16();
    let body: Json = serde_json::from_reader(response.body_mut().as_reader()).unwrap();
    assert_eq!((status, body["success"].as_bool()), (200, Some(true)), "{body}");
    // Bad parameters: 400 with success false and the error said.
    let (status, body) = post_json(api, "/generate", &json!({"model_id": "flux1-dev"}));
    assert_eq!(
        (status, body["success"].as_bool(), body["image_base64"].clone()),
        (400, Some(false), Json::Null)
    );
    assert!(body["error"].as_str().unwrap().contains("prompt"), "{body}");
    let (status, body) = post_json(api, "/generate", &json!({"prompt": "x", "mode": "controlnet"}));
    assert_eq!((status, body["success"].as_bool()), (400, Some(false)));
    let status = api.get_json("/status");
    assert_eq!(status["status"], "running");
    assert_eq!(status["concurrent_manager"]["alive_processes"], 1);
    // With the other drop-ins on, /models is still ComfyUI's.
    assert!(api
        .get_json("/models")
        .as_array()
        .unwrap()
        .iter()
        .any(|folder| folder == "checkpoints"));
}

#[test]
fn genserve_alone_owns_models_and_switches_turn_routes_off() {
    let genserve_only = ServerSettings {
        compat: Compat::parse("genserve").unwrap(),
        ..Default::default()
    };
    let server = with_models(start_with(genserve_only));
    let api = &server.api;
    let models = api.get_json("/models");
    let ids: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["easel_tiny_flux_dev_checkpoint.safetensors"]);
    assert!(models[0]["supported_features"]
        .as_array()
        .unwrap()
        .contains(&json!("img2img")));
    assert!(api
        .get_json("/api/models")
        .as_array()
        .unwrap()
        .iter()
        .any(|folder| folder == "checkpoints"));
    assert_eq!(api.get("/v1/engines/styles").0, 404);
    let (status, _, _) = post(api, "/sd15/generate", &json!({}), None);
    assert_eq!(status, 405);
    let none = start_with(ServerSettings {
        compat: Compat::parse("none").unwrap(),
        ..Default::default()
    });
    assert_eq!(post(&none.api, "/generate", &json!({"prompt": "x"}), None).0, 405);
    assert!(Compat::parse("fooocus,comfy").is_err());
}

#[test]
fn fooocus_routes_answer_in_its_shape() {
    let server = with_models(start());
    let api = &server.api;
    let fields = json!({"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "sampler": "euler", "scheduler": "normal"});
    let with = |extra: Json| {
        let mut body = fields.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    // async_process: the task object at once, then GET /tasks/{id} until finished.
    let (status, task) = post_json(api, "/v1/engine/generate/", &with(json!({"async_process": true})));
    assert_eq!(status, 200, "{task}");
    assert!(
        matches!(task["task_status"].as_str(), Some("pending" | "running")),
        "{task}"
    );
    let id = task["task_id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let finished = loop {
        let task = api.get_json(&format!("/tasks/{id}"));
        if task["task_status"] == "finished" {
            break task;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{task}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(finished["progress"], 100);
    assert!(finished["in_queue_mills"].as_i64().unwrap() <= finished["finish_mills"].as_i64().unwrap());
    assert_eq!(finished["req_params"]["prompt"], "a lighthouse");
    let url = finished["result"][0].as_str().unwrap();
    assert!(url.starts_with("/outputs/"), "{url}");
    let (status, content_type, bytes) = api.get(url);
    assert_eq!((status, content_type.as_str()), (200, "image/png"));
    assert!(image::load_from_memory(&bytes).is_ok());
    let mut converted = agent()
        .get(format!("{}{url}", api.url))
        .header("Accept", "image/jpeg")
        .call()
        .unwrap();
    let jpeg = converted.body_mut().read_to_vec().unwrap();
    assert_eq!(image::guess_format(&jpeg).unwrap(), image::ImageFormat::Jpeg);
    assert_eq!(api.get("/outputs/..%2F..%2Fuser/easel.db").0, 404);

    // stream_output: progress lines ending with "Finished" and the image URLs.
    let (status, content_type, body) = post(api, "/v1/engine/generate/", &with(json!({"stream_output": true})), None);
    assert!(status == 200 && content_type.starts_with("text/event-stream"));
    let events: Vec<Json> = String::from_utf8(body)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| serde_json::from_str(data.trim()).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(
        (last["progress"].as_u64(), last["message"].as_str()),
        (Some(100), Some("Finished"))
    );
    assert!(last["images"][0].as_str().unwrap().starts_with("/outputs/"));
    assert!(events
        .iter()
        .all(|event| event["progress"].is_u64() && event.get("message").is_some()));

    // Accept: image/png answers the bytes; otherwise the finished task.
    let (status, content_type, bytes) = post(api, "/v1/engine/generate/", &fields, Some("image/png"));
    assert_eq!((status, content_type.as_str()), (200, "image/png"));
    assert!(image::load_from_memory(&bytes).is_ok());
    let (status, task) = post_json(api, "/v1/engine/generate/", &fields);
    assert_eq!((status, task["task_status"].as_str()), (200, Some("finished")));

    // The task lists, and the history deleted with its files.
    let all = api.get_json("/tasks?query=all&page=0&page_size=2");
    assert_eq!(all["history"].as_array().unwrap().len(), 2);
    assert_eq!((all["current"].clone(), all["pending"].clone()), (json!([]), json!([])));
    let second = api.get_json("/tasks?query=history&page=1&page_size=2");
    assert_eq!(second["history"].as_array().unwrap().len(), 2);
    assert!(second.get("pending").is_none());
    let deleted = api.get_json("/tasks?query=history&action=delete&start_at=2000-01-01T00:00:00Z");
    assert_eq!(deleted["history"].as_array().unwrap().len(), 4);
    assert_eq!(api.get(url).0, 404);
    assert_eq!(api.get_json("/tasks?query=history")["history"], json!([]));

    // Control, models and styles.
    let (status, body) = post_json(api, "/v1/engine/control/", &json!({"action": "stop"}));
    assert_eq!((status, body["task_id"].clone()), (200, Json::Null));
    let models = api.get_json("/v1/engines/all-models");
    assert!(models["model_filenames"]
        .as_array()
        .unwrap()
        .contains(&json!("easel_tiny_sd1.safetensors")));
    assert!(models["lora_filenames"]
        .as_array()
        .unwrap()
        .contains(&json!("easel_tiny_sd1_lora.safetensors")));
    assert!(api
        .get_json("/v1/engines/styles")
        .as_array()
        .unwrap()
        .contains(&json!("photographic")));
}
