//! Perp-Neg (PerpNeg, PerpNegGuider) and skip-layer guidance (SkipLayerGuidanceDiT, …Simple)
//! against ComfyUI's own code (fixture from `fixtures/generate_perpneg_slg.py`): the guidance
//! arithmetic on fixed predictions, the model calls it makes, FLUX with blocks replaced; and each
//! node sampling in a graph.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use common::{fixture_json, j, max_abs_difference, pattern, setup, sizes, Setup};
use easel_engine::events::EventKind;
use easel_engine::Value;
use easel_models::architectures::dit_patches::{
    BlockInputs, BlockOutputs, BlockReplace, BlockSite, CallInfo, DitBlock, DitPatchedCall, DitPatches, OriginalBlock,
};
use easel_models::architectures::flux::{Flux, FluxConfig, FluxControl, FluxInput, ReferenceMethod};
use easel_models::architectures::unet_patches::BatchPart;
use easel_models::sampling::schedule::SigmaSchedule;
use easel_models::testmodels::{TINY_CLIP_L, TINY_FLUX_DEV, TINY_SD1_CHECKPOINT, TINY_T5};
use easel_models::weights::{SafetensorsFile, Weights};
use easel_nodes::conditioning::Conditioning;
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::Model;
use easel_nodes::model::guidance::{CfgNorm, FrequencyScaling};
use easel_nodes::model::patches::{CallPatches, GuidanceArgs, GuidanceModel, ModelPatches, Side};
use easel_nodes::model::skip_layer_guidance::{skipped_blocks, skipping, SkipLayerGuidance, SkipLayerGuidanceSimple};
use easel_nodes::sampling::perp_neg::{perp_neg_guidance, perp_neg_sides, PerpNegCfg};
use serde_json::{json, Value as Json};

/// The largest difference from the fixture's numbers, relative to their size where above 1.
fn worst_difference(ours: &Tensor, expected: &Json) -> f32 {
    let expected: Vec<f32> = expected
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let ours = common::flat(ours);
    assert_eq!(ours.len(), expected.len());
    ours.iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0f32, f32::max)
}

/// The fixture's inputs: the latent `x` and the prediction of each conditioning name.
struct Predictions {
    x: Tensor,
    by_name: HashMap<String, Tensor>,
}

impl Predictions {
    fn new(fixture: &Json) -> Self {
        let shape = sizes(&fixture["shape"]);
        let tensor = |spec: &Json| pattern(&shape, spec[0].as_i64().unwrap(), spec[1].as_f64().unwrap() as f32);
        let by_name = fixture["predictions"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, spec)| (name.clone(), tensor(spec)))
            .collect();
        Predictions {
            x: tensor(&fixture["x"]),
            by_name,
        }
    }

    fn get(&self, name: &str) -> Tensor {
        self.by_name[name].clone()
    }
}

/// One model call as the fixture lists them: the conditioning predicted and the blocks skipped.
type Call = (String, Json);

/// The fixture's calls, one per conditioning predicted.
fn fixture_calls(case: &Json) -> Vec<Call> {
    let mut calls = Vec::new();
    for call in case["calls"].as_array().unwrap() {
        for name in call["conds"].as_array().unwrap().iter().filter_map(Json::as_str) {
            calls.push((name.to_string(), call["skipped"].clone()));
        }
    }
    calls
}

/// The blocks as the fixture writes them: `[["double_block", 1], …]`.
fn blocks_json(blocks: &[DitBlock]) -> Json {
    Json::Array(
        blocks
            .iter()
            .map(|block| match block {
                DitBlock::Double(n) => json!(["double_block", n]),
                DitBlock::Single(n) => json!(["single_block", n]),
            })
            .collect(),
    )
}

/// ComfyUI's `calc_cond_batch` stand-in of the generator: a fixed prediction per side (another
/// where blocks are skipped), every call recorded.
struct StandIn<'a> {
    predictions: &'a Predictions,
    calls: Mutex<Vec<Call>>,
}

