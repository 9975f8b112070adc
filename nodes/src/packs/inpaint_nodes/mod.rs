//! Acly's comfyui-inpaint-nodes (`custom_nodes.comfyui-inpaint-nodes`, 1.4.2): the nodes that
//! prepare a masked area for inpainting and shape masks.
//!
//! - INPAINT_VAEEncodeInpaintConditioning: InpaintModelConditioning with a noise mask, and the
//!   greyed-out image's latent with the rounded mask as a second latent.
//! - INPAINT_MaskedFill: the area under the mask (its values of at least 0.99) filled with
//!   neutral grey, its edge softened by `falloff`; OpenCV's Telea and Navier-Stokes fills are
//!   refused by name.
//! - INPAINT_MaskedBlur: the area under the mask replaced by a Gaussian blur of the image.
//! - INPAINT_DenoiseToCompositingMask: a denoise mask remapped from `offset…threshold` to 0…1.
//! - INPAINT_ExpandMask / INPAINT_ShrinkMask: a mask grown (binary dilation) or shrunk (binary
//!   erosion) by a square window, then blurred with a box, linear or Gaussian window.
//!
//! The filters are the pack's `util.py` on kornia's ([`filters`]).

mod filters;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};

use crate::image::{transposed, Image, Mask};
use crate::latent::vae::inpaint_conditioning;
use crate::latent::Latent;
use crate::runtime::{broadcast, size_mismatch};
use filters::{binary_dilation, binary_erosion, gaussian_blur, make_odd, mask_blur, mask_floor, BlurKernel, Planes};

/// The pack's module name, as ComfyUI names a custom node pack's module (its folder as cloned).
const MODULE: &str = "custom_nodes.comfyui-inpaint-nodes";
const CATEGORY: &str = "inpaint";

/// Adds the pack's nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(VaeEncodeInpaintConditioning);
    registry.register(MaskedFill);
    registry.register(MaskedBlur);
    registry.register(DenoiseToCompositingMask);
    registry.register(MorphMask::EXPAND);
    registry.register(MorphMask::SHRINK);
}

fn schema(name: &str, display: &str) -> NodeSchema {
    NodeSchema::v3(name, MODULE, CATEGORY).display(display).description("")
}

fn count(default: i64, min: i64, max: i64) -> InputSpec {
    InputSpec::int(default, min, max).opt("step", 1)
}

/// A mask as planes [B, 1, H, W].
fn mask_planes(mask: &Mask) -> Planes {
    Planes {
        dims: [mask.batch, 1, mask.height, mask.width],
        data: mask.data.clone(),
    }
}

/// An image's channels as planes [B, C, H, W].
fn image_planes(image: &Image) -> Planes {
    let (batch, height, width, channels) = (image.batch, image.height, image.width, image.channels);
    Planes {
        dims: [batch, channels, height, width],
        data: transposed(&image.data, batch, height * width, channels),
    }
}

fn mask_output(planes: Planes) -> NodeOutput {
    let [batch, _, height, width] = planes.dims;
    NodeOutput::values(vec![Value::object(Mask {
        batch,
        height,
        width,
        data: planes.data,
    })])
}

fn size(value: i64) -> usize {
    usize::try_from(value).unwrap_or(0)
}

/// The mask's floor (1 at values of at least 0.99), its inside edge softened over `falloff`
/// pixels (`alpha · gaussian_blur(binary_erosion(alpha, falloff), falloff)`) where positive.
fn softened_floor(mask: &Mask, falloff: i64) -> Result<Planes, NodeError> {
    let alpha = Planes {
        data: mask_floor(&mask.data),
        ..mask_planes(mask)
    };
    if falloff <= 0 {
        return Ok(alpha);
    }
    let eroded = binary_erosion(&alpha, size(falloff));
    let blurred = gaussian_blur(&eroded, size(falloff))?;
    let data = alpha.data.iter().zip(&blurred.data).map(|(a, b)| a * b).collect();
    Ok(Planes { data, ..alpha })
}

/// `INPAINT_VAEEncodeInpaintConditioning` ("VAE Encode & Inpaint Conditioning"):
/// InpaintModelConditioning's conditionings and latent (with the mask as its noise mask), and
/// the greyed-out image's latent with the mask rounded (half to even, as `torch.round`) as its
/// noise mask ("latent inpaint", what inpaint models such as the Fooocus patch start from).
pub struct VaeEncodeInpaintConditioning;

