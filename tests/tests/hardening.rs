//! Reproducers of the defects found by trying to break the server (issue 20): requests that
//! exhaust memory, poison the history or crash a handler, images too large to decode, a model file
//! replaced on disk, a full disk, and WebSocket messages that overtake the `POST /prompt` answer.

mod common;

use common::{start, start_in, start_with, workspace, Api};
use easel_server::state::ServerSettings;
use futures_util::StreamExt;
use serde_json::{json, Value as Json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// An 8×8 image, previewed: a prompt that runs in a millisecond.
fn tiny_prompt(color: u32) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    })
}

/// `value` inside `levels` arrays.
fn nested(levels: usize, value: Json) -> Json {
    (0..levels).fold(value, |inner, _| json!([inner]))
}

/// The `execution_error` message of a finished prompt's history entry.
fn execution_error(entry: &Json) -> &Json {
    let messages = entry["status"]["messages"].as_array().expect("messages");
    let error = messages
        .iter()
        .find(|m| m[0] == "execution_error")
        .expect("an execution_error");
    &error[1]
}

fn post(api: &Api, body: &Json) -> (u16, Json) {
    let (status, _, text) = api.post("/prompt", &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Json::Null))
}

/// Whatever `POST /prompt` accepts reads back from `/history`, `/history/{id}` and `/jobs`; what it
/// cannot keep (nesting deeper than serde_json reads, NaN, a non-finite `number`) is a 400 saying
/// why, never a 5xx.
#[test]
fn deeply_nested_requests_read_back_and_unreadable_ones_are_a_clear_400() {
    let server = start();
    let api = &server.api;
    // `extra_data` is the request's second level: 125 arrays inside make it 127 deep, the most
    // that is accepted; its history entry nests it two levels deeper.
    let body = json!({
        "prompt_id": "deep",
        "prompt": tiny_prompt(0),
        "extra_data": {"deep": nested(125, json!(1))},
    });
    let (status, answer) = post(api, &body);
    assert_eq!(status, 200, "{answer}");
    // Read as Python reads it: deeper than serde_json's own limit.
    let read = |path: &str| {
        let (status, _, body) = api.get(path);
        assert_eq!(status, 200, "{path}");
        let mut deserializer = serde_json::Deserializer::from_slice(&body);
        deserializer.disable_recursion_limit();
        <Json as serde::Deserialize>::deserialize(&mut deserializer).unwrap()
    };
    let started = Instant::now();
    while read("/history/deep").get("deep").is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "the prompt never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    let entry = &read("/history")["deep"];
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["prompt"][3]["deep"], nested(125, json!(1)));
    for path in ["/api/jobs", "/api/jobs/deep"] {
        read(path);
    }

    let too_deep = json!({"prompt": tiny_prompt(0), "extra_data": {"deep": nested(126, json!(1))}});
    let (status, answer) = post(api, &too_deep);
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nested deeper than 127"));

    let with_nan = format!(r#"{{"prompt": {}, "extra_data": {{"x": NaN}}}}"#, tiny_prompt(0));
    let (status, _, text) = api.post("/prompt", &with_nan);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("NaN or Infinity"), "{text}");
    for number in [json!("nan"), json!("-inf")] {
        let (status, answer) = post(api, &json!({"prompt": tiny_prompt(0), "number": number}));
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("finite"));
    }
    let (status, _, _) = api.get("/history");
    assert_eq!(status, 200);
}

/// A malformed UI-format workflow is refused with ComfyUI's 400, not a panic's 500.
#[test]
fn a_malformed_ui_workflow_is_a_400() {
    let server = start();
    for prompt in [json!({"nodes": [1], "links": []}), json!({"nodes": [1]})] {
        let (status, answer) = post(&server.api, &json!({"prompt": prompt}));
        assert_eq!(status, 400, "{prompt}: {answer}");
        assert!(answer["error"]["type"].is_string(), "{answer}");
    }
}

