//! HyperTile and TomePatchModel against ComfyUI's own (fixture from
//! `fixtures/generate_hypertile_tome.py`): torch's `randint` draws, ToMe's token matching on its
//! own, both patches inside a tiny SD1-shaped UNet (tiles and merges at the latent's resolution
//! and below, the global generator left where ComfyUI's is), and each node in a sampled graph.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{fixture_json, fixture_unet, floats, pattern, sizes};
use easel_engine::events::EventKind;
use easel_models::architectures::unet::UNetInput;
use easel_models::architectures::unet_patches::{BatchPart, CallInfo, PatchedCall, UNetPatches};
use easel_models::sampling::noise::{
    prepare_noise_and_generator, set_global_generator, with_global_generator, CpuGenerator,
};
use easel_models::testmodels::TINY_SD1_CHECKPOINT;
use easel_nodes::model::hypertile::HyperTile;
use easel_nodes::model::token_merging::{TokenMatching, TokenMerging};
use serde_json::json;
use serde_json::Value as Json;

fn integers(value: &Json) -> Vec<u64> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

/// The next draws of `torch.randint(0, 2**31, (n,))` from this thread's global generator.
fn next_global_draws(count: usize) -> Vec<u64> {
    with_global_generator(|generator| (0..count).map(|_| generator.random_below(1 << 31)).collect())
}

#[test]
fn randint_draws_are_torchs() {
    let fixture = fixture_json("hypertile_tome.json");
    let draws = &fixture["draws"];
    let mut generator = CpuGenerator::new(draws["seed"].as_u64().unwrap());
    let ours: Vec<u64> = integers(&draws["ranges"])
        .into_iter()
        .map(|range| generator.random_below(range))
        .collect();
    assert_eq!(ours, integers(&draws["values"]));
}

#[test]
fn token_matching_merges_and_unmerges_as_comfyui() {
    let fixture = fixture_json("hypertile_tome.json");
    for case in fixture["matching_cases"].as_array().unwrap() {
        let dimension = |name: &str| case[name].as_u64().unwrap() as usize;
        let (batch, height, width, channels) = (
            dimension("batch"),
            dimension("height"),
            dimension("width"),
            dimension("channels"),
        );
        let seed = case["seed"].as_i64().unwrap();
        let metric = pattern(&[batch, height * width, channels], seed, 1.0);
        let mut generator = CpuGenerator::new(seed as u64);
        let merge_count = ((height * width) as f64 * case["ratio"].as_f64().unwrap()) as usize;
        let matching = TokenMatching::new(&metric, width, height, merge_count, &mut generator)
            .unwrap()
            .expect("tokens merge");
        let merged = matching.merge(&metric).unwrap();
        assert_eq!(merged.dims(), sizes(&case["merged_shape"]).as_slice());
        // The destinations' order in the merged sequence is the order of torch's unstable argsort
        // on ComfyUI's side: the rows are compared sorted, and through the round trip.
        let mut rows: Vec<Vec<f32>> = merged.to_vec3::<f32>().unwrap().into_iter().flatten().collect();
        rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let expected_rows: Vec<Vec<f32>> = case["merged_rows_sorted"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        assert_eq!(rows, expected_rows, "merged rows, seed {seed}");
        let round_trip = matching.unmerge(&merged.affine(3.0, -1.0).unwrap()).unwrap();
        assert_eq!(
            common::flat(&round_trip),
            floats(&case["round_trip"]),
            "round trip, seed {seed}"
        );
        let next: Vec<u64> = (0..4).map(|_| generator.random_below(1 << 31)).collect();
        assert_eq!(next, integers(&case["next_draws"]), "draws taken");
        assert!(matching.unmerge(&metric).is_err(), "a sequence of another length");
    }
}

fn patches_for(case: &Json) -> UNetPatches {
    let inputs = &case["inputs"];
    let number = |name: &str| inputs[name].as_u64().unwrap() as usize;
    let mut patches = UNetPatches::default();
    match case["name"].as_str().unwrap() {
        "none" => {}
        "HyperTile" => patches.add(Arc::new(HyperTile::new(
            number("tile_size"),
            number("swap_size"),
            number("max_depth") as u32,
            inputs["scale_depth"].as_bool().unwrap(),
        ))),
        "TomePatchModel" => patches.add(Arc::new(TokenMerging::new(inputs["ratio"].as_f64().unwrap()))),
        other => panic!("no patch for case {other}"),
    }
    patches
}

#[test]
fn hypertile_and_tome_change_the_network_as_comfyuis_do() {
    let fixture = fixture_json("hypertile_tome.json");
    let (_dir, unet) = fixture_unet(&fixture);
    let config = unet.config();
    assert_eq!(
        (config.input_depths.as_slice(), config.middle_depth),
        (&[1, 1, 0][..], Some(1))
    );
    let context_tokens = fixture["context_tokens"].as_u64().unwrap() as usize;
    let context_width = fixture["config"]["context_dim"].as_u64().unwrap() as usize;
    let mut untiled: Vec<Vec<f32>> = Vec::new();
    for case in fixture["network_cases"].as_array().unwrap() {
        let latent = sizes(&case["latent"]);
        let x = pattern(&latent, 1, 1.0);
        let context = pattern(&[latent[0], context_tokens, context_width], 2, 1.0);
        let timesteps = Tensor::new(&floats(&fixture["timesteps"])[..latent[0]], &Device::Cpu).unwrap();
        let patches = patches_for(case);
        let info = CallInfo {
            original_shape: [latent[0], latent[1], latent[2], latent[3]],
            sigma: 1.0,
            parts: vec![BatchPart::Cond],
        };
        // As `prepare_noise`: the global generator seeded, the initial noise drawn from it.
        let seed = case["seed"].as_u64().unwrap();
        set_global_generator(prepare_noise_and_generator(seed, &latent, None).1);
        for (call, expected) in case["outputs"].as_array().unwrap().iter().enumerate() {
            let out = unet
                .forward(&UNetInput {
                    patches: Some(PatchedCall {
                        patches: &patches,
                        info: &info,
                    }),
                    ..UNetInput::new(&x, &timesteps, &context)
                })
                .unwrap();
            let ours = common::flat(&out);
            let worst = ours
                .iter()
                .zip(floats(expected))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 5e-5,
                "{} {} call {call}: off by {worst}",
                case["name"],
                case["inputs"]
            );
            if case["name"] == "none" || case["inputs"]["tile_size"] == 256 {
                untiled.push(ours);
            }
        }
        assert_eq!(
            next_global_draws(4),
            integers(&case["next_draws"]),
            "{} {}: the draws taken",
            case["name"],
            case["inputs"]
        );
    }
    assert_eq!(untiled.len(), 2);
    assert_eq!(untiled[0], untiled[1], "tiles larger than the latent change nothing");
}

