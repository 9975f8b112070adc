//! The animation savers, latent files and display nodes against what ComfyUI 0.3.64's own nodes
//! produce (fixtures/output_nodes.json, from generate_output_nodes.py): SaveAnimatedWEBP,
//! SaveAnimatedPNG, SaveLatent / LoadLatent, GetImageSize with its progress text, PreviewAny,
//! MaskPreview and LoadImageOutput.

mod common;

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use candle_core::{Device, Tensor};
use common::{f32_values, fixture_json, shape as dims, FIXTURES};
use easel_engine::events::{Event, EventKind};
use easel_engine::schema::{NodeSchema, OutputSpec};
use easel_engine::{
    call_standalone, validate_prompt, CacheMode, ExecutionStatus, Executor, Interrupt, Node, NodeContext, NodeError,
    NodeInputs, NodeOutput, Prompt, Services, Value,
};
use easel_nodes::builtin_registry;
use easel_nodes::image::{Image, Mask};
use easel_nodes::latent::Latent;
use easel_nodes::paths::Paths;
use image::AnimationDecoder;
use indexmap::IndexMap;
use serde_json::{json, Map, Value as Json};

/// Outputs the fixture's three 2×3 frames: black, one white pixel at (x 1, y 0), the same again.
struct TestFrames;

impl Node for TestFrames {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("TestFrames", "test", "test").output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, _: &NodeInputs) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput::values(vec![Value::object(frames())]))
    }
}

fn frames() -> Image {
    let mut image = Image::filled(3, 2, 3, 3, 0.0);
    for b in 1..3 {
        for c in 0..3 {
            let at = image.index(b, 0, 1, c);
            image.data[at] = 1.0;
        }
    }
    image
}

/// Outputs the fixture's latents, `(i − 20) / 7` in a [2, 4, 2, 3] tensor.
struct TestLatent;

impl Node for TestLatent {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("TestLatent", "test", "test").output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, _: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let values: Vec<f32> = (0..48).map(|i| (i as f32 - 20.0) / 7.0).collect();
        let samples = Tensor::from_vec(values, (2, 4, 2, 3), &Device::Cpu).unwrap();
        Ok(NodeOutput::values(vec![Value::object(Latent::new(samples))]))
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    paths: Paths,
    services: Arc<Services>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path()).finish();
    paths.prepare().unwrap();
    let mut services = Services::new();
    services.insert(paths.clone());
    Setup {
        _dir: dir,
        paths,
        services: Arc::new(services),
    }
}

/// Runs `prompt` with the built-in nodes and the test nodes; the outcome's status and outputs,
/// and every event.
fn run(setup: &Setup, prompt: Json, extra_data: Json) -> (ExecutionStatus, Json, Vec<Event>) {
    let mut registry = builtin_registry();
    registry.register(TestFrames);
    registry.register(TestLatent);
    let registry = Arc::new(registry);
    let validated = validate_prompt(&registry, &setup.services, Prompt::from_json(prompt).unwrap(), None)
        .unwrap_or_else(|failure| panic!("invalid prompt: {}", failure.to_json()));
    let mut executor = Executor::new(registry, setup.services.clone(), CacheMode::Classic);
    let events = Mutex::new(Vec::new());
    let sink = |event: Event| events.lock().unwrap().push(event);
    let outcome = executor.execute("p", &validated, &extra_data, &sink, &Interrupt::new());
    (
        outcome.status,
        Json::Object(outcome.outputs),
        events.into_inner().unwrap(),
    )
}

/// The fixture's prompt run once; every comparison below reads its files and events.
struct Run {
    setup: Setup,
    fixture: Json,
    outputs: Json,
    events: Vec<Event>,
}

fn run_fixture_prompt() -> Run {
    let setup = setup();
    let fixture = fixture_json("output_nodes.json");
    let extra_data = json!({"extra_pnginfo": fixture["extra_pnginfo"]});
    let (status, outputs, events) = run(&setup, fixture["prompt"].clone(), extra_data);
    assert_eq!(status, ExecutionStatus::Success, "{events:?}");
    Run {
        setup,
        fixture,
        outputs,
        events,
    }
}

