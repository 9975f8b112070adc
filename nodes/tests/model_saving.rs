//! Saving models: a saved checkpoint, diffusion model, text encoder or VAE loads back through the
//! loaders and computes what the model it was saved from computed (patches included), with
//! ComfyUI's metadata.

mod common;

use std::path::PathBuf;

use common::{j, Setup};
use easel_engine::Value;
use easel_models::testmodels::{TINY_SD1_CHECKPOINT, TINY_SD3_CHECKPOINT, TINY_SDXL_CHECKPOINT};
use easel_models::weights::{SafetensorsFile, TensorShapes};
use easel_nodes::conditioning::Conditioning;
use easel_nodes::paths::Paths;
use serde_json::json;

fn paths(setup: &Setup) -> &Paths {
    setup.services.get::<Paths>().expect("paths")
}

/// The one file the output folder's `subfolder` holds whose name starts with `stem`, moved into
/// the models folder `folder` so the loaders find it; its name there.
fn saved_into(setup: &Setup, subfolder: &str, stem: &str, folder: &str) -> (String, PathBuf) {
    let paths = paths(setup);
    let found: Vec<PathBuf> = std::fs::read_dir(paths.output.join(subfolder))
        .expect("output subfolder")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.file_name().unwrap().to_string_lossy().starts_with(stem))
        .collect();
    assert_eq!(found.len(), 1, "one {stem} file in {subfolder}: {found:?}");
    let name = found[0].file_name().unwrap().to_string_lossy().into_owned();
    let model_folder = paths.full_path(folder, "").unwrap_or_else(|| paths.models.join(folder));
    std::fs::create_dir_all(&model_folder).unwrap();
    let target = model_folder.join(&name);
    std::fs::copy(&found[0], &target).unwrap();
    (name, found[0].clone())
}

/// A safetensors file's metadata.
fn metadata(path: &std::path::Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    header.metadata().clone().unwrap_or_default()
}

fn encoded(setup: &Setup, clip: &Value) -> Vec<f32> {
    let outputs = setup
        .call(
            "CLIPTextEncode",
            vec![("clip", clip.clone()), ("text", j(json!("a small (red:1.2) boat")))],
        )
        .unwrap();
    common::flat(&outputs[0].downcast::<Conditioning>().unwrap().0[0].cross_attention)
}

#[test]
fn a_saved_checkpoint_loads_back_and_predicts_the_same() {
    let setup = common::setup();
    let (loaded, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    // Patch the model and the text encoder, so that the saved weights are the patched ones.
    let scaled = |class: &str, input: &str, value: &Value| {
        setup
            .call(
                class,
                vec![
                    (input, value.clone()),
                    ("q", j(json!(1.0))),
                    ("k", j(json!(1.5))),
                    ("v", j(json!(0.5))),
                    ("out", j(json!(1.0))),
                ],
            )
            .unwrap()
            .remove(0)
    };
    let model = scaled("UNetSelfAttentionMultiply", "model", &loaded[0]);
    let clip = scaled("CLIPAttentionMultiply", "clip", &loaded[1]);
    setup
        .call(
            "CheckpointSave",
            vec![
                ("model", model.clone()),
                ("clip", clip.clone()),
                ("vae", loaded[2].clone()),
                ("filename_prefix", j(json!("checkpoints/merged"))),
            ],
        )
        .unwrap();
    let (name, path) = saved_into(&setup, "checkpoints", "merged_00001_", "checkpoints");
    let metadata = metadata(&path);
    assert_eq!(
        metadata.get("modelspec.predict_key").map(String::as_str),
        Some("epsilon")
    );
    // The prompt a node runs in (empty outside a prompt), as ComfyUI writes it.
    assert_eq!(metadata.get("prompt").map(String::as_str), Some("{}"));

    let reloaded = setup
        .call("CheckpointLoaderSimple", vec![("ckpt_name", j(json!(name)))])
        .unwrap();
    let sample = |model: &Value| {
        common::flat(&common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 2, 4.0).unwrap())
    };
    assert_eq!(sample(&reloaded[0]), sample(&model));
    assert_ne!(sample(&reloaded[0]), sample(&loaded[0]));
    assert_eq!(encoded(&setup, &reloaded[1]), encoded(&setup, &clip));

    let decode = |vae: &Value| {
        let outputs = setup
            .call("VAEDecode", vec![("samples", latent.clone()), ("vae", vae.clone())])
            .unwrap();
        outputs[0].downcast::<easel_nodes::image::Image>().unwrap().data.clone()
    };
    assert_eq!(decode(&reloaded[2]), decode(&loaded[2]));
}

