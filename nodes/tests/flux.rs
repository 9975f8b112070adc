//! The FLUX transformer against a direct f64 computation of BFL's formulas on a tiny model, the
//! same model read from safetensors and from GGUF, and one flow-matching sampling step through
//! the nodes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::reference::{
    add_gated, assert_close_to_reference, gelu, modulate, sinusoid, softmax_attention, values, wave, FileWeights, Rows,
};
use common::{j, max_abs_difference, one_euler_step, setup};
use easel_engine::Value;
use easel_models::architectures::flux::{
    Flux, FluxConfig, FluxControl, FluxInput, ImagePromptAttention, ReferenceMethod,
};
use easel_models::formats::ggml_quants::GgmlType;
use easel_models::formats::gguf::GgufFile;
use easel_models::sampling::noise::prepare_noise;
use easel_models::testmodels::{
    flux_layout, tiny_flux, tiny_flux_vae, vae_layout, write_checkpoint, write_gguf_copy, TINY_FLUX_CANNY,
    TINY_FLUX_DEV, TINY_FLUX_DEV_Q4_K, TINY_FLUX_DEV_Q8_0, TINY_FLUX_FILL, TINY_FLUX_VAE,
};
use easel_models::weights::{MappedWeights, SafetensorsFile, Weights};
use easel_nodes::conditioning::{CondEntry, Conditioning};
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::Model;
use serde_json::json;
use std::sync::Arc;

/// The inputs of every test: a 16×3×4 latent (odd height: padded), 3 text tokens, σ = 0.7,
/// guidance 3.5.
struct Inputs {
    x: Tensor,
    context: Tensor,
    y: Tensor,
    timesteps: Tensor,
    guidance: Tensor,
}

fn inputs(config: &FluxConfig) -> Inputs {
    Inputs {
        x: wave(&[1, 16, 3, 4], 0.71),
        context: wave(&[1, 3, config.context_dim], 0.37),
        y: wave(&[1, config.vector_dim], 0.53),
        timesteps: Tensor::new(&[0.7f32], &Device::Cpu).unwrap(),
        guidance: Tensor::new(&[3.5f32], &Device::Cpu).unwrap(),
    }
}

fn predict(flux: &Flux, inputs: &Inputs) -> Tensor {
    predict_with_image_prompt(flux, inputs, None)
}

fn predict_with_image_prompt(flux: &Flux, inputs: &Inputs, image_prompt: Option<&dyn ImagePromptAttention>) -> Tensor {
    flux.forward(&FluxInput {
        x: &inputs.x,
        timesteps: &inputs.timesteps,
        context: &inputs.context,
        y: &inputs.y,
        guidance: Some(&inputs.guidance),
        concat: None,
        attention_mask: None,
        control: FluxControl::default(),
        image_prompt,
        patches: None,
        reference_latents: &[],
        reference_method: ReferenceMethod::default(),
    })
    .unwrap()
}

fn load(file: Arc<dyn MappedWeights>) -> Flux {
    let config = FluxConfig::infer(file.as_ref(), "").unwrap();
    Flux::new(config, Weights::from_file(file, DType::F32, &Device::Cpu)).unwrap()
}

/// BFL's FLUX forward pass written out in f64 loops over the weights of `file`.
struct Reference<'a> {
    weights: FileWeights<'a>,
    config: FluxConfig,
}

