//! FLUX Kontext on the tiny FLUX model: ReferenceLatent and FluxKontextMultiReferenceLatentMethod
//! set an entry's reference latents and their placement, the transformer attends to the
//! references' tokens (the prediction keeps the image's shape and changes with the references
//! and with their placement) and FluxKontextImageScale picks ComfyUI's resolution.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{flat, flux_velocity, j, pattern_values, setup, tiny_flux_model};
use easel_engine::Value;
use easel_models::architectures::flux::ReferenceMethod;
use easel_nodes::conditioning::{CondEntry, Conditioning};
use easel_nodes::image::Image;
use easel_nodes::latent::Latent;
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
