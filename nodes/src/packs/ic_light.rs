//! kijai's ComfyUI-IC-Light (`custom_nodes.ComfyUI-IC-Light`): relighting with SD1.5.
//!
//! - LoadAndApplyICLightUnet: the IC-Light "fc" or "fbc" offsets (from `models/unet`, in the
//!   diffusers or the LDM layout) added to the model's UNet weights, its input convolution
//!   zero-padded to the IC-Light one's 8 or 12 channels first (ComfyUI's `pad_weight`); the model
//!   then takes the conditioning's concatenated latents as its extra channels.
//! - ICLightConditioning: the foreground's latent (and the background's, for "fbc") times the
//!   multiplier, concatenated to both sides' entries; an empty latent to sample.
//! - LightSource: a gradient image from one side or corner (the pack's `generate_gradient_image`,
//!   in its float64 arithmetic and 8-bit truncation).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};
use easel_models::architectures::unet::{UNet, UNetConfig};
use easel_models::checkpoint::Family;
use easel_models::diffusers_layout::{ConvertedWeights, DIFFUSERS_UNET_MARKER};
use easel_models::lora::Patch;
use easel_models::weights::{MappedWeights, PaddedWeights, WeightSource};

use crate::conditioning::{ConcatImage, CondEntry, Conditioning};
use crate::image::resample::{common_upscale, ResizeMethod};
use crate::image::Image;
use crate::latent::nodes::{image_as_latents, latents_as_image};
use crate::latent::Latent;
use crate::loaders::models::{file_names, model_file, open_weight_file};
use crate::model::diffusion_model::{DiffusionModel, DiffusionNetwork, Model};
use crate::runtime::tensor_error;

/// The pack's module name, as ComfyUI names a custom node pack's module.
const MODULE: &str = "custom_nodes.ComfyUI-IC-Light";
/// The UNet's input convolution, which IC-Light widens.
const INPUT_CONV: &str = "input_blocks.0.0.weight";
/// The pack's `LightPosition` values.
pub const LIGHT_POSITIONS: [&str; 8] = [
    "Left Light",
    "Right Light",
    "Top Light",
    "Bottom Light",
    "Top Left Light",
    "Top Right Light",
    "Bottom Left Light",
    "Bottom Right Light",
];

/// Adds the pack's nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(LoadAndApplyIcLightUnet);
    registry.register(IcLightConditioning);
    registry.register(LightSource);
}

/// What ComfyUI calls a family's model configuration (the pack's error names it).
fn config_class(family: Family) -> &'static str {
    match family {
        Family::Sd1 => "SD15",
        Family::Sd2 => "SD20",
        Family::Sdxl => "SDXL",
        Family::SdxlRefiner => "SDXLRefiner",
        Family::Sd3 => "SD3",
        Family::Flux => "Flux",
    }
}

/// `model` with the IC-Light offsets of `file` (its UNet's names, no prefix) added.
pub fn apply_ic_light(model: &DiffusionModel, file: Arc<dyn MappedWeights>) -> Result<DiffusionModel, NodeError> {
    let DiffusionNetwork::UNet(unet) = &model.network else {
        return Err(NodeError::new("IC-Light patches a UNet; this model has none"));
    };
    let input_conv = file
        .shape(INPUT_CONV)
        .map(<[usize]>::to_vec)
        .ok_or_else(|| NodeError::new("Could not patch model"))?;
    let prefix = model.source.name_prefix();
    let offsets = WeightSource::new(file.clone(), "", &model.device, model.source.precision);
    let patches: HashMap<String, Vec<Patch>> = file
        .tensor_names()
        .filter(|name| model.source.file.has(&format!("{prefix}{name}")))
        .map(|name| {
            let added = Patch::merge(offsets.clone(), name.to_string(), 1.0, 1.0);
            (format!("{prefix}{name}"), vec![added])
        })
        .collect();
    let padded = HashMap::from([(format!("{prefix}{INPUT_CONV}"), input_conv.clone())]);
    let source = WeightSource {
        file: Arc::new(PaddedWeights::new(model.source.file.clone(), padded)),
        ..model.source.clone()
    }
    .patched(patches);
    let config = UNetConfig {
        in_channels: input_conv[1],
        ..unet.config().clone()
    };
    let network = UNet::new(config, source.weights()).map_err(tensor_error)?;
    Ok(DiffusionModel {
        network: DiffusionNetwork::UNet(Arc::new(network)),
        source,
        ic_light: true,
        ..model.clone()
    })
}

/// `LoadAndApplyICLightUnet`.
pub struct LoadAndApplyIcLightUnet;

