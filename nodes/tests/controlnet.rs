//! ControlNet: the network against ComfyUI's own `cldm.ControlNet` on tiny SD1- and
//! SDXL-shaped models filled from a formula (fixture from `fixtures/generate_controlnet.py`), and
//! the loader and apply nodes steering KSampler as ComfyUI's semantics say (strength, the part of
//! sampling, chaining, the old node's control reaching the negative side).

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{
    assert_matches_fixture, fixture_json, fixture_unet, floats, formula_unet_file, j, ksampler, max_abs_difference,
    pattern, sd1_inputs, setup, sizes,
};
use easel_engine::Value;
use easel_models::architectures::controlnet::{ControlHint, ControlNet, ControlNetConfig, ControlNetInput};
use easel_models::architectures::unet::{HeadLayout, UNetInput};
use easel_models::testmodels::TINY_SD1_CONTROLNET;
use easel_models::weights::{SafetensorsFile, Weights};
use easel_nodes::controlnet::ControlModel;
use serde_json::json;
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
                hint: ControlHint::Image(&hint),
                timesteps: &timesteps,
                context: &context,
                y: y.as_ref(),
                control_type: None,
            };
            let outputs = net.forward(&input).expect("forward");
            // The hint through the hint block once (as the nodes keep it) gives the same.
            let guided = net.guided_hint(&hint, x.dtype()).expect("hint block");
            let from_guided = net
                .forward(&ControlNetInput {
                    hint: ControlHint::Guided(&guided),
                    ..input
                })
                .expect("forward from the guided hint");
            for (ours, again) in outputs.encoder.iter().zip(&from_guided.encoder) {
                assert_eq!(max_abs_difference(ours, again), 0.0, "{name}: guided hint");
            }
            let expected = case["output"].as_array().expect("output");
            assert_eq!(
                outputs.encoder.len(),
                expected.len(),
                "{name}: one residual per encoder block"
            );
            for (index, (got, expected)) in outputs.encoder.iter().zip(expected).enumerate() {
                assert_matches_fixture(&format!("{name} output {index}"), got, expected);
            }
            assert_matches_fixture(&format!("{name} middle"), &outputs.middle, &case["middle"][0]);
        }
    }
}

#[test]
fn the_unet_takes_controlnet_residuals_where_comfyuis_does() {
    let fixture = fixture_json("controlnet.json");
    let dir = tempfile::tempdir().expect("temporary directory");
    let case = &fixture["cases"][0];
    let net = load(case, dir.path(), "");
    let (_unet_dir, unet) = fixture_unet(&fixture["unet"]);
    let x = pattern(&sizes(&fixture["latent"]), 1, 1.0);
    let hint = ((pattern(&sizes(&fixture["hint"]), 3, 1.0) * 0.5).unwrap() + 0.5).unwrap();
    let timesteps = Tensor::new(floats(&fixture["timesteps"]).as_slice(), &Device::Cpu).unwrap();
    let context = pattern(&sizes(&case["context"]), 2, 1.0);
    let outputs = net
        .forward(&ControlNetInput {
            x: &x,
            hint: ControlHint::Image(&hint),
            timesteps: &timesteps,
            context: &context,
            y: None,
            control_type: None,
        })
        .expect("ControlNet");
    let residuals = outputs
        .residuals(fixture["unet"]["strength"].as_f64().expect("strength"))
        .unwrap();
    for (name, control) in [("without_control", None), ("with_control", Some(&residuals))] {
        let out = unet
            .forward(&UNetInput {
                control,
                ..UNetInput::new(&x, &timesteps, &context)
            })
            .expect("UNet");
        let expected = fixture["unet"][name].clone();
        let shape = Json::from(out.dims().to_vec());
        assert_matches_fixture(name, &out, &serde_json::json!({"shape": shape, "values": expected}));
    }
}

