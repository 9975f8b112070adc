//! The model-patch system: guidance functions, UNet patches and SelfAttentionGuidance against
//! ComfyUI's own (fixtures from `fixtures/generate_guidance.py`, `generate_unet_patches.py` and
//! `generate_sag.py`), their order.

mod common;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use common::{fixture_json, fixture_unet, floats, j, pattern, pattern_values, sizes};
use easel_engine::Value;
use easel_models::architectures::unet::UNetInput;
use easel_models::architectures::unet_patches::{
    AttentionKind, AttentionSite, BatchPart, CallInfo, PatchedCall, UNetPatch, UNetPatches,
};
use easel_nodes::conditioning::Conditioning;
use easel_nodes::image::resample::ResizeMethod;
use easel_nodes::model::block_patches::{DeepShrink, FreeU, FreeUScales};
use easel_nodes::model::guidance::{
    AdaptiveProjectedGuidance, CfgNorm, CfgZeroStar, EpsilonScaling, FrequencyScaling, Mahiro, PerturbedAttention,
    RescaleCfg, TangentialDamping,
};
use easel_nodes::model::patches::{CallPatches, GuidanceArgs, GuidanceModel, ModelPatches, Side};
use easel_nodes::model::self_attention_guidance::{attention_with_map, blur_where_attended};
use serde_json::json;
use serde_json::Value as Json;

/// Guidance functions here never call the model again.
struct NoModel;

impl GuidanceModel for NoModel {
    fn predict_side(&self, _: Side, _: &Tensor, _: f32, _: &CallPatches) -> candle_core::Result<Tensor> {
        unreachable!("these guidance functions do not call the model")
    }

    fn predict_conditioning(&self, _: &Conditioning, _: &Tensor, _: f32) -> candle_core::Result<Tensor> {
        unreachable!("these guidance functions do not call the model")
    }
}

fn patches_for(case: &Json) -> ModelPatches {
    let inputs = &case["inputs"];
    let float = |name: &str| inputs[name].as_f64().unwrap();
    let none = ModelPatches::default();
    match case["name"].as_str().unwrap() {
        "none" => none,
        "RescaleCFG" => none.with_cfg(Arc::new(RescaleCfg {
            multiplier: float("multiplier"),
        })),
        "CFGZeroStar" => none.with_post_cfg(Arc::new(CfgZeroStar)),
        "CFGNorm" => none.with_post_cfg(Arc::new(CfgNorm {
            strength: float("strength"),
        })),
        "Mahiro" => none.with_post_cfg(Arc::new(Mahiro)),
        "Epsilon Scaling" => none.with_post_cfg(Arc::new(EpsilonScaling {
            factor: float("scaling_factor"),
        })),
        "APG" => none.with_pre_cfg(Arc::new(AdaptiveProjectedGuidance {
            eta: float("eta"),
            norm_threshold: float("norm_threshold"),
            momentum: float("momentum"),
            state: Mutex::new((None, None)),
        })),
        "TCFG" => none.with_pre_cfg(Arc::new(TangentialDamping)),
        "FreSca" => none.with_pre_cfg(Arc::new(FrequencyScaling {
            scale_low: float("scale_low") as f32,
            scale_high: float("scale_high") as f32,
            freq_cutoff: inputs["freq_cutoff"].as_u64().unwrap() as usize,
        })),
        "TCFG, RescaleCFG, CFGZeroStar, Epsilon Scaling" => none
            .with_pre_cfg(Arc::new(TangentialDamping))
            .with_cfg(Arc::new(RescaleCfg { multiplier: 0.5 }))
            .with_post_cfg(Arc::new(CfgZeroStar))
            .with_post_cfg(Arc::new(EpsilonScaling { factor: 1.01 })),
        other => panic!("no patch for case {other}"),
    }
}

