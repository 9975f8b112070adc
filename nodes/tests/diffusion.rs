//! The diffusion nodes on the tiny SD1.x test model: a sampler step equals the update rule
//! computed by hand, every sampler runs, latents taken from a batch get the noise they had in
//! the batch, the latent nodes keep ComfyUI's batch bookkeeping, and the tiled VAE nodes agree
//! with the whole passes.

use std::sync::Arc;

mod common;

use candle_core::{Device, Tensor};
use common::{flat, j, ksampler, sd1_inputs as inputs, setup, setup_with};
use easel_engine::Value;
use easel_models::architectures::unet::UNetInput;
use easel_models::sampling::noise::prepare_noise;
use easel_models::sampling::samplers::SAMPLER_NAMES;
use easel_nodes::builtin_registry;
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::Model;
use easel_nodes::paths::Paths;
use serde_json::json;

#[test]
fn one_euler_step_is_the_update_rule() {
    let setup = setup();
    let (loaded, positive, _, latent) = inputs(&setup, 1);
    // cfg 1: only the positive prompt is evaluated.
    let sampled = ksampler(&setup, &loaded[0], &positive, &positive, &latent, "euler", 1, 1.0).unwrap();

    let model = &loaded[0].downcast::<Model>().unwrap().0;
    let context = positive
        .downcast::<easel_nodes::conditioning::Conditioning>()
        .unwrap()
        .0[0]
        .cross_attention
        .clone();
    let sigma_max = model.schedule.sigma_max();
    let noise = Tensor::from_vec(prepare_noise(7, &[1, 4, 8, 8], None), (1, 4, 8, 8), &Device::Cpu).unwrap();
    // Karras with one step gives [σ_max, 0]; the empty latent is not scaled; full noise scaling.
    let x = (&noise * f64::from((1.0 + sigma_max * sigma_max).sqrt())).unwrap();
    let scaled = (&x / f64::from((sigma_max * sigma_max + 1.0).sqrt())).unwrap();
    let timesteps = Tensor::new(&[999f32], &Device::Cpu).unwrap();
    let input = UNetInput::new(&scaled, &timesteps, &context);
    let eps = model.network.unet().unwrap().forward(&input).unwrap();
    let denoised = (&x - (&eps * f64::from(sigma_max)).unwrap()).unwrap();
    let d = ((&x - &denoised).unwrap() / f64::from(sigma_max)).unwrap();
    let expected = ((&x + (d * f64::from(-sigma_max)).unwrap()).unwrap() / 0.18215).unwrap();
    let worst = flat(&sampled)
        .iter()
        .zip(flat(&expected))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "max difference {worst}");
}

/// Inpainting as ComfyUI's `KSamplerX0Inpaint`: outside the mask the network sees the original
/// latent noised to σ and its prediction is replaced by the original, so one Euler step keeps
/// the unmasked half and changes the other, exactly as computed here by hand.
#[test]
fn one_masked_euler_step_changes_only_the_masked_half() {
    let setup = setup();
    let (loaded, positive, _, _) = inputs(&setup, 1);
    let original = (Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap() * 3.0).unwrap();
    // Left half of the 64×64 image: exactly the left four latent columns after resizing.
    let mask_values: Vec<f32> = (0..64 * 64).map(|i| if i % 64 < 32 { 1.0 } else { 0.0 }).collect();
    let mask = easel_nodes::image::Mask {
        batch: 1,
        height: 64,
        width: 64,
        data: mask_values,
    };
    let masked = setup
        .call(
            "SetLatentNoiseMask",
            vec![
                ("samples", Value::object(Latent::new(original.clone()))),
                ("mask", Value::object(mask)),
            ],
        )
        .unwrap();
    let sampled = ksampler(&setup, &loaded[0], &positive, &positive, &masked[0], "euler", 1, 1.0).unwrap();
    assert!(sampled.dims() == [1, 4, 8, 8]);

    let model = &loaded[0].downcast::<Model>().unwrap().0;
    let context = positive
        .downcast::<easel_nodes::conditioning::Conditioning>()
        .unwrap()
        .0[0]
        .cross_attention
        .clone();
    let sigma = f64::from(model.schedule.sigma_max());
    let noise = Tensor::from_vec(prepare_noise(7, &[1, 4, 8, 8], None), (1, 4, 8, 8), &Device::Cpu).unwrap();
    let columns: Vec<f32> = (0..4 * 8 * 8).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect();
    let m = Tensor::from_vec(columns, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let keep = (1.0 - &m).unwrap();
    let latent_in = (&original * 0.18215).unwrap();
    let x = ((&noise * (1.0 + sigma * sigma).sqrt()).unwrap() + &latent_in).unwrap();
    let noised = ((&noise * sigma).unwrap() + &latent_in).unwrap();
    let input = ((&x * &m).unwrap() + (&noised * &keep).unwrap()).unwrap();
    let scaled = (&input / (sigma * sigma + 1.0).sqrt()).unwrap();
    let timesteps = Tensor::new(&[999f32], &Device::Cpu).unwrap();
    let eps = model
        .network
        .unet()
        .unwrap()
        .forward(&UNetInput::new(&scaled, &timesteps, &context))
        .unwrap();
    let denoised = (&input - (&eps * sigma).unwrap()).unwrap();
    let kept = ((&denoised * &m).unwrap() + (&latent_in * &keep).unwrap()).unwrap();
    let d = ((&x - &kept).unwrap() / sigma).unwrap();
    let expected = ((&x + (d * -sigma).unwrap()).unwrap() / 0.18215).unwrap();
    let (sampled, expected, original) = (flat(&sampled), flat(&expected), flat(&original));
    let worst = sampled
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "max difference {worst}");
    for (index, (value, before)) in sampled.iter().zip(&original).enumerate() {
        if index % 8 < 4 {
            assert!((value - before).abs() > 1e-3, "masked value {index} kept");
        } else {
            assert!(
                (value - before).abs() < 1e-3,
                "unmasked value {index} changed: {before} → {value}"
            );
        }
    }
}

