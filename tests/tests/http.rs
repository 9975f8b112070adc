//! The server over real HTTP: queueing a bundled workflow, reading its history, fetching its images,
//! and ComfyUI's responses to bad requests.

mod common;

use common::{start, workspace};
use serde_json::{json, Value as Json};

#[test]
fn a_queued_workflow_runs_and_its_images_can_be_fetched() {
    let server = start();
    let workflow: Json =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("workflows/load_image.json")).unwrap()).unwrap();
    let body = json!({"prompt": workflow, "client_id": "test-client", "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}});
    let (status, content_type, text) = server.api.post("/prompt", &body.to_string());
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

    let entry = server.api.wait_for_history(&prompt_id);
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
    let (status, content_type, bytes) = server
        .api
        .get("/api/view?filename=scaled_00001_.png&subfolder=load_image&type=output");
    assert_eq!((status, content_type.as_str()), (200, "image/png"));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    let all = server.api.get_json("/api/history?max_items=1");
    assert_eq!(all.as_object().unwrap().keys().collect::<Vec<_>>(), [&prompt_id]);
}

/// A workflow in the frontend's UI format is queued as its API prompt (a bypassed ImageInvert
/// and a Reroute between EmptyImage and SaveImage), and the saved PNG embeds the UI workflow as
/// the frontend's own prompts do.
#[test]
fn a_ui_format_workflow_is_queued_as_its_api_prompt() {
    let server = start();
    let node = |id: u32, class: &str, mode: u32, inputs: Json, widgets: Json| json!({"id": id, "type": class, "mode": mode, "inputs": inputs, "outputs": [], "widgets_values": widgets});
    let workflow = json!({
        "last_node_id": 4, "last_link_id": 3, "version": 0.4,
        "nodes": [
            node(1, "EmptyImage", 0, json!([]), json!([8, 8, 1, 0])),
            node(2, "ImageInvert", 4, json!([{"name": "image", "type": "IMAGE", "link": 1}]), json!([])),
            node(3, "Reroute", 0, json!([{"name": "", "type": "*", "link": 2}]), json!([])),
            node(4, "SaveImage", 0, json!([{"name": "images", "type": "IMAGE", "link": 3}]), json!(["ui_format"])),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"]],
    });
    let (status, _, text) = server.api.post("/prompt", &json!({"prompt": workflow}).to_string());
    assert_eq!(status, 200, "{text}");
    let prompt_id = serde_json::from_str::<Json>(&text).unwrap()["prompt_id"]
        .as_str()
        .unwrap()
        .to_string();
    let entry = server.api.wait_for_history(&prompt_id);
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    assert_eq!(
        entry["prompt"][2],
        json!({
            "1": {"inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}, "class_type": "EmptyImage", "_meta": {"title": "EmptyImage"}},
            "4": {"inputs": {"filename_prefix": "ui_format", "images": ["1", 0]}, "class_type": "SaveImage", "_meta": {"title": "Save Image"}}
        })
    );
    assert_eq!(entry["prompt"][3]["extra_pnginfo"]["workflow"], workflow);
    let (status, _, png) = server.api.get("/view?filename=ui_format_00001_.png&type=output");
    assert_eq!(status, 200);
    assert!(png.windows(9).any(|w| w == b"workflow\0"));
}

#[test]
fn bad_requests_get_comfyui_responses() {
    let server = start();
    let (status, content_type, text) = server.api.post("/prompt", "{not json");
    assert_eq!(
        (status, content_type.as_str(), text.as_str()),
        (
            500,
            "text/plain; charset=utf-8",
            "500 Internal Server Error\n\nServer got itself in trouble"
        )
    );

    let (status, _, text) = server.api.post("/api/prompt", "{}");
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Json>(&text).unwrap(),
        json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": {}})
    );

    let prompt = json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
                                    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}});
    let (status, _, text) = server.api.post("/prompt", &prompt.to_string());
    assert_eq!(status, 400);
    let body: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body["node_errors"]["1"]["errors"][0]["message"],
        "Value 0 smaller than min of 1"
    );

    // Every parsed POST without a number counts, valid or not (the malformed one above did not);
    // `front` queues at -number.
    let (_, _, text) = server.api.post(
        "/prompt",
        &json!({"prompt": {"1": {"class_type": "Nope", "inputs": {}}}, "front": true}).to_string(),
    );
    assert!(text.contains("Cannot execute because node Nope does not exist."));
    let valid = json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                                   "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, "front": true});
    let (_, _, text) = server.api.post("/prompt", &valid.to_string());
    assert_eq!(serde_json::from_str::<Json>(&text).unwrap()["number"], -3);
    let (_, _, text) = server
        .api
        .post("/prompt", &json!({"prompt": valid["prompt"], "number": 7}).to_string());
    assert_eq!(serde_json::from_str::<Json>(&text).unwrap()["number"], 7.0);

    assert_eq!(server.api.get("/view?filename=../secret.png").0, 400);
    assert_eq!(server.api.get("/view?filename=x.png&subfolder=../..").0, 403);
    assert_eq!(server.api.get("/view?filename=missing.png").0, 404);
}

