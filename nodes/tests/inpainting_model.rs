//! Models with extra input channels: on the tiny 9-channel SD1.x inpainting checkpoint,
//! InpaintModelConditioning's image and mask, and on an 8-channel InstructPix2Pix one,
//! InstructPixToPixConditioning's image, reach the UNet as ComfyUI's `concat_cond` builds them.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{j, max_abs_difference, setup};
use easel_engine::Value;
use easel_models::architectures::unet::UNetConfig;
use easel_models::architectures::unet::UNetInput;
use easel_models::sampling::noise::prepare_noise;
use easel_models::testmodels::{
    sd1_checkpoint_layout, tiny_clip_l, tiny_sd1_unet, tiny_sd_vae, write_checkpoint, TINY_SD1_INPAINTING_CHECKPOINT,
};
use easel_nodes::conditioning::Conditioning;
use easel_nodes::image::{Image, Mask};
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::{DiffusionModel, Model};
use serde_json::json;

/// KSampler's one Euler step (seed 5, karras, cfg 1) on InpaintModelConditioning's or
/// InstructPixToPixConditioning's outputs: the sampled latent.
fn one_karras_step(setup: &common::Setup, model: &Value, conditioned: &[Value]) -> Tensor {
    setup
        .call(
            "KSampler",
            vec![
                ("model", model.clone()),
                ("seed", j(json!(5))),
                ("steps", j(json!(1))),
                ("cfg", j(json!(1.0))),
                ("sampler_name", j(json!("euler"))),
                ("scheduler", j(json!("karras"))),
                ("positive", conditioned[0].clone()),
                ("negative", conditioned[1].clone()),
                ("latent_image", conditioned[2].clone()),
                ("denoise", j(json!(1.0))),
            ],
        )
        .unwrap()[0]
        .downcast::<Latent>()
        .unwrap()
        .samples
        .clone()
}

/// InstructPixToPixConditioning of a 64×64 test image with the checkpoint `loaded`'s CLIP and
/// VAE ("make it winter" on both sides): positive, negative, latent.
fn ip2p_conditioned(setup: &common::Setup, loaded: &[Value]) -> Vec<Value> {
    let positive = setup
        .call(
            "CLIPTextEncode",
            vec![("text", j(json!("make it winter"))), ("clip", loaded[1].clone())],
        )
        .unwrap()
        .remove(0);
    let pixels: Vec<f32> = (0..64 * 64 * 3).map(|i| ((i * 5) % 251) as f32 / 251.0).collect();
    setup
        .call(
            "InstructPixToPixConditioning",
            vec![
                ("positive", positive.clone()),
                ("negative", positive),
                ("vae", loaded[2].clone()),
                ("pixels", Value::object(Image::new(1, 64, 64, 3, pixels).unwrap())),
            ],
        )
        .unwrap()
}

/// What that step gives from σ_max: seed 5's noise over the latent in model space, the UNet
/// called with `extra` channels after the scaled input, the denoised latent out of model space.
fn expected_step(model: &DiffusionModel, latent_in: &Tensor, extra: &[&Tensor], text: &Tensor) -> Tensor {
    let sigma = model.schedule.sigma_max();
    let shape = latent_in.dims().to_vec();
    let noise = Tensor::from_vec(prepare_noise(5, &shape, None), shape.as_slice(), &Device::Cpu).unwrap();
    let x = ((&noise * f64::from((1.0 + sigma * sigma).sqrt())).unwrap() + latent_in).unwrap();
    let scaled = (&x / f64::from((sigma * sigma + 1.0).sqrt())).unwrap();
    let input = Tensor::cat(&[&[&scaled], extra].concat(), 1).unwrap();
    let timesteps = Tensor::new(&[999f32], &Device::Cpu).unwrap();
    let eps = model
        .network
        .unet()
        .unwrap()
        .forward(&UNetInput::new(&input, &timesteps, text))
        .unwrap();
    ((&x - (eps * f64::from(sigma)).unwrap()).unwrap() / 0.18215).unwrap()
}

#[test]
fn the_masked_image_and_mask_are_the_extra_input_channels() {
    let setup = setup();
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD1_INPAINTING_CHECKPOINT)))],
        )
        .unwrap();
    let model = loaded[0].downcast::<Model>().unwrap().0.clone();
    assert_eq!(model.network.unet().unwrap().config().in_channels, 9);
    let positive = setup
        .call(
            "CLIPTextEncode",
            vec![("text", j(json!("a red balloon"))), ("clip", loaded[1].clone())],
        )
        .unwrap()
        .remove(0);
    let pixels: Vec<f32> = (0..64 * 64 * 3).map(|i| ((i * 7) % 255) as f32 / 255.0).collect();
    let image = Image::new(1, 64, 64, 3, pixels).unwrap();
    // The left half of the image: exactly the left four latent columns after resizing.
    let mask = Mask {
        batch: 1,
        height: 64,
        width: 64,
        data: (0..64 * 64).map(|i| if i % 64 < 32 { 1.0 } else { 0.0 }).collect(),
    };
    let conditioned = setup
        .call(
            "InpaintModelConditioning",
            vec![
                ("positive", positive.clone()),
                ("negative", positive),
                ("vae", loaded[2].clone()),
                ("pixels", Value::object(image)),
                ("mask", Value::object(mask)),
                ("noise_mask", j(json!(false))),
            ],
        )
        .unwrap();
    let latent = conditioned[2].downcast::<Latent>().unwrap().clone();
    assert!(latent.noise_mask.is_none());
    let entry = conditioned[0].downcast::<Conditioning>().unwrap().0[0].clone();
    let inpaint = entry.concat_image.clone().unwrap();
    assert!(
        max_abs_difference(&inpaint.latent, &latent.samples) > 1e-3,
        "the masked image differs"
    );
    let sampled = one_karras_step(&setup, &loaded[0], &conditioned);

    let mask_channel: Vec<f32> = (0..64).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect();
    let mask_channel = Tensor::from_vec(mask_channel, (1, 1, 8, 8), &Device::Cpu).unwrap();
    let masked_image = (inpaint.latent.to_dtype(DType::F32).unwrap() * 0.18215).unwrap();
    let latent_in = (&latent.samples * 0.18215).unwrap();
    let expected = expected_step(
        &model,
        &latent_in,
        &[&mask_channel, &masked_image],
        &entry.cross_attention,
    );
    let difference = max_abs_difference(&sampled, &expected);
    assert!(difference < 1e-3, "max difference {difference}");
}

