//! FLUX's text encoders through the nodes: DualCLIPLoader type flux (CLIP-L and T5-XXL, from
//! safetensors or GGUF), CLIPTextEncode and CLIPTextEncodeFlux as ComfyUI's `FluxClipModel`
//! encodes (T5's hidden states, CLIP-L's pooled vector), and where the T5 tokenizer is found.

mod common;

use candle_core::{DType, Device};
use common::{j, max_abs_difference, rewrite_f16_file, setup, setup_with, Setup};
use easel_engine::Value;
use easel_models::architectures::clip_text::OutputLayer;
use easel_models::architectures::t5::{T5Config, T5Encoder};
use easel_models::formats::fp8::Fp8Format;
use easel_models::testmodels::{
    t5_layout, tiny_t5, write_checkpoint, TINY_CLIP_G, TINY_CLIP_L, TINY_FLUX_CHECKPOINT, TINY_T5, TINY_T5_Q8_0,
};
use easel_models::text::tokenizer::TokenItem;
use easel_models::weights::{SafetensorsFile, Weights};
use easel_nodes::conditioning::{Conditioning, EmbeddedGuidance};
use easel_nodes::loaders::t5_tokenizer_files::{find_t5_tokenizer, TokenizerSearch};
use easel_nodes::model::clip::{Clip, TextNetwork};
use easel_nodes::model::diffusion_model::{DiffusionNetwork, Model};
use easel_nodes::model::vae::VaeModel;
use easel_nodes::paths::Paths;
use serde_json::json;
use std::sync::Arc;

fn dual_clip(setup: &Setup, loader: &str, first: &str, second: &str) -> Result<Value, String> {
    setup
        .call(
            loader,
            vec![
                ("clip_name1", j(json!(first))),
                ("clip_name2", j(json!(second))),
                ("type", j(json!("flux"))),
            ],
        )
        .map(|mut outputs| outputs.remove(0))
        .map_err(|error| error.to_string())
}

fn encode(setup: &Setup, clip: &Value, text: &str) -> Conditioning {
    let outputs = setup
        .call("CLIPTextEncode", vec![("clip", clip.clone()), ("text", j(json!(text)))])
        .unwrap();
    outputs[0].downcast::<Conditioning>().unwrap().clone()
}

/// CLIPLoader's SD1.x CLIP of the tiny CLIP-L.
fn sd_clip(setup: &Setup) -> Value {
    setup
        .call(
            "CLIPLoader",
            vec![
                ("clip_name", j(json!(TINY_CLIP_L))),
                ("type", j(json!("stable_diffusion"))),
            ],
        )
        .unwrap()
        .remove(0)
}

/// The tiny T5 read straight from its file, without the nodes.
fn t5_encoder(setup: &Setup) -> T5Encoder {
    let path = setup
        .services
        .get::<Paths>()
        .unwrap()
        .models
        .join("text_encoders")
        .join(TINY_T5);
    let file = Arc::new(SafetensorsFile::open(&path).unwrap());
    let config = T5Config::infer(file.as_ref(), "").unwrap();
    T5Encoder::new(config, Weights::from_file(file, DType::F32, &Device::Cpu)).unwrap()
}

/// CLIPTextEncode on a FLUX CLIP: the context is T5's output for the prompt ended by `</s>` and
/// padded with `<pad>` to 256 tokens; the pooled vector is CLIP-L's, unprojected, as CLIPLoader
/// (SD1.x) gives it for the same prompt.
#[test]
fn flux_prompts_are_t5_hidden_states_and_clip_l_pooled() {
    let setup = setup();
    let clip = dual_clip(&setup, "DualCLIPLoader", TINY_T5, TINY_CLIP_L).unwrap();
    let flux_clip = clip.downcast::<Clip>().unwrap();
    assert!(matches!(flux_clip.encoders[0].network, TextNetwork::Clip { .. }));
    assert!(matches!(flux_clip.encoders[1].network, TextNetwork::T5 { .. }));
    let conditioning = encode(&setup, &clip, "a red house");
    let entry = &conditioning.0[0];
    assert_eq!(entry.cross_attention.dims(), &[1, 256, 32]);

    let mut tokens: Vec<TokenItem> = [4, 5, 6, 1].into_iter().map(TokenItem::Token).collect();
    tokens.resize(256, TokenItem::Token(0));
    let expected = t5_encoder(&setup).forward(&[tokens], OutputLayer::Last).unwrap();
    assert_eq!(max_abs_difference(&entry.cross_attention, &expected), 0.0);

    let sd_clip = sd_clip(&setup);
    let sd = encode(&setup, &sd_clip, "a red house");
    let pooled = entry.pooled.as_ref().unwrap();
    assert_eq!(pooled.dims(), &[1, 64]);
    assert_eq!(max_abs_difference(pooled, sd.0[0].pooled.as_ref().unwrap()), 0.0);
}

