//! Area, mask and strength conditioning on the tiny SD1.x model: one Euler step with an area
//! entry beside a whole-image one equals the weighted average ComfyUI's `calc_cond_batch` makes,
//! computed here by hand, including the same-area entry the negative side is given.

use std::sync::Arc;

mod common;

use candle_core::{Device, Tensor};
use common::{j, max_abs_difference, setup, Setup};
use easel_engine::Value;
use easel_models::architectures::unet::UNetInput;
use easel_models::sampling::noise::prepare_noise;
use easel_models::testmodels::TINY_SD1_CHECKPOINT;
use easel_nodes::conditioning::Conditioning;
use easel_nodes::image::Mask;
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::{DiffusionModel, Model};
use serde_json::json;

/// A 128×128 image's latent: 16×16.
const SIDE: usize = 16;

/// The tiny SD1.x checkpoint's outputs and its diffusion model.
fn tiny_model(setup: &Setup) -> (Vec<Value>, Arc<DiffusionModel>) {
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
        )
        .unwrap();
    let model = loaded[0].downcast::<Model>().unwrap().0.clone();
    (loaded, model)
}

fn encode(setup: &Setup, clip: &Value, text: &str) -> Value {
    setup
        .call("CLIPTextEncode", vec![("text", j(json!(text))), ("clip", clip.clone())])
        .unwrap()
        .remove(0)
}

/// One Euler step over Karras [σ_max, 0] from the empty latent: the guided denoised latent,
/// back in VAE space.
fn one_step(setup: &Setup, model: &Value, positive: Value, negative: Value, cfg: f64) -> Tensor {
    let latent = Value::object(Latent::new(
        Tensor::zeros((1, 4, SIDE, SIDE), candle_core::DType::F32, &Device::Cpu).unwrap(),
    ));
    let out = setup
        .call(
            "KSampler",
            vec![
                ("model", model.clone()),
                ("seed", j(json!(3))),
                ("steps", j(json!(1))),
                ("cfg", j(json!(cfg))),
                ("sampler_name", j(json!("euler"))),
                ("scheduler", j(json!("karras"))),
                ("positive", positive),
                ("negative", negative),
                ("latent_image", latent),
                ("denoise", j(json!(1.0))),
            ],
        )
        .unwrap();
    out[0].downcast::<Latent>().unwrap().samples.clone()
}

fn combine(setup: &Setup, first: Value, second: Value) -> Value {
    setup
        .call(
            "ConditioningCombine",
            vec![("conditioning_1", first), ("conditioning_2", second)],
        )
        .unwrap()
        .remove(0)
}

/// The latent one_step starts from: seed 3's noise at σ_max, fully scaled (empty latent).
fn start(model: &DiffusionModel) -> Tensor {
    let sigma = model.schedule.sigma_max();
    let noise = Tensor::from_vec(
        prepare_noise(3, &[1, 4, SIDE, SIDE], None),
        (1, 4, SIDE, SIDE),
        &Device::Cpu,
    )
    .unwrap();
    (&noise * f64::from((1.0 + sigma * sigma).sqrt())).unwrap()
}

/// D(x, σ_max) for `context` on the latent crop `x`, as the EPS model computes it.
fn denoised(model: &DiffusionModel, x: &Tensor, context: &Tensor) -> Tensor {
    let sigma = model.schedule.sigma_max();
    let scaled = (x / f64::from((sigma * sigma + 1.0).sqrt())).unwrap();
    let timesteps = Tensor::new(&[999f32], &Device::Cpu).unwrap();
    let eps = model
        .network
        .unet()
        .unwrap()
        .forward(&UNetInput::new(&scaled, &timesteps, context))
        .unwrap();
    (x - (eps * f64::from(sigma)).unwrap()).unwrap()
}

fn context(conditioning: &Value) -> Tensor {
    conditioning.downcast::<Conditioning>().unwrap().0[0]
        .cross_attention
        .clone()
}

/// `t` over rows y.., columns x.. of a SIDE×SIDE latent, zeros elsewhere.
fn place(t: &Tensor, y: usize, x: usize) -> Tensor {
    let (_, _, height, width) = t.dims4().unwrap();
    t.pad_with_zeros(2, y, SIDE - y - height)
        .unwrap()
        .pad_with_zeros(3, x, SIDE - x - width)
        .unwrap()
}

