//! `easel bench sdxl`: for the tiny SDXL test model and a full-size SDXL base checkpoint
//! (random weights written to a temporary directory: about 7 GB, then measured in a fresh
//! process; or a checkpoint given with `--checkpoint`), the load time, the UNet step (one
//! classifier-free-guidance step: batch 2, with the class-conditioning vector) at 512² and
//! 1024², the peak resident memory from loading through the steps against the file's size, and
//! the time to patch the UNet with a rank-32 LoRA of every transformer projection (kohya names).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use easel_models::architectures::unet::{UNet, UNetInput, TRANSFORMER_BLOCK_MATRICES};
use easel_models::checkpoint::UNET_PREFIX;
use easel_models::kernels::sgemm::Precision;
use easel_models::lora::{load_lora, LoraKeyMap};
use easel_models::testmodels::{sdxl_checkpoint_layout, write_checkpoint, write_test_models, TINY_SDXL_CHECKPOINT};
use easel_models::weights::{SafetensorsFile, TensorShapes};
use easel_nodes::loaders::models::load_checkpoint;
use easel_nodes::loaders::t5_tokenizer_files::TokenizerSearch;

use super::{kohya_lora_specs, mean_seconds, peak_rss_bytes};
use crate::cli::BenchArgs;

/// The rank of the benchmark's LoRA.
const LORA_RANK: usize = 32;

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    if let Some(checkpoint) = &args.checkpoint {
        print_header();
        measure("SDXL", checkpoint, &[512, 1024], args.steps)?;
        lora_patch_time(checkpoint)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let dir = tempfile::tempdir()?;
    print_header();
    let tiny = write_test_models(dir.path())?
        .into_iter()
        .find(|path| path.ends_with(TINY_SDXL_CHECKPOINT))
        .context("the tiny SDXL checkpoint was not written")?;
    measure("tiny SDXL", &tiny, &[64], args.steps)?;
    if args.tiny_only {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let full = dir.path().join("sdxl_random.safetensors");
    let started = Instant::now();
    write_checkpoint(&full, &sdxl_checkpoint_layout()?)?;
    // Timed loads read a file at rest, as a user's checkpoint is, not one still being written back.
    std::fs::File::open(&full)?.sync_all()?;
    println!(
        "\nA full-size SDXL base checkpoint with random weights (written in {:.0} s), measured in a fresh \
         process so that its peak memory is the model's alone:\n",
        started.elapsed().as_secs_f64()
    );
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "sdxl", "--steps", &args.steps.to_string(), "--checkpoint"])
        .arg(&full)
        .status()?;
    anyhow::ensure!(status.success(), "measuring the full-size checkpoint failed: {status}");
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_header() {
    println!("| model | load (s) | file (GiB) | latent | first UNet step (s) | UNet step, batch 2 (s) | peak RSS so far (GiB) |");
    println!("|---|---:|---:|---|---:|---:|---:|");
}

/// Loads `checkpoint` and times its UNet at each of `sizes` (pixels per side).
fn measure(name: &str, checkpoint: &Path, sizes: &[usize], steps: usize) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let started = Instant::now();
    let (loaded, file_bytes) = load_checkpoint(checkpoint, &device, Precision::F32, TokenizerSearch::default())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let load = started.elapsed().as_secs_f64();
    let unet = loaded.model.0.network.unet().context("an SDXL checkpoint has a UNet")?;
    let config = unet.config();
    let adm = config.adm_in_channels.context("an SDXL UNet has class conditioning")?;
    let context = Tensor::zeros((2, 77, config.context_dim), DType::F32, &device)?;
    let y = Tensor::randn(0f32, 1.0, (2, adm), &device)?;
    let timesteps = Tensor::new(&[500f32, 500.0], &device)?;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    for &pixels in sizes {
        let side = pixels / 8;
        let x = Tensor::randn(0f32, 1.0, (2, 4, side, side), &device)?;
        let input = UNetInput {
            y: Some(&y),
            ..UNetInput::new(&x, &timesteps, &context)
        };
        let (first, mean) = mean_seconds(steps, || unet.forward(&input))?;
        let peak = peak_rss_bytes().map_or("–".to_string(), |peak| format!("{:.2}", gib(peak)));
        println!(
            "| {name} | {load:.2} | {:.2} | {side}×{side} | {first:.2} | {mean:.2} | {peak} |",
            gib(file_bytes)
        );
    }
    Ok(())
}

/// Writes a rank-32 LoRA (f16, kohya's LDM names) for every attention projection, feed-forward
/// and transformer projection of `checkpoint`'s UNet, then times what LoraLoader does with it:
/// reading the LoRA, and building the UNet again with the patched matrices.
fn lora_patch_time(checkpoint: &Path) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let lora_path = &dir.path().join("sdxl_rank32_lora.safetensors");
    let file = std::sync::Arc::new(SafetensorsFile::open(checkpoint)?);
    let modules = file.tensor_names().filter_map(|name| {
        let module = name.strip_prefix(UNET_PREFIX)?.strip_suffix(".weight")?;
        let patched = TRANSFORMER_BLOCK_MATRICES
            .iter()
            .chain(&["proj_in", "proj_out"])
            .any(|suffix| module.ends_with(suffix));
        match (file.shape(name)?, patched) {
            (&[out, input], true) => Some((module.to_string(), out, input)),
            _ => None,
        }
    });
    let specs = kohya_lora_specs(modules, LORA_RANK);
    write_checkpoint(lora_path, &specs)?;
    let layers = specs.len() / 2;

    let (loaded, _) = load_checkpoint(checkpoint, &Device::Cpu, Precision::F32, TokenizerSearch::default())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let base = &loaded.model.0;
    let base_unet = base.network.unet().context("an SDXL checkpoint has a UNet")?;
    let megabytes = std::fs::metadata(lora_path)?.len() as f64 / (1u64 << 20) as f64;
    println!("\nrank-{LORA_RANK} LoRA on the SDXL UNet ({layers} layers, {megabytes:.0} MiB):");
    // The first patch also reads the patched base matrices from the file; the second finds
    // them in memory, as a LoRA applied to a model already in use does.
    for pass in ["first patch (reads the base matrices)", "second patch (base in memory)"] {
        let started = Instant::now();
        let lora = SafetensorsFile::open(lora_path)?;
        let mut keys = LoraKeyMap::default();
        keys.add_unet(
            base.source.file.as_ref(),
            &base.source.name_prefix(),
            base_unet.config(),
        );
        let patches = load_lora(&lora, &keys, 1.0)?;
        let read = started.elapsed().as_secs_f64();
        let source = base.source.patched(patches.patches);
        UNet::new(base_unet.config().clone(), source.weights())?;
        let total = started.elapsed().as_secs_f64();
        println!("- {pass}: LoRA read in {read:.2} s, patched UNet built in {total:.2} s in all");
    }
    Ok(())
}
