//! T2I-Adapters: the full (SD and SDXL) and light adapters against ComfyUI's own
//! `comfy.t2i_adapter.adapter` with weights filled from a formula, loaded through the
//! ControlNetLoader's code in ComfyUI's and diffusers' names; their features taken by a UNet where
//! ComfyUI's takes them (fixture from `fixtures/generate_t2i_adapter.py`); and the tiny SDXL
//! adapter steering KSampler through ControlNetApplyAdvanced.

mod common;

use candle_core::{Device, Tensor};
use common::{
    assert_matches_fixture, fixture_json, fixture_unet, floats, formula_unet_file, j, ksampler, max_abs_difference,
    pattern, setup, sizes,
};
use easel_engine::Value;
use easel_models::architectures::t2i_adapter::{AdapterKind, T2IAdapter};
use easel_models::architectures::unet::{ControlResiduals, UNetInput};
use easel_models::testmodels::{TINY_SDXL_CHECKPOINT, TINY_SDXL_T2I_ADAPTER};
use easel_nodes::controlnet::nodes::load_controlnet;
use easel_nodes::controlnet::ControlNetwork;
use serde_json::{json, Value as Json};

/// The adapter of a fixture case, its formula weights written under the names `rename` gives and
/// loaded through the ControlNetLoader's code.
fn load(case: &Json, dir: &std::path::Path, file: &str, rename: impl Fn(&str) -> String) -> T2IAdapter {
    let mut renamed = case.clone();
    for weight in renamed["weights"].as_array_mut().expect("weights") {
        let name = rename(weight["name"].as_str().expect("a name"));
        weight["name"] = Json::from(name);
    }
    let path = dir.join(file);
    std::fs::write(&path, formula_unet_file(&renamed)).expect("adapter written");
    let (loaded, _) = load_controlnet(&path, None, &Device::Cpu).expect("a T2I-Adapter loads");
    match loaded.network {
        ControlNetwork::T2IAdapter(adapter) => adapter,
        _ => panic!("{file} loaded as another control model"),
    }
}

fn hint(case: &Json) -> Tensor {
    ((pattern(&sizes(&case["hint"]), 3, 1.0) * 0.5).unwrap() + 0.5).unwrap()
}

/// The features against ComfyUI's: its `input` list is popped from the end, one entry per
/// encoder block, so block `b` takes the entry `b` places from the end.
fn assert_features_match(name: &str, got: &ControlResiduals, case: &Json) {
    let expected = case["input"].as_array().expect("input");
    assert!(
        got.input.len() <= expected.len(),
        "{name}: more blocks than ComfyUI's list"
    );
    for (block, expected) in expected.iter().rev().enumerate() {
        match (got.input.get(block).and_then(Option::as_ref), expected.is_null()) {
            (None, true) => {}
            (Some(got), false) => assert_matches_fixture(&format!("{name} block {block}"), got, expected),
            (got, _) => panic!(
                "{name} block {block}: {:?} where ComfyUI has {expected}",
                got.map(Tensor::dims)
            ),
        }
    }
    match (&got.middle, case["middle"].as_array().and_then(|m| m.first())) {
        (None, None) => {}
        (Some(got), Some(expected)) => assert_matches_fixture(&format!("{name} middle"), got, expected),
        (got, expected) => panic!(
            "{name} middle: {:?} where ComfyUI has {expected:?}",
            got.as_ref().map(Tensor::dims)
        ),
    }
}

/// A full adapter's ComfyUI name in diffusers' layout (two residual blocks a level).
fn diffusers_full_name(name: &str) -> String {
    let Some(rest) = name.strip_prefix("body.") else {
        return format!("adapter.{name}");
    };
    let (index, tail) = rest.split_once('.').expect("an index");
    let index: usize = index.parse().expect("a number");
    format!("adapter.body.{}.resnets.{}.{tail}", index / 2, index % 2)
}

/// A light adapter's ComfyUI name in diffusers' layout.
fn diffusers_light_name(name: &str) -> String {
    let rest = name.strip_prefix("body.").expect("under body.");
    let (level, tail) = rest.split_once('.').expect("a level");
    match tail.strip_prefix("body.") {
        Some(block) => format!("adapter.body.{level}.resnets.{block}"),
        None => format!("adapter.body.{level}.{tail}"),
    }
}