#[test]
fn model_vae_and_clip_saves_load_with_their_own_loaders() {
    let setup = common::setup();
    let (loaded, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let save = |class: &str, input: &str, value: &Value, prefix: &str| {
        setup
            .call(
                class,
                vec![(input, value.clone()), ("filename_prefix", j(json!(prefix)))],
            )
            .unwrap();
    };
    save("ModelSave", "model", &loaded[0], "diffusion_models/unet");
    save("VAESave", "vae", &loaded[2], "vae/vae");
    save("CLIPSave", "clip", &loaded[1], "clip/text");
    let (unet, _) = saved_into(&setup, "diffusion_models", "unet_00001_", "diffusion_models");
    let (vae, _) = saved_into(&setup, "vae", "vae_00001_", "vae");
    let (clip, clip_path) = saved_into(&setup, "clip", "text_clip_l_00001_", "text_encoders");
    let clip_file = SafetensorsFile::open(&clip_path).unwrap();
    assert_eq!(metadata(&clip_path).get("format").map(String::as_str), Some("pt"));
    assert!(clip_file.has("text_model.encoder.layers.0.self_attn.q_proj.weight"));

    let unet = setup
        .call(
            "UNETLoader",
            vec![("unet_name", j(json!(unet))), ("weight_dtype", j(json!("default")))],
        )
        .unwrap()
        .remove(0);
    let sample = |model: &Value| {
        common::flat(&common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 2, 4.0).unwrap())
    };
    assert_eq!(sample(&unet), sample(&loaded[0]));
    let vae = setup
        .call("VAELoader", vec![("vae_name", j(json!(vae)))])
        .unwrap()
        .remove(0);
    let decode = |vae: &Value| {
        let outputs = setup
            .call("VAEDecode", vec![("samples", latent.clone()), ("vae", vae.clone())])
            .unwrap();
        outputs[0].downcast::<easel_nodes::image::Image>().unwrap().data.clone()
    };
    assert_eq!(decode(&vae), decode(&loaded[2]));
    let clip = setup
        .call(
            "CLIPLoader",
            vec![("clip_name", j(json!(clip))), ("type", j(json!("stable_diffusion")))],
        )
        .unwrap()
        .remove(0);
    assert_eq!(encoded(&setup, &clip), encoded(&setup, &loaded[1]));
}

#[test]
fn sdxl_text_encoders_are_saved_in_the_transformers_layout_and_load_back() {
    let setup = common::setup();
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SDXL_CHECKPOINT)))],
        )
        .unwrap();
    setup
        .call(
            "CLIPSave",
            vec![("clip", loaded[1].clone()), ("filename_prefix", j(json!("clip/sdxl")))],
        )
        .unwrap();
    let (clip_l, _) = saved_into(&setup, "clip", "sdxl_clip_l_00001_", "text_encoders");
    let (clip_g, clip_g_path) = saved_into(&setup, "clip", "sdxl_clip_g_00001_", "text_encoders");
    let clip_g_file = SafetensorsFile::open(&clip_g_path).unwrap();
    assert!(clip_g_file.has("text_model.encoder.layers.0.self_attn.k_proj.bias"));
    assert!(clip_g_file.has("text_projection.weight"));
    assert!(!clip_g_file.has("transformer.resblocks.0.attn.in_proj_weight"));
    let reloaded = setup
        .call(
            "DualCLIPLoader",
            vec![
                ("clip_name1", j(json!(clip_l))),
                ("clip_name2", j(json!(clip_g))),
                ("type", j(json!("sdxl"))),
            ],
        )
        .unwrap()
        .remove(0);
    let pooled = |clip: &Value| {
        let outputs = setup
            .call(
                "CLIPTextEncode",
                vec![("clip", clip.clone()), ("text", j(json!("a boat")))],
            )
            .unwrap();
        let entry = &outputs[0].downcast::<Conditioning>().unwrap().0[0];
        (
            common::flat(&entry.cross_attention),
            common::flat(entry.pooled.as_ref().unwrap()),
        )
    };
    let (hidden, pooled_reloaded) = pooled(&reloaded);
    let (expected_hidden, expected_pooled) = pooled(&loaded[1]);
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0));
    assert!(close(&hidden, &expected_hidden));
    assert!(close(&pooled_reloaded, &expected_pooled));
    // An SD1 checkpoint has no place for SDXL's encoders.
    let sd1 = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
        )
        .unwrap();
    let error = setup
        .call(
            "CheckpointSave",
            vec![
                ("model", sd1[0].clone()),
                ("clip", loaded[1].clone()),
                ("vae", sd1[2].clone()),
                ("filename_prefix", j(json!("checkpoints/mixed"))),
            ],
        )
        .expect_err("mismatched encoders are refused");
    assert!(error.to_string().contains("no place"), "{error}");
}

/// An SD3 checkpoint saves its MMDiT, its three text encoders (under `text_encoders.`, CLIP-G in
/// the transformers layout, as ComfyUI writes them) and its VAE, and loads back with the same
/// conditioning.
#[test]
fn an_sd3_checkpoint_saves_its_three_text_encoders() {
    let setup = common::setup();
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD3_CHECKPOINT)))],
        )
        .unwrap();
    setup
        .call(
            "CheckpointSave",
            vec![
                ("model", loaded[0].clone()),
                ("clip", loaded[1].clone()),
                ("vae", loaded[2].clone()),
                ("filename_prefix", j(json!("checkpoints/sd3"))),
            ],
        )
        .unwrap();
    let (name, path) = saved_into(&setup, "checkpoints", "sd3_00001_", "checkpoints");
    let file = SafetensorsFile::open(&path).unwrap();
    for tensor in [
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight",
        "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight",
        "first_stage_model.decoder.conv_in.weight",
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
    ] {
        assert!(file.has(tensor), "{tensor}");
    }
    let reloaded = setup
        .call("CheckpointLoaderSimple", vec![("ckpt_name", j(json!(name)))])
        .unwrap();
    assert_eq!(encoded(&setup, &reloaded[1]), encoded(&setup, &loaded[1]));
}
