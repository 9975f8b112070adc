//! `easel bench controlnet`: what a ControlNet costs a sampling step. The full-size SD1.5 UNet
//! (random weights) takes one classifier-free-guidance step (batch 2) on a 512² latent alone,
//! with one SD1.5 ControlNet (random weights, its residuals computed in the same step) and with
//! two chained; the times and their ratios to the plain step. With `--comfyui DIR`, ComfyUI's
//! own `UNetModel` and `cldm.ControlNet` of the same shapes take the same three steps on PyTorch
//! in the same run (`controlnet_comfyui.py`, beside this file, run by `--python`).

use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use easel_models::architectures::controlnet::{ControlHint, ControlNetConfig, ControlNetInput};
use easel_models::architectures::unet::{ControlResiduals, UNetInput};
use easel_models::kernels::sgemm::Precision;
use easel_models::testmodels::{controlnet_layout, sd15_unet, write_checkpoint};
use easel_nodes::controlnet::nodes::load_controlnet;
use easel_nodes::controlnet::ControlNetwork;
use easel_nodes::loaders::models::load_checkpoint;
use easel_nodes::loaders::t5_tokenizer_files::TokenizerSearch;

use super::{mean_seconds, run_comfyui_side};
use crate::cli::BenchArgs;

/// The PyTorch side, kept beside the benchmark.
const COMFYUI_SCRIPT: &str = include_str!("controlnet_comfyui.py");

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let dir = tempfile::tempdir()?;
    let checkpoint = super::sd15::write_random_sd15(dir.path())?;
    let controlnet = dir.path().join("sd15_controlnet_random.safetensors");
    write_checkpoint(
        &controlnet,
        &controlnet_layout(&ControlNetConfig::copying(&sd15_unet(), 3))?,
    )?;
    std::fs::File::open(&controlnet)?.sync_all()?;

    println!(
        "| engine | UNet step, batch 2, 512² (s) | + one ControlNet (s) | ratio | + two ControlNets (s) | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    measure(&checkpoint, &controlnet, args.steps)?;
    if let Some(comfyui) = &args.comfyui {
        run_comfyui_side(args, comfyui, dir.path(), "controlnet_comfyui.py", COMFYUI_SCRIPT)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Easel's row: the mean of `steps` timed steps of each kind after one warm-up.
fn measure(checkpoint: &Path, controlnet: &Path, steps: usize) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let (loaded, _) = load_checkpoint(checkpoint, &device, Precision::F32, TokenizerSearch::default())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let (control, _) = load_controlnet(controlnet, None, &device).map_err(|error| anyhow::anyhow!("{error}"))?;
    let ControlNetwork::ControlNet(control) = control.network else {
        anyhow::bail!("the benchmark's ControlNet loaded as another kind of control model");
    };
    let unet = loaded
        .model
        .0
        .network
        .unet()
        .context("an SD1.x checkpoint has a UNet")?;
    let (x, timesteps, context) = super::sd15::guidance_step_inputs(unet, 64, &device)?;
    // The hint through the ControlNet's hint block once, as the nodes keep it for a sampling.
    let hint = control.guided_hint(&Tensor::rand(0f32, 1.0, (1, 3, 512, 512), &device)?, x.dtype())?;
    let residuals = || -> candle_core::Result<ControlResiduals> {
        control
            .forward(&ControlNetInput {
                x: &x,
                hint: ControlHint::Guided(&hint),
                timesteps: &timesteps,
                context: &context,
                y: None,
                control_type: None,
            })?
            .residuals(1.0)
    };
    let step = |controls: usize| -> candle_core::Result<Tensor> {
        let mut merged: Option<ControlResiduals> = None;
        for _ in 0..controls {
            let own = residuals()?;
            merged = Some(match merged {
                Some(earlier) => own.merged_with(earlier)?,
                None => own,
            });
        }
        unet.forward(&UNetInput {
            control: merged.as_ref(),
            ..UNetInput::new(&x, &timesteps, &context)
        })
    };
    let (_, plain) = mean_seconds(steps, || step(0))?;
    let (_, one) = mean_seconds(steps, || step(1))?;
    let (_, two) = mean_seconds(steps, || step(2))?;
    println!(
        "| Easel | {plain:.2} | {one:.2} | {:.2}× | {two:.2} | {:.2}× |",
        one / plain,
        two / plain
    );
    Ok(())
}
