//! `easel run` on every bundled workflow (with the models of `easel testmodels`): it must succeed, write the images its last stdout line
//! names, and reject a bad workflow with ComfyUI's error body; it also takes UI-format workflows.

use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn easel(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_easel"))
        .args(args)
        .output()
        .expect("easel runs")
}

#[test]
fn every_bundled_workflow_runs_and_writes_its_images() {
    let workflows = workspace().join("workflows");
    let mut ran = 0;
    for entry in std::fs::read_dir(&workflows).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let base = tempfile::tempdir().unwrap();
        let models = base.path().join("models");
        let written = easel(&["testmodels", models.to_str().unwrap()]);
        assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
        let out = easel(&[
            "run",
            path.to_str().unwrap(),
            "--base-directory",
            base.path().to_str().unwrap(),
            "--input-directory",
            workflows.join("input").to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}\n{}",
            path.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let outputs: Json = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let mut images = 0;
        for ui in outputs.as_object().unwrap().values() {
            for image in ui["images"].as_array().unwrap() {
                let dir = if image["type"] == "temp" { "temp" } else { "output" };
                let file = base
                    .path()
                    .join(dir)
                    .join(image["subfolder"].as_str().unwrap())
                    .join(image["filename"].as_str().unwrap());
                let decoded = image::open(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                assert!(decoded.width() > 0 && decoded.height() > 0);
                images += 1;
            }
        }
        // A workflow ending in SaveImageWebsocket sends its images to WebSocket clients only.
        let websocket_only = !std::fs::read_to_string(&path).unwrap().contains("\"SaveImage\"");
        assert!(images > 0 || websocket_only, "{} produced no images", path.display());
        ran += 1;
    }
    assert!(ran >= 3);
}

#[test]
fn a_request_body_with_extra_data_is_accepted_and_metadata_can_be_disabled() {
    let base = tempfile::tempdir().unwrap();
    let request = base.path().join("request.json");
    std::fs::write(
        &request,
        r#"{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                       "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "plain"}}},
            "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}}"#,
    )
    .unwrap();
    let out = easel(&[
        "run",
        request.to_str().unwrap(),
        "--base-directory",
        base.path().to_str().unwrap(),
        "--disable-metadata",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(base.path().join("output/plain_00001_.png")).unwrap();
    assert!(!bytes.windows(4).any(|w| w == b"tEXt"));
}

/// `easel run` takes a workflow saved in the frontend's UI format, and the PNG embeds it.
#[test]
fn a_ui_format_workflow_runs() {
    let base = tempfile::tempdir().unwrap();
    let workflow = base.path().join("ui_workflow.json");
    std::fs::write(
        &workflow,
        r#"{"nodes": [{"id": 1, "type": "EmptyImage", "mode": 0, "inputs": [], "widgets_values": [8, 8, 1, 255]},
                      {"id": 2, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
                       "widgets_values": ["from_ui"]}],
            "links": [[1, 1, 0, 2, 0, "IMAGE"]], "version": 0.4}"#,
    )
    .unwrap();
    let out = easel(&[
        "run",
        workflow.to_str().unwrap(),
        "--base-directory",
        base.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(base.path().join("output/from_ui_00001_.png")).unwrap();
    assert!(bytes.windows(9).any(|w| w == b"workflow\0"));
}

#[test]
fn an_invalid_workflow_exits_2_with_comfyui_error_json() {
    let base = tempfile::tempdir().unwrap();
    let workflow = base.path().join("bad.json");
    std::fs::write(&workflow, r#"{"1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
                                  "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}"#).unwrap();
    let out = easel(&[
        "run",
        workflow.to_str().unwrap(),
        "--base-directory",
        base.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let error: Json = serde_json::from_str(String::from_utf8_lossy(&out.stderr).lines().last().unwrap()).unwrap();
    assert_eq!(error["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(error["node_errors"]["1"]["errors"][0]["type"], "value_smaller_than_min");

    std::fs::write(&workflow, "{not json").unwrap();
    let out = easel(&[
        "run",
        workflow.to_str().unwrap(),
        "--base-directory",
        base.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not JSON"));
}

#[test]
fn serving_beyond_loopback_needs_a_key() {
    let base = tempfile::tempdir().unwrap();
    let out = easel(&[
        "serve",
        "--listen",
        "0.0.0.0",
        "--port",
        "0",
        "--base-directory",
        base.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to listen on 0.0.0.0 without an API key"));
}

#[test]
fn an_empty_api_key_is_refused_at_start_up() {
    let base = tempfile::tempdir().unwrap();
    let keys = base.path().join("keys.txt");
    std::fs::write(&keys, "\n  \n").unwrap();
    let from_file = format!("@{}", keys.display());
    for key in ["", " ", from_file.as_str()] {
        let out = easel(&[
            "serve",
            "--listen",
            "0.0.0.0",
            "--port",
            "0",
            "--api-key",
            key,
            "--base-directory",
            base.path().to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{key:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--api-key"), "{key:?}: {stderr}");
    }
}