/// Prompts of more nodes than the server allows are refused with a 400 that says so.
#[test]
fn prompts_over_the_node_limit_are_refused() {
    let server = start_with(ServerSettings {
        max_prompt_nodes: 3,
        ..Default::default()
    });
    let mut prompt = tiny_prompt(0);
    prompt["3"] = json!({"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}});
    assert_eq!(post(&server.api, &json!({"prompt": prompt.clone()})).0, 200);
    prompt["4"] = json!({"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}});
    let (status, answer) = post(&server.api, &json!({"prompt": prompt}));
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["type"], "invalid_prompt");
    assert!(
        answer["error"]["message"].as_str().unwrap().contains("up to 3"),
        "{answer}"
    );
}

/// Nodes that allocate from their inputs check the size against available memory first: a
/// 13 TB request fails its prompt with `OutOfMemoryError` and the server keeps serving.
#[test]
fn oversized_allocations_fail_their_prompt_instead_of_the_server() {
    let server = start();
    let huge = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16384, "height": 16384, "batch_size": 4096, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    });
    let upscaled = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 4096, "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "width": 16384, "height": 16384, "crop": "disabled"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    });
    for (id, prompt) in [("huge", huge), ("upscaled", upscaled)] {
        let (status, answer) = post(&server.api, &json!({"prompt_id": id, "prompt": prompt}));
        assert_eq!(status, 200, "{answer}");
        let entry = server.api.wait_for_history(id);
        let error = execution_error(&entry);
        assert_eq!(error["exception_type"], "OutOfMemoryError", "{error}");
        assert!(error["exception_message"].as_str().unwrap().contains("GiB"), "{error}");
    }
    post(&server.api, &json!({"prompt_id": "after", "prompt": tiny_prompt(0)}));
    assert_eq!(server.api.wait_for_history("after")["status"]["status_str"], "success");
}

/// CRC-32 (IEEE) of PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header says `width`×`height` (8-bit grey), with a token of image data: what a
/// decompression bomb looks like until it is decoded.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let mut typed = kind.to_vec();
        typed.extend(data);
        png.extend(&typed);
        png.extend(crc32(&typed).to_be_bytes());
    };
    let mut header = Vec::new();
    header.extend(width.to_be_bytes());
    header.extend(height.to_be_bytes());
    header.extend([8, 0, 0, 0, 0]);
    chunk(b"IHDR", &header);
    chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

/// Images over Pillow's decompression-bomb limit are refused with Pillow's error before they are
/// decoded, by LoadImage and by `/view?preview=`.
#[test]
fn images_over_pillows_pixel_limit_are_refused_undecoded() {
    let server = start();
    std::fs::write(server.base.path().join("input/bomb.png"), png_claiming(16384, 16384)).unwrap();
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "bomb.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    });
    let (status, answer) = post(&server.api, &json!({"prompt_id": "bomb", "prompt": prompt}));
    assert_eq!(status, 200, "{answer}");
    let entry = server.api.wait_for_history("bomb");
    let error = execution_error(&entry);
    assert_eq!(error["exception_type"], "PIL.Image.DecompressionBombError");
    assert_eq!(
        error["exception_message"],
        "Image size (268435456 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS attack.\n"
    );
    let (status, _, _) = server.api.get("/view?filename=bomb.png&type=input&preview=webp;90");
    assert_eq!(status, 400);
}

/// A checkpoint rewritten in place between prompts (what `cp` does) is not read through the
/// stale memory map of the cached model (SIGBUS): the loader notices the new file version, a
/// truncated file fails its prompt, and the original loads again once it is back.
#[test]
fn a_model_file_replaced_on_disk_is_loaded_again() {
    let server = start();
    let models = server.base.path().join("models");
    easel_models::testmodels::write_test_models(&models).unwrap();
    let checkpoint = models
        .join("checkpoints")
        .join(easel_models::testmodels::TINY_SD1_CHECKPOINT);
    let original = std::fs::read(&checkpoint).unwrap();
    let workflow: Json =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("workflows/sd15_txt2img.json")).unwrap())
            .unwrap();
    let run = |id: &str, seed: u64| {
        let mut prompt = workflow.clone();
        prompt["3"]["inputs"]["seed"] = json!(seed);
        let (status, answer) = post(&server.api, &json!({"prompt_id": id, "prompt": prompt}));
        assert_eq!(status, 200, "{answer}");
        server.api.wait_for_history(id)
    };
    assert_eq!(run("first", 1)["status"]["status_str"], "success");
    std::fs::write(&checkpoint, &original[..original.len() / 2]).unwrap();
    let entry = run("truncated", 2);
    assert_eq!(entry["status"]["status_str"], "error");
    assert_eq!(execution_error(&entry)["node_type"], "CheckpointLoaderSimple");
    std::fs::write(&checkpoint, &original).unwrap();
    assert_eq!(run("restored", 3)["status"]["status_str"], "success");
}

/// A tmpfs mounted over a folder (needs root), unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, bytes: usize) -> Option<SmallDisk> {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the disk under `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    while file.write_all(&[0u8; 64 * 1024]).is_ok() {}
    while file.write_all(&[0u8; 512]).is_ok() {}
    path
}

