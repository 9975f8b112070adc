//! The Stable Diffusion nodes for latents and sampling, with ComfyUI's schemas (the loaders
//! are in [`crate::loader_nodes`], text encoding and conditioning in
//! [`crate::conditioning_nodes`], the VAE nodes in [`crate::vae_nodes`]).

use candle_core::{DType, Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use std::sync::Arc;

use crate::diffusion::{
    self, Conditioning, DiffusionModel, Latent, LatentFormat, Model, Prediction, ProgressCallback, SamplingError,
    SamplingRequest,
};
use crate::image::{Image, Mask};
use crate::latent_preview::PreviewSettings;
use crate::resample::{common_upscale, interpolate_mask, ResizeMethod};
use easel_models::kernels::sgemm::Precision;
use easel_models::memory::{self, OutOfMemory};
use easel_models::sampling::samplers::{SamplerError, SAMPLER_NAMES};
use easel_models::sampling::schedule::{Scheduler, SigmaSchedule};

pub(crate) const MAX_RESOLUTION: i64 = 16384;

/// Where models run: the registry's `Device` service, the CPU by default.
pub(crate) fn device(services: &Services) -> Device {
    services.get::<Device>().cloned().unwrap_or(Device::Cpu)
}

/// How diffusion models multiply on the CPU (a registry service: ComfyUI's `--bf16-unet`);
/// f32 by default. Text encoders and VAEs always compute in f32.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiffusionModelPrecision(pub Precision);

pub(crate) fn tensor_error(error: candle_core::Error) -> NodeError {
    NodeError::typed("RuntimeError", error.to_string())
}

pub(crate) fn out_of_memory(error: OutOfMemory) -> NodeError {
    NodeError::typed("OutOfMemoryError", error.to_string())
}

/// `EmptyLatentImage`: zeros of [batch, 4, height/8, width/8].
pub struct EmptyLatentImage;

impl Node for EmptyLatentImage {
    fn schema(&self, _: &Services) -> NodeSchema {
        let size = |what: &str| {
            InputSpec::int(512, 16, MAX_RESOLUTION)
                .opt("step", 8)
                .opt("tooltip", format!("The {what} of the latent images in pixels."))
        };
        NodeSchema::v1("EmptyLatentImage", "nodes", "latent")
            .display("Empty Latent Image")
            .description("Create a new batch of empty latent images to be denoised via sampling.")
            .required("width", size("width"))
            .required("height", size("height"))
            .required(
                "batch_size",
                InputSpec::int(1, 1, 4096).opt("tooltip", "The number of latent images in the batch."),
            )
            .output(OutputSpec::of("LATENT").tooltip("The empty latent image batch."))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        empty_latent(ctx, inputs, 4)
    }
}

/// A batch of zero latents of `channels` for the `width`, `height` and `batch_size` inputs.
pub(crate) fn empty_latent(ctx: &NodeContext, inputs: &NodeInputs, channels: usize) -> Result<NodeOutput, NodeError> {
    let positive = |name: &str| -> Result<usize, NodeError> { Ok(inputs.int(name)?.max(0) as usize) };
    let (width, height, batch) = (positive("width")?, positive("height")?, positive("batch_size")?);
    let shape = (batch, channels, height / 8, width / 8);
    let bytes = (batch * channels * (height / 8) * (width / 8) * 4) as u64;
    memory::ensure_available(bytes, || format!("an empty latent of {width}×{height} (batch {batch})"))
        .map_err(out_of_memory)?;
    let samples = Tensor::zeros(shape, DType::F32, &device(ctx.services)).map_err(tensor_error)?;
    Ok(NodeOutput::values(vec![Value::object(Latent::new(samples))]))
}

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
    let samples = with_progress(ctx, &model.0.latent_format, |progress| {
        diffusion::sample(&request, progress)
    })?;
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

/// `ModelSamplingDiscrete`: the model with another parameterisation over the discrete σ
/// schedule (LCM over its distilled 50-step schedule), optionally rescaled to zero terminal SNR.
pub struct ModelSamplingDiscrete;

impl Node for ModelSamplingDiscrete {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1(
            "ModelSamplingDiscrete",
            "comfy_extras.nodes_model_advanced",
            "advanced/model",
        )
        .display("ModelSamplingDiscrete")
        .required("model", InputSpec::of("MODEL"))
        .required(
            "sampling",
            InputSpec::combo(&["eps", "v_prediction", "lcm", "x0", "img_to_img"]),
        )
        .required("zsnr", InputSpec::of("BOOLEAN").opt("default", false))
        .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let prediction = match inputs.string("sampling")? {
            "eps" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            "lcm" => Prediction::Lcm,
            "x0" => Prediction::X0,
            "img_to_img" => Prediction::ImgToImg,
            other => return Err(NodeError::value(format!("unknown sampling '{other}'"))),
        };
        let zsnr = inputs.bool("zsnr")?;
        let schedule = SigmaSchedule::discrete_linear(0.00085, 0.012, 1000, zsnr);
        let schedule = if prediction == Prediction::Lcm {
            schedule.distilled()
        } else {
            schedule
        };
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                prediction,
                schedule,
                ..(*model.0).clone()
            },
        )))]))
    }
}