/// Classifier-free guidance calls the networks on two copies of one latent at one timestep
/// with two texts: the layers before the first cross-attention run once for both copies, and
/// each copy's result is the one a call of its own gives.
#[test]
fn a_guidance_batch_gives_what_separate_calls_give() {
    let fixture = fixture_json("controlnet.json");
    let dir = tempfile::tempdir().expect("temporary directory");
    let case = &fixture["cases"][0];
    let net = load(case, dir.path(), "");
    let (_unet_dir, unet) = fixture_unet(&fixture["unet"]);
    let latent = pattern(&sizes(&fixture["latent"]), 1, 1.0).narrow(0, 0, 1).unwrap();
    let hint = ((pattern(&sizes(&fixture["hint"]), 3, 1.0) * 0.5).unwrap() + 0.5)
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap();
    let texts = pattern(&sizes(&case["context"]), 2, 1.0);
    let pair = Tensor::cat(&[&latent, &latent], 0).unwrap();
    let timesteps = Tensor::new(&[700f32, 700.0], &Device::Cpu).unwrap();
    let run = |x: &Tensor, timesteps: &Tensor, text: &Tensor| {
        let residuals = net
            .forward(&ControlNetInput {
                x,
                hint: ControlHint::Image(&hint),
                timesteps,
                context: text,
                y: None,
                control_type: None,
            })
            .expect("ControlNet")
            .residuals(0.8)
            .unwrap();
        let plain = unet.forward(&UNetInput::new(x, timesteps, text)).expect("UNet");
        let controlled = unet
            .forward(&UNetInput {
                control: Some(&residuals),
                ..UNetInput::new(x, timesteps, text)
            })
            .expect("controlled UNet");
        (plain, controlled)
    };
    let (plain, controlled) = run(&pair, &timesteps, &texts);
    for row in 0..2 {
        let (alone, alone_controlled) = run(
            &latent,
            &timesteps.narrow(0, row, 1).unwrap(),
            &texts.narrow(0, row, 1).unwrap(),
        );
        let difference = max_abs_difference(&plain.narrow(0, row, 1).unwrap(), &alone);
        assert!(difference < 1e-5, "copy {row} without control: {difference}");
        let difference = max_abs_difference(&controlled.narrow(0, row, 1).unwrap(), &alone_controlled);
        assert!(difference < 1e-5, "copy {row} with control: {difference}");
    }
    // The texts differ, so the copies' results do.
    let rows = |t: &Tensor| max_abs_difference(&t.narrow(0, 0, 1).unwrap(), &t.narrow(0, 1, 1).unwrap());
    assert!(rows(&plain) > 1e-3 && rows(&controlled) > 1e-3);
}

/// ControlNetApplyAdvanced on both prompts: the new (positive, negative).
fn apply(
    setup: &common::Setup,
    conditioning: (&Value, &Value),
    control: &Value,
    image: &Value,
    (strength, start, end): (f64, f64, f64),
) -> (Value, Value) {
    let out = setup
        .call(
            "ControlNetApplyAdvanced",
            vec![
                ("positive", conditioning.0.clone()),
                ("negative", conditioning.1.clone()),
                ("control_net", control.clone()),
                ("image", image.clone()),
                ("strength", j(json!(strength))),
                ("start_percent", j(json!(start))),
                ("end_percent", j(json!(end))),
            ],
        )
        .expect("ControlNetApplyAdvanced");
    (out[0].clone(), out[1].clone())
}

