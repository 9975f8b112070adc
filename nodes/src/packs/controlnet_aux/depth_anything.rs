//! The pack's DepthAnythingV2Preprocessor ("Depth Anything V2 - Relative"): Depth Anything V2
//! ([`easel_models::architectures::depth_anything_v2`]) estimates relative depth, which is
//! stretched to 0…255 (near is white) and resized to the node's resolution.
//!
//! The pack downloads its checkpoints from Hugging Face; Easel downloads nothing. It looks for
//! the chosen checkpoint in `models/depthanything/` (and any `depthanything` folder of
//! `extra_model_paths.yaml`), then where the pack keeps its downloads
//! (`custom_nodes/comfyui_controlnet_aux/ckpts/depth-anything/Depth-Anything-V2-*/`), as the
//! pack's `.pth` or as `.safetensors` in the original tensor names (Kijai's `_fp32`/`_fp16`
//! conversions included), and says where to put it when it is missing.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::depth_anything_v2::{DepthAnythingV2, DepthAnythingV2Config};
use easel_models::kernels::interpolate::bilinear_align_corners;
use easel_models::weights::Weights;

use super::opencv::{resize_cubic_f64, Pixels};
use super::{
    annotate_batch, optional_int, optional_string, resize_to_resolution, resolution_input, CONTROLNET_AUX_MODULE,
    DEFAULT_RESOLUTION,
};
use crate::image::Image;
use crate::loaders::models::{cached, file_size, open_weight_file, undetected};
use crate::paths::Paths;
use crate::runtime::{device, tensor_error};

/// The checkpoints the node offers, the pack's default among them, and the Hugging Face
/// repository folder the pack downloads each into.
pub const DEPTH_ANYTHING_V2_CHECKPOINTS: [(&str, &str); 4] = [
    ("depth_anything_v2_vitg.pth", "Depth-Anything-V2-Giant"),
    ("depth_anything_v2_vitl.pth", "Depth-Anything-V2-Large"),
    ("depth_anything_v2_vitb.pth", "Depth-Anything-V2-Base"),
    ("depth_anything_v2_vits.pth", "Depth-Anything-V2-Small"),
];
pub(super) const DEFAULT_CHECKPOINT: &str = "depth_anything_v2_vitl.pth";
/// The model folder Easel reads Depth Anything from (Kijai's ComfyUI-DepthAnythingV2 uses it).
pub const DEPTH_ANYTHING_V2_FOLDER: &str = "depthanything";
/// Where the pack keeps its downloads, under the base directory.
const PACK_CHECKPOINTS: &str = "custom_nodes/comfyui_controlnet_aux/ckpts/depth-anything";
/// The side the image's shorter side is resized to for the network (a multiple of 14 at least
/// this large), and ImageNet's normalisation.
const INPUT_SIZE: f64 = 518.0;
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

pub struct DepthAnythingV2Preprocessor;

impl Node for DepthAnythingV2Preprocessor {
    fn schema(&self, _: &Services) -> NodeSchema {
        let checkpoints: Vec<&str> = DEPTH_ANYTHING_V2_CHECKPOINTS.iter().map(|(name, _)| *name).collect();
        NodeSchema::v1(
            "DepthAnythingV2Preprocessor",
            CONTROLNET_AUX_MODULE,
            "ControlNet Preprocessors/Normal and Depth Estimators",
        )
        .display("Depth Anything V2 - Relative")
        .required("image", InputSpec::of("IMAGE"))
        .optional(
            "ckpt_name",
            InputSpec::combo(&checkpoints).opt("default", DEFAULT_CHECKPOINT),
        )
        .optional("resolution", resolution_input())
        .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let checkpoint = optional_string(inputs, "ckpt_name", DEFAULT_CHECKPOINT)?;
        let resolution = optional_int(inputs, "resolution", DEFAULT_RESOLUTION)?;
        let out = depth_maps(ctx, image, checkpoint, resolution)?;
        Ok(NodeOutput::values(vec![Value::object(out)]))
    }
}

/// The node's work: each image's depth map from the checkpoint, at the resolution.
pub(super) fn depth_maps(
    ctx: &NodeContext,
    image: &Image,
    checkpoint: &str,
    resolution: i64,
) -> Result<Image, NodeError> {
    let paths = ctx.services.require::<Paths>()?;
    let path = find_depth_anything_v2(paths, checkpoint)?;
    let device = device(ctx.services);
    let model = cached(ctx, &path, "depth_anything_v2", || {
        Ok((load_depth_anything_v2(&path, &device)?, file_size(&path)))
    })?;
    annotate_batch(image, resolution, |pixels, resolution| {
        Ok(resize_to_resolution(&depth_map(&model, pixels, &device)?, resolution))
    })
}

/// The checkpoint to use where none is chosen (the REST API's depth maps): the first installed,
/// largest first — the pack's default ViT-L, then ViT-B and ViT-S; ViT-G last, as it was never
/// released.
pub fn installed_depth_anything_v2(paths: &Paths) -> Option<&'static str> {
    // Indices into the pack's list (ViT-G, ViT-L, ViT-B, ViT-S).
    const PREFERENCE: [usize; 4] = [1, 2, 3, 0];
    PREFERENCE
        .iter()
        .map(|&index| DEPTH_ANYTHING_V2_CHECKPOINTS[index].0)
        .find(|name| find_depth_anything_v2(paths, name).is_ok())
}

