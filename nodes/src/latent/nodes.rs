//! ComfyUI's latent nodes: EmptyLatentImage and EmptySD3LatentImage (`latent/sd3`),
//! LatentUpscale and LatentUpscaleBy (bislerp included), LatentFromBatch and RepeatLatentBatch
//! (`latent/batch`) and SetLatentNoiseMask (`latent/inpaint`).

use candle_core::{DType, Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::image::resample::{common_upscale, ResizeMethod};
use crate::image::{Image, Mask};
use crate::latent::Latent;
use crate::runtime::{device, ensure_fits, tensor_error};

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
    ensure_fits(&[batch, channels, height / 8, width / 8], || {
        format!("an empty latent of {width}×{height} (batch {batch})")
    })?;
    let samples = Tensor::zeros(shape, DType::F32, &device(ctx.services)).map_err(tensor_error)?;
    Ok(NodeOutput::values(vec![Value::object(Latent::new(samples))]))
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
        ensure_fits(&[amount, latent.samples.elem_count()], || {
            format!("{amount} copies of a latent batch of {:?}", latent.samples.dims())
        })?;
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

/// `EmptySD3LatentImage`: zero latents of 16 channels (SD3, FLUX).
pub struct EmptySd3LatentImage;

impl Node for EmptySd3LatentImage {
    fn schema(&self, _: &Services) -> NodeSchema {
        let size = || InputSpec::int(1024, 16, MAX_RESOLUTION).opt("step", 16);
        NodeSchema::v3("EmptySD3LatentImage", "comfy_extras.nodes_sd3", "latent/sd3")
            .required("width", size())
            .required("height", size())
            .required("batch_size", InputSpec::int(1, 1, 4096))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        empty_latent(ctx, inputs, 16)
    }
}