#[test]
fn controlnets_steer_sampling_as_the_apply_nodes_say() {
    let setup = setup();
    let (loaded, positive, negative, latent) = sd1_inputs(&setup, 1);
    let model = &loaded[0];
    let control = setup
        .call(
            "ControlNetLoader",
            vec![("control_net_name", j(json!(TINY_SD1_CONTROLNET)))],
        )
        .expect("ControlNetLoader")
        .remove(0);
    // A hint at another size than the latent's ×8 (the nodes resize it) and its mirror image.
    let hint = |seed| Value::object(common::pattern_image(48, 40, seed));
    let (image, other_image) = (hint(5), hint(6));
    let sample = |positive: &Value, negative: &Value| {
        ksampler(&setup, model, positive, negative, &latent, "euler", 3, 5.0).expect("KSampler")
    };
    let plain = sample(&positive, &negative);
    let sides = (&positive, &negative);

    let (p, n) = apply(&setup, sides, &control, &image, (1.0, 0.0, 1.0));
    let controlled = sample(&p, &n);
    assert!(
        max_abs_difference(&plain, &controlled) > 1e-3,
        "a ControlNet changes the result"
    );
    let (p, n) = apply(&setup, sides, &control, &image, (0.5, 0.0, 1.0));
    let weaker = sample(&p, &n);
    assert!(
        max_abs_difference(&controlled, &weaker) > 1e-4,
        "the strength scales the residuals"
    );

    // Strength 0 and a range no step falls in leave sampling as it was.
    for settings in [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0)] {
        let (p, n) = apply(&setup, sides, &control, &image, settings);
        assert_eq!(max_abs_difference(&plain, &sample(&p, &n)), 0.0, "{settings:?}");
    }
    // A range covering only the first step changes less than the whole range.
    let (p, n) = apply(&setup, sides, &control, &image, (1.0, 0.0, 0.3));
    let early = sample(&p, &n);
    assert!(max_abs_difference(&plain, &early) > 0.0);
    assert!(max_abs_difference(&controlled, &early) > 1e-4);

    // A second ControlNet chains after the first: both residuals count.
    let (p, n) = apply(&setup, sides, &control, &image, (1.0, 0.0, 1.0));
    let (p2, n2) = apply(&setup, (&p, &n), &control, &other_image, (0.7, 0.0, 1.0));
    let chained = sample(&p2, &n2);
    let (p, n) = apply(&setup, sides, &control, &other_image, (0.7, 0.0, 1.0));
    let second_alone = sample(&p, &n);
    assert!(max_abs_difference(&chained, &controlled) > 1e-4);
    assert!(max_abs_difference(&chained, &second_alone) > 1e-4);

    // The old node controls the positive prompt and, through it, the negative one: the same as
    // the advanced node over the whole of sampling.
    let old = setup
        .call(
            "ControlNetApply",
            vec![
                ("conditioning", positive.clone()),
                ("control_net", control.clone()),
                ("image", image.clone()),
                ("strength", j(json!(1.0))),
            ],
        )
        .expect("ControlNetApply")
        .remove(0);
    assert!(max_abs_difference(&controlled, &sample(&old, &negative)) < 1e-6);

    // The AliMama inpainting apply node steers a ControlNet that takes no mask as the advanced
    // node does (the mask is for control models with `concat_mask`).
    let mask = Value::object(easel_nodes::image::Mask {
        batch: 1,
        height: 48,
        width: 40,
        data: common::pattern_values(48 * 40, 3, 0.5)
            .iter()
            .map(|v| v + 0.5)
            .collect(),
    });
    let alimama = setup
        .call(
            "ControlNetInpaintingAliMamaApply",
            vec![
                ("positive", positive.clone()),
                ("negative", negative.clone()),
                ("control_net", control.clone()),
                ("vae", loaded[2].clone()),
                ("image", image.clone()),
                ("mask", mask),
                ("strength", j(json!(1.0))),
                ("start_percent", j(json!(0.0))),
                ("end_percent", j(json!(1.0))),
            ],
        )
        .expect("ControlNetInpaintingAliMamaApply");
    assert!(max_abs_difference(&controlled, &sample(&alimama[0], &alimama[1])) < 1e-6);

    // A CONTROL_NET input takes nothing else.
    let wrong = setup.call(
        "ControlNetApplyAdvanced",
        vec![
            ("positive", positive.clone()),
            ("negative", negative.clone()),
            ("control_net", model.clone()),
            ("image", image.clone()),
            ("strength", j(json!(1.0))),
            ("start_percent", j(json!(0.0))),
            ("end_percent", j(json!(1.0))),
        ],
    );
    assert!(wrong.is_err());
}

