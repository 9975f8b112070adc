//! Upscale models (`comfy_extras/nodes_upscale_model.py`): UpscaleModelLoader reads a model file
//! of `models/upscale_models` (safetensors, or a PyTorch pickle read without running it) and
//! tells its architecture from its tensors as spandrel does; ImageUpscaleWithModel runs it over
//! the image in tiles of 512 pixels overlapping by 32, blended with feathered edges (ComfyUI's
//! `tiled_scale`), and clamps the result to 0..1.
//!
//! Architectures: ESRGAN's RRDBNet (original, Real-ESRGAN and BSRGAN layouts; Real-ESRGAN's
//! pixel-unshuffled 1× and 2× models) and Real-ESRGAN's compact SRVGGNetCompact.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeObject, NodeOutput, NodeRegistry, Services, Value};
use easel_models::architectures::compact::{is_compact, Compact, CompactConfig};
use easel_models::architectures::esrgan::{is_esrgan, new_layout_counts, old_layout_name, Esrgan, EsrganConfig};
use easel_models::kernels::sgemm::Precision;
use easel_models::tiling::{tiled_scale, Tiling};
use easel_models::weights::{MappedWeights, RenamedWeights, WeightSource};
use serde_json::{Map, Value as Json};

use crate::image::Image;
use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{cached, file_names, file_size, model_file, open_weight_file, undetected};
use crate::runtime::{device, ensure_fits, tensor_error};

const FOLDER: &str = "upscale_models";
/// ComfyUI's tile side and overlap, in input pixels.
const TILE: usize = 512;
const OVERLAP: usize = 32;

/// Adds the upscale-model nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(UpscaleModelLoader);
    registry.register(ImageUpscaleWithModel);
}

/// The UPSCALE_MODEL socket: a loaded upscale network (clones share it).
#[derive(Clone)]
pub struct UpscaleModel(pub Arc<UpscaleNetwork>);

impl std::fmt::Debug for UpscaleModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("UpscaleModel")
    }
}

impl NodeObject for UpscaleModel {
    fn type_name(&self) -> &'static str {
        "UPSCALE_MODEL"
    }
}

/// The architectures an upscale model can have.
pub enum UpscaleNetwork {
    Esrgan(Box<Esrgan>),
    Compact(Box<Compact>),
}

impl UpscaleNetwork {
    /// How many times larger the output is than the image.
    pub fn scale(&self) -> usize {
        match self {
            UpscaleNetwork::Esrgan(network) => network.config().scale(),
            UpscaleNetwork::Compact(network) => network.config().scale,
        }
    }

    /// Channels of the image the model takes and gives.
    fn channels(&self) -> (usize, usize) {
        match self {
            UpscaleNetwork::Esrgan(network) => (network.config().image_channels(), network.config().out_channels),
            UpscaleNetwork::Compact(network) => (network.config().in_channels, network.config().out_channels),
        }
    }

    /// The network's output for `x` [B, C, h, w], before spandrel's clamp.
    pub fn unclamped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            UpscaleNetwork::Esrgan(network) => network.forward(x),
            UpscaleNetwork::Compact(network) => network.forward(x),
        }
    }

    /// The model on `x`, clamped to 0..1 as spandrel's model call clamps it.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.unclamped(x)?.clamp(0f32, 1f32)
    }
}

/// Prefixes spandrel removes when every tensor name has one (`DataParallel`'s `module.`,
/// training scripts' `netG.`).
const COMMON_PREFIXES: [&str; 2] = ["module.", "netG."];

/// Loads the upscale model at `path`, its architecture told from its tensors; also returns the
/// file size.
pub fn load_upscale_model(path: &Path, device: &Device) -> Result<(UpscaleNetwork, u64), NodeError> {
    let file = without_common_prefixes(open_weight_file(path)?);
    if is_compact(file.as_ref()) {
        let config = CompactConfig::infer(file.as_ref()).map_err(|error| undetected(path, error))?;
        let source = WeightSource::new(file, "", device, Precision::F32);
        let network = Compact::new(config, source.weights()).map_err(tensor_error)?;
        return Ok((UpscaleNetwork::Compact(Box::new(network)), file_size(path)));
    }
    if !is_esrgan(file.as_ref()) {
        return Err(NodeError::new(format!(
            "{}: not an upscale model architecture Easel runs (ESRGAN / Real-ESRGAN RRDBNet, \
             Real-ESRGAN compact); ComfyUI's spandrel knows more",
            path.display()
        )));
    }
    let weights: Arc<dyn MappedWeights> = match new_layout_counts(file.as_ref()) {
        Some((blocks, upsamplings)) => Arc::new(RenamedWeights::new(file, move |name| {
            old_layout_name(name, blocks, upsamplings)
        })),
        None => file,
    };
    let config = EsrganConfig::infer(weights.as_ref()).map_err(|error| undetected(path, error))?;
    let source = WeightSource::new(weights, "", device, Precision::F32);
    let network = Esrgan::new(config, source.weights()).map_err(tensor_error)?;
    Ok((UpscaleNetwork::Esrgan(Box::new(network)), file_size(path)))
}

