//! `easel bench sd15`: load time, UNet step time (one classifier-free-guidance step: batch 2)
//! and VAE decode time for the tiny SD1.x test model and for a full-size SD1.5 checkpoint
//! (random weights written to a temporary directory: about 2.1 GB), then the peak RSS and one
//! core's f32 and bf16 arithmetic peak ([`super::cpu_peak`]).
//!
//! Where the CPU has AVX512-BF16, the full-size UNet step is timed in bf16 too (`--bf16-unet`).
//!
//! The full-size step is the number to compare with PyTorch (`shared/docs/candle.md` §4: f32
//! 10.2 s per step, bf16 6.3 s, and 15.8 s per 512² decode on the 2-core reference machine).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use easel_models::architectures::unet::{UNet, UNetInput};
use easel_models::kernels::sgemm::Precision;
use easel_models::testmodels::{
    sd15_clip_l, sd15_unet, sd15_vae, sd1_checkpoint_layout, write_checkpoint, write_test_models, TINY_SD1_CHECKPOINT,
};
use easel_nodes::loaders::models::load_checkpoint;
use easel_nodes::loaders::t5_tokenizer_files::TokenizerSearch;

use super::{cpu_peak, mean_seconds, peak_rss_bytes};
use crate::cli::BenchArgs;

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let dir = tempfile::tempdir()?;
    println!("| model | latent | load (s) | first UNet step (s) | UNet step, batch 2 (s) | VAE decode (s) |");
    println!("|---|---|---:|---:|---:|---:|");
    let tiny = write_test_models(dir.path())?
        .into_iter()
        .find(|path| path.ends_with(TINY_SD1_CHECKPOINT))
        .context("the tiny checkpoint was not written")?;
    measure("tiny SD1.x", &tiny, 64, args.steps, Precision::F32)?;
    if !args.tiny_only {
        let full = write_random_sd15(dir.path())?;
        measure("SD1.5 (random weights)", &full, 512, args.steps, Precision::F32)?;
        if Precision::bf16_supported() {
            measure("SD1.5, UNet in bf16", &full, 512, args.steps, Precision::Bf16)?;
        }
    }
    if let Some(peak) = peak_rss_bytes() {
        println!("\npeak RSS: {:.2} GiB", peak as f64 / (1u64 << 30) as f64);
    }
    let shown = |rate: Option<f64>| rate.map_or("not available".to_string(), |r| format!("{r:.0} GFLOP/s"));
    let (fma, bf16) = cpu_peak::measure();
    println!(
        "one core's peak: f32 FMA {}, bf16 dot (AVX512-BF16) {}",
        shown(fma),
        shown(bf16)
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// A full-size SD1.5 checkpoint with random weights written into `dir` (2.1 GB), synced: timed
/// loads read a file at rest, as a user's checkpoint is, not one still being written back.
pub(super) fn write_random_sd15(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("sd15_random.safetensors");
    write_checkpoint(
        &path,
        &sd1_checkpoint_layout(&sd15_unet(), &sd15_clip_l(), &sd15_vae())?,
    )?;
    std::fs::File::open(&path)?.sync_all()?;
    Ok(path)
}

/// One classifier-free-guidance step's UNet inputs (batch 2): a random latent `side` × `side`
/// twice (cond and uncond take the same latent, as the samplers batch them), timestep 500, an
/// empty 77-token context.
pub(super) fn guidance_step_inputs(
    unet: &UNet,
    side: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let latent = Tensor::randn(0f32, 1.0, (1, 4, side, side), device)?;
    Ok((
        Tensor::cat(&[&latent, &latent], 0)?,
        Tensor::new(&[500f32, 500.0], device)?,
        Tensor::zeros((2, 77, unet.config().context_dim), DType::F32, device)?,
    ))
}

/// Loads `checkpoint` with the UNet in `precision`, then times `steps` UNet passes on one
/// classifier-free-guidance batch of a `pixels`² latent and one VAE decode (the mean of the
/// timed runs after one warm-up pass each; the VAE is not timed again for bf16, in which it does
/// not run). The first UNet pass is shown too: it also reads in the weight matrices, which
/// loading leaves in the file's map.
fn measure(name: &str, checkpoint: &Path, pixels: usize, steps: usize, precision: Precision) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let started = Instant::now();
    let (loaded, _) = load_checkpoint(checkpoint, &device, precision, TokenizerSearch::default())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let load = started.elapsed().as_secs_f64();
    let vae = loaded.vae.context("the checkpoint has no VAE")?;
    let side = pixels / 8;

    let unet = loaded
        .model
        .0
        .network
        .unet()
        .context("an SD1.x checkpoint has a UNet")?;
    let (x, timesteps, context) = guidance_step_inputs(unet, side, &device)?;
    let step = || unet.forward(&UNetInput::new(&x, &timesteps, &context));
    let (first_step_seconds, step_seconds) = mean_seconds(steps, step)?;

    let latent = Tensor::randn(0f32, 1.0, (1, 4, side, side), &device)?;
    let decode = match precision {
        Precision::F32 => format!("{:.3}", mean_seconds(steps.min(2), || vae.network.decode(&latent))?.1),
        Precision::Bf16 => "–".to_string(),
    };
    println!("| {name} | {side}×{side} | {load:.2} | {first_step_seconds:.3} | {step_seconds:.3} | {decode} |");
    Ok(())
}
