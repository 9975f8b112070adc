//! LoRA on the tiny SD1.x model: every naming scheme of the tiny LoRA reaches the weight
//! ComfyUI patches with it, the patch is `W + strength·alpha/rank·up·down` (checked against a
//! plain triple loop), and the nodes build patched models that stack and leave their inputs
//! alone at strength 0.

use std::collections::HashSet;
use std::sync::Arc;

mod common;

use candle_core::{DType, Device, Tensor};
use common::{flat, j, setup, Setup};
use easel_engine::Value;
use easel_nodes::diffusion::Model;
use easel_nodes::models::clip_text::ClipNaming;
use easel_nodes::models::lora::{load_lora, ClipLoraNames, LoraKeyMap, WeightPatches};
use easel_nodes::models::testmodels::{
    self, TINY_LORA_ALPHA, TINY_LORA_LAYERS, TINY_LORA_RANK, TINY_LORA_UNMATCHED, TINY_SD1_CHECKPOINT, TINY_SD1_LORA,
};
use easel_nodes::models::unet::UNetInput;
use easel_nodes::models::weights::{SafetensorsFile, TensorShapes, Weights};
use easel_nodes::models::{SD1_CLIP_PREFIX, UNET_PREFIX};
use serde_json::json;

fn open(path: &std::path::Path) -> SafetensorsFile {
    SafetensorsFile::open(path).unwrap()
}

#[test]
fn every_layer_of_the_tiny_lora_patches_the_weight_comfyui_patches() {
    let dir = tempfile::tempdir().unwrap();
    testmodels::write_test_models(dir.path()).unwrap();
    let checkpoint = Arc::new(open(&dir.path().join("checkpoints").join(TINY_SD1_CHECKPOINT)));
    let lora = open(&dir.path().join("loras").join(TINY_SD1_LORA));
    let mut unet_keys = LoraKeyMap::default();
    unet_keys.add_unet(&checkpoint, UNET_PREFIX, &testmodels::tiny_sd1_unet());
    let mut clip_keys = LoraKeyMap::default();
    let sd1_names = ClipLoraNames {
        kohya: &["lora_te", "lora_te1"],
        diffusers: "text_encoder",
    };
    clip_keys.add_clip(&checkpoint, SD1_CLIP_PREFIX, ClipNaming::Transformers, sd1_names);
    let strength = 0.8f32;
    let unet = load_lora(&lora, &unet_keys, strength).unwrap();
    let clip = load_lora(&lora, &clip_keys, strength).unwrap();

    let patched: HashSet<&str> = unet
        .patches
        .keys()
        .chain(clip.patches.keys())
        .map(String::as_str)
        .collect();
    let expected: HashSet<&str> = TINY_LORA_LAYERS.iter().map(|(_, _, target)| *target).collect();
    assert_eq!(patched, expected);
    let used: HashSet<&String> = unet.used.iter().chain(&clip.used).collect();
    let unused: Vec<&str> = lora
        .tensor_names()
        .filter(|name| !used.contains(&name.to_string()))
        .collect();
    assert_eq!(unused, vec![TINY_LORA_UNMATCHED]);

    let patches = WeightPatches::default().and(unet.patches).and(clip.patches);
    let weights = Weights::from_file(checkpoint.clone(), DType::F32, &Device::Cpu).with_patches(patches);
    let scale = strength * TINY_LORA_ALPHA / TINY_LORA_RANK as f32;
    for (name, naming, target) in TINY_LORA_LAYERS {
        let shape = checkpoint.shape(target).unwrap().to_vec();
        let (outputs, inputs) = (shape[0], shape[1..].iter().product::<usize>());
        let base = flat(&checkpoint.load(target, DType::F32, &Device::Cpu).unwrap());
        let (up_name, down_name) = naming.factor_names(name);
        let up = flat(&lora.load(&up_name, DType::F32, &Device::Cpu).unwrap());
        let down = flat(&lora.load(&down_name, DType::F32, &Device::Cpu).unwrap());
        let wanted: Vec<f32> = (0..outputs * inputs)
            .map(|index| {
                let (o, i) = (index / inputs, index % inputs);
                let delta: f32 = (0..TINY_LORA_RANK)
                    .map(|r| up[o * TINY_LORA_RANK + r] * down[r * inputs + i])
                    .sum();
                base[index] + scale * delta
            })
            .collect();
        let got = flat(&weights.matrix(shape.as_slice(), target).unwrap().tensor().unwrap());
        let worst = got.iter().zip(&wanted).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name}: {worst}");
        assert!(got != base, "{name} changed nothing");
    }
}

