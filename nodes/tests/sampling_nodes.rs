//! The custom-sampling sampler, scheduler and σ nodes against ComfyUI 0.3.64's own code
//! (`fixtures/sampling_nodes.json`, from `fixtures/generate_sampling_nodes.py`): σ within 10⁻⁶
//! relative, and each sampler node's SAMPLER run on the fixture's toy denoiser within 10⁻⁵ of
//! ComfyUI's; then every new sampler node runs end to end through SamplerCustom on the tiny SD1
//! checkpoint, and AddNoise noises a latent as sampling would start.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{f32_values, fixture_json, floats, j, sd1_inputs, setup, shape, Setup};
use easel_engine::Value;
use easel_models::sampling::noise::{prepare_noise, prepare_noise_and_generator};
use easel_models::sampling::samplers::{run_sampler, Denoiser, RunSeed};
use easel_models::sampling::schedule::SigmaSchedule;
use easel_nodes::latent::Latent;
use easel_nodes::sampling::custom::{SamplerChoice, Sigmas};
use serde_json::{json, Value as Json};

/// The fixture's toy denoiser: D = 0.9·x + 0.05·σ, and 0.8·x − 0.02·σ unguided.
struct Toy;

impl Denoiser for Toy {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> Result<Tensor> {
        x.affine(0.9, f64::from(0.05f32 * sigma))
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> Result<(Tensor, Tensor)> {
        Ok((self.denoise(x, sigma)?, x.affine(0.8, f64::from(-(0.02f32 * sigma)))?))
    }
}

/// A fixture case's inputs as node inputs: `sigmas` as a SIGMAS object, the rest as constants.
fn node_inputs(inputs: &Json) -> Vec<(&str, Value)> {
    inputs
        .as_object()
        .expect("inputs")
        .iter()
        .map(|(name, value)| {
            let value = match name.as_str() {
                "sigmas" => Value::object(Sigmas(floats(value))),
                _ => j(value.clone()),
            };
            (name.as_str(), value)
        })
        .collect()
}

fn sigmas_of(value: &Value) -> Vec<f32> {
    value.downcast::<Sigmas>().expect("SIGMAS").0.clone()
}

fn assert_sigmas_close(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: {actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            (a - e).abs() <= 1e-6 * e.abs() + 1e-12,
            "{what}: {actual:?} vs ComfyUI's {expected:?}"
        );
    }
}

#[test]
fn scheduler_and_sigma_nodes_match_comfyui() {
    let fixture = fixture_json("sampling_nodes.json");
    let setup = setup();
    let cases = fixture["schedulers"].as_array().unwrap().iter();
    for case in cases.chain(fixture["sigma_nodes"].as_array().unwrap()) {
        let node = case["node"].as_str().unwrap();
        let outputs = setup
            .call(node, node_inputs(&case["inputs"]))
            .unwrap_or_else(|error| panic!("{node} {}: {error}", case["inputs"]));
        let what = format!("{node} {}", case["inputs"]);
        assert_sigmas_close(&sigmas_of(&outputs[0]), &floats(&case["sigmas"]), &what);
    }
}

#[test]
fn gits_scheduler_refuses_coefficients_it_has_no_levels_for() {
    let setup = setup();
    let gits = |coeff: f64| {
        let inputs = vec![
            ("coeff", j(json!(coeff))),
            ("steps", j(json!(10))),
            ("denoise", j(json!(1.0))),
        ];
        setup.call("GITSScheduler", inputs)
    };
    assert!(gits(1.23).is_err());
    // Python's round(0.845, 2) is 0.84: the binary value lies below 0.845.
    assert!(gits(0.845).is_err());
    assert!(gits(1.2500001).is_ok());
}

#[test]
fn sampling_percent_to_sigma_matches_comfyui() {
    let fixture = fixture_json("sampling_nodes.json");
    let setup = setup();
    let (loaded, ..) = sd1_inputs(&setup, 1);
    for case in fixture["percent_to_sigma"].as_array().unwrap() {
        let mut inputs = node_inputs(&case["inputs"]);
        inputs.push(("model", loaded[0].clone()));
        let outputs = setup.call("SamplingPercentToSigma", inputs).unwrap();
        let actual = outputs[0].as_json().and_then(Json::as_f64).expect("a FLOAT");
        let expected = case["sigma_value"].as_f64().unwrap();
        assert!(
            (actual - expected).abs() <= 1e-6 * expected.abs(),
            "{}: {actual} vs ComfyUI's {expected}",
            case["inputs"]
        );
    }
}