#[test]
fn an_area_entry_is_blended_with_feathered_weights() {
    let setup = setup();
    let (loaded, model) = tiny_model(&setup);
    let whole = encode(&setup, &loaded[1], "a meadow");
    let detail = encode(&setup, &loaded[1], "a red barn");
    let negative = encode(&setup, &loaded[1], "blurry");
    // 64×64 pixels at (32, 32): latent area 8×8 at (4, 4), strength 0.5.
    let area = setup
        .call(
            "ConditioningSetArea",
            vec![
                ("conditioning", detail.clone()),
                ("width", j(json!(64))),
                ("height", j(json!(64))),
                ("x", j(json!(32))),
                ("y", j(json!(32))),
                ("strength", j(json!(0.5))),
            ],
        )
        .unwrap()
        .remove(0);
    let positive = combine(&setup, whole.clone(), area);
    let cfg = 2.0;
    let sampled = one_step(&setup, &loaded[0], positive, negative.clone(), cfg);

    let x = start(&model);
    let crop = x.narrow(2, 4, 8).unwrap().narrow(3, 4, 8).unwrap();
    // Weight over the area: 0.5, feathered over rr = min(8, 8/4) = 2 rows and columns on every
    // side (the area touches no border): factors 1/2 then 1 inwards.
    let ramp = [0.5f32, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5];
    let weight: Vec<f32> = (0..4)
        .flat_map(|_| (0..8).flat_map(move |row| (0..8).map(move |column| 0.5 * ramp[row] * ramp[column])))
        .collect();
    let weight = Tensor::from_vec(weight, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let count = (place(&weight, 4, 4) + 1.0).unwrap();
    let side = |full: &Tensor, area_context: &Tensor| {
        let blended = (denoised(&model, &x, full)
            + place(&(denoised(&model, &crop, area_context) * &weight).unwrap(), 4, 4))
        .unwrap();
        (blended / &count).unwrap()
    };
    let cond = side(&context(&whole), &context(&detail));
    // The negative side gets an entry with the same area and the negative prompt.
    let uncond = side(&context(&negative), &context(&negative));
    let guided = (&uncond + ((cond - &uncond).unwrap() * cfg).unwrap()).unwrap();
    let expected = (guided / 0.18215).unwrap();
    let difference = max_abs_difference(&sampled, &expected);
    assert!(difference < 1e-3, "max difference {difference}");
    // The area entry matters: without it the step lands elsewhere.
    let plain = one_step(&setup, &loaded[0], whole, negative, cfg);
    assert!(max_abs_difference(&plain, &expected) > 1e-2);
}

#[test]
fn a_masked_entry_weighs_its_prediction_by_the_mask() {
    let setup = setup();
    let (loaded, model) = tiny_model(&setup);
    let whole = encode(&setup, &loaded[1], "a meadow");
    let detail = encode(&setup, &loaded[1], "a red barn");
    // The left half of the latent at full weight; strength 0.8.
    let mask = Mask {
        batch: 1,
        height: SIDE,
        width: SIDE,
        data: (0..SIDE * SIDE)
            .map(|i| if i % SIDE < SIDE / 2 { 1.0 } else { 0.0 })
            .collect(),
    };
    let masked = setup
        .call(
            "ConditioningSetMask",
            vec![
                ("conditioning", detail.clone()),
                ("mask", Value::object(mask.clone())),
                ("strength", j(json!(0.8))),
                ("set_cond_area", j(json!("default"))),
            ],
        )
        .unwrap()
        .remove(0);
    let positive = combine(&setup, whole.clone(), masked);
    // cfg 1: the positive side alone.
    let sampled = one_step(&setup, &loaded[0], positive, whole.clone(), 1.0);

    let x = start(&model);
    let weight = Tensor::from_vec(
        mask.data.iter().map(|v| v * 0.8).collect::<Vec<f32>>(),
        (1, 1, SIDE, SIDE),
        &Device::Cpu,
    )
    .unwrap()
    .repeat((1, 4, 1, 1))
    .unwrap();
    let sum = (denoised(&model, &x, &context(&whole)) + (denoised(&model, &x, &context(&detail)) * &weight).unwrap())
        .unwrap();
    let expected = ((sum / (weight + 1.0).unwrap()).unwrap() / 0.18215).unwrap();
    let difference = max_abs_difference(&sampled, &expected);
    assert!(difference < 1e-3, "max difference {difference}");
    let plain = one_step(&setup, &loaded[0], whole.clone(), whole, 1.0);
    assert!(max_abs_difference(&plain, &expected) > 1e-2);
}
