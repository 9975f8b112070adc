//! CLIP vision: tiny CLIP (transformers' and OpenCLIP's layouts) and SigLIP encoders against
//! ComfyUI's own `CLIPVisionModelProjection` with weights filled from a formula, its
//! `clip_preprocess` (antialiased bicubic, crop or stretch, 8-bit rounding) bit for bit, and
//! CLIPVisionLoader → CLIPVisionEncode through the nodes (fixture from
//! `fixtures/generate_clip_vision.py`).

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{
    assert_matches_fixture, f32_values, fixture_json, formula_unet_file, j, pattern_values, setup, shape, sizes,
};
use easel_engine::Value;
use easel_models::architectures::clip_encoder::Activation;
use easel_models::architectures::clip_encoder::ClipNaming;
use easel_models::architectures::clip_vision::{
    preprocess, ClipVision, ClipVisionConfig, VisionKind, CLIP_MEAN, CLIP_STD,
};
use easel_models::weights::{SafetensorsFile, Weights};
use easel_nodes::clip_vision::{load_clip_vision, ClipVisionModel, ClipVisionOutput};
use easel_nodes::image::Image;
use serde_json::{json, Value as Json};

/// The fixture's pattern images: `pattern_values(count, seed, 0.5) + 0.5`.
fn pattern_images(shape: &[usize], seed: i64) -> Image {
    let data = pattern_values(shape.iter().product(), seed, 0.5)
        .iter()
        .map(|v| v + 0.5)
        .collect();
    Image::new(shape[0], shape[1], shape[2], shape[3], data).expect("an image")
}

fn image_tensor(image: &Image) -> Tensor {
    Tensor::from_slice(
        &image.data,
        (image.batch, image.height, image.width, image.channels),
        &Device::Cpu,
    )
    .expect("an image tensor")
}

/// `got` equals the fixture's float32 array bit for bit.
fn assert_exactly(name: &str, got: &Tensor, expected: &Json) {
    assert_eq!(got.dims(), shape(expected).as_slice(), "{name}: shape");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let expected = f32_values(expected);
    let differing = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{name}: {differing} of {} values differ", got.len());
}

fn case<'a>(fixture: &'a Json, name: &str) -> &'a Json {
    fixture["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|case| case["name"] == name)
        .expect("the case")
}

fn write_case(case: &Json, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join(format!("{}.safetensors", case["name"].as_str().expect("a name")));
    std::fs::write(&path, formula_unet_file(case)).expect("encoder written");
    path
}

fn assert_outputs_match(name: &str, encoder: &ClipVisionModel, case: &Json, images: &Image) {
    let ClipVisionOutput(output) = encoder.encode(images, true).expect("encoded");
    assert_matches_fixture(
        &format!("{name} last"),
        &output.last_hidden_state,
        &case["last_hidden_state"],
    );
    assert_matches_fixture(
        &format!("{name} penultimate"),
        &output.penultimate_hidden_states,
        &case["penultimate_hidden_states"],
    );
    assert_matches_fixture(&format!("{name} embeds"), &output.image_embeds, &case["image_embeds"]);
    let ClipVisionOutput(stretched) = encoder.encode(images, false).expect("encoded");
    assert_matches_fixture(
        &format!("{name} stretched"),
        &stretched.image_embeds,
        &case["image_embeds_stretched"],
    );
}

#[test]
fn clip_preprocess_matches_comfyui_bit_for_bit() {
    let fixture = fixture_json("clip_vision.json");
    for case in fixture["preprocess"].as_array().expect("preprocess") {
        let images = pattern_images(&sizes(&case["image"]), case["seed"].as_i64().expect("a seed"));
        let size = case["size"].as_u64().expect("a size") as usize;
        let crop = case["crop"].as_bool().expect("crop");
        let pixels = preprocess(&image_tensor(&images), size, CLIP_MEAN, CLIP_STD, crop).expect("preprocessed");
        assert_exactly(&format!("{} to {size}", case["image"]), &pixels, &case["pixels"]);
    }
}

