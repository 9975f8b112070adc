//! Loading and saving files: LoadImage / LoadImageMask against Pillow's decoding, SaveImage and
//! PreviewImage naming and PNG metadata, and file validation, through the real executor.

mod common;

use common::{f32_values, fixture_json, shape as dims, FIXTURES};
use easel_engine::events::Event;
use easel_engine::pyjson::dumps;
use easel_engine::{
    call_standalone, validate_prompt, CacheMode, ExecutionStatus, Executor, Interrupt, NodeInputs, Prompt, Services,
    Value,
};
use easel_nodes::builtin_registry;
use easel_nodes::image::{Image, Mask};
use easel_nodes::paths::Paths;
use indexmap::IndexMap;
use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

struct Setup {
    _dir: tempfile::TempDir,
    base: PathBuf,
    services: Arc<Services>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    let paths = Paths::new(&base).finish();
    paths.prepare().unwrap();
    for file in ["rgba.png", "exif_rotate_6.png", "gray.png"] {
        std::fs::copy(Path::new(FIXTURES).join(file), paths.input.join(file)).unwrap();
    }
    let mut services = Services::new();
    services.insert(paths);
    Setup {
        _dir: dir,
        base,
        services: Arc::new(services),
    }
}

#[test]
fn load_image_matches_pillow() {
    let setup = setup();
    let registry = builtin_registry();
    let cases = fixture_json("load_image.json");
    for case in cases["cases"].as_array().unwrap() {
        let node = registry.get(case["node"].as_str().unwrap()).unwrap();
        let mut inputs = IndexMap::new();
        inputs.insert("image".to_string(), Value::Json(case["file"].clone()));
        if let Some(channel) = case.get("channel") {
            inputs.insert("channel".to_string(), Value::Json(channel.clone()));
        }
        let output = call_standalone(node.as_ref(), &setup.services, &NodeInputs::new(inputs)).unwrap();
        let label = format!("{} {} {:?}", case["node"], case["file"], case.get("channel"));
        let (mask_value, image) = if output.outputs.len() == 2 {
            (&output.outputs[1], Some(output.outputs[0].downcast::<Image>().unwrap()))
        } else {
            (&output.outputs[0], None)
        };
        if let Some(image) = image {
            assert_eq!(
                vec![image.batch, image.height, image.width, image.channels],
                dims(&case["image"]),
                "{label}"
            );
            assert_eq!(image.data, f32_values(&case["image"]), "{label}");
        }
        let mask = mask_value.downcast::<Mask>().unwrap();
        assert_eq!(
            vec![mask.batch, mask.height, mask.width],
            dims(&case["mask"]),
            "{label}"
        );
        assert_eq!(mask.data, f32_values(&case["mask"]), "{label}");
    }
}

fn run(
    executor: &mut Executor,
    services: &Services,
    prompt: Json,
    extra_data: Json,
) -> (ExecutionStatus, Json, Vec<Event>) {
    let validated =
        validate_prompt(executor.registry(), services, Prompt::from_json(prompt).unwrap(), None).expect("valid");
    let events = Mutex::new(Vec::new());
    let sink = |e: Event| events.lock().unwrap().push(e);
    let outcome = executor.execute("p", &validated, &extra_data, &sink, &Interrupt::new());
    (
        outcome.status,
        Json::Object(outcome.outputs),
        events.into_inner().unwrap(),
    )
}

/// PNG chunk names and `tEXt` contents, in file order.
fn png_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    let mut chunks = Vec::new();
    let mut pos = 8;
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = String::from_utf8_lossy(&bytes[pos + 4..pos + 8]).into_owned();
        let data = &bytes[pos + 8..pos + 8 + len];
        let text = if kind == "tEXt" {
            String::from_utf8_lossy(data).into_owned()
        } else {
            String::new()
        };
        if chunks
            .last()
            .is_none_or(|(k, _): &(String, String)| k != &kind || kind != "IDAT")
        {
            chunks.push((kind, text));
        }
        pos += 12 + len;
    }
    chunks
}