#[test]
fn sampler_nodes_sample_as_comfyui_on_a_toy_denoiser() {
    let fixture = fixture_json("sampling_nodes.json");
    let samplers = &fixture["samplers"];
    let setup = setup();
    let (loaded, ..) = sd1_inputs(&setup, 1);
    let seed = samplers["seed"].as_u64().unwrap();
    let x_shape = shape(&samplers["x"]);
    let x = Tensor::from_vec(f32_values(&samplers["x"]), x_shape.as_slice(), &Device::Cpu).unwrap();
    let schedule = SigmaSchedule::sd_discrete();
    for case in samplers["cases"].as_array().unwrap() {
        let node = case["node"].as_str().unwrap();
        let what = format!("{node} {}", case["inputs"]);
        let mut inputs = node_inputs(&case["inputs"]);
        if node == "SamplerSASolver" {
            inputs.push(("model", loaded[0].clone()));
        }
        let outputs = setup
            .call(node, inputs)
            .unwrap_or_else(|error| panic!("{what}: {error}"));
        let sampler = &outputs[0].downcast::<SamplerChoice>().expect("a SAMPLER").0;
        let sigmas = floats(case.get("sigmas").unwrap_or(&samplers["sigmas"]));
        let run_seed = RunSeed {
            seed,
            global_generator: prepare_noise_and_generator(seed, &x_shape, None).1,
        };
        let output = run_sampler(sampler, &mut Toy, x.clone(), &sigmas, &schedule, run_seed, &mut |_| {
            Ok(())
        })
        .unwrap_or_else(|error| panic!("{what}: {error}"));
        let expected = &case["output"];
        assert_eq!(output.dims(), shape(expected).as_slice(), "{what}");
        let actual = output.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let expected = f32_values(expected);
        let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let error = actual
            .iter()
            .zip(&expected)
            .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
        assert!(
            error <= 1e-5 * scale,
            "{what}: max difference {error} (values up to {scale})"
        );
    }
}

/// One input set for each new sampler node (SamplerSASolver also gets the model).
fn sampler_node_inputs() -> Vec<(&'static str, Json)> {
    let adaptive = json!({"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0,
        "icoeff": 1.0, "dcoeff": 0.0, "accept_safety": 0.81, "eta": 0.0, "s_noise": 1.0});
    vec![
        ("SamplerEulerAncestral", json!({"eta": 1.0, "s_noise": 1.0})),
        ("SamplerEulerAncestralCFGPP", json!({"eta": 1.0, "s_noise": 1.0})),
        ("SamplerLMS", json!({"order": 4})),
        (
            "SamplerDPMPP_3M_SDE",
            json!({"eta": 1.0, "s_noise": 1.0, "noise_device": "gpu"}),
        ),
        (
            "SamplerDPMPP_2M_SDE",
            json!({"solver_type": "heun", "eta": 1.0, "s_noise": 1.0, "noise_device": "cpu"}),
        ),
        (
            "SamplerDPMPP_SDE",
            json!({"eta": 1.0, "s_noise": 1.0, "r": 0.5, "noise_device": "gpu"}),
        ),
        ("SamplerDPMPP_2S_Ancestral", json!({"eta": 1.0, "s_noise": 1.0})),
        ("SamplerDPMAdaptative", adaptive),
        (
            "SamplerER_SDE",
            json!({"solver_type": "Reverse-time SDE", "max_stage": 3, "eta": 1.0, "s_noise": 1.0}),
        ),
        (
            "SamplerSASolver",
            json!({"eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8, "s_noise": 1.0,
            "predictor_order": 3, "corrector_order": 4, "use_pece": false, "simple_order_2": false}),
        ),
        (
            "SamplerLCMUpscale",
            json!({"scale_ratio": 1.5, "scale_steps": -1, "upscale_method": "bislerp"}),
        ),
        ("SamplerEulerCFGpp", json!({"version": "alternative"})),
    ]
}

fn samples(value: &Value) -> Tensor {
    value.downcast::<Latent>().expect("a LATENT").samples.clone()
}

