//! EasyCache and LazyCache against ComfyUI's own (fixture from
//! `fixtures/generate_easycache.py`: the steps whose network calls ran and the sampled latent,
//! on a tiny formula-filled SD1 UNet loaded through UNETLoader), the network wrappers' order,
//! and graph runs in which one cached MODEL feeds two samplers.

mod common;

use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use common::{fixture_json, formula_unet_file, j, pattern_values, sizes, Setup};
use easel_engine::events::EventKind;
use easel_engine::Value;
use easel_models::architectures::unet_patches::BatchPart;
use easel_models::testmodels::TINY_SD1_CHECKPOINT;
use easel_nodes::conditioning::{CondEntry, Conditioning};
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::{DiffusionModel, DiffusionNetwork, Model};
use easel_nodes::model::wrappers::{NetworkCall, NetworkWrapper, WrappedNetwork};
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};

/// The fixture's UNet (generate_unet_patches.py's weight formula) written as a bare SD1 UNet
/// file in the models' `diffusion_models` folder, under `name`.
fn write_formula_unet(setup: &Setup, fixture: &Json, name: &str) {
    let folder = setup.services.get::<Paths>().unwrap().models.join("diffusion_models");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join(name), formula_unet_file(fixture)).unwrap();
}

/// The network calls made: σ and the batch's chunks (0 conditional, 1 not).
type CallLog = Arc<Mutex<Vec<(f32, Vec<u8>)>>>;

/// Records the network calls that reach it.
struct CallRecorder {
    calls: CallLog,
}

impl NetworkWrapper for CallRecorder {
    fn wrap(&self, call: &NetworkCall, network: &WrappedNetwork) -> candle_core::Result<Tensor> {
        let parts = call
            .parts
            .iter()
            .map(|part| u8::from(*part == BatchPart::Uncond))
            .collect();
        self.calls.lock().unwrap().push((call.sigma, parts));
        network(call.input)
    }
}

/// `model` with `wrapper` added inside its network wrappers.
fn with_wrapper(model: &Value, wrapper: Arc<dyn NetworkWrapper>) -> Value {
    let model = model.downcast::<Model>().unwrap();
    Value::object(Model(Arc::new(DiffusionModel {
        patches: model.0.patches.with_network_wrapper(wrapper),
        ..(*model.0).clone()
    })))
}

/// A CONDITIONING of one entry whose text embedding is the pattern of `shape` and `seed`.
fn conditioning(shape: &[usize], seed: i64) -> Value {
    let values = pattern_values(shape.iter().product(), seed, 1.0);
    let tensor = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
    Value::object(Conditioning(vec![CondEntry::new(tensor, None)]))
}