/// CLIPTextEncodeFlux: `t5xxl` makes the context, `clip_l` the pooled vector, and the entry
/// carries the guidance.
#[test]
fn clip_text_encode_flux_splits_the_prompts_and_sets_guidance() {
    let setup = setup();
    let clip = dual_clip(&setup, "DualCLIPLoader", TINY_CLIP_L, TINY_T5).unwrap();
    let outputs = setup
        .call(
            "CLIPTextEncodeFlux",
            vec![
                ("clip", clip.clone()),
                ("clip_l", j(json!("a blue house"))),
                ("t5xxl", j(json!("a red house"))),
                ("guidance", j(json!(2.5))),
            ],
        )
        .unwrap();
    let entry = outputs[0].downcast::<Conditioning>().unwrap().0[0].clone();
    assert_eq!(entry.guidance, EmbeddedGuidance::Strength(2.5));
    let red = encode(&setup, &clip, "a red house").0.remove(0);
    let blue = encode(&setup, &clip, "a blue house").0.remove(0);
    assert_eq!(max_abs_difference(&entry.cross_attention, &red.cross_attention), 0.0);
    let pooled = entry.pooled.unwrap();
    assert_eq!(max_abs_difference(&pooled, blue.pooled.as_ref().unwrap()), 0.0);
    assert!(max_abs_difference(&pooled, red.pooled.as_ref().unwrap()) > 0.0);

    // A CLIP without T5 has no `t5xxl` tokens, as in ComfyUI.
    let sd_clip = sd_clip(&setup);
    let error = setup
        .call(
            "CLIPTextEncodeFlux",
            vec![
                ("clip", sd_clip),
                ("clip_l", j(json!("a"))),
                ("t5xxl", j(json!("a"))),
                ("guidance", j(json!(3.5))),
            ],
        )
        .unwrap_err()
        .to_string();
    assert!(error.contains("'t5xxl'"), "{error}");
}

/// A T5 GGUF (llama.cpp's tensor names, Q8_0 matrices) through DualCLIPLoaderGGUF encodes close
/// to the safetensors it was written from.
#[test]
fn a_gguf_t5_encodes_close_to_its_safetensors() {
    let setup = setup();
    let safetensors = dual_clip(&setup, "DualCLIPLoader", TINY_CLIP_L, TINY_T5).unwrap();
    let gguf = dual_clip(&setup, "DualCLIPLoaderGGUF", TINY_T5_Q8_0, TINY_CLIP_L).unwrap();
    let reference = encode(&setup, &safetensors, "a lighthouse at dusk").0.remove(0);
    let quantized = encode(&setup, &gguf, "a lighthouse at dusk").0.remove(0);
    let difference = max_abs_difference(&reference.cross_attention, &quantized.cross_attention);
    let scale = max_abs_difference(
        &reference.cross_attention,
        &reference.cross_attention.zeros_like().unwrap(),
    );
    assert!(difference > 0.0 && difference < 0.05 * scale, "{difference} of {scale}");

    // DualCLIPLoader (core) lists no GGUF files, and a CLIP pair is not FLUX's.
    let error = dual_clip(&setup, "DualCLIPLoader", TINY_CLIP_L, TINY_CLIP_G).unwrap_err();
    assert!(error.contains("needs a CLIP-L and a T5-XXL"), "{error}");
    assert!(error.contains("a CLIP text encoder 96 wide"), "{error}");
}