impl Reference<'_> {
    fn mlp(&self, x: &[f64], name: &str) -> Vec<f64> {
        self.weights
            .mlp(x, &format!("{name}.in_layer"), &format!("{name}.out_layer"))
    }

    /// Queries (or keys) of `qkv` part `part` for every token, per head, RMS-normalised with
    /// `scale` and rotated by each token's position.
    fn heads(&self, qkv: &Rows, part: usize, scale: Option<&[f64]>, positions: &[[f64; 3]]) -> Vec<Rows> {
        let hidden = self.config.hidden_size;
        let head_dim = hidden / self.config.heads;
        (0..self.config.heads)
            .map(|h| {
                qkv.iter()
                    .zip(positions)
                    .map(|(row, position)| {
                        let mut x = row[part * hidden + h * head_dim..part * hidden + (h + 1) * head_dim].to_vec();
                        if let Some(scale) = scale {
                            let rms = (x.iter().map(|v| v * v).sum::<f64>() / head_dim as f64 + 1e-6).sqrt();
                            x = x.iter().zip(scale).map(|(v, s)| v / rms * s).collect();
                            for j in 0..head_dim / 2 {
                                let (axis, i, dim) = match j {
                                    0..8 => (0, j, 16),
                                    8..36 => (1, j - 8, 56),
                                    _ => (2, j - 36, 56),
                                };
                                let angle = position[axis] / 10000f64.powf((2 * i) as f64 / dim as f64);
                                let (x0, x1) = (x[2 * j], x[2 * j + 1]);
                                x[2 * j] = angle.cos() * x0 - angle.sin() * x1;
                                x[2 * j + 1] = angle.sin() * x0 + angle.cos() * x1;
                            }
                        }
                        x
                    })
                    .collect()
            })
            .collect()
    }

    /// Joint attention of all tokens in `qkv` (with query/key scales under `norm`): [tokens, hidden].
    fn attention(&self, qkv: &Rows, norm: &str, positions: &[[f64; 3]]) -> Rows {
        let (q_scale, k_scale) = (
            self.weights.tensor(&format!("{norm}.query_norm.scale")),
            self.weights.tensor(&format!("{norm}.key_norm.scale")),
        );
        let q = self.heads(qkv, 0, Some(&q_scale), positions);
        let k = self.heads(qkv, 1, Some(&k_scale), positions);
        let v = self.heads(qkv, 2, None, positions);
        softmax_attention(&q, &k, &v)
    }

    /// The prediction; `img_attention_residual` is added to the double block's image attention
    /// output before its projection (the image-prompt hook).
    fn forward(&self, inputs: &Inputs, img_attention_residual: Option<&Rows>) -> Vec<f64> {
        let x: Vec<f64> = values(&inputs.x).into_iter().map(f64::from).collect();
        let (channels, height, width) = (16, 3, 4);
        // Rows padded circularly: row 3 is row 0.
        let latent = |c: usize, r: usize, col: usize| x[(c * height + r % height) * width + col];
        let (rows, cols) = (2, 2);
        let patches: Rows = (0..rows * cols)
            .map(|p| {
                let (r, col) = (p / cols, p % cols);
                (0..channels * 4)
                    .map(|f| latent(f / 4, 2 * r + (f % 4) / 2, 2 * col + f % 2))
                    .collect()
            })
            .collect();
        let t = f64::from(values(&inputs.timesteps)[0]);
        let g = f64::from(values(&inputs.guidance)[0]);
        let y: Vec<f64> = values(&inputs.y).into_iter().map(f64::from).collect();
        let vec: Vec<f64> = self
            .mlp(&sinusoid(1000.0 * t), "time_in")
            .iter()
            .zip(self.mlp(&sinusoid(1000.0 * g), "guidance_in"))
            .zip(self.mlp(&y, "vector_in"))
            .map(|((a, b), c)| a + b + c)
            .collect();
        let mut img = self.weights.linear(&patches, "img_in");
        let context: Rows = values(&inputs.context)
            .chunks(self.config.context_dim)
            .map(|row| row.iter().map(|&v| f64::from(v)).collect())
            .collect();
        let mut txt = self.weights.linear(&context, "txt_in");
        let positions: Vec<[f64; 3]> = (0..txt.len())
            .map(|_| [0.0; 3])
            .chain((0..rows * cols).map(|p| [0.0, (p / cols) as f64, (p % cols) as f64]))
            .collect();

        // The double block.
        let block = "double_blocks.0";
        let img_mod = self.weights.modulation(&vec, &format!("{block}.img_mod.lin"), 6);
        let txt_mod = self.weights.modulation(&vec, &format!("{block}.txt_mod.lin"), 6);
        let img_qkv = self.weights.linear(
            &modulate(&img, &img_mod[0], &img_mod[1]),
            &format!("{block}.img_attn.qkv"),
        );
        let txt_qkv = self.weights.linear(
            &modulate(&txt, &txt_mod[0], &txt_mod[1]),
            &format!("{block}.txt_attn.qkv"),
        );
        let joint_txt = self.attention_two_streams(&txt_qkv, &img_qkv, block, &positions);
        let (txt_attn, img_attn) = joint_txt.split_at(txt.len());
        let mut img_attn = img_attn.to_vec();
        if let Some(residual) = img_attention_residual {
            for (row, extra) in img_attn.iter_mut().zip(residual) {
                row.iter_mut().zip(extra).for_each(|(v, e)| *v += e);
            }
        }
        for (stream, x, attn, modulation) in [
            ("img", &mut img, img_attn, &img_mod),
            ("txt", &mut txt, txt_attn.to_vec(), &txt_mod),
        ] {
            let projected = self.weights.linear(&attn, &format!("{block}.{stream}_attn.proj"));
            add_gated(x, &projected, &modulation[2]);
            self.weights.add_gated_mlp(
                x,
                modulation,
                &format!("{block}.{stream}_mlp.0"),
                &format!("{block}.{stream}_mlp.2"),
            );
        }

        // The single block.
        let mut tokens: Rows = txt.iter().chain(&img).cloned().collect();
        let block = "single_blocks.0";
        let modulation = self.weights.modulation(&vec, &format!("{block}.modulation.lin"), 3);
        let projected = self.weights.linear(
            &modulate(&tokens, &modulation[0], &modulation[1]),
            &format!("{block}.linear1"),
        );
        let hidden = self.config.hidden_size;
        let qkv: Rows = projected.iter().map(|row| row[..3 * hidden].to_vec()).collect();
        let attention = self.attention(&qkv, &format!("{block}.norm"), &positions);
        let joined: Rows = attention
            .iter()
            .zip(&projected)
            .map(|(a, p)| {
                a.iter()
                    .cloned()
                    .chain(p[3 * hidden..].iter().map(|&v| gelu(v)))
                    .collect()
            })
            .collect();
        let out = self.weights.linear(&joined, &format!("{block}.linear2"));
        add_gated(&mut tokens, &out, &modulation[2]);

        let img: Rows = tokens[txt.len()..].to_vec();
        let final_mod = self.weights.modulation(&vec, "final_layer.adaLN_modulation.1", 2);
        let out = self
            .weights
            .linear(&modulate(&img, &final_mod[0], &final_mod[1]), "final_layer.linear");
        let mut result = vec![0.0; channels * height * width];
        for (p, features) in out.iter().enumerate() {
            let (r, col) = (p / cols, p % cols);
            for (f, value) in features.iter().enumerate() {
                let (c, row, column) = (f / 4, 2 * r + (f % 4) / 2, 2 * col + f % 2);
                if row < height {
                    result[(c * height + row) * width + column] = *value;
                }
            }
        }
        result
    }

    /// The double block's joint attention: each stream's queries and keys normalised with its
    /// own scales, then all tokens (text first) attending together.
    fn attention_two_streams(&self, txt_qkv: &Rows, img_qkv: &Rows, block: &str, positions: &[[f64; 3]]) -> Rows {
        let (txt_positions, img_positions) = positions.split_at(txt_qkv.len());
        let normalised = |qkv: &Rows, stream: &str, part: usize, stream_positions: &[[f64; 3]]| {
            let scale = match part {
                0 => Some(
                    self.weights
                        .tensor(&format!("{block}.{stream}_attn.norm.query_norm.scale")),
                ),
                1 => Some(
                    self.weights
                        .tensor(&format!("{block}.{stream}_attn.norm.key_norm.scale")),
                ),
                _ => None,
            };
            self.heads(qkv, part, scale.as_deref(), stream_positions)
        };
        let joined = |part: usize| -> Vec<Rows> {
            let txt = normalised(txt_qkv, "txt", part, txt_positions);
            let img = normalised(img_qkv, "img", part, img_positions);
            txt.into_iter()
                .zip(img)
                .map(|(t, i)| t.into_iter().chain(i).collect())
                .collect()
        };
        softmax_attention(&joined(0), &joined(1), &joined(2))
    }
}

