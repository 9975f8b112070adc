//! SD2.x, SDXL and the SDXL refiner on the tiny test models: what is recognised in their files,
//! how their text encoders are read and combined, SDXL's class conditioning, v-prediction, and
//! the errors for conditioning of the wrong family.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{j, max_abs_difference, rewrite_f16_file, setup, Setup};
use easel_engine::Value;
use easel_models::architectures::clip_text::{ClipTextEncoder, OutputLayer};
use easel_models::architectures::unet::UNetInput;
use easel_models::checkpoint::{detect_checkpoint, Family, TextEncoderKind};
use easel_models::formats::fp8::Fp8Format;
use easel_models::testmodels::{
    self, TINY_CLIP_G, TINY_SD2_CHECKPOINT, TINY_SDXL_CHECKPOINT, TINY_SDXL_REFINER_CHECKPOINT, TINY_SDXL_UNET,
};
use easel_models::text::tokenizer::{tokenize_with_weights, NoEmbeddings, TokenItem, END_TOKEN};
use easel_models::weights::SafetensorsFile;
use easel_nodes::conditioning::{CondEntry, Conditioning, SdxlSizes};
use easel_nodes::model::clip::{Clip, TextEncoder, TextNetwork};
use easel_nodes::model::diffusion_model::{Model, Prediction};
use easel_nodes::paths::Paths;
use serde_json::json;

fn load(setup: &Setup, checkpoint: &str) -> (Model, Clip) {
    let out = setup
        .call("CheckpointLoaderSimple", vec![("ckpt_name", j(json!(checkpoint)))])
        .unwrap();
    (
        out[0].downcast::<Model>().unwrap().clone(),
        out[1].downcast::<Clip>().unwrap().clone(),
    )
}

fn encode(setup: &Setup, clip: &Clip, text: &str) -> Conditioning {
    let out = setup
        .call(
            "CLIPTextEncode",
            vec![("text", j(json!(text))), ("clip", Value::object(clip.clone()))],
        )
        .unwrap();
    out[0].downcast::<Conditioning>().unwrap().clone()
}

#[test]
fn the_tiny_checkpoints_are_recognised_as_their_families() {
    let setup = setup();
    let paths = setup.services.get::<Paths>().unwrap();
    let expected = [
        (TINY_SD2_CHECKPOINT, Family::Sd2, vec![TextEncoderKind::ClipH]),
        (
            TINY_SDXL_CHECKPOINT,
            Family::Sdxl,
            vec![TextEncoderKind::ClipL, TextEncoderKind::ClipG],
        ),
        (
            TINY_SDXL_REFINER_CHECKPOINT,
            Family::SdxlRefiner,
            vec![TextEncoderKind::ClipG],
        ),
    ];
    for (name, family, kinds) in expected {
        let file = SafetensorsFile::open(&paths.full_path("checkpoints", name).unwrap()).unwrap();
        let layout = detect_checkpoint(&file).unwrap();
        assert_eq!(layout.family, family, "{name}");
        assert!(!layout.v_prediction, "{name}");
        let found: Vec<_> = layout.text_encoders.iter().map(|e| e.kind).collect();
        assert_eq!(found, kinds, "{name}");
        assert!(layout.vae.is_some(), "{name}");
    }
    let sdxl = SafetensorsFile::open(&paths.full_path("checkpoints", TINY_SDXL_CHECKPOINT).unwrap()).unwrap();
    let layout = detect_checkpoint(&sdxl).unwrap();
    assert_eq!(layout.unet, testmodels::tiny_sdxl_unet(160, 6));
    assert_eq!(layout.text_encoders[1].config, testmodels::tiny_clip_g());
}

fn clip_network(encoder: &TextEncoder) -> &ClipTextEncoder {
    match &encoder.network {
        TextNetwork::Clip { encoder, .. } => encoder,
        TextNetwork::T5 { .. } => panic!("a CLIP text encoder was expected"),
    }
}