/// The batch nodes carry a noise mask as ComfyUI does: one item is shared, several follow the
/// latents (tiled to their count first), and repeating a batch repeats the mask.
#[test]
fn batch_nodes_carry_the_noise_mask() {
    let setup = setup();
    let mask = |batch: usize| easel_nodes::image::Mask {
        batch,
        height: 2,
        width: 2,
        data: (0..batch * 4).map(|i| (i / 4) as f32).collect(),
    };
    let latent = |batch: usize, mask_batch: usize| {
        let samples = Tensor::zeros((batch, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        Value::object(Latent {
            noise_mask: Some(mask(mask_batch)),
            ..Latent::new(samples)
        })
    };
    let items = |value: &Value| {
        let mask = value.downcast::<Latent>().unwrap().noise_mask.clone().unwrap();
        mask.data.chunks(4).map(|item| item[0]).collect::<Vec<f32>>()
    };
    let from_batch = |latent: Value, start: i64, length: i64| {
        setup
            .call(
                "LatentFromBatch",
                vec![
                    ("samples", latent),
                    ("batch_index", j(json!(start))),
                    ("length", j(json!(length))),
                ],
            )
            .unwrap()
            .remove(0)
    };
    assert_eq!(items(&from_batch(latent(4, 4), 1, 2)), vec![1.0, 2.0]);
    assert_eq!(items(&from_batch(latent(4, 1), 2, 2)), vec![0.0]);
    assert_eq!(items(&from_batch(latent(4, 3), 2, 2)), vec![2.0, 0.0]);
    let repeat = |latent: Value| {
        setup
            .call("RepeatLatentBatch", vec![("samples", latent), ("amount", j(json!(2)))])
            .unwrap()
            .remove(0)
    };
    assert_eq!(items(&repeat(latent(2, 2))), vec![0.0, 1.0, 0.0, 1.0]);
    assert_eq!(items(&repeat(latent(2, 1))), vec![0.0]);
}

/// VAEEncodeForInpaint: the image is cropped to a multiple of 8 around its centre, the masked
/// pixels turn grey, and the noise mask is the mask grown by a box of `grow_mask_by` pixels.
#[test]
fn encode_for_inpaint_greys_the_mask_and_grows_it() {
    use easel_nodes::image::{Image, Mask};
    let setup = setup();
    let (loaded, _, _, _) = inputs(&setup, 1);
    // 18×20 crops to 16×16 from row 1, column 2.
    let (height, width) = (18, 20);
    let data: Vec<f32> = (0..height * width * 3).map(|i| (i % 7) as f32 / 7.0).collect();
    let image = Image::new(1, height, width, 3, data.clone()).unwrap();
    let mut mask = Mask::filled(1, height, width, 0.0);
    mask.data[6 * width + 8] = 1.0; // (5, 6) after cropping
    let out = setup
        .call(
            "VAEEncodeForInpaint",
            vec![
                ("pixels", Value::object(image)),
                ("vae", loaded[2].clone()),
                ("mask", Value::object(mask)),
                ("grow_mask_by", j(json!(3))),
            ],
        )
        .unwrap();
    let latent = out[0].downcast::<Latent>().unwrap();
    assert_eq!(latent.samples.dims(), &[1, 4, 2, 2]);
    let noise_mask = latent.noise_mask.as_ref().unwrap();
    assert_eq!((noise_mask.batch, noise_mask.height, noise_mask.width), (1, 16, 16));
    for y in 0..16 {
        for x in 0..16 {
            let inside = (4..=6).contains(&y) && (5..=7).contains(&x);
            assert_eq!(
                noise_mask.data[y * 16 + x],
                if inside { 1.0 } else { 0.0 },
                "({y}, {x})"
            );
        }
    }
}

/// ConditioningAverage weighs each entry against the source cut or zero-padded to its tokens,
/// pooled vectors too; ConditioningConcat appends the source's tokens.
#[test]
fn conditioning_average_and_concat_combine_tokens_as_comfyui() {
    use easel_nodes::conditioning::{CondEntry, Conditioning};
    let setup = setup();
    let entry = |tokens: usize, value: f32, pooled: Option<f32>| CondEntry {
        timestep_range: Some((0.0, 0.5)),
        ..CondEntry::new(
            Tensor::full(value, (1, tokens, 2), &Device::Cpu).unwrap(),
            pooled.map(|p| Tensor::full(p, (1, 2), &Device::Cpu).unwrap()),
        )
    };
    let to = Value::object(Conditioning(vec![entry(3, 4.0, Some(8.0)), entry(1, 2.0, None)]));
    let from = Value::object(Conditioning(vec![entry(2, 1.0, Some(0.0))]));
    let out = setup
        .call(
            "ConditioningAverage",
            vec![
                ("conditioning_to", to.clone()),
                ("conditioning_from", from.clone()),
                ("conditioning_to_strength", j(json!(0.25))),
            ],
        )
        .unwrap();
    let averaged = &out[0].downcast::<Conditioning>().unwrap().0;
    assert_eq!(
        flat(&averaged[0].cross_attention),
        vec![1.75, 1.75, 1.75, 1.75, 1.0, 1.0]
    );
    assert_eq!(flat(averaged[0].pooled.as_ref().unwrap()), vec![2.0, 2.0]);
    assert_eq!(averaged[0].timestep_range, Some((0.0, 0.5)));
    assert_eq!(flat(&averaged[1].cross_attention), vec![1.25, 1.25]);
    assert_eq!(flat(averaged[1].pooled.as_ref().unwrap()), vec![0.0, 0.0]);
    let out = setup
        .call(
            "ConditioningConcat",
            vec![("conditioning_to", to), ("conditioning_from", from)],
        )
        .unwrap();
    let joined = &out[0].downcast::<Conditioning>().unwrap().0;
    assert_eq!(
        flat(&joined[0].cross_attention),
        vec![4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    );
    assert_eq!(joined[1].cross_attention.dims(), &[1, 3, 2]);
    let empty = Value::object(Conditioning(vec![]));
    let error = setup
        .call(
            "ConditioningConcat",
            vec![("conditioning_to", empty.clone()), ("conditioning_from", empty)],
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("list index out of range"), "{error}");
}

#[test]
fn every_sampler_runs_on_the_tiny_model() {
    let setup = setup();
    let (loaded, positive, negative, latent) = inputs(&setup, 1);
    for sampler in SAMPLER_NAMES {
        let result = ksampler(&setup, &loaded[0], &positive, &negative, &latent, sampler, 3, 6.0);
        let samples = result.unwrap_or_else(|e| panic!("{sampler}: {e}"));
        assert_eq!(samples.dims(), &[1, 4, 8, 8]);
        assert!(flat(&samples).iter().all(|v| v.is_finite()), "{sampler}");
    }
    // Ancestral samplers draw their per-step noise from the seed: the same seed gives the same latent.
    let a = ksampler(
        &setup,
        &loaded[0],
        &positive,
        &negative,
        &latent,
        "euler_ancestral",
        3,
        6.0,
    )
    .unwrap();
    let b = ksampler(
        &setup,
        &loaded[0],
        &positive,
        &negative,
        &latent,
        "euler_ancestral",
        3,
        6.0,
    )
    .unwrap();
    assert_eq!(flat(&a), flat(&b));
}

#[test]
fn a_latent_taken_from_a_batch_samples_as_it_did_in_the_batch() {
    let setup = setup();
    let (loaded, positive, negative, batch) = inputs(&setup, 3);
    let whole = ksampler(&setup, &loaded[0], &positive, &negative, &batch, "euler", 2, 5.0).unwrap();
    let second = setup
        .call(
            "LatentFromBatch",
            vec![
                ("samples", batch.clone()),
                ("batch_index", j(json!(1))),
                ("length", j(json!(1))),
            ],
        )
        .unwrap()[0]
        .clone();
    assert_eq!(second.downcast::<Latent>().unwrap().batch_index, Some(vec![1]));
    let alone = ksampler(&setup, &loaded[0], &positive, &negative, &second, "euler", 2, 5.0).unwrap();
    let expected = flat(&whole.narrow(0, 1, 1).unwrap());
    let worst = flat(&alone)
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "max difference {worst}");

    let repeated = setup
        .call("RepeatLatentBatch", vec![("samples", second), ("amount", j(json!(3)))])
        .unwrap()[0]
        .clone();
    let repeated = repeated.downcast::<Latent>().unwrap();
    assert_eq!(repeated.samples.dims(), &[3, 4, 8, 8]);
    assert_eq!(repeated.batch_index, Some(vec![1, 2, 3]));

    let upscaled = setup
        .call(
            "LatentUpscale",
            vec![
                ("samples", batch.clone()),
                ("upscale_method", j(json!("bilinear"))),
                ("width", j(json!(96))),
                ("height", j(json!(0))),
                ("crop", j(json!("disabled"))),
            ],
        )
        .unwrap()[0]
        .clone();
    assert_eq!(upscaled.downcast::<Latent>().unwrap().samples.dims(), &[3, 4, 12, 12]);
    let upscale_by = |scale: f64| {
        setup.call(
            "LatentUpscaleBy",
            vec![
                ("samples", batch.clone()),
                ("upscale_method", j(json!("nearest-exact"))),
                ("scale_by", j(json!(scale))),
            ],
        )
    };
    let by = upscale_by(1.5).unwrap()[0].clone();
    assert_eq!(by.downcast::<Latent>().unwrap().samples.dims(), &[3, 4, 12, 12]);
    // A scale that rounds the size to nothing fails, as torch's interpolate does in ComfyUI.
    assert!(upscale_by(0.01).is_err());
}

#[test]
fn decoding_and_encoding_round_trip_shapes_and_clip_skip_changes_the_prompt() {
    let setup = setup();
    let (loaded, positive, _, latent) = inputs(&setup, 2);
    let images = setup
        .call("VAEDecode", vec![("samples", latent), ("vae", loaded[2].clone())])
        .unwrap()[0]
        .clone();
    let image = images.downcast::<easel_nodes::image::Image>().unwrap();
    assert_eq!((image.batch, image.height, image.width, image.channels), (2, 64, 64, 3));
    assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)));
    let encoded = setup
        .call(
            "VAEEncode",
            vec![("pixels", images.clone()), ("vae", loaded[2].clone())],
        )
        .unwrap()[0]
        .clone();
    assert_eq!(encoded.downcast::<Latent>().unwrap().samples.dims(), &[2, 4, 8, 8]);

    let skipped = setup
        .call(
            "CLIPSetLastLayer",
            vec![("clip", loaded[1].clone()), ("stop_at_clip_layer", j(json!(-2)))],
        )
        .unwrap()[0]
        .clone();
    let encode = |clip: &Value| {
        let out = setup
            .call(
                "CLIPTextEncode",
                vec![("text", j(json!("a (red:1.2) fox"))), ("clip", clip.clone())],
            )
            .unwrap();
        flat(&out[0].downcast::<easel_nodes::conditioning::Conditioning>().unwrap().0[0].cross_attention)
    };
    let last = encode(&loaded[1]);
    assert_eq!(
        last,
        flat(
            &positive
                .downcast::<easel_nodes::conditioning::Conditioning>()
                .unwrap()
                .0[0]
                .cross_attention
        )
    );
    assert_ne!(encode(&skipped), last);
}