fn write_tiny_flux(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tiny_flux.safetensors");
    write_checkpoint(&path, &flux_layout(&tiny_flux(), "").unwrap()).unwrap();
    path
}

#[test]
fn flux_config_is_inferred_from_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let file = SafetensorsFile::open(&write_tiny_flux(dir.path())).unwrap();
    assert_eq!(FluxConfig::infer(&file, "").unwrap(), tiny_flux());
}

#[test]
fn flux_forward_matches_the_formulas_written_out() {
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(SafetensorsFile::open(&write_tiny_flux(dir.path())).unwrap());
    let config = tiny_flux();
    let inputs = inputs(&config);
    let ours = predict(&load(file.clone()), &inputs);
    let expected = Reference {
        weights: FileWeights(&file),
        config,
    }
    .forward(&inputs, None);
    assert_close_to_reference(&ours, &expected);
}

/// An image prompt that adds a fixed residual in double block 0 and records what it was given.
struct FixedImagePrompt {
    residual: Tensor,
    calls: std::sync::Mutex<Vec<(usize, Vec<usize>)>>,
}

impl ImagePromptAttention for FixedImagePrompt {
    fn residual(&self, block: usize, image_queries: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push((block, image_queries.dims().to_vec()));
        }
        Ok((block == 0).then(|| self.residual.clone()))
    }
}

