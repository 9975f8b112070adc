//! `easel bench upscale`: a 4× ESRGAN RRDBNet the size of 4x-UltraSharp (23 blocks, 64
//! features, growth 32; random weights) upscales a 512² image, which ImageUpscaleWithModel runs
//! as one tile: the time of one pass and the process's peak RSS. With `--comfyui DIR`, spandrel's
//! RRDBNet (the network ComfyUI's UpscaleModelLoader builds) of the same shape does the same on
//! PyTorch in the same run (`upscale_comfyui.py`, beside this file, run by `--python`; DIR is
//! not read, spandrel comes from that Python).

use candle_core::{Device, Tensor};
use easel_models::architectures::esrgan::EsrganConfig;
use easel_models::testmodels::{esrgan_layout, write_checkpoint};
use easel_nodes::upscale::load_upscale_model;

use super::{mean_seconds, peak_rss_bytes, run_comfyui_side};
use crate::cli::BenchArgs;

/// The PyTorch side, kept beside the benchmark.
const COMFYUI_SCRIPT: &str = include_str!("upscale_comfyui.py");

/// 4x-UltraSharp's shape.
fn ultrasharp_sized() -> EsrganConfig {
    EsrganConfig {
        in_channels: 3,
        out_channels: 3,
        features: 64,
        growth: 32,
        blocks: 23,
        upsamplings: 2,
        unshuffle: None,
    }
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("4x_rrdbnet_random.safetensors");
    write_checkpoint(&path, &esrgan_layout(&ultrasharp_sized())?)?;
    println!("| engine | 4× RRDBNet (23 blocks, 64 features), 512² → 2048²: first pass (s) | mean pass (s) | peak RSS (GiB) |");
    println!("|---|---:|---:|---:|");
    let (network, _) = load_upscale_model(&path, &Device::Cpu).map_err(|error| anyhow::anyhow!("{error}"))?;
    let image = Tensor::rand(0f32, 1.0, (1, 3, 512, 512), &Device::Cpu)?;
    let (first, mean) = mean_seconds(args.steps, || network.unclamped(&image))?;
    let peak = peak_rss_bytes().map_or("?".to_string(), |bytes| {
        format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
    });
    println!("| Easel | {first:.2} | {mean:.2} | {peak} |");
    if let Some(comfyui) = &args.comfyui {
        run_comfyui_side(args, comfyui, dir.path(), "upscale_comfyui.py", COMFYUI_SCRIPT)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}