#[test]
fn save_image_names_files_and_writes_comfyui_metadata() {
    let setup = setup();
    let mut executor = Executor::new(Arc::new(builtin_registry()), setup.services.clone(), CacheMode::Classic);
    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 3, "height": 2, "batch_size": 2, "color": 0x80FF01}, "_meta": {"title": "Empty"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "test/run"}}
    });
    let workflow = json!({"workflow": {"nodes": [], "links": [], "version": 0.4, "note": "é"}});
    let (status, outputs, events) = run(
        &mut executor,
        &setup.services,
        prompt.clone(),
        json!({"extra_pnginfo": workflow}),
    );
    assert_eq!(status, ExecutionStatus::Success);
    let expected_ui = json!({"images": [
        {"filename": "run_00001_.png", "subfolder": "test", "type": "output"},
        {"filename": "run_00002_.png", "subfolder": "test", "type": "output"}
    ]});
    assert_eq!(outputs["2"], expected_ui);
    assert!(events
        .iter()
        .any(|e| e.kind.name() == "executed" && e.data["output"] == expected_ui));

    let bytes = std::fs::read(setup.base.join("output/test/run_00001_.png")).unwrap();
    let chunks = png_chunks(&bytes);
    let names: Vec<&str> = chunks.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["IHDR", "tEXt", "tEXt", "IDAT", "IEND"]);
    assert_eq!(chunks[1].1, format!("prompt\0{}", dumps(&prompt)));
    assert_eq!(chunks[2].1, format!("workflow\0{}", dumps(&workflow["workflow"])));
    assert!(chunks[2].1.contains("\\u00e9"));

    let decoded = image::open(setup.base.join("output/test/run_00002_.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(decoded.dimensions(), (3, 2));
    // EmptyImage's v/255 times 255 comes back to v in float32 before truncation, as in numpy.
    assert_eq!(decoded.get_pixel(0, 0).0, [128, 255, 1]);

    // A new run continues the counter; a prefix leaving the output folder fails the prompt.
    let mut changed = prompt.clone();
    changed["1"]["inputs"]["color"] = json!(0);
    let (_, outputs, _) = run(&mut executor, &setup.services, changed.clone(), json!({}));
    assert_eq!(outputs["2"]["images"][1]["filename"], "run_00004_.png");
    changed["2"]["inputs"]["filename_prefix"] = json!("../escape");
    let (status, _, events) = run(&mut executor, &setup.services, changed, json!({}));
    assert_eq!(status, ExecutionStatus::Error);
    let error = events.iter().find(|e| e.kind.name() == "execution_error").unwrap();
    assert!(error.data["exception_message"]
        .as_str()
        .unwrap()
        .starts_with("**** ERROR: Saving image outside the output folder is not allowed."));
    assert!(!setup.base.join("escape_00001_.png").exists());
}

#[test]
fn preview_image_writes_temp_files_with_a_stable_random_prefix() {
    let setup = setup();
    let mut executor = Executor::new(Arc::new(builtin_registry()), setup.services.clone(), CacheMode::None);
    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 255}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    });
    let (_, first, _) = run(&mut executor, &setup.services, prompt.clone(), json!({}));
    let (_, second, _) = run(&mut executor, &setup.services, prompt, json!({}));
    let name = first["2"]["images"][0]["filename"].as_str().unwrap().to_string();
    assert_eq!(first["2"]["images"][0]["type"], "temp");
    let suffix = &name["ComfyUI_temp_".len().."ComfyUI_temp_".len() + 5];
    assert!(
        suffix.chars().all(|c| "abcdefghijklmnopqrstupvxyz".contains(c)),
        "{name}"
    );
    assert!(name.ends_with("_00001_.png"));
    assert_eq!(second["2"]["images"][0]["filename"], name.replace("_00001_", "_00002_"));
    assert!(setup.base.join("temp").join(&name).is_file());
}

#[test]
fn load_image_validation_and_fingerprint() {
    let setup = setup();
    let registry = Arc::new(builtin_registry());
    let prompt = |name: &str| {
        json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}}
        })
    };
    for name in ["zzz.png", "../input/rgba.png", "/etc/passwd"] {
        let err = validate_prompt(
            &registry,
            &setup.services,
            Prompt::from_json(prompt(name)).unwrap(),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.node_errors.to_json()["1"]["errors"][0],
            json!({"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": format!("image - Invalid image file: {name}"), "extra_info": {"input_name": "image"}})
        );
    }

    let mut executor = Executor::new(registry, setup.services.clone(), CacheMode::Classic);
    let (status, _, _) = run(&mut executor, &setup.services, prompt("rgba.png"), json!({}));
    assert_eq!(status, ExecutionStatus::Success);
    // The saved prompt carries LoadImage's fingerprint (sha256 of the file), as ComfyUI's does.
    let bytes = std::fs::read(setup.base.join("output/loaded_00001_.png")).unwrap();
    let text = &png_chunks(&bytes)[1].1;
    let saved: Json = serde_json::from_str(text.trim_start_matches("prompt\0")).unwrap();
    assert_eq!(
        saved["1"]["is_changed"].as_array().unwrap()[0].as_str().unwrap().len(),
        64
    );

    // Unchanged file: everything cached. Changed file: LoadImage runs again.
    let (_, _, events) = run(&mut executor, &setup.services, prompt("rgba.png"), json!({}));
    assert!(!events.iter().any(|e| e.kind.name() == "executing"));
    std::fs::copy(Path::new(FIXTURES).join("gray.png"), setup.base.join("input/rgba.png")).unwrap();
    let (_, _, events) = run(&mut executor, &setup.services, prompt("rgba.png"), json!({}));
    assert!(events
        .iter()
        .any(|e| e.kind.name() == "executing" && e.data["node"] == "1"));
}

/// A PNG that claims `width`×`height` pixels but holds no image data.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IEND", &[]));
    png
}

#[test]
fn a_decompression_bomb_is_refused_before_decoding() {
    let setup = setup();
    std::fs::write(setup.base.join("input/bomb.png"), png_header_only(100_000, 100_000)).unwrap();
    let registry = builtin_registry();
    let node = registry.get("LoadImage").unwrap();
    let mut inputs = IndexMap::new();
    inputs.insert("image".to_string(), Value::Json(json!("bomb.png")));
    let error = call_standalone(node.as_ref(), &setup.services, &NodeInputs::new(inputs)).unwrap_err();
    assert!(error.to_string().contains("limit"), "{error}");
    assert!(easel_nodes::image::io::replace_alpha(&png_header_only(100_000, 100_000), &png_header_only(1, 1)).is_err());
}