impl Node for LoadAndApplyIcLightUnet {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("LoadAndApplyICLightUnet", MODULE, "IC-Light")
            .display("Load And Apply IC-Light")
            .description(
                "\n  \nLoads and applies the diffusers SD1.5 IC-Light models available here:  \nhttps://huggingface.co/lllyasviel/ic-light/tree/main  \n  \nUsed with ICLightConditioning -node  \n",
            )
            .required("model", InputSpec::of("MODEL"))
            .required("model_path", InputSpec::combo(&file_names(services, "diffusion_models")))
            .model_folder("model_path", "diffusion_models")
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        if model.0.family != Family::Sd1 {
            return Err(NodeError::new(format!(
                "Attempted to load {} model, IC-Light is only compatible with SD 1.5 models.",
                config_class(model.0.family)
            )));
        }
        let path = model_file(ctx, "diffusion_models", inputs.string("model_path")?)?;
        let file = open_weight_file(&path)?;
        let file: Arc<dyn MappedWeights> = if file.has(DIFFUSERS_UNET_MARKER) {
            Arc::new(ConvertedWeights::diffusers_unet(file).map_err(|_| NodeError::new("Could not patch model"))?)
        } else {
            file
        };
        let patched = apply_ic_light(&model.0, file)?;
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(patched)))]))
    }
}

/// `ICLightConditioning`.
pub struct IcLightConditioning;

