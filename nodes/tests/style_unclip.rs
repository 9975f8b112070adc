//! Style models and unCLIP against ComfyUI's own code on tiny sizes (fixture from
//! `fixtures/generate_style_unclip.py`): FLUX Redux's and the SD1.5 style adapter's tokens,
//! StyleModelApply's tokens and attention masks for both strength types (and a mask widened
//! again), and unCLIP's noise-augmented class vectors; then the tiny models through the nodes:
//! Redux steering FLUX (an attention bias of ln 0 hides its tokens entirely), the style adapter
//! on SD1.x, and the tiny SD2.1 unCLIP checkpoint sampling from an image.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{
    assert_matches_fixture, empty_latent, fixture_json, floats, formula_unet_file, j, ksampler, max_abs_difference,
    pattern, pattern_image, sd1_inputs, setup, sizes, tiny_flux_model, Setup,
};
use easel_engine::Value;
use easel_models::architectures::clip_vision::VisionOutput;
use easel_models::testmodels::{
    TINY_CLIP_VISION, TINY_FLUX_REDUX, TINY_SD1_CHECKPOINT, TINY_SD1_STYLE_ADAPTER, TINY_SD2_UNCLIP_CHECKPOINT,
    TINY_SIGLIP,
};
use easel_nodes::clip_vision::style_model::{load_style_model, LoadedStyleModel};
use easel_nodes::clip_vision::unclip::{unclip_class_vector, UnclipImage};
use easel_nodes::clip_vision::{ClipVisionModel, ClipVisionOutput};
use easel_nodes::conditioning::{CondEntry, Conditioning};
use serde_json::{json, Value as Json};

fn write(dir: &std::path::Path, name: &str, fixture: &Json) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, formula_unet_file(fixture)).expect("written");
    path
}

/// A CLIP vision output whose every field is `last_hidden_state`.
fn vision_output(last_hidden_state: Tensor) -> ClipVisionOutput {
    ClipVisionOutput(VisionOutput {
        penultimate_hidden_states: last_hidden_state.clone(),
        image_embeds: last_hidden_state.clone(),
        last_hidden_state,
    })
}

#[test]
fn style_models_make_comfyuis_tokens() {
    let fixture = fixture_json("style_unclip.json");
    let dir = tempfile::tempdir().expect("a directory");
    let (redux, _) = load_style_model(&write(dir.path(), "redux.safetensors", &fixture["redux"]), &Device::Cpu)
        .expect("Redux loads");
    let hidden = pattern(&sizes(&fixture["vision"]), 3, 1.0);
    assert_matches_fixture("redux", &redux.tokens(&hidden).unwrap(), &fixture["redux"]["tokens"]);

    let (adapter, _) = load_style_model(
        &write(dir.path(), "adapter.safetensors", &fixture["adapter"]),
        &Device::Cpu,
    )
    .expect("the style adapter loads");
    let hidden = pattern(&sizes(&fixture["adapter"]["hidden"]), 4, 1.0);
    assert_matches_fixture(
        "adapter",
        &adapter.tokens(&hidden).unwrap(),
        &fixture["adapter"]["tokens"],
    );

    let error = load_style_model(
        &write(
            dir.path(),
            "other.safetensors",
            &json!({"weights": [{"name": "x.weight", "shape": [2, 2]}]}),
        ),
        &Device::Cpu,
    )
    .err()
    .expect("refused");
    assert!(error.to_string().starts_with("invalid style model "), "{error}");
}