#[test]
fn object_info_lists_every_node() {
    let server = start();
    let info = server.api.get_json("/object_info");
    assert!(info.as_object().unwrap().len() >= 21);
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["example.png"])
    );
    let one = server.api.get_json("/api/object_info/SaveImage");
    assert_eq!(one["SaveImage"]["output_node"], true);
    assert_eq!(server.api.get_json("/object_info/Nope"), json!({}));
}

#[test]
fn information_routes_answer_like_comfyui() {
    let server = start();
    let api = &server.api;
    assert_eq!(api.get_json("/prompt"), json!({"exec_info": {"queue_remaining": 0}}));
    assert_eq!(
        api.get_json("/api/features"),
        json!({"supports_preview_metadata": true, "max_upload_size": 104857600})
    );
    assert_eq!(api.get_json("/embeddings"), json!([]));
    assert_eq!(api.get_json("/extensions"), json!([]));
    assert_eq!(api.get_json("/api/global_subgraphs"), json!({}));
    assert_eq!(
        api.get_json("/models"),
        json!([
            "checkpoints",
            "configs",
            "loras",
            "vae",
            "text_encoders",
            "diffusion_models",
            "clip_vision",
            "style_models",
            "embeddings",
            "diffusers",
            "vae_approx",
            "controlnet",
            "gligen",
            "upscale_models",
            "custom_nodes",
            "hypernetworks",
            "photomaker",
            "classifiers",
            "model_patches",
            "audio_encoders",
            "unet_gguf",
            "clip_gguf",
            "ipadapter"
        ])
    );
    let checkpoints = server.base.path().join("models/checkpoints/sub");
    std::fs::create_dir_all(&checkpoints).unwrap();
    std::fs::write(checkpoints.join("a.safetensors"), b"x").unwrap();
    std::fs::write(server.base.path().join("models/embeddings/neg.pt"), b"x").unwrap();
    assert_eq!(api.get_json("/models/checkpoints"), json!(["sub/a.safetensors"]));
    assert_eq!(api.get_json("/embeddings"), json!(["neg"]));
    assert_eq!(api.get("/models/clip").0, 404);
    assert_eq!(api.get("/models/nope").0, 404);
    let stats = api.get_json("/system_stats");
    assert_eq!(stats["system"]["comfyui_version"], "0.3.64");
    assert_eq!(stats["devices"][0]["type"], "cpu");
    assert!(stats["system"]["ram_total"].as_u64().unwrap() > 0);
}