#[test]
fn sampling_sends_a_jpeg_preview_with_each_step_when_previews_are_on() {
    use easel_engine::events::{Event, EventKind};
    use easel_engine::{validate_prompt, CacheMode, Executor, Interrupt, Prompt};
    use easel_nodes::sampling::preview::{PreviewMethod, PreviewSettings};

    let setup = setup_with(|services| {
        services.insert(PreviewSettings {
            method: PreviewMethod::Latent2Rgb,
            max_size: 256,
        })
    });
    let services = setup.services.clone();
    let registry = Arc::new(builtin_registry());
    let workflow: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../workflows/sd15_txt2img.json")).unwrap(),
    )
    .unwrap();
    let validated = validate_prompt(&registry, &services, Prompt::from_json(workflow).unwrap(), None).unwrap();
    let events = std::sync::Mutex::new(Vec::new());
    let sink = |event: Event| events.lock().unwrap().push(event);
    Executor::new(registry, services, CacheMode::None).execute(
        "p",
        &validated,
        &serde_json::Value::Null,
        &sink,
        &Interrupt::new(),
    );
    let previews: Vec<Vec<u8>> = events
        .into_inner()
        .unwrap()
        .into_iter()
        .filter(|event| event.kind == EventKind::Preview)
        .filter_map(|event| event.image.map(|bytes| bytes.to_vec()))
        .collect();
    assert_eq!(previews.len(), 4, "one preview per step");
    for preview in previews {
        let image = image::load_from_memory(&preview).unwrap();
        assert_eq!(image::guess_format(&preview).unwrap(), image::ImageFormat::Jpeg);
        assert_eq!((image.width(), image.height()), (256, 256));
    }
}

