//! IP-Adapter (ComfyUI_IPAdapter_plus) against the pack's own `ipadapter_execute` and
//! `Attn2Replace` on tiny adapters with weights filled from a formula (fixture from
//! `fixtures/generate_ipadapter.py`): every weight type, embeds scaling and combine mode, the
//! start/end range, the attention mask and batch unfolding, for the linear, resampler and MLP
//! projections, and an SDXL-shaped adapter on SDXL's transformer blocks; then the tiny SD1.x adapter through the nodes, with the unified loader finding
//! files by the pack's names.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::{
    assert_matches_fixture, fixture_json, formula_unet_file, j, ksampler, max_abs_difference, pattern, pattern_image,
    sd1_inputs, setup, sizes, Setup,
};
use easel_engine::Value;
use easel_models::architectures::unet_patches::{
    AttentionKind, AttentionSite, BatchPart, BlockPosition, CallInfo, ReplaceKey,
};
use easel_models::testmodels::{TINY_CLIP_VISION, TINY_SD1_IP_ADAPTER};
use easel_nodes::image::Mask;
use easel_nodes::model::diffusion_model::Model;
use easel_nodes::packs::ipadapter::attention::EmbedsScaling;
use easel_nodes::packs::ipadapter::{apply_ip_adapter, load_ip_adapter, ApplySettings, ImagePrompt};
use serde_json::{json, Value as Json};

/// A fixture's `[kind, id]` or `[kind, id, index]` block: the position and the transformer
/// block's index when given.
fn block(value: &Json) -> (BlockPosition, Option<usize>) {
    let id = value[1].as_u64().expect("a block number") as usize;
    let position = match value[0].as_str().expect("a block kind") {
        "input" => BlockPosition::Input(id),
        "output" => BlockPosition::Output(id),
        _ => BlockPosition::Middle,
    };
    (
        position,
        value.get(2).and_then(Json::as_u64).map(|index| index as usize),
    )
}

#[test]
fn ip_adapter_attention_matches_the_pack() {
    let fixture = fixture_json("ipadapter.json");
    let setup = setup();
    let (loaded, _, _, _) = sd1_inputs(&setup, 1);
    let model = loaded[0].downcast::<Model>().expect("a model");
    let dir = tempfile::tempdir().expect("a directory");
    let adapters: std::collections::HashMap<String, _> = fixture["adapters"]
        .as_object()
        .expect("adapters")
        .iter()
        .map(|(kind, weights)| {
            let path = dir.path().join(format!("{kind}.safetensors"));
            std::fs::write(&path, formula_unet_file(&json!({ "weights": weights }))).expect("written");
            let (adapter, _) = load_ip_adapter(&path, &Device::Cpu).expect("loads");
            (kind.clone(), Arc::new(adapter))
        })
        .collect();
    let heads = fixture["heads"].as_u64().expect("heads") as usize;
    for application in fixture["applications"].as_array().expect("applications") {
        let name = application["name"].as_str().expect("a name");
        let adapter = &adapters[application["adapter"].as_str().expect("a kind")];
        let shape = sizes(&application["embeds"]);
        let positive = pattern(&shape, application["pos_seed"].as_i64().unwrap(), 1.0);
        let negative = pattern(&shape, application["neg_seed"].as_i64().unwrap(), 0.5);
        let mask = application["mask"].as_bool().unwrap().then(|| {
            let values = common::pattern_values(256, 60, 1.0)
                .iter()
                .map(|v| v * 0.5 + 0.5)
                .collect();
            Mask {
                batch: 1,
                height: 16,
                width: 16,
                data: values,
            }
        });
        let weight_type = easel_nodes::packs::ipadapter::attention::WEIGHT_TYPES
            .into_iter()
            .find(|known| *known == application["weight_type"])
            .expect("a weight type");
        let settings = ApplySettings {
            weight: application["weight"].as_f64().unwrap(),
            weight_type,
            combine_embeds: application["combine_embeds"].as_str().unwrap(),
            start_at: application["start_at"].as_f64().unwrap(),
            end_at: application["end_at"].as_f64().unwrap(),
            attn_mask: mask.as_ref(),
            unfold_batch: application["unfold_batch"].as_bool().unwrap(),
            embeds_scaling: EmbedsScaling::from_name(application["embeds_scaling"].as_str().unwrap()).unwrap(),
        };
        let prompt = ImagePrompt::Embeds {
            positive: &positive,
            negative: Some(&negative),
        };
        let patched = apply_ip_adapter(model, adapter, None, prompt, &settings).expect("applies");
        for call in application["calls"].as_array().expect("calls") {
            let parts: Vec<BatchPart> = call["cond_or_uncond"]
                .as_array()
                .unwrap()
                .iter()
                .map(|part| if part == 0 { BatchPart::Cond } else { BatchPart::Uncond })
                .collect();
            let batch = parts.len() * call["per_chunk"].as_u64().unwrap() as usize;
            let module = call["module"].as_i64().unwrap();
            let info = CallInfo {
                original_shape: [batch, 4, 4, 4],
                sigma: call["sigma"].as_f64().unwrap() as f32,
                parts,
            };
            let (position, block_index) = block(&call["block"]);
            let site = AttentionSite {
                call: &info,
                block: position,
                block_index: block_index.unwrap_or(0),
                transformer_index: call["transformer_index"].as_u64().unwrap() as usize,
                heads,
                dim_head: 8,
            };
            let key = ReplaceKey {
                kind: AttentionKind::CrossAttention,
                block: position,
                block_index,
            };
            let replacement = patched
                .0
                .patches
                .unet
                .replacement_at(&key)
                .expect("a patched attention");
            let q = pattern(&[batch, 16, 16], 70 + module, 1.0);
            let k = pattern(&[batch, 5, 16], 80 + module, 1.0);
            let v = pattern(&[batch, 5, 16], 90 + module, 1.0);
            let out = replacement.attend(&site, &q, &k, &v).expect("attends");
            assert_matches_fixture(&format!("{name} module {module}"), &out, &call["out"]);
        }
    }
}

