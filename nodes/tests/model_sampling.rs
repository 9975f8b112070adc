//! ModelSamplingContinuousEDM and ModelSamplingContinuousV: their σ schedules, timesteps and
//! parameterisations against ComfyUI's own model-sampling objects (fixture from
//! `fixtures/generate_model_sampling.py`), and the nodes sampling with them.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture_json, j};
use easel_models::sampling::schedule::{ContinuousTimestep, Scheduler, SigmaSchedule};
use easel_nodes::model::diffusion_model::{Model, Prediction};
use serde_json::{json, Value as Json};

fn floats(value: &Json) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

fn assert_close(ours: &[f64], expected: &[f64], what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}");
    for (a, b) in ours.iter().zip(expected) {
        assert!(
            (a - b).abs() <= 2e-6 * b.abs().max(1.0),
            "{what}: {ours:?} vs {expected:?}"
        );
    }
}

#[test]
fn continuous_schedules_and_parameterisations_are_comfyuis() {
    let fixture = fixture_json("model_sampling.json");
    let tensor = |name: &str| {
        let values: Vec<f32> = floats(&fixture[name]).into_iter().map(|v| v as f32).collect();
        Tensor::new(values.as_slice(), &Device::Cpu).unwrap()
    };
    let (x, out) = (tensor("x"), tensor("out"));
    let sigma = fixture["sigma"].as_f64().unwrap() as f32;
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (timestep, prediction) = match name {
            "edm" => (ContinuousTimestep::Edm, Prediction::Edm),
            "v_prediction" => (ContinuousTimestep::Edm, Prediction::V),
            "eps" => (ContinuousTimestep::Edm, Prediction::Epsilon),
            _ => (ContinuousTimestep::V, Prediction::V),
        };
        let schedule = SigmaSchedule::continuous(
            timestep,
            case["sigma_min"].as_f64().unwrap(),
            case["sigma_max"].as_f64().unwrap(),
        );
        let ends = [f64::from(schedule.sigma_min()), f64::from(schedule.sigma_max())];
        assert_close(&ends, &floats(&case["table_ends"]), name);
        let percents = [schedule.percent_to_sigma(0.25), schedule.percent_to_sigma(0.8)];
        assert_close(&percents, &floats(&case["percent_to_sigma"]), name);
        assert_close(
            &[f64::from(schedule.timestep(sigma))],
            &[case["timestep"].as_f64().unwrap()],
            name,
        );
        let as_f64 = |t: Tensor| -> Vec<f64> { common::flat(&t).into_iter().map(f64::from).collect() };
        assert_close(
            &as_f64(prediction.network_input(&x, sigma).unwrap()),
            &floats(&case["input"]),
            name,
        );
        let step = schedule.timestep(sigma);
        assert_close(
            &as_f64(prediction.denoised(&x, &out, sigma, step).unwrap()),
            &floats(&case["denoised"]),
            name,
        );
        for (scheduler, expected) in case["schedules"].as_object().unwrap() {
            let sigmas: Vec<f64> = scheduler
                .parse::<Scheduler>()
                .unwrap()
                .sigmas(&schedule, 8)
                .into_iter()
                .map(f64::from)
                .collect();
            assert_close(&sigmas, &floats(expected), &format!("{name} {scheduler}"));
        }
    }
}

#[test]
fn continuous_model_sampling_nodes_sample() {
    let setup = common::setup();
    let (loaded, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let patched = |class: &str, sampling: &str, sigma_max: f64, sigma_min: f64| {
        setup.call(
            class,
            vec![
                ("model", loaded[0].clone()),
                ("sampling", j(json!(sampling))),
                ("sigma_max", j(json!(sigma_max))),
                ("sigma_min", j(json!(sigma_min))),
            ],
        )
    };
    let edm = patched("ModelSamplingContinuousEDM", "edm", 80.0, 0.002)
        .unwrap()
        .remove(0);
    assert_eq!(edm.downcast::<Model>().unwrap().0.prediction, Prediction::Edm);
    let v = patched("ModelSamplingContinuousV", "v_prediction", 500.0, 0.03)
        .unwrap()
        .remove(0);
    let plain =
        common::flat(&common::ksampler(&setup, &loaded[0], &positive, &negative, &latent, "euler", 3, 4.0).unwrap());
    for model in [edm, v] {
        let sampled =
            common::flat(&common::ksampler(&setup, &model, &positive, &negative, &latent, "euler", 3, 4.0).unwrap());
        assert!(sampled.iter().all(|v| v.is_finite()));
        assert_ne!(sampled, plain);
    }
    let error = patched("ModelSamplingContinuousEDM", "cosmos_rflow", 80.0, 0.002).expect_err("not runnable yet");
    assert!(error.to_string().contains("cosmos_rflow"), "{error}");
}
