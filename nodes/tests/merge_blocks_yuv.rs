//! ModelMergeSD1/SD2/SDXL/Flux1 and ImageRGBToYUV/ImageYUVToRGB against ComfyUI 0.3.64
//! (fixture: merge_blocks_yuv.json, from generate_merge_blocks_yuv.py).
//!
//! The merges run on the tiny test models, merged with copies of themselves whose every weight
//! is doubled: each tensor must come out as `strength_model·W + strength_patch·2W` with the pair
//! ComfyUI's `merge` gave its name, and the models must have exactly the tensors ComfyUI's
//! networks of the same shapes have.

mod common;

use std::collections::BTreeSet;

use candle_core::{DType, Tensor};
use common::{j, Setup};
use easel_engine::Value;
use easel_models::testmodels::{TINY_FLUX_DEV, TINY_SD1_CHECKPOINT, TINY_SD2_CHECKPOINT, TINY_SDXL_CHECKPOINT};
use easel_nodes::image::Image;
use easel_nodes::model::diffusion_model::Model;
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};

const FIXTURE: &str = "merge_blocks_yuv.json";

/// Writes a copy of `source` as `target` with every f16 and bf16 weight doubled (exactly).
fn write_doubled(source: &std::path::Path, target: &std::path::Path) {
    let bytes = std::fs::read(source).expect("source file");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let doubled: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let pairs = view.data().chunks_exact(2).map(|p| [p[0], p[1]]);
            let data: Vec<u8> = match view.dtype() {
                safetensors::Dtype::F16 => pairs
                    .flat_map(|p| half::f16::from_f32(2.0 * half::f16::from_le_bytes(p).to_f32()).to_le_bytes())
                    .collect(),
                safetensors::Dtype::BF16 => pairs
                    .flat_map(|p| half::bf16::from_f32(2.0 * half::bf16::from_le_bytes(p).to_f32()).to_le_bytes())
                    .collect(),
                _ => view.data().to_vec(),
            };
            (name, view.dtype(), view.shape().to_vec(), data)
        })
        .collect();
    let views = doubled.iter().map(|(name, dtype, shape, data)| {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).expect("tensor view");
        (name.as_str(), view)
    });
    safetensors::serialize_to_file(views, None, target).expect("written");
}

/// The fixture's model loaded, and its doubled copy loaded the same way.
fn model_and_doubled(setup: &Setup, model: &str) -> (Value, Value) {
    let paths = setup.services.get::<Paths>().expect("paths");
    let (folder, file) = match model {
        "sd1" => ("checkpoints", TINY_SD1_CHECKPOINT),
        "sd2" => ("checkpoints", TINY_SD2_CHECKPOINT),
        "sdxl" => ("checkpoints", TINY_SDXL_CHECKPOINT),
        "flux" => ("diffusion_models", TINY_FLUX_DEV),
        other => panic!("no tiny model {other}"),
    };
    let source = paths.full_path(folder, file).expect("tiny model");
    let doubled_name = format!("doubled_{file}");
    write_doubled(&source, &source.with_file_name(&doubled_name));
    let load = |name: &str| {
        let outputs = if folder == "checkpoints" {
            setup.call("CheckpointLoaderSimple", vec![("ckpt_name", j(json!(name)))])
        } else {
            setup.call(
                "UNETLoader",
                vec![("unet_name", j(json!(name))), ("weight_dtype", j(json!("default")))],
            )
        };
        outputs.expect("model loads").remove(0)
    };
    (load(file), load(&doubled_name))
}

/// The diffusion network's tensor names (relative to the model's prefix).
fn tensor_names(model: &Value) -> BTreeSet<String> {
    let source = &model.downcast::<Model>().unwrap().0.source;
    let prefix = source.name_prefix();
    source
        .file
        .tensor_names()
        .filter_map(|name| name.strip_prefix(prefix.as_str()))
        .map(str::to_string)
        .collect()
}