/// The tiny SD1 ControlNet's LDM name in diffusers' layout (its two levels of one block each).
fn diffusers_name(ldm: &str) -> String {
    const RESNET: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    let resnet = |tail: &str| {
        RESNET
            .iter()
            .find_map(|(from, to)| tail.strip_prefix(from).map(|rest| format!("{to}{rest}")))
            .expect("a residual block's tensor")
    };
    const PLAIN: [(&str, &str); 10] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("input_blocks.1.1.", "down_blocks.0.attentions.0."),
        ("input_blocks.2.0.op.", "down_blocks.0.downsamplers.0.conv."),
        ("input_blocks.3.1.", "down_blocks.1.attentions.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block_out.0.", "controlnet_mid_block."),
        ("input_hint_block.0.", "controlnet_cond_embedding.conv_in."),
        ("input_hint_block.14.", "controlnet_cond_embedding.conv_out."),
    ];
    const RESNETS: [(&str, &str); 4] = [
        ("input_blocks.1.0.", "down_blocks.0.resnets.0."),
        ("input_blocks.3.0.", "down_blocks.1.resnets.0."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ];
    if let Some(name) = PLAIN
        .iter()
        .find_map(|(from, to)| ldm.strip_prefix(from).map(|rest| format!("{to}{rest}")))
    {
        return name;
    }
    if let Some(name) = RESNETS
        .iter()
        .find_map(|(from, to)| ldm.strip_prefix(from).map(|rest| format!("{to}{}", resnet(rest))))
    {
        return name;
    }
    // A union ControlNet's own parts keep their names but for the fused attention projection.
    let union_parts = [
        "task_embedding",
        "transformer_layes.",
        "spatial_ch_projs.",
        "control_add_embedding.",
    ];
    if union_parts.iter().any(|part| ldm.starts_with(part)) {
        return ldm.replace(".attn.in_proj.", ".attn.in_proj_");
    }
    let (kind, rest) = ldm.split_once('.').expect("a dotted name");
    let (index, tail) = rest.split_once('.').expect("an index");
    let index: usize = index.parse().expect("a number");
    match kind {
        "zero_convs" => format!("controlnet_down_blocks.{index}.{}", tail.trim_start_matches("0.")),
        "input_hint_block" => format!("controlnet_cond_embedding.blocks.{}.{tail}", index / 2 - 1),
        _ => panic!("no diffusers name for {ldm}"),
    }
}

fn tiny_sd1_unet_values(setup: &common::Setup) -> std::collections::HashMap<String, Vec<f32>> {
    common::tiny_model_values(setup, "checkpoints", easel_models::testmodels::TINY_SD1_CHECKPOINT)
        .into_iter()
        .filter_map(|(name, _, values)| Some((name.strip_prefix("model.diffusion_model.")?.to_string(), values)))
        .collect()
}

/// Writes `tensors` (name, shape, values) as an f32 safetensors file.
fn write_f32_file(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors.iter().zip(&bytes).map(|((name, shape, _), bytes)| {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).expect("view");
        (name.clone(), view)
    });
    safetensors::serialize_to_file(views, None, path).expect("written");
}

/// The control model `file` through `loader` (DiffControlNetLoader gets `model`).
fn load_control(setup: &common::Setup, loader: &str, file: &str, model: &Value) -> Value {
    let mut inputs = vec![("control_net_name", j(json!(file)))];
    if loader == "DiffControlNetLoader" {
        inputs.push(("model", model.clone()));
    }
    setup.call(loader, inputs).expect("a control model").remove(0)
}

/// KSampler (euler, 2 steps, cfg 5) on the tiny SD1 model's inputs (`sd1_inputs`) with `control`
/// applied to both prompts over the whole of sampling.
fn sample_controlled(
    setup: &common::Setup,
    (loaded, positive, negative, latent): &(Vec<Value>, Value, Value, Value),
    control: &Value,
    image: &Value,
) -> Tensor {
    let (p, n) = apply(setup, (positive, negative), control, image, (1.0, 0.0, 1.0));
    ksampler(setup, &loaded[0], &p, &n, latent, "euler", 2, 5.0).expect("KSampler")
}

/// A ControlNet saved as a PyTorch pickle (as the original `.pth` releases are) steers sampling
/// as its safetensors twin; a pickle that would call a function is refused, not run.
#[test]
fn pickled_controlnets_steer_sampling_as_their_safetensors_twins() {
    let setup = setup();
    let folder = common::models_folder(&setup, "controlnet");
    let tensors = common::tiny_model_values(&setup, "controlnet", TINY_SD1_CONTROLNET);
    let views: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(name, shape, values)| (name.as_str(), shape.as_slice(), values.as_slice()))
        .collect();
    easel_models::testmodels::write_pth(&folder.join("tiny_controlnet.pth"), &views, Some("state_dict"))
        .expect("pickled");

    let inputs = sd1_inputs(&setup, 1);
    let image = Value::object(common::pattern_image(64, 64, 9));
    let sample_with = |file: &str| {
        let control = load_control(&setup, "ControlNetLoader", file, &inputs.0[0]);
        sample_controlled(&setup, &inputs, &control, &image)
    };
    let from_safetensors = sample_with(TINY_SD1_CONTROLNET);
    let from_pickle = sample_with("tiny_controlnet.pth");
    assert!(max_abs_difference(&from_safetensors, &from_pickle) <= 1e-6);

    common::write_pickle_that_calls_a_function(&folder.join("calls.pth"));
    std::fs::write(folder.join("broken.pth"), b"PK\x03\x04 not a zip").expect("written");
    for (file, expected) in [
        ("calls.pth", "holds no tensors Easel can read"),
        ("broken.pth", "not a PyTorch zip archive Easel can read"),
    ] {
        let error = setup
            .call("ControlNetLoader", vec![("control_net_name", j(json!(file)))])
            .expect_err("refused")
            .to_string();
        assert!(error.contains(expected), "{file}: {error}");
    }
}