impl<'a> StandIn<'a> {
    fn new(predictions: &'a Predictions) -> Self {
        StandIn {
            predictions,
            calls: Mutex::new(Vec::new()),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl GuidanceModel for StandIn<'_> {
    fn predict_side(&self, side: Side, _: &Tensor, _: f32, extra: &CallPatches) -> candle_core::Result<Tensor> {
        let name = match side {
            Side::Positive => "positive",
            Side::Negative => "negative",
            Side::Empty => "empty",
            Side::Middle => unreachable!("no middle prompt here"),
        };
        let skipped = extra.dit.blocks();
        self.calls
            .lock()
            .unwrap()
            .push((name.to_string(), blocks_json(&skipped)));
        Ok(self.predictions.get(if skipped.is_empty() { name } else { "skipped" }))
    }

    fn predict_conditioning(&self, _: &Conditioning, _: &Tensor, _: f32) -> candle_core::Result<Tensor> {
        self.calls.lock().unwrap().push(("empty".into(), json!([])));
        Ok(self.predictions.get("empty"))
    }
}

fn args<'a>(
    x: &'a Tensor,
    sigma: f64,
    cond_scale: f64,
    uncond: bool,
    model: &'a dyn GuidanceModel,
) -> GuidanceArgs<'a> {
    GuidanceArgs {
        x,
        sigma: sigma as f32,
        cond_scale,
        cond: Side::Positive,
        uncond: uncond.then_some(Side::Negative),
        model,
    }
}

#[test]
fn perp_neg_cfg_function_gives_comfyuis_result() {
    let fixture = fixture_json("perpneg_slg.json");
    let predictions = Predictions::new(&fixture);
    for case in fixture["perp_neg"].as_array().unwrap() {
        let model = StandIn::new(&predictions);
        let evaluated = case["uncond_evaluated"].as_bool().unwrap();
        let patches = ModelPatches::default().with_cfg(Arc::new(PerpNegCfg {
            empty: Conditioning(Vec::new()),
            neg_scale: case["neg_scale"].as_f64().unwrap(),
        }));
        let args = args(
            &predictions.x,
            2.5,
            case["cond_scale"].as_f64().unwrap(),
            evaluated,
            &model,
        );
        let uncond = match evaluated {
            true => predictions.get("negative"),
            false => predictions.x.zeros_like().unwrap(),
        };
        let out = patches
            .cfg_function(&args, predictions.get("positive"), Some(uncond))
            .unwrap();
        let worst = worst_difference(&out, &case["output"]);
        assert!(worst < 1e-5, "{case}: off by {worst}");
        assert_eq!(model.calls(), fixture_calls(case));
    }
}

#[test]
fn perp_neg_guider_gives_comfyuis_result() {
    let fixture = fixture_json("perpneg_slg.json");
    let predictions = Predictions::new(&fixture);
    for case in fixture["perp_neg_guider"].as_array().unwrap() {
        let (cfg, neg_scale) = (case["cfg"].as_f64().unwrap(), case["neg_scale"].as_f64().unwrap());
        let disable = case["disable_cfg1_optimization"].as_bool().unwrap();
        let (with_negative, with_empty) = perp_neg_sides(cfg, neg_scale, disable);
        let conds = &case["calls"][0]["conds"];
        assert_eq!(
            (conds[1].is_string(), conds[2].is_string()),
            (with_negative, with_empty),
            "{case}"
        );
        let mut patches = ModelPatches {
            disable_cfg1_optimization: disable,
            ..ModelPatches::default()
        };
        if case["fresca"].as_bool().unwrap() {
            patches = patches.with_pre_cfg(Arc::new(FrequencyScaling {
                scale_low: 1.0,
                scale_high: 1.25,
                freq_cutoff: 2,
            }));
        }
        if case["cfg_norm"].as_bool().unwrap() {
            patches = patches.with_post_cfg(Arc::new(CfgNorm { strength: 0.9 }));
        }
        let zeros = predictions.x.zeros_like().unwrap();
        let side = |wanted: bool, name: &str| match wanted {
            true => predictions.get(name),
            false => zeros.clone(),
        };
        let model = StandIn::new(&predictions);
        let args = args(&predictions.x, 1.5, cfg, with_negative, &model);
        let sides = [
            predictions.get("positive"),
            side(with_negative, "negative"),
            side(with_empty, "empty"),
        ];
        let (out, negative) = perp_neg_guidance(&patches, &args, sides, neg_scale).unwrap();
        let worst = worst_difference(&out, &case["output"]);
        assert!(worst < 1e-5, "{case}: off by {worst}");
        assert_eq!(common::flat(&negative), common::flat(&side(with_negative, "negative")));
        assert!(model.calls().is_empty(), "the functions here do not call the model");
    }
}