fn decoded(value: &Value) -> Vec<f32> {
    value.downcast::<easel_nodes::image::Image>().unwrap().data.clone()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn tiled_vae_nodes_equal_the_whole_pass_when_one_tile_covers_it_and_tile_otherwise() {
    let setup = setup();
    let (loaded, _, _, _) = inputs(&setup, 1);
    let vae = loaded[2].clone();
    let samples = Tensor::randn(0f32, 1.0, (1, 4, 16, 16), &Device::Cpu).unwrap();
    let latent = Value::object(Latent::new(samples));
    let whole = setup
        .call("VAEDecode", vec![("samples", latent.clone()), ("vae", vae.clone())])
        .unwrap()[0]
        .clone();
    let decode_tiled = |tile: i64, overlap: i64| {
        setup
            .call(
                "VAEDecodeTiled",
                vec![
                    ("samples", latent.clone()),
                    ("vae", vae.clone()),
                    ("tile_size", j(json!(tile))),
                    ("overlap", j(json!(overlap))),
                    ("temporal_size", j(json!(64))),
                    ("temporal_overlap", j(json!(8))),
                ],
            )
            .unwrap()[0]
            .clone()
    };
    assert!(max_difference(&decoded(&decode_tiled(512, 64)), &decoded(&whole)) < 1e-5);
    let tiled = decode_tiled(64, 32);
    let image = tiled.downcast::<easel_nodes::image::Image>().unwrap();
    assert_eq!(
        (image.batch, image.height, image.width, image.channels),
        (1, 128, 128, 3)
    );
    assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)));

    let encode = |class: &str, extra: Vec<(&str, Value)>| {
        let mut inputs = vec![("pixels", whole.clone()), ("vae", vae.clone())];
        inputs.extend(extra);
        setup
            .call(class, inputs)
            .map(|out| flat(&out[0].downcast::<Latent>().unwrap().samples))
    };
    let tiled_inputs = |tile: i64, overlap: i64| {
        vec![
            ("tile_size", j(json!(tile))),
            ("overlap", j(json!(overlap))),
            ("temporal_size", j(json!(64))),
            ("temporal_overlap", j(json!(8))),
        ]
    };
    let plain = encode("VAEEncode", vec![]).unwrap();
    assert!(max_difference(&encode("VAEEncodeTiled", tiled_inputs(512, 64)).unwrap(), &plain) < 1e-5);
    assert_eq!(
        encode("VAEEncodeTiled", tiled_inputs(64, 16)).unwrap().len(),
        plain.len()
    );
    let error = encode("VAEEncodeTiled", tiled_inputs(64, 64)).unwrap_err();
    assert!(error.to_string().contains("larger than the overlap"), "{error}");
}

