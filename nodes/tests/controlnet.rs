//! ControlNet: the network against ComfyUI's own `cldm.ControlNet` on tiny SD1- and
//! SDXL-shaped models filled from a formula (fixture from `fixtures/generate_controlnet.py`).

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture_json, floats, formula_unet_file, pattern, sizes};
use easel_models::architectures::controlnet::{ControlNet, ControlNetConfig, ControlNetInput};
use easel_models::architectures::unet::HeadLayout;
use easel_models::weights::{SafetensorsFile, Weights};
use serde_json::Value as Json;

/// The case's formula weights written to a file, with `prefix` before every name, and the
/// ControlNet loaded from it through the loader's code.
fn load(case: &Json, dir: &std::path::Path, prefix: &str) -> ControlNet {
    let mut renamed = case.clone();
    for weight in renamed["weights"].as_array_mut().expect("weights") {
        let name = format!("{prefix}{}", weight["name"].as_str().expect("a name"));
        weight["name"] = Json::from(name);
    }
    let path = dir.join(format!("{}.safetensors", case["name"].as_str().expect("a name")));
    std::fs::write(&path, formula_unet_file(&renamed)).expect("ControlNet written");
    let file = Arc::new(SafetensorsFile::open(&path).expect("ControlNet file"));
    let heads = ControlNetConfig::heads_for(file.as_ref(), prefix).expect("heads");
    let config = ControlNetConfig::infer(file.as_ref(), prefix, heads).expect("ControlNet config");
    let weights = Weights::from_file(file, DType::F32, &Device::Cpu);
    let weights = match prefix.strip_suffix('.') {
        Some(prefix) => weights.pp(prefix),
        None => weights,
    };
    ControlNet::new(config, weights).expect("ControlNet")
}

fn assert_close(name: &str, got: &Tensor, expected: &Json) {
    assert_eq!(got.dims(), sizes(&expected["shape"]).as_slice(), "{name}: shape");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let expected = floats(&expected["values"]);
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 2e-5 * scale.max(1.0),
        "{name}: differs by {worst} (values up to {scale})"
    );
}

#[test]
fn controlnet_residuals_match_comfyuis() {
    let fixture = fixture_json("controlnet.json");
    let dir = tempfile::tempdir().expect("temporary directory");
    let x = pattern(&sizes(&fixture["latent"]), 1, 1.0);
    let hint = ((pattern(&sizes(&fixture["hint"]), 3, 1.0) * 0.5).unwrap() + 0.5).unwrap();
    let timesteps = Tensor::new(floats(&fixture["timesteps"]).as_slice(), &Device::Cpu).unwrap();
    for case in fixture["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("a name");
        let context = pattern(&sizes(&case["context"]), 2, 1.0);
        let y = case["adm"].as_u64().map(|adm| pattern(&[2, adm as usize], 4, 1.0));
        // The original conversions keep the weights under `control_model.`.
        for prefix in ["", "control_model."] {
            let net = load(case, dir.path(), prefix);
            let expected_heads = if name == "sd1" {
                HeadLayout::Count(8)
            } else {
                HeadLayout::Width(64)
            };
            assert_eq!(net.config().encoder.heads, expected_heads, "{name}: heads");
            let input = ControlNetInput {
                x: &x,
                hint: &hint,
                timesteps: &timesteps,
                context: &context,
                y: y.as_ref(),
            };
            let outputs = net.forward(&input).expect("forward");
            let expected = case["output"].as_array().expect("output");
            assert_eq!(
                outputs.encoder.len(),
                expected.len(),
                "{name}: one residual per encoder block"
            );
            for (index, (got, expected)) in outputs.encoder.iter().zip(expected).enumerate() {
                assert_close(&format!("{name} output {index}"), got, expected);
            }
            assert_close(&format!("{name} middle"), &outputs.middle, &case["middle"][0]);
        }
    }
}