/// The flux schedule of the generator's model sampling.
fn flux_schedule(fixture: &Json) -> SigmaSchedule {
    SigmaSchedule::flux(fixture["flux_shift"].as_f64().unwrap())
}

/// The σ bounds of a case, checked against the schedule's.
fn sigma_bounds(case: &Json, schedule: &SigmaSchedule) -> (f64, f64) {
    let bound = |percent: &str, sigma: &str| {
        let ours = schedule.percent_to_sigma(case[percent].as_f64().unwrap());
        let theirs = case[sigma].as_f64().unwrap();
        assert!((ours - theirs).abs() < 1e-12, "{percent}: {ours} against {theirs}");
        ours
    };
    (bound("start_percent", "sigma_start"), bound("end_percent", "sigma_end"))
}

#[test]
fn skip_layer_guidance_gives_comfyuis_result() {
    let fixture = fixture_json("perpneg_slg.json");
    let predictions = Predictions::new(&fixture);
    let schedule = flux_schedule(&fixture);
    let (cond, uncond) = (predictions.get("positive"), predictions.get("negative"));
    let cond_scale = 5.0;
    for case in fixture["skip_layer_guidance"].as_array().unwrap() {
        let text = |name: &str| case[name].as_str().unwrap().to_string();
        let blocks = skipped_blocks(&text("double_layers"), &text("single_layers"));
        assert_eq!(!blocks.is_empty(), case["patched"].as_bool().unwrap(), "{case}");
        if blocks.is_empty() {
            continue;
        }
        let (sigma_start, sigma_end) = sigma_bounds(case, &schedule);
        let patches = ModelPatches::default().with_post_cfg(Arc::new(SkipLayerGuidance {
            blocks,
            scale: case["scale"].as_f64().unwrap(),
            rescaling_scale: case["rescaling_scale"].as_f64().unwrap(),
            sigma_start,
            sigma_end,
        }));
        let model = StandIn::new(&predictions);
        let args = args(
            &predictions.x,
            case["sigma"].as_f64().unwrap(),
            cond_scale,
            true,
            &model,
        );
        let out = patches.cfg_function(&args, cond.clone(), Some(uncond.clone())).unwrap();
        let worst = worst_difference(&out, &case["output"]);
        assert!(worst < 1e-5, "{case}: off by {worst}");
        assert_eq!(model.calls(), fixture_calls(case), "{case}");
    }
}

#[test]
fn skip_layer_guidance_simple_gives_comfyuis_result() {
    let fixture = fixture_json("perpneg_slg.json");
    let predictions = Predictions::new(&fixture);
    let schedule = flux_schedule(&fixture);
    for case in fixture["skip_layer_guidance_simple"].as_array().unwrap() {
        let text = |name: &str| case[name].as_str().unwrap().to_string();
        let (sigma_start, sigma_end) = sigma_bounds(case, &schedule);
        let function = SkipLayerGuidanceSimple {
            blocks: skipped_blocks(&text("double_layers"), &text("single_layers")),
            sigma_start,
            sigma_end,
        };
        let evaluated = case["uncond_evaluated"].as_bool().unwrap();
        let model = StandIn::new(&predictions);
        let args = args(&predictions.x, case["sigma"].as_f64().unwrap(), 4.0, evaluated, &model);
        let [cond, uncond] = match easel_nodes::model::patches::CondBatchFunction::predict(&function, &args).unwrap() {
            Some(both) => {
                assert_eq!(model.calls(), fixture_calls(case), "{case}");
                both
            }
            None => {
                // The sampler's own prediction: one unpatched call.
                assert_eq!(case["calls"].as_array().unwrap().len(), 1);
                assert_eq!(case["calls"][0]["skipped"], json!([]));
                let uncond = match evaluated {
                    true => predictions.get("negative"),
                    false => predictions.x.zeros_like().unwrap(),
                };
                [predictions.get("positive"), uncond]
            }
        };
        assert!(worst_difference(&cond, &case["output"][0]) == 0.0, "{case}");
        assert!(worst_difference(&uncond, &case["output"][1]) == 0.0, "{case}");
    }
}

