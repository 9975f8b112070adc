//! The custom-sampling nodes: SamplerCustom and SamplerCustomAdvanced put together from noise,
//! guider, sampler and σ nodes sample exactly as KSampler does with the same settings, and the
//! σ nodes cut, flip and make schedules as ComfyUI's.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{j, max_abs_difference, setup, Setup};
use easel_engine::Value;
use easel_models::testmodels::TINY_SD1_CHECKPOINT;
use easel_nodes::latent::Latent;
use easel_nodes::sampling::custom::Sigmas;
use serde_json::json;

fn call(setup: &Setup, class: &str, inputs: Vec<(&str, Value)>) -> Vec<Value> {
    setup.call(class, inputs).unwrap()
}

fn sigmas(value: &Value) -> Vec<f32> {
    value.downcast::<Sigmas>().unwrap().0.clone()
}

fn sigmas_value(values: &[f32]) -> Value {
    Value::object(Sigmas(values.to_vec()))
}

/// The tiny SD1.x model, CLIP, and a prompt and a negative prompt encoded with it.
fn sd1(setup: &Setup) -> (Value, Value, Value) {
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
    (loaded[0].clone(), encode("a red house"), encode("blurry"))
}

fn latent() -> Value {
    Value::object(Latent::new(
        Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap(),
    ))
}

fn samples(value: &Value) -> Tensor {
    value.downcast::<Latent>().unwrap().samples.clone()
}

/// KSampler, SamplerCustom (CFG, noise seed) and SamplerCustomAdvanced (RandomNoise, CFGGuider,
/// KSamplerSelect, BasicScheduler) give the same latent, with an ancestral sampler so that the
/// step noise's seed counts too; the denoised output is the last step's estimate.
#[test]
fn custom_samplers_sample_as_ksampler() {
    let setup = setup();
    let (model, positive, negative) = sd1(&setup);
    let (seed, steps, cfg, sampler, scheduler, denoise) = (11, 3, 6.5, "euler_ancestral", "karras", 0.8);
    let ksampler = call(
        &setup,
        "KSampler",
        vec![
            ("model", model.clone()),
            ("seed", j(json!(seed))),
            ("steps", j(json!(steps))),
            ("cfg", j(json!(cfg))),
            ("sampler_name", j(json!(sampler))),
            ("scheduler", j(json!(scheduler))),
            ("positive", positive.clone()),
            ("negative", negative.clone()),
            ("latent_image", latent()),
            ("denoise", j(json!(denoise))),
        ],
    )
    .remove(0);
    let sampler_value = call(&setup, "KSamplerSelect", vec![("sampler_name", j(json!(sampler)))]).remove(0);
    let sigmas_node = call(
        &setup,
        "BasicScheduler",
        vec![
            ("model", model.clone()),
            ("scheduler", j(json!(scheduler))),
            ("steps", j(json!(steps))),
            ("denoise", j(json!(denoise))),
        ],
    )
    .remove(0);
    assert_eq!(sigmas(&sigmas_node).len(), steps + 1);
    let custom = call(
        &setup,
        "SamplerCustom",
        vec![
            ("model", model.clone()),
            ("add_noise", j(json!(true))),
            ("noise_seed", j(json!(seed))),
            ("cfg", j(json!(cfg))),
            ("positive", positive.clone()),
            ("negative", negative.clone()),
            ("sampler", sampler_value.clone()),
            ("sigmas", sigmas_node.clone()),
            ("latent_image", latent()),
        ],
    );
    let noise = call(&setup, "RandomNoise", vec![("noise_seed", j(json!(seed)))]).remove(0);
    let guider = call(
        &setup,
        "CFGGuider",
        vec![
            ("model", model.clone()),
            ("positive", positive),
            ("negative", negative),
            ("cfg", j(json!(cfg))),
        ],
    )
    .remove(0);
    let advanced = call(
        &setup,
        "SamplerCustomAdvanced",
        vec![
            ("noise", noise),
            ("guider", guider),
            ("sampler", sampler_value),
            ("sigmas", sigmas_node),
            ("latent_image", latent()),
        ],
    );
    let expected = samples(&ksampler);
    assert_eq!(max_abs_difference(&samples(&custom[0]), &expected), 0.0);
    assert_eq!(max_abs_difference(&samples(&advanced[0]), &expected), 0.0);
    // The last step of an ancestral sampler ends at σ 0 on its denoised estimate plus no noise:
    // the denoised output is that estimate, here the output itself.
    assert!(max_abs_difference(&samples(&advanced[1]), &expected) < 1e-5);
}