/// The tensor `name` as the model's (patched) weights give it, in f32.
fn tensor(model: &Value, name: &str) -> Tensor {
    let model = &model.downcast::<Model>().unwrap().0;
    let full = format!("{}{name}", model.source.name_prefix());
    let shape = model.source.file.shape(&full).expect("tensor exists").to_vec();
    model
        .source
        .weights()
        .get(shape, name)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn block_merges_weigh_each_tensor_as_comfyui() {
    let setup = common::setup();
    let fixture = common::fixture_json(FIXTURE);
    for case in fixture["merges"].as_array().unwrap() {
        let node = case["node"].as_str().unwrap();
        let (model1, model2) = model_and_doubled(&setup, case["model"].as_str().unwrap());
        let strengths = case["strengths"].as_object().unwrap();
        let expected_names: BTreeSet<String> = strengths.keys().cloned().collect();
        assert_eq!(tensor_names(&model1), expected_names, "{node}: tensor names");
        let mut inputs = vec![("model1", model1.clone()), ("model2", model2)];
        for (prefix, ratio) in case["ratios"].as_object().unwrap() {
            inputs.push((prefix.as_str(), j(ratio.clone())));
        }
        let merged = setup.call(node, inputs).unwrap().remove(0);
        for (name, pair) in strengths {
            let strength_patch = pair[0].as_f64().unwrap();
            let strength_model = pair[1].as_f64().unwrap();
            let w = tensor(&model1, name);
            let expected = (&w * (strength_model + 2.0 * strength_patch)).unwrap();
            let got = tensor(&merged, name);
            let scale = common::flat(&w.abs().unwrap()).into_iter().fold(1e-6f32, f32::max);
            let difference = common::max_abs_difference(&got, &expected);
            assert!(difference <= 2e-6 * scale, "{node} {name}: off by {difference}");
        }
    }
}

#[test]
fn block_merge_inputs_are_the_comfyui_ratios_in_order() {
    let setup = common::setup();
    let fixture = common::fixture_json(FIXTURE);
    for case in fixture["merges"].as_array().unwrap() {
        let node = case["node"].as_str().unwrap();
        let schema = setup
            .registry
            .get(node)
            .unwrap()
            .schema(&setup.services)
            .to_object_info();
        let order: Vec<&str> = schema["input_order"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let ratios: Vec<&str> = case["ratios"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(order[..2], ["model1", "model2"]);
        assert_eq!(order[2..], ratios[..], "{node}");
    }
}

fn pattern_image(shape: &Json, seed: &Json) -> Image {
    let shape = common::sizes(shape);
    let count = shape.iter().product();
    let data = common::pattern_values(count, seed.as_i64().unwrap(), 1.0)
        .into_iter()
        .map(|v| v + 0.5)
        .collect();
    Image::new(shape[0], shape[1], shape[2], shape[3], data).unwrap()
}

fn image_values(value: &Value) -> Vec<f32> {
    value.downcast::<Image>().unwrap().data.clone()
}

fn assert_within(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (index, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!((g - e).abs() <= 1e-6, "{what}[{index}]: {g} vs ComfyUI's {e}");
    }
}

#[test]
fn yuv_conversions_match_comfyui() {
    let setup = common::setup();
    let fixture = common::fixture_json(FIXTURE);
    let yuv = &fixture["yuv"];
    let to_yuv = &yuv["to_yuv"];
    let rgb = pattern_image(&to_yuv["shape"], &to_yuv["seed"]);
    let planes = setup
        .call("ImageRGBToYUV", vec![("image", Value::object(rgb))])
        .unwrap();
    assert_eq!(planes.len(), 3);
    for (plane, key) in planes.iter().zip(["y", "u", "v"]) {
        assert_within(&image_values(plane), &common::floats(&to_yuv[key]), key);
        assert_eq!(plane.downcast::<Image>().unwrap().channels, 3);
    }
    let joined = |y: Value, u: Value, v: Value| {
        setup
            .call("ImageYUVToRGB", vec![("Y", y), ("U", u), ("V", v)])
            .unwrap()
            .remove(0)
    };
    let round_trip = joined(planes[0].clone(), planes[1].clone(), planes[2].clone());
    assert_within(
        &image_values(&round_trip),
        &common::floats(&yuv["round_trip"]),
        "round trip",
    );
    for case in yuv["to_rgb"].as_array().unwrap() {
        let seeds = case["seeds"].as_array().unwrap();
        let plane = |index: usize| Value::object(pattern_image(&case["shape"], &seeds[index]));
        let rgb = joined(plane(0), plane(1), plane(2));
        assert_within(&image_values(&rgb), &common::floats(&case["rgb"]), "to_rgb");
        assert_eq!(rgb.downcast::<Image>().unwrap().channels, 3);
    }
}

#[test]
fn yuv_conversions_reject_bad_shapes() {
    let setup = common::setup();
    let rgba = Value::object(Image::filled(1, 2, 2, 4, 0.5));
    let error = setup.call("ImageRGBToYUV", vec![("image", rgba)]).unwrap_err();
    assert!(format!("{error:?}").contains("3, H, W"), "{error:?}");
    let small = Value::object(Image::filled(1, 2, 2, 3, 0.5));
    let large = Value::object(Image::filled(1, 3, 2, 3, 0.5));
    let error = setup
        .call("ImageYUVToRGB", vec![("Y", small.clone()), ("U", large), ("V", small)])
        .unwrap_err();
    assert!(
        format!("{error:?}").contains("Sizes of tensors must match"),
        "{error:?}"
    );
}