/// ControlNets in diffusers' layout steer sampling as their twins in the LDM layout: the tiny
/// SD1 ControlNet, and a union ControlNet of its shape told a control type (its union parts keep
/// their names but for the attention's `in_proj_weight`).
#[test]
fn diffusers_layout_controlnets_steer_sampling_as_their_ldm_twins() {
    let setup = setup();
    let folder = common::models_folder(&setup, "controlnet");
    let union = ControlNetConfig {
        union: Some((8, 32)),
        ..easel_models::testmodels::tiny_sd1_controlnet()
    };
    let union_layout = easel_models::testmodels::controlnet_layout(&union).expect("layout");
    easel_models::testmodels::write_checkpoint(&folder.join("union.safetensors"), &union_layout).expect("written");
    for ldm_file in [TINY_SD1_CONTROLNET, "union.safetensors"] {
        let bytes = std::fs::read(folder.join(ldm_file)).expect("a tiny ControlNet");
        let ldm = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let renamed: Vec<(String, safetensors::tensor::TensorView)> = ldm
            .tensors()
            .into_iter()
            .map(|(name, view)| (diffusers_name(&name), view))
            .collect();
        safetensors::serialize_to_file(renamed, None, &folder.join(format!("diffusers_{ldm_file}"))).expect("written");
    }

    let inputs = sd1_inputs(&setup, 1);
    let image = Value::object(common::pattern_image(64, 64, 9));
    let sample_with = |file: &str| {
        let control = load_control(&setup, "ControlNetLoader", file, &inputs.0[0]);
        let control = setup
            .call(
                "SetUnionControlNetType",
                vec![("control_net", control), ("type", j(json!("depth")))],
            )
            .expect("SetUnionControlNetType")
            .remove(0);
        sample_controlled(&setup, &inputs, &control, &image)
    };
    for ldm_file in [TINY_SD1_CONTROLNET, "union.safetensors"] {
        let from_ldm = sample_with(ldm_file);
        let from_diffusers = sample_with(&format!("diffusers_{ldm_file}"));
        assert_eq!(max_abs_difference(&from_ldm, &from_diffusers), 0.0, "{ldm_file}");
    }
    // The union ControlNet reads its type: "depth" steers it otherwise than "auto" would.
    let auto = sample_controlled(
        &setup,
        &inputs,
        &load_control(&setup, "ControlNetLoader", "union.safetensors", &inputs.0[0]),
        &image,
    );
    assert!(max_abs_difference(&auto, &sample_with("union.safetensors")) > 1e-4);
}

/// Control models Easel cannot run yet are refused by name; a file marked as an SD3 ControlNet
/// without its blocks says what it lacks.
#[test]
fn control_models_easel_cannot_run_yet_are_refused_by_name() {
    let setup = setup();
    let folder = common::models_folder(&setup, "controlnet");
    let one = 1f32.to_le_bytes();
    for (file, tensor, expected) in [
        (
            "cascade.safetensors",
            "backbone.0.0.weight",
            "a Stable Cascade ControlNet is not supported by Easel yet",
        ),
        (
            "hunyuan_controlnet.safetensors",
            "after_proj_list.18.bias",
            "a Hunyuan-DiT ControlNet is not supported by Easel yet",
        ),
        (
            "broken_sd3_controlnet.safetensors",
            "pos_embed_input.proj.weight",
            "is not a diffusers-layout SD3 ControlNet: it has no tensor 'transformer_blocks.0.attn.add_q_proj.weight'",
        ),
        (
            "other.safetensors",
            "encoder.weight",
            "could not detect control model type",
        ),
    ] {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &one).expect("view");
        safetensors::serialize_to_file([(tensor, view)], None, &folder.join(file)).expect("written");
        let error = setup
            .call("ControlNetLoader", vec![("control_net_name", j(json!(file)))])
            .expect_err("refused")
            .to_string();
        assert!(error.contains(expected), "{file}: {error}");
    }
}

