//! KSampler and KSamplerAdvanced with ComfyUI's schemas, and what every sampling node shares: the
//! seed input, the denoise mask, and progress (with live previews) reported for each step.

use candle_core::{Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::sampling::samplers::{SamplerError, SAMPLER_NAMES};
use easel_models::sampling::schedule::Scheduler;

use crate::conditioning::Conditioning;
use crate::image::resample::interpolate_mask;
use crate::image::Mask;
use crate::latent::{Latent, LatentFormat};
use crate::model::diffusion_model::Model;
use crate::runtime::{out_of_memory, tensor_error};
use crate::sampling::preview::PreviewSettings;
use crate::sampling::run::{sample, ProgressCallback, SamplingError, SamplingRequest};

/// The sampler and scheduler inputs shared by KSampler and KSamplerAdvanced.
fn sampler_inputs(schema: NodeSchema, tooltips: bool) -> NodeSchema {
    let tip = |spec: InputSpec, text: &str| if tooltips { spec.opt("tooltip", text) } else { spec };
    let schedulers: Vec<&str> = Scheduler::ALL.iter().map(|s| s.name()).collect();
    schema
        .required(
            "sampler_name",
            tip(InputSpec::combo(&SAMPLER_NAMES), "The algorithm used when sampling, this can affect the quality, speed, and style of the generated output."),
        )
        .required(
            "scheduler",
            tip(InputSpec::combo(&schedulers), "The scheduler controls how noise is gradually removed to form the image."),
        )
}

pub(crate) fn seed_spec(name_tooltip: Option<&str>) -> InputSpec {
    let spec = InputSpec::of("INT")
        .opt("default", 0)
        .opt("min", 0)
        .opt("max", u64::MAX)
        .opt("control_after_generate", true);
    match name_tooltip {
        Some(tooltip) => spec.opt("tooltip", tooltip),
        None => spec,
    }
}

/// `KSampler`.
pub struct KSampler;

impl Node for KSampler {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v1("KSampler", "nodes", "sampling")
            .display("KSampler")
            .description("Uses the provided model, positive and negative conditioning to denoise the latent image.")
            .required("model", InputSpec::of("MODEL").opt("tooltip", "The model used for denoising the input latent."))
            .required("seed", seed_spec(Some("The random seed used for creating the noise.")))
            .required(
                "steps",
                InputSpec::int(20, 1, 10000).opt("tooltip", "The number of steps used in the denoising process."),
            )
            .required(
                "cfg",
                InputSpec::float(8.0, 0.0, 100.0).opt("step", 0.1).opt("round", 0.01).opt(
                    "tooltip",
                    "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher values result in images more closely matching the prompt however too high values will negatively impact quality.",
                ),
            );
        sampler_inputs(schema, true)
            .required(
                "positive",
                InputSpec::of("CONDITIONING").opt("tooltip", "The conditioning describing the attributes you want to include in the image."),
            )
            .required(
                "negative",
                InputSpec::of("CONDITIONING").opt("tooltip", "The conditioning describing the attributes you want to exclude from the image."),
            )
            .required("latent_image", InputSpec::of("LATENT").opt("tooltip", "The latent image to denoise."))
            .required(
                "denoise",
                InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01).opt(
                    "tooltip",
                    "The amount of denoising applied, lower values will maintain the structure of the initial image allowing for image to image sampling.",
                ),
            )
            .output(OutputSpec::of("LATENT").tooltip("The denoised latent."))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let settings = SamplerSettings::read(inputs, "seed")?;
        run_sampler(
            ctx,
            inputs,
            &settings,
            inputs.float("denoise")?,
            false,
            None,
            None,
            false,
        )
    }
}

/// `KSamplerAdvanced`: KSampler with step ranges and optional noise.
pub struct KSamplerAdvanced;

impl Node for KSamplerAdvanced {
    fn schema(&self, _: &Services) -> NodeSchema {
        let enable = || InputSpec::combo(&["enable", "disable"]);
        let schema = NodeSchema::v1("KSamplerAdvanced", "nodes", "sampling")
            .display("KSampler (Advanced)")
            .required("model", InputSpec::of("MODEL"))
            .required("add_noise", enable())
            .required("noise_seed", seed_spec(None))
            .required("steps", InputSpec::int(20, 1, 10000))
            .required(
                "cfg",
                InputSpec::float(8.0, 0.0, 100.0).opt("step", 0.1).opt("round", 0.01),
            );
        sampler_inputs(schema, false)
            .required("positive", InputSpec::of("CONDITIONING"))
            .required("negative", InputSpec::of("CONDITIONING"))
            .required("latent_image", InputSpec::of("LATENT"))
            .required("start_at_step", InputSpec::int(0, 0, 10000))
            .required("end_at_step", InputSpec::int(10000, 0, 10000))
            .required("return_with_leftover_noise", InputSpec::combo(&["disable", "enable"]))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let settings = SamplerSettings::read(inputs, "noise_seed")?;
        let disable_noise = inputs.string("add_noise")? == "disable";
        let force_full_denoise = inputs.string("return_with_leftover_noise")? != "enable";
        let start = inputs.int("start_at_step")?.max(0) as usize;
        let end = inputs.int("end_at_step")?.max(0) as usize;
        run_sampler(
            ctx,
            inputs,
            &settings,
            1.0,
            disable_noise,
            Some(start),
            Some(end),
            force_full_denoise,
        )
    }
}

