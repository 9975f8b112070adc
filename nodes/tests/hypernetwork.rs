//! HypernetworkLoader: the hypernetwork patch against ComfyUI's own (fixture from
//! `fixtures/generate_hypernetwork.py`), and the node end to end on the tiny SD1 model.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{f32_values, fixture_json, j, pattern_values, shape};
use easel_engine::Value;
use easel_models::architectures::hypernetwork::Hypernetwork;
use easel_models::architectures::unet_patches::AttentionInputs;
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};

/// A safetensors hypernetwork of f32 `tensors` (name, shape, values) with `metadata`.
fn hypernetwork_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)], metadata: HashMap<String, String>) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors.iter().zip(&bytes).map(|((name, shape, _), data)| {
        (
            name.as_str(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap(),
        )
    });
    safetensors::serialize(views, Some(metadata)).unwrap()
}

/// The fixture case's hypernetwork as a safetensors file's bytes.
fn case_bytes(case: &Json) -> Vec<u8> {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = case["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let dims = shape(entry);
            let (scale, offset) = (
                entry["scale"].as_f64().unwrap() as f32,
                entry["offset"].as_f64().unwrap() as f32,
            );
            let values = pattern_values(dims.iter().product(), entry["seed"].as_i64().unwrap(), scale)
                .into_iter()
                .map(|v| v + offset)
                .collect();
            (entry["name"].as_str().unwrap().to_string(), dims, values)
        })
        .collect();
    let metadata = case["options"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, value)| {
            let text = match value {
                Json::Bool(true) => "True".to_string(),
                Json::Bool(false) => "False".to_string(),
                other => other.as_str().unwrap().to_string(),
            };
            (key.clone(), text)
        })
        .collect();
    hypernetwork_bytes(&tensors, metadata)
}

#[test]
fn the_patch_changes_keys_and_values_as_comfyuis() {
    let fixture = fixture_json("hypernetwork.json");
    let tokens: Vec<usize> = fixture["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let bytes = case_bytes(case);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let options = Hypernetwork::options(header.metadata().as_ref()).unwrap();
        let hypernetwork = Hypernetwork::from_safetensors(&bytes, options, case["strength"].as_f64().unwrap()).unwrap();
        for result in case["results"].as_array().unwrap() {
            let width = result["width"].as_u64().unwrap() as usize;
            let input = |index: usize| {
                let seed = result["seeds"][index].as_i64().unwrap();
                let count = tokens.iter().product::<usize>() * width;
                Tensor::from_vec(
                    pattern_values(count, seed, 1.0),
                    (tokens[0], tokens[1], width),
                    &Device::Cpu,
                )
                .unwrap()
            };
            let patched = hypernetwork
                .patch(AttentionInputs {
                    query: input(0),
                    context: input(1),
                    value: input(2),
                })
                .unwrap();
            for (part, ours) in [("q", &patched.query), ("k", &patched.context), ("v", &patched.value)] {
                let expected = f32_values(&result[part]);
                let ours = common::flat(ours);
                let worst = ours
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "{name}, width {width}, {part}: off by {worst}");
            }
        }
    }
}

/// A hypernetwork for the tiny SD1 UNet's widths: 32 (the first level's self-attention) and
/// 64 (the second level's, and the text the cross-attentions attend to), relu, two layers.
fn tiny_hypernetwork(metadata: HashMap<String, String>) -> Vec<u8> {
    let mut tensors = Vec::new();
    for width in [32usize, 64] {
        for which in 0..2 {
            for (index, (outputs, inputs)) in [(0, (2 * width, width)), (2, (width, 2 * width))] {
                let seed = (width * 10 + which * 3 + index) as i64;
                let stem = format!("{width}.{which}.linear.{index}");
                let scale = 1.0 / (inputs as f32).sqrt();
                tensors.push((
                    format!("{stem}.weight"),
                    vec![outputs, inputs],
                    pattern_values(outputs * inputs, seed, scale),
                ));
                tensors.push((
                    format!("{stem}.bias"),
                    vec![outputs],
                    pattern_values(outputs, seed + 1, 0.1),
                ));
            }
        }
    }
    hypernetwork_bytes(&tensors, metadata)
}

#[test]
fn the_loader_patches_the_model_end_to_end() {
    let setup = common::setup();
    let paths = setup.services.get::<Paths>().unwrap();
    let folder = paths.models.join("hypernetworks");
    std::fs::create_dir_all(&folder).unwrap();
    let relu = HashMap::from([("activation_func".to_string(), "relu".to_string())]);
    std::fs::write(folder.join("tiny.safetensors"), tiny_hypernetwork(relu)).unwrap();
    let unknown = HashMap::from([("activation_func".to_string(), "gelu".to_string())]);
    std::fs::write(folder.join("unknown.safetensors"), tiny_hypernetwork(unknown)).unwrap();
    std::fs::write(folder.join("pickled.pt"), b"PK\x03\x04 a pickled hypernetwork").unwrap();

    let (loaded, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let model = loaded[0].clone();
    let load = |name: &str, strength: f64| {
        setup.call(
            "HypernetworkLoader",
            vec![
                ("model", model.clone()),
                ("hypernetwork_name", j(json!(name))),
                ("strength", j(json!(strength))),
            ],
        )
    };
    let sample = |model: &Value| {
        common::flat(&common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 2, 4.0).unwrap())
    };
    let plain = sample(&model);
    let patched = sample(&load("tiny.safetensors", 0.8).unwrap()[0]);
    assert!(patched.iter().all(|v| v.is_finite()));
    assert_ne!(patched, plain, "the hypernetwork changes the prediction");
    // k + 0·mlp(k) is k: strength 0 predicts what the model does.
    assert_eq!(sample(&load("tiny.safetensors", 0.0).unwrap()[0]), plain);
    // An activation ComfyUI does not know: logged, the model unchanged.
    assert_eq!(sample(&load("unknown.safetensors", 1.0).unwrap()[0]), plain);
    let error = load("pickled.pt", 1.0).expect_err("a pickled hypernetwork is refused");
    assert!(error.to_string().contains("issue 26"), "{error}");
    let error = load("missing.safetensors", 1.0).expect_err("a missing file is an error");
    assert!(error.to_string().contains("not found"), "{error}");
}