#[test]
fn layer_lists_read_every_run_of_digits() {
    use DitBlock::{Double, Single};
    assert_eq!(skipped_blocks("7, 8, 9", ""), vec![Double(7), Double(8), Double(9)]);
    assert_eq!(
        skipped_blocks("a7b, 12;3", "0x1"),
        vec![Double(7), Double(12), Double(3), Single(0), Single(1)]
    );
    assert_eq!(skipped_blocks("", " , "), vec![]);
    assert_eq!(skipped_blocks("99999999999999999999999", ""), vec![Double(usize::MAX)]);
    assert_eq!(
        skipping(&[Single(2), Double(1)]).dit.blocks(),
        vec![Double(1), Single(2)]
    );
}

/// A replacement that runs the original block on half the image tokens and adds 0.25 to its
/// image output (the generator's `scaled`).
struct HalfThenQuarter;

impl BlockReplace for HalfThenQuarter {
    fn replace(
        &self,
        _: &BlockSite,
        inputs: BlockInputs,
        original: &OriginalBlock,
    ) -> candle_core::Result<BlockOutputs> {
        let out = original(BlockInputs {
            img: (inputs.img * 0.5)?,
            ..inputs
        })?;
        Ok(BlockOutputs {
            img: (out.img + 0.25)?,
            txt: out.txt,
        })
    }
}

