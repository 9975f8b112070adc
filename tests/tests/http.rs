//! The server over real HTTP: queueing a bundled workflow, reading its history, fetching its images,
//! and ComfyUI's responses to bad requests.

use easel_server::cli::ExecutionArgs;
use easel_server::serve::{router, AppState};
use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Server {
    url: String,
    _base: tempfile::TempDir,
}

/// Starts a server on a free loopback port, with the bundled input files.
fn start() -> Server {
    let base = tempfile::tempdir().unwrap();
    let mut args = ExecutionArgs::default();
    args.directories.base_directory = base.path().to_path_buf();
    args.directories.input_directory = Some(workspace().join("workflows/input"));
    let runtime = easel_server::setup::runtime(&args).unwrap();
    let state = AppState::start(runtime);
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            sender.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, router(state)).await.unwrap();
        });
    });
    let address = receiver.recv_timeout(Duration::from_secs(10)).unwrap();
    Server {
        url: format!("http://{address}"),
        _base: base,
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// (status, content type, body) of a request, `body` making it a POST.
fn request(server: &Server, path: &str, body: Option<&str>) -> (u16, String, Vec<u8>) {
    let url = format!("{}{path}", server.url);
    let mut response = match body {
        Some(body) => agent().post(url).header("Content-Type", "application/json").send(body),
        None => agent().get(url).call(),
    }
    .unwrap();
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

fn post(server: &Server, path: &str, body: &str) -> (u16, String, String) {
    let (status, content_type, bytes) = request(server, path, Some(body));
    (status, content_type, String::from_utf8(bytes).unwrap())
}

fn get(server: &Server, path: &str) -> (u16, String, Vec<u8>) {
    request(server, path, None)
}

fn get_json(server: &Server, path: &str) -> Json {
    let (status, _, body) = get(server, path);
    assert_eq!(status, 200, "{path}");
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn a_queued_workflow_runs_and_its_images_can_be_fetched() {
    let server = start();
    let workflow: Json =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("workflows/load_image.json")).unwrap()).unwrap();
    let body = json!({"prompt": workflow, "client_id": "test-client", "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}});
    let (status, content_type, text) = post(&server, "/prompt", &body.to_string());
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/json; charset=utf-8"),
        "{text}"
    );
    // Python's json.dumps spacing.
    assert!(text.starts_with("{\"prompt_id\": \""), "{text}");
    let response: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(response["number"], 0);
    assert_eq!(response["node_errors"], json!({}));
    let prompt_id = response["prompt_id"].as_str().unwrap().to_string();
    assert_eq!(prompt_id.len(), 36);

    let started = Instant::now();
    let entry = loop {
        let history = get_json(&server, &format!("/history/{prompt_id}"));
        if let Some(entry) = history.get(&prompt_id) {
            break entry.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the prompt never finished");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    assert_eq!(entry["status"]["completed"], true);
    let messages: Vec<&str> = entry["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["execution_start", "execution_cached", "execution_success"]);
    assert_eq!(entry["prompt"][0], 0);
    assert_eq!(entry["prompt"][1], prompt_id);
    assert_eq!(entry["prompt"][3]["client_id"], "test-client");
    assert_eq!(entry["meta"]["3"]["display_node"], "3");

    let image = &entry["outputs"]["3"]["images"][0];
    assert_eq!(
        image,
        &json!({"filename": "scaled_00001_.png", "subfolder": "load_image", "type": "output"})
    );
    let (status, content_type, bytes) = get(
        &server,
        "/api/view?filename=scaled_00001_.png&subfolder=load_image&type=output",
    );
    assert_eq!((status, content_type.as_str()), (200, "image/png"));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    let all = get_json(&server, "/api/history?max_items=1");
    assert_eq!(all.as_object().unwrap().keys().collect::<Vec<_>>(), [&prompt_id]);
}

#[test]
fn bad_requests_get_comfyui_responses() {
    let server = start();
    let (status, content_type, text) = post(&server, "/prompt", "{not json");
    assert_eq!(
        (status, content_type.as_str(), text.as_str()),
        (
            500,
            "text/plain; charset=utf-8",
            "500 Internal Server Error\n\nServer got itself in trouble"
        )
    );

    let (status, _, text) = post(&server, "/api/prompt", "{}");
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Json>(&text).unwrap(),
        json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": {}})
    );

    let prompt = json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
                                    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}});
    let (status, _, text) = post(&server, "/prompt", &prompt.to_string());
    assert_eq!(status, 400);
    let body: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body["node_errors"]["1"]["errors"][0]["message"],
        "Value 0 smaller than min of 1"
    );

    // Every parsed POST without a number counts, valid or not (the malformed one above did not);
    // `front` queues at -number.
    let (_, _, text) = post(
        &server,
        "/prompt",
        &json!({"prompt": {"1": {"class_type": "Nope", "inputs": {}}}, "front": true}).to_string(),
    );
    assert!(text.contains("Cannot execute because node Nope does not exist."));
    let valid = json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                                   "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, "front": true});
    let (_, _, text) = post(&server, "/prompt", &valid.to_string());
    assert_eq!(serde_json::from_str::<Json>(&text).unwrap()["number"], -3);
    let (_, _, text) = post(
        &server,
        "/prompt",
        &json!({"prompt": valid["prompt"], "number": 7}).to_string(),
    );
    assert_eq!(serde_json::from_str::<Json>(&text).unwrap()["number"], 7.0);

    assert_eq!(get(&server, "/view?filename=../secret.png").0, 400);
    assert_eq!(get(&server, "/view?filename=x.png&subfolder=../..").0, 403);
    assert_eq!(get(&server, "/view?filename=missing.png").0, 404);
}

#[test]
fn object_info_lists_every_node() {
    let server = start();
    let info = get_json(&server, "/object_info");
    assert!(info.as_object().unwrap().len() >= 21);
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["example.png"])
    );
    let one = get_json(&server, "/api/object_info/SaveImage");
    assert_eq!(one["SaveImage"]["output_node"], true);
    assert_eq!(get_json(&server, "/object_info/Nope"), json!({}));
}