#[test]
fn guidance_functions_give_comfyuis_results() {
    let fixture = fixture_json("guidance.json");
    let shape: Vec<usize> = sizes(&fixture["shape"]);
    let input = |name: &str| {
        let spec = &fixture["inputs"][name];
        pattern(&shape, spec[0].as_i64().unwrap(), spec[1].as_f64().unwrap() as f32)
    };
    let (x, cond, uncond) = (input("x"), input("cond"), input("uncond"));
    for case in fixture["cases"].as_array().unwrap() {
        let patches = patches_for(case);
        let evaluated = case["uncond_evaluated"].as_bool().unwrap();
        let mut output = None;
        for step in 0..case["steps"].as_u64().unwrap() {
            let sigma = case["sigma"].as_f64().unwrap() * 0.7f64.powi(step as i32);
            let args = GuidanceArgs {
                x: &x,
                sigma: sigma as f32,
                cond_scale: case["cond_scale"].as_f64().unwrap(),
                cond: Side::Positive,
                uncond: evaluated.then_some(Side::Negative),
                model: &NoModel,
            };
            let negative = match evaluated {
                true => uncond.clone(),
                false => uncond.zeros_like().unwrap(),
            };
            let [c, u] = patches.apply_pre_cfg(&args, [cond.clone(), negative]).unwrap();
            output = Some(patches.cfg_function(&args, c, Some(u)).unwrap());
        }
        let ours = common::flat(&output.unwrap());
        let expected: Vec<f32> = floats(&case["output"]);
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(worst < 2e-5, "{} {}: off by {worst}", case["name"], case["inputs"]);
    }
}

fn unet_patches_for(case: &Json, fixture: &Json) -> UNetPatches {
    let shrink = |after_skip: bool, down: ResizeMethod, up: ResizeMethod| -> Arc<dyn UNetPatch> {
        Arc::new(DeepShrink {
            block: 1,
            factor: 2.0,
            sigma_start: fixture["sigma_start"].as_f64().unwrap(),
            sigma_end: fixture["sigma_end"].as_f64().unwrap(),
            after_skip,
            downscale: down,
            upscale: up,
        })
    };
    let freeu = |adaptive: bool, b1: f64, b2: f64| -> Arc<dyn UNetPatch> {
        Arc::new(FreeU {
            model_channels: 32,
            scales: [
                FreeUScales {
                    backbone: b1,
                    skip: 0.9,
                },
                FreeUScales {
                    backbone: b2,
                    skip: 0.2,
                },
            ],
            adaptive,
        })
    };
    let mut patches = UNetPatches::default();
    let index = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c == case)
        .unwrap();
    match (case["name"].as_str().unwrap(), index) {
        ("none", _) => {}
        ("FreeU", _) => patches.add(freeu(false, 1.1, 1.2)),
        ("FreeU_V2", _) => patches.add(freeu(true, 1.3, 1.4)),
        ("PatchModelAddDownscale", 4) => patches.add(shrink(false, ResizeMethod::Area, ResizeMethod::NearestExact)),
        ("PatchModelAddDownscale", _) => patches.add(shrink(true, ResizeMethod::Bicubic, ResizeMethod::Bilinear)),
        ("perturbed attention", _) => patches = PerturbedAttention::perturbed_patches(),
        ("FreeU, PatchModelAddDownscale", _) => {
            patches.add(freeu(false, 1.1, 1.2));
            patches.add(shrink(true, ResizeMethod::Bicubic, ResizeMethod::Bilinear));
        }
        (other, _) => panic!("no patches for case {other}"),
    }
    patches
}

#[test]
fn unet_patches_change_the_network_as_comfyuis_do() {
    let fixture = fixture_json("unet_patches.json");
    let (_dir, unet) = fixture_unet(&fixture);
    assert_eq!(unet.config().channel_mult, vec![1, 2, 4]);
    let (latent, context_shape) = (sizes(&fixture["latent"]), sizes(&fixture["context"]));
    let x = Tensor::from_vec(
        pattern_values(latent.iter().product(), 1, 1.0),
        latent.as_slice(),
        &Device::Cpu,
    )
    .unwrap();
    let context = Tensor::from_vec(
        pattern_values(context_shape.iter().product(), 2, 1.0),
        context_shape.as_slice(),
        &Device::Cpu,
    )
    .unwrap();
    let timesteps = Tensor::new(&[700f32, 120.0], &Device::Cpu).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let patches = unet_patches_for(case, &fixture);
        let info = CallInfo {
            original_shape: [latent[0], latent[1], latent[2], latent[3]],
            sigma: case["sigma"].as_f64().unwrap() as f32,
            parts: vec![BatchPart::Cond],
        };
        let out = unet
            .forward(&UNetInput {
                patches: Some(PatchedCall {
                    patches: &patches,
                    info: &info,
                }),
                ..UNetInput::new(&x, &timesteps, &context)
            })
            .unwrap();
        let expected: Vec<f32> = floats(&case["output"]);
        let ours = common::flat(&out);
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{}: off by {worst}", case["name"]);
    }
}

