//! `easel bench sd3`: for the tiny SD3 test checkpoint and a full-size SD3.5 medium MMDiT
//! (random weights written to a temporary directory: about 5 GB as f16, then measured in a
//! fresh process; or a model file given with `--checkpoint`), the load time, one
//! classifier-free-guidance step (batch 2: CLIP's and T5's 154 text tokens, the pooled vector)
//! at 512² and 1024², and the peak resident memory from loading through the steps against the
//! file's size.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use easel_models::architectures::mmdit::MmditInput;
use easel_models::checkpoint::UNET_PREFIX;
use easel_models::kernels::sgemm::Precision;
use easel_models::testmodels::{
    mmdit_layout, sd35_medium_mmdit, write_checkpoint, write_test_models, TINY_SD3_CHECKPOINT,
};
use easel_nodes::loaders::models::load_diffusion_model;
use easel_nodes::model::diffusion_model::DiffusionNetwork;

use super::{mean_seconds, peak_rss_bytes};
use crate::cli::BenchArgs;

/// Text tokens of an SD3 prompt: CLIP's 77, then T5's 77.
const TEXT_TOKENS: usize = 154;

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    if let Some(model) = &args.checkpoint {
        print_header();
        measure("SD3.5 medium", model, &[512, 1024], args.steps)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let dir = tempfile::tempdir()?;
    print_header();
    let tiny = write_test_models(dir.path())?
        .into_iter()
        .find(|path| path.ends_with(TINY_SD3_CHECKPOINT))
        .context("the tiny SD3 checkpoint was not written")?;
    measure("tiny SD3", &tiny, &[64], args.steps)?;
    if args.tiny_only {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let full = dir.path().join("sd3.5_medium_random.safetensors");
    let started = Instant::now();
    write_checkpoint(&full, &mmdit_layout(&sd35_medium_mmdit(), UNET_PREFIX)?)?;
    // Timed loads read a file at rest, as a user's model is, not one still being written back.
    std::fs::File::open(&full)?.sync_all()?;
    println!(
        "\nA full-size SD3.5 medium MMDiT with random weights (written in {:.0} s), measured in a fresh \
         process so that its peak memory is the model's alone:\n",
        started.elapsed().as_secs_f64()
    );
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "sd3", "--steps", &args.steps.to_string(), "--checkpoint"])
        .arg(&full)
        .status()?;
    anyhow::ensure!(status.success(), "measuring the full-size model failed: {status}");
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_header() {
    println!(
        "| model | load (s) | file (GiB) | latent | first step (s) | CFG step, batch 2 (s) | peak RSS so far (GiB) |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|");
}

/// Loads the MMDiT of `model` and times it at each of `sizes` (pixels per side).
fn measure(name: &str, model: &Path, sizes: &[usize], steps: usize) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let started = Instant::now();
    let (loaded, file_bytes) =
        load_diffusion_model(model, &device, Precision::F32, None).map_err(|error| anyhow::anyhow!("{error}"))?;
    let load = started.elapsed().as_secs_f64();
    let DiffusionNetwork::Mmdit(mmdit) = &loaded.0.network else {
        anyhow::bail!("{} holds no SD3 MMDiT", model.display());
    };
    let config = mmdit.config();
    let context_width = config.context_dim.context("an SD3 MMDiT embeds text tokens")?;
    let adm = config.adm_in_channels.context("an SD3 MMDiT embeds a pooled vector")?;
    let context = Tensor::randn(0f32, 1.0, (2, TEXT_TOKENS, context_width), &device)?;
    let y = Tensor::randn(0f32, 1.0, (2, adm), &device)?;
    let timesteps = Tensor::new(&[500f32, 500.0], &device)?;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    for &pixels in sizes {
        let side = pixels / 8;
        let x = Tensor::randn(0f32, 1.0, (2, config.in_channels, side, side), &device)?;
        let input = MmditInput {
            x: &x,
            timesteps: &timesteps,
            context: &context,
            y: Some(&y),
            control: &[],
            patches: None,
        };
        let (first, mean) = mean_seconds(steps, || mmdit.forward(&input))?;
        let peak = peak_rss_bytes().map_or("–".to_string(), |peak| format!("{:.2}", gib(peak)));
        println!(
            "| {name} | {load:.2} | {:.2} | {side}×{side} | {first:.2} | {mean:.2} | {peak} |",
            gib(file_bytes)
        );
    }
    Ok(())
}
