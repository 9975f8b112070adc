//! `easel bench TARGET`: measurements printed as tables — the HTTP API under load (`server`), what
//! the REST API adds over `POST /prompt` (`rest`),
//! validation's error body for many failing outputs (`validation`) and diffusion-model compute
//! (`sd15`, `sdxl`, `sd3`, `flux`), what a ControlNet adds to a step (`controlnet`), what an IP-Adapter
//! adds to a step and what encoding an image costs (`ipadapter`), what an upscale model costs
//! (`upscale`), and what EasyCache and LazyCache save (`step-cache`).

mod controlnet;
mod cpu_peak;
mod flux;
mod ipadapter;
mod rest;
mod rest_upload;
mod sd15;
mod sd3;
mod sdxl;
mod server;
mod step_cache;
mod upscale;
mod validation;

use std::time::Instant;

use anyhow::Context;

use candle_core::Tensor;

use crate::cli::{BenchArgs, BenchTarget};

pub fn bench(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    match args.target {
        BenchTarget::Server => server::bench(&args),
        BenchTarget::Rest => rest::bench(&args),
        BenchTarget::Sd15 => sd15::bench(&args),
        BenchTarget::Controlnet => controlnet::bench(&args),
        BenchTarget::Ipadapter => ipadapter::bench(&args),
        BenchTarget::Sdxl => sdxl::bench(&args),
        BenchTarget::Sd3 => sd3::bench(&args),
        BenchTarget::Flux => flux::bench(&args),
        BenchTarget::Validation => validation::bench(&args),
        BenchTarget::StepCache => step_cache::bench(&args),
        BenchTarget::Upscale => upscale::bench(&args),
    }
}

/// Runs a benchmark's PyTorch side (`script`, written into `dir` as `name`) with `--python`,
/// ComfyUI's checkout in `COMFYUI` and the number of timed steps as its argument; it prints its
/// table row.
pub(crate) fn run_comfyui_side(
    args: &BenchArgs,
    comfyui: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    script: &str,
) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, script)?;
    let status = std::process::Command::new(&args.python)
        .arg(&path)
        .arg(args.steps.to_string())
        .env("COMFYUI", comfyui)
        .status()
        .with_context(|| format!("running {}", args.python.display()))?;
    anyhow::ensure!(status.success(), "the ComfyUI side failed ({status})");
    Ok(())
}

/// The time of a warm-up run, then the mean of `runs` more.
pub(crate) fn mean_seconds(
    runs: usize,
    mut run: impl FnMut() -> candle_core::Result<Tensor>,
) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    run()?;
    let first = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..runs.max(1) {
        run()?;
    }
    Ok((first, started.elapsed().as_secs_f64() / runs.max(1) as f64))
}

/// The time of a warm-up run, then the fastest of `runs` more: on a shared machine the
/// fastest is the least disturbed.
pub(crate) fn fastest_seconds(
    runs: usize,
    mut run: impl FnMut() -> candle_core::Result<Tensor>,
) -> anyhow::Result<(f64, f64)> {
    let mut times = Vec::with_capacity(runs.max(1) + 1);
    for _ in 0..=runs.max(1) {
        let started = Instant::now();
        run()?;
        times.push(started.elapsed().as_secs_f64());
    }
    let fastest = times[1..].iter().copied().fold(f64::INFINITY, f64::min);
    Ok((times[0], fastest))
}

/// The process's peak resident set (`VmHWM`), where the platform says.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The tensors of a random LoRA of rank `rank` in kohya's names (`lora_unet_<module>`), f16
/// `lora_up` [out, rank] and `lora_down` [rank, in] for each (module, out, in).
pub(crate) fn kohya_lora_specs(
    modules: impl IntoIterator<Item = (String, usize, usize)>,
    rank: usize,
) -> Vec<easel_models::testmodels::TensorSpec> {
    use easel_models::testmodels::{Fill, TensorSpec};
    let mut specs = Vec::new();
    for (module, out, input) in modules {
        let lora_name = format!("lora_unet_{}", module.replace('.', "_"));
        for (suffix, shape) in [
            ("lora_up.weight", vec![out, rank]),
            ("lora_down.weight", vec![rank, input]),
        ] {
            specs.push(TensorSpec {
                name: format!("{lora_name}.{suffix}"),
                shape,
                fill: Fill::Random,
            });
        }
    }
    specs
}
