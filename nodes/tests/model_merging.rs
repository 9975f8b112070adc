//! Weight patches from nodes: model and CLIP merges and attention multipliers, checked on the
//! patched tensors (ComfyUI's `calculate_weight`: `W ← strength_model·W + strength·W₂`) and on
//! what the merged models compute.

mod common;

use candle_core::Tensor;
use common::{j, rewrite_f16_file, Setup};
use easel_engine::Value;
use easel_models::testmodels::TINY_SD1_CHECKPOINT;
use easel_nodes::model::clip::Clip;
use easel_nodes::model::diffusion_model::Model;
use easel_nodes::paths::Paths;
use serde_json::json;

const DOUBLED: &str = "tiny_sd1_doubled.safetensors";

/// The tiny SD1 checkpoint and a copy of it with every tensor doubled, loaded.
fn two_checkpoints(setup: &Setup) -> (Vec<Value>, Vec<Value>) {
    let paths = setup.services.get::<Paths>().expect("paths");
    let source = paths
        .full_path("checkpoints", TINY_SD1_CHECKPOINT)
        .expect("tiny checkpoint");
    rewrite_f16_file(
        &source,
        &source.with_file_name(DOUBLED),
        safetensors::Dtype::F16,
        |value, out| out.extend(half::f16::from_f32(2.0 * value).to_le_bytes()),
    );
    let load = |name: &str| {
        setup
            .call("CheckpointLoaderSimple", vec![("ckpt_name", j(json!(name)))])
            .unwrap()
    };
    (load(TINY_SD1_CHECKPOINT), load(DOUBLED))
}

/// The UNet tensor `name` (under the model's prefix) as the model's weights give it, patched.
fn unet_tensor(model: &Value, name: &str) -> Tensor {
    let model = &model.downcast::<Model>().unwrap().0;
    let full = format!("{}{name}", model.source.name_prefix());
    let shape = model.source.file.shape(&full).expect("tensor exists").to_vec();
    model.source.weights().get(shape, name).unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    let difference = common::max_abs_difference(a, b);
    assert!(difference <= 1e-6 * scale, "{what}: off by {difference}");
}

fn call_one(setup: &Setup, class: &str, inputs: Vec<(&str, Value)>) -> Value {
    setup.call(class, inputs).unwrap().remove(0)
}

#[test]
fn model_merges_weigh_each_tensor_as_comfyui() {
    let setup = common::setup();
    let (first, second) = two_checkpoints(&setup);
    let (model1, model2) = (first[0].clone(), second[0].clone());
    let names = [
        "input_blocks.0.0.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "middle_block.0.in_layers.2.bias",
        "output_blocks.2.0.out_layers.3.weight",
        "out.2.weight",
        "time_embed.0.weight",
    ];
    let base: Vec<Tensor> = names.iter().map(|name| unet_tensor(&model1, name)).collect();
    let merge = |class: &str, extra: Vec<(&str, Value)>| {
        let mut inputs = vec![("model1", model1.clone()), ("model2", model2.clone())];
        inputs.extend(extra);
        call_one(&setup, class, inputs)
    };
    let simple = merge("ModelMergeSimple", vec![("ratio", j(json!(0.25)))]);
    let subtract = merge("ModelMergeSubtract", vec![("multiplier", j(json!(1.5)))]);
    let add = merge("ModelMergeAdd", vec![]);
    let blocks = merge(
        "ModelMergeBlocks",
        vec![
            ("input", j(json!(0.1))),
            ("middle", j(json!(0.5))),
            ("out", j(json!(0.9))),
        ],
    );
    for (name, w) in names.iter().zip(&base) {
        // model2 is 2·W: ratio·W + (1 − ratio)·2W, 1.5·(W − 2W), W + 2W.
        assert_close(&unet_tensor(&simple, name), &(w * (0.25 + 0.75 * 2.0)).unwrap(), name);
        assert_close(&unet_tensor(&subtract, name), &(w * -1.5).unwrap(), name);
        assert_close(&unet_tensor(&add, name), &(w * 3.0).unwrap(), name);
        let ratio = match name {
            n if n.starts_with("middle") => 0.5,
            n if n.starts_with("out") => 0.9,
            _ => 0.1,
        };
        assert_close(
            &unet_tensor(&blocks, name),
            &(w * (ratio + (1.0 - ratio) * 2.0)).unwrap(),
            name,
        );
    }
    // The merged model runs, and merging at ratio 1 keeps model1's prediction exactly.
    let (_, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let sample = |model: &Value| {
        common::flat(&common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 2, 4.0).unwrap())
    };
    let kept = merge("ModelMergeSimple", vec![("ratio", j(json!(1.0)))]);
    assert_eq!(sample(&kept), sample(&model1));
    let half = sample(&merge("ModelMergeSimple", vec![("ratio", j(json!(0.5)))]));
    assert!(half.iter().all(|v| v.is_finite()));
    assert_ne!(half, sample(&model1));
}