#[test]
fn style_model_apply_appends_tokens_and_biases_attention_as_comfyui() {
    let fixture = fixture_json("style_unclip.json");
    let setup = setup();
    let dir = tempfile::tempdir().expect("a directory");
    let (redux, _) = load_style_model(&write(dir.path(), "redux.safetensors", &fixture["redux"]), &Device::Cpu)
        .expect("Redux loads");
    let style = Value::object(LoadedStyleModel(Arc::new(redux)));
    let output = Value::object(vision_output(pattern(&sizes(&fixture["vision"]), 3, 1.0)));
    let text = CondEntry::new(
        pattern(&sizes(&fixture["text"]), 5, 1.0),
        Some(pattern(&[1, 16], 6, 1.0)),
    );
    let apply = |conditioning: Value, strength: f64, strength_type: &str| {
        setup
            .call(
                "StyleModelApply",
                vec![
                    ("conditioning", conditioning),
                    ("style_model", style.clone()),
                    ("clip_vision_output", output.clone()),
                    ("strength", j(json!(strength))),
                    ("strength_type", j(json!(strength_type))),
                ],
            )
            .expect("applies")
            .remove(0)
    };
    let check = |name: &str, applied: &Value, expected: &Json| {
        let entry = &applied.downcast::<Conditioning>().expect("conditioning").0[0];
        assert_matches_fixture(name, &entry.cross_attention, &expected["tokens"]);
        match (&entry.attention_mask, expected["mask"].is_null()) {
            (None, true) => {}
            (Some(mask), false) => assert_matches_fixture(name, &mask.unsqueeze(0).unwrap(), &expected["mask"]),
            (mask, _) => panic!(
                "{name}: mask {:?} where ComfyUI's is {}",
                mask.as_ref().map(Tensor::dims),
                expected["mask"]
            ),
        }
    };
    let plain = Value::object(Conditioning(vec![text]));
    let cases = fixture["apply"].as_array().expect("apply");
    for expected in &cases[..3] {
        let (strength, strength_type) = (
            expected["strength"].as_f64().unwrap(),
            expected["strength_type"].as_str().unwrap(),
        );
        check(
            &format!("{strength_type} {strength}"),
            &apply(plain.clone(), strength, strength_type),
            expected,
        );
    }
    let once = apply(plain, 0.5, "attn_bias");
    check("attn_bias twice", &apply(once, 2.0, "attn_bias"), &cases[3]);
}

#[test]
fn unclip_class_vectors_match_comfyui() {
    let fixture = fixture_json("style_unclip.json");
    let seed = fixture["seed"].as_u64().expect("a seed");
    for case in fixture["unclip"].as_array().expect("unclip") {
        let images: Vec<UnclipImage> = case["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|image| UnclipImage {
                image_embeds: Tensor::from_vec(
                    floats(&image["embeds"]["values"]),
                    sizes(&image["embeds"]["shape"]),
                    &Device::Cpu,
                )
                .unwrap(),
                strength: image["strength"].as_f64().unwrap(),
                noise_augmentation: image["noise_augmentation"].as_f64().unwrap(),
            })
            .collect();
        let vector = unclip_class_vector(&images, seed, &Device::Cpu).expect("a class vector");
        assert_matches_fixture(case["name"].as_str().unwrap(), &vector, &case["adm"]);
    }
}

/// The tiny FLUX dev model's text and pooled vector through its own loaders.
fn flux_conditioning(setup: &Setup, text: &str) -> Value {
    let clip = setup
        .call(
            "DualCLIPLoader",
            vec![
                ("clip_name1", j(json!(easel_models::testmodels::TINY_CLIP_L))),
                ("clip_name2", j(json!(easel_models::testmodels::TINY_T5))),
                ("type", j(json!("flux"))),
                ("device", j(json!("default"))),
            ],
        )
        .expect("FLUX text encoders")
        .remove(0);
    setup
        .call("CLIPTextEncode", vec![("text", j(json!(text))), ("clip", clip)])
        .expect("encoded")
        .remove(0)
}

/// An image encoded by the CLIP vision file `name` of the tiny models.
fn encoded_image(setup: &Setup, name: &str) -> Value {
    let encoder = setup
        .call("CLIPVisionLoader", vec![("clip_name", j(json!(name)))])
        .expect("loads")
        .remove(0);
    encode_with(setup, encoder)
}

fn encode_with(setup: &Setup, encoder: Value) -> Value {
    setup
        .call(
            "CLIPVisionEncode",
            vec![
                ("clip_vision", encoder),
                ("image", Value::object(pattern_image(40, 56, 3))),
                ("crop", j(json!("center"))),
            ],
        )
        .expect("encodes")
        .remove(0)
}

fn apply_style(setup: &Setup, conditioning: &Value, style: &Value, output: &Value, strength: f64, kind: &str) -> Value {
    setup
        .call(
            "StyleModelApply",
            vec![
                ("conditioning", conditioning.clone()),
                ("style_model", style.clone()),
                ("clip_vision_output", output.clone()),
                ("strength", j(json!(strength))),
                ("strength_type", j(json!(kind))),
            ],
        )
        .expect("applies")
        .remove(0)
}

fn style_model(setup: &Setup, name: &str) -> Value {
    setup
        .call("StyleModelLoader", vec![("style_model_name", j(json!(name)))])
        .expect("loads")
        .remove(0)
}