/// `DifferentialDiffusion`: the model with its inpainting mask thresholded anew at every step
/// (soft masks fade the change in gradually; see [`crate::diffusion::DiffusionModel`]).
pub struct DifferentialDiffusion;

impl Node for DifferentialDiffusion {
    fn schema(&self, _: &Services) -> NodeSchema {
        let mut schema = NodeSchema::v3(
            "DifferentialDiffusion",
            "comfy_extras.nodes_differential_diffusion",
            "_for_testing",
        )
        .display("Differential Diffusion")
        .required("model", InputSpec::of("MODEL"))
        .optional("strength", InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01))
        .output(OutputSpec::of("MODEL"));
        schema.experimental = true;
        schema
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let strength = match inputs.get("strength") {
            Some(_) => inputs.float("strength")?,
            None => 1.0,
        };
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                differential_diffusion: Some(strength),
                ..(*model.0).clone()
            },
        )))]))
    }
}

/// The `upscale_method` combo of the latent nodes.
const LATENT_UPSCALE_METHODS: [&str; 5] = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"];

/// Latents [B, C, H, W] as an image [B, H, W, C], the layout the resampling and compositing
/// code works on.
pub(crate) fn latents_as_image(samples: &Tensor) -> Result<Image, NodeError> {
    let (batch, channels, height, width) = samples.dims4().map_err(tensor_error)?;
    let data = samples
        .to_dtype(DType::F32)
        .and_then(|t| t.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1())
        .map_err(tensor_error)?;
    Image::new(batch, height, width, channels, data)
}

/// An image [B, H, W, C] back as latents [B, C, H, W] on `device`.
pub(crate) fn image_as_latents(image: Image, device: &Device) -> Result<Tensor, NodeError> {
    Tensor::from_vec(
        image.data,
        (image.batch, image.height, image.width, image.channels),
        device,
    )
    .and_then(|t| t.permute((0, 3, 1, 2))?.contiguous())
    .map_err(tensor_error)
}

/// Resizes latents to `width × height` latent pixels with `comfy.utils.common_upscale`.
pub(crate) fn upscale_latent(
    latent: &Latent,
    method: &str,
    width: usize,
    height: usize,
    crop: bool,
) -> Result<Latent, NodeError> {
    let method: ResizeMethod = method.parse()?;
    let image = latents_as_image(&latent.samples)?;
    let resized = common_upscale(&image, width, height, method, crop, false)?;
    let samples = image_as_latents(resized, latent.samples.device())?;
    Ok(Latent {
        samples,
        batch_index: latent.batch_index.clone(),
        noise_mask: latent.noise_mask.clone(),
    })
}

/// `LatentUpscale`: to a pixel size of at least 64 (a 0 keeps the aspect ratio from the other side).
pub struct LatentUpscale;

impl Node for LatentUpscale {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentUpscale", "nodes", "latent")
            .display("Upscale Latent")
            .required("samples", InputSpec::of("LATENT"))
            .required("upscale_method", InputSpec::combo(&LATENT_UPSCALE_METHODS))
            .required("width", InputSpec::int(512, 0, MAX_RESOLUTION).opt("step", 8))
            .required("height", InputSpec::int(512, 0, MAX_RESOLUTION).opt("step", 8))
            .required("crop", InputSpec::combo(&["disabled", "center"]))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let (_, _, height_in, width_in) = latent.samples.dims4().map_err(tensor_error)?;
        let mut width = inputs.int("width")?.max(0) as usize;
        let mut height = inputs.int("height")?.max(0) as usize;
        if width == 0 && height == 0 {
            return Ok(NodeOutput::values(vec![Value::object(latent.clone())]));
        }
        if width == 0 {
            height = height.max(64);
            width = ((width_in as f64 * height as f64 / height_in as f64).round_ties_even() as usize).max(64);
        } else if height == 0 {
            width = width.max(64);
            height = ((height_in as f64 * width as f64 / width_in as f64).round_ties_even() as usize).max(64);
        } else {
            width = width.max(64);
            height = height.max(64);
        }
        let crop = inputs.string("crop")? == "center";
        let method = inputs.string("upscale_method")?;
        Ok(NodeOutput::values(vec![Value::object(upscale_latent(
            latent,
            method,
            width / 8,
            height / 8,
            crop,
        )?)]))
    }
}