/// The UNet's prediction for a fixed input.
fn prediction(model: &Value) -> Vec<f32> {
    let model = model.downcast::<Model>().unwrap();
    let device = Device::Cpu;
    let values: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
    let x = Tensor::from_vec(values, (1, 4, 8, 8), &device).unwrap();
    let context = Tensor::ones((1, 77, 64), DType::F32, &device).unwrap();
    let timesteps = Tensor::new(&[500f32], &device).unwrap();
    let out = model.0.unet.forward(&UNetInput::new(&x, &timesteps, &context)).unwrap();
    flat(&out)
}

fn lora_loader(setup: &Setup, model: &Value, clip: &Value, strength_model: f64, strength_clip: f64) -> Vec<Value> {
    setup
        .call(
            "LoraLoader",
            vec![
                ("model", model.clone()),
                ("clip", clip.clone()),
                ("lora_name", j(json!(TINY_SD1_LORA))),
                ("strength_model", j(json!(strength_model))),
                ("strength_clip", j(json!(strength_clip))),
            ],
        )
        .unwrap()
}

fn encoded(setup: &Setup, clip: &Value) -> Vec<f32> {
    let out = setup
        .call(
            "CLIPTextEncode",
            vec![("text", j(json!("a fox"))), ("clip", clip.clone())],
        )
        .unwrap();
    flat(&out[0].downcast::<easel_nodes::diffusion::Conditioning>().unwrap().0[0].cross_attention)
}

#[test]
fn lora_nodes_patch_stack_and_keep_their_inputs() {
    let setup = setup();
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
        )
        .unwrap();
    let (model, clip) = (&loaded[0], &loaded[1]);
    let (base_prediction, base_encoding) = (prediction(model), encoded(&setup, clip));

    let full = lora_loader(&setup, model, clip, 1.0, 1.0);
    assert_ne!(prediction(&full[0]), base_prediction);
    assert_ne!(encoded(&setup, &full[1]), base_encoding);
    // The inputs are untouched: the LoRA built new models.
    assert_eq!(prediction(model), base_prediction);

    // Two LoRA nodes at half strength patch as one at full strength.
    let half = lora_loader(&setup, model, clip, 0.5, 0.5);
    let twice = lora_loader(&setup, &half[0], &half[1], 0.5, 0.5);
    let difference = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(difference(&prediction(&twice[0]), &prediction(&full[0])) < 1e-4);
    assert!(difference(&encoded(&setup, &twice[1]), &encoded(&setup, &full[1])) < 1e-4);

    // Strength 0 leaves that side alone.
    let model_only = lora_loader(&setup, model, clip, 1.0, 0.0);
    assert_eq!(encoded(&setup, &model_only[1]), base_encoding);
    assert_eq!(prediction(&model_only[0]), prediction(&full[0]));
    let unchanged = lora_loader(&setup, model, clip, 0.0, 0.0);
    assert_eq!(prediction(&unchanged[0]), base_prediction);

    let only = setup
        .call(
            "LoraLoaderModelOnly",
            vec![
                ("model", model.clone()),
                ("lora_name", j(json!(TINY_SD1_LORA))),
                ("strength_model", j(json!(1.0))),
            ],
        )
        .unwrap();
    assert_eq!(prediction(&only[0]), prediction(&full[0]));

    let missing = setup.call(
        "LoraLoaderModelOnly",
        vec![
            ("model", model.clone()),
            ("lora_name", j(json!("missing.safetensors"))),
            ("strength_model", j(json!(1.0))),
        ],
    );
    let error = missing.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.contains("Model in folder 'loras' with filename 'missing.safetensors' not found."),
        "{error}"
    );
}