#[test]
fn caches_skip_the_steps_comfyuis_skip_and_sample_the_same_latent() {
    let fixture = fixture_json("easycache.json");
    let setup = common::setup();
    write_formula_unet(&setup, &fixture, "formula_unet.safetensors");
    let unet = setup
        .call(
            "UNETLoader",
            vec![
                ("unet_name", j(json!("formula_unet.safetensors"))),
                ("weight_dtype", j(json!("default"))),
            ],
        )
        .unwrap()
        .remove(0);
    let context = sizes(&fixture["context"]);
    let seeds = &fixture["context_seeds"];
    let positive = conditioning(&context, seeds[0].as_i64().unwrap());
    let negative = conditioning(&context, seeds[1].as_i64().unwrap());
    let latent_size = sizes(&fixture["latent"]);
    for case in fixture["cases"].as_array().unwrap() {
        let node = case["node"].as_str().unwrap();
        let label = format!(
            "{node} cfg {} batch {} threshold {}",
            case["cfg"], case["batch"], case["reuse_threshold"]
        );
        let model = match node {
            "none" => unet.clone(),
            class => setup
                .call(
                    class,
                    vec![
                        ("model", unet.clone()),
                        ("reuse_threshold", j(case["reuse_threshold"].clone())),
                        ("start_percent", j(case["start_percent"].clone())),
                        ("end_percent", j(case["end_percent"].clone())),
                        ("verbose", j(json!(true))),
                    ],
                )
                .unwrap()
                .remove(0),
        };
        let calls = Arc::new(Mutex::new(Vec::new()));
        let model = with_wrapper(&model, Arc::new(CallRecorder { calls: calls.clone() }));
        let latent = setup
            .call(
                "EmptyLatentImage",
                vec![
                    ("width", j(json!(latent_size[2] * 8))),
                    ("height", j(json!(latent_size[1] * 8))),
                    ("batch_size", j(case["batch"].clone())),
                ],
            )
            .unwrap()
            .remove(0);
        let sampled = setup
            .call(
                "KSampler",
                vec![
                    ("model", model),
                    ("seed", j(fixture["seed"].clone())),
                    ("steps", j(fixture["steps"].clone())),
                    ("cfg", j(case["cfg"].clone())),
                    ("sampler_name", j(fixture["sampler"].clone())),
                    ("scheduler", j(fixture["scheduler"].clone())),
                    ("positive", positive.clone()),
                    ("negative", negative.clone()),
                    ("latent_image", latent),
                    ("denoise", j(json!(1.0))),
                ],
            )
            .unwrap();
        let samples = &sampled[0].downcast::<Latent>().unwrap().samples;

        // The same steps ran, with the same chunks (ComfyUI batches the sides in the other
        // order: compared as sets).
        let ours: Vec<(f32, Vec<u8>)> = calls.lock().unwrap().clone();
        let theirs: Vec<(f32, Vec<u8>)> = case["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|call| {
                (
                    call[0].as_f64().unwrap() as f32,
                    serde_json::from_value(call[1].clone()).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{label}: calls {ours:?}, ComfyUI's {theirs:?}"
        );
        for ((sigma, parts), (their_sigma, their_parts)) in ours.iter().zip(&theirs) {
            assert!(
                (sigma - their_sigma).abs() <= 1e-5 * their_sigma.max(1.0),
                "{label}: σ {sigma} vs {their_sigma}"
            );
            let (mut parts, mut their_parts) = (parts.clone(), their_parts.clone());
            parts.sort();
            their_parts.sort();
            assert_eq!(parts, their_parts, "{label} at σ {sigma}");
        }

        let expected = common::f32_values(&case["samples"]);
        assert_eq!(samples.dims(), common::shape(&case["samples"]).as_slice(), "{label}");
        // Float32 rounding (a few parts in a million of the latent's largest value, which is
        // about 300 here: the formula's network is far from a trained one).
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = common::flat(samples)
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{label}: off by {worst} of {scale}");
        assert!(worst <= 2e-5 * scale, "{label}: off by {worst} of {scale}");
    }
}

/// Records entering and leaving a network call under its name.
struct OrderRecorder {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

impl NetworkWrapper for OrderRecorder {
    fn wrap(&self, call: &NetworkCall, network: &WrappedNetwork) -> candle_core::Result<Tensor> {
        self.log.lock().unwrap().push(format!("enter {}", self.name));
        let doubled = (call.input * 2.0)?;
        let out = network(&doubled);
        self.log.lock().unwrap().push(format!("leave {}", self.name));
        out
    }
}

#[test]
fn network_wrappers_nest_in_the_order_added_and_may_change_the_input() {
    let setup = common::setup();
    let (loaded, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let log = Arc::new(Mutex::new(Vec::new()));
    let first = with_wrapper(
        &loaded[0],
        Arc::new(OrderRecorder {
            name: "first",
            log: log.clone(),
        }),
    );
    let both = with_wrapper(
        &first,
        Arc::new(OrderRecorder {
            name: "second",
            log: log.clone(),
        }),
    );
    let plain = common::ksampler(&setup, &loaded[0], &positive, &negative, &latent, "euler", 2, 1.0).unwrap();
    let wrapped = common::ksampler(&setup, &both, &positive, &negative, &latent, "euler", 2, 1.0).unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2 * 4, "two steps at cfg 1, one call each: {log:?}");
    for call in log.chunks(4) {
        assert_eq!(call, ["enter first", "enter second", "leave second", "leave first"]);
    }
    assert_ne!(
        common::flat(&plain),
        common::flat(&wrapped),
        "the wrappers' input reached the network"
    );
}

/// Checkpoint, prompts, a 64×64 latent, the model through `cache` (a node, if any), and two
/// KSamplers sharing that model, each saved with SaveLatent: the two saved latents.
fn sampled_twice(setup: &Setup, cache: Option<Json>, prefix: &str) -> [Vec<f32>; 2] {
    let sampler = |seed: u64| {
        json!({"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": seed, "steps": 8, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}})
    };
    let mut prompt = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1_CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a (red:1.2) fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": sampler(7),
        "7": sampler(7),
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": format!("{prefix}_a")}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": format!("{prefix}_b")}},
    });
    match cache {
        Some(cache) => prompt["5"] = cache,
        None => {
            prompt["6"]["inputs"]["model"] = json!(["1", 0]);
            prompt["7"]["inputs"]["model"] = json!(["1", 0]);
        }
    }
    let events = common::run_prompt(setup, prompt).unwrap();
    let errors: Vec<String> = events
        .iter()
        .filter(|event| event.kind == EventKind::ExecutionError)
        .map(|event| event.data.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    ["a", "b"].map(|which| common::saved_latent(setup, &format!("{prefix}_{which}_00001_.latent")).1)
}