/// A "diff" ControlNet (its weights less the UNet's it was made from, under `control_model.`,
/// marked by a `difference` tensor) loaded by DiffControlNetLoader with that model steers
/// sampling as the whole ControlNet does.
#[test]
fn a_diff_controlnet_with_its_model_steers_sampling_as_the_whole_one() {
    let setup = setup();
    let folder = common::models_folder(&setup, "controlnet");
    let unet = tiny_sd1_unet_values(&setup);
    let base = |name: &str| unet.get(name);
    let mut tensors = vec![("difference".to_string(), vec![1], vec![0.0])];
    for (name, shape, mut values) in common::tiny_model_values(&setup, "controlnet", TINY_SD1_CONTROLNET) {
        if let Some(base) = base(&name) {
            values.iter_mut().zip(base).for_each(|(v, b)| *v -= b);
        }
        tensors.push((format!("control_model.{name}"), shape, values));
    }
    write_f32_file(&folder.join("diff_controlnet.safetensors"), &tensors);

    let inputs = sd1_inputs(&setup, 1);
    let image = Value::object(common::pattern_image(64, 64, 8));
    let sample_with = |loader: &str, file: &str| {
        let control = load_control(&setup, loader, file, &inputs.0[0]);
        sample_controlled(&setup, &inputs, &control, &image)
    };
    let from_whole = sample_with("ControlNetLoader", TINY_SD1_CONTROLNET);
    let from_diff = sample_with("DiffControlNetLoader", "diff_controlnet.safetensors");
    assert!(max_abs_difference(&from_whole, &from_diff) < 1e-4);
    // Without the model the differences alone steer it (ComfyUI warns and goes on).
    let diff_alone = sample_with("ControlNetLoader", "diff_controlnet.safetensors");
    assert!(max_abs_difference(&from_whole, &diff_alone) > 1e-3);
    // A whole ControlNet loads through DiffControlNetLoader as through ControlNetLoader.
    let whole_through_diff = sample_with("DiffControlNetLoader", TINY_SD1_CONTROLNET);
    assert_eq!(max_abs_difference(&from_whole, &whole_through_diff), 0.0);
}

/// A union ControlNet against ComfyUI's, with the control type "auto" and with one set
/// (fixture from `fixtures/generate_controlnet_union.py`); a type beyond the model's fails with
/// ComfyUI's message; SetUnionControlNetType sets the type on a copy of the CONTROL_NET.
#[test]
fn union_controlnets_embed_their_control_type_as_comfyuis() {
    let fixture = fixture_json("controlnet_union.json");
    let dir = tempfile::tempdir().expect("temporary directory");
    let net = load(&json!({"name": "union", "weights": fixture["weights"]}), dir.path(), "");
    assert_eq!(net.config().union, Some((8, 320)));
    let x = pattern(&sizes(&fixture["latent"]), 1, 1.0);
    let hint = ((pattern(&sizes(&fixture["hint"]), 3, 1.0) * 0.5).unwrap() + 0.5).unwrap();
    let timesteps = Tensor::new(floats(&fixture["timesteps"]).as_slice(), &Device::Cpu).unwrap();
    let context = pattern(&sizes(&fixture["context"]), 2, 1.0);
    let y = pattern(&[2, fixture["adm"].as_u64().expect("adm") as usize], 4, 1.0);
    let input = |control_type| ControlNetInput {
        x: &x,
        hint: ControlHint::Image(&hint),
        timesteps: &timesteps,
        context: &context,
        y: Some(&y),
        control_type,
    };
    for case in fixture["cases"].as_array().expect("cases") {
        let control_type = case["control_type"].as_u64().map(|t| t as usize);
        let outputs = net.forward(&input(control_type)).expect("forward");
        for (index, (got, expected)) in outputs
            .encoder
            .iter()
            .zip(case["output"].as_array().unwrap())
            .enumerate()
        {
            assert_matches_fixture(&format!("type {control_type:?} output {index}"), got, expected);
        }
        assert_matches_fixture(
            &format!("type {control_type:?} middle"),
            &outputs.middle,
            &case["middle"][0],
        );
    }
    let error = net
        .forward(&input(Some(8)))
        .expect_err("type 8 is beyond the model's")
        .to_string();
    assert!(
        error.contains("is out of range for the number of control types(8) supported"),
        "{error}"
    );

    let setup = setup();
    let control = setup
        .call(
            "ControlNetLoader",
            vec![("control_net_name", j(json!(TINY_SD1_CONTROLNET)))],
        )
        .expect("ControlNetLoader")
        .remove(0);
    let typed = |name: &str| {
        let out = setup
            .call(
                "SetUnionControlNetType",
                vec![("control_net", control.clone()), ("type", j(json!(name)))],
            )
            .expect("SetUnionControlNetType");
        out[0].downcast::<ControlModel>().expect("a CONTROL_NET").control_type
    };
    assert_eq!(typed("canny/lineart/anime_lineart/mlsd"), Some(3));
    assert_eq!(typed("repaint"), Some(7));
    assert_eq!(typed("auto"), None);
    assert_eq!(
        control.downcast::<ControlModel>().unwrap().control_type,
        None,
        "the original is left as it was"
    );
}