impl Node for IcLightConditioning {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ICLightConditioning", MODULE, "IC-Light")
            .display("IC-Light Conditioning")
            .description(
                "\n  \nConditioning for the IC-Light model.  \nTo use the \"opt_background\" input, you also need to use the  \n\"fbc\" version of the IC-Light models.  \n  \n",
            )
            .required("positive", InputSpec::of("CONDITIONING"))
            .required("negative", InputSpec::of("CONDITIONING"))
            .required("vae", InputSpec::of("VAE"))
            .required("foreground", InputSpec::of("LATENT"))
            .required("multiplier", InputSpec::float(0.18215, 0.0, 1.0).opt("step", 0.001))
            .optional("opt_background", InputSpec::of("LATENT"))
            .output(OutputSpec::of("CONDITIONING").named("positive"))
            .output(OutputSpec::of("CONDITIONING").named("negative"))
            .output(OutputSpec::of("LATENT").named("empty_latent"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let foreground = &inputs.object::<Latent>("foreground")?.samples;
        let concat = match inputs.optional_object::<Latent>("opt_background")? {
            Some(background) => joined_latents(foreground, &background.samples)?,
            None => foreground.clone(),
        };
        let concat = (concat * inputs.float("multiplier")?).map_err(tensor_error)?;
        let with_concat = |name: &str| -> Result<Value, NodeError> {
            let entries = inputs
                .object::<Conditioning>(name)?
                .0
                .iter()
                .map(|entry| CondEntry {
                    concat_image: Some(ConcatImage {
                        latent: concat.clone(),
                        mask: None,
                    }),
                    ..entry.clone()
                })
                .collect();
            Ok(Value::object(Conditioning(entries)))
        };
        let empty = Latent::new(foreground.zeros_like().map_err(tensor_error)?);
        Ok(NodeOutput::values(vec![
            with_concat("positive")?,
            with_concat("negative")?,
            Value::object(empty),
        ]))
    }
}

/// The foreground's and the background's latents side by side on the channels: the background
/// resized bilinearly to the foreground's size, the smaller batch repeated to the larger one
/// (by whole multiples, as the pack does).
fn joined_latents(foreground: &Tensor, background: &Tensor) -> Result<Tensor, NodeError> {
    let (fg_batch, _, height, width) = foreground.dims4().map_err(tensor_error)?;
    let (bg_batch, _, bg_height, bg_width) = background.dims4().map_err(tensor_error)?;
    let background = if (bg_height, bg_width) != (height, width) || background.dim(1).ok() != foreground.dim(1).ok() {
        let image = latents_as_image(background)?;
        let resized = common_upscale(&image, width, height, ResizeMethod::Bilinear, false, false)?;
        image_as_latents(resized, background.device())?
    } else {
        background.clone()
    };
    let repeat = |t: &Tensor, times: usize| -> Result<Tensor, NodeError> {
        match times > 1 {
            true => t.repeat((times, 1, 1, 1)).map_err(tensor_error),
            false => Ok(t.clone()),
        }
    };
    let foreground = repeat(foreground, bg_batch / fg_batch.max(1))?;
    let background = repeat(&background, fg_batch / bg_batch.max(1))?;
    Tensor::cat(&[&foreground, &background], 1).map_err(tensor_error)
}

/// `LightSource`.
pub struct LightSource;

impl Node for LightSource {
    fn schema(&self, _: &Services) -> NodeSchema {
        let size = || InputSpec::int(512, 0, 16384).opt("step", 8);
        NodeSchema::v1("LightSource", MODULE, "IC-Light")
            .display("Simple Light Source")
            .description(
                "\nGenerates a gradient image that can be used  \nas a simple light source.  The color can be  \nspecified in RGB or hex format.  \n",
            )
            .required("light_position", InputSpec::combo(&LIGHT_POSITIONS))
            .required("multiplier", InputSpec::float(1.0, 0.0, 100.0).opt("step", 0.001))
            .required("start_color", InputSpec::string("#FFFFFF"))
            .required("end_color", InputSpec::string("#000000"))
            .required("width", size())
            .required("height", size())
            .optional("batch_size", InputSpec::int(1, 1, 4096).opt("step", 1))
            .optional("prev_image", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE").named("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let position = inputs.string("light_position")?;
        let width = usize::try_from(inputs.int("width")?).unwrap_or(0);
        let height = usize::try_from(inputs.int("height")?).unwrap_or(0);
        let start = rgb(inputs.string("start_color")?)?;
        let end = rgb(inputs.string("end_color")?)?;
        let levels = gradient_image(width, height, start, end, inputs.float("multiplier")?, position)?;
        let batch = match inputs.get("batch_size") {
            Some(_) => usize::try_from(inputs.int("batch_size")?).unwrap_or(1),
            None => 1,
        };
        let frame: Vec<f32> = levels.iter().map(|&level| f32::from(level) / 255.0).collect();
        let image = Image::new(batch, height, width, 3, frame.repeat(batch))?;
        let image = match inputs.optional_object::<Image>("prev_image")? {
            Some(previous) => Image::concat(&[previous.clone(), image])?,
            None => image,
        };
        Ok(NodeOutput::values(vec![Value::object(image)]))
    }
}

/// The pack's `toRgb`: `#RRGGBB`, or `r,g,b`.
fn rgb(color: &str) -> Result<[f64; 3], NodeError> {
    let invalid = || NodeError::value(format!("invalid literal for int() with base 10: '{color}'"));
    if color.starts_with('#') && color.len() == 7 {
        let channel = |at: usize| {
            color
                .get(at..at + 2)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .map(f64::from)
                .ok_or_else(invalid)
        };
        return Ok([channel(1)?, channel(3)?, channel(5)?]);
    }
    let parts: Vec<f64> = color
        .split(',')
        .map(|part| part.trim().parse::<i64>().map(|v| v as f64).map_err(|_| invalid()))
        .collect::<Result<_, _>>()?;
    match parts.as_slice() {
        [r, g, b, ..] => Ok([*r, *g, *b]),
        _ => Err(invalid()),
    }
}

/// numpy's `linspace(start, stop, count)`: `i·step + start`, the last value `stop` exactly.
fn linspace(start: f64, stop: f64, count: usize) -> Vec<f64> {
    let step = (stop - start) / count.saturating_sub(1).max(1) as f64;
    let mut values: Vec<f64> = (0..count).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut().filter(|_| count > 1) {
        *last = stop;
    }
    values
}

/// `generate_gradient_image`: 8-bit RGB levels [height, width, 3] blending `start` into `end`
/// by the gradient from the light's side or corner (to the power `multiplier`).
pub fn gradient_image(
    width: usize,
    height: usize,
    start: [f64; 3],
    end: [f64; 3],
    multiplier: f64,
    position: &str,
) -> Result<Vec<u8>, NodeError> {
    let ramp = |rising: bool, count: usize| -> Vec<f64> {
        let (from, to) = if rising { (0.0, 1.0) } else { (1.0, 0.0) };
        linspace(from, to, count)
            .into_iter()
            .map(|v| v.powf(multiplier))
            .collect()
    };
    // Which way the gradient rises along x and y (None: constant along that axis).
    let (x_rising, y_rising) = match position {
        "Left Light" => (Some(true), None),
        "Right Light" => (Some(false), None),
        "Top Light" => (None, Some(true)),
        "Bottom Light" => (None, Some(false)),
        "Bottom Right Light" => (Some(false), Some(false)),
        "Bottom Left Light" => (Some(true), Some(false)),
        "Top Right Light" => (Some(false), Some(true)),
        "Top Left Light" => (Some(true), Some(true)),
        _ => {
            return Err(NodeError::value(format!(
                "Unsupported position. Choose from {}.",
                LIGHT_POSITIONS.join(", ")
            )))
        }
    };
    let xs = x_rising.map(|rising| ramp(rising, width));
    let ys = y_rising.map(|rising| ramp(rising, height));
    let mut levels = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let gradient = match (&xs, &ys) {
                (Some(xs), Some(ys)) => (xs[x] * xs[x] + ys[y] * ys[y]).sqrt() / 2f64.sqrt(),
                (Some(xs), None) => xs[x],
                (None, Some(ys)) => ys[y],
                (None, None) => 0.0,
            };
            for c in 0..3 {
                let value = (start[c] + (end[c] - start[c]) * gradient) as f32;
                levels.push(value.clamp(0.0, 255.0) as u8);
            }
        }
    }
    Ok(levels)
}