/// The image-prompt hook's residual joins the image stream's attention output before its
/// projection, in the block it names; the hook sees each double block's image queries.
#[test]
fn the_image_prompt_hook_adds_to_the_image_attention_before_its_projection() {
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(SafetensorsFile::open(&write_tiny_flux(dir.path())).unwrap());
    let config = tiny_flux();
    let inputs = inputs(&config);
    // 2×2 patches of the padded 4×4 latent: 4 image tokens.
    let hook = FixedImagePrompt {
        residual: wave(&[1, 4, config.hidden_size], 0.29),
        calls: Default::default(),
    };
    let ours = predict_with_image_prompt(&load(file.clone()), &inputs, Some(&hook));
    let residual: Vec<Vec<f64>> = values(&hook.residual)
        .chunks(config.hidden_size)
        .map(|row| row.iter().map(|&v| f64::from(v)).collect())
        .collect();
    let expected = Reference {
        weights: FileWeights(&file),
        config: config.clone(),
    }
    .forward(&inputs, Some(&residual));
    assert_close_to_reference(&ours, &expected);
    let without = Reference {
        weights: FileWeights(&file),
        config: config.clone(),
    }
    .forward(&inputs, None);
    assert!(values(&ours)
        .iter()
        .zip(&without)
        .any(|(o, w)| (f64::from(*o) - w).abs() > 1e-3));
    assert_eq!(*hook.calls.lock().unwrap(), vec![(0, vec![1, 4, config.hidden_size])]);
}

/// The tiny FLUX model in GGUF, every 2-D weight in `kind` (others F32, as city96's files keep
/// small tensors), written from the safetensors `file`.
fn write_flux_gguf(file: &SafetensorsFile, kind: GgmlType, path: &std::path::Path) {
    write_gguf_copy(file, kind, "flux", &|name: &str| name.to_string(), path).unwrap();
}

/// A text entry of the tiny FLUX's widths.
fn text_entry() -> CondEntry {
    let config = tiny_flux();
    CondEntry::new(
        wave(&[1, 3, config.context_dim], 0.37),
        Some(wave(&[1, config.vector_dim], 0.53)),
    )
}

/// The tiny FLUX model `unet_name` through UNETLoader and the tiny FLUX VAE through VAELoader.
fn flux_model_and_vae(setup: &common::Setup, unet_name: &str) -> (Value, Value) {
    let model = setup
        .call(
            "UNETLoader",
            vec![
                ("unet_name", j(json!(unet_name))),
                ("weight_dtype", j(json!("default"))),
            ],
        )
        .unwrap()
        .remove(0);
    let vae = setup
        .call("VAELoader", vec![("vae_name", j(json!(TINY_FLUX_VAE)))])
        .unwrap()
        .remove(0);
    (model, vae)
}

/// What that step gives on FLUX: from seed 7's noise, noise − 1·velocity at `entry`'s text and
/// `guidance` (with the `concat` channels), out of model space as x/0.3611 + 0.1159.
fn expected_euler_step(
    model: &Value,
    entry: &CondEntry,
    guidance: f32,
    concat: Option<&Tensor>,
    shape: &[usize],
) -> Tensor {
    let model = model.downcast::<Model>().unwrap();
    let easel_nodes::model::diffusion_model::DiffusionNetwork::Flux(flux) = &model.0.network else {
        panic!("a FLUX model");
    };
    let noise = Tensor::from_vec(prepare_noise(7, shape, None), shape, &Device::Cpu).unwrap();
    let velocity = flux
        .forward(&FluxInput {
            x: &noise,
            timesteps: &Tensor::new(&[1f32], &Device::Cpu).unwrap(),
            context: &entry.cross_attention,
            y: entry.pooled.as_ref().unwrap(),
            guidance: Some(&Tensor::new(&[guidance], &Device::Cpu).unwrap()),
            concat,
            attention_mask: None,
            control: FluxControl::default(),
            image_prompt: None,
            patches: None,
            reference_latents: &[],
            reference_method: ReferenceMethod::default(),
        })
        .unwrap();
    ((((&noise - &velocity).unwrap()) / 0.3611).unwrap() + 0.1159).unwrap()
}