/// `file` with the [`COMMON_PREFIXES`] every tensor name has taken off, in spandrel's order.
fn without_common_prefixes(mut file: Arc<dyn MappedWeights>) -> Arc<dyn MappedWeights> {
    for prefix in COMMON_PREFIXES {
        let all_prefixed = {
            let mut names = file.tensor_names().peekable();
            names.peek().is_some() && names.all(|name| name.starts_with(prefix))
        };
        if all_prefixed {
            file = Arc::new(RenamedWeights::new(file, |name| {
                name.strip_prefix(prefix).unwrap_or(name).to_string()
            }));
        }
    }
    file
}

/// `UpscaleModelLoader` ("Load Upscale Model").
pub struct UpscaleModelLoader;

impl Node for UpscaleModelLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v3("UpscaleModelLoader", "comfy_extras.nodes_upscale_model", "loaders")
            .display("Load Upscale Model")
            .required("model_name", InputSpec::combo_v3(&file_names(services, FOLDER)))
            .model_folder("model_name", FOLDER)
            .output(OutputSpec::of("UPSCALE_MODEL"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("model_name", FOLDER)])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let path = model_file(ctx, FOLDER, inputs.string("model_name")?)?;
        let device = device(ctx.services);
        let model = cached(ctx, &path, "upscale_model", || load_upscale_model(&path, &device))?;
        Ok(NodeOutput::values(vec![Value::object(UpscaleModel(model))]))
    }
}

/// `ImageUpscaleWithModel` ("Upscale Image (using Model)").
pub struct ImageUpscaleWithModel;

impl Node for ImageUpscaleWithModel {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "ImageUpscaleWithModel",
            "comfy_extras.nodes_upscale_model",
            "image/upscaling",
        )
        .display("Upscale Image (using Model)")
        .required("upscale_model", InputSpec::of("UPSCALE_MODEL"))
        .required("image", InputSpec::of("IMAGE"))
        .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<UpscaleModel>("upscale_model")?;
        let image = inputs.object::<Image>("image")?;
        let upscaled = upscale(&model.0, image, &device(ctx.services))?;
        Ok(NodeOutput::values(vec![Value::object(upscaled)]))
    }
}

/// `image` upscaled by `network` in ComfyUI's tiles, clamped to 0..1.
pub fn upscale(network: &UpscaleNetwork, image: &Image, device: &Device) -> Result<Image, NodeError> {
    let (channels, out_channels) = network.channels();
    if image.channels != channels {
        return Err(NodeError::new(format!(
            "the upscale model takes images of {channels} channels, this one has {}",
            image.channels
        )));
    }
    let scale = network.scale();
    let (height, width) = (image.height * scale, image.width * scale);
    // The blended output and its weights, and the image as it comes back, at the output size.
    ensure_fits(&[3, image.batch, out_channels, height, width], || {
        format!("an upscaled image of {width}×{height}")
    })?;
    let pixels = Tensor::from_slice(
        &image.data,
        (image.batch, image.height, image.width, image.channels),
        device,
    )
    .and_then(|t| t.permute((0, 3, 1, 2))?.contiguous())
    .map_err(tensor_error)?;
    let tiling = Tiling {
        tile_height: TILE,
        tile_width: TILE,
        overlap: OVERLAP,
        scale: scale as f64,
    };
    let upscaled = tiled_scale(&pixels, &mut |tile| network.forward(tile), tiling, out_channels)
        .and_then(|t| {
            t.clamp(0f32, 1f32)?
                .permute((0, 2, 3, 1))?
                .flatten_all()?
                .to_vec1::<f32>()
        })
        .map_err(tensor_error)?;
    Image::new(image.batch, height, width, out_channels, upscaled)
}