/// Orthogonal unit vectors e₁, e₂ side by side, doubled in width: the new positions at ¼ and ¾
/// lie on the unit circle between them (ComfyUI's bislerp), not on the chord.
#[test]
fn bislerp_interpolates_channel_vectors_on_the_sphere() {
    let setup = setup();
    let samples = Tensor::from_vec(vec![1f32, 0.0, 0.0, 1.0], (1, 2, 1, 2), &Device::Cpu).unwrap();
    let latent = Value::object(Latent::new(samples));
    let upscaled = setup
        .call(
            "LatentUpscaleBy",
            vec![
                ("samples", latent),
                ("upscale_method", j(json!("bislerp"))),
                ("scale_by", j(json!(2.0))),
            ],
        )
        .unwrap()[0]
        .clone();
    let samples = upscaled.downcast::<Latent>().unwrap().samples.clone();
    assert_eq!(samples.dims(), &[1, 2, 2, 4]);
    let (c, s) = (
        (std::f32::consts::FRAC_PI_8 * 3.0).sin(),
        std::f32::consts::FRAC_PI_8.sin(),
    );
    let expected_row = [[1.0, c, s, 0.0], [0.0, s, c, 1.0]];
    let values = samples.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
    for (channel, expected) in expected_row.iter().enumerate() {
        for row in &values[channel] {
            for (actual, expected) in row.iter().zip(expected) {
                assert!((actual - expected).abs() < 1e-6, "{values:?}");
            }
        }
    }
}