#[test]
fn redux_steers_flux_and_a_bias_of_ln_zero_hides_its_tokens() {
    let setup = setup();
    let model = tiny_flux_model(&setup);
    let positive = flux_conditioning(&setup, "a red house");
    let negative = flux_conditioning(&setup, "");
    let output = encoded_image(&setup, TINY_SIGLIP);
    let redux = style_model(&setup, TINY_FLUX_REDUX);
    let latent = empty_latent(&setup, 64, 64, 1);
    let sample = |positive: &Value| ksampler(&setup, &model, positive, &negative, &latent, "euler", 2, 1.0).unwrap();
    let plain = sample(&positive);
    let styled = sample(&apply_style(&setup, &positive, &redux, &output, 1.0, "multiply"));
    assert!(max_abs_difference(&plain, &styled) > 1e-4, "Redux changes the image");
    let biased = sample(&apply_style(&setup, &positive, &redux, &output, 0.5, "attn_bias"));
    assert!(max_abs_difference(&styled, &biased) > 1e-4, "the bias matters");
    let hidden = sample(&apply_style(&setup, &positive, &redux, &output, 0.0, "attn_bias"));
    assert!(
        max_abs_difference(&plain, &hidden) < 1e-4,
        "no token attends to Redux's tokens at a bias of ln 0"
    );
}

#[test]
fn the_style_adapter_steers_sd1() {
    let setup = setup();
    let (loaded, positive, negative, latent) = sd1_inputs(&setup, 1);
    let output = encoded_image(&setup, TINY_CLIP_VISION);
    let adapter = style_model(&setup, TINY_SD1_STYLE_ADAPTER);
    let styled = apply_style(&setup, &positive, &adapter, &output, 1.0, "multiply");
    let tokens = |value: &Value| {
        value.downcast::<Conditioning>().unwrap().0[0]
            .cross_attention
            .dim(1)
            .unwrap()
    };
    assert_eq!(tokens(&styled), tokens(&positive) + 4, "four style tokens");
    let sample =
        |positive: &Value| ksampler(&setup, &loaded[0], positive, &negative, &latent, "euler", 2, 5.0).unwrap();
    assert!(max_abs_difference(&sample(&positive), &sample(&styled)) > 1e-4);
}

#[test]
fn the_unclip_checkpoint_samples_from_an_image() {
    let setup = setup();
    let loaded = setup
        .call(
            "unCLIPCheckpointLoader",
            vec![("ckpt_name", j(json!(TINY_SD2_UNCLIP_CHECKPOINT)))],
        )
        .expect("loads");
    assert!(loaded[3].downcast::<ClipVisionModel>().is_some(), "the image encoder");
    let encode = |text: &str| {
        setup
            .call(
                "CLIPTextEncode",
                vec![("text", j(json!(text))), ("clip", loaded[1].clone())],
            )
            .expect("encoded")
            .remove(0)
    };
    let (positive, negative) = (encode("a red house"), encode(""));
    let output = encode_with(&setup, loaded[3].clone());
    let unclip = |strength: f64, noise: f64| {
        setup
            .call(
                "unCLIPConditioning",
                vec![
                    ("conditioning", positive.clone()),
                    ("clip_vision_output", output.clone()),
                    ("strength", j(json!(strength))),
                    ("noise_augmentation", j(json!(noise))),
                ],
            )
            .expect("conditioned")
            .remove(0)
    };
    let latent = empty_latent(&setup, 64, 64, 1);
    let sample =
        |positive: &Value| ksampler(&setup, &loaded[0], positive, &negative, &latent, "euler", 2, 5.0).unwrap();
    let plain = sample(&positive);
    let imaged = sample(&unclip(1.0, 0.0));
    assert!(max_abs_difference(&plain, &imaged) > 1e-4, "the image steers");
    assert!(
        max_abs_difference(&imaged, &sample(&unclip(1.0, 0.5))) > 1e-4,
        "noise augmentation matters"
    );
    assert_eq!(
        max_abs_difference(&plain, &sample(&unclip(0.0, 0.5))),
        0.0,
        "strength 0 is no image"
    );

    let plain_checkpoint = setup
        .call(
            "unCLIPCheckpointLoader",
            vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
        )
        .expect("loads");
    assert!(
        matches!(plain_checkpoint[3], Value::Json(Json::Null)),
        "no image encoder"
    );
}