/// `LatentUpscaleBy`: by a factor, rounded to whole latent pixels.
pub struct LatentUpscaleBy;

impl Node for LatentUpscaleBy {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentUpscaleBy", "nodes", "latent")
            .display("Upscale Latent By")
            .required("samples", InputSpec::of("LATENT"))
            .required("upscale_method", InputSpec::combo(&LATENT_UPSCALE_METHODS))
            .required("scale_by", InputSpec::float(1.5, 0.01, 8.0).opt("step", 0.01))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let scale = inputs.float("scale_by")?;
        let (_, _, height, width) = latent.samples.dims4().map_err(tensor_error)?;
        let width = (width as f64 * scale).round_ties_even() as usize;
        let height = (height as f64 * scale).round_ties_even() as usize;
        let method = inputs.string("upscale_method")?;
        Ok(NodeOutput::values(vec![Value::object(upscale_latent(
            latent, method, width, height, false,
        )?)]))
    }
}

/// `LatentFromBatch`: `length` latents from `batch_index`, remembering where they came from.
pub struct LatentFromBatch;

impl Node for LatentFromBatch {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentFromBatch", "nodes", "latent/batch")
            .display("Latent From Batch")
            .required("samples", InputSpec::of("LATENT"))
            .required("batch_index", InputSpec::int(0, 0, 63))
            .required("length", InputSpec::int(1, 1, 64))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let batch = latent.samples.dim(0).map_err(tensor_error)?;
        let start = (inputs.int("batch_index")?.max(0) as usize).min(batch.saturating_sub(1));
        let length = (inputs.int("length")?.max(0) as usize).min(batch - start);
        let samples = latent.samples.narrow(0, start, length).map_err(tensor_error)?;
        let batch_index = match &latent.batch_index {
            Some(indices) => indices[start..start + length].to_vec(),
            None => (start..start + length).collect(),
        };
        // A mask of several items follows the latents (tiled to their count first).
        let noise_mask = latent.noise_mask.as_ref().map(|mask| match mask.batch {
            1 => mask.clone(),
            items if items < batch => mask.repeat_to_batch(batch).items(start, length),
            _ => mask.items(start, length),
        });
        Ok(NodeOutput::values(vec![Value::object(Latent {
            samples,
            batch_index: Some(batch_index),
            noise_mask,
        })]))
    }
}

/// `SetLatentNoiseMask`: limits sampling to the masked part of the latent (inpainting with a
/// regular model).
pub struct SetLatentNoiseMask;

impl Node for SetLatentNoiseMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("SetLatentNoiseMask", "nodes", "latent/inpaint")
            .display("Set Latent Noise Mask")
            .required("samples", InputSpec::of("LATENT"))
            .required("mask", InputSpec::of("MASK"))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let mask = inputs.object::<Mask>("mask")?;
        Ok(NodeOutput::values(vec![Value::object(Latent {
            noise_mask: Some(mask.clone()),
            ..latent.clone()
        })]))
    }
}

/// `RepeatLatentBatch`: the batch `amount` times over; repeated items get new batch indices.
pub struct RepeatLatentBatch;

impl Node for RepeatLatentBatch {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("RepeatLatentBatch", "nodes", "latent/batch")
            .display("Repeat Latent Batch")
            .required("samples", InputSpec::of("LATENT"))
            .required("amount", InputSpec::int(1, 1, 64))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let amount = inputs.int("amount")?.max(1) as usize;
        let samples = latent.samples.repeat((amount, 1, 1, 1)).map_err(tensor_error)?;
        let batch_index = latent.batch_index.as_ref().map(|indices| {
            let (low, high) = (
                indices.iter().min().copied().unwrap_or(0),
                indices.iter().max().copied().unwrap_or(0),
            );
            let offset = high - low + 1;
            (0..amount)
                .flat_map(|copy| indices.iter().map(move |index| index + copy * offset))
                .collect()
        });
        // As ComfyUI: a mask of several items is repeated as it is; a single one is kept.
        let noise_mask = latent.noise_mask.as_ref().map(|mask| match mask.batch {
            1 => mask.clone(),
            items => mask.repeat_to_batch(items * amount),
        });
        Ok(NodeOutput::values(vec![Value::object(Latent {
            samples,
            batch_index,
            noise_mask,
        })]))
    }
}