impl Node for VaeEncodeInpaintConditioning {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema(
            "INPAINT_VAEEncodeInpaintConditioning",
            "VAE Encode & Inpaint Conditioning",
        )
        .required("positive", InputSpec::of("CONDITIONING"))
        .required("negative", InputSpec::of("CONDITIONING"))
        .required("vae", InputSpec::of("VAE"))
        .required("pixels", InputSpec::of("IMAGE"))
        .required("mask", InputSpec::of("MASK"))
        .output(OutputSpec::of("CONDITIONING").named("positive"))
        .output(OutputSpec::of("CONDITIONING").named("negative"))
        .output(OutputSpec::of("LATENT").named("latent inpaint"))
        .output(OutputSpec::of("LATENT").named("latent samples"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let conditioned = inpaint_conditioning(ctx, inputs)?;
        let rounded = Mask {
            data: conditioned.mask.data.iter().map(|v| v.round_ties_even()).collect(),
            ..conditioned.mask.clone()
        };
        let latent_inpaint = Latent {
            noise_mask: Some(rounded),
            ..Latent::new(conditioned.concat_latent)
        };
        let latent_samples = Latent {
            noise_mask: Some(conditioned.mask),
            ..Latent::new(conditioned.latent)
        };
        Ok(NodeOutput::values(vec![
            conditioned.positive,
            conditioned.negative,
            Value::object(latent_inpaint),
            Value::object(latent_samples),
        ]))
    }
}

/// `INPAINT_MaskedFill` ("Fill Masked Area").
pub struct MaskedFill;

impl Node for MaskedFill {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("INPAINT_MaskedFill", "Fill Masked Area")
            .required("image", InputSpec::of("IMAGE"))
            .required("mask", InputSpec::of("MASK"))
            .required("fill", InputSpec::combo_v3(&["neutral", "telea", "navier-stokes"]))
            .required("falloff", count(0, 0, 8191))
            .output(OutputSpec::of("IMAGE").named("image"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let mask = inputs.object::<Mask>("mask")?;
        let fill = inputs.string("fill")?;
        if mask.batch != image.batch {
            return Err(NodeError::typed(
                "AssertionError",
                "Image and mask batch size does not match",
            ));
        }
        let alpha = softened_floor(mask, make_odd(inputs.int("falloff")?))?;
        if fill != "neutral" {
            return Err(NodeError::value(format!(
                "INPAINT_MaskedFill's `{fill}` fill (OpenCV's inpainting) does not run in Easel yet: use `neutral`"
            )));
        }
        if (mask.height, mask.width) != (image.height, image.width) {
            return Err(if mask.width != image.width {
                size_mismatch(image.width, mask.width, 2)
            } else {
                size_mismatch(image.height, mask.height, 1)
            });
        }
        if image.channels < 3 {
            return Err(NodeError::typed(
                "IndexError",
                format!(
                    "index {0} is out of bounds for dimension 3 with size {0}",
                    image.channels
                ),
            ));
        }
        let mut filled = image.clone();
        for (pixel, a) in filled.data.chunks_mut(image.channels).zip(&alpha.data) {
            let keep = 1.0 - a;
            for value in &mut pixel[..3] {
                *value = (*value - 0.5) * keep + 0.5;
            }
        }
        Ok(NodeOutput::values(vec![Value::object(filled)]))
    }
}

/// `INPAINT_MaskedBlur` ("Blur Masked Area").
pub struct MaskedBlur;

impl Node for MaskedBlur {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("INPAINT_MaskedBlur", "Blur Masked Area")
            .required("image", InputSpec::of("IMAGE"))
            .required("mask", InputSpec::of("MASK"))
            .required("blur", count(255, 3, 8191))
            .required("falloff", count(0, 0, 8191))
            .output(OutputSpec::of("IMAGE").named("image"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let mask = inputs.object::<Mask>("mask")?;
        let blur = make_odd(inputs.int("blur")?);
        let falloff = make_odd(inputs.int("falloff")?).min(blur - 2);
        if (mask.height, mask.width) != (image.height, image.width) {
            return Err(NodeError::value(format!(
                "Image and mask must be the same size. torch.Size([{}, {}]) != torch.Size([{}, {}])",
                image.height, image.width, mask.height, mask.width
            )));
        }
        let alpha = softened_floor(mask, falloff)?;
        if image.channels != 3 {
            return Err(size_mismatch(image.channels, 3, 1));
        }
        let batch = broadcast(image.batch, mask.batch, 0)?;
        let original = image_planes(image);
        let blurred = gaussian_blur(&original, size(blur))?;
        let (plane, channels) = (image.height * image.width, image.channels);
        let mut data = vec![0f32; batch * plane * channels];
        for (index, value) in data.iter_mut().enumerate() {
            let (item, position, channel) = (index / (plane * channels), index / channels % plane, index % channels);
            let source = ((item % image.batch) * channels + channel) * plane + position;
            let a = alpha.data[(item % mask.batch) * plane + position];
            let o = original.data[source];
            *value = o + (blurred.data[source] - o) * a;
        }
        let result = Image::new(batch, image.height, image.width, channels, data)?;
        Ok(NodeOutput::values(vec![Value::object(result)]))
    }
}

/// `INPAINT_DenoiseToCompositingMask` ("Denoise to Compositing Mask").
pub struct DenoiseToCompositingMask;

impl Node for DenoiseToCompositingMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        let fraction = |default: f64, min: f64| InputSpec::float(default, min, 1.0).opt("step", 0.01);
        schema("INPAINT_DenoiseToCompositingMask", "Denoise to Compositing Mask")
            .required("mask", InputSpec::of("MASK"))
            .required("offset", fraction(0.1, 0.0))
            .required("threshold", fraction(0.2, 0.01))
            .output(OutputSpec::of("MASK").named("mask"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mask = inputs.object::<Mask>("mask")?;
        let (offset, threshold) = (inputs.float("offset")?, inputs.float("threshold")?);
        if !(0.0 <= offset && offset < threshold && threshold <= 1.0) {
            return Err(NodeError::typed(
                "AssertionError",
                "Threshold must be higher than offset",
            ));
        }
        // PyTorch subtracts the float32 offset, then multiplies by the float32 of 1/(t − o).
        let scale = (1.0 / (threshold - offset)) as f32;
        let data = mask
            .data
            .iter()
            .map(|v| ((v - offset as f32) * scale).clamp(0.0, 1.0))
            .collect();
        Ok(NodeOutput::values(vec![Value::object(Mask { data, ..mask.clone() })]))
    }
}

/// `INPAINT_ExpandMask` ("Expand Mask") and `INPAINT_ShrinkMask` ("Shrink Mask"): the mask
/// through a binary dilation or erosion by its size input (where positive), then blurred as
/// `blur` (nothing for 0) and `blur_type` say.
pub struct MorphMask {
    name: &'static str,
    display: &'static str,
    /// The input giving the window's radius (`grow`, `shrink`).
    size_input: &'static str,
    morph: fn(&Planes, usize) -> Planes,
}

impl MorphMask {
    pub const EXPAND: MorphMask = MorphMask {
        name: "INPAINT_ExpandMask",
        display: "Expand Mask",
        size_input: "grow",
        morph: binary_dilation,
    };
    pub const SHRINK: MorphMask = MorphMask {
        name: "INPAINT_ShrinkMask",
        display: "Shrink Mask",
        size_input: "shrink",
        morph: binary_erosion,
    };
}

impl Node for MorphMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema(self.name, self.display)
            .required("mask", InputSpec::of("MASK"))
            .required(self.size_input, count(16, 0, 8096))
            .required("blur", count(7, 0, 8096))
            .required(
                "blur_type",
                InputSpec::of("COMBO")
                    .opt("default", "gaussian")
                    .opt("multiselect", false)
                    .opt("options", BlurKernel::NAMES.to_vec()),
            )
            .output(OutputSpec::of("MASK").named("mask"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut planes = mask_planes(inputs.object::<Mask>("mask")?);
        let radius = inputs.int(self.size_input)?;
        if radius > 0 {
            planes = (self.morph)(&planes, size(radius));
        }
        let blur = inputs.int("blur")?;
        if blur > 0 {
            let kind = BlurKernel::named(inputs.string("blur_type")?)?;
            planes = mask_blur(planes, size(make_odd(blur)), kind)?;
        }
        Ok(mask_output(planes))
    }
}
