//! The WebSocket over a real connection: ComfyUI's messages, in ComfyUI's order and shapes, routed
//! to the submitting client; queue control and interrupts while a prompt runs.

mod common;

use common::{start, workspace, Api, Server};
use futures_util::StreamExt;
use serde_json::{json, Value as Json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &Server, query: &str) -> Socket {
    connect_async(server.api.ws_url(&format!("/ws{query}")))
        .await
        .expect("websocket connects")
        .0
}

/// The next text frame, as (raw text, JSON).
async fn next_text(socket: &mut Socket) -> (String, Json) {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a message within 60 s")
            .expect("the socket stays open")
            .expect("a valid frame");
        if let Message::Text(text) = frame {
            let json = serde_json::from_str(&text).expect("JSON message");
            return (text.to_string(), json);
        }
    }
}

/// Messages until the end-of-prompt `executing {node: null}`.
async fn until_done(socket: &mut Socket) -> Vec<Json> {
    let mut messages = Vec::new();
    loop {
        let (_, message) = next_text(socket).await;
        let done = message["type"] == "executing" && message["data"]["node"].is_null();
        messages.push(message);
        if done {
            return messages;
        }
    }
}

/// `POST /prompt` from a blocking task; returns the response body.
async fn post_async(api: &Api, body: Json) -> Json {
    let api = api.clone();
    tokio::task::spawn_blocking(move || {
        let (status, _, text) = api.post("/prompt", &body.to_string());
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    })
    .await
    .unwrap()
}