/// The fixture's CLIP encoders, as read from their weights.
fn tiny_config() -> ClipVisionConfig {
    ClipVisionConfig {
        kind: VisionKind::Clip,
        width: 48,
        intermediate: 96,
        layers: 3,
        heads: 16,
        patch_size: 4,
        image_size: 16,
        projection: Some(24),
        activation: Activation::QuickGelu,
        naming: ClipNaming::Transformers,
    }
}

#[test]
fn vision_encoders_match_comfyui() {
    let fixture = fixture_json("clip_vision.json");
    let dir = tempfile::tempdir().expect("a directory");
    let images = pattern_images(
        &sizes(&fixture["images"]),
        fixture["images_seed"].as_i64().expect("a seed"),
    );

    // CLIP in transformers' layout and SigLIP through the loader, which reads everything from
    // the weights.
    for name in ["clip_transformers", "siglip"] {
        let case = case(&fixture, name);
        let (encoder, _) = load_clip_vision(&write_case(case, dir.path()), &Device::Cpu).expect("loads");
        let (mean, std) = encoder.config().normalisation();
        let pixels = preprocess(&image_tensor(&images), encoder.config().image_size, mean, std, true).unwrap();
        assert_exactly(&format!("{name} pixels"), &pixels, &case["pixels"]);
        assert_outputs_match(name, &ClipVisionModel(Arc::new(encoder)), case, &images);
    }

    // CLIP in OpenCLIP's layout under `visual.`, with exact GELU (which ComfyUI gives encoders
    // deeper than ViT-L's).
    let case = case(&fixture, "clip_openclip");
    assert_eq!(case["hidden_act"], "gelu");
    let path = write_case(case, dir.path());
    let file = Arc::new(SafetensorsFile::open(&path).expect("opens"));
    let config = ClipVisionConfig {
        activation: Activation::Gelu,
        ..ClipVisionConfig::infer(file.as_ref(), "visual.").expect("an OpenCLIP encoder")
    };
    assert_eq!(
        config,
        ClipVisionConfig {
            activation: Activation::Gelu,
            naming: ClipNaming::OpenClip,
            ..tiny_config()
        }
    );
    let weights = Weights::from_file(file, candle_core::DType::F32, &Device::Cpu).pp("visual");
    let encoder = ClipVision::new(config, weights).expect("builds");
    assert_outputs_match("clip_openclip", &ClipVisionModel(Arc::new(encoder)), case, &images);
}

#[test]
fn clip_vision_nodes_load_and_encode() {
    let fixture = fixture_json("clip_vision.json");
    let setup = setup();
    let folder = setup
        .services
        .get::<easel_nodes::paths::Paths>()
        .expect("paths")
        .models
        .join("clip_vision");
    std::fs::create_dir_all(&folder).unwrap();
    let case = case(&fixture, "clip_transformers");
    write_case(case, &folder);
    std::fs::write(
        folder.join("empty.safetensors"),
        formula_unet_file(&json!({"weights": [
            {"name": "unrelated.weight", "shape": [2, 2]}
        ]})),
    )
    .unwrap();

    let encoder = setup
        .call(
            "CLIPVisionLoader",
            vec![("clip_name", j(json!("clip_transformers.safetensors")))],
        )
        .expect("loads")
        .remove(0);
    let images = pattern_images(
        &sizes(&fixture["images"]),
        fixture["images_seed"].as_i64().expect("a seed"),
    );
    let output = setup
        .call(
            "CLIPVisionEncode",
            vec![
                ("clip_vision", encoder),
                ("image", Value::object(images)),
                ("crop", j(json!("center"))),
            ],
        )
        .expect("encodes")
        .remove(0);
    let ClipVisionOutput(output) = output.downcast::<ClipVisionOutput>().expect("a CLIP_VISION_OUTPUT");
    assert_matches_fixture("node embeds", &output.image_embeds, &case["image_embeds"]);

    let error = setup
        .call("CLIPVisionLoader", vec![("clip_name", j(json!("empty.safetensors")))])
        .unwrap_err();
    assert_eq!(
        error,
        easel_engine::NodeError::typed(
            "RuntimeError",
            "ERROR: clip vision file is invalid and does not contain a valid vision model."
        )
    );
}
