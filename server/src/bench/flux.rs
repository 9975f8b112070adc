//! `easel bench flux`: a FLUX-shaped model at full width (3072 wide, 24 heads, T5 and CLIP-L
//! widths; one double and two single blocks instead of 19 and 38, random weights) written as
//! bf16 safetensors and as GGUF Q8_0 and Q4_K, each loaded in a fresh process and timed for one
//! transformer step (batch 1, guidance embedded, 256 T5 tokens) at 256² and 512², with the
//! process's peak resident memory against the file's size; the Q8_0 file also with a rank-32
//! LoRA of every block matrix (kohya names), which stays quantized with the LoRA's update added
//! to the products; then a FLUX-sized linear layer with weights of every ggml type.
//! `--full-depth` measures FLUX.1-dev's whole depth as Q8_0 (a file of its real size), with and
//! without the LoRA;
//! `--checkpoint FILE [--lora FILE]` measures one file (a real FLUX model too).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Module, Tensor};
use easel_models::architectures::flux::{FluxConfig, FluxControl, FluxInput, ReferenceMethod};
use easel_models::formats::ggml_quants::quantize::{quantize, random_blocks};
use easel_models::formats::ggml_quants::GgmlType;
use easel_models::formats::gguf::{write_gguf, GgufFile, GgufTensorEntry};
use easel_models::kernels::linear::linear_no_bias;
use easel_models::kernels::sgemm::Precision;
use easel_models::lora::{Patch, WeightPatches};
use easel_models::sampling::noise::CpuGenerator;
use easel_models::testmodels::{flux_layout, write_checkpoint, write_checkpoint_in, write_gguf_copy, write_gguf_in};
use easel_models::weights::{SafetensorsFile, Weights};
use easel_nodes::loaders::lora::apply_model_lora;
use easel_nodes::loaders::models::load_diffusion_model;
use easel_nodes::model::diffusion_model::DiffusionNetwork;
use safetensors::tensor::Dtype as FileDtype;

