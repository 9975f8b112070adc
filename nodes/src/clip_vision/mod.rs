//! CLIP vision (`nodes.py`): the CLIP_VISION value (a loaded CLIP or SigLIP vision encoder) and
//! CLIP_VISION_OUTPUT (what it gives for images), CLIPVisionLoader and CLIPVisionEncode; and
//! what reads those outputs: style models ([`style_model`]: FLUX Redux and the SD1.5 style
//! adapter) and unCLIP ([`unclip`]).

mod nodes;
pub mod style_model;
pub mod unclip;

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use easel_engine::{NodeError, NodeObject, NodeRegistry};
use easel_models::architectures::clip_vision::{preprocess, ClipVision, ClipVisionConfig, VisionOutput};
use easel_models::kernels::sgemm::Precision;
use easel_models::weights::{MappedWeights, WeightSource};

use crate::image::Image;
use crate::loaders::models::{file_size, open_weight_file};
use crate::runtime::tensor_error;

/// Adds the CLIP vision, style model and unCLIP nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::ClipVisionLoader);
    registry.register(nodes::ClipVisionEncode);
    style_model::register(registry);
    unclip::register(registry);
}

/// ComfyUI's error for a file holding no vision encoder it knows.
const INVALID_FILE: &str = "ERROR: clip vision file is invalid and does not contain a valid vision model.";

/// The CLIP_VISION socket.
#[derive(Clone)]
pub struct ClipVisionModel(pub Arc<ClipVision>);

impl ClipVisionModel {
    /// `encode_image`: the images preprocessed to the encoder's size (`crop`: the centre square,
    /// else stretched) and encoded.
    pub fn encode(&self, image: &Image, crop: bool) -> Result<ClipVisionOutput, NodeError> {
        self.encode_masked(image, crop, None)
    }

    /// [`Self::encode`] with the preprocessed pixels multiplied by `pixel_mask` [M, size, size]
    /// (broadcast as PyTorch does: its items against the channels), as IPAdapterEncoder masks.
    pub fn encode_masked(
        &self,
        image: &Image,
        crop: bool,
        pixel_mask: Option<&Tensor>,
    ) -> Result<ClipVisionOutput, NodeError> {
        let config = self.0.config();
        let device = self.0.device();
        let images = Tensor::from_slice(
            &image.data,
            (image.batch, image.height, image.width, image.channels),
            device,
        )
        .map_err(tensor_error)?;
        let (mean, std) = config.normalisation();
        let pixels = preprocess(&images, config.image_size, mean, std, crop).map_err(tensor_error)?;
        let pixels = match pixel_mask {
            Some(mask) => mask
                .unsqueeze(0)
                .and_then(|mask| pixels.broadcast_mul(&mask))
                .map_err(tensor_error)?,
            None => pixels,
        };
        Ok(ClipVisionOutput(self.0.forward(&pixels).map_err(tensor_error)?))
    }
}

impl std::fmt::Debug for ClipVisionModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ClipVisionModel")
    }
}

impl NodeObject for ClipVisionModel {
    fn type_name(&self) -> &'static str {
        "CLIP_VISION"
    }
}

/// The CLIP_VISION_OUTPUT socket.
#[derive(Clone, Debug)]
pub struct ClipVisionOutput(pub VisionOutput);

impl NodeObject for ClipVisionOutput {
    fn type_name(&self) -> &'static str {
        "CLIP_VISION_OUTPUT"
    }
}

/// The vision encoder whose tensors lie in `file` under `prefix` (OpenCLIP's layout or
/// transformers'), or `None` when there is none.
pub fn vision_encoder(
    file: Arc<dyn MappedWeights>,
    prefix: &str,
    device: &Device,
) -> Result<Option<ClipVision>, NodeError> {
    let Ok(config) = ClipVisionConfig::infer(file.as_ref(), prefix) else {
        return Ok(None);
    };
    let source = WeightSource::new(file, prefix, device, Precision::F32);
    ClipVision::new(config, source.weights())
        .map(Some)
        .map_err(tensor_error)
}

/// `comfy.clip_vision.load`: a vision encoder file (OpenCLIP's layout under `visual.`, or
/// transformers'), and its size.
pub fn load_clip_vision(path: &Path, device: &Device) -> Result<(ClipVision, u64), NodeError> {
    let file = open_weight_file(path)?;
    let prefix = match file.has("visual.transformer.resblocks.0.attn.in_proj_weight") {
        true => "visual.",
        false => "",
    };
    match vision_encoder(file, prefix, device)? {
        Some(encoder) => Ok((encoder, file_size(path))),
        None => Err(NodeError::typed("RuntimeError", INVALID_FILE)),
    }
}