/// The file of `checkpoint` (one of [`DEPTH_ANYTHING_V2_CHECKPOINTS`]): the first of its names
/// (`.safetensors`, `_fp32`/`_fp16.safetensors`, the pack's `.pth`) found in the depthanything
/// folders, then in the pack's download folder; else an error saying where to put it.
pub fn find_depth_anything_v2(paths: &Paths, checkpoint: &str) -> Result<PathBuf, NodeError> {
    let (name, repository) = DEPTH_ANYTHING_V2_CHECKPOINTS
        .iter()
        .find(|(name, _)| *name == checkpoint)
        .ok_or_else(|| NodeError::value(format!("unknown Depth Anything V2 checkpoint '{checkpoint}'")))?;
    let stem = name.trim_end_matches(".pth");
    let candidates = [
        format!("{stem}.safetensors"),
        format!("{stem}_fp32.safetensors"),
        format!("{stem}_fp16.safetensors"),
        name.to_string(),
    ];
    let mut folders: Vec<PathBuf> = paths
        .folder_dirs(DEPTH_ANYTHING_V2_FOLDER)
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let default_folder = paths.models.join(DEPTH_ANYTHING_V2_FOLDER);
    if folders.is_empty() {
        folders.push(default_folder.clone());
    }
    folders.push(paths.base.join(PACK_CHECKPOINTS).join(repository));
    folders
        .iter()
        .flat_map(|folder| candidates.iter().map(move |candidate| folder.join(candidate)))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            NodeError::typed(
                "FileNotFoundError",
                format!(
                    "Depth Anything V2 checkpoint '{checkpoint}' not found: Easel downloads no models. Put \
                     {stem}.safetensors (or the pack's {name}, from huggingface.co/depth-anything/{repository}) \
                     in {}",
                    default_folder.display()
                ),
            )
        })
}

/// Depth Anything V2 from a `.pth` or `.safetensors` file in its original tensor names.
pub fn load_depth_anything_v2(path: &Path, device: &Device) -> Result<DepthAnythingV2, NodeError> {
    let file = open_weight_file(path)?;
    let config = DepthAnythingV2Config::infer(file.as_ref()).map_err(|error| undetected(path, error))?;
    DepthAnythingV2::new(config, Weights::from_file(file, DType::F32, device)).map_err(tensor_error)
}

/// `DepthAnythingV2Detector.__call__` before its final resize: the relative depth of the
/// pixels stretched to 0…255 and truncated, in three equal channels.
fn depth_map(model: &DepthAnythingV2, pixels: &Pixels<u8>, device: &Device) -> Result<Pixels<u8>, NodeError> {
    let depth = relative_depth(model, pixels, device).map_err(tensor_error)?;
    let (min, max) = depth.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(min, max), &d| {
        (min.min(d), max.max(d))
    });
    let data = depth
        .iter()
        .flat_map(|&d| {
            let level = (d - min) / (max - min) * 255.0;
            // A flat depth divides zero by zero: NaN, which NumPy casts to 0.
            [if level.is_nan() { 0 } else { level as u8 }; 3]
        })
        .collect();
    Ok(Pixels {
        height: pixels.height,
        width: pixels.width,
        channels: 3,
        data,
    })
}

/// `DepthAnythingV2.infer_image`: the pixels resized bicubically so that both sides are
/// multiples of 14 and at least 518 (aspect kept), normalised, run through the network, and
/// the depth resized back to the image (bilinear, `align_corners`). Row-major, one value a pixel.
pub fn relative_depth(model: &DepthAnythingV2, pixels: &Pixels<u8>, device: &Device) -> candle_core::Result<Vec<f32>> {
    let patch = model.patch_size();
    let (height, width) = network_size(pixels.height, pixels.width, patch);
    let image = Pixels {
        height: pixels.height,
        width: pixels.width,
        channels: 3,
        data: pixels.data.iter().map(|&value| f64::from(value) / 255.0).collect(),
    };
    let resized = resize_cubic_f64(&image, height, width);
    let mut planes = vec![0f32; 3 * height * width];
    for (index, pixel) in resized.data.chunks_exact(3).enumerate() {
        for channel in 0..3 {
            planes[channel * height * width + index] = ((pixel[channel] - MEAN[channel]) / STD[channel]) as f32;
        }
    }
    let input = Tensor::from_vec(planes, (1, 3, height, width), device)?;
    let depth = model.forward(&input)?.unsqueeze(1)?;
    bilinear_align_corners(&depth, pixels.height, pixels.width)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1()
}

/// `Resize(518, 518, keep_aspect_ratio=True, ensure_multiple_of=14, resize_method="lower_bound")`:
/// the scale that brings the shorter side to 518, each side then rounded to a multiple of the
/// patch size (half to even), rounded up where that falls below 518.
fn network_size(height: usize, width: usize, patch: usize) -> (usize, usize) {
    let scale = (INPUT_SIZE / height as f64).max(INPUT_SIZE / width as f64);
    let multiple = patch as f64;
    let constrain = |side: f64| {
        let rounded = (side / multiple).round_ties_even() * multiple;
        let side = if rounded < INPUT_SIZE {
            (side / multiple).ceil() * multiple
        } else {
            rounded
        };
        side as usize
    };
    (constrain(scale * height as f64), constrain(scale * width as f64))
}