use super::{fastest_seconds, kohya_lora_specs, peak_rss_bytes};
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
        measure(checkpoint, args.lora.as_deref(), args.steps)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let (config, files) = if args.full_depth {
        write_full_depth(dir.path())?
    } else {
        write_shaped(dir.path())?
    };
    for file in &files {
        std::fs::File::open(file)?.sync_all()?;
    }
    println!(
        "A FLUX.1-dev-shaped model (3072 wide, {} double and {} single blocks of FLUX's 19 and 38, random \
         weights; written in {:.0} s), each file measured in a fresh process so that its peak memory is \
         the model's alone. One step = one transformer pass at batch 1 with {TEXT_TOKENS} text tokens; \
         the fastest of the timed steps is shown.\n",
        config.double_blocks,
        config.single_blocks,
        started.elapsed().as_secs_f64()
    );
    print_header();
    let lora = dir.path().join("flux_rank32_lora.safetensors");
    write_block_lora(&config, &lora)?;
    let q8 = files.iter().find(|file| file.to_string_lossy().contains("Q8_0"));
    let runs = files
        .iter()
        .map(|file| (file, None))
        .chain(q8.map(|file| (file, Some(&lora))));
    for (file, lora) in runs {
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command
            .args([
                "bench",
                "flux",
                "--rows-only",
                "--steps",
                &args.steps.to_string(),
                "--checkpoint",
            ])
            .arg(file);
        if let Some(lora) = lora {
            command.arg("--lora").arg(lora);
        }
        let status = command.status()?;
        anyhow::ensure!(status.success(), "measuring {} failed: {status}", file.display());
    }
    if !args.full_depth {
        measure_kernels(dir.path(), args.steps)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// One double and two single blocks as bf16 safetensors, GGUF Q8_0 and GGUF Q4_K.
fn write_shaped(dir: &Path) -> anyhow::Result<(FluxConfig, Vec<PathBuf>)> {
    let config = flux_dev_shaped(1, 2);
    let bf16 = dir.join("flux_shaped-bf16.safetensors");
    write_checkpoint_in(&bf16, &flux_layout(&config, "")?, FileDtype::BF16)?;
    let (q8, q4) = (dir.join("flux_shaped-Q8_0.gguf"), dir.join("flux_shaped-Q4_K.gguf"));
    let source = SafetensorsFile::open(&bf16)?;
    let keep_name = |name: &str| name.to_string();
    write_gguf_copy(&source, GgmlType::Q8_0, "flux", &keep_name, &q8)?;
    write_gguf_copy(&source, GgmlType::Q4K, "flux", &keep_name, &q4)?;
    Ok((config, vec![bf16, q8, q4]))
}

/// FLUX.1-dev's whole depth as GGUF Q8_0, written a tensor at a time.
fn write_full_depth(dir: &Path) -> anyhow::Result<(FluxConfig, Vec<PathBuf>)> {
    let config = flux_dev_shaped(19, 38);
    let q8 = dir.join("flux_dev_depth-Q8_0.gguf");
    write_gguf_in(&flux_layout(&config, "")?, GgmlType::Q8_0, "flux", &q8)?;
    Ok((config, vec![q8]))
}

fn print_header() {
    println!(
        "| file | size (GiB) | load (s) | image | first step (s) | fastest step (s) | peak RSS (GiB) | peak RSS / file |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|");
}

/// The rank of the benchmark's LoRA.
const LORA_RANK: usize = 32;

/// Writes a rank-32 LoRA (f16, kohya's names over BFL's) of every block matrix of a FLUX model
/// of `config` to `path`.
fn write_block_lora(config: &FluxConfig, path: &Path) -> anyhow::Result<()> {
    let modules = flux_layout(config, "")?.into_iter().filter_map(|spec| {
        let module = spec
            .name
            .strip_suffix(".weight")
            .filter(|module| module.contains("blocks."))?;
        match spec.shape[..] {
            [out, input] => Some((module.to_string(), out, input)),
            _ => None,
        }
    });
    write_checkpoint(path, &kohya_lora_specs(modules, LORA_RANK))?;
    Ok(())
}

/// Loads the FLUX model of `checkpoint` (with `lora` applied) and times a step at each size.
fn measure(checkpoint: &Path, lora: Option<&Path>, steps: usize) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let started = Instant::now();
    let (mut model, file_bytes) =
        load_diffusion_model(checkpoint, &device, Precision::F32, None).map_err(|error| anyhow::anyhow!("{error}"))?;
    if let Some(lora) = lora {
        let lora = SafetensorsFile::open(lora)?;
        model = apply_model_lora(&lora, &model, 1.0).map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    let load = started.elapsed().as_secs_f64();
    let DiffusionNetwork::Flux(flux) = &model.0.network else {
        anyhow::bail!("{} is not a FLUX model", checkpoint.display());
    };
    let config = flux.config();
    let context = Tensor::randn(0f32, 1.0, (1, TEXT_TOKENS, config.context_dim), &device)?;
    let y = Tensor::randn(0f32, 1.0, (1, config.vector_dim), &device)?;
    let timesteps = Tensor::new(&[0.5f32], &device)?;
    let guidance = Tensor::new(&[3.5f32], &device)?;
    let mut name = checkpoint
        .file_name()
        .context("a file name")?
        .to_string_lossy()
        .into_owned();
    if lora.is_some() {
        name.push_str(&format!(" + rank-{LORA_RANK} LoRA"));
    }
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
            attention_mask: None,
            control: FluxControl::default(),
            image_prompt: None,
            patches: None,
            reference_latents: &[],
            reference_method: ReferenceMethod::default(),
        };
        let (first, fastest) = fastest_seconds(steps, || flux.forward(&input))?;
        let (peak, ratio) = match peak_rss_bytes() {
            Some(peak) => (
                format!("{:.2}", gib(peak)),
                format!("{:.2}", peak as f64 / file_bytes as f64),
            ),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {name} | {:.2} | {load:.2} | {pixels}² | {first:.2} | {fastest:.2} | {peak} | {ratio} |",
            gib(file_bytes)
        );
    }
    Ok(())
}

/// The linear layer timed per weight type: FLUX's MLP input (3072 → 12 288) over the tokens of
/// a 512² step (1024 image + 256 text).
const KERNEL_SHAPE: (usize, usize, usize) = (1280, 3072, 12288);