/// Seed, steps, cfg, sampler and scheduler of a sampler node.
struct SamplerSettings {
    seed: u64,
    steps: usize,
    cfg: f64,
    sampler: String,
    scheduler: Scheduler,
}

impl SamplerSettings {
    fn read(inputs: &NodeInputs, seed_name: &str) -> Result<Self, NodeError> {
        let seed = seed_input(inputs, seed_name)?;
        let sampler = inputs.string("sampler_name")?;
        // ComfyUI replaces an unknown name by the first entry of the list.
        let sampler = if SAMPLER_NAMES.contains(&sampler) {
            sampler
        } else {
            SAMPLER_NAMES[0]
        };
        Ok(SamplerSettings {
            seed,
            steps: inputs.int("steps")?.max(0) as usize,
            cfg: inputs.float("cfg")?,
            sampler: sampler.to_string(),
            scheduler: inputs.string("scheduler")?.parse().unwrap_or(Scheduler::Simple),
        })
    }
}

/// A seed input: any integer up to 2⁶⁴ − 1.
pub(crate) fn seed_input(inputs: &NodeInputs, name: &str) -> Result<u64, NodeError> {
    match inputs.get(name).and_then(Value::as_json) {
        Some(serde_json::Value::Number(number)) => Ok(number
            .as_u64()
            .or_else(|| number.as_i64().map(|v| v as u64))
            .unwrap_or(0)),
        _ => Err(NodeError::value(format!("{name} must be an integer"))),
    }
}

/// ComfyUI's `prepare_mask`: a latent's noise mask resized (bilinear, as `interpolate`) to the
/// latent's size, on every channel, tiled or cut to its batch.
pub(crate) fn denoise_mask(mask: &Mask, shape: &[usize]) -> Result<Tensor, NodeError> {
    let &[batch, channels, height, width] = shape else {
        return Err(NodeError::new(format!(
            "a latent of shape {shape:?} cannot take a noise mask"
        )));
    };
    let resized = interpolate_mask(mask, height, width)?.repeat_to_batch(batch);
    Tensor::from_vec(resized.data, (batch, 1, height, width), &Device::Cpu)
        .and_then(|mask| mask.repeat((1, channels, 1, 1)))
        .map_err(tensor_error)
}

#[allow(clippy::too_many_arguments)]
fn run_sampler(
    ctx: &NodeContext,
    inputs: &NodeInputs,
    settings: &SamplerSettings,
    denoise: f64,
    disable_noise: bool,
    start_step: Option<usize>,
    last_step: Option<usize>,
    force_full_denoise: bool,
) -> Result<NodeOutput, NodeError> {
    let model = inputs.object::<Model>("model")?;
    let latent = inputs.object::<Latent>("latent_image")?;
    let denoise_mask = match &latent.noise_mask {
        Some(mask) => Some(denoise_mask(mask, latent.samples.dims())?),
        None => None,
    };
    let request = SamplingRequest {
        model: &model.0,
        seed: settings.seed,
        steps: settings.steps,
        cfg: settings.cfg,
        sampler: &settings.sampler,
        scheduler: settings.scheduler,
        positive: inputs.object::<Conditioning>("positive")?,
        negative: inputs.object::<Conditioning>("negative")?,
        latent,
        denoise,
        disable_noise,
        start_step,
        last_step,
        force_full_denoise,
        denoise_mask,
    };
    let samples = with_progress(ctx, &model.0.latent_format, |progress| sample(&request, progress))?;
    Ok(NodeOutput::values(vec![Value::object(latent.with_samples(samples))]))
}

/// Runs a sampling `run` reporting each step's progress (and preview, where previews are on)
/// to the client; a stop asked for between steps ends it with the stop's error.
pub(crate) fn with_progress<T>(
    ctx: &NodeContext,
    format: &LatentFormat,
    run: impl FnOnce(&mut ProgressCallback) -> Result<T, SamplingError>,
) -> Result<T, NodeError> {
    let previews = ctx.services.get::<PreviewSettings>();
    let mut stopped: Option<NodeError> = None;
    let mut progress = |done: usize, total: usize, denoised: &Tensor| {
        let reported = match previews
            .map(|settings| settings.preview(format, denoised))
            .transpose()?
        {
            Some(Some(preview)) => ctx.progress_with_preview(done as u64, total as u64, preview),
            _ => ctx.progress(done as u64, total as u64),
        };
        reported.map_err(|error| {
            stopped = Some(error);
            candle_core::Error::Msg("sampling stopped".into())
        })
    };
    let result = run(&mut progress);
    if let Some(error) = stopped {
        return Err(error);
    }
    result.map_err(|error| match error {
        SamplingError::Sampler(SamplerError::Unknown(_)) => NodeError::typed("ValueError", error.to_string()),
        SamplingError::Sampler(SamplerError::Tensor(error)) | SamplingError::Tensor(error) => tensor_error(error),
        SamplingError::OutOfMemory(error) => out_of_memory(error),
        SamplingError::Conditioning(error) => NodeError::typed("RuntimeError", error.to_string()),
    })
}