#[test]
fn history_pages_and_deletes() {
    let server = start();
    let api = &server.api;
    let prompt = |color: u32| {
        json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": color}},
                          "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}})
        .to_string()
    };
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let (_, _, text) = api.post("/prompt", &prompt(i));
            serde_json::from_str::<Json>(&text).unwrap()["prompt_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for id in &ids {
        api.wait_for_history(id);
    }
    let keys = |body: Json| body.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(api.get_json("/history")), ids);
    assert_eq!(keys(api.get_json("/history?max_items=2")), &ids[1..]);
    assert_eq!(keys(api.get_json("/history?offset=2")), &ids[2..]);
    assert_eq!(keys(api.get_json("/history?offset=1&max_items=1")), &ids[1..2]);
    assert_eq!(api.get("/history?max_items=x").0, 500);
    api.post("/history", &json!({"delete": [ids[0]]}).to_string());
    assert_eq!(keys(api.get_json("/history")), &ids[1..]);
    api.post("/history", r#"{"clear": true}"#);
    assert_eq!(api.get_json("/history"), json!({}));

    // /view: a " [temp]" suffix picks the directory.
    let (status, _, text) = api.post("/prompt", &prompt(7));
    assert_eq!(status, 200);
    let id = serde_json::from_str::<Json>(&text).unwrap()["prompt_id"]
        .as_str()
        .unwrap()
        .to_string();
    let entry = api.wait_for_history(&id);
    let name = entry["outputs"]["2"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(api.get(&format!("/view?filename={name}%20[temp]")).0, 200);
    assert_eq!(api.get(&format!("/view?filename={name}")).0, 404);
    assert_eq!(api.get("/view?filename=x.png&type=bogus").0, 400);
    assert_eq!(api.get("/view?filename=/etc/passwd").0, 400);
}

#[test]
fn json_is_gzipped_when_enabled_and_accepted() {
    let settings = easel_server::state::ServerSettings {
        compress_responses: true,
        ..Default::default()
    };
    let server = common::start_with(settings);
    let agent = common::agent();
    let json = agent
        .get(format!("{}/object_info", server.api.url))
        .header("Accept-Encoding", "gzip")
        .call()
        .unwrap();
    assert_eq!(json.headers().get("content-encoding").unwrap(), "gzip");
    let plain = agent.get(format!("{}/object_info", server.api.url)).call().unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    std::fs::write(server.base.path().join("output/x.png"), [0u8; 64]).unwrap();
    let image = agent
        .get(format!("{}/view?filename=x.png", server.api.url))
        .header("Accept-Encoding", "gzip")
        .call()
        .unwrap();
    assert!(image.headers().get("content-encoding").is_none());
}

#[test]
fn unknown_paths_answer_like_comfyuis_catch_all() {
    let server = start();
    assert_eq!(server.api.get("/no/such/route").0, 404);
    let (status, content_type, text) = server.api.post("/no/such/route", "{}");
    assert_eq!(
        (status, content_type.as_str(), text.as_str()),
        (405, "text/plain; charset=utf-8", "405: Method Not Allowed")
    );
}

/// The jobs API of later ComfyUI versions, which the newest frontends read for their queue and
/// history: a finished, a running, a pending and a cancelled job, listed, filtered, paged and
/// looked up.
#[test]
fn jobs_list_queue_and_history_as_one() {
    let server = start();
    let api = &server.api;
    let post = |prompt: Json| {
        let (status, _, text) = api.post("/prompt", &prompt.to_string());
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<Json>(&text).unwrap()["prompt_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let preview = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}},
                         "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}});
    let finished = post(json!({"prompt": preview, "extra_data": {"extra_pnginfo": {"workflow": {"id": "wf-1"}}}}));
    api.wait_for_history(&finished);
    // 16 384 dilations of a 1024² mask run for minutes unless cancelled.
    let slow = json!({
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 1024, "height": 1024}},
        "2": {"class_type": "GrowMask", "inputs": {"mask": ["1", 0], "expand": 16384, "tapered_corners": true}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    });
    let running = post(json!({"prompt": slow}));
    let pending = post(json!({"prompt": slow, "prompt_id": "0b8a3c3e-8d9f-4c57-9a44-5a1f2f0c7d11"}));
    let ids = |body: &Json| -> Vec<String> {
        body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|job| job["id"].as_str().unwrap().to_string())
            .collect()
    };
    let started = std::time::Instant::now();
    let active = loop {
        let active = api.get_json("/api/jobs?status=in_progress,pending&limit=200&offset=0");
        if active["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|job| job["status"] == "in_progress")
        {
            break active;
        }
        assert!(started.elapsed().as_secs() < 30, "{active}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Newest first: the pending job was accepted last.
    assert_eq!(ids(&active), [pending.clone(), running.clone()]);
    assert_eq!(active["jobs"][0]["status"], "pending");
    assert_eq!(active["jobs"][1]["status"], "in_progress");
    assert_eq!(active["jobs"][0]["outputs_count"], 0);
    assert_eq!(
        active["pagination"],
        json!({"offset": 0, "limit": 200, "total": 2, "has_more": false})
    );

    let all = api.get_json("/api/jobs");
    assert_eq!(ids(&all), [pending.clone(), running.clone(), finished.clone()]);
    assert_eq!(all["pagination"]["limit"], Json::Null);
    let page = api.get_json("/jobs?limit=1&offset=1&sort_order=asc");
    assert_eq!(ids(&page), [running.as_str()]);
    assert_eq!(page["pagination"]["has_more"], true);
    assert_eq!(ids(&api.get_json("/api/jobs?workflow_id=wf-1")), [finished.as_str()]);

    let done = &api.get_json("/api/jobs?status=completed")["jobs"][0];
    assert_eq!(done["id"], finished.as_str());
    assert_eq!(done["workflow_id"], "wf-1");
    assert_eq!(done["outputs_count"], 1);
    assert_eq!(done["previewable_outputs_count"], 1);
    assert_eq!(done["preview_output"]["type"], "temp");
    assert_eq!(done["preview_output"]["nodeId"], "2");
    assert_eq!(done["preview_output"]["mediaType"], "images");
    assert!(done["execution_end_time"].as_i64() >= done["execution_start_time"].as_i64());
    let detail = api.get_json(&format!("/api/jobs/{finished}"));
    assert_eq!(detail["outputs"]["2"]["images"][0]["type"], "temp");
    assert_eq!(detail["execution_status"]["status_str"], "success");
    assert_eq!(detail["workflow"]["prompt"]["1"]["class_type"], "EmptyImage");
    let waiting = api.get_json(&format!("/api/jobs/{pending}"));
    assert_eq!(
        (
            waiting["status"].as_str(),
            waiting["workflow"]["prompt"]["2"]["class_type"].as_str()
        ),
        (Some("pending"), Some("GrowMask"))
    );
    assert_eq!(api.get("/api/jobs/no-such-job").0, 404);

    for bad in [
        "status=done",
        "sort_by=name",
        "sort_order=up",
        "limit=0",
        "limit=x",
        "offset=x",
    ] {
        let (status, _, body) = api.get(&format!("/api/jobs?{bad}"));
        assert_eq!(status, 400, "{bad}");
        assert!(
            serde_json::from_slice::<Json>(&body).unwrap()["error"].is_string(),
            "{bad}"
        );
    }
    let (status, _, _) = api.post("/api/jobs/cancel", &json!({"job_ids": ["not-a-uuid"]}).to_string());
    assert_eq!(status, 400);

    let (status, _, body) = api.post("/api/jobs/cancel", &json!({"job_ids": [pending]}).to_string());
    assert_eq!((status, body.as_str()), (200, r#"{"cancelled": true}"#));
    let (_, _, body) = api.post(&format!("/api/jobs/{running}/cancel"), "");
    assert_eq!(body, r#"{"cancelled": true}"#);
    api.wait_for_history(&running);
    let (_, _, body) = api.post(&format!("/api/jobs/{running}/cancel"), "");
    assert_eq!(body, r#"{"cancelled": false}"#);
    let history = api.get_json("/api/jobs?status=completed,failed,cancelled");
    assert_eq!(ids(&history), [running.clone(), finished]);
    assert_eq!(history["jobs"][0]["status"], "cancelled");
    assert_eq!(api.get_json("/api/queue")["queue_pending"], json!([]));
}

/// The built-in page is served at `/easel/` and, with no frontend, at `/`; `/easel/workflows`
/// lists the bundled workflows with a manifest, and every manifest names inputs its node has and
/// fields the page knows.
#[test]
fn the_built_in_page_and_its_workflows_are_served() {
    let server = start();
    let api = &server.api;
    for path in ["/", "/easel/"] {
        let (status, content_type, body) = api.get(path);
        assert_eq!(
            (status, content_type.as_str()),
            (200, "text/html; charset=utf-8"),
            "{path}"
        );
        assert!(String::from_utf8(body).unwrap().contains("/easel/easel.js"));
    }
    let (status, content_type, _) = api.get("/easel/easel.js");
    assert_eq!((status, content_type.as_str()), (200, "text/javascript; charset=utf-8"));
    assert_eq!(api.get("/easel/easel.css").1, "text/css; charset=utf-8");
    assert_eq!(api.get("/easel/missing.js").0, 404);

    let listed = api.get_json("/easel/workflows");
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    for expected in ["sd15_txt2img", "sd15_inpaint", "sdxl_refiner", "flux_q8_gguf_txt2img"] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    assert!(
        !names.contains(&"image_basics"),
        "a workflow without a manifest is not offered"
    );
    let fields = [
        "model",
        "prompt",
        "negative_prompt",
        "image",
        "mask",
        "width",
        "height",
        "steps",
        "seed",
        "denoise",
    ];
    for workflow in listed.as_array().unwrap() {
        let name = &workflow["name"];
        let on_disk: Json = serde_json::from_str(
            &std::fs::read_to_string(workspace().join(format!("workflows/{}.json", name.as_str().unwrap()))).unwrap(),
        )
        .unwrap();
        assert_eq!(workflow["prompt"], on_disk, "{name}");
        let mut offered = Vec::new();
        for (node_id, node) in on_disk.as_object().unwrap() {
            let Some(manifest) = node["_meta"].get("easel") else {
                continue;
            };
            for (field, inputs) in manifest.as_object().unwrap() {
                assert!(
                    fields.contains(&field.as_str()),
                    "{name} node {node_id}: unknown field {field}"
                );
                let inputs: Vec<&Json> = match inputs {
                    Json::Array(list) => list.iter().collect(),
                    one => vec![one],
                };
                for input in inputs {
                    let input = input.as_str().unwrap();
                    let value = &node["inputs"][input];
                    assert!(
                        !value.is_null() && !value.is_array(),
                        "{name} node {node_id}: {field} names {input}, not a widget input of the node"
                    );
                }
                offered.push(field.as_str());
            }
        }
        assert!(
            offered.contains(&"prompt") || offered.contains(&"image"),
            "{name}: {offered:?}"
        );
    }
}