/// Files under `dir` (recursively) whose names end in `.png`, with their sizes.
fn pngs(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(pngs(&path));
        } else if path.extension().is_some_and(|e| e == "png") {
            found.push((path.clone(), entry.metadata().map_or(0, |m| m.len())));
        }
    }
    found
}

/// On a full disk, an image that cannot be written leaves no zero-byte or truncated PNG, and the
/// history entry the store cannot take is stored once there is space again, the prompt having run
/// once. (On a tmpfs the test mounts; where it cannot, a read-only output folder stands in for the
/// full disk and only the image part runs.)
#[test]
fn a_full_disk_leaves_no_partial_image_and_history_catches_up() {
    let base = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(base.path(), 8 << 20);
    let server = start_in(base, ServerSettings::default());
    let api = &server.api;
    let root = server.base.path().to_path_buf();
    // Grey dilations long enough to fill the disk meanwhile (seconds), then an image to save.
    let prompt = json!({
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 512, "height": 512}},
        "2": {"class_type": "GrowMask", "inputs": {"mask": ["1", 0], "expand": 1000, "tapered_corners": true}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "full"}}
    });
    let (status, answer) = post(api, &json!({"prompt_id": "full", "prompt": prompt}));
    assert_eq!(status, 200, "{answer}");
    let filler = match &disk {
        Some(_) => {
            let started = Instant::now();
            while api.get_json("/queue")["queue_running"].as_array().unwrap().is_empty() {
                assert!(started.elapsed() < Duration::from_secs(30), "the prompt never started");
                std::thread::sleep(Duration::from_millis(5));
            }
            Some(fill(&root))
        }
        None => {
            eprintln!("cannot mount a tmpfs here: a read-only output folder stands in for a full disk");
            let output = root.join("output");
            std::fs::set_permissions(&output, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
            None
        }
    };
    let Some(filler) = filler else {
        let entry = api.wait_for_history("full");
        assert_eq!(execution_error(&entry)["exception_type"], "OSError");
        assert!(pngs(&root.join("output")).is_empty());
        return;
    };
    // The run ends (the image fails for want of space); the store cannot record it yet.
    let started = Instant::now();
    while !api.get_json("/queue")["queue_running"].as_array().unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(120), "the prompt never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pngs(&root.join("output")), vec![], "no partial image was left");
    std::fs::remove_file(filler).unwrap();
    let entry = api.wait_for_history("full");
    let error = execution_error(&entry);
    assert_eq!(error["exception_type"], "OSError", "{error}");
    assert_eq!(error["node_id"], "4");
    let starts = entry["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m[0] == "execution_start")
        .count();
    assert_eq!(starts, 1);
    assert_eq!(
        api.get_json("/queue"),
        json!({"queue_running": [], "queue_pending": []})
    );
    drop(server);
    drop(disk);
}

/// A fast prompt's WebSocket messages never reach its client before the `POST /prompt` answer
/// that names it: clients that start listening for a prompt's messages when that answer arrives
/// (two npm SDKs do) must not miss any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompts_messages_never_overtake_its_post_answer() {
    let server = start();
    let (mut socket, _) = tokio_tungstenite::connect_async(server.api.ws_url("/ws?clientId=listener"))
        .await
        .unwrap();
    // Prompt ids with a message received so far, and the end of each prompt.
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (done_sender, mut done) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader_seen = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = socket.next().await {
            let Message::Text(text) = frame else { continue };
            let message: Json = serde_json::from_str(&text).unwrap();
            if let Some(prompt_id) = message["data"]["prompt_id"].as_str() {
                reader_seen.lock().unwrap().insert(prompt_id.to_string());
                if message["type"] == "executing" && message["data"]["node"].is_null() {
                    let _ = done_sender.send(prompt_id.to_string());
                }
            }
        }
    });
    for round in 0..40u32 {
        let prompt_id = format!("fast-{round}");
        let (api, seen, id) = (server.api.clone(), seen.clone(), prompt_id.clone());
        let early = tokio::task::spawn_blocking(move || {
            let body = json!({"prompt_id": id, "client_id": "listener", "prompt": tiny_prompt(round)});
            let (status, _, text) = api.post("/prompt", &body.to_string());
            assert_eq!(status, 200, "{text}");
            seen.lock().unwrap().contains(&id)
        })
        .await
        .unwrap();
        assert!(!early, "{prompt_id}: a message arrived before the POST answer");
        let ended = tokio::time::timeout(Duration::from_secs(60), done.recv())
            .await
            .unwrap();
        assert_eq!(ended.as_deref(), Some(prompt_id.as_str()));
    }
}
