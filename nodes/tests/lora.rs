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
use easel_models::architectures::clip_encoder::ClipNaming;
use easel_models::architectures::unet::UNetInput;
use easel_models::checkpoint::{SD1_CLIP_PREFIX, UNET_PREFIX};
use easel_models::lora::{load_lora, ClipLoraNames, LoraKeyMap, WeightPatches};
use easel_models::testmodels::{
    self, TINY_LORA_ALPHA, TINY_LORA_LAYERS, TINY_LORA_RANK, TINY_LORA_UNMATCHED, TINY_SD1_CHECKPOINT, TINY_SD1_LORA,
};
use easel_models::weights::{MappedWeights, SafetensorsFile, TensorShapes, Weights};
use easel_nodes::model::diffusion_model::Model;
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
    unet_keys.add_unet(checkpoint.as_ref(), UNET_PREFIX, &testmodels::tiny_sd1_unet());
    let mut clip_keys = LoraKeyMap::default();
    let sd1_names = ClipLoraNames {
        kohya: &["lora_te", "lora_te1"],
        diffusers: "text_encoder",
        comfy: "clip_l",
    };
    clip_keys.add_clip(
        checkpoint.as_ref(),
        SD1_CLIP_PREFIX,
        ClipNaming::Transformers,
        sd1_names,
    );
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
                // Patched in f32, kept in the file's f16 as ComfyUI rounds it.
                half::f16::from_f32(base[index] + scale * delta).to_f32()
            })
            .collect();
        let got = flat(&weights.matrix(shape.as_slice(), target).unwrap().tensor().unwrap());
        // Equal, but for a sum that rounds to the neighbouring f16 (one unit in the last place).
        let off = got
            .iter()
            .zip(&wanted)
            .filter(|(a, b)| (*a - *b).abs() > b.abs() * 1e-3 + 1e-7)
            .count();
        assert_eq!(off, 0, "{name}");
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
    let out = model
        .0
        .network
        .unet()
        .unwrap()
        .forward(&UNetInput::new(&x, &timesteps, &context))
        .unwrap();
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
    flat(&out[0].downcast::<easel_nodes::conditioning::Conditioning>().unwrap().0[0].cross_attention)
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

/// An SDXL LoRA: `lora_te1` reaches CLIP-L, `lora_te2` CLIP-G — whose query, key and value are
/// the thirds of OpenCLIP's fused `in_proj_weight`, so a key LoRA patches the middle third only —
/// and `lora_unet` the UNet, each at its strength.
#[test]
fn sdxl_loras_reach_both_text_encoders_and_the_fused_open_clip_projections() {
    use easel_models::testmodels::TINY_SDXL_CHECKPOINT;
    use easel_nodes::model::clip::Clip;
    use safetensors::tensor::{Dtype, TensorView};

    let setup = setup();
    let paths = setup.services.get::<easel_nodes::paths::Paths>().unwrap();
    let layers: [(&str, usize, usize); 4] = [
        ("lora_te2_text_model_encoder_layers_1_self_attn_k_proj", 96, 96),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", 192, 96),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 64, 64),
        ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k", 64, 160),
    ];
    let factor = |rows: usize, columns: usize, seed: usize| -> Vec<f32> {
        (0..rows * columns)
            .map(|i| (((i * 7 + seed * 13) % 17) as f32 - 8.0) / 16.0)
            .collect()
    };
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (index, (name, out, input)) in layers.iter().enumerate() {
        let bytes = |values: Vec<f32>| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        buffers.push((
            format!("{name}.lora_up.weight"),
            vec![*out, 2],
            bytes(factor(*out, 2, index)),
        ));
        buffers.push((
            format!("{name}.lora_down.weight"),
            vec![2, *input],
            bytes(factor(2, *input, index + 5)),
        ));
        buffers.push((format!("{name}.alpha"), vec![], bytes(vec![1.0])));
    }
    let views: Vec<(String, TensorView)> = buffers
        .iter()
        .map(|(name, shape, data)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), data).unwrap()))
        .collect();
    let lora_path = paths.models.join("loras").join("sdxl_test_lora.safetensors");
    safetensors::serialize_to_file(views, None, &lora_path).unwrap();

    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SDXL_CHECKPOINT)))],
        )
        .unwrap();
    let patched = setup
        .call(
            "LoraLoader",
            vec![
                ("model", loaded[0].clone()),
                ("clip", loaded[1].clone()),
                ("lora_name", j(json!("sdxl_test_lora.safetensors"))),
                ("strength_model", j(json!(0.7))),
                ("strength_clip", j(json!(0.9))),
            ],
        )
        .unwrap();
    let checkpoint = open(&paths.full_path("checkpoints", TINY_SDXL_CHECKPOINT).unwrap());
    let base = |name: &str| checkpoint.load(name, DType::F32, &Device::Cpu).unwrap();
    // W + strength·(alpha/rank)·up·down with alpha 1, rank 2.
    let expected = |name: &str, base: Tensor, layer: usize, strength: f64| {
        let (_, out, input) = layers[layer];
        let up = Tensor::from_vec(factor(out, 2, layer), (out, 2), &Device::Cpu).unwrap();
        let down = Tensor::from_vec(factor(2, input, layer + 5), (2, input), &Device::Cpu).unwrap();
        let difference = (up.matmul(&down).unwrap() * (strength * 0.5)).unwrap();
        assert_eq!(base.dims(), difference.dims(), "{name}");
        (base + difference).unwrap()
    };
    let clip = patched[1].downcast::<Clip>().unwrap();
    let encoder_weight = |encoder: usize, name: &str, shape: (usize, usize)| {
        clip.encoders[encoder].source.weights().get(shape, name).unwrap()
    };
    let close = |a: &Tensor, b: &Tensor| common::max_abs_difference(a, b) < 1e-6;

    let in_proj = encoder_weight(1, "transformer.resblocks.1.attn.in_proj_weight", (288, 96));
    let base_in_proj = base("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight");
    assert!(close(
        &in_proj.narrow(0, 0, 96).unwrap(),
        &base_in_proj.narrow(0, 0, 96).unwrap()
    ));
    assert!(close(
        &in_proj.narrow(0, 192, 96).unwrap(),
        &base_in_proj.narrow(0, 192, 96).unwrap()
    ));
    let key = expected("k", base_in_proj.narrow(0, 96, 96).unwrap(), 0, 0.9);
    assert!(close(&in_proj.narrow(0, 96, 96).unwrap(), &key));

    let fc1 = encoder_weight(1, "transformer.resblocks.0.mlp.c_fc.weight", (192, 96));
    let base_fc1 = base("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight");
    assert!(close(&fc1, &expected("fc1", base_fc1, 1, 0.9)));

    let q = encoder_weight(0, "text_model.encoder.layers.0.self_attn.q_proj.weight", (64, 64));
    let base_q = base("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight");
    assert!(close(&q, &expected("q", base_q, 2, 0.9)));

    let model = patched[0].downcast::<Model>().unwrap();
    let to_k = model
        .0
        .source
        .weights()
        .get((64, 160), "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight")
        .unwrap();
    let base_to_k = base("model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight");
    assert!(close(&to_k, &expected("to_k", base_to_k, 3, 0.7)));
}