/// KSampler with one Euler step on FLUX dev (σ 1 → 0, cfg 1) from EmptySD3LatentImage: the
/// noise is the noisy latent, the denoised latent is noise − σ·velocity at the entry's
/// guidance, and it leaves model space as x/0.3611 + 0.1159.
#[test]
fn one_flow_step_through_the_nodes_follows_comfyui() {
    let setup = setup();
    let model = setup
        .call("UnetLoaderGGUF", vec![("unet_name", j(json!(TINY_FLUX_DEV_Q8_0)))])
        .unwrap()
        .remove(0);
    let entry = text_entry();
    let positive = setup
        .call(
            "FluxGuidance",
            vec![
                ("conditioning", Value::object(Conditioning(vec![entry.clone()]))),
                ("guidance", j(json!(2.5))),
            ],
        )
        .unwrap()
        .remove(0);
    let latent = setup
        .call(
            "EmptySD3LatentImage",
            vec![
                ("width", j(json!(32))),
                ("height", j(json!(24))),
                ("batch_size", j(json!(1))),
            ],
        )
        .unwrap()
        .remove(0);
    assert_eq!(latent.downcast::<Latent>().unwrap().samples.dims(), &[1, 16, 3, 4]);
    let negative = Value::object(Conditioning(vec![entry.clone()]));
    let sampled = one_euler_step(&setup, &model, &positive, &negative, &latent, 1.0);
    let expected = expected_euler_step(&model, &entry, 2.5, None, &[1, 16, 3, 4]);
    let difference = max_abs_difference(&sampled, &expected);
    assert!(difference < 1e-5, "{difference}");
}

/// The same weights as safetensors (f16) and as GGUF F16 give the same prediction; as GGUF
/// Q8_0 (matrices quantized, small tensors F32 as city96's files keep them) a close one.
#[test]
fn flux_from_gguf_predicts_as_from_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(SafetensorsFile::open(&write_tiny_flux(dir.path())).unwrap());
    let inputs = inputs(&tiny_flux());
    let reference = predict(&load(file.clone()), &inputs);
    for kind in [GgmlType::F16, GgmlType::Q8_0] {
        let path = dir.path().join(format!("tiny_flux_{}.gguf", kind.name()));
        write_flux_gguf(&file, kind, &path);
        let prediction = predict(&load(Arc::new(GgufFile::open(&path).unwrap())), &inputs);
        let difference = max_abs_difference(&prediction, &reference);
        let scale = max_abs_difference(&reference, &reference.zeros_like().unwrap());
        match kind {
            GgmlType::F16 => assert_eq!(difference, 0.0),
            _ => assert!(
                difference < 0.05 * scale && difference > 0.0,
                "Q8_0: {difference} of {scale}"
            ),
        }
    }
}

/// FLUX's VAE (16 latent channels, no quant convolutions, as BFL's `ae.safetensors`) loads
/// through VAELoader and decodes and encodes through the common nodes.
#[test]
fn the_flux_vae_loads_decodes_and_encodes() {
    let setup = setup();
    let layout = vae_layout(&tiny_flux_vae(), "").unwrap();
    assert!(layout.iter().all(|spec| !spec.name.contains("quant_conv")));
    let vae = setup
        .call("VAELoader", vec![("vae_name", j(json!(TINY_FLUX_VAE)))])
        .unwrap()
        .remove(0);
    let latent = Value::object(Latent::new(wave(&[1, 16, 3, 4], 0.41)));
    let image = setup
        .call("VAEDecode", vec![("samples", latent), ("vae", vae.clone())])
        .unwrap()
        .remove(0);
    let encoded = setup
        .call("VAEEncode", vec![("pixels", image.clone()), ("vae", vae)])
        .unwrap()
        .remove(0);
    assert_eq!(encoded.downcast::<Latent>().unwrap().samples.dims(), &[1, 16, 3, 4]);
}