/// BasicGuider is the conditioning alone at cfg 1; DisableNoise starts from the latent itself.
#[test]
fn basic_guider_and_disabled_noise() {
    let setup = setup();
    let (model, positive, _) = sd1(&setup);
    let ksampler = |add_noise: &str| {
        call(
            &setup,
            "KSamplerAdvanced",
            vec![
                ("model", model.clone()),
                ("add_noise", j(json!(add_noise))),
                ("noise_seed", j(json!(5))),
                ("steps", j(json!(2))),
                ("cfg", j(json!(1.0))),
                ("sampler_name", j(json!("euler"))),
                ("scheduler", j(json!("normal"))),
                ("positive", positive.clone()),
                ("negative", positive.clone()),
                ("latent_image", latent()),
                ("start_at_step", j(json!(0))),
                ("end_at_step", j(json!(10000))),
                ("return_with_leftover_noise", j(json!("disable"))),
            ],
        )
        .remove(0)
    };
    let guider = call(
        &setup,
        "BasicGuider",
        vec![("model", model.clone()), ("conditioning", positive.clone())],
    )
    .remove(0);
    let sigmas_node = call(
        &setup,
        "BasicScheduler",
        vec![
            ("model", model.clone()),
            ("scheduler", j(json!("normal"))),
            ("steps", j(json!(2))),
            ("denoise", j(json!(1.0))),
        ],
    )
    .remove(0);
    let sampler_value = call(&setup, "KSamplerSelect", vec![("sampler_name", j(json!("euler")))]).remove(0);
    for (noise, add_noise) in [
        (
            call(&setup, "RandomNoise", vec![("noise_seed", j(json!(5)))]).remove(0),
            "enable",
        ),
        (call(&setup, "DisableNoise", vec![]).remove(0), "disable"),
    ] {
        let advanced = call(
            &setup,
            "SamplerCustomAdvanced",
            vec![
                ("noise", noise),
                ("guider", guider.clone()),
                ("sampler", sampler_value.clone()),
                ("sigmas", sigmas_node.clone()),
                ("latent_image", latent()),
            ],
        );
        let expected = samples(&ksampler(add_noise));
        assert_eq!(
            max_abs_difference(&samples(&advanced[0]), &expected),
            0.0,
            "{add_noise}"
        );
    }
}

#[test]
fn sigma_nodes_cut_flip_and_schedule_as_comfyui() {
    let setup = setup();
    let values = [14.6, 7.0, 3.0, 1.0, 0.0];
    let split = call(
        &setup,
        "SplitSigmas",
        vec![("sigmas", sigmas_value(&values)), ("step", j(json!(2)))],
    );
    assert_eq!(sigmas(&split[0]), vec![14.6, 7.0, 3.0]);
    assert_eq!(sigmas(&split[1]), vec![3.0, 1.0, 0.0]);
    let beyond = call(
        &setup,
        "SplitSigmas",
        vec![("sigmas", sigmas_value(&values)), ("step", j(json!(9)))],
    );
    assert_eq!((sigmas(&beyond[0]).len(), sigmas(&beyond[1]).len()), (5, 0));
    // Four steps at denoise 0.5: the last two (sigmas[-3:]) apart from sigmas[:-2].
    let denoised = call(
        &setup,
        "SplitSigmasDenoise",
        vec![("sigmas", sigmas_value(&values)), ("denoise", j(json!(0.5)))],
    );
    assert_eq!(sigmas(&denoised[0]), vec![14.6, 7.0, 3.0]);
    assert_eq!(sigmas(&denoised[1]), vec![3.0, 1.0, 0.0]);
    let none = call(
        &setup,
        "SplitSigmasDenoise",
        vec![("sigmas", sigmas_value(&values)), ("denoise", j(json!(0.0)))],
    );
    assert_eq!((sigmas(&none[0]), sigmas(&none[1])), (vec![], vec![0.0]));
    let flipped = call(&setup, "FlipSigmas", vec![("sigmas", sigmas_value(&values))]).remove(0);
    assert_eq!(sigmas(&flipped), vec![0.0001, 1.0, 3.0, 7.0, 14.6]);

    let karras = call(
        &setup,
        "KarrasScheduler",
        vec![
            ("steps", j(json!(3))),
            ("sigma_max", j(json!(10.0))),
            ("sigma_min", j(json!(0.1))),
            ("rho", j(json!(1.0))),
        ],
    )
    .remove(0);
    // ρ = 1: linear from 10 to 0.1, then 0.
    let karras = sigmas(&karras);
    for (ours, expected) in karras.iter().zip([10.0, 5.05, 0.1, 0.0]) {
        assert!((ours - expected).abs() < 1e-5, "{karras:?}");
    }
    let exponential = call(
        &setup,
        "ExponentialScheduler",
        vec![
            ("steps", j(json!(3))),
            ("sigma_max", j(json!(10.0))),
            ("sigma_min", j(json!(0.1))),
        ],
    )
    .remove(0);
    let exponential = sigmas(&exponential);
    for (ours, expected) in exponential.iter().zip([10.0, 1.0, 0.1, 0.0]) {
        assert!((ours - expected).abs() < 1e-5, "{exponential:?}");
    }

    let (model, _, _) = sd1(&setup);
    let turbo = call(
        &setup,
        "SDTurboScheduler",
        vec![
            ("model", model.clone()),
            ("steps", j(json!(2))),
            ("denoise", j(json!(0.5))),
        ],
    )
    .remove(0);
    // Timesteps 499 and 399 (the last five of 999…99, two of them) on SD1's table, then 0.
    let schedule = &model
        .downcast::<easel_nodes::model::diffusion_model::Model>()
        .unwrap()
        .0
        .schedule;
    assert_eq!(sigmas(&turbo), vec![schedule.sigma(499.0), schedule.sigma(399.0), 0.0]);
    let nothing = call(
        &setup,
        "BasicScheduler",
        vec![
            ("model", model),
            ("scheduler", j(json!("simple"))),
            ("steps", j(json!(4))),
            ("denoise", j(json!(0.0))),
        ],
    )
    .remove(0);
    assert!(sigmas(&nothing).is_empty());
}