#[test]
fn t2i_adapter_features_match_comfyuis_in_both_layouts() {
    let fixture = fixture_json("t2i_adapter.json");
    let dir = tempfile::tempdir().expect("temporary directory");
    for case in fixture["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("a name");
        let adapter = load(case, dir.path(), &format!("{name}.safetensors"), str::to_string);
        let config = adapter.config();
        assert_eq!(config.xl, name.starts_with("xl"), "{name}: SDXL's");
        assert_eq!(
            matches!(config.kind, AdapterKind::Light { .. }),
            name == "light",
            "{name}: kind"
        );
        assert_eq!(config.hint_channels(), sizes(&case["hint"])[1], "{name}: hint channels");
        let features = adapter.forward(&hint(case)).expect("features");
        assert_features_match(name, &features, case);

        // Diffusers' names (not for the convolution-downsampling adapter, which diffusers has not).
        let diffusers_name: Option<fn(&str) -> String> = match &config.kind {
            AdapterKind::Light { .. } => Some(diffusers_light_name),
            AdapterKind::Full {
                conv_downsample: false, ..
            } => Some(diffusers_full_name),
            AdapterKind::Full { .. } => None,
        };
        if let Some(rename) = diffusers_name {
            let twin = load(case, dir.path(), &format!("{name}_diffusers.safetensors"), rename);
            assert_eq!(twin.config(), config, "{name}: diffusers twin's architecture");
            assert_features_match(
                &format!("{name} (diffusers)"),
                &twin.forward(&hint(case)).unwrap(),
                case,
            );
        }
    }
}

#[test]
fn the_unet_takes_t2i_adapter_features_where_comfyuis_does() {
    let fixture = fixture_json("t2i_adapter.json");
    let dir = tempfile::tempdir().expect("temporary directory");
    let x = pattern(&sizes(&fixture["latent"]), 1, 1.0);
    let timesteps = Tensor::new(floats(&fixture["timesteps"]).as_slice(), &Device::Cpu).unwrap();
    let context = pattern(&sizes(&fixture["context"]), 2, 1.0);
    let strength = fixture["strength"].as_f64().expect("strength");
    for unet_case in fixture["unets"].as_array().expect("unets") {
        let name = unet_case["adapter"].as_str().expect("an adapter");
        let case = fixture["cases"]
            .as_array()
            .and_then(|cases| cases.iter().find(|case| case["name"] == name))
            .expect("the adapter's case");
        let adapter = load(case, dir.path(), &format!("{name}.safetensors"), str::to_string);
        // One hint for a batch of two: the features are added to both items.
        let residuals = adapter.forward(&hint(case)).unwrap().scaled(strength).unwrap();
        let (_unet_dir, unet) = fixture_unet(unet_case);
        for (output, control) in [("without_control", None), ("with_control", Some(&residuals))] {
            let out = unet
                .forward(&UNetInput {
                    control,
                    ..UNetInput::new(&x, &timesteps, &context)
                })
                .expect("UNet");
            let shape = Json::from(out.dims().to_vec());
            assert_matches_fixture(
                &format!("{name} {output}"),
                &out,
                &json!({"shape": shape, "values": unet_case[output]}),
            );
        }
    }
}

#[test]
fn a_t2i_adapter_steers_sampling_through_the_apply_node() {
    let setup = setup();
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SDXL_CHECKPOINT)))],
        )
        .expect("the tiny SDXL checkpoint");
    let encode = |text: &str| {
        setup
            .call(
                "CLIPTextEncode",
                vec![("text", j(json!(text))), ("clip", loaded[1].clone())],
            )
            .expect("CLIPTextEncode")
            .remove(0)
    };
    let (positive, negative) = (encode("a lighthouse"), encode("blurry"));
    let latent = common::empty_latent(&setup, 64, 64, 1);
    let adapter = setup
        .call(
            "ControlNetLoader",
            vec![("control_net_name", j(json!(TINY_SDXL_T2I_ADAPTER)))],
        )
        .expect("ControlNetLoader")
        .remove(0);
    // A hint whose size is no multiple of the adapter's 16 pixels (the node resizes it).
    let image = Value::object(common::pattern_image(50, 70, 4));
    let sample = |strength: f64, end: f64| {
        let applied = setup
            .call(
                "ControlNetApplyAdvanced",
                vec![
                    ("positive", positive.clone()),
                    ("negative", negative.clone()),
                    ("control_net", adapter.clone()),
                    ("image", image.clone()),
                    ("strength", j(json!(strength))),
                    ("start_percent", j(json!(0.0))),
                    ("end_percent", j(json!(end))),
                ],
            )
            .expect("ControlNetApplyAdvanced");
        ksampler(&setup, &loaded[0], &applied[0], &applied[1], &latent, "euler", 3, 5.0).expect("KSampler")
    };
    let plain = ksampler(&setup, &loaded[0], &positive, &negative, &latent, "euler", 3, 5.0).expect("KSampler");
    let full = sample(1.0, 1.0);
    assert!(
        max_abs_difference(&plain, &full) > 1e-3,
        "the adapter changes the result"
    );
    assert!(
        max_abs_difference(&full, &sample(0.5, 1.0)) > 1e-4,
        "the strength scales it"
    );
    assert!(
        max_abs_difference(&full, &sample(1.0, 0.3)) > 1e-4,
        "the range limits it"
    );
    assert_eq!(
        max_abs_difference(&plain, &sample(1.0, 0.0)),
        0.0,
        "an empty range leaves it out"
    );
}