/// The fixture's tiny FLUX, its weights filled from the generator's formula, written to a
/// safetensors file and loaded through the loader's code.
fn fixture_flux(flux: &Json) -> (tempfile::TempDir, Flux) {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (index, weight) in flux["weights"].as_array().unwrap().iter().enumerate() {
        let name = weight["name"].as_str().unwrap().to_string();
        let shape = sizes(&weight["shape"]);
        let scale = match shape.len() {
            1 => 0.1f64 as f32,
            _ => (1.0 / (shape[1..].iter().product::<usize>() as f64).sqrt()) as f32,
        };
        let mut values = common::flat(&pattern(&shape, index as i64 + 11, scale));
        if name.ends_with(".scale") {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        tensors.push((name, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views = tensors.iter().map(|(name, shape, bytes)| {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap();
        (name.as_str(), view)
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let file = Arc::new(SafetensorsFile::open(&path).unwrap());
    let config = FluxConfig::infer(file.as_ref(), "").unwrap();
    assert_eq!((config.double_blocks, config.single_blocks), (3, 3));
    let model = Flux::new(config, Weights::from_file(file, DType::F32, &Device::Cpu)).unwrap();
    (dir, model)
}

#[test]
fn flux_blocks_are_replaced_as_comfyuis() {
    let fixture = fixture_json("perpneg_slg.json");
    let flux = &fixture["flux"];
    let (_dir, model) = fixture_flux(flux);
    let latent = sizes(&flux["latent"]);
    let batch = latent[0];
    let x = pattern(&latent, 1, 1.0);
    let context = pattern(&sizes(&flux["context"]), 2, 1.0);
    let y = pattern(&sizes(&flux["vector"]), 3, 1.0);
    let sigma = flux["sigma"].as_f64().unwrap() as f32;
    let timesteps = Tensor::from_vec(vec![sigma; batch], batch, &Device::Cpu).unwrap();
    let guidance = Tensor::from_vec(
        vec![flux["guidance"].as_f64().unwrap() as f32; batch],
        batch,
        &Device::Cpu,
    )
    .unwrap();
    let info = CallInfo {
        original_shape: [latent[0], latent[1], latent[2], latent[3]],
        sigma,
        parts: vec![BatchPart::Cond, BatchPart::Uncond],
    };
    let predict = |patches: Option<&DitPatches>| {
        model
            .forward(&FluxInput {
                x: &x,
                timesteps: &timesteps,
                context: &context,
                y: &y,
                guidance: Some(&guidance),
                concat: None,
                attention_mask: None,
                control: FluxControl::default(),
                image_prompt: None,
                patches: patches.map(|patches| DitPatchedCall { patches, info: &info }),
                reference_latents: &[],
                reference_method: ReferenceMethod::default(),
            })
            .unwrap()
    };
    let unpatched = predict(None);
    for case in flux["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let blocks: Vec<DitBlock> = case["replaced"]
            .as_array()
            .unwrap()
            .iter()
            .map(|block| {
                let index = block[1].as_u64().unwrap() as usize;
                match block[0].as_str().unwrap() {
                    "double_block" => DitBlock::Double(index),
                    _ => DitBlock::Single(index),
                }
            })
            .collect();
        let patches = match name.starts_with("scaled") {
            true => {
                let mut patches = DitPatches::default();
                for block in &blocks {
                    patches.replace(*block, Arc::new(HalfThenQuarter));
                }
                patches
            }
            false => skipping(&blocks).dit,
        };
        let out = predict(Some(&patches));
        let worst = worst_difference(&out, &case["output"]);
        assert!(worst < 1e-5, "{name}: off by {worst}");
        let moved = max_abs_difference(&out, &unpatched);
        match name {
            "none" | "double 7, 8, 9, single 7, 8, 9" => assert_eq!(moved, 0.0, "{name}"),
            _ => assert!(moved > 1e-2, "{name} changes the prediction"),
        }
    }
}

fn call(setup: &Setup, class: &str, inputs: Vec<(&str, Value)>) -> Vec<Value> {
    setup.call(class, inputs).unwrap()
}

fn samples(value: &Value) -> Tensor {
    value.downcast::<Latent>().unwrap().samples.clone()
}

/// The tiny SD1.x model, and a prompt, a negative prompt and an empty one encoded with its CLIP.
fn sd1(setup: &Setup) -> (Value, [Value; 3]) {
    let loaded = call(
        setup,
        "CheckpointLoaderSimple",
        vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
    );
    let encode = |text: &str| {
        call(
            setup,
            "CLIPTextEncode",
            vec![("text", j(json!(text))), ("clip", loaded[1].clone())],
        )
        .remove(0)
    };
    (loaded[0].clone(), [encode("a red house"), encode("blurry"), encode("")])
}

/// A 64×64 empty latent.
fn empty_latent(setup: &Setup) -> Value {
    call(
        setup,
        "EmptyLatentImage",
        vec![
            ("width", j(json!(64))),
            ("height", j(json!(64))),
            ("batch_size", j(json!(1))),
        ],
    )
    .remove(0)
}

/// KSampler on a 64×64 empty latent: euler, 3 karras steps, seed 7.
fn ksampler(setup: &Setup, model: &Value, positive: &Value, negative: &Value, cfg: f64) -> Tensor {
    let latent = empty_latent(setup);
    common::ksampler(setup, model, positive, negative, &latent, "euler", 3, cfg).unwrap()
}

/// SamplerCustomAdvanced with `guider` as `ksampler` samples.
fn sample_guided(setup: &Setup, model: &Value, guider: Value) -> Tensor {
    let latent = empty_latent(setup);
    let noise = call(setup, "RandomNoise", vec![("noise_seed", j(json!(7)))]).remove(0);
    let sampler = call(setup, "KSamplerSelect", vec![("sampler_name", j(json!("euler")))]).remove(0);
    let sigmas = call(
        setup,
        "BasicScheduler",
        vec![
            ("model", model.clone()),
            ("scheduler", j(json!("karras"))),
            ("steps", j(json!(3))),
            ("denoise", j(json!(1.0))),
        ],
    )
    .remove(0);
    samples(
        &call(
            setup,
            "SamplerCustomAdvanced",
            vec![
                ("noise", noise),
                ("guider", guider),
                ("sampler", sampler),
                ("sigmas", sigmas),
                ("latent_image", latent),
            ],
        )[0],
    )
}

fn assert_close(a: &Tensor, b: &Tensor, tolerance: f32, what: &str) {
    let difference = max_abs_difference(a, b);
    assert!(difference < tolerance, "{what}: differ by {difference}");
}

/// PerpNeg through KSampler and PerpNegGuider through SamplerCustomAdvanced sample alike; at
/// neg_scale 0 both are plain CFG from the empty prompt.
#[test]
fn perp_neg_nodes_sample_alike_and_reduce_to_cfg_from_the_empty_prompt() {
    let setup = setup();
    let (model, [positive, negative, empty]) = sd1(&setup);
    let cfg = 6.0;
    let perp_neg = |neg_scale: f64| {
        call(
            &setup,
            "PerpNeg",
            vec![
                ("model", model.clone()),
                ("empty_conditioning", empty.clone()),
                ("neg_scale", j(json!(neg_scale))),
            ],
        )
        .remove(0)
    };
    let guider = |neg_scale: f64| {
        call(
            &setup,
            "PerpNegGuider",
            vec![
                ("model", model.clone()),
                ("positive", positive.clone()),
                ("negative", negative.clone()),
                ("empty_conditioning", empty.clone()),
                ("cfg", j(json!(cfg))),
                ("neg_scale", j(json!(neg_scale))),
            ],
        )
        .remove(0)
    };
    let patched = ksampler(&setup, &perp_neg(1.0), &positive, &negative, cfg);
    let guided = sample_guided(&setup, &model, guider(1.0));
    assert!(common::flat(&patched).iter().all(|v| v.is_finite()));
    assert_close(&patched, &guided, 1e-4, "PerpNeg and PerpNegGuider");
    let plain = ksampler(&setup, &model, &positive, &negative, cfg);
    assert!(max_abs_difference(&patched, &plain) > 1e-3, "Perp-Neg changes sampling");

    let from_empty = ksampler(&setup, &model, &positive, &empty, cfg);
    assert_close(
        &ksampler(&setup, &perp_neg(0.0), &positive, &negative, cfg),
        &from_empty,
        1e-4,
        "PerpNeg at 0",
    );
    assert_close(
        &sample_guided(&setup, &model, guider(0.0)),
        &from_empty,
        1e-4,
        "PerpNegGuider at 0",
    );
}

/// The tiny FLUX dev model and a prompt and a negative prompt encoded with CLIP-L and T5.
fn flux(setup: &Setup) -> (Value, Value, Value) {
    let model = common::tiny_flux_model(setup);
    let clip = call(
        setup,
        "DualCLIPLoader",
        vec![
            ("clip_name1", j(json!(TINY_T5))),
            ("clip_name2", j(json!(TINY_CLIP_L))),
            ("type", j(json!("flux"))),
            ("device", j(json!("default"))),
        ],
    )
    .remove(0);
    let encode = |text: &str| {
        call(
            setup,
            "CLIPTextEncode",
            vec![("text", j(json!(text))), ("clip", clip.clone())],
        )
        .remove(0)
    };
    (model, encode("a red house"), encode("blurry"))
}

fn slg(setup: &Setup, model: &Value, double: &str, single: &str, rescaling_scale: f64) -> Value {
    call(
        setup,
        "SkipLayerGuidanceDiT",
        vec![
            ("model", model.clone()),
            ("double_layers", j(json!(double))),
            ("single_layers", j(json!(single))),
            ("scale", j(json!(3.0))),
            ("start_percent", j(json!(0.0))),
            ("end_percent", j(json!(1.0))),
            ("rescaling_scale", j(json!(rescaling_scale))),
        ],
    )
    .remove(0)
}

fn slg_simple(setup: &Setup, model: &Value, double: &str, single: &str) -> Value {
    call(
        setup,
        "SkipLayerGuidanceDiTSimple",
        vec![
            ("model", model.clone()),
            ("double_layers", j(json!(double))),
            ("single_layers", j(json!(single))),
            ("start_percent", j(json!(0.0))),
            ("end_percent", j(json!(1.0))),
        ],
    )
    .remove(0)
}

/// On FLUX, skipping blocks changes sampling; naming blocks the model lacks does not (but for the
/// batching of the extra prediction); naming none returns the model itself. The simple node at
/// cfg 1 is plain sampling, as it never sees a negative side there.
#[test]
fn skip_layer_guidance_changes_flux_sampling_where_blocks_exist() {
    let setup = setup();
    let (model, positive, negative) = flux(&setup);
    let plain = ksampler(&setup, &model, &positive, &negative, 3.0);
    let scale = max_abs_difference(&plain, &plain.zeros_like().unwrap());
    for patched in [
        slg(&setup, &model, "0", "0", 0.0),
        slg(&setup, &model, "0", "", 0.5),
        slg_simple(&setup, &model, "", "0"),
    ] {
        let sampled = ksampler(&setup, &patched, &positive, &negative, 3.0);
        assert!(common::flat(&sampled).iter().all(|v| v.is_finite()));
        assert!(
            max_abs_difference(&sampled, &plain) > 1e-3 * scale,
            "skipping blocks changes sampling"
        );
    }
    let absent = ksampler(
        &setup,
        &slg(&setup, &model, "7, 8, 9", "7, 8, 9", 0.0),
        &positive,
        &negative,
        3.0,
    );
    assert_close(&absent, &plain, 1e-4 * scale.max(1.0), "blocks the model lacks");
    let unpatched = slg(&setup, &model, "", "none", 0.0);
    assert!(Arc::ptr_eq(
        &unpatched.downcast::<Model>().unwrap().0,
        &model.downcast::<Model>().unwrap().0
    ));
    let at_one = ksampler(&setup, &slg_simple(&setup, &model, "0", "0"), &positive, &negative, 1.0);
    assert_eq!(
        common::flat(&at_one),
        common::flat(&ksampler(&setup, &model, &positive, &negative, 1.0))
    );
}

/// On a UNet the skipped blocks do not exist: SkipLayerGuidanceDiT predicts again to no effect
/// (but for batching), and only its rescaling changes sampling, as in ComfyUI.
#[test]
fn skip_layer_guidance_on_a_unet_only_rescales() {
    let setup = setup();
    let (model, [positive, negative, _]) = sd1(&setup);
    let plain = ksampler(&setup, &model, &positive, &negative, 5.0);
    let scale = max_abs_difference(&plain, &plain.zeros_like().unwrap()).max(1.0);
    let skipped = ksampler(&setup, &slg(&setup, &model, "0", "0", 0.0), &positive, &negative, 5.0);
    assert_close(&skipped, &plain, 1e-4 * scale, "skips on a UNet");
    let simple = ksampler(&setup, &slg_simple(&setup, &model, "0", "0"), &positive, &negative, 5.0);
    assert_close(&simple, &plain, 1e-4 * scale, "simple skips on a UNet");
    let rescaled = ksampler(&setup, &slg(&setup, &model, "0", "0", 0.5), &positive, &negative, 5.0);
    let (moved, batching) = (
        max_abs_difference(&rescaled, &plain),
        max_abs_difference(&skipped, &plain),
    );
    assert!(
        moved > 100.0 * batching.max(1e-6),
        "rescaling moved {moved}, batching {batching}"
    );
}

/// All four nodes in one API-format prompt, as a client would post it: PerpNeg and PerpNegGuider
/// on SD1.x, both skip-layer nodes chained on FLUX; the two Perp-Neg latents saved agree.
#[test]
fn the_nodes_run_in_a_prompt() {
    let setup = setup();
    let prompt = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1_CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "PerpNeg", "inputs": {"model": ["1", 0], "empty_conditioning": ["4", 0], "neg_scale": 1.0}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "seed": 3, "steps": 2, "cfg": 5.0,
              "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
              "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "perp_neg"}},
        "9": {"class_type": "PerpNegGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
              "empty_conditioning": ["4", 0], "cfg": 5.0, "neg_scale": 1.0}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "12": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["9", 0],
               "sampler": ["11", 0], "sigmas": ["12", 0], "latent_image": ["5", 0]}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "perp_neg_guider"}},
        "20": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_FLUX_DEV, "weight_dtype": "default"}},
        "21": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": TINY_T5, "clip_name2": TINY_CLIP_L,
               "type": "flux", "device": "default"}},
        "22": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["21", 0]}},
        "23": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["21", 0]}},
        "24": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "25": {"class_type": "SkipLayerGuidanceDiT", "inputs": {"model": ["20", 0], "double_layers": "0",
               "single_layers": "0", "scale": 3.0, "start_percent": 0.01, "end_percent": 0.15, "rescaling_scale": 0.0}},
        "26": {"class_type": "SkipLayerGuidanceDiTSimple", "inputs": {"model": ["25", 0], "double_layers": "0",
               "single_layers": "", "start_percent": 0.0, "end_percent": 1.0}},
        "27": {"class_type": "KSampler", "inputs": {"model": ["26", 0], "seed": 3, "steps": 2, "cfg": 3.0,
               "sampler_name": "euler", "scheduler": "simple", "positive": ["22", 0], "negative": ["23", 0],
               "latent_image": ["24", 0], "denoise": 1.0}},
        "28": {"class_type": "SaveLatent", "inputs": {"samples": ["27", 0], "filename_prefix": "skip_layer_guidance"}}
    });
    let events = common::run_prompt(&setup, prompt).unwrap();
    assert!(
        events.iter().any(|event| event.kind == EventKind::ExecutionSuccess),
        "{:?}",
        events.iter().map(|event| event.data.to_string()).collect::<Vec<_>>()
    );
    let saved = |prefix: &str| {
        let (shape, values) = common::saved_latent(&setup, &format!("{prefix}_00001_.latent"));
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    };
    assert_close(
        &saved("perp_neg"),
        &saved("perp_neg_guider"),
        1e-4,
        "the saved Perp-Neg latents",
    );
    assert!(common::flat(&saved("skip_layer_guidance"))
        .iter()
        .all(|v| v.is_finite()));
}