/// `embedding:name` finds the textual inversion in `models/embeddings` (a safetensors file or an
/// A1111 `.pt` pickle), with or without its extension; unknown names are dropped.
#[test]
fn textual_inversions_load_from_the_embeddings_folder() {
    use easel_models::testmodels::{tiny_clip_l, tiny_embedding_vectors, TINY_EMBEDDING, TINY_EMBEDDING_PT};
    use easel_models::text::embeddings::EmbeddingFolder;
    use easel_models::text::tokenizer::{tokenize_with_weights, TokenItem, END_TOKEN};

    let setup = setup();
    let paths = setup.services.get::<Paths>().unwrap();
    let find_file = |name: &str| paths.full_path("embeddings", name);
    let folder = EmbeddingFolder::new(&find_file, "clip_l", tiny_clip_l().hidden_size);
    let expected = tiny_embedding_vectors();
    for prompt in [
        format!("a embedding:{TINY_EMBEDDING} fox"),
        format!("a embedding:{TINY_EMBEDDING}.safetensors fox"),
        format!("a (embedding:{TINY_EMBEDDING_PT}:1.2) fox"),
    ] {
        let chunks = tokenize_with_weights(&prompt, &folder, END_TOKEN);
        let vectors: Vec<Vec<f32>> = chunks[0]
            .iter()
            .filter_map(|(item, _)| match item {
                TokenItem::Embedding(vector) => Some(vector.clone()),
                TokenItem::Token(_) => None,
            })
            .collect();
        assert_eq!(vectors, expected, "{prompt}");
    }
    let wrong_width = EmbeddingFolder::new(&find_file, "clip_l", 768);
    let chunks = tokenize_with_weights(&format!("embedding:{TINY_EMBEDDING}"), &wrong_width, END_TOKEN);
    assert!(chunks[0].iter().all(|(item, _)| matches!(item, TokenItem::Token(_))));

    let (loaded, _, _, _) = inputs(&setup, 1);
    let encode = |text: &str| {
        let out = setup
            .call(
                "CLIPTextEncode",
                vec![("text", j(json!(text))), ("clip", loaded[1].clone())],
            )
            .unwrap();
        flat(&out[0].downcast::<easel_nodes::conditioning::Conditioning>().unwrap().0[0].cross_attention)
    };
    assert_ne!(encode(&format!("a embedding:{TINY_EMBEDDING} fox")), encode("a fox"));
    assert_eq!(encode("a embedding:missing fox"), encode("a fox"));
}

/// An impossible size fails with a clear error before anything is allocated, and the memory a
/// UNet needs grows with the latent as expected.
#[test]
fn oversized_latents_are_refused_before_allocation() {
    let setup = setup();
    let error = setup
        .call(
            "EmptyLatentImage",
            vec![
                ("width", j(json!(16384))),
                ("height", j(json!(16384))),
                ("batch_size", j(json!(4096))),
            ],
        )
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("an empty latent of 16384×16384 (batch 4096) needs about 256.0 GiB"),
        "{text}"
    );
    let serialized = format!("{error:?}");
    assert!(serialized.contains("OutOfMemoryError"), "{serialized}");

    let (loaded, _, _, _) = inputs(&setup, 1);
    let unet = &loaded[0].downcast::<Model>().unwrap().0.network.unet().unwrap();
    let small = unet.working_memory(1, 8, 8);
    assert_eq!(unet.working_memory(2, 16, 16), small * 8);
    assert!(
        unet.working_memory(1, 2048, 2048) > 1 << 34,
        "a 16384² image needs more than 16 GiB"
    );
}