#[test]
fn a_pickled_ip_adapter_loads_as_its_safetensors_twin() {
    let fixture = fixture_json("ipadapter.json");
    let weights = fixture["adapters"]["linear"].clone();
    let dir = tempfile::tempdir().expect("a directory");
    let twin = dir.path().join("linear.safetensors");
    std::fs::write(&twin, formula_unet_file(&json!({ "weights": weights }))).expect("written");
    let file = easel_models::weights::SafetensorsFile::open(&twin).expect("opens");
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = weights
        .as_array()
        .unwrap()
        .iter()
        .map(|weight| {
            let name = weight["name"].as_str().unwrap().to_string();
            let values =
                easel_models::weights::MappedWeights::load(&file, &name, candle_core::DType::F32, &Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
            (name, sizes(&weight["shape"]), values)
        })
        .collect();
    let group = |prefix: &str| -> Vec<(&str, &[usize], &[f32])> {
        tensors
            .iter()
            .filter_map(|(name, shape, values)| Some((name.strip_prefix(prefix)?, shape.as_slice(), values.as_slice())))
            .collect()
    };
    let (projection, layers) = (group("image_proj."), group("ip_adapter."));
    let pickled = dir.path().join("linear.bin");
    easel_models::testmodels::write_pth_dicts(
        &pickled,
        &[
            (Some("image_proj"), projection.as_slice()),
            (Some("ip_adapter"), layers.as_slice()),
        ],
    )
    .expect("pickled");
    let (from_pickle, _) = load_ip_adapter(&pickled, &Device::Cpu).expect("the pickle loads");
    let (from_safetensors, _) = load_ip_adapter(&twin, &Device::Cpu).expect("the twin loads");
    assert_eq!(from_pickle.config(), from_safetensors.config());
    let embeds = pattern(&[1, 48], 5, 1.0);
    let tokens = from_pickle.tokens(&embeds).unwrap();
    assert_eq!(
        max_abs_difference(&tokens, &from_safetensors.tokens(&embeds).unwrap()),
        0.0
    );
    let (k, _) = from_pickle.key_value(13, &tokens).unwrap().expect("module 13");
    let (k_twin, _) = from_safetensors.key_value(13, &tokens).unwrap().expect("module 13");
    assert_eq!(max_abs_difference(&k, &k_twin), 0.0);
}

/// The tiny models folder with the tiny adapter and encoder also under names the unified
/// loader's STANDARD preset finds.
fn with_preset_files(setup: &Setup) {
    let models = &setup.services.get::<easel_nodes::paths::Paths>().expect("paths").models;
    std::fs::copy(
        models.join("ipadapter").join(TINY_SD1_IP_ADAPTER),
        models.join("ipadapter").join("ip-adapter_sd15.safetensors"),
    )
    .expect("copied");
    std::fs::copy(
        models.join("clip_vision").join(TINY_CLIP_VISION),
        models
            .join("clip_vision")
            .join("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    )
    .expect("copied");
}

#[test]
fn the_tiny_ip_adapter_steers_sd1_through_the_nodes() {
    let setup = setup();
    with_preset_files(&setup);
    let (loaded, positive, negative, latent) = sd1_inputs(&setup, 1);
    let image = Value::object(pattern_image(40, 56, 3));
    let sample =
        |model: &Value| ksampler(&setup, model, &positive, &negative, &latent, "euler", 2, 5.0).expect("sampled");
    let plain = sample(&loaded[0]);

    let unified = setup
        .call(
            "IPAdapterUnifiedLoader",
            vec![
                ("model", loaded[0].clone()),
                ("preset", j(json!("STANDARD (medium strength)"))),
            ],
        )
        .expect("finds the preset's files");
    let simple = |weight: f64| {
        setup
            .call(
                "IPAdapter",
                vec![
                    ("model", unified[0].clone()),
                    ("ipadapter", unified[1].clone()),
                    ("image", image.clone()),
                    ("weight", j(json!(weight))),
                    ("start_at", j(json!(0.0))),
                    ("end_at", j(json!(1.0))),
                    ("weight_type", j(json!("standard"))),
                ],
            )
            .expect("applies")
            .remove(0)
    };
    let prompted = sample(&simple(1.0));
    assert!(max_abs_difference(&plain, &prompted) > 1e-5, "the image steers");
    assert_eq!(
        max_abs_difference(&plain, &sample(&simple(0.0))),
        0.0,
        "weight 0 is no image"
    );

    // The loader and the advanced node with an explicit encoder equal the unified pipeline.
    let adapter = setup
        .call(
            "IPAdapterModelLoader",
            vec![("ipadapter_file", j(json!(TINY_SD1_IP_ADAPTER)))],
        )
        .expect("loads")
        .remove(0);
    let encoder = setup
        .call("CLIPVisionLoader", vec![("clip_name", j(json!(TINY_CLIP_VISION)))])
        .expect("loads")
        .remove(0);
    let advanced_inputs = vec![
        ("model", loaded[0].clone()),
        ("ipadapter", adapter.clone()),
        ("image", image.clone()),
        ("weight", j(json!(1.0))),
        ("weight_type", j(json!("linear"))),
        ("combine_embeds", j(json!("concat"))),
        ("start_at", j(json!(0.0))),
        ("end_at", j(json!(1.0))),
        ("embeds_scaling", j(json!("V only"))),
    ];
    let with_encoder = [advanced_inputs.clone(), vec![("clip_vision", encoder.clone())]].concat();
    let advanced = setup
        .call("IPAdapterAdvanced", with_encoder)
        .expect("applies")
        .remove(0);
    assert_eq!(max_abs_difference(&prompted, &sample(&advanced)), 0.0);

    // Without an encoder the advanced node fails as the pack does.
    let error = setup.call("IPAdapterAdvanced", advanced_inputs).unwrap_err();
    assert!(error.to_string().contains("Missing CLIPVision model."), "{error}");

    // Encoder → embeds → IPAdapterEmbeds equals the image path.
    let embeds = setup
        .call(
            "IPAdapterEncoder",
            vec![
                ("ipadapter", adapter.clone()),
                ("image", image.clone()),
                ("weight", j(json!(1.0))),
                ("clip_vision", encoder.clone()),
            ],
        )
        .expect("encodes");
    let combined = setup
        .call(
            "IPAdapterCombineEmbeds",
            vec![("embed1", embeds[0].clone()), ("method", j(json!("concat")))],
        )
        .expect("combines")
        .remove(0);
    let from_embeds = setup
        .call(
            "IPAdapterEmbeds",
            vec![
                ("model", loaded[0].clone()),
                ("ipadapter", adapter),
                ("pos_embed", combined),
                ("weight", j(json!(1.0))),
                ("weight_type", j(json!("linear"))),
                ("start_at", j(json!(0.0))),
                ("end_at", j(json!(1.0))),
                ("embeds_scaling", j(json!("V only"))),
                ("neg_embed", embeds[1].clone()),
            ],
        )
        .expect("applies")
        .remove(0);
    assert_eq!(max_abs_difference(&prompted, &sample(&from_embeds)), 0.0);
}

#[test]
fn prep_image_for_clip_vision_matches_the_pack() {
    let fixture = fixture_json("prep_image.json");
    let setup = setup();
    let shape = sizes(&fixture["shape"]);
    let landscape = common::pattern_values(shape.iter().product(), fixture["seed"].as_i64().unwrap(), 0.5)
        .iter()
        .map(|v| v + 0.5)
        .collect::<Vec<f32>>();
    let landscape = easel_nodes::image::Image::new(shape[0], shape[1], shape[2], shape[3], landscape).unwrap();
    // The same image turned a quarter (height and width swapped).
    let mut portrait = easel_nodes::image::Image::filled(1, shape[2], shape[1], 3, 0.0);
    for y in 0..shape[1] {
        for x in 0..shape[2] {
            for c in 0..3 {
                let to = portrait.index(0, x, y, c);
                portrait.data[to] = landscape.data[landscape.index(0, y, x, c)];
            }
        }
    }
    let rows = sizes(&fixture["rows"]);
    for case in fixture["cases"].as_array().expect("cases") {
        let image = match case["image"].as_str().unwrap() {
            "portrait" => portrait.clone(),
            _ => landscape.clone(),
        };
        let prepared = setup
            .call(
                "PrepImageForClipVision",
                vec![
                    ("image", Value::object(image)),
                    ("interpolation", j(case["interpolation"].clone())),
                    ("crop_position", j(case["crop_position"].clone())),
                    ("sharpening", j(case["sharpening"].clone())),
                ],
            )
            .expect("prepared")
            .remove(0);
        let prepared = prepared.downcast::<easel_nodes::image::Image>().expect("an image");
        let name = format!("{} {} {}", case["image"], case["interpolation"], case["crop_position"]);
        assert_eq!((prepared.height, prepared.width), (224, 224), "{name}");
        for (row, expected) in rows.iter().zip(case["rows"].as_array().unwrap()) {
            let got = &prepared.data[row * 224 * 3..(row + 1) * 224 * 3];
            let worst = got
                .iter()
                .zip(common::floats(expected))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{name} row {row}: differs by {worst}");
        }
        let sum: f64 = prepared.data.iter().map(|&v| f64::from(v)).sum();
        let expected = case["sum"].as_f64().unwrap();
        assert!((sum - expected).abs() < 1e-2, "{name}: sum {sum} against {expected}");
    }
}

#[test]
fn ipadapter_noise_matches_the_pack() {
    let fixture = fixture_json("ipadapter_noise.json");
    let setup = setup();
    let image = |key: &str| {
        let shape = sizes(&fixture[key]["shape"]);
        let values = common::pattern_values(shape.iter().product(), fixture[key]["seed"].as_i64().unwrap(), 0.5)
            .iter()
            .map(|v| v + 0.5)
            .collect::<Vec<f32>>();
        easel_nodes::image::Image::new(shape[0], shape[1], shape[2], shape[3], values).unwrap()
    };
    let (resized, cropped) = (image("resized"), image("cropped"));
    let rows = sizes(&fixture["rows"]);
    let pixels = fixture["pixels"].as_u64().unwrap() as usize;
    for case in fixture["cases"].as_array().expect("cases") {
        let mut inputs = vec![
            ("type", j(case["type"].clone())),
            ("strength", j(case["strength"].clone())),
            ("blur", j(case["blur"].clone())),
        ];
        match case["image"].as_str() {
            Some("resized") => inputs.push(("image_optional", Value::object(resized.clone()))),
            Some(_) => inputs.push(("image_optional", Value::object(cropped.clone()))),
            None => {}
        }
        let noise = setup.call("IPAdapterNoise", inputs).expect("noise").remove(0);
        let noise = noise.downcast::<easel_nodes::image::Image>().expect("an image");
        let name = format!(
            "{} {} {} blur {}",
            case["image"], case["type"], case["strength"], case["blur"]
        );
        assert_eq!(
            vec![noise.batch, noise.height, noise.width, noise.channels],
            sizes(&case["shape"]),
            "{name}"
        );
        // Draws in torch's order give its values; blurs and warps differ in the last bits only.
        let exact = case["blur"] == 0 && case["type"] != "shuffle";
        let tolerance = if exact { 1e-6 } else { 1e-4 };
        for (row, expected) in rows.iter().zip(case["rows"].as_array().unwrap()) {
            let got = &noise.data[row * 224 * 3..][..pixels * 3];
            let worst = got
                .iter()
                .zip(common::floats(expected))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= tolerance, "{name} row {row}: differs by {worst}");
        }
        let sum: f64 = noise.data.iter().map(|v| f64::from(*v)).sum();
        let expected = case["sum"].as_f64().unwrap();
        assert!(
            (sum - expected).abs() < 1e-2,
            "{name}: sum {sum}, the pack's {expected}"
        );
    }
}