fn keys(value: &Json) -> Vec<String> {
    value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// Data keys of each message type in ComfyUI's captured txt2img run.
fn reference_keys() -> std::collections::HashMap<String, Vec<String>> {
    let text = std::fs::read_to_string(workspace().join("tests/tests/fixtures/ws_messages_sd15_t2i.jsonl")).unwrap();
    let mut map = std::collections::HashMap::new();
    for line in text.lines() {
        let message: Json = serde_json::from_str(line).unwrap();
        let kind = message["type"].as_str().unwrap().to_string();
        if kind != "status" {
            map.entry(kind).or_insert_with(|| keys(&message["data"]));
        }
    }
    map
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_gets_comfyui_messages_for_its_prompt_and_others_only_status() {
    let server = start();
    let mut client = connect(&server, "?clientId=client-a").await;
    let (text, _) = next_text(&mut client).await;
    assert_eq!(
        text,
        r#"{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "client-a"}}"#
    );
    let mut observer = connect(&server, "").await;
    let (_, greeting) = next_text(&mut observer).await;
    let sid = greeting["data"]["sid"].as_str().unwrap();
    assert!(sid.len() == 32 && sid.chars().all(|c| c.is_ascii_hexdigit()), "{sid}");

    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 255}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ws"}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    });
    let response = post_async(&server.api, json!({"prompt": prompt, "client_id": "client-a"})).await;
    let prompt_id = response["prompt_id"].as_str().unwrap().to_string();
    let messages = until_done(&mut client).await;
    let kinds: Vec<&str> = messages.iter().map(|m| m["type"].as_str().unwrap()).collect();
    // The order of ComfyUI's run: two status, start, cached, per node progress_state → executing →
    // (executed) → progress_state, success, status, executing null.
    assert_eq!(
        kinds,
        [
            "status",
            "status",
            "execution_start",
            "execution_cached",
            "progress_state",
            "executing",
            "progress_state",
            "progress_state",
            "executing",
            "executed",
            "progress_state",
            "progress_state",
            "executing",
            "progress_state",
            "progress_state",
            "executing",
            "executed",
            "progress_state",
            "execution_success",
            "status",
            "executing"
        ]
    );
    let nodes: Vec<&str> = messages
        .iter()
        .filter(|m| m["type"] == "executing")
        .filter_map(|m| m["data"]["node"].as_str())
        .collect();
    assert_eq!(nodes, ["1", "2", "3", "4"]);
    assert_eq!(messages[0]["data"]["status"]["exec_info"]["queue_remaining"], 1);
    assert_eq!(messages[19]["data"]["status"]["exec_info"]["queue_remaining"], 0);
    assert_eq!(messages[20]["data"], json!({"node": null, "prompt_id": prompt_id}));
    let reference = reference_keys();
    for message in &messages[..20] {
        let kind = message["type"].as_str().unwrap();
        if let Some(expected) = reference.get(kind) {
            assert_eq!(&keys(&message["data"]), expected, "{kind}");
        }
    }

    // The observer saw only the queue's status broadcasts.
    let mut seen = Vec::new();
    while let Ok(Some(Ok(Message::Text(text)))) =
        tokio::time::timeout(Duration::from_millis(300), observer.next()).await
    {
        seen.push(
            serde_json::from_str::<Json>(&text).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen, ["status", "status", "status"]);

    // The history entry has ComfyUI's shape.
    let reference: Json = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("tests/tests/fixtures/history_sd15_t2i.json")).unwrap(),
    )
    .unwrap();
    let reference_entry = reference["body"].as_object().unwrap().values().next().unwrap();
    let api = server.api.clone();
    let entry = tokio::task::spawn_blocking(move || api.wait_for_history(&prompt_id))
        .await
        .unwrap();
    assert_eq!(keys(&entry), keys(reference_entry));
    assert_eq!(keys(&entry["status"]), keys(&reference_entry["status"]));
    let meta = entry["meta"].as_object().unwrap().values().next().unwrap();
    assert_eq!(
        keys(meta),
        keys(reference_entry["meta"].as_object().unwrap().values().next().unwrap())
    );
    assert_eq!(entry["prompt"].as_array().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn feature_flags_are_negotiated_on_the_first_frame() {
    use futures_util::SinkExt;
    let server = start();
    let mut socket = connect(&server, "?clientId=ff").await;
    next_text(&mut socket).await;
    let hello = r#"{"type":"feature_flags","data":{"supports_preview_metadata":true,"supports_manager_v4_ui":true}}"#;
    socket.send(Message::Text(hello.into())).await.unwrap();
    let (text, _) = next_text(&mut socket).await;
    assert_eq!(
        text,
        r#"{"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 104857600}}"#
    );
}

/// `expand` grey dilations of a `size`² mask, then a preview: 16 384 of 1024² run for minutes
/// unless interrupted.
fn mask_prompt(size: u32, expand: u32) -> Json {
    json!({
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": size, "height": size}},
        "2": {"class_type": "GrowMask", "inputs": {"mask": ["1", 0], "expand": expand, "tapered_corners": true}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    })
}

fn slow_prompt() -> Json {
    mask_prompt(1024, 16384)
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_control_and_interrupt_while_a_prompt_runs() {
    let server = start();
    let mut client = connect(&server, "?clientId=slow").await;
    next_text(&mut client).await;
    let running = post_async(&server.api, json!({"prompt": slow_prompt(), "client_id": "slow"})).await;
    let running_id = running["prompt_id"].as_str().unwrap().to_string();
    // Wait until the slow node runs.
    loop {
        let (_, message) = next_text(&mut client).await;
        if message["type"] == "executing" && message["data"]["node"] == "2" {
            break;
        }
    }
    let later = post_async(&server.api, json!({"prompt": slow_prompt(), "prompt_id": "later"})).await;
    assert_eq!(later["prompt_id"], "later");
    post_async(
        &server.api,
        json!({"prompt": slow_prompt(), "prompt_id": "sooner", "front": true}),
    )
    .await;

    let api = server.api.clone();
    let (queue, after_delete, after_clear) = tokio::task::spawn_blocking(move || {
        let queue = api.get_json("/queue");
        api.post("/queue", r#"{"delete": ["later"]}"#);
        let after_delete = api.get_json("/api/queue");
        api.post("/queue", r#"{"clear": true}"#);
        let after_clear = api.get_json("/queue");
        api.post("/interrupt", r#"{"prompt_id": "not-running"}"#);
        (queue, after_delete, after_clear)
    })
    .await
    .unwrap();
    assert_eq!(queue["queue_running"][0][1], running_id.as_str());
    assert_eq!(queue["queue_pending"][0][1], "sooner");
    assert_eq!(queue["queue_pending"].as_array().unwrap().len(), 2);
    assert_eq!(after_delete["queue_pending"].as_array().unwrap().len(), 1);
    assert_eq!(after_clear["queue_pending"], json!([]));

    let api = server.api.clone();
    let body = json!({"prompt_id": running_id}).to_string();
    tokio::task::spawn_blocking(move || {
        assert_eq!(api.post("/interrupt", &body).0, 200);
    })
    .await
    .unwrap();
    let messages = until_done(&mut client).await;
    let interrupted = messages
        .iter()
        .find(|m| m["type"] == "execution_interrupted")
        .expect("interrupted");
    assert_eq!(interrupted["data"]["node_id"], "2");
    assert_eq!(interrupted["data"]["node_type"], "GrowMask");
    let api = server.api.clone();
    let entry = tokio::task::spawn_blocking(move || api.wait_for_history(&running_id))
        .await
        .unwrap();
    assert_eq!(entry["status"]["status_str"], "error");
    assert_eq!(entry["status"]["messages"][2][0], "execution_interrupted");
}

/// Frames until the end of the prompt: JSON messages as `Ok`, binary frames as `Err`.
async fn frames_until_done(socket: &mut Socket) -> Vec<Result<Json, Vec<u8>>> {
    let mut frames = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match frame {
            Message::Text(text) => {
                let message: Json = serde_json::from_str(&text).unwrap();
                let done = message["type"] == "executing" && message["data"]["node"].is_null();
                frames.push(Ok(message));
                if done {
                    return frames;
                }
            }
            Message::Binary(bytes) => frames.push(Err(bytes.to_vec())),
            _ => {}
        }
    }
}

fn websocket_image_prompt() -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 6, "batch_size": 2, "color": 65280}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn save_image_websocket_sends_png_frames_in_comfyui_order() {
    use futures_util::SinkExt;
    let server = start();

    // A plain client: progress, then a type 1 frame (format 2 = PNG) per image.
    let mut plain = connect(&server, "?clientId=plain").await;
    next_text(&mut plain).await;
    post_async(
        &server.api,
        json!({"prompt": websocket_image_prompt(), "client_id": "plain"}),
    )
    .await;
    let frames = frames_until_done(&mut plain).await;
    let labels: Vec<String> = frames
        .iter()
        .map(|f| match f {
            Ok(m) => m["type"].as_str().unwrap().to_string(),
            Err(b) => format!("bin{}", u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        })
        .skip_while(|l| l != "executing")
        .skip(2)
        .collect();
    assert_eq!(
        labels[..11],
        [
            "progress_state",
            "executing",
            "progress_state",
            "progress",
            "bin1",
            "progress_state",
            "progress",
            "bin1",
            "progress_state",
            "execution_success",
            "status"
        ]
    );
    let binary: Vec<&Vec<u8>> = frames.iter().filter_map(|f| f.as_ref().err()).collect();
    assert_eq!(binary.len(), 2);
    assert_eq!(&binary[0][4..8], &2u32.to_be_bytes());
    let image = image::load_from_memory(&binary[0][8..]).unwrap().to_rgb8();
    assert_eq!((image.dimensions(), image.get_pixel(0, 0).0), ((8, 6), [0, 255, 0]));
    assert!(!frames.iter().any(|f| f.as_ref().is_ok_and(|m| m["type"] == "executed")));

    // A client that negotiated preview metadata: type 4 with ComfyUI's metadata, before `progress`;
    // the node runs again although nothing changed (its fingerprint is the time).
    let mut modern = connect(&server, "?clientId=modern").await;
    next_text(&mut modern).await;
    let hello = r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#;
    modern.send(Message::Text(hello.into())).await.unwrap();
    next_text(&mut modern).await;
    let response = post_async(
        &server.api,
        json!({"prompt": websocket_image_prompt(), "client_id": "modern"}),
    )
    .await;
    let prompt_id = response["prompt_id"].as_str().unwrap();
    let frames = frames_until_done(&mut modern).await;
    let first_binary = frames.iter().position(|f| f.is_err()).unwrap();
    assert_eq!(frames[first_binary - 1].as_ref().unwrap()["type"], "progress_state");
    assert_eq!(frames[first_binary + 1].as_ref().unwrap()["type"], "progress");
    let frame = frames[first_binary].as_ref().unwrap_err();
    assert_eq!(&frame[..4], &4u32.to_be_bytes());
    let length = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize;
    let metadata: Json = serde_json::from_slice(&frame[8..8 + length]).unwrap();
    assert_eq!(
        metadata,
        json!({"node_id": "2", "prompt_id": prompt_id, "display_node_id": "2", "parent_node_id": null, "real_node_id": "2", "image_type": "image/png"})
    );
    assert!(image::load_from_memory(&frame[8 + length..]).is_ok());
}

/// The bundled FLUX GGUF workflow that ends in SaveImageWebsocket sends its image as a PNG frame.
#[tokio::test(flavor = "multi_thread")]
async fn the_flux_websocket_workflow_sends_its_image_as_a_frame() {
    let server = start();
    easel_models::testmodels::write_test_models(&server.base.path().join("models")).unwrap();
    let workflow: Json = serde_json::from_str(
        &std::fs::read_to_string(workspace().join("workflows/flux_q8_gguf_txt2img_websocket.json")).unwrap(),
    )
    .unwrap();
    let mut socket = connect(&server, "?clientId=flux").await;
    next_text(&mut socket).await;
    post_async(&server.api, json!({"prompt": workflow, "client_id": "flux"})).await;
    let frames = frames_until_done(&mut socket).await;
    assert!(
        frames
            .iter()
            .any(|f| f.as_ref().is_ok_and(|m| m["type"] == "execution_success")),
        "{frames:?}"
    );
    let binary: Vec<&Vec<u8>> = frames.iter().filter_map(|f| f.as_ref().err()).collect();
    let image = binary
        .iter()
        .filter(|frame| frame[..8] == [0, 0, 0, 1, 0, 0, 0, 2])
        .map(|frame| image::load_from_memory(&frame[8..]).unwrap())
        .next_back()
        .expect("a PNG frame");
    assert_eq!((image.width(), image.height()), (64, 64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_clients_each_receive_exactly_their_own_messages() {
    let server = start();
    let mut tasks = Vec::new();
    for index in 0..50u32 {
        let api = server.api.clone();
        tasks.push(tokio::spawn(async move {
            let sid = format!("client-{index}");
            let mut socket = connect_async(api.ws_url(&format!("/ws?clientId={sid}")))
                .await
                .unwrap()
                .0;
            next_text(&mut socket).await;
            let prompt = json!({
                "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": index}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
            });
            let response = post_async(&api, json!({"prompt": prompt, "client_id": sid})).await;
            let prompt_id = response["prompt_id"].as_str().unwrap().to_string();
            let mut messages = Vec::new();
            loop {
                let (_, message) = next_text(&mut socket).await;
                let mine_done = message["type"] == "executing"
                    && message["data"]["node"].is_null()
                    && message["data"]["prompt_id"] == prompt_id.as_str();
                messages.push(message);
                if mine_done {
                    break;
                }
            }
            (prompt_id, messages)
        }));
    }
    for task in tasks {
        let (prompt_id, messages) = task.await.unwrap();
        for message in &messages {
            if message["type"] == "status" {
                continue;
            }
            assert_eq!(message["data"]["prompt_id"], prompt_id.as_str(), "{message}");
        }
        let kinds: Vec<&str> = messages
            .iter()
            .map(|m| m["type"].as_str().unwrap())
            .filter(|k| *k != "status")
            .collect();
        assert_eq!(kinds.first(), Some(&"execution_start"));
        assert!(kinds.contains(&"executed") && kinds.contains(&"execution_success"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnecting_client_keeps_its_messages_and_a_silent_one_stalls_nothing() {
    let server = start();
    // A client that never reads its socket: its prompts still run to the end.
    let _silent = connect(&server, "?clientId=silent").await;
    let response = post_async(
        &server.api,
        json!({"prompt": mask_prompt(64, 3), "client_id": "silent"}),
    )
    .await;
    let prompt_id = response["prompt_id"].as_str().unwrap().to_string();
    let api = server.api.clone();
    let entry = tokio::task::spawn_blocking(move || api.wait_for_history(&prompt_id))
        .await
        .unwrap();
    assert_eq!(entry["status"]["status_str"], "success");

    // The same clientId on a new socket replaces the old one; closing the old one later does not
    // unregister the new one.
    let mut old = connect(&server, "?clientId=again").await;
    // The greeting comes after registration: wait for it so the sockets register in this order.
    next_text(&mut old).await;
    let mut new = connect(&server, "?clientId=again").await;
    next_text(&mut new).await;
    drop(old);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let response = post_async(&server.api, json!({"prompt": mask_prompt(64, 3), "client_id": "again"})).await;
    let messages = until_done(&mut new).await;
    assert!(messages
        .iter()
        .any(|m| m["type"] == "execution_success" && m["data"]["prompt_id"] == response["prompt_id"]));
}

/// The bundled txt2img workflow on the tiny SD1.x model sends exactly the message sequence of
/// ComfyUI's captured run: the same types in the same order, nodes in the same order, and one
/// `progress` per sampling step.
#[tokio::test(flavor = "multi_thread")]
async fn the_txt2img_workflow_sends_the_messages_of_comfyui_s_run() {
    let server = start();
    easel_models::testmodels::write_test_models(&server.base.path().join("models")).unwrap();
    let mut client = connect(&server, "?clientId=reference-client-0001").await;
    next_text(&mut client).await;
    let workflow: Json =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("workflows/sd15_txt2img.json")).unwrap())
            .unwrap();
    post_async(
        &server.api,
        json!({"prompt": workflow, "client_id": "reference-client-0001"}),
    )
    .await;
    let messages = until_done(&mut client).await;

    let text = std::fs::read_to_string(workspace().join("tests/tests/fixtures/ws_messages_sd15_t2i.jsonl")).unwrap();
    let reference: Vec<Json> = text
        .lines()
        .skip(1)
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let kinds = |messages: &[Json]| -> Vec<String> {
        messages
            .iter()
            .map(|m| m["type"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(kinds(&messages), kinds(&reference));
    let executing = |messages: &[Json]| -> Vec<Json> {
        messages
            .iter()
            .filter(|m| m["type"] == "executing")
            .map(|m| m["data"]["node"].clone())
            .collect()
    };
    assert_eq!(executing(&messages), executing(&reference));
    let progress = |messages: &[Json]| -> Vec<(Json, Json, Json)> {
        messages
            .iter()
            .filter(|m| m["type"] == "progress")
            .map(|m| {
                (
                    m["data"]["value"].clone(),
                    m["data"]["max"].clone(),
                    m["data"]["node"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(progress(&messages), progress(&reference));
    let executed = messages.iter().find(|m| m["type"] == "executed").unwrap();
    let image = &executed["data"]["output"]["images"][0];
    assert_eq!(
        (image["subfolder"].as_str(), image["type"].as_str()),
        (Some(""), Some("output"))
    );
    assert!(image["filename"].as_str().unwrap().starts_with("sd15_txt2img_"));
}