/// A T5 saved in fp8 (e4m3fn, as ComfyUI's `t5xxl_fp8_e4m3fn`) encodes exactly as its fp8
/// values saved in f32 do, and close to the f16 file it was rounded from.
#[test]
fn an_fp8_t5_encodes_as_its_values_in_f32() {
    let setup = setup();
    let folder = setup.services.get::<Paths>().unwrap().models.join("text_encoders");
    let format = Fp8Format::E4M3Fn;
    let (fp8, widened) = ("t5_fp8_e4m3fn.safetensors", "t5_fp8_values_f32.safetensors");
    rewrite_f16_file(
        &folder.join(TINY_T5),
        &folder.join(fp8),
        safetensors::Dtype::F8_E4M3,
        |value, out| out.push(format.encode(value)),
    );
    rewrite_f16_file(
        &folder.join(TINY_T5),
        &folder.join(widened),
        safetensors::Dtype::F32,
        |value, out| out.extend(format.values()[usize::from(format.encode(value))].to_le_bytes()),
    );
    let context = |t5: &str| {
        let clip = dual_clip(&setup, "DualCLIPLoader", TINY_CLIP_L, t5).unwrap();
        encode(&setup, &clip, "a lighthouse at dusk")
            .0
            .remove(0)
            .cross_attention
    };
    let (from_fp8, from_f32, from_f16) = (context(fp8), context(widened), context(TINY_T5));
    assert_eq!(max_abs_difference(&from_fp8, &from_f32), 0.0);
    let scale = max_abs_difference(&from_f16, &from_f16.zeros_like().unwrap());
    let moved = max_abs_difference(&from_fp8, &from_f16);
    assert!(moved > 0.0 && moved < 0.2 * scale, "{moved} of {scale}");
}

/// With no tokenizer beside the T5 or in the text-encoder folders, and no network, the T5 uses
/// ComfyUI's vocabulary that ships inside Easel; a `tokenizer.json` beside the encoder that is
/// not T5's (a CLIP one) is passed over.
#[test]
fn a_t5_without_a_tokenizer_file_uses_comfyuis_built_in_vocabulary() {
    let setup = setup_with(|services| {
        let paths = services.get::<Paths>().unwrap();
        let text_encoders = paths.models.join("text_encoders");
        std::fs::remove_dir_all(text_encoders.join("t5_tokenizer")).unwrap();
        // A T5 with T5-XXL's vocabulary size, in miniature.
        let full_vocabulary = T5Config {
            vocab_size: 32128,
            ..tiny_t5()
        };
        write_checkpoint(
            &text_encoders.join("t5_full_vocabulary.safetensors"),
            &t5_layout(&full_vocabulary, "").unwrap(),
        )
        .unwrap();
        std::fs::write(
            text_encoders.join("tokenizer.json"),
            br#"{"version":"1.0","model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}"#,
        )
        .unwrap();
    });
    let text_encoders = setup.services.get::<Paths>().unwrap().models.join("text_encoders");
    let search = TokenizerSearch::of(&setup.services);
    let tokenizer = find_t5_tokenizer(&text_encoders.join("t5_full_vocabulary.safetensors"), search).unwrap();
    assert_eq!(tokenizer.encode("red house"), vec![1131, 629]);

    let clip = dual_clip(&setup, "DualCLIPLoader", TINY_CLIP_L, "t5_full_vocabulary.safetensors").unwrap();
    let entry = encode(&setup, &clip, "a red house").0.remove(0);
    assert_eq!(entry.cross_attention.dims(), &[1, 256, 32]);
}

