//! FLUX Kontext on the tiny FLUX model: ReferenceLatent and FluxKontextMultiReferenceLatentMethod
//! set an entry's reference latents and their placement, the transformer attends to the
//! references' tokens (the prediction keeps the image's shape and changes with the references
//! and with their placement), a guided step with references on both sides (one batch) gives
//! ComfyUI's result, and FluxKontextImageScale picks ComfyUI's resolution.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{flat, flux_velocity, j, max_abs_difference, one_euler_step, pattern_values, setup, tiny_flux_model};
use easel_engine::Value;
use easel_models::architectures::flux::{FluxControl, FluxInput, ReferenceMethod};
use easel_models::sampling::noise::prepare_noise;
use easel_nodes::conditioning::{CondEntry, Conditioning};
use easel_nodes::image::Image;
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::{DiffusionNetwork, Model};
use serde_json::json;

#[test]
fn the_transformer_attends_to_reference_latents_where_they_are_placed() {
    let setup = setup();
    let model = tiny_flux_model(&setup);
    let device = Device::Cpu;
    let first = Tensor::from_vec(pattern_values(16 * 6 * 10, 3, 1.0), (1, 16, 6, 10), &device).unwrap();
    let second = Tensor::from_vec(pattern_values(16 * 5 * 3, 4, 1.0), (1, 16, 5, 3), &device).unwrap();
    let plain = flux_velocity(&model, &[], ReferenceMethod::Offset);
    let one = flux_velocity(&model, std::slice::from_ref(&first), ReferenceMethod::Offset);
    assert_eq!(one.dims(), plain.dims(), "only the image's tokens are predicted");
    assert!(flat(&one) != flat(&plain), "the reference changes the prediction");
    let references = [first, second];
    let offset = flat(&flux_velocity(&model, &references, ReferenceMethod::Offset));
    let index = flat(&flux_velocity(&model, &references, ReferenceMethod::Index));
    let uxo = flat(&flux_velocity(&model, &references, ReferenceMethod::Uxo));
    assert!(
        offset != index && index != uxo && offset != uxo,
        "each placement differs"
    );
    assert!(offset != flat(&one), "the second reference counts");
}

#[test]
fn kontext_nodes_set_references_and_scale_images() {
    let setup = setup();
    let device = Device::Cpu;
    let entry = CondEntry::new(Tensor::zeros((1, 5, 32), DType::F32, &device).unwrap(), None);
    let conditioning = Value::object(Conditioning(vec![entry.clone(), entry]));
    let latent = Latent {
        samples: Tensor::ones((1, 16, 4, 6), DType::F32, &device).unwrap(),
        batch_index: None,
        noise_mask: None,
    };
    let referenced = setup
        .call(
            "ReferenceLatent",
            vec![
                ("conditioning", conditioning.clone()),
                ("latent", Value::object(latent.clone())),
            ],
        )
        .unwrap()
        .remove(0);
    let twice = setup
        .call(
            "ReferenceLatent",
            vec![("conditioning", referenced), ("latent", Value::object(latent))],
        )
        .unwrap()
        .remove(0);
    let placed = setup
        .call(
            "FluxKontextMultiReferenceLatentMethod",
            vec![
                ("conditioning", twice),
                ("reference_latents_method", j(json!("uxo/uno"))),
            ],
        )
        .unwrap()
        .remove(0);
    let placed = placed.downcast::<Conditioning>().unwrap();
    for entry in &placed.0 {
        assert_eq!(entry.reference_latents.len(), 2);
        assert_eq!(entry.reference_method, Some(ReferenceMethod::Uxo));
    }
    let unchanged = setup
        .call("ReferenceLatent", vec![("conditioning", conditioning)])
        .unwrap()
        .remove(0);
    assert!(unchanged.downcast::<Conditioning>().unwrap().0[0]
        .reference_latents
        .is_empty());

    // 100×50: aspect 2, nearest to 1456×720 of Kontext's resolutions.
    let image = Image::filled(1, 50, 100, 3, 0.5);
    let scaled = setup
        .call("FluxKontextImageScale", vec![("image", Value::object(image))])
        .unwrap()
        .remove(0);
    let scaled = scaled.downcast::<Image>().unwrap();
    assert_eq!((scaled.width, scaled.height), (1456, 720));
}

/// KSampler's one Euler step (σ 1 → 0) at cfg 2 with a reference latent on both sides (which
/// then run as one batch): noise − (v₋ + 2·(v₊ − v₋)), each velocity with the reference in model
/// space, out of model space as x/0.3611 + 0.1159.
#[test]
fn a_guided_step_with_references_on_both_sides_follows_comfyui() {
    let setup = setup();
    let model = tiny_flux_model(&setup);
    let device = Device::Cpu;
    let text = |seed: i64| {
        CondEntry::new(
            Tensor::from_vec(pattern_values(3 * 32, seed, 1.0), (1, 3, 32), &device).unwrap(),
            Some(Tensor::from_vec(pattern_values(64, seed + 1, 1.0), (1, 64), &device).unwrap()),
        )
    };
    let reference = Tensor::from_vec(pattern_values(16 * 4 * 6, 9, 1.0), (1, 16, 4, 6), &device).unwrap();
    let with_reference = |entry: CondEntry| {
        let latent = Latent {
            samples: reference.clone(),
            batch_index: None,
            noise_mask: None,
        };
        setup
            .call(
                "ReferenceLatent",
                vec![
                    ("conditioning", Value::object(Conditioning(vec![entry]))),
                    ("latent", Value::object(latent)),
                ],
            )
            .unwrap()
            .remove(0)
    };
    let (positive, negative) = (text(1), text(5));
    let shape = [1, 16, 3, 4];
    let empty = Latent {
        samples: Tensor::zeros(&shape, DType::F32, &device).unwrap(),
        batch_index: None,
        noise_mask: None,
    };
    let sampled = one_euler_step(
        &setup,
        &model,
        &with_reference(positive.clone()),
        &with_reference(negative.clone()),
        &Value::object(empty),
        2.0,
    );

    let flux_model = model.downcast::<Model>().unwrap();
    let DiffusionNetwork::Flux(flux) = &flux_model.0.network else {
        panic!("a FLUX model");
    };
    let noise = Tensor::from_vec(prepare_noise(7, &shape, None), &shape, &device).unwrap();
    let in_model_space = ((&reference - 0.1159).unwrap() * 0.3611).unwrap();
    let velocity = |entry: &CondEntry| {
        flux.forward(&FluxInput {
            x: &noise,
            timesteps: &Tensor::new(&[1f32], &device).unwrap(),
            context: &entry.cross_attention,
            y: entry.pooled.as_ref().unwrap(),
            guidance: Some(&Tensor::new(&[3.5f32], &device).unwrap()),
            concat: None,
            attention_mask: None,
            control: FluxControl::default(),
            image_prompt: None,
            patches: None,
            reference_latents: std::slice::from_ref(&in_model_space),
            reference_method: ReferenceMethod::Offset,
        })
        .unwrap()
    };
    let (v_positive, v_negative) = (velocity(&positive), velocity(&negative));
    let guided = (&v_negative + ((&v_positive - &v_negative).unwrap() * 2.0).unwrap()).unwrap();
    let expected = ((((&noise - &guided).unwrap()) / 0.3611).unwrap() + 0.1159).unwrap();
    let difference = max_abs_difference(&sampled, &expected);
    assert!(difference < 1e-4, "{difference}");
}
