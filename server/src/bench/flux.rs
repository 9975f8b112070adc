//! `easel bench flux`: a FLUX-shaped model at full width (3072 wide, 24 heads, T5 and CLIP-L
//! widths; one double and two single blocks instead of 19 and 38, random weights) written as
//! bf16 safetensors and as GGUF Q8_0 and Q4_K, each loaded in a fresh process and timed for one
//! transformer step (batch 1, guidance embedded, 256 T5 tokens) at 256² and 512², with the
//! process's peak resident memory against the file's size. `--checkpoint FILE` measures one
//! file (a real FLUX model too).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use easel_nodes::diffusion::DiffusionNetwork;
use easel_nodes::loader_nodes::load_diffusion_model;
use easel_nodes::models::flux::{FluxConfig, FluxControl, FluxInput};
use easel_nodes::models::ggml_quants::GgmlType;
use easel_nodes::models::sgemm::Precision;
use easel_nodes::models::testmodels::{flux_layout, write_checkpoint_in, write_gguf_copy};
use easel_nodes::models::weights::SafetensorsFile;
use safetensors::tensor::Dtype as FileDtype;

use super::{mean_seconds, peak_rss_bytes};
use crate::cli::BenchArgs;

/// T5 tokens of the prompt (ComfyUI pads FLUX prompts to 256).
const TEXT_TOKENS: usize = 256;
const SIZES: [usize; 2] = [256, 512];

/// FLUX.1-dev's widths with `double_blocks` and `single_blocks` blocks.
fn flux_dev_shaped(double_blocks: usize, single_blocks: usize) -> FluxConfig {
    FluxConfig {
        in_channels: 64,
        out_channels: 16,
        hidden_size: 3072,
        heads: 24,
        mlp_hidden: 12288,
        context_dim: 4096,
        vector_dim: 768,
        double_blocks,
        single_blocks,
        guidance_embed: true,
        qkv_bias: true,
    }
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    if let Some(checkpoint) = &args.checkpoint {
        if !args.rows_only {
            print_header();
        }
        measure(checkpoint, args.steps)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let config = flux_dev_shaped(1, 2);
    let bf16 = dir.path().join("flux_shaped-bf16.safetensors");
    write_checkpoint_in(&bf16, &flux_layout(&config, "")?, FileDtype::BF16)?;
    let (q8, q4) = (
        dir.path().join("flux_shaped-Q8_0.gguf"),
        dir.path().join("flux_shaped-Q4_K.gguf"),
    );
    {
        let source = SafetensorsFile::open(&bf16)?;
        let keep_name = |name: &str| name.to_string();
        write_gguf_copy(&source, GgmlType::Q8_0, "flux", &keep_name, &q8)?;
        write_gguf_copy(&source, GgmlType::Q4K, "flux", &keep_name, &q4)?;
    }
    for file in [&bf16, &q8, &q4] {
        std::fs::File::open(file)?.sync_all()?;
    }
    println!(
        "A FLUX.1-dev-shaped model (3072 wide, {} double and {} single blocks of FLUX's 19 and 38, random \
         weights; written in {:.0} s), each file measured in a fresh process so that its peak memory is \
         the model's alone. One step = one transformer pass at batch 1 with {TEXT_TOKENS} text tokens.\n",
        config.double_blocks,
        config.single_blocks,
        started.elapsed().as_secs_f64()
    );
    print_header();
    for file in [&bf16, &q8, &q4] {
        let status = std::process::Command::new(std::env::current_exe()?)
            .args([
                "bench",
                "flux",
                "--rows-only",
                "--steps",
                &args.steps.to_string(),
                "--checkpoint",
            ])
            .arg(file)
            .status()?;
        anyhow::ensure!(status.success(), "measuring {} failed: {status}", file.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_header() {
    println!("| file | size (GiB) | load (s) | image | first step (s) | step (s) | peak RSS (GiB) | peak RSS / file |");
    println!("|---|---:|---:|---|---:|---:|---:|---:|");
}

/// Loads the FLUX model of `checkpoint` and times a step at each size.
fn measure(checkpoint: &Path, steps: usize) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let started = Instant::now();
    let (model, file_bytes) =
        load_diffusion_model(checkpoint, &device, Precision::F32, None).map_err(|error| anyhow::anyhow!("{error}"))?;
    let load = started.elapsed().as_secs_f64();
    let DiffusionNetwork::Flux(flux) = &model.0.network else {
        anyhow::bail!("{} is not a FLUX model", checkpoint.display());
    };
    let config = flux.config();
    let context = Tensor::randn(0f32, 1.0, (1, TEXT_TOKENS, config.context_dim), &device)?;
    let y = Tensor::randn(0f32, 1.0, (1, config.vector_dim), &device)?;
    let timesteps = Tensor::new(&[0.5f32], &device)?;
    let guidance = Tensor::new(&[3.5f32], &device)?;
    let name = checkpoint
        .file_name()
        .context("a file name")?
        .to_string_lossy()
        .into_owned();
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    for pixels in SIZES {
        let side = pixels / 8;
        let x = Tensor::randn(0f32, 1.0, (1, config.out_channels, side, side), &device)?;
        let input = FluxInput {
            x: &x,
            timesteps: &timesteps,
            context: &context,
            y: &y,
            guidance: config.guidance_embed.then_some(&guidance),
            concat: None,
            control: FluxControl::default(),
            image_prompt: None,
        };
        let (first, mean) = mean_seconds(steps, || flux.forward(&input))?;
        let (peak, ratio) = match peak_rss_bytes() {
            Some(peak) => (
                format!("{:.2}", gib(peak)),
                format!("{:.2}", peak as f64 / file_bytes as f64),
            ),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {name} | {:.2} | {load:.2} | {pixels}² | {first:.2} | {mean:.2} | {peak} | {ratio} |",
            gib(file_bytes)
        );
    }
    Ok(())
}