/// Records the hook points it is called at.
struct Recorder {
    name: &'static str,
    calls: Arc<Mutex<Vec<String>>>,
}

impl UNetPatch for Recorder {
    fn input_block(&self, _: &CallInfo, index: usize, h: Tensor) -> candle_core::Result<Tensor> {
        self.calls.lock().unwrap().push(format!("{} input {index}", self.name));
        Ok(h)
    }

    fn output_block(
        &self,
        _: &CallInfo,
        index: usize,
        h: Tensor,
        skip: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.calls.lock().unwrap().push(format!("{} output {index}", self.name));
        Ok((h, skip))
    }

    fn attention_output(
        &self,
        kind: AttentionKind,
        site: &AttentionSite,
        output: Tensor,
    ) -> candle_core::Result<Tensor> {
        self.calls.lock().unwrap().push(format!(
            "{} {kind:?} {:?}.{} #{}",
            self.name, site.block, site.block_index, site.transformer_index
        ));
        Ok(output)
    }
}

#[test]
fn unet_patches_run_in_the_order_added_at_every_hook_point() {
    let fixture = fixture_json("unet_patches.json");
    let (_dir, unet) = fixture_unet(&fixture);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut patches = UNetPatches::default();
    for name in ["first", "second"] {
        patches.add(Arc::new(Recorder {
            name,
            calls: calls.clone(),
        }));
    }
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let context = Tensor::zeros((1, 3, 32), DType::F32, &Device::Cpu).unwrap();
    let timesteps = Tensor::new(&[10f32], &Device::Cpu).unwrap();
    let info = CallInfo {
        original_shape: [1, 4, 8, 8],
        sigma: 1.0,
        parts: vec![BatchPart::Uncond],
    };
    unet.forward(&UNetInput {
        patches: Some(PatchedCall {
            patches: &patches,
            info: &info,
        }),
        ..UNetInput::new(&x, &timesteps, &context)
    })
    .unwrap();
    let calls = calls.lock().unwrap().clone();
    // Six input blocks, six output blocks, and 2 attentions in each of the 7 transformers, each
    // hook point calling both patches in order.
    assert_eq!(calls.len(), 2 * (6 + 6 + 7 * 2));
    for pair in calls.chunks(2) {
        assert!(
            pair[0].starts_with("first ") && pair[1].starts_with("second "),
            "{pair:?}"
        );
        assert_eq!(pair[0]["first ".len()..], pair[1]["second ".len()..]);
    }
    let firsts: Vec<&str> = calls.iter().step_by(2).map(|c| &c["first ".len()..]).collect();
    assert_eq!(
        &firsts[..5],
        [
            "input 0",
            "input 1",
            "input 2",
            "SelfAttention Input(3).0 #0",
            "CrossAttention Input(3).0 #0"
        ]
    );
    assert!(firsts.contains(&"SelfAttention Middle.0 #2"));
    // Output block patches run before their block: ComfyUI's `transformer_depth_output` lists
    // the decoder from its last block, so here blocks 2 to 5 have attention.
    assert_eq!(
        &firsts[firsts.len() - 3..],
        [
            "output 5",
            "SelfAttention Output(5).0 #6",
            "CrossAttention Output(5).0 #6"
        ]
    );
    assert!(firsts.contains(&"CrossAttention Output(3).0 #4"));
}