impl Run {
    /// The bytes of the file a UI item names in the output directory.
    fn output_file(&self, item: &Json) -> Vec<u8> {
        let path = self
            .setup
            .paths
            .output
            .join(item["subfolder"].as_str().unwrap())
            .join(item["filename"].as_str().unwrap());
        std::fs::read(path).unwrap()
    }
}

fn base64(text: &Json) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().unwrap())
        .unwrap()
}

/// The chunks of a RIFF WebP file.
fn webp_chunks(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    assert_eq!((&bytes[..4], &bytes[8..12]), (&b"RIFF"[..], &b"WEBP"[..]));
    assert_eq!(
        u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize,
        bytes.len() - 8
    );
    let mut chunks = Vec::new();
    let mut at = 12;
    while at < bytes.len() {
        let size = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let name = String::from_utf8(bytes[at..at + 4].to_vec()).unwrap();
        chunks.push((name, bytes[at + 8..at + 8 + size].to_vec()));
        at += 8 + size + size % 2;
    }
    chunks
}

/// The chunks of a PNG file.
fn png_chunks(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut chunks = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let name = String::from_utf8(bytes[at + 4..at + 8].to_vec()).unwrap();
        chunks.push((name, bytes[at + 8..at + 8 + size].to_vec()));
        at += 12 + size;
    }
    chunks
}

/// The RGB bytes of each test frame.
fn frame_rgb(index: usize) -> Vec<u8> {
    let image = frames();
    image.frame(index).iter().map(|&v| (v * 255.0) as u8).collect()
}

/// Decoded animation frames as RGB, with their delays in milliseconds.
fn decoded(frames: Vec<image::Frame>) -> Vec<(Vec<u8>, u32)> {
    frames
        .into_iter()
        .map(|frame| {
            let (numerator, denominator) = frame.delay().numer_denom_ms();
            let rgb = image::DynamicImage::ImageRgba8(frame.into_buffer())
                .to_rgb8()
                .into_raw();
            (rgb, numerator / denominator)
        })
        .collect()
}

#[test]
fn animated_webp_matches_comfyui() {
    let run = run_fixture_prompt();
    for (node, case, distinct) in [("2", "webp_animated", 2), ("4", "webp_still", 1)] {
        let expected = &run.fixture[case];
        assert_eq!(run.outputs[node], expected["ui"], "{case}");
        let bytes = run.output_file(&expected["ui"]["images"][0]);
        let chunks = webp_chunks(&bytes);
        let names: Vec<&str> = chunks.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(json!(names), expected["chunks"], "{case}");
        let exif = &chunks.iter().find(|(name, _)| name == "EXIF").unwrap().1;
        assert_eq!(
            *exif,
            base64(&expected["exif_base64"]),
            "{case}: EXIF as Pillow writes it"
        );
        let durations: Vec<u32> = chunks
            .iter()
            .filter(|(name, _)| name == "ANMF")
            .map(|(_, data)| u32::from_le_bytes([data[12], data[13], data[14], 0]))
            .collect();
        assert_eq!(json!(durations), expected["durations"], "{case}");

        if distinct == 1 {
            let still = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(still.into_raw(), frame_rgb(0), "{case}");
        } else {
            let decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(&bytes)).unwrap();
            let frames = decoded(decoder.into_frames().collect_frames().unwrap());
            assert_eq!(
                frames,
                vec![(frame_rgb(0), 166), (frame_rgb(1), 332)],
                "{case}: lossless frames"
            );
        }
    }
}