/// A control-LoRA (the changes a ControlNet makes to the encoder of the model it controls):
/// built from the sampling model's UNet, its own full tensors over the model's and its `up`·`down`
/// differences added, it steers sampling as the whole ControlNet it encodes.
#[test]
fn a_control_lora_steers_sampling_as_the_controlnet_it_encodes() {
    let setup = setup();
    let folder = common::models_folder(&setup, "controlnet");
    let unet = tiny_sd1_unet_values(&setup);
    let base = |name: &str| unet.get(name).cloned();
    // The reference: the ControlNet with the model's time embedding, which the control-LoRA leaves
    // to the model.
    let mut reference = Vec::new();
    let mut lora = vec![("lora_controlnet".to_string(), vec![1], vec![0.0])];
    for (name, shape, own) in common::tiny_model_values(&setup, "controlnet", TINY_SD1_CONTROLNET) {
        if name.starts_with("time_embed.") {
            let base = base(&name).expect("the model's time embedding");
            reference.push((name, shape, base));
            continue;
        }
        reference.push((name.clone(), shape.clone(), own.clone()));
        match (name.strip_suffix(".weight"), base(&name)) {
            (Some(layer), Some(base)) if shape.len() >= 2 => {
                // up = identity, down = the difference: up·down is exactly the difference.
                let out = shape[0];
                let identity = (0..out * out)
                    .map(|i| if i / out == i % out { 1.0 } else { 0.0 })
                    .collect();
                let up_shape = if shape.len() == 4 {
                    vec![out, out, 1, 1]
                } else {
                    vec![out, out]
                };
                let difference = own.iter().zip(base).map(|(w, b)| w - b).collect();
                lora.push((format!("{layer}.up"), up_shape, identity));
                lora.push((format!("{layer}.down"), shape, difference));
            }
            _ => lora.push((name, shape, own)),
        }
    }
    write_f32_file(&folder.join("reference.safetensors"), &reference);
    write_f32_file(&folder.join("control_lora.safetensors"), &lora);

    let inputs = sd1_inputs(&setup, 1);
    let image = Value::object(common::pattern_image(64, 64, 12));
    let sample_with = |file: &str| {
        let control = load_control(&setup, "ControlNetLoader", file, &inputs.0[0]);
        sample_controlled(&setup, &inputs, &control, &image)
    };
    let from_reference = sample_with("reference.safetensors");
    let from_lora = sample_with("control_lora.safetensors");
    let difference = max_abs_difference(&from_reference, &from_lora);
    assert!(difference < 1e-4, "{difference}");
    let (loaded, positive, negative, latent) = &inputs;
    let plain = ksampler(&setup, &loaded[0], positive, negative, latent, "euler", 2, 5.0).expect("KSampler");
    assert!(
        max_abs_difference(&plain, &from_lora) > 1e-3,
        "the control-LoRA steers sampling"
    );
}
