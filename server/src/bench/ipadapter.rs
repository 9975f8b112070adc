//! `easel bench ipadapter`: what an IP-Adapter costs a sampling step, and what encoding an image
//! costs. The full-size SD1.5 UNet (random weights) takes one classifier-free-guidance step
//! (batch 2) on a 512² latent alone and with a standard SD1.5 IP-Adapter (random weights: four
//! 768-wide tokens, the pack's sixteen key/value modules) attending in its cross-attentions; a
//! ViT-H/14 CLIP vision encoder (random weights) encodes one 512² image (preprocessing
//! included). With `--comfyui DIR`, ComfyUI's own UNetModel with ComfyUI_IPAdapter_plus's
//! attention patch (from DIR's `custom_nodes`) and ComfyUI's ClipVisionModel do the same on
//! PyTorch in the same run (`ipadapter_comfyui.py`, beside this file, run by `--python`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{Device, Tensor};
use easel_models::architectures::clip_encoder::{Activation, ClipNaming};
use easel_models::architectures::clip_vision::{ClipVisionConfig, VisionKind};
use easel_models::architectures::ip_adapter::{IpAdapterConfig, ProjectionKind};
use easel_models::architectures::unet::UNetInput;
use easel_models::architectures::unet_patches::{BatchPart, CallInfo, PatchedCall};
use easel_models::kernels::sgemm::Precision;
use easel_models::testmodels::{clip_vision_layout, ip_adapter_layout, write_checkpoint};
use easel_nodes::clip_vision::{load_clip_vision, ClipVisionModel};
use easel_nodes::image::Image;
use easel_nodes::loaders::models::load_checkpoint;
use easel_nodes::loaders::t5_tokenizer_files::TokenizerSearch;
use easel_nodes::packs::ipadapter::attention::EmbedsScaling;
use easel_nodes::packs::ipadapter::{apply_ip_adapter, load_ip_adapter, ApplySettings, ImagePrompt};

use super::{mean_seconds, run_comfyui_side};
use crate::cli::BenchArgs;

/// The PyTorch side, kept beside the benchmark.
const COMFYUI_SCRIPT: &str = include_str!("ipadapter_comfyui.py");

/// OpenCLIP ViT-H/14 (ComfyUI's `clip_vision_config_h.json`).
fn vit_h() -> ClipVisionConfig {
    ClipVisionConfig {
        kind: VisionKind::Clip,
        width: 1280,
        intermediate: 5120,
        layers: 32,
        heads: 16,
        patch_size: 14,
        image_size: 224,
        projection: Some(1024),
        activation: Activation::Gelu,
        naming: ClipNaming::Transformers,
    }
}

/// A standard SD1.5 IP-Adapter: its modules' attention widths in the pack's order (input blocks
/// 1, 2, 4, 5, 7, 8, output blocks 3–11, the middle block).
fn sd15_ip_adapter() -> IpAdapterConfig {
    let widths = [
        320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280,
    ];
    IpAdapterConfig {
        projection: ProjectionKind::Linear { tokens: 4 },
        clip_width: 1024,
        token_width: 768,
        layers: widths
            .iter()
            .enumerate()
            .map(|(module, &width)| (2 * module + 1, (768, width)))
            .collect(),
        sdxl: false,
    }
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let dir = tempfile::tempdir()?;
    let checkpoint = super::sd15::write_random_sd15(dir.path())?;
    let encoder = dir.path().join("vit_h_random.safetensors");
    write_checkpoint(&encoder, &clip_vision_layout(&vit_h(), "")?)?;
    let adapter = dir.path().join("ip_adapter_sd15_random.safetensors");
    write_checkpoint(&adapter, &ip_adapter_layout(&sd15_ip_adapter())?)?;

    println!("| engine | UNet step, batch 2, 512² (s) | + IP-Adapter (s) | ratio | ViT-H encode of a 512² image (s) |");
    println!("|---|---:|---:|---:|---:|");
    measure(&checkpoint, &adapter, &encoder, args.steps)?;
    if let Some(comfyui) = &args.comfyui {
        run_comfyui_side(args, comfyui, dir.path(), "ipadapter_comfyui.py", COMFYUI_SCRIPT)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Easel's row: the mean of `steps` timed runs of each after one warm-up.
fn measure(checkpoint: &Path, adapter: &Path, encoder: &Path, steps: usize) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let error = |error: easel_engine::NodeError| anyhow::anyhow!("{error}");
    let (loaded, _) =
        load_checkpoint(checkpoint, &device, Precision::F32, TokenizerSearch::default()).map_err(error)?;
    let (adapter, _) = load_ip_adapter(adapter, &device).map_err(error)?;
    let (encoder, _) = load_clip_vision(encoder, &device).map_err(error)?;
    let embeds = Tensor::randn(0f32, 1.0, (1, 1024), &device)?;
    let settings = ApplySettings {
        weight: 1.0,
        weight_type: "linear",
        combine_embeds: "concat",
        start_at: 0.0,
        end_at: 1.0,
        attn_mask: None,
        unfold_batch: false,
        embeds_scaling: EmbedsScaling::ValueOnly,
    };
    let prompt = ImagePrompt::Embeds {
        positive: &embeds,
        negative: None,
    };
    let prompted = apply_ip_adapter(&loaded.model, &Arc::new(adapter), None, prompt, &settings).map_err(error)?;
    let unet = loaded
        .model
        .0
        .network
        .unet()
        .context("an SD1.x checkpoint has a UNet")?;
    let (x, timesteps, context) = super::sd15::guidance_step_inputs(unet, 64, &device)?;
    let info = CallInfo {
        original_shape: [2, 4, 64, 64],
        sigma: 1.0,
        parts: vec![BatchPart::Cond, BatchPart::Uncond],
    };
    let (_, plain) = mean_seconds(steps, || unet.forward(&UNetInput::new(&x, &timesteps, &context)))?;
    let (_, with_adapter) = mean_seconds(steps, || {
        unet.forward(&UNetInput {
            patches: Some(PatchedCall {
                patches: &prompted.0.patches.unet,
                info: &info,
            }),
            ..UNetInput::new(&x, &timesteps, &context)
        })
    })?;
    let values: Vec<f32> = Tensor::rand(0f32, 1.0, 512 * 512 * 3, &device)?.to_vec1()?;
    let image = Image::new(1, 512, 512, 3, values).map_err(error)?;
    let encoder = ClipVisionModel(Arc::new(encoder));
    let (_, encode) = mean_seconds(steps, || {
        Ok(encoder
            .encode(&image, true)
            .map_err(candle_core::Error::wrap)?
            .0
            .image_embeds)
    })?;
    println!(
        "| Easel | {plain:.2} | {with_adapter:.2} | {:.2}× | {encode:.3} |",
        with_adapter / plain
    );
    Ok(())
}
