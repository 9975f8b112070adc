//! The REST API (`/v1/…`) over real HTTP on the tiny models: every answer style of
//! `/v1/generate` (finished task as JSON, async + polling, image bytes by `Accept`, a parsed
//! server-sent-event stream) for text2img, img2img and inpaint on SD1.x, SDXL and FLUX; JSON and
//! multipart; priorities; cancelling; listing and ranged deletes; and refusals that name the field.

mod common;

use base64::Engine;
use common::{agent, start, Api, Server};
use easel_models::testmodels::{depth_anything_v2_layout, tiny_depth_anything_v2, write_checkpoint};
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

const BOUNDARY: &str = "easel-rest-boundary";

/// A server with the tiny models.
fn server() -> Server {
    let server = start();
    easel_models::testmodels::write_test_models(&server.base.path().join("models")).unwrap();
    server
}

/// An answer: status, headers we look at, body.
struct Answer {
    status: u16,
    content_type: String,
    task_id: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Json {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

fn send(api: &Api, method: &str, path: &str, body: Option<(&str, Vec<u8>)>, accept: Option<&str>) -> Answer {
    let url = format!("{}{path}", api.url);
    let agent = agent();
    let mut response = match (method, body) {
        ("POST", Some((content_type, body))) => {
            let mut request = agent.post(url).header("Content-Type", content_type);
            if let Some(accept) = accept {
                request = request.header("Accept", accept);
            }
            request.send(&body[..])
        }
        ("POST", None) => agent.post(url).send_empty(),
        ("DELETE", _) => agent.delete(url).call(),
        _ => agent.get(url).call(),
    }
    .expect("request");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|value| value.to_str().unwrap_or_default().to_string())
    };
    let (content_type, task_id) = (header("content-type").unwrap_or_default(), header("x-task-id"));
    Answer {
        status: response.status().as_u16(),
        content_type,
        task_id,
        body: response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .expect("body"),
    }
}

fn generate(api: &Api, request: Json) -> Answer {
    send(
        api,
        "POST",
        "/v1/generate",
        Some(("application/json", request.to_string().into_bytes())),
        None,
    )
}