#[test]
fn animated_png_matches_comfyui() {
    let run = run_fixture_prompt();
    let expected = &run.fixture["apng"];
    assert_eq!(run.outputs["5"], expected["ui"]);
    let bytes = run.output_file(&expected["ui"]["images"][0]);
    // Chunk order and every chunk but the compressed image data, byte for byte.
    let chunks: Vec<Json> = png_chunks(&bytes)
        .into_iter()
        .map(|(name, data)| match name.as_str() {
            "IHDR" | "acTL" | "fcTL" | "comf" => {
                json!([name, data.iter().map(|b| format!("{b:02x}")).collect::<String>()])
            }
            _ => json!([name, null]),
        })
        .collect();
    assert_eq!(json!(chunks), expected["chunks"]);

    let decoder = image::codecs::png::PngDecoder::new(Cursor::new(&bytes)).unwrap();
    let frames = decoded(decoder.apng().unwrap().into_frames().collect_frames().unwrap());
    assert_eq!(frames, vec![(frame_rgb(0), 142), (frame_rgb(1), 284)]);
}

#[test]
fn a_single_frame_apng_is_a_plain_png_and_disabled_metadata_writes_none() {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path()).finish();
    paths.prepare().unwrap();
    let mut services = Services::new();
    services.insert(paths.clone());
    services.insert(easel_nodes::image::nodes::ImageMetadata { enabled: false });
    let setup = Setup {
        _dir: dir,
        paths,
        services: Arc::new(services),
    };
    let prompt = json!({
        "1": {"inputs": {"width": 4, "height": 2, "batch_size": 3, "color": 0xFF0000}, "class_type": "EmptyImage"},
        "2": {"inputs": {"images": ["1", 0], "filename_prefix": "same", "fps": 1.0, "compress_level": 0}, "class_type": "SaveAnimatedPNG"},
        "3": {"inputs": {"images": ["1", 0], "filename_prefix": "same", "fps": 1.0, "lossless": false, "quality": 90, "method": "fastest"}, "class_type": "SaveAnimatedWEBP"}
    });
    let (status, outputs, _) = run(&setup, prompt, json!({}));
    assert_eq!(status, ExecutionStatus::Success);
    let png = std::fs::read(setup.paths.output.join("same_00001_.png")).unwrap();
    let names: Vec<String> = png_chunks(&png).into_iter().map(|(name, _)| name).collect();
    // Three equal frames merge into one, written without animation chunks.
    assert_eq!(names, ["IHDR", "IDAT", "IEND"]);
    assert_eq!(outputs["2"]["animated"], json!([true]));
    let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
    assert!(decoded.pixels().all(|p| p.0 == [255, 0, 0]));

    // The WebP of three equal frames: one still image; its EXIF is Pillow's empty one.
    let webp = std::fs::read(setup.paths.output.join("same_00002_.webp")).unwrap();
    assert_eq!(outputs["3"]["images"][0]["filename"], "same_00002_.webp");
    assert_eq!(outputs["3"]["animated"], json!([true]));
    let chunks = webp_chunks(&webp);
    let names: Vec<&str> = chunks.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["VP8X", "VP8 ", "EXIF"]);
    assert_eq!(chunks[2].1, b"Exif\0\0MM\0*\0\0\0\x08\0\0\0\0\0\0");
    let decoded = image::load_from_memory(&webp).unwrap().to_rgb8();
    assert!(
        decoded.pixels().all(|p| p.0[0] > 240 && p.0[1] < 16 && p.0[2] < 16),
        "lossy red"
    );
}

/// The header of a safetensors file.
fn safetensors_header(bytes: &[u8]) -> Json {
    let size = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + size]).unwrap()
}