#[test]
fn patch_nodes_change_sampling_without_touching_the_model_they_patch() {
    let setup = common::setup();
    let (loaded, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let model = &loaded[0];
    let sample =
        |model: &Value| common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 3, 5.0).unwrap();
    let patched = |class: &str, inputs: Vec<(&str, Json)>| -> Value {
        let mut all = vec![("model", model.clone())];
        all.extend(inputs.into_iter().map(|(name, value)| (name, j(value))));
        setup.call(class, all).unwrap()[0].clone()
    };
    let plain = common::flat(&sample(model));
    let unchanged = patched("PerturbedAttentionGuidance", vec![("scale", json!(0.0))]);
    assert_eq!(common::flat(&sample(&unchanged)), plain, "PAG at scale 0 is plain CFG");
    let factors = || {
        vec![
            ("b1", json!(1.3)),
            ("b2", json!(1.4)),
            ("s1", json!(0.9)),
            ("s2", json!(0.2)),
        ]
    };
    let cases: Vec<(&str, Vec<(&str, Json)>)> = vec![
        ("RescaleCFG", vec![("multiplier", json!(0.7))]),
        ("CFGZeroStar", vec![]),
        ("CFGNorm", vec![("strength", json!(1.0))]),
        ("Mahiro", vec![]),
        ("Epsilon Scaling", vec![("scaling_factor", json!(1.005))]),
        (
            "APG",
            vec![
                ("eta", json!(0.5)),
                ("norm_threshold", json!(5.0)),
                ("momentum", json!(0.5)),
            ],
        ),
        ("TCFG", vec![]),
        (
            "FreSca",
            vec![
                ("scale_low", json!(1.0)),
                ("scale_high", json!(1.25)),
                ("freq_cutoff", json!(2)),
            ],
        ),
        ("PerturbedAttentionGuidance", vec![("scale", json!(3.0))]),
        ("FreeU", factors()),
        ("FreeU_V2", factors()),
        (
            "PatchModelAddDownscale",
            vec![
                ("block_number", json!(1)),
                ("downscale_factor", json!(2.0)),
                ("start_percent", json!(0.0)),
                ("end_percent", json!(0.35)),
                ("downscale_after_skip", json!(true)),
                ("downscale_method", json!("bicubic")),
                ("upscale_method", json!("bicubic")),
            ],
        ),
    ];
    for (class, inputs) in cases {
        let out = common::flat(&sample(&patched(class, inputs)));
        assert!(out.iter().all(|v| v.is_finite()), "{class}");
        assert_ne!(out, plain, "{class} changes the sampled latent");
    }
    assert_eq!(
        common::flat(&sample(model)),
        plain,
        "the base model is not changed by its patches"
    );
}

#[test]
fn unet_patches_refuse_a_flux_model() {
    let setup = common::setup();
    let flux = common::tiny_flux_model(&setup);
    let error = setup
        .call(
            "FreeU",
            vec![
                ("model", flux),
                ("b1", j(json!(1.1))),
                ("b2", j(json!(1.2))),
                ("s1", j(json!(0.9))),
                ("s2", j(json!(0.2))),
            ],
        )
        .expect_err("FreeU refuses FLUX");
    assert!(error.to_string().contains("no UNet"), "{error}");
}

#[test]
fn self_attention_guidance_blurs_where_comfyuis_does() {
    let fixture = fixture_json("sag.json");
    for case in fixture["cases"].as_array().unwrap() {
        let number = |name: &str| case[name].as_u64().unwrap() as usize;
        let latent: Vec<usize> = sizes(&case["latent"]);
        let (tokens, heads, width, seed) = (
            number("tokens"),
            number("heads"),
            number("width"),
            number("seed") as i64,
        );
        let qkv_shape = [latent[0], tokens, width];
        let q = pattern(&qkv_shape, seed, 2.0);
        let k = pattern(&qkv_shape, seed + 1, 2.0);
        let v = pattern(&qkv_shape, seed + 2, 1.0);
        let x0 = pattern(&latent, seed + 3, 1.5);
        let (out, map) = attention_with_map(&q, &k, &v, heads).unwrap();
        let expect = |name: &str, ours: &Tensor| {
            let expected: Vec<f32> = floats(&case[name]);
            let worst = common::flat(ours)
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{name}: off by {worst}");
        };
        expect("attention", &out);
        let blurred = blur_where_attended(&x0, &map, case["sigma"].as_f64().unwrap()).unwrap();
        expect("blurred", &blurred);
    }
}

#[test]
fn self_attention_guidance_changes_sampling_and_is_plain_cfg_at_scale_zero() {
    let setup = common::setup();
    let (loaded, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let sample =
        |model: &Value| common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 3, 5.0).unwrap();
    let sag = |scale: f64| {
        setup
            .call(
                "SelfAttentionGuidance",
                vec![
                    ("model", loaded[0].clone()),
                    ("scale", j(json!(scale))),
                    ("blur_sigma", j(json!(2.0))),
                ],
            )
            .unwrap()
            .remove(0)
    };
    let plain = sample(&loaded[0]);
    // At scale 0 only the middle attention's arithmetic differs (plain softmax, not the kernel).
    let unscaled = sample(&sag(0.0));
    let scale = plain.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let moved = common::max_abs_difference(&unscaled, &plain);
    assert!(moved < 1e-5 * scale.max(1.0), "moved {moved} of {scale}");
    let guided = sample(&sag(0.8));
    assert!(common::flat(&guided).iter().all(|v| v.is_finite()));
    assert!(common::max_abs_difference(&guided, &plain) > 1e-3);
}