#[test]
fn a_cached_model_feeding_two_samplers_starts_each_run_afresh() {
    let setup = common::setup();
    let [plain, _] = sampled_twice(&setup, None, "plain");
    for class in ["EasyCache", "LazyCache"] {
        let cache = json!({"class_type": class, "inputs": {
            "model": ["1", 0], "reuse_threshold": 3.0, "start_percent": 0.0, "end_percent": 1.0,
            "verbose": false}});
        let [first, second] = sampled_twice(&setup, Some(cache), class);
        assert!(first.iter().all(|v| v.is_finite()), "{class}");
        assert_eq!(
            first, second,
            "{class}: the second sampler starts without the first one's state"
        );
        assert_ne!(first, plain, "{class} skips steps at threshold 3");
    }
}

#[test]
fn easycache_wraps_flux_calls_too() {
    let setup = common::setup();
    let flux = common::tiny_flux_model(&setup);
    let (context_dim, vector_dim) = match &flux.downcast::<Model>().unwrap().0.network {
        DiffusionNetwork::Flux(network) => (network.config().context_dim, network.config().vector_dim),
        _ => panic!("the tiny FLUX file loads as FLUX"),
    };
    let pattern = |shape: &[usize], seed: i64| {
        Tensor::from_vec(pattern_values(shape.iter().product(), seed, 1.0), shape, &Device::Cpu).unwrap()
    };
    let prompt = Value::object(Conditioning(vec![CondEntry::new(
        pattern(&[1, 4, context_dim], 5),
        Some(pattern(&[1, vector_dim], 6)),
    )]));
    let latent = common::empty_latent(&setup, 64, 64, 1);
    let sample = |model: &Value| {
        let calls: CallLog = Arc::new(Mutex::new(Vec::new()));
        let model = with_wrapper(model, Arc::new(CallRecorder { calls: calls.clone() }));
        let out = common::ksampler(&setup, &model, &prompt, &prompt, &latent, "euler", 8, 1.0).unwrap();
        let count = calls.lock().unwrap().len();
        (common::flat(&out), count)
    };
    let (plain, plain_calls) = sample(&flux);
    assert_eq!(plain_calls, 8);
    let cached = setup
        .call(
            "EasyCache",
            vec![
                ("model", flux.clone()),
                ("reuse_threshold", j(json!(3.0))),
                ("start_percent", j(json!(0.0))),
                ("end_percent", j(json!(1.0))),
                ("verbose", j(json!(false))),
            ],
        )
        .unwrap()
        .remove(0);
    let (sampled, calls) = sample(&cached);
    assert!(
        calls < plain_calls,
        "EasyCache skipped FLUX calls: {calls} of {plain_calls}"
    );
    assert!(sampled.iter().all(|v| v.is_finite()));
    assert_ne!(sampled, plain);
}

#[test]
fn lazycache_gives_cfg_pp_samplers_the_last_negative_prediction_on_skipped_steps() {
    let setup = common::setup();
    let (loaded, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let lazy = setup
        .call(
            "LazyCache",
            vec![
                ("model", loaded[0].clone()),
                ("reuse_threshold", j(json!(3.0))),
                ("start_percent", j(json!(0.0))),
                ("end_percent", j(json!(1.0))),
                ("verbose", j(json!(false))),
            ],
        )
        .unwrap()
        .remove(0);
    let plain = common::ksampler(
        &setup,
        &loaded[0],
        &positive,
        &negative,
        &latent,
        "euler_cfg_pp",
        6,
        1.5,
    )
    .unwrap();
    let cached = common::ksampler(&setup, &lazy, &positive, &negative, &latent, "euler_cfg_pp", 6, 1.5).unwrap();
    assert!(common::flat(&cached).iter().all(|v| v.is_finite()));
    assert_ne!(common::flat(&cached), common::flat(&plain), "steps were skipped");
}