/// Checkpoint, prompts, a 64×64 latent, `patch` (a node on the model, if any), KSampler and
/// SaveLatent as `prefix`: the saved latent.
fn sampled_with(setup: &common::Setup, patch: Option<Json>, prefix: &str) -> Vec<f32> {
    let mut prompt = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1_CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a (red:1.2) fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 3, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    });
    if let Some(patch) = patch {
        prompt["5"] = patch;
        prompt["6"]["inputs"]["model"] = json!(["5", 0]);
    }
    let events = common::run_prompt(setup, prompt).unwrap();
    let errors: Vec<String> = events
        .iter()
        .filter(|event| event.kind == EventKind::ExecutionError)
        .map(|event| event.data.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    common::saved_latent(setup, &format!("{prefix}_00001_.latent")).1
}

#[test]
fn hypertile_and_tome_nodes_patch_a_sampled_graph() {
    let setup = common::setup();
    let plain = sampled_with(&setup, None, "plain");
    let hypertile = |tile_size: u32| {
        json!({"class_type": "HyperTile", "inputs": {
            "model": ["1", 0], "tile_size": tile_size, "swap_size": 3, "max_depth": 1, "scale_depth": false}})
    };
    let tome = |ratio: f64| json!({"class_type": "TomePatchModel", "inputs": {"model": ["1", 0], "ratio": ratio}});
    // The tiny SD1 model attends at 8×8 and 4×4 tokens: 32-pixel tiles are 4 latent pixels.
    let tiled = sampled_with(&setup, Some(hypertile(32)), "tiled");
    assert_ne!(tiled, plain, "HyperTile tiles the 8×8 attentions");
    assert!(tiled.iter().all(|v| v.is_finite()));
    assert_eq!(
        sampled_with(&setup, Some(hypertile(32)), "tiled_again"),
        tiled,
        "same seed, same tiles"
    );
    assert_eq!(
        sampled_with(&setup, Some(hypertile(256)), "untiled"),
        plain,
        "one tile is no tiling"
    );
    let merged = sampled_with(&setup, Some(tome(0.5)), "merged");
    assert_ne!(merged, plain, "ToMe merges half the 8×8 tokens");
    assert!(merged.iter().all(|v| v.is_finite()));
    assert_eq!(sampled_with(&setup, Some(tome(0.5)), "merged_again"), merged);
    assert_eq!(
        sampled_with(&setup, Some(tome(0.0)), "unmerged"),
        plain,
        "ratio 0 merges nothing"
    );
}

#[test]
fn hypertile_and_tome_refuse_out_of_range_settings() {
    let setup = common::setup();
    let (loaded, _, _, _) = common::sd1_inputs(&setup, 1);
    let call = |class: &str, inputs: Vec<(&str, Json)>| {
        let mut all = vec![("model", loaded[0].clone())];
        all.extend(inputs.into_iter().map(|(name, value)| (name, common::j(value))));
        setup.call(class, all)
    };
    let hypertile = |max_depth: i64| {
        call(
            "HyperTile",
            vec![
                ("tile_size", json!(256)),
                ("swap_size", json!(2)),
                ("max_depth", json!(max_depth)),
                ("scale_depth", json!(false)),
            ],
        )
    };
    assert!(hypertile(0).is_ok());
    let error = hypertile(11).unwrap_err();
    assert!(error.to_string().contains("max_depth"), "{error}");
    assert!(call("TomePatchModel", vec![("ratio", json!(1.5))]).is_err());
    assert!(call("TomePatchModel", vec![("ratio", json!(0.3))]).is_ok());
}