fn png(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

/// A 64×64 test picture, and a mask white over its middle.
fn picture() -> Vec<u8> {
    png(64, 64, |x, y| [(x * 4) as u8, (y * 4) as u8, 128])
}

fn mask() -> Vec<u8> {
    png(64, 64, |x, y| {
        let inside = (16..48).contains(&x) && (16..48).contains(&y);
        if inside {
            [255; 3]
        } else {
            [0; 3]
        }
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A `multipart/form-data` body of text fields and image files.
fn form(fields: &[(&str, &str)], files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").bytes(),
        );
    }
    for (name, bytes) in files {
        body.extend(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n")
                .bytes(),
        );
        body.extend(*bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{BOUNDARY}--\r\n").bytes());
    body
}

/// The decoded first image of a finished task answered as JSON.
fn first_image(task: &Json) -> image::DynamicImage {
    let data = task["images"][0]["base64"]
        .as_str()
        .unwrap_or_else(|| panic!("no inline image: {task}"));
    let bytes = base64::engine::general_purpose::STANDARD.decode(data).unwrap();
    image::load_from_memory(&bytes).unwrap()
}

fn poll_until_ended(api: &Api, id: &str) -> Json {
    let started = Instant::now();
    loop {
        let task = api.get_json(&format!("/v1/tasks/{id}"));
        if !matches!(task["status"].as_str(), Some("pending" | "running")) {
            return task;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "task {id} never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small, fast request of a family's tiny model.
fn tiny(family: &str, mode: &str) -> Json {
    let mut request = json!({
        "family": family, "mode": mode, "prompt": "a lighthouse on a cliff", "negative_prompt": "blurry",
        "width": 64, "height": 64, "steps": 2, "sampler": "euler", "scheduler": "normal", "seed": 7,
    });
    match family {
        "sd15" => request["model"] = json!("easel_tiny_sd1.safetensors"),
        "sdxl" => request["model"] = json!("easel_tiny_sdxl.safetensors"),
        _ => request["model"] = json!("easel_tiny_flux_dev_checkpoint.safetensors"),
    }
    if mode != "text2img" {
        request["image"] = json!(b64(&picture()));
    }
    if mode == "inpaint" {
        request["mask"] = json!(format!("data:image/png;base64,{}", b64(&mask())));
    }
    request
}

#[test]
fn every_answer_style_of_generate_on_sd15() {
    let server = server();
    let api = &server.api;

    // The finished task as JSON, the image inline; a random seed is reported back.
    let mut request = tiny("sd15", "text2img");
    request["seed"] = json!(-1);
    let answer = generate(api, request);
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let task = answer.json();
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["progress"]["percent"], 100.0);
    assert!(
        task["seed"].as_u64().is_some() && task["request"]["seed"] == task["seed"],
        "{task}"
    );
    assert_eq!(task["workflow"], "v1/sd_text2img");
    let image = first_image(&task);
    assert_eq!((image.width(), image.height()), (64, 64));
    // The same prompt is ComfyUI's too: in /history under the task's id.
    let id = task["id"].as_str().unwrap();
    let history = api.get_json(&format!("/history/{id}"));
    assert_eq!(history[id]["status"]["status_str"], "success");
    // The image URL serves the saved PNG.
    let url = task["images"][0]["url"].as_str().unwrap();
    let (status, content_type, bytes) = api.get(url);
    assert_eq!((status, content_type.as_str()), (200, "image/png"));
    assert!(image::load_from_memory(&bytes).is_ok());

    // Async: 202 with the task at once, then polled to the end; `return: url` leaves base64 out.
    let mut request = tiny("sd15", "text2img");
    request["async"] = json!(true);
    let answer = generate(api, request);
    assert_eq!(answer.status, 202);
    let task = answer.json();
    assert!(matches!(task["status"].as_str(), Some("pending" | "running")), "{task}");
    let ended = poll_until_ended(api, task["id"].as_str().unwrap());
    assert_eq!(ended["status"], "succeeded");
    assert!(ended["images"][0]["url"].as_str().unwrap().starts_with("/view?"));
    assert!(ended["images"][0].get("base64").is_none());
    assert!(ended["started_at"].is_string() && ended["finished_at"].is_string());

    // Image bytes for `Accept: image/jpeg`, the task id in a header.
    let answer = send(
        api,
        "POST",
        "/v1/generate",
        Some(("application/json", tiny("sd15", "img2img").to_string().into_bytes())),
        Some("image/jpeg"),
    );
    assert_eq!((answer.status, answer.content_type.as_str()), (200, "image/jpeg"));
    let id = answer.task_id.expect("X-Task-Id");
    assert_eq!(image::guess_format(&answer.body).unwrap(), image::ImageFormat::Jpeg);
    assert_eq!(api.get_json(&format!("/v1/tasks/{id}"))["mode"], "img2img");

    // A stream: percent never goes down, the last event has the images.
    let mut request = tiny("sd15", "inpaint");
    request["stream"] = json!(true);
    request["output_format"] = json!("webp");
    let answer = generate(api, request);
    assert_eq!(answer.status, 200);
    assert!(
        answer.content_type.starts_with("text/event-stream"),
        "{}",
        answer.content_type
    );
    let text = String::from_utf8(answer.body).unwrap();
    let events: Vec<Json> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| serde_json::from_str(data.trim()).unwrap())
        .collect();
    assert!(events.len() >= 3, "{text}");
    let percents: Vec<f64> = events.iter().map(|event| event["percent"].as_f64().unwrap()).collect();
    assert!(percents.windows(2).all(|pair| pair[0] <= pair[1]), "{percents:?}");
    assert!(
        events.iter().any(|event| event["step"].is_u64()),
        "no sampler step reported: {text}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last["status"].as_str(), last["percent"].as_f64()),
        (Some("succeeded"), Some(100.0))
    );
    let image = base64::engine::general_purpose::STANDARD
        .decode(last["images"][0]["base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(image::guess_format(&image).unwrap(), image::ImageFormat::WebP);
    // The task shows its inputs as URLs of their stored copies.
    let task = &last["task"];
    let image_url = task["request"]["image"].as_str().unwrap();
    assert!(
        image_url.starts_with("/view?filename=") && image_url.contains("subfolder=rest"),
        "{image_url}"
    );
    assert_eq!(api.get(image_url).0, 200);

    // Multipart: the same fields as text, the images as files.
    let body = form(
        &[
            ("family", "sd15"),
            ("mode", "inpaint"),
            ("model", "easel_tiny_sd1.safetensors"),
            ("prompt", "a red balloon"),
            ("steps", "2"),
            ("seed", "3"),
            ("sampler", "euler"),
            ("scheduler", "normal"),
        ],
        &[("image", &picture()), ("mask", &mask())],
    );
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let answer = send(api, "POST", "/v1/generate", Some((&content_type, body)), None);
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let task = answer.json();
    assert_eq!(
        (task["status"].as_str(), task["seed"].as_u64()),
        (Some("succeeded"), Some(3))
    );

    // A file that arrives in many pieces is stored whole, byte for byte.
    let large = png(512, 512, |x, y| {
        let hash = (x * 512 + y).wrapping_mul(2_654_435_761).to_le_bytes();
        [hash[1], hash[2], hash[3]]
    });
    let body = form(
        &[
            ("family", "sd15"),
            ("mode", "img2img"),
            ("model", "easel_tiny_sd1.safetensors"),
            ("prompt", "noise"),
            ("async", "true"),
        ],
        &[("image", &large)],
    );
    let answer = send(api, "POST", "/v1/generate", Some((&content_type, body)), None);
    let task = answer.json();
    assert_eq!(answer.status, 202, "{task}");
    let stored = api.get(task["request"]["image"].as_str().unwrap()).2;
    assert!(
        large.len() > 500_000 && stored == large,
        "{} bytes stored",
        stored.len()
    );
    let id = task["id"].as_str().unwrap();
    assert_eq!(
        send(api, "POST", &format!("/v1/tasks/{id}/cancel"), None, None).status,
        200
    );

    // Outpainting extends the image by the sides asked for.
    let mut request = tiny("sd15", "img2img");
    request["mode"] = json!("outpaint");
    request["outpaint"] = json!({"right": 16, "bottom": 8, "feathering": 8});
    let task = generate(api, request).json();
    assert_eq!(task["status"], "succeeded", "{task}");
    let image = first_image(&task);
    assert_eq!((image.width(), image.height()), (80, 72));

    // LoRAs and styles go into the workflow.
    let mut request = tiny("sd15", "text2img");
    request["loras"] =
        json!([{"name": "easel_tiny_sd1_lora.safetensors", "strength_model": 0.8, "strength_clip": 0.5}]);
    request["styles"] = json!(["photographic"]);
    let task = generate(api, request).json();
    assert_eq!(task["status"], "succeeded", "{task}");
    let id = task["id"].as_str().unwrap();
    let prompt = &api.get_json(&format!("/history/{id}"))[id]["prompt"][2];
    let nodes: Vec<&Json> = prompt.as_object().unwrap().values().collect();
    assert!(nodes
        .iter()
        .any(|node| node["class_type"] == "LoraLoader" && node["inputs"]["strength_clip"] == 0.5));
    assert!(nodes.iter().any(|node| node["inputs"]["text"]
        .as_str()
        .is_some_and(|text| text.starts_with("cinematic photo of a lighthouse"))));
}

#[test]
fn sd15_relights_with_ic_light() {
    let server = server();
    let api = &server.api;
    let relit = |relight: Json| {
        let mut request = tiny("sd15", "relight");
        request["relight"] = relight;
        request
    };
    let light = b64(&png(32, 32, |x, _| [(x * 8) as u8; 3]));
    let fc = "easel_tiny_sd1_iclight_fc.safetensors";
    // The defaults: the whole picture relit, the light map remapped and half of the start
    // picture, the subject's colours blended back (color at 0.1, then hue at 0.2).
    let task = generate(api, relit(json!({"model": fc, "light_image": light}))).json();
    assert_eq!(
        (task["status"].as_str(), task["workflow"].as_str()),
        (Some("succeeded"), Some("v1/sd_relight")),
        "{task}"
    );
    assert_eq!((first_image(&task).width(), first_image(&task).height()), (64, 64));
    let blends: Vec<(Json, Json)> = prompt_nodes(api, &task, "Image Blending Mode")
        .iter()
        .map(|node| {
            (
                node["inputs"]["mode"].clone(),
                node["inputs"]["blend_percentage"].clone(),
            )
        })
        .collect();
    assert_eq!(
        blends,
        [(json!("color"), json!(0.1)), (json!("hue"), json!(0.2))],
        "{task}"
    );
    let remap = &prompt_nodes(api, &task, "RemapImageRange")[0]["inputs"];
    assert_eq!(
        (remap["min"].as_f64(), remap["max"].as_f64()),
        (Some(-0.15), Some(1.14))
    );
    assert_eq!(prompt_nodes(api, &task, "ImageBlend")[0]["inputs"]["blend_factor"], 0.5);
    let shown = task["request"]["relight"]["light_image"].as_str().unwrap();
    assert!(shown.starts_with("/view?filename="), "{task}");

    // With a mask on the subject, the background is the original picture; a subject whose sides
    // are not multiples of 8 is worked on at the sides below them.
    let mut masked = relit(json!({"model": fc, "light_image": light, "blends": []}));
    masked["mask"] = json!(b64(&mask()));
    let task = generate(api, masked).json();
    assert_eq!(task["status"], "succeeded", "{task}");
    let (original, output) = (
        image::load_from_memory(&picture()).unwrap().to_rgb8(),
        first_image(&task).to_rgb8(),
    );
    let differs = |x: u32, y: u32| {
        let (ours, theirs) = (output.get_pixel(x, y).0, original.get_pixel(x, y).0);
        ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(b)).max().unwrap_or(0)
    };
    assert!(
        differs(4, 4) <= 1 && differs(60, 40) <= 1,
        "outside the mask: the original"
    );
    assert!((16..48).any(|x| differs(x, 32) > 1), "inside the mask: relit");
    let mut odd = relit(json!({"model": fc, "light_image": light}));
    odd["image"] = json!(b64(&png(60, 52, |x, y| [(x * 4) as u8, (y * 4) as u8, 30])));
    let task = generate(api, odd).json();
    assert_eq!(
        (first_image(&task).width(), first_image(&task).height()),
        (56, 48),
        "{task}"
    );

    // A new background around the masked subject (greyed out for the model); and the "fbc"
    // model placing the subject on a background of the request's.
    let mut new_background = relit(json!({"model": fc, "light_image": light, "keep_background": false}));
    new_background["mask"] = json!(b64(&mask()));
    new_background["batch_size"] = json!(2);
    let task = generate(api, new_background).json();
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["images"].as_array().map(Vec::len), Some(2));
    assert_eq!(prompt_nodes(api, &task, "EmptyImage").len(), 1);
    let background = b64(&png(40, 40, |x, y| [90, (x * 6) as u8, (y * 6) as u8]));
    let fbc =
        json!({"model": "easel_tiny_sd1_iclight_fbc.safetensors", "light_image": light, "background": background});
    let task = generate(api, relit(fbc)).json();
    assert_eq!(task["status"], "succeeded", "{task}");
    let conditioning = &prompt_nodes(api, &task, "ICLightConditioning")[0];
    assert!(conditioning["inputs"]["opt_background"].is_array(), "{conditioning}");

    // Refusals name the field and queue nothing.
    let refused = |request: Json, field: &str| {
        let answer = generate(api, request);
        let error = answer.json();
        assert_eq!(
            (answer.status, error["error"]["field"].as_str()),
            (400, Some(field)),
            "{error}"
        );
    };
    refused(tiny("sd15", "relight"), "relight");
    refused(relit(json!({"model": fc})), "relight");
    refused(
        relit(json!({"model": fc, "light_image": light, "keep_background": false})),
        "mask",
    );
    refused(
        relit(json!({"model": fc, "light_image": light, "blends": [{"mode": "glow", "percentage": 0.5}]})),
        "relight",
    );
    let mut sdxl = relit(json!({"model": fc, "light_image": light}));
    sdxl["family"] = json!("sdxl");
    refused(sdxl, "family");
    let mut img2img = tiny("sd15", "img2img");
    img2img["relight"] = json!({"model": fc, "light_image": light});
    refused(img2img, "relight");
    let models = api.get_json("/v1/models");
    assert_eq!(models["families"]["sd15"]["modes"]["relight"]["available"], true);
    assert_eq!(models["families"]["sdxl"]["modes"]["relight"]["available"], false);
}

/// The nodes of class `class` in the prompt a finished task ran (from `/history`).
fn prompt_nodes(api: &Api, task: &Json, class: &str) -> Vec<Json> {
    let id = task["id"].as_str().expect("a task id");
    let history = api.get_json(&format!("/history/{id}"));
    let nodes = history[id]["prompt"][2].as_object().expect("the prompt's nodes");
    nodes
        .values()
        .filter(|node| node["class_type"] == class)
        .cloned()
        .collect()
}

#[test]
fn sdxl_and_flux_run_text2img_img2img_and_inpaint() {
    let server = server();
    let api = &server.api;
    for mode in ["text2img", "img2img", "inpaint"] {
        let task = generate(api, tiny("sdxl", mode)).json();
        assert_eq!(task["status"], "succeeded", "sdxl {mode}: {task}");
        let image = first_image(&task);
        assert_eq!((image.width(), image.height()), (64, 64), "sdxl {mode}");
    }
    // A union ControlNet on SDXL, told its image is canny edges, then an inpaint hint, whose
    // masked pixels it takes black.
    let mut union = tiny("sdxl", "img2img");
    union["controlnets"] = json!([{"model": "easel_tiny_sdxl_union_controlnet.safetensors", "type": "canny"}]);
    let task = generate(api, union).json();
    assert_eq!(task["status"], "succeeded", "union ControlNet: {task}");
    let mut union_inpaint = tiny("sdxl", "inpaint");
    union_inpaint["controlnets"] =
        json!([{"model": "easel_tiny_sdxl_union_controlnet.safetensors", "type": "inpaint"}]);
    let task = generate(api, union_inpaint).json();
    assert_eq!(task["status"], "succeeded", "union inpaint ControlNet: {task}");
    let preprocessors = prompt_nodes(api, &task, "InpaintPreprocessor");
    let preprocessor = preprocessors.first().expect("an InpaintPreprocessor");
    assert_eq!(preprocessor["inputs"]["black_pixel_for_xinsir_cn"], true);
    let mut refined = tiny("sdxl", "text2img");
    refined["refiner"] = json!("easel_tiny_sdxl_refiner.safetensors");
    let task = generate(api, refined).json();
    assert_eq!(
        (task["status"].as_str(), task["workflow"].as_str()),
        (Some("succeeded"), Some("v1/sdxl_refiner_text2img"))
    );

    // SD1.5 with two ControlNets: canny edges of the request's image, then an image of its own
    // (which the task shows by its URL), chained before the sampler.
    let mut controlled = tiny("sd15", "img2img");
    controlled["controlnets"] = json!([
        {"model": "easel_tiny_sd1_controlnet.safetensors", "type": "canny", "strength": 0.8, "end_percent": 1.0},
        {"controlnet": "easel_tiny_sd1_controlnet.safetensors", "image": b64(&png(48, 40, |x, y| [(x * 5) as u8, (y * 6) as u8, 0]))},
    ]);
    let task = generate(api, controlled).json();
    assert_eq!(task["status"], "succeeded", "controlnets: {task}");
    let own_image = task["request"]["controlnets"][1]["image"].as_str().unwrap();
    assert!(own_image.starts_with("/view?filename="), "{task}");
    let count = |class: &str| prompt_nodes(api, &task, class).len();
    assert_eq!(
        (
            count("ControlNetApplyAdvanced"),
            count("Canny"),
            count("ControlNetLoader"),
            count("SetUnionControlNetType")
        ),
        (2, 1, 2, 1)
    );

    // An inpaint ControlNet: the request's image with its mask marked (InpaintPreprocessor).
    let mut inpainting = tiny("sd15", "inpaint");
    inpainting["controlnets"] = json!([{"model": "easel_tiny_sd1_controlnet.safetensors", "type": "inpaint"}]);
    let task = generate(api, inpainting).json();
    assert_eq!(task["status"], "succeeded", "inpaint ControlNet: {task}");
    let preprocessors = prompt_nodes(api, &task, "InpaintPreprocessor");
    assert_eq!(preprocessors.len(), 1);
    assert_eq!(preprocessors[0]["inputs"]["black_pixel_for_xinsir_cn"], false);

    // A depth ControlNet: a Depth Anything V2 depth map of the image, with the checkpoint that
    // is installed (here a tiny one under the ViT-S name).
    let depth_folder = server.base.path().join("models/depthanything");
    std::fs::create_dir_all(&depth_folder).unwrap();
    let layout = depth_anything_v2_layout(&tiny_depth_anything_v2()).unwrap();
    write_checkpoint(&depth_folder.join("depth_anything_v2_vits.safetensors"), &layout).unwrap();
    let mut depth = tiny("sd15", "img2img");
    depth["controlnets"] = json!([{"model": "easel_tiny_sd1_controlnet.safetensors", "type": "depth"}]);
    let task = generate(api, depth).json();
    assert_eq!(task["status"], "succeeded", "depth ControlNet: {task}");
    let estimators = prompt_nodes(api, &task, "DepthAnythingV2Preprocessor");
    let estimator = estimators.first().expect("a DepthAnythingV2Preprocessor");
    assert_eq!(estimator["inputs"]["ckpt_name"], "depth_anything_v2_vits.pth");

    // An IP-Adapter with two image prompts (averaged) and a negative one, through the tiny SD1.5
    // adapter and encoder; the task shows the images by their URLs.
    let ip_adapter = json!({
        "ipadapter": "easel_tiny_sd1_ip_adapter.safetensors", "clip_vision": "easel_tiny_clip_vision.safetensors",
        "images": [b64(&picture()), b64(&png(48, 40, |x, y| [(x * 5) as u8, (y * 6) as u8, 90]))],
        "image_negative": [b64(&mask())], "weight": 0.9, "combine_embeds": "average", "end_at": 1.0,
    });
    let mut prompted = tiny("sd15", "text2img");
    prompted["ip_adapter"] = ip_adapter.clone();
    let task = generate(api, prompted).json();
    assert_eq!(task["status"], "succeeded", "ip_adapter: {task}");
    let applies = prompt_nodes(api, &task, "IPAdapterAdvanced");
    let apply = applies.first().expect("an IPAdapterAdvanced");
    assert_eq!(
        (
            apply["inputs"]["combine_embeds"].as_str(),
            apply["inputs"]["weight"].as_f64()
        ),
        (Some("average"), Some(0.9))
    );
    assert!(apply["inputs"]["image_negative"].is_array(), "{apply}");
    assert_eq!(prompt_nodes(api, &task, "ImageBatch").len(), 1);
    let shown = task["request"]["ip_adapter"]["images"][1].as_str().unwrap();
    assert!(shown.starts_with("/view?filename="), "{task}");
    // The tiny SDXL adapter steers SDXL: the same seed gives another picture.
    let mut sdxl_prompted = tiny("sdxl", "text2img");
    sdxl_prompted["ip_adapter"] = json!({
        "ipadapter": "easel_tiny_sdxl_ip_adapter.safetensors", "clip_vision": "easel_tiny_clip_vision.safetensors",
        "images": [b64(&picture())], "weight": 1.0, "end_at": 1.0,
    });
    let steered = generate(api, sdxl_prompted).json();
    assert_eq!(steered["status"], "succeeded", "SDXL ip_adapter: {steered}");
    let plain = generate(api, tiny("sdxl", "text2img")).json();
    assert_ne!(
        first_image(&steered).to_rgb8().into_raw(),
        first_image(&plain).to_rgb8().into_raw(),
        "the SDXL IP-Adapter changes the picture"
    );
    let mut flux_prompted = tiny("flux", "text2img");
    flux_prompted["ip_adapter"] = ip_adapter;
    let answer = generate(api, flux_prompted);
    assert_eq!(answer.status, 501, "IP-Adapter for FLUX");

    for mode in ["text2img", "img2img"] {
        let task = generate(api, tiny("flux", mode)).json();
        assert_eq!(task["status"], "succeeded", "flux {mode}: {task}");
    }
    // An XLabs FLUX ControlNet on canny edges of the request's image.
    let mut flux_controlled = tiny("flux", "img2img");
    flux_controlled["controlnets"] = json!([{"model": "easel_tiny_flux_controlnet.safetensors", "type": "canny"}]);
    let task = generate(api, flux_controlled).json();
    assert_eq!(task["status"], "succeeded", "FLUX ControlNet: {task}");
    let applies = prompt_nodes(api, &task, "ControlNetApplyAdvanced");
    let apply = applies.first().expect("a ControlNetApplyAdvanced");
    assert!(
        apply["inputs"]["vae"].is_array(),
        "the workflow's VAE, for ControlNets taking latents: {apply}"
    );
    // FLUX fill from split files; and FLUX dev kept quantized (GGUF).
    let mut fill = tiny("flux", "inpaint");
    fill.as_object_mut().unwrap().remove("model");
    fill["unet"] = json!("easel_tiny_flux_fill.safetensors");
    fill["clip"] = json!(["easel_tiny_clip_l.safetensors", "easel_tiny_t5xxl_fp16.safetensors"]);
    fill["vae"] = json!("easel_tiny_flux_vae.safetensors");
    let task = generate(api, fill.clone()).json();
    assert_eq!(task["status"], "succeeded", "flux fill: {task}");
    let mut gguf = fill;
    gguf["mode"] = json!("text2img");
    gguf.as_object_mut().unwrap().remove("image");
    gguf.as_object_mut().unwrap().remove("mask");
    gguf["unet"] = json!("easel_tiny_flux_dev-Q8_0.gguf");
    let task = generate(api, gguf).json();
    assert_eq!(task["status"], "succeeded", "flux gguf: {task}");

    // /v1/models knows each tiny model's family, variant and modes.
    let models = api.get_json("/v1/models");
    let flux_models = models["families"]["flux"]["models"].as_array().unwrap();
    let fill = flux_models
        .iter()
        .find(|model| model["name"] == "easel_tiny_flux_fill.safetensors")
        .unwrap();
    assert_eq!(
        (fill["variant"].as_str(), fill["modes"].clone()),
        (Some("fill"), json!(["inpaint", "outpaint"]))
    );
    assert_eq!(models["families"]["sd15"]["default"], "easel_tiny_sd1.safetensors");
    assert_eq!(models["families"]["sd3"]["modes"]["text2img"]["available"], true);

    // SD3 from its single file, and SD3.5 from split files (its three text encoders).
    for mode in ["text2img", "img2img", "inpaint"] {
        let mut request = tiny("sd3", mode);
        request["model"] = json!("easel_tiny_sd3_medium_incl_clips_t5xxl.safetensors");
        let task = generate(api, request).json();
        assert_eq!(task["status"], "succeeded", "sd3 {mode}: {task}");
    }
    let mut split = tiny("sd3", "text2img");
    split.as_object_mut().unwrap().remove("model");
    split["unet"] = json!("easel_tiny_sd3.5_medium-Q8_0.gguf");
    split["clip"] = json!([
        "easel_tiny_sd3_clip_l.safetensors",
        "easel_tiny_sd3_clip_g.safetensors",
        "easel_tiny_sd3_t5xxl.safetensors"
    ]);
    split["vae"] = json!("easel_tiny_sd3_vae.safetensors");
    let task = generate(api, split).json();
    assert_eq!(task["status"], "succeeded", "sd3.5 split files: {task}");
    assert_eq!(prompt_nodes(api, &task, "TripleCLIPLoader").len(), 1);

    // SD3 ControlNets (diffusers' layout) on canny edges of the request's image, and AliMama's
    // inpainting one on its masked image.
    for (mode, controlnet, kind) in [
        ("img2img", "easel_tiny_sd3_controlnet.safetensors", "canny"),
        ("inpaint", "easel_tiny_sd3_inpainting_controlnet.safetensors", "inpaint"),
    ] {
        let mut controlled = tiny("sd3", mode);
        controlled["model"] = json!("easel_tiny_sd3_medium_incl_clips_t5xxl.safetensors");
        controlled["controlnets"] = json!([{"model": controlnet, "type": kind}]);
        let task = generate(api, controlled).json();
        assert_eq!(task["status"], "succeeded", "SD3 ControlNet {kind}: {task}");
        let applies = prompt_nodes(api, &task, "ControlNetApplyAdvanced");
        assert!(
            applies[0]["inputs"]["vae"].is_array(),
            "the workflow's VAE: {applies:?}"
        );
    }
}

#[test]
fn bad_requests_name_the_field_and_queue_nothing() {
    let server = server();
    let api = &server.api;
    let refused = |request: Json, status: u16, field: &str| {
        let answer = generate(api, request.clone());
        assert_eq!(
            answer.status,
            status,
            "{request}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let body = answer.json();
        assert_eq!(body["error"]["field"], json!(field), "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        body
    };
    let with = |changes: Json| {
        let mut request = tiny("sd15", "inpaint");
        for (key, value) in changes.as_object().unwrap() {
            if value.is_null() {
                request.as_object_mut().unwrap().remove(key);
            } else {
                request[key] = value.clone();
            }
        }
        request
    };
    refused(with(json!({"prompt": null})), 400, "prompt");
    refused(with(json!({"family": "sd9"})), 400, "family");
    refused(with(json!({"mode": "paint"})), 400, "mode");
    let body = refused(with(json!({"model": "missing.safetensors"})), 400, "model");
    assert_eq!(body["error"]["code"], "unknown_model");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("models/checkpoints"),
        "{body}"
    );
    let body = refused(with(json!({"loras": [{"name": "nope.safetensors"}]})), 400, "loras");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("models/loras"),
        "{body}"
    );
    refused(with(json!({"width": 65, "mode": "text2img"})), 400, "width");
    refused(with(json!({"steps": 0})), 400, "steps");
    refused(with(json!({"sampler": "nonsense"})), 400, "sampler");
    refused(with(json!({"image": "not base64 at all!"})), 400, "image");
    refused(with(json!({"image": b64(b"plain text, not an image")})), 400, "image");
    refused(with(json!({"mask": b64(&png(32, 32, |_, _| [255; 3]))})), 400, "mask");
    refused(with(json!({"mask": null})), 400, "mask");
    refused(with(json!({"mode": "outpaint", "mask": null})), 400, "outpaint");
    refused(
        with(json!({"webhook_url": "ftp://example.com/hook"})),
        400,
        "webhook_url",
    );
    refused(with(json!({"stream": true, "async": true})), 400, "async");
    refused(with(json!({"styles": ["no-such-style"]})), 400, "styles");
    refused(with(json!({"unet": "easel_tiny_sdxl_unet.safetensors"})), 400, "model");
    refused(with(json!({"colour": "blue"})), 400, "colour");
    refused(with(json!({"model": "easel_tiny_sdxl.safetensors"})), 400, "model");
    refused(with(json!({"mode": "upscale"})), 501, "mode");
    refused(
        with(json!({"ip_adapter": {"clip_vision": "a.safetensors", "images": []}})),
        400,
        "ip_adapter",
    );
    refused(
        with(
            json!({"ip_adapter": {"ipadapter": "a.safetensors", "clip_vision": "b.safetensors", "images": [], "weight": 0.5}}),
        ),
        400,
        "ip_adapter",
    );
    let body = refused(
        with(json!({"controlnets": [{"controlnet": "canny.safetensors", "type": "canny"}]})),
        400,
        "controlnets",
    );
    assert_eq!(body["error"]["code"], "unknown_model", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("models/controlnet"),
        "{body}"
    );
    let tiny_controlnet = "easel_tiny_sd1_controlnet.safetensors";
    let body = refused(
        with(json!({"controlnets": [{"model": tiny_controlnet, "type": "depth"}]})),
        400,
        "controlnets",
    );
    assert_eq!(body["error"]["code"], "unknown_model", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("models/depthanything"),
        "{body}"
    );
    refused(
        with(json!({"mode": "img2img", "mask": null, "controlnets": [{"model": tiny_controlnet, "type": "inpaint"}]})),
        400,
        "controlnets",
    );
    refused(
        with(json!({"controlnets": [{"model": tiny_controlnet, "strength": 11}]})),
        400,
        "controlnets",
    );
    refused(
        with(json!({"mode": "text2img", "image": null, "mask": null, "controlnets": [{"model": tiny_controlnet}]})),
        400,
        "controlnets",
    );
    let answer = send(
        api,
        "POST",
        "/v1/generate",
        Some(("application/json", b"{not json".to_vec())),
        None,
    );
    assert_eq!(answer.status, 400);
    // Nothing was queued, stored or written.
    assert_eq!(api.get_json("/v1/tasks")["tasks"], json!([]));
    assert_eq!(api.get_json("/queue")["queue_pending"], json!([]));
    let inputs = server.base.path().join("input/rest");
    assert!(!inputs.exists() || std::fs::read_dir(&inputs).unwrap().next().is_none());
    // Unknown tasks are 404 in the same shape.
    let answer = send(api, "GET", "/v1/tasks/nope", None, None);
    assert_eq!(
        (answer.status, answer.json()["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

#[test]
fn priorities_cancelling_listing_and_ranged_deletes() {
    let server = server();
    let api = &server.api;
    let submit = |request: Json| {
        let answer = generate(api, request);
        assert_eq!(answer.status, 202, "{}", String::from_utf8_lossy(&answer.body));
        answer.json()["id"].as_str().unwrap().to_string()
    };
    let queued = |priority: i64, steps: u64| {
        let mut request = tiny("sd15", "text2img");
        request["async"] = json!(true);
        request["priority"] = json!(priority);
        request["steps"] = json!(steps);
        request
    };
    // A long task keeps the worker busy while the others queue.
    let blocker = submit(queued(0, 400));
    let started = Instant::now();
    while api.get_json(&format!("/v1/tasks/{blocker}"))["status"] == "pending" {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let low = submit(queued(0, 2));
    let high = submit(queued(5, 2));
    let middle = submit(queued(1, 2));
    let doomed = submit(queued(0, 2));
    let dropped = submit(queued(0, 2));
    let status = api.get_json("/v1/status");
    assert_eq!(status["queue"]["pending"], 5, "{status}");
    assert_eq!(status["running_task"], json!(blocker));
    assert_eq!(status["queue"]["by_priority"][0], json!({"priority": 5, "pending": 1}));

    // Cancel one pending task, then the running one.
    let answer = send(api, "POST", &format!("/v1/tasks/{doomed}/cancel"), None, None);
    assert_eq!(
        (answer.status, answer.json()["status"].as_str()),
        (200, Some("cancelled"))
    );
    // A ComfyUI client deleting a task's prompt from the queue cancels the task too.
    let body = json!({"delete": [dropped]}).to_string().into_bytes();
    assert_eq!(
        send(api, "POST", "/queue", Some(("application/json", body)), None).status,
        200
    );
    assert_eq!(api.get_json(&format!("/v1/tasks/{dropped}"))["status"], "cancelled");
    let answer = send(api, "POST", &format!("/v1/tasks/{blocker}/cancel"), None, None);
    assert_eq!(answer.status, 200);
    assert_eq!(poll_until_ended(api, &blocker)["status"], "cancelled");
    let again = send(api, "POST", &format!("/v1/tasks/{doomed}/cancel"), None, None);
    assert_eq!(
        (again.status, again.json()["error"]["code"].as_str()),
        (409, Some("task_ended"))
    );

    // The rest ran highest priority first, FIFO within a level.
    let ended: Vec<Json> = [&high, &middle, &low]
        .iter()
        .map(|id| poll_until_ended(api, id))
        .collect();
    assert!(ended.iter().all(|task| task["status"] == "succeeded"), "{ended:?}");
    let starts: Vec<&str> = ended.iter().map(|task| task["started_at"].as_str().unwrap()).collect();
    assert!(starts[0] <= starts[1] && starts[1] <= starts[2], "{starts:?}");

    // Listing: by status, newest first, paged with a cursor.
    let succeeded = api.get_json("/v1/tasks?status=succeeded");
    let ids: Vec<&str> = succeeded["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [middle.as_str(), high.as_str(), low.as_str()]);
    let first_page = api.get_json("/v1/tasks?limit=2");
    assert_eq!(first_page["tasks"].as_array().unwrap().len(), 2);
    let cursor = first_page["next_cursor"].as_str().unwrap();
    let rest = api.get_json(&format!("/v1/tasks?limit=10&cursor={cursor}"));
    assert_eq!(rest["tasks"].as_array().unwrap().len(), 4);
    assert!(rest["next_cursor"].is_null());
    let future = api.get_json("/v1/tasks?start_at=2999-01-01T00:00:00Z");
    assert_eq!(future["tasks"], json!([]));
    let bad = send(api, "GET", "/v1/tasks?start_at=yesterday", None, None);
    assert_eq!(
        (bad.status, bad.json()["error"]["field"].as_str()),
        (400, Some("start_at"))
    );

    // Deleting one task, then a time range: the records and their output files go.
    let output_file = |task: &Json| {
        let image = &task["images"][0];
        server
            .base
            .path()
            .join("output")
            .join(image["subfolder"].as_str().unwrap())
            .join(image["filename"].as_str().unwrap())
    };
    let low_file = output_file(&ended[2]);
    assert!(low_file.is_file());
    let answer = send(api, "DELETE", &format!("/v1/tasks/{low}"), None, None);
    assert_eq!((answer.status, answer.json()["files_deleted"].as_u64()), (200, Some(1)));
    assert!(!low_file.exists());
    assert_eq!(send(api, "GET", &format!("/v1/tasks/{low}"), None, None).status, 404);
    assert_eq!(api.get_json(&format!("/history/{low}")), json!({}));
    let answer = send(
        api,
        "DELETE",
        "/v1/tasks?start_at=2000-01-01&end_at=2999-01-01",
        None,
        None,
    );
    assert_eq!((answer.status, answer.json()["deleted"].as_u64()), (200, Some(5)));
    assert!(!output_file(&ended[0]).exists());
    assert_eq!(api.get_json("/v1/tasks")["tasks"], json!([]));
}

/// A GET, or a POST (with a JSON body or none), sending `key` as `X-API-KEY`; the answer's
/// `Retry-After` goes in `task_id`.
fn with_key(api: &Api, method: &str, path: &str, key: Option<&str>, body: Option<Json>) -> Answer {
    let url = format!("{}{path}", api.url);
    let agent = agent();
    let with = |request: ureq::RequestBuilder<ureq::typestate::WithBody>| match key {
        Some(key) => request.header("X-API-KEY", key),
        None => request,
    };
    let mut response = match (method, body) {
        ("POST", Some(body)) => with(agent.post(url))
            .header("Content-Type", "application/json")
            .send(body.to_string()),
        ("POST", None) => with(agent.post(url)).send_empty(),
        _ => match key {
            Some(key) => agent.get(url).header("X-API-KEY", key).call(),
            None => agent.get(url).call(),
        },
    }
    .expect("request");
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    let (content_type, retry_after) = (header("content-type").unwrap_or_default(), header("retry-after"));
    Answer {
        status: response.status().as_u16(),
        content_type,
        task_id: retry_after,
        body: response.body_mut().read_to_vec().unwrap(),
    }
}

#[test]
fn metrics_health_readiness_queue_limit_and_keys() {
    let settings = easel_server::state::ServerSettings {
        api_keys: vec!["sesame".into()],
        healthz_public: true,
        max_queue: Some(1),
        ..Default::default()
    };
    let server = common::start_with(settings);
    easel_models::testmodels::write_test_models(&server.base.path().join("models")).unwrap();
    let api = &server.api;
    let key = Some("sesame");
    // /healthz may be public; every other new route needs the key.
    assert_eq!(with_key(api, "GET", "/healthz", None, None).status, 200);
    for path in [
        "/readyz",
        "/metrics",
        "/v1/tasks",
        "/v1/status",
        "/v1/models",
        "/openapi.json",
        "/docs",
    ] {
        assert_eq!(with_key(api, "GET", path, None, None).status, 401, "{path}");
    }
    assert_eq!(
        with_key(api, "POST", "/v1/generate", None, Some(tiny("sd15", "text2img"))).status,
        401
    );
    let ready = with_key(api, "GET", "/readyz", key, None);
    assert_eq!((ready.status, ready.json()["ready"].as_bool()), (200, Some(true)));

    // One prompt fills a queue of one: the next request is told to come back later.
    let mut blocker = tiny("sd15", "text2img");
    blocker["async"] = json!(true);
    blocker["steps"] = json!(400);
    let answer = with_key(api, "POST", "/v1/generate", key, Some(blocker));
    assert_eq!(answer.status, 202);
    let id = answer.json()["id"].as_str().unwrap().to_string();
    let refused = with_key(api, "POST", "/v1/generate", key, Some(tiny("sd15", "text2img")));
    assert_eq!((refused.status, refused.task_id.as_deref()), (429, Some("5")));
    assert_eq!(refused.json()["error"]["code"], "queue_full");
    assert_eq!(with_key(api, "GET", "/readyz", key, None).status, 503);
    assert_eq!(
        with_key(api, "POST", &format!("/v1/tasks/{id}/cancel"), key, None).status,
        200
    );
    let started = Instant::now();
    while with_key(api, "GET", "/readyz", key, None).status != 200 {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut finished = tiny("sd15", "text2img");
    finished["steps"] = json!(3);
    assert_eq!(
        with_key(api, "POST", "/v1/generate", key, Some(finished)).json()["status"],
        "succeeded"
    );

    // /metrics parses as the exposition format and counts what happened.
    let answer = with_key(api, "GET", "/metrics", key, None);
    assert_eq!(answer.status, 200);
    let text = String::from_utf8(answer.body).unwrap();
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line == "# EOF",
                "{line}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let open = name.find('{').unwrap_or(name.len());
        assert!(
            name[..open].chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        assert!(open == name.len() || name.ends_with('}'), "{line}");
        samples.insert(name.to_string(), value);
    }
    assert!(text.trim_end().ends_with("# EOF"));
    let sample = |prefix: &str| {
        samples
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, value)| *value)
            .sum::<f64>()
    };
    assert_eq!(
        sample("easel_http_requests_total{route=\"/v1/generate\",method=\"POST\",status=\"202\"}"),
        1.0
    );
    assert_eq!(
        sample("easel_http_requests_total{route=\"/v1/generate\",method=\"POST\",status=\"429\"}"),
        1.0
    );
    assert_eq!(sample("easel_tasks{status=\"cancelled\"}"), 1.0);
    assert_eq!(sample("easel_tasks{status=\"succeeded\"}"), 1.0);
    assert_eq!(sample("easel_prompt_duration_seconds_count"), 2.0);
    assert_eq!(sample("easel_step_duration_seconds_count"), 2.0, "{text}");
    assert!(samples.contains_key("easel_queue_depth"), "{text}");
}

/// `/openapi.json` is valid OpenAPI 3.1, describes every REST route, and its schemas have exactly
/// the fields real requests and answers have.
#[test]
fn the_openapi_document_is_valid_and_matches_the_api() {
    use roas::validation::{Options, Validate, IGNORE_UNUSED};
    let server = server();
    let api = &server.api;
    let document = api.get_json("/openapi.json");
    assert_eq!(document["openapi"], "3.1.0");
    let spec: roas::v3_1::spec::Spec = serde_json::from_value(document.clone()).expect("parses as OpenAPI 3.1");
    let mut options = IGNORE_UNUSED;
    options.insert(Options::IgnoreMissingTags);
    if let Err(error) = spec.validate(options, None) {
        let errors: Vec<String> = error.errors.iter().map(ToString::to_string).collect();
        panic!("invalid OpenAPI:\n{}", errors.join("\n"));
    }
    let paths = document["paths"].as_object().unwrap();
    for route in [
        "/v1/generate",
        "/v1/tasks",
        "/v1/tasks/{id}",
        "/v1/tasks/{id}/cancel",
        "/v1/models",
        "/v1/styles",
        "/v1/presets",
        "/v1/status",
        "/v1/models/download",
        "/metrics",
        "/healthz",
        "/readyz",
        "/sd15/generate",
        "/flux/generate",
        "/generate",
        "/generate/img2img",
        "/status",
        "/v1/engine/generate/",
        "/tasks",
        "/outputs/{date}/{file}",
    ] {
        assert!(paths.contains_key(route), "{route} is not documented");
    }
    let schema = |name: &str| -> std::collections::BTreeSet<String> {
        document["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {name}"))
            .keys()
            .cloned()
            .collect()
    };
    let fields: std::collections::BTreeSet<String> = easel_server::rest::request::FIELDS
        .iter()
        .map(|field| field.to_string())
        .collect();
    assert_eq!(schema("GenerateRequestBody"), fields);
    // A real task, error and stream event have exactly (or, for events, only) the documented fields.
    let keys = |value: &Json| {
        value
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    let task = generate(api, tiny("sd15", "text2img")).json();
    assert_eq!(keys(&task), schema("Task"));
    assert_eq!(keys(&task["progress"]), schema("TaskProgress"));
    assert!(keys(&task["images"][0]).is_subset(&schema("TaskImage")));
    let error = generate(api, json!({"prompt": ""})).json();
    assert_eq!(
        (keys(&error), keys(&error["error"])),
        (schema("ErrorBody"), schema("ErrorDetail"))
    );
    let mut streamed = tiny("sd15", "text2img");
    streamed["stream"] = json!(true);
    let text = String::from_utf8(generate(api, streamed).body).unwrap();
    for event in text.lines().filter_map(|line| line.strip_prefix("data:")) {
        let event: Json = serde_json::from_str(event.trim()).unwrap();
        assert!(keys(&event).is_subset(&schema("StreamEvent")), "{event}");
    }
    let (status, content_type, _) = api.get("/docs");
    assert_eq!((status, content_type.starts_with("text/html")), (200, true));
}