fn all_finite(tensor: &Tensor) -> bool {
    let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values.iter().all(|value| value.is_finite())
}

#[test]
fn every_new_sampler_node_runs_through_sampler_custom() {
    let setup = setup();
    let (loaded, positive, negative, latent) = sd1_inputs(&setup, 1);
    let model = loaded[0].clone();
    let sigmas = setup
        .call(
            "BasicScheduler",
            vec![
                ("model", model.clone()),
                ("scheduler", j(json!("karras"))),
                ("steps", j(json!(4))),
                ("denoise", j(json!(1.0))),
            ],
        )
        .unwrap()
        .remove(0);
    for (node, inputs) in sampler_node_inputs() {
        let mut inputs = node_inputs(&inputs);
        if node == "SamplerSASolver" {
            inputs.push(("model", model.clone()));
        }
        let sampler = setup.call(node, inputs).unwrap().remove(0);
        let outputs = setup
            .call(
                "SamplerCustom",
                vec![
                    ("model", model.clone()),
                    ("add_noise", j(json!(true))),
                    ("noise_seed", j(json!(5))),
                    ("cfg", j(json!(6.0))),
                    ("positive", positive.clone()),
                    ("negative", negative.clone()),
                    ("sampler", sampler),
                    ("sigmas", sigmas.clone()),
                    ("latent_image", latent.clone()),
                ],
            )
            .unwrap_or_else(|error| panic!("{node}: {error}"));
        let (output, denoised) = (samples(&outputs[0]), samples(&outputs[1]));
        let expected_size = if node == "SamplerLCMUpscale" { 12 } else { 8 };
        assert_eq!(output.dims(), [1, 4, expected_size, expected_size], "{node}");
        assert!(all_finite(&output) && all_finite(&denoised), "{node}: finite output");
        assert!(
            output.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
            "{node}"
        );
    }
}

/// AddNoise with `noise_seed` on `latent` along `sigmas`: the noised latent.
fn add_noise(setup: &Setup, model: &Value, noise: Value, sigmas: &[f32], latent: &Tensor) -> Tensor {
    let outputs = setup
        .call(
            "AddNoise",
            vec![
                ("model", model.clone()),
                ("noise", noise),
                ("sigmas", Value::object(Sigmas(sigmas.to_vec()))),
                ("latent_image", Value::object(Latent::new(latent.clone()))),
            ],
        )
        .unwrap();
    samples(&outputs[0])
}

#[test]
fn add_noise_noises_the_latent_in_model_space() {
    let setup = setup();
    let (loaded, ..) = sd1_inputs(&setup, 1);
    let model = &loaded[0];
    let random = |seed: u64| {
        setup
            .call("RandomNoise", vec![("noise_seed", j(json!(seed)))])
            .unwrap()
            .remove(0)
    };
    let shape = [1usize, 4, 3, 5];
    let noise = Tensor::from_vec(prepare_noise(9, &shape, None), shape.as_slice(), &Device::Cpu).unwrap();
    let scale_factor = 0.18215;
    let close = |a: &Tensor, b: &Tensor| common::max_abs_difference(a, b) < 1e-5;

    // An empty latent is not shifted into model space; the scale is |σ_first − σ_last|.
    let empty = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
    let noised = add_noise(&setup, model, random(9), &[10.0, 4.0, 0.5], &empty);
    let expected = ((&noise * 9.5).unwrap() / scale_factor).unwrap();
    assert!(close(&noised, &expected));

    // A latent with content is: in, plus σ·noise (one σ: itself), out again.
    let latent = (Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap() * 0.5).unwrap();
    let noised = add_noise(&setup, model, random(9), &[2.0], &latent);
    let in_model_space = (&latent * scale_factor).unwrap();
    let expected = (((&noise * 2.0).unwrap() + in_model_space).unwrap() / scale_factor).unwrap();
    assert!(close(&noised, &expected));

    // DisableNoise leaves it as it was (up to the round trip); no σ at all returns it untouched.
    let disabled = setup.call("DisableNoise", vec![]).unwrap().remove(0);
    assert!(close(
        &add_noise(&setup, model, disabled, &[14.6, 0.0], &latent),
        &latent
    ));
    let untouched = add_noise(&setup, model, random(9), &[], &latent);
    assert_eq!(common::max_abs_difference(&untouched, &latent), 0.0);
}