/// DualCFGGuider against the three prompts' own predictions (each from BasicGuider, the
/// denoised output of one step): regular `n + (m − n)·cfg2 + (p − m)·cfg1`, nested
/// `n + (m + (p − m)·cfg1 − n)·cfg2`, and with both scales 1 the positive prediction alone.
#[test]
fn dual_cfg_guider_combines_three_predictions_as_comfyui() {
    let setup = setup();
    let (model, positive, negative) = sd1(&setup);
    let middle = call(
        &setup,
        "CLIPTextEncode",
        vec![
            ("text", j(json!("a house"))),
            (
                "clip",
                call(
                    &setup,
                    "CheckpointLoaderSimple",
                    vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
                )[1]
                .clone(),
            ),
        ],
    )
    .remove(0);
    let sampler = call(&setup, "KSamplerSelect", vec![("sampler_name", j(json!("euler")))]).remove(0);
    let sigmas = sigmas_value(&[14.6146, 0.0]);
    let noise = call(&setup, "RandomNoise", vec![("noise_seed", j(json!(3)))]).remove(0);
    let denoised = |guider: Value| {
        let outputs = call(
            &setup,
            "SamplerCustomAdvanced",
            vec![
                ("noise", noise.clone()),
                ("guider", guider),
                ("sampler", sampler.clone()),
                ("sigmas", sigmas.clone()),
                ("latent_image", latent()),
            ],
        );
        samples(&outputs[1])
    };
    let alone = |conditioning: &Value| {
        denoised(
            call(
                &setup,
                "BasicGuider",
                vec![("model", model.clone()), ("conditioning", conditioning.clone())],
            )
            .remove(0),
        )
    };
    let (p, m, n) = (alone(&positive), alone(&middle), alone(&negative));
    let dual = |cfg_conds: f64, cfg_cond2_negative: f64, style: &str| {
        denoised(
            call(
                &setup,
                "DualCFGGuider",
                vec![
                    ("model", model.clone()),
                    ("cond1", positive.clone()),
                    ("cond2", middle.clone()),
                    ("negative", negative.clone()),
                    ("cfg_conds", j(json!(cfg_conds))),
                    ("cfg_cond2_negative", j(json!(cfg_cond2_negative))),
                    ("style", j(json!(style))),
                ],
            )
            .remove(0),
        )
    };
    // The outputs leave model space (÷ 0.18215) after the combination: equal up to rounding.
    let close = |got: &Tensor, expected: &Tensor| {
        let scale = max_abs_difference(expected, &expected.zeros_like().unwrap());
        let difference = max_abs_difference(got, expected);
        assert!(difference <= 1e-6 * scale, "{difference} of {scale}");
    };
    let regular = ((&n + ((&m - &n).unwrap() * 3.0).unwrap()).unwrap() + ((&p - &m).unwrap() * 2.0).unwrap()).unwrap();
    close(&dual(2.0, 3.0, "regular"), &regular);
    let text = (&m + ((&p - &m).unwrap() * 2.0).unwrap()).unwrap();
    let nested = (&n + ((text - &n).unwrap() * 3.0).unwrap()).unwrap();
    close(&dual(2.0, 3.0, "nested"), &nested);
    assert!(max_abs_difference(&regular, &nested) > 1e-3 * max_abs_difference(&n, &p));
    assert_eq!(max_abs_difference(&dual(1.0, 1.0, "regular"), &p), 0.0);
}