/// A FLUX checkpoint as ComfyUI saves one (model, CLIP-L, T5, VAE in one file) loads through
/// CheckpointLoaderSimple into a FLUX model, a FLUX CLIP (T5 tokenizer from the text-encoder
/// folders) and the 16-channel VAE.
#[test]
fn a_flux_checkpoint_loads_its_three_parts() {
    let setup = setup();
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_FLUX_CHECKPOINT)))],
        )
        .unwrap();
    let model = loaded[0].downcast::<Model>().unwrap();
    assert!(matches!(model.0.network, DiffusionNetwork::Flux(_)));
    let clip = loaded[1].downcast::<Clip>().unwrap();
    assert!(matches!(clip.encoders[0].network, TextNetwork::Clip { .. }));
    assert!(matches!(clip.encoders[1].network, TextNetwork::T5 { .. }));
    let entry = encode(&setup, &loaded[1], "a red house").0.remove(0);
    assert_eq!(entry.cross_attention.dims(), &[1, 256, 32]);
    assert_eq!(entry.pooled.unwrap().dims(), &[1, 64]);
    let latent = candle_core::Tensor::zeros((1, 16, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let decoded = loaded[2]
        .downcast::<VaeModel>()
        .unwrap()
        .network
        .decode(&latent)
        .unwrap();
    assert_eq!(decoded.dims(), &[1, 3, 16, 16]);
}

#[test]
fn flux_disable_guidance_skips_the_guidance_embedding() {
    let setup = setup();
    let clip = dual_clip(&setup, "DualCLIPLoader", TINY_CLIP_L, TINY_T5).unwrap();
    let model = setup
        .call(
            "UNETLoader",
            vec![
                ("unet_name", j(json!(easel_models::testmodels::TINY_FLUX_DEV))),
                ("weight_dtype", j(json!("default"))),
            ],
        )
        .unwrap()
        .remove(0);
    let positive = Value::object(encode(&setup, &clip, "a red house"));
    let with = |class: &str, extra: Vec<(&str, Value)>| {
        let mut inputs = vec![("conditioning", positive.clone())];
        inputs.extend(extra);
        setup.call(class, inputs).unwrap().remove(0)
    };
    let disabled = with("FluxDisableGuidance", vec![]);
    assert!(disabled.downcast::<Conditioning>().unwrap().0[0].guidance == EmbeddedGuidance::Disabled);
    let latent = setup
        .call(
            "EmptySD3LatentImage",
            vec![
                ("width", j(json!(32))),
                ("height", j(json!(32))),
                ("batch_size", j(json!(1))),
            ],
        )
        .unwrap()
        .remove(0);
    let sample = |conditioning: &Value| {
        common::flat(&common::ksampler(&setup, &model, conditioning, conditioning, &latent, "euler", 2, 1.0).unwrap())
    };
    let unset = sample(&positive);
    assert_eq!(sample(&with("FluxGuidance", vec![("guidance", j(json!(3.5)))])), unset);
    let without = sample(&disabled);
    assert!(without.iter().all(|v| v.is_finite()));
    assert_ne!(without, unset);
    assert_ne!(
        without,
        sample(&with("FluxGuidance", vec![("guidance", j(json!(0.0)))]))
    );
}

#[test]
fn t5_tokenizer_options_pad_t5_prompts_and_controlnet_text_rides_on_the_entries() {
    let setup = setup();
    let clip = dual_clip(&setup, "DualCLIPLoader", TINY_CLIP_L, TINY_T5).unwrap();
    let tokens = |min_padding: i64, min_length: i64| {
        let options = setup
            .call(
                "T5TokenizerOptions",
                vec![
                    ("clip", clip.clone()),
                    ("min_padding", j(json!(min_padding))),
                    ("min_length", j(json!(min_length))),
                ],
            )
            .unwrap()
            .remove(0);
        encode(&setup, &options, "a red house").0[0]
            .cross_attention
            .dim(1)
            .unwrap()
    };
    assert_eq!(
        encode(&setup, &clip, "a red house").0[0]
            .cross_attention
            .dim(1)
            .unwrap(),
        256
    );
    // "a red house" is 3 tokens and the end token; no padding at all with zeros.
    assert_eq!(tokens(0, 0), 4);
    assert_eq!(tokens(5, 0), 9);
    assert_eq!(tokens(2, 300), 300);
    let base = Value::object(encode(&setup, &clip, "a red house"));
    let with_text = setup
        .call(
            "CLIPTextEncodeControlnet",
            vec![
                ("clip", clip.clone()),
                ("conditioning", base),
                ("text", j(json!("edges"))),
            ],
        )
        .unwrap()
        .remove(0);
    let entry = &with_text.downcast::<Conditioning>().unwrap().0[0];
    let controlnet = entry.controlnet_text.as_ref().expect("the ControlNet text");
    let edges = encode(&setup, &clip, "edges").0.remove(0);
    assert_eq!(
        common::flat(&controlnet.cross_attention),
        common::flat(&edges.cross_attention)
    );
    assert_eq!(entry.cross_attention.dim(1).unwrap(), 256);
}