/// SDXL's conditioning is CLIP-L's and CLIP-G's penultimate hidden states (without the final
/// norm) side by side, its pooled output CLIP-G's projected one; CLIP-G pads with 0.
#[test]
fn sdxl_text_encoding_joins_both_encoders_as_comfyui() {
    let setup = setup();
    let (_, clip) = load(&setup, TINY_SDXL_CHECKPOINT);
    let text = "a (lighthouse:1.2) at dusk";
    let conditioning = encode(&setup, &clip, text);
    let entry = &conditioning.0[0];
    assert_eq!(entry.cross_attention.dims(), &[1, 77, 64 + 96]);

    let [clip_l, clip_g] = [&clip.encoders[0], &clip.encoders[1]];
    let options_l = clip.options(TextEncoderKind::ClipL);
    let options_g = clip.options(TextEncoderKind::ClipG);
    assert_eq!(options_l.layer, OutputLayer::FromEnd(2));
    assert!(!options_l.layer_norm_hidden && !options_g.layer_norm_hidden);
    assert_eq!((options_l.pad_token, options_g.pad_token), (END_TOKEN, 0));
    let tokens_g = tokenize_with_weights(text, &NoEmbeddings, 0);
    assert_eq!(tokens_g[0].last().unwrap().0, TokenItem::Token(0), "CLIP-G pads with 0");
    let l = clip_network(clip_l)
        .encode_weighted(&tokenize_with_weights(text, &NoEmbeddings, END_TOKEN), options_l)
        .unwrap();
    let g = clip_network(clip_g).encode_weighted(&tokens_g, options_g).unwrap();
    let expected = Tensor::cat(&[&l.hidden, &g.hidden], D::Minus1).unwrap();
    assert_eq!(max_abs_difference(&entry.cross_attention, &expected), 0.0);

    // The pooled vector is CLIP-G's final-normed end-token state times the projection.
    let pooled = entry.pooled.as_ref().unwrap();
    assert_eq!(max_abs_difference(pooled, &g.pooled), 0.0);
    let unprojected = clip_network(clip_g)
        .encode_weighted(
            &tokens_g,
            easel_models::architectures::clip_text::EncodeOptions {
                project_pooled: false,
                ..options_g
            },
        )
        .unwrap()
        .pooled;
    let file = &clip_g.source.file;
    let projection = file
        .load(
            "conditioner.embedders.1.model.text_projection",
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    assert!(max_abs_difference(pooled, &unprojected.matmul(&projection).unwrap()) < 1e-6);

    // CLIPSetLastLayer −1 takes the last layer, still without the final norm.
    let last = setup
        .call(
            "CLIPSetLastLayer",
            vec![
                ("clip", Value::object(clip.clone())),
                ("stop_at_clip_layer", j(json!(-1))),
            ],
        )
        .unwrap()[0]
        .downcast::<Clip>()
        .unwrap()
        .clone();
    assert_eq!(last.options(TextEncoderKind::ClipG).layer, OutputLayer::FromEnd(1));
    let changed = encode(&setup, &last, text);
    assert!(max_abs_difference(&changed.0[0].cross_attention, &entry.cross_attention) > 0.0);
}

/// The standalone CLIP-G file (transformers layout, q/k/v split, projection transposed) encodes
/// as the checkpoint's OpenCLIP-layout encoder.
#[test]
fn open_clip_and_transformers_layouts_of_one_encoder_agree() {
    let setup = setup();
    let (_, clip) = load(&setup, TINY_SDXL_CHECKPOINT);
    let single = setup
        .call(
            "CLIPLoader",
            vec![
                ("clip_name", j(json!(testmodels::TINY_CLIP_L))),
                ("type", j(json!("stable_diffusion"))),
            ],
        )
        .unwrap()[0]
        .downcast::<Clip>()
        .unwrap()
        .clone();
    assert_eq!(single.family, Family::Sd1);
    assert_eq!(encode(&setup, &single, "a").0[0].cross_attention.dims(), &[1, 77, 64]);
    let dual = setup
        .call(
            "DualCLIPLoader",
            vec![
                ("clip_name1", j(json!(testmodels::TINY_CLIP_L))),
                ("clip_name2", j(json!(TINY_CLIP_G))),
                ("type", j(json!("sdxl"))),
            ],
        )
        .unwrap()[0]
        .downcast::<Clip>()
        .unwrap()
        .clone();
    assert_eq!(dual.family, Family::Sdxl);
    let text = "glass bottle, (galaxy:0.8)";
    let from_checkpoint = &encode(&setup, &clip, text).0[0];
    let from_files = &encode(&setup, &dual, text).0[0];
    assert!(max_abs_difference(&from_checkpoint.cross_attention, &from_files.cross_attention) < 1e-5);
    let pooled = |entry: &CondEntry| entry.pooled.clone().unwrap();
    assert!(max_abs_difference(&pooled(from_checkpoint), &pooled(from_files)) < 1e-5);
}

/// `timestep_embedding(v, 256)` computed in f64: cos then sin of v·exp(−ln(10000)·i/128).
fn embedded(value: f64) -> Vec<f32> {
    let frequencies: Vec<f64> = (0..128).map(|i| (-(10000f64.ln()) * i as f64 / 128.0).exp()).collect();
    let cos = frequencies.iter().map(|f| (value * f).cos() as f32);
    let sin = frequencies.iter().map(|f| (value * f).sin() as f32);
    cos.chain(sin).collect()
}

#[test]
fn sdxl_class_conditioning_embeds_pooled_output_and_sizes() {
    let setup = setup();
    let (model, clip) = load(&setup, TINY_SDXL_CHECKPOINT);
    let entry = encode(&setup, &clip, "a cat").0[0].clone();
    let pooled: Vec<f32> = entry.pooled.as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap();

    // Without sizes in the entry: the latent's size in pixels, no crop, target = size.
    let y = model.0.class_conditioning(&entry, false, (6, 10), 0).unwrap().unwrap();
    let mut expected = pooled.clone();
    for value in [48.0, 80.0, 0.0, 0.0, 48.0, 80.0] {
        expected.extend(embedded(value));
    }
    let expected = Tensor::from_vec(expected, (1, 96 + 6 * 256), &Device::Cpu).unwrap();
    assert!(
        max_abs_difference(&y, &expected) < 2e-4,
        "{}",
        max_abs_difference(&y, &expected)
    );

    // CLIPTextEncodeSDXL's sizes, in ComfyUI's order (height before width, crop_h before crop_w).
    let sized = CondEntry {
        sdxl: SdxlSizes {
            width: Some(1024.0),
            height: Some(768.0),
            crop_w: Some(16.0),
            crop_h: Some(8.0),
            target_width: Some(2048.0),
            target_height: Some(1536.0),
            aesthetic_score: None,
        },
        ..entry.clone()
    };
    let y = model.0.class_conditioning(&sized, true, (6, 10), 0).unwrap().unwrap();
    let mut expected = pooled.clone();
    for value in [768.0, 1024.0, 8.0, 16.0, 1536.0, 2048.0] {
        expected.extend(embedded(value));
    }
    let expected = Tensor::from_vec(expected, (1, 96 + 6 * 256), &Device::Cpu).unwrap();
    assert!(max_abs_difference(&y, &expected) < 2e-3);

    // The refiner embeds the aesthetic score instead of the target: 6 positive, 2.5 negative.
    let (refiner, refiner_clip) = load(&setup, TINY_SDXL_REFINER_CHECKPOINT);
    let entry = encode(&setup, &refiner_clip, "a cat").0[0].clone();
    let pooled: Vec<f32> = entry.pooled.as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for (negative, score) in [(false, 6.0), (true, 2.5)] {
        let y = refiner
            .0
            .class_conditioning(&entry, negative, (8, 8), 0)
            .unwrap()
            .unwrap();
        let mut expected = pooled.clone();
        for value in [64.0, 64.0, 0.0, 0.0, score] {
            expected.extend(embedded(value));
        }
        let expected = Tensor::from_vec(expected, (1, 96 + 5 * 256), &Device::Cpu).unwrap();
        assert!(max_abs_difference(&y, &expected) < 2e-4);
    }
}

#[test]
fn conditioning_of_another_family_is_refused_with_a_clear_error() {
    let setup = setup();
    let (sdxl, sdxl_clip) = load(&setup, TINY_SDXL_CHECKPOINT);
    let (refiner, refiner_clip) = load(&setup, TINY_SDXL_REFINER_CHECKPOINT);
    let (_, sd1_clip) = load(&setup, testmodels::TINY_SD1_CHECKPOINT);
    let latent = common::empty_latent(&setup, 64, 64, 1);
    let sample = |model: &Model, conditioning: Conditioning| {
        let conditioning = Value::object(conditioning);
        setup
            .call(
                "KSampler",
                vec![
                    ("model", Value::object(model.clone())),
                    ("seed", j(json!(1))),
                    ("steps", j(json!(1))),
                    ("cfg", j(json!(2.0))),
                    ("sampler_name", j(json!("euler"))),
                    ("scheduler", j(json!("normal"))),
                    ("positive", conditioning.clone()),
                    ("negative", conditioning),
                    ("latent_image", latent.clone()),
                    ("denoise", j(json!(1.0))),
                ],
            )
            .map(|_| ())
    };
    let cases = [
        (&sdxl, encode(&setup, &refiner_clip, "x"), "a refiner used"),
        (&refiner, encode(&setup, &sdxl_clip, "x"), "a refiner used"),
        (&sdxl, encode(&setup, &sd1_clip, "x"), "another model family"),
    ];
    for (model, conditioning, needle) in cases {
        let error = sample(model, conditioning).unwrap_err().to_string();
        assert!(error.contains(needle), "{error}");
    }
    let mut pooled_less = encode(&setup, &sdxl_clip, "x");
    pooled_less.0[0].pooled = None;
    let error = sample(&sdxl, pooled_less).unwrap_err().to_string();
    assert!(error.contains("pooled_output"), "{error}");
    assert!(sample(&sdxl, encode(&setup, &sdxl_clip, "x")).is_ok());
}

#[test]
fn v_prediction_turns_velocity_into_the_denoised_latent() {
    let device = Device::Cpu;
    let x = Tensor::new(&[1.5f32, -2.0, 0.25], &device).unwrap();
    let out = Tensor::new(&[0.5f32, 1.0, -3.0], &device).unwrap();
    let sigma = 2.0f32;
    let denoised: Vec<f32> = Prediction::V.denoised(&x, &out, sigma, 0.0).unwrap().to_vec1().unwrap();
    // x·σd²/(σ² + σd²) − out·σ·σd/√(σ² + σd²) with σd = 1.
    let expected = [
        1.5 / 5.0 - 0.5 * 2.0 / 5f32.sqrt(),
        -2.0 / 5.0 - 2.0 / 5f32.sqrt(),
        0.05 + 6.0 / 5f32.sqrt(),
    ];
    for (ours, theirs) in denoised.iter().zip(expected) {
        assert!((ours - theirs).abs() < 1e-6, "{ours} vs {theirs}");
    }
    let eps: Vec<f32> = Prediction::Epsilon
        .denoised(&x, &out, sigma, 0.0)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(eps, vec![0.5, -4.0, 6.25]);
    // LCM at timestep 19: x0 = x − out·σ blended by c_out = 190/√(190² + 0.25) and
    // c_skip = 0.25/(190² + 0.25).
    let lcm: Vec<f32> = Prediction::Lcm
        .denoised(&x, &out, sigma, 19.0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let (c_skip, c_out) = (0.25 / (190f64.powi(2) + 0.25), 190.0 / (190f64.powi(2) + 0.25).sqrt());
    for ((ours, x), eps) in lcm.iter().zip([1.5, -2.0, 0.25]).zip([0.5, -4.0, 6.25]) {
        let expected = (c_out * eps + c_skip * x) as f32;
        assert!((ours - expected).abs() < 1e-6, "{ours} vs {expected}");
    }
}

#[test]
fn sd2_reads_the_penultimate_layer_of_open_clip_h() {
    let setup = setup();
    let (model, clip) = load(&setup, TINY_SD2_CHECKPOINT);
    assert_eq!(model.0.family, Family::Sd2);
    assert_eq!(model.0.prediction, Prediction::Epsilon);
    let options = clip.options(TextEncoderKind::ClipH);
    assert_eq!(options.layer, OutputLayer::FromEnd(2));
    assert!(options.layer_norm_hidden);
    assert_eq!(options.pad_token, 0);
    let entry = &encode(&setup, &clip, "a cabin").0[0];
    assert_eq!(entry.cross_attention.dims(), &[1, 77, 64]);
}

/// ModelSamplingDiscrete shares the network and changes only the parameterisation and schedule.
#[test]
fn model_sampling_discrete_reparameterises_the_model() {
    let setup = setup();
    let (model, _) = load(&setup, TINY_SDXL_CHECKPOINT);
    let patch = |sampling: &str, zsnr: bool| {
        setup
            .call(
                "ModelSamplingDiscrete",
                vec![
                    ("model", Value::object(model.clone())),
                    ("sampling", j(json!(sampling))),
                    ("zsnr", j(json!(zsnr))),
                ],
            )
            .unwrap()[0]
            .downcast::<Model>()
            .unwrap()
            .clone()
    };
    let v = patch("v_prediction", true);
    assert_eq!(v.0.prediction, Prediction::V);
    assert!(std::sync::Arc::ptr_eq(
        v.0.network.unet().unwrap(),
        model.0.network.unet().unwrap()
    ));
    assert!(v.0.schedule.sigma_max() > 4000.0, "zero terminal SNR");
    let lcm = patch("lcm", false);
    assert_eq!(lcm.0.prediction, Prediction::Lcm);
    assert_eq!(lcm.0.schedule.table().len(), 50);
    for (sampling, prediction) in [
        ("eps", Prediction::Epsilon),
        ("x0", Prediction::X0),
        ("img_to_img", Prediction::ImgToImg),
    ] {
        assert_eq!(patch(sampling, false).0.prediction, prediction);
    }
    assert_eq!(model.0.prediction, Prediction::Epsilon, "the input model is unchanged");
}

/// `UNETLoader` on `file` (in `diffusion_models`) with `weight_dtype`: the UNet's prediction for
/// a fixed input.
fn unet_prediction(setup: &Setup, file: &str, weight_dtype: &str) -> Tensor {
    let out = setup
        .call(
            "UNETLoader",
            vec![("unet_name", j(json!(file))), ("weight_dtype", j(json!(weight_dtype)))],
        )
        .unwrap();
    let unet = &out[0].downcast::<Model>().unwrap().0.network.unet().unwrap();
    let config = unet.config();
    let wave = |shape: &[usize]| {
        let count = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..count).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    };
    let (x, context) = (wave(&[1, 4, 8, 8]), wave(&[1, 77, config.context_dim]));
    let y = wave(&[1, config.adm_in_channels.unwrap()]);
    let timesteps = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let input = UNetInput {
        y: Some(&y),
        ..UNetInput::new(&x, &timesteps, &context)
    };
    unet.forward(&input).unwrap()
}

/// UNETLoader's fp8 `weight_dtype` values store every weight of the UNet rounded to fp8, as
/// ComfyUI does: the model computes exactly what the same UNet saved as an fp8 file computes
/// (whose matrices are read in place), and not what the f16 file computes.
#[test]
fn unet_loader_fp8_weight_dtype_equals_the_unet_saved_in_fp8() {
    let setup = setup();
    let models = &setup.services.get::<Paths>().unwrap().models;
    let full = unet_prediction(&setup, TINY_SDXL_UNET, "default");
    for (format, dtype, weight_dtypes) in [
        (
            Fp8Format::E4M3Fn,
            safetensors::Dtype::F8_E4M3,
            &["fp8_e4m3fn", "fp8_e4m3fn_fast"][..],
        ),
        (Fp8Format::E5M2, safetensors::Dtype::F8_E5M2, &["fp8_e5m2"][..]),
    ] {
        let fp8_file = format!("tiny_sdxl_unet_{}.safetensors", format.name());
        let folder = models.join("diffusion_models");
        rewrite_f16_file(
            &folder.join(TINY_SDXL_UNET),
            &folder.join(&fp8_file),
            dtype,
            |value, out| out.push(format.encode(value)),
        );

        let saved_in_fp8 = unet_prediction(&setup, &fp8_file, "default");
        for weight_dtype in weight_dtypes {
            let rounded = unet_prediction(&setup, TINY_SDXL_UNET, weight_dtype);
            assert_eq!(max_abs_difference(&rounded, &saved_in_fp8), 0.0, "{weight_dtype}");
        }
        let scale = max_abs_difference(&full, &full.zeros_like().unwrap());
        let moved = max_abs_difference(&saved_in_fp8, &full);
        assert!(
            moved > 1e-4 * scale && moved < 0.5 * scale,
            "{format:?}: {moved} of {scale}"
        );
    }
}

/// A CosXL file (an SDXL checkpoint with `edm_vpred.sigma_max`, and `edm_vpred.sigma_min` or
/// 0.002) loads with v-prediction on EDM's continuous schedule: it samples as the plain
/// checkpoint through ModelSamplingContinuousEDM (v_prediction) over the same σ range.
#[test]
fn cosxl_files_sample_with_edm_v_prediction() {
    let setup = setup();
    let folder = setup.services.get::<Paths>().unwrap().models.join("checkpoints");
    let write_with = |name: &str, scalars: &[(&str, f32)]| {
        common::copy_with_scalars(&folder.join(TINY_SDXL_CHECKPOINT), &folder.join(name), scalars)
    };
    write_with("cosxl.safetensors", &[("edm_vpred.sigma_max", 120.0)]);
    write_with(
        "cosxl_range.safetensors",
        &[("edm_vpred.sigma_max", 80.0), ("edm_vpred.sigma_min", 0.5)],
    );

    let (cosxl, clip) = load(&setup, "cosxl.safetensors");
    assert_eq!(cosxl.0.prediction, Prediction::V);
    assert_eq!(cosxl.0.edm_v_prediction, Some((0.002, 120.0)));
    let (ranged, _) = load(&setup, "cosxl_range.safetensors");
    assert!((ranged.0.schedule.sigma_min() - 0.5).abs() < 1e-6 && (ranged.0.schedule.sigma_max() - 80.0).abs() < 1e-4);
    let (plain, _) = load(&setup, TINY_SDXL_CHECKPOINT);
    assert_eq!(plain.0.edm_v_prediction, None);
    let edm = setup
        .call(
            "ModelSamplingContinuousEDM",
            vec![
                ("model", Value::object(plain)),
                ("sampling", j(json!("v_prediction"))),
                ("sigma_max", j(json!(120.0))),
                ("sigma_min", j(json!(0.002))),
            ],
        )
        .unwrap()
        .remove(0);
    let (positive, negative) = (
        Value::object(encode(&setup, &clip, "a lighthouse")),
        Value::object(encode(&setup, &clip, "")),
    );
    let latent = common::empty_latent(&setup, 64, 64, 1);
    let sample =
        |model: &Value| common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 2, 5.0).unwrap();
    assert_eq!(
        max_abs_difference(&sample(&Value::object(cosxl.clone())), &sample(&edm)),
        0.0
    );

    // CheckpointSave writes the σ range back (no `v_pred` flag), so the file loads as CosXL again.
    setup
        .call(
            "CheckpointSave",
            vec![
                ("model", Value::object(cosxl)),
                ("clip", Value::object(clip)),
                ("vae", load_vae(&setup)),
                ("filename_prefix", j(json!("checkpoints/cosxl_saved"))),
            ],
        )
        .unwrap();
    let paths = setup.services.get::<Paths>().unwrap();
    let saved = paths.output.join("checkpoints/cosxl_saved_00001_.safetensors");
    let file = SafetensorsFile::open(&saved).unwrap();
    assert!(file.entry("edm_vpred.sigma_max").is_some() && file.entry("v_pred").is_none());
    std::fs::copy(&saved, folder.join("cosxl_saved.safetensors")).unwrap();
    let (reloaded, _) = load(&setup, "cosxl_saved.safetensors");
    assert_eq!(reloaded.0.prediction, Prediction::V);
    assert!((reloaded.0.schedule.sigma_max() - 120.0).abs() < 1e-3);
}

/// The tiny SDXL checkpoint's VAE.
fn load_vae(setup: &Setup) -> Value {
    setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SDXL_CHECKPOINT)))],
        )
        .unwrap()
        .remove(2)
}