fn load_latent(setup: &Setup, name: &str) -> Result<Vec<f32>, NodeError> {
    let node = builtin_registry().get("LoadLatent").unwrap().clone();
    let mut inputs = IndexMap::new();
    inputs.insert("latent".to_string(), Value::Json(json!(name)));
    let output = call_standalone(node.as_ref(), &setup.services, &NodeInputs::new(inputs))?;
    let latent = output.outputs[0].downcast::<Latent>().unwrap();
    assert_eq!(latent.samples.dims(), [2, 4, 2, 3]);
    Ok(latent.samples.flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

#[test]
fn latent_files_match_comfyui() {
    let run = run_fixture_prompt();
    let expected = &run.fixture["latent"];
    assert_eq!(run.outputs["8"], expected["ui"]);
    let saved = run.output_file(&expected["ui"]["latents"][0]);
    assert_eq!(
        safetensors_header(&saved),
        expected["header"],
        "tensors, offsets and metadata"
    );
    let samples = f32_values(&expected["samples"]);
    assert_eq!(dims(&expected["samples"]), [2, 4, 2, 3]);
    let data = &saved[saved.len() - 192..];
    let written: Vec<f32> = data
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(written, samples);

    // ComfyUI's file, ours, and a legacy file without the version marker, loaded back.
    let input = &run.setup.paths.input;
    std::fs::write(input.join("comfyui.latent"), base64(&expected["file_base64"])).unwrap();
    std::fs::write(input.join("ours.latent"), &saved).unwrap();
    std::fs::write(input.join("legacy.latent"), base64(&expected["legacy_file_base64"])).unwrap();
    std::fs::write(input.join("notes.txt"), "not a latent").unwrap();
    assert_eq!(
        load_latent(&run.setup, "comfyui.latent").unwrap(),
        f32_values(&expected["loaded"])
    );
    assert_eq!(load_latent(&run.setup, "ours.latent").unwrap(), samples);
    let legacy = load_latent(&run.setup, "legacy.latent").unwrap();
    assert_eq!(
        legacy,
        f32_values(&expected["legacy_loaded"]),
        "scaled by 1 / 0.18215 in float32"
    );
    assert_ne!(legacy, samples);

    let node = builtin_registry().get("LoadLatent").unwrap().clone();
    let schema = node.schema(&run.setup.services).to_object_info();
    assert_eq!(
        schema["input"]["required"]["latent"],
        json!([["comfyui.latent", "legacy.latent", "ours.latent"]])
    );
    let check = |name: &str| {
        let mut inputs = Map::new();
        inputs.insert("latent".into(), json!(name));
        node.validate_inputs(&run.setup.services, &inputs)
    };
    assert_eq!(check("ours.latent"), Ok(()));
    assert_eq!(
        check("../ours.latent"),
        Err("Invalid latent file: ../ours.latent".into())
    );
    assert_eq!(
        check("missing.latent"),
        Err("Invalid latent file: missing.latent".into())
    );
    std::fs::write(input.join("broken.latent"), b"\x02\0\0\0\0\0\0\0{}").unwrap();
    let error = load_latent(&run.setup, "broken.latent").unwrap_err();
    assert!(
        matches!(error, NodeError::Failed { ref exception_type, .. } if exception_type == "KeyError"),
        "{error:?}"
    );
}

#[test]
fn get_image_size_outputs_and_progress_text_match_comfyui() {
    let run = run_fixture_prompt();
    let expected = &run.fixture["get_image_size"];
    let texts: Vec<Json> = run
        .events
        .iter()
        .filter(|event| event.kind == EventKind::ProgressText)
        .map(|event| json!([event.data["node_id"], event.data["text"]]))
        .collect();
    assert_eq!(json!(texts), expected["progress_text"]);
    assert_eq!(run.outputs["10"], run.fixture["preview_any_of_width"]);

    let node = builtin_registry().get("GetImageSize").unwrap().clone();
    let mut inputs = IndexMap::new();
    inputs.insert("image".to_string(), Value::object(Image::filled(2, 48, 64, 3, 0.0)));
    let output = call_standalone(node.as_ref(), &Services::new(), &NodeInputs::new(inputs)).unwrap();
    let values: Vec<&Json> = output.outputs.iter().map(|v| v.as_json().unwrap()).collect();
    assert_eq!(json!(values), expected["outputs"]);
}

#[test]
fn preview_any_formats_values_like_comfyui() {
    let node = builtin_registry().get("PreviewAny").unwrap().clone();
    let fixture = fixture_json("output_nodes.json");
    for case in fixture["preview_any"].as_array().unwrap() {
        let mut inputs = IndexMap::new();
        inputs.insert("source".to_string(), Value::Json(case[0].clone()));
        let output = call_standalone(node.as_ref(), &Services::new(), &NodeInputs::new(inputs)).unwrap();
        assert_eq!(
            Json::Object(output.ui.unwrap()),
            json!({"text": [case[1]]}),
            "{}",
            case[0]
        );
    }
}

#[test]
fn mask_preview_saves_a_grey_temp_png() {
    let setup = setup();
    let prompt = json!({
        "1": {"inputs": {"value": 0.5, "width": 3, "height": 2}, "class_type": "SolidMask"},
        "2": {"inputs": {"mask": ["1", 0]}, "class_type": "MaskPreview"}
    });
    let (status, outputs, _) = run(&setup, prompt.clone(), json!({}));
    assert_eq!(status, ExecutionStatus::Success);
    let item = &outputs["2"]["images"][0];
    assert_eq!((&item["subfolder"], &item["type"]), (&json!(""), &json!("temp")));
    let name = item["filename"].as_str().unwrap();
    let letters = name
        .strip_prefix("ComfyUI_temp_")
        .and_then(|rest| rest.strip_suffix("_00001_.png"))
        .unwrap();
    assert!(
        letters.len() == 5 && letters.chars().all(|c| c.is_ascii_lowercase()),
        "{name}"
    );
    let png = std::fs::read(setup.paths.temp.join(name)).unwrap();
    let chunks = png_chunks(&png);
    assert_eq!(chunks[1].0, "tEXt");
    assert!(chunks[1].1.starts_with(b"prompt\0{\"1\": "));
    let decoded = image::load_from_memory(&png).unwrap();
    assert_eq!(decoded.color(), image::ColorType::Rgb8);
    assert!(decoded.to_rgb8().pixels().all(|p| p.0 == [127, 127, 127]));
}

#[test]
fn load_image_output_loads_annotated_names_like_load_image() {
    let setup = setup();
    let registry = builtin_registry();
    std::fs::copy(
        Path::new(FIXTURES).join("rgba.png"),
        setup.paths.output.join("rgba.png"),
    )
    .unwrap();
    std::fs::copy(Path::new(FIXTURES).join("rgba.png"), setup.paths.input.join("rgba.png")).unwrap();
    let call = |class: &str, name: &str| {
        let node = registry.get(class).unwrap();
        let mut inputs = IndexMap::new();
        inputs.insert("image".to_string(), Value::Json(json!(name)));
        let output = call_standalone(node.as_ref(), &setup.services, &NodeInputs::new(inputs)).unwrap();
        let image = output.outputs[0].downcast::<Image>().unwrap().clone();
        let mask = output.outputs[1].downcast::<Mask>().unwrap().clone();
        (image, mask)
    };
    assert_eq!(
        call("LoadImageOutput", "rgba.png [output]"),
        call("LoadImage", "rgba.png")
    );

    std::fs::remove_file(setup.paths.input.join("rgba.png")).unwrap();
    let node = registry.get("LoadImageOutput").unwrap();
    let check = |name: &str| {
        let mut inputs = Map::new();
        inputs.insert("image".into(), json!(name));
        node.validate_inputs(&setup.services, &inputs)
    };
    assert_eq!(check("rgba.png [output]"), Ok(()));
    assert_eq!(check("rgba.png"), Err("Invalid image file: rgba.png".into()));
    let fingerprint = |name: &str| {
        let mut inputs = Map::new();
        inputs.insert("image".into(), json!(name));
        node.fingerprint(&setup.services, &inputs).unwrap()
    };
    assert!(fingerprint("rgba.png [output]").is_ok());
    assert!(fingerprint("rgba.png").is_err());

    // Its combo is filled by the frontend, not listed in the schema.
    let schema = node.schema(&setup.services).to_object_info();
    let expected = &fixture_json("object_info_nodes.json")["LoadImageOutput"];
    assert_eq!(schema, *expected);
}
