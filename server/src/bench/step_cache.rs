//! `easel bench step-cache`: what EasyCache and LazyCache save. The same KSampler run (euler,
//! normal scheduler, 20 steps, cfg 7, one 256² image) on an SD1-shaped checkpoint with random
//! weights — SD1.5's layout at 96 channels wide (320 in SD1.5), so that a run takes seconds
//! on two cores — without a cache and with each cache at two thresholds: the time of the run,
//! the network calls made (counted by a network wrapper inside the cache's), and how far the
//! sampled latent is from the uncached one. `--tiny-only` runs the tiny test model instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use easel_models::kernels::sgemm::Precision;
use easel_models::sampling::schedule::Scheduler;
use easel_models::testmodels::{
    sd15_unet, sd1_checkpoint_layout, tiny_clip_l, tiny_sd1_unet, tiny_sd_vae, write_checkpoint,
};
use easel_nodes::conditioning::{CondEntry, Conditioning};
use easel_nodes::latent::Latent;
use easel_nodes::loaders::models::load_checkpoint;
use easel_nodes::loaders::t5_tokenizer_files::TokenizerSearch;
use easel_nodes::model::diffusion_model::DiffusionModel;
use easel_nodes::model::step_caches::{EasyCache, LazyCache, StepCacheSettings};
use easel_nodes::model::wrappers::{NetworkCall, NetworkWrapper, WrappedNetwork};
use easel_nodes::sampling::run::{sample, SamplingRequest};

use crate::cli::BenchArgs;

/// Sampler steps of each run.
const STEPS: usize = 20;

/// Counts the network calls that reach it.
struct CallCounter(Arc<AtomicUsize>);

impl NetworkWrapper for CallCounter {
    fn wrap(&self, call: &NetworkCall, network: &WrappedNetwork) -> candle_core::Result<Tensor> {
        self.0.fetch_add(1, Ordering::Relaxed);
        network(call.input)
    }
}

/// A cache to measure: its name and the patches it adds.
struct Case {
    name: &'static str,
    patch: fn(&DiffusionModel, StepCacheSettings) -> DiffusionModel,
    threshold: f64,
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let dir = tempfile::tempdir()?;
    let (unet, pixels) = match args.tiny_only {
        true => (tiny_sd1_unet(), 64),
        false => (
            easel_models::architectures::unet::UNetConfig {
                model_channels: 96,
                ..sd15_unet()
            },
            256,
        ),
    };
    let checkpoint = dir.path().join("sd1_narrow_random.safetensors");
    write_checkpoint(
        &checkpoint,
        &sd1_checkpoint_layout(&unet, &tiny_clip_l(), &tiny_sd_vae())?,
    )?;
    let device = Device::Cpu;
    let (loaded, _) = load_checkpoint(&checkpoint, &device, Precision::F32, TokenizerSearch::default())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let base = loaded.model.0.as_ref().clone();

    // Two fixed prompt embeddings.
    let context = |seed: f32| -> candle_core::Result<Conditioning> {
        let count = 77 * unet.context_dim;
        let values: Vec<f32> = (0..count).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        let tensor = Tensor::from_vec(values, (1, 77, unet.context_dim), &device)?;
        Ok(Conditioning(vec![CondEntry::new(tensor, None)]))
    };
    let (positive, negative) = (context(1.0)?, context(2.0)?);
    let side = pixels / 8;
    let latent = Latent {
        samples: Tensor::zeros((1, 4, side, side), candle_core::DType::F32, &device)?,
        batch_index: None,
        noise_mask: None,
    };
    let run = |model: &DiffusionModel, steps: usize| -> anyhow::Result<(Tensor, f64, usize)> {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = DiffusionModel {
            patches: model.patches.with_network_wrapper(Arc::new(CallCounter(calls.clone()))),
            ..model.clone()
        };
        let request = SamplingRequest {
            model: &counted,
            seed: 7,
            steps,
            cfg: 7.0,
            sampler: "euler",
            scheduler: Scheduler::Normal,
            positive: &positive,
            negative: &negative,
            latent: &latent,
            denoise: 1.0,
            disable_noise: false,
            start_step: None,
            last_step: None,
            force_full_denoise: false,
            denoise_mask: None,
        };
        let started = Instant::now();
        let sampled = sample(&request, &mut |_, _, _| Ok(()))?;
        Ok((sampled, started.elapsed().as_secs_f64(), calls.load(Ordering::Relaxed)))
    };
    // One step first, which reads the weights in from the file's map.
    run(&base, 1)?;

    let easy = |model: &DiffusionModel, settings| DiffusionModel {
        patches: model.patches.with_network_wrapper(Arc::new(EasyCache { settings })),
        ..model.clone()
    };
    let lazy = |model: &DiffusionModel, settings| DiffusionModel {
        patches: model.patches.with_prediction_wrapper(Arc::new(LazyCache { settings })),
        ..model.clone()
    };
    let cases = [
        Case {
            name: "EasyCache",
            patch: easy,
            threshold: 0.2,
        },
        Case {
            name: "EasyCache",
            patch: easy,
            threshold: 0.5,
        },
        Case {
            name: "LazyCache",
            patch: lazy,
            threshold: 0.2,
        },
        Case {
            name: "LazyCache",
            patch: lazy,
            threshold: 0.5,
        },
    ];

    println!(
        "SD1.x-shaped UNet (model_channels {}), {pixels}² image, euler/normal, {STEPS} steps, cfg 7; \
         start 0.15, end 0.95",
        unet.model_channels
    );
    println!("| cache | threshold | run (s) | speed-up | network calls | max abs diff | mean abs diff / mean abs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let (plain, plain_seconds, plain_calls) = run(&base, STEPS)?;
    println!("| none | – | {plain_seconds:.2} | 1.00× | {plain_calls} | – | – |");
    let plain_mean = plain.abs()?.mean_all()?.to_scalar::<f32>()?;
    for case in &cases {
        let settings = StepCacheSettings {
            reuse_threshold: case.threshold,
            start_percent: 0.15,
            end_percent: 0.95,
            verbose: false,
        };
        let (sampled, seconds, calls) = run(&(case.patch)(&base, settings), STEPS)?;
        let difference = (&sampled - &plain)?.abs()?;
        let max = difference.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let mean = difference.mean_all()?.to_scalar::<f32>()?;
        println!(
            "| {} | {} | {seconds:.2} | {:.2}× | {calls} | {max:.4} | {:.4} |",
            case.name,
            case.threshold,
            plain_seconds / seconds,
            mean / plain_mean
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