/// Runs the bundled FLUX GGUF workflow with its diffusion-model loader replaced by `loader` and
/// returns the saved image's pixels.
fn flux_workflow_pixels(setup: &common::Setup, loader: serde_json::Value, prefix: &str) -> Vec<u8> {
    use easel_engine::events::EventKind;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../workflows/flux_q8_gguf_txt2img.json");
    let mut workflow: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    workflow["10"] = loader;
    workflow["9"]["inputs"]["filename_prefix"] = json!(prefix);
    let events = common::run_prompt(setup, workflow).unwrap();
    assert!(
        events.iter().any(|event| event.kind == EventKind::ExecutionSuccess),
        "{:?}",
        events.iter().map(|event| event.data.to_string()).collect::<Vec<_>>()
    );
    let output = &setup.services.get::<easel_nodes::paths::Paths>().unwrap().output;
    image::open(output.join(format!("{prefix}_00001_.png")))
        .unwrap()
        .to_rgb8()
        .into_raw()
}

/// Peak signal-to-noise ratio of 8-bit images, in dB.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse).log10()
}

/// The whole FLUX GGUF workflow (DualCLIPLoader with T5, FluxGuidance, ModelSamplingFlux,
/// SamplerCustomAdvanced, FLUX VAE): the tiny FLUX dev as bf16 safetensors and as GGUF F16
/// written from it make the same image; as GGUF Q8_0 and Q4_K close ones.
#[test]
fn flux_images_from_safetensors_and_gguf_agree() {
    let setup = setup();
    let models = &setup.services.get::<easel_nodes::paths::Paths>().unwrap().models;
    let dev = SafetensorsFile::open(&models.join("diffusion_models").join(TINY_FLUX_DEV)).unwrap();
    write_flux_gguf(&dev, GgmlType::F16, &models.join("unet").join("tiny_flux_dev-F16.gguf"));
    let gguf = |name: &str| json!({"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}});
    let bf16 = flux_workflow_pixels(
        &setup,
        json!({"class_type": "UNETLoader", "inputs": {"unet_name": TINY_FLUX_DEV, "weight_dtype": "default"}}),
        "bf16",
    );
    let f16 = flux_workflow_pixels(&setup, gguf("tiny_flux_dev-F16.gguf"), "f16");
    let q8 = flux_workflow_pixels(&setup, gguf(TINY_FLUX_DEV_Q8_0), "q8_0");
    let q4 = flux_workflow_pixels(&setup, gguf(TINY_FLUX_DEV_Q4_K), "q4_k");
    let largest_difference = |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
    assert!(largest_difference(&bf16, &f16) <= 1, "bf16 vs GGUF F16");
    let (q8_psnr, q4_psnr) = (psnr(&bf16, &q8), psnr(&bf16, &q4));
    eprintln!("FLUX workflow: GGUF Q8_0 PSNR {q8_psnr:.1} dB, Q4_K {q4_psnr:.1} dB against bf16");
    assert!(q8_psnr > 35.0, "Q8_0: {q8_psnr} dB");
    assert!(q4_psnr > 20.0 && q4_psnr < q8_psnr, "Q4_K: {q4_psnr} dB");
}

/// FLUX fill through InpaintModelConditioning and KSampler (one Euler step from σ 1): the model
/// sees, beside the noise, the masked image's latent in model space and the pixel mask with each
/// 8×8 block of pixels as 64 channels (ComfyUI's `Flux.concat_cond`).
#[test]
fn flux_fill_sees_the_masked_image_and_the_mask_blocks() {
    use easel_nodes::image::{Image, Mask};
    let setup = setup();
    let (model, vae) = flux_model_and_vae(&setup, TINY_FLUX_FILL);
    let (height, width) = (16, 24);
    let pixels: Vec<f32> = (0..height * width * 3)
        .map(|i| ((i as f32) * 0.37).sin() * 0.5 + 0.5)
        .collect();
    let image = Image {
        batch: 1,
        height,
        width,
        channels: 3,
        data: pixels,
    };
    let mask_values: Vec<f32> = (0..height * width).map(|i| ((i % 7) as f32) / 6.0).collect();
    let mask = Mask {
        batch: 1,
        height,
        width,
        data: mask_values.clone(),
    };
    let text = text_entry();
    let conditioned = setup
        .call(
            "InpaintModelConditioning",
            vec![
                ("positive", Value::object(Conditioning(vec![text.clone()]))),
                ("negative", Value::object(Conditioning(vec![text.clone()]))),
                ("vae", vae),
                ("pixels", Value::object(image)),
                ("mask", Value::object(mask)),
                ("noise_mask", j(json!(false))),
            ],
        )
        .unwrap();
    let entry = conditioned[0].downcast::<Conditioning>().unwrap().0[0].clone();
    let [positive, negative, latent] = [0, 1, 2].map(|index| conditioned[index].clone());
    let sampled = one_euler_step(&setup, &model, &positive, &negative, &latent, 1.0);

    let inpaint = entry.concat_image.as_ref().unwrap();
    let (latent_height, latent_width) = (height / 8, width / 8);
    let image_latent = ((&inpaint.latent - 0.1159).unwrap() * 0.3611).unwrap();
    let mut blocks = vec![0f32; 64 * latent_height * latent_width];
    for dy in 0..8 {
        for dx in 0..8 {
            for y in 0..latent_height {
                for x in 0..latent_width {
                    blocks[((dy * 8 + dx) * latent_height + y) * latent_width + x] =
                        inpaint.mask.as_ref().unwrap().data[(y * 8 + dy) * width + x * 8 + dx];
                }
            }
        }
    }
    let blocks = Tensor::from_vec(blocks, (1, 64, latent_height, latent_width), &Device::Cpu).unwrap();
    let concat = Tensor::cat(&[&image_latent, &blocks], 1).unwrap();
    let shape = [1, 16, latent_height, latent_width];
    let expected = expected_euler_step(&model, &entry, 3.5, Some(&concat), &shape);
    let difference = max_abs_difference(&sampled, &expected);
    assert!(difference < 1e-5, "{difference}");
}

/// FLUX canny/depth dev through InstructPixToPixConditioning and KSampler (one Euler step from
/// σ 1): the image is centre-cropped to a multiple of 8 and encoded, both sides carry its latent,
/// the latent to sample is zeros of its shape, and the model sees the image latent in model space
/// beside the noise (ComfyUI's `Flux.concat_cond` for 2 × 16 channels).
#[test]
fn flux_canny_sees_the_control_images_latent() {
    use easel_nodes::image::Image;
    let setup = setup();
    let (model, vae) = flux_model_and_vae(&setup, TINY_FLUX_CANNY);
    let (height, width) = (19, 27);
    let image = Image {
        batch: 1,
        height,
        width,
        channels: 3,
        data: (0..height * width * 3)
            .map(|i| ((i as f32) * 0.21).cos() * 0.5 + 0.5)
            .collect(),
    };
    let text = text_entry();
    let conditioned = setup
        .call(
            "InstructPixToPixConditioning",
            vec![
                ("positive", Value::object(Conditioning(vec![text.clone()]))),
                ("negative", Value::object(Conditioning(vec![text.clone()]))),
                ("vae", vae.clone()),
                ("pixels", Value::object(image.clone())),
            ],
        )
        .unwrap();
    let encoded = setup
        .call(
            "VAEEncode",
            vec![("pixels", Value::object(image.crop(1, 17, 1, 25))), ("vae", vae)],
        )
        .unwrap()[0]
        .downcast::<Latent>()
        .unwrap()
        .samples
        .clone();
    let shape = [1, 16, 2, 3];
    assert_eq!(encoded.dims(), shape);
    let latent = conditioned[2].downcast::<Latent>().unwrap();
    assert_eq!(latent.samples.dims(), shape);
    assert_eq!(
        latent
            .samples
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    for side in [0, 1] {
        let entry = &conditioned[side].downcast::<Conditioning>().unwrap().0[0];
        let concat = entry.concat_image.as_ref().expect("the image's latent");
        assert!(concat.mask.is_none());
        assert_eq!(max_abs_difference(&concat.latent, &encoded), 0.0);
    }
    let [positive, negative, latent] = [0, 1, 2].map(|index| conditioned[index].clone());
    let sampled = one_euler_step(&setup, &model, &positive, &negative, &latent, 1.0);
    let image_latent = ((&encoded - 0.1159).unwrap() * 0.3611).unwrap();
    let expected = expected_euler_step(&model, &text, 3.5, Some(&image_latent), &shape);
    let difference = max_abs_difference(&sampled, &expected);
    assert!(difference < 1e-5, "{difference}");
}