/// Times the linear layer with its weights in every ggml type ComfyUI-GGUF loads, read from one
/// GGUF file as a model reads them.
fn measure_kernels(dir: &Path, runs: usize) -> anyhow::Result<()> {
    const KINDS: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q5_1,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
        GgmlType::Q4_0,
        GgmlType::Q6K,
        GgmlType::Q5K,
        GgmlType::Q4K,
        GgmlType::Q3K,
        GgmlType::Q2K,
    ];
    let (tokens, in_features, out_features) = KERNEL_SHAPE;
    let path = dir.join("linear_layers.gguf");
    let entries: Vec<GgufTensorEntry> = KINDS
        .iter()
        .map(|&kind| GgufTensorEntry {
            name: format!("{}.weight", kind.name()),
            shape: vec![out_features, in_features],
            kind,
        })
        .collect();
    let mut generator = CpuGenerator::new(1);
    write_gguf(&path, &[], &entries, |entry| {
        let blocks = out_features * in_features / entry.kind.block_size();
        let bytes = random_blocks(entry.kind, blocks, 7).or_else(|| {
            let values: Vec<f32> = generator
                .randn(out_features * in_features)
                .iter()
                .map(|v| v * 0.02)
                .collect();
            quantize(entry.kind, &values)
        });
        bytes.ok_or_else(|| std::io::Error::other(format!("no data for {}", entry.kind.name())))
    })?;
    let file = std::sync::Arc::new(GgufFile::open(&path)?);
    let device = Device::Cpu;
    let weights = Weights::from_file(file, DType::F32, &device);
    let x = Tensor::randn(0f32, 1.0, (tokens, in_features), &device)?;
    let flop = 2.0 * (tokens * in_features * out_features) as f64;
    println!(
        "\nA linear layer {in_features} → {out_features} over {tokens} tokens (FLUX's MLP input at 512²), its \
         weights in each ggml type, read in place from a GGUF file; the fastest of the timed runs; × BF16: time against the BF16 weights'.\n"
    );
    println!("| weights | bits per weight | time (ms) | GFLOP/s | × BF16 |");
    println!("|---|---:|---:|---:|---:|");
    let mut times = Vec::with_capacity(KINDS.len());
    for kind in KINDS {
        let layer = linear_no_bias(in_features, out_features, weights.pp(kind.name()))?;
        let (_, seconds) = fastest_seconds(runs, || layer.forward(&x))?;
        times.push((kind, seconds));
    }
    let bf16_seconds = times
        .iter()
        .find(|(kind, _)| *kind == GgmlType::BF16)
        .map_or(f64::NAN, |(_, seconds)| *seconds);
    for (kind, seconds) in times {
        let bits = 8.0 * kind.block_bytes() as f64 / kind.block_size() as f64;
        println!(
            "| {} | {bits:.2} | {:.0} | {:.0} | {:.2} |",
            kind.name(),
            seconds * 1e3,
            flop / seconds / 1e9,
            seconds / bf16_seconds
        );
    }
    // The Q8_0 layer with a rank-32 LoRA, its update added to the products.
    let q8 = GgmlType::Q8_0.name();
    let up = Tensor::randn(0f32, 0.02, (out_features, LORA_RANK), &device)?;
    let down = Tensor::randn(0f32, 0.02, (LORA_RANK, in_features), &device)?;
    let patches = WeightPatches::default().and(HashMap::from([(
        format!("{q8}.weight"),
        vec![Patch::low_rank(up, down, 1.0)],
    )]));
    let plain = linear_no_bias(in_features, out_features, weights.pp(q8))?;
    let patched = linear_no_bias(in_features, out_features, weights.with_patches(patches).pp(q8))?;
    let (_, plain_seconds) = fastest_seconds(runs, || plain.forward(&x))?;
    let (_, patched_seconds) = fastest_seconds(runs, || patched.forward(&x))?;
    println!(
        "
The Q8_0 layer with a rank-{LORA_RANK} LoRA (kept quantized, the update added to the products): \
         {:.0} ms against {:.0} ms without ({:.2}×).",
        patched_seconds * 1e3,
        plain_seconds * 1e3,
        patched_seconds / plain_seconds
    );
    Ok(())
}