#[test]
fn clip_merges_change_the_encoders_and_keep_position_ids() {
    let setup = common::setup();
    let (first, second) = two_checkpoints(&setup);
    let (clip1, clip2) = (first[1].clone(), second[1].clone());
    let encode = |clip: &Value| {
        let conditioning = call_one(
            &setup,
            "CLIPTextEncode",
            vec![("text", j(json!("a red fox"))), ("clip", clip.clone())],
        );
        let conditioning = conditioning
            .downcast::<easel_nodes::conditioning::Conditioning>()
            .unwrap()
            .clone();
        common::flat(&conditioning.0[0].cross_attention)
    };
    let merge = |class: &str, extra: Vec<(&str, Value)>| {
        let mut inputs = vec![("clip1", clip1.clone()), ("clip2", clip2.clone())];
        inputs.extend(extra);
        call_one(&setup, class, inputs)
    };
    let kept = merge("CLIPMergeSimple", vec![("ratio", j(json!(1.0)))]);
    assert_eq!(encode(&kept), encode(&clip1));
    for merged in [
        merge("CLIPMergeSimple", vec![("ratio", j(json!(0.3)))]),
        merge("CLIPMergeSubtract", vec![("multiplier", j(json!(0.5)))]),
        merge("CLIPMergeAdd", vec![]),
    ] {
        let encoder = &merged.downcast::<Clip>().unwrap().encoders[0];
        let prefix = encoder.source.name_prefix();
        let name = "text_model.embeddings.position_embedding.weight";
        let shape = encoder
            .source
            .file
            .shape(&format!("{prefix}{name}"))
            .expect("position embedding")
            .to_vec();
        let original = &clip1.downcast::<Clip>().unwrap().encoders[0].source;
        assert_ne!(
            common::flat(&encoder.source.weights().get(shape.clone(), name).unwrap()),
            common::flat(&original.weights().get(shape, name).unwrap()),
            "the position embedding is a weight and is merged"
        );
        assert_ne!(encode(&merged), encode(&clip1));
    }
}

#[test]
fn attention_multipliers_scale_only_their_projections() {
    let setup = common::setup();
    let (loaded, _, _, _) = common::sd1_inputs(&setup, 1);
    let model = loaded[0].clone();
    let factors = |q: f64, k: f64, v: f64, out: f64| {
        vec![
            ("q", j(json!(q))),
            ("k", j(json!(k))),
            ("v", j(json!(v))),
            ("out", j(json!(out))),
        ]
    };
    let mut inputs = vec![("model", model.clone())];
    inputs.extend(factors(1.0, 0.5, 2.0, 3.0));
    let self_attention = call_one(&setup, "UNetSelfAttentionMultiply", inputs);
    let block = "input_blocks.1.1.transformer_blocks.0";
    for (tensor, factor) in [
        ("attn1.to_q.weight", 1.0),
        ("attn1.to_k.weight", 0.5),
        ("attn1.to_v.weight", 2.0),
        ("attn1.to_out.0.weight", 3.0),
        ("attn1.to_out.0.bias", 3.0),
        ("attn2.to_v.weight", 1.0),
        ("ff.net.2.weight", 1.0),
    ] {
        let name = format!("{block}.{tensor}");
        let expected = (unet_tensor(&model, &name) * factor).unwrap();
        assert_close(&unet_tensor(&self_attention, &name), &expected, &name);
    }
    let mut inputs = vec![("model", model.clone())];
    inputs.extend(factors(1.0, 1.0, 1.0, 1.0));
    let unchanged = call_one(&setup, "UNetCrossAttentionMultiply", inputs);
    assert!(std::sync::Arc::ptr_eq(
        &unchanged.downcast::<Model>().unwrap().0.source.file,
        &model.downcast::<Model>().unwrap().0.source.file
    ));

    let clip = loaded[1].clone();
    let mut inputs = vec![("clip", clip.clone())];
    inputs.extend(factors(2.0, 1.0, 1.0, 0.5));
    let scaled = call_one(&setup, "CLIPAttentionMultiply", inputs);
    let layer = "text_model.encoder.layers.0";
    let tensor = |clip: &Value, name: &str| {
        let source = &clip.downcast::<Clip>().unwrap().encoders[0].source;
        let shape = source
            .file
            .shape(&format!("{}{name}", source.name_prefix()))
            .expect("CLIP tensor")
            .to_vec();
        source.weights().get(shape, name).unwrap()
    };
    for (projection, factor) in [
        ("self_attn.q_proj.weight", 2.0),
        ("self_attn.q_proj.bias", 2.0),
        ("self_attn.k_proj.weight", 1.0),
        ("self_attn.out_proj.weight", 0.5),
        ("mlp.fc1.weight", 1.0),
    ] {
        let name = format!("{layer}.{projection}");
        let expected = (tensor(&clip, &name) * factor).unwrap();
        assert_close(&tensor(&scaled, &name), &expected, &name);
    }
}