#[test]
fn instruct_pix2pix_models_see_the_raw_image_latent() {
    let setup = setup();
    let paths = setup.services.get::<easel_nodes::paths::Paths>().unwrap();
    let unet = UNetConfig {
        in_channels: 8,
        ..tiny_sd1_unet()
    };
    let layout = sd1_checkpoint_layout(&unet, &tiny_clip_l(), &tiny_sd_vae()).unwrap();
    write_checkpoint(&paths.models.join("checkpoints").join("ip2p.safetensors"), &layout).unwrap();
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!("ip2p.safetensors")))],
        )
        .unwrap();
    let model = loaded[0].downcast::<Model>().unwrap().0.clone();
    let conditioned = ip2p_conditioned(&setup, &loaded);
    let entry = conditioned[0].downcast::<Conditioning>().unwrap().0[0].clone();
    let image_latent = entry.concat_image.clone().unwrap().latent;
    let sampled = one_karras_step(&setup, &loaded[0], &conditioned);

    // The latent to sample is zeros; the image's latent goes in raw (not scaled into model space).
    let zeros = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let image_latent = image_latent.to_dtype(DType::F32).unwrap();
    let expected = expected_step(&model, &zeros, &[&image_latent], &entry.cross_attention);
    let difference = max_abs_difference(&sampled, &expected);
    assert!(difference < 1e-3, "max difference {difference}");
}

/// CosXL Edit (an 8-channel SDXL file with `edm_vpred.sigma_max`) takes the image's latent in
/// model space: it samples as the same file without the key, on the same EDM v-prediction
/// schedule, given that latent already scaled.
#[test]
fn cosxl_edit_sees_the_image_latent_in_model_space() {
    use easel_models::checkpoint::{SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX};
    use easel_models::testmodels::{checkpoint_layout, tiny_clip_g, tiny_sdxl_unet};
    let setup = setup();
    let folder = common::models_folder(&setup, "checkpoints");
    let (clip_l, clip_g) = (tiny_clip_l(), tiny_clip_g());
    let unet = UNetConfig {
        in_channels: 8,
        ..tiny_sdxl_unet(clip_l.hidden_size + clip_g.hidden_size, 6)
    };
    let encoders = [(SDXL_CLIP_L_PREFIX, &clip_l), (SDXL_CLIP_G_PREFIX, &clip_g)];
    let layout = checkpoint_layout(&unet, &encoders, &tiny_sd_vae()).unwrap();
    write_checkpoint(&folder.join("sdxl_ip2p.safetensors"), &layout).unwrap();
    common::copy_with_scalars(
        &folder.join("sdxl_ip2p.safetensors"),
        &folder.join("cosxl_edit.safetensors"),
        &[("edm_vpred.sigma_max", 120.0)],
    );

    let load = |name: &str| {
        setup
            .call("CheckpointLoaderSimple", vec![("ckpt_name", j(json!(name)))])
            .unwrap()
    };
    let cosxl = load("cosxl_edit.safetensors");
    let plain = load("sdxl_ip2p.safetensors");
    let plain_edm = setup
        .call(
            "ModelSamplingContinuousEDM",
            vec![
                ("model", plain[0].clone()),
                ("sampling", j(json!("v_prediction"))),
                ("sigma_max", j(json!(120.0))),
                ("sigma_min", j(json!(0.002))),
            ],
        )
        .unwrap()
        .remove(0);
    let conditioned = ip2p_conditioned(&setup, &cosxl);
    let sampled = one_karras_step(&setup, &cosxl[0], &conditioned);
    // The same entries with the image's latent scaled into model space (SDXL: × 0.13025).
    let scaled: Vec<Value> = conditioned[..2]
        .iter()
        .map(|side| {
            let mut entries = side.downcast::<Conditioning>().unwrap().0.clone();
            for entry in &mut entries {
                let concat = entry.concat_image.as_mut().unwrap();
                concat.latent = (&concat.latent * 0.13025).unwrap();
            }
            Value::object(Conditioning(entries))
        })
        .collect();
    let expected = one_karras_step(
        &setup,
        &plain_edm,
        &[scaled[0].clone(), scaled[1].clone(), conditioned[2].clone()],
    );
    assert!(max_abs_difference(&sampled, &expected) < 1e-6);
    // Without the scaling the plain file sees another image: the scaling matters.
    let unscaled = one_karras_step(&setup, &plain_edm, &conditioned);
    assert!(max_abs_difference(&sampled, &unscaled) > 1e-6);
}
