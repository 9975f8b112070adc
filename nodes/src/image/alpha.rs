//! Alpha compositing of ComfyUI's `comfy_extras/nodes_compositing.py` (`mask/compositing`):
//! PorterDuffImageComposite, SplitImageWithAlpha and JoinImageWithAlpha. Their MASK inputs and
//! outputs are inverted alpha (1 = transparent), as ComfyUI's masks are. Float32 arithmetic in
//! PyTorch's order, bit for bit.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use serde_json::json;

use crate::image::nodes::image_result;
use crate::image::resample::{common_upscale, interpolate_mask, ResizeMethod};
use crate::image::{Image, Mask};
use crate::runtime::ensure_fits;

const MODULE: &str = "comfy_extras.nodes_compositing";
const CATEGORY: &str = "mask/compositing";

/// The Porter-Duff operators, in ComfyUI's `PorterDuffMode` order.
const MODES: [&str; 18] = [
    "ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN", "MULTIPLY", "OVERLAY",
    "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR",
];

/// `torch.minimum` / `torch.maximum` of two values (NaN if either is; the second on ties).
fn pick(a: f32, b: f32, larger: bool) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if (larger && a > b) || (!larger && a < b) {
        a
    } else {
        b
    }
}

/// ComfyUI's `porter_duff_composite` for one pixel channel: premultiplied source and
/// destination colours `si`, `di` with alphas `sa`, `da`; returns the premultiplied colour and
/// the alpha, `None` for an unknown mode.
fn composite(mode: &str, si: f32, sa: f32, di: f32, da: f32) -> Option<(f32, f32)> {
    let union = || sa + da - sa * da;
    Some(match mode {
        "ADD" => ((si + di).clamp(0.0, 1.0), (sa + da).clamp(0.0, 1.0)),
        "CLEAR" => (0.0, 0.0),
        "DARKEN" => ((1.0 - da) * si + (1.0 - sa) * di + pick(si, di, false), union()),
        "DST" => (di, da),
        "DST_ATOP" => (sa * di + (1.0 - da) * si, sa),
        "DST_IN" => (di * sa, sa * da),
        "DST_OUT" => ((1.0 - sa) * di, (1.0 - sa) * da),
        "DST_OVER" => (di + (1.0 - da) * si, da + (1.0 - da) * sa),
        "LIGHTEN" => ((1.0 - da) * si + (1.0 - sa) * di + pick(si, di, true), union()),
        "MULTIPLY" => (si * di, sa * da),
        "OVERLAY" => {
            let colour = if 2.0 * di < da {
                2.0 * si * di
            } else {
                sa * da - 2.0 * (da - si) * (sa - di)
            };
            (colour, union())
        }
        "SCREEN" => (si + di - si * di, union()),
        "SRC" => (si, sa),
        "SRC_ATOP" => (da * si + (1.0 - sa) * di, da),
        "SRC_IN" => (si * da, sa * da),
        "SRC_OUT" => ((1.0 - da) * si, (1.0 - da) * sa),
        "SRC_OVER" => (si + (1.0 - sa) * di, sa + (1.0 - sa) * da),
        "XOR" => ((1.0 - da) * si + (1.0 - sa) * di, (1.0 - da) * sa + (1.0 - sa) * da),
        _ => return None,
    })
}

/// Item `b` of a mask as a one-item, one-channel image.
fn mask_item(mask: &Mask, b: usize) -> Image {
    Image {
        batch: 1,
        height: mask.height,
        width: mask.width,
        channels: 1,
        data: mask.frame(b).to_vec(),
    }
}

/// Item `b` of an image batch.
fn image_item(image: &Image, b: usize) -> Image {
    Image {
        batch: 1,
        data: image.frame(b).to_vec(),
        ..image.clone()
    }
}

/// ComfyUI's resize of one compositing input: `common_upscale(…, 'bicubic', 'center')`.
fn fit(image: &Image, width: usize, height: usize) -> Result<Image, NodeError> {
    common_upscale(image, width, height, ResizeMethod::Bicubic, true, true)
}

/// `PorterDuffImageComposite`: each item pair composited with one of the 18 Porter-Duff
/// operators on premultiplied colours, then un-premultiplied (colour 0 where the alpha is at
/// most 1e-5) and clamped. The destination alpha, the source and the source alpha are first
/// resized to the destination (bicubic, centre crop) where their sizes differ. The batch is
/// the smallest of the four inputs'.
pub struct PorterDuffImageComposite;

impl Node for PorterDuffImageComposite {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("PorterDuffImageComposite", MODULE, CATEGORY)
            .display("Porter-Duff Image Composite")
            .required("source", InputSpec::of("IMAGE"))
            .required("source_alpha", InputSpec::of("MASK"))
            .required("destination", InputSpec::of("IMAGE"))
            .required("destination_alpha", InputSpec::of("MASK"))
            .required(
                "mode",
                InputSpec::of("COMBO")
                    .opt("default", "DST")
                    .opt("multiselect", false)
                    .opt("options", json!(MODES)),
            )
            .output(OutputSpec::of("IMAGE"))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let source = inputs.object::<Image>("source")?;
        let source_alpha = inputs.object::<Mask>("source_alpha")?;
        let destination = inputs.object::<Image>("destination")?;
        let destination_alpha = inputs.object::<Mask>("destination_alpha")?;
        let mode = inputs.string("mode")?;
        if !MODES.contains(&mode) {
            return Err(NodeError::typed("KeyError", format!("'{mode}'")));
        }
        let batch = source
            .batch
            .min(source_alpha.batch)
            .min(destination.batch)
            .min(destination_alpha.batch);
        let (height, width, channels) = (destination.height, destination.width, destination.channels);
        if batch > 0 && source.channels != channels {
            return Err(NodeError::typed("AssertionError", ""));
        }
        let mut images = Vec::with_capacity(batch * height * width * channels);
        let mut alphas = Vec::with_capacity(batch * height * width);
        for b in 0..batch {
            let destination = image_item(destination, b);
            let mut dst_alpha = mask_item(destination_alpha, b);
            if (dst_alpha.height, dst_alpha.width) != (height, width) {
                dst_alpha = fit(&dst_alpha, width, height)?;
            }
            let mut src = image_item(source, b);
            if (src.height, src.width) != (height, width) {
                src = fit(&src, width, height)?;
            }
            let mut src_alpha = mask_item(source_alpha, b);
            if (src_alpha.height, src_alpha.width) != (dst_alpha.height, dst_alpha.width) {
                src_alpha = fit(&src_alpha, dst_alpha.width, dst_alpha.height)?;
            }
            for p in 0..height * width {
                let (sa, da) = (1.0 - src_alpha.data[p], 1.0 - dst_alpha.data[p]);
                let mut alpha = 0.0;
                for c in 0..channels {
                    let (si, di) = (src.data[p * channels + c] * sa, destination.data[p * channels + c] * da);
                    let (colour, a) = composite(mode, si, sa, di, da)
                        .ok_or_else(|| NodeError::typed("KeyError", format!("'{mode}'")))?;
                    let straight = if a > 1e-5 { colour / a } else { 0.0 };
                    images.push(straight.clamp(0.0, 1.0));
                    alpha = a;
                }
                alphas.push(1.0 - alpha);
            }
        }
        let image = Image::new(batch, height, width, channels, images)?;
        let mask = Mask {
            batch,
            height,
            width,
            data: alphas,
        };
        Ok(NodeOutput::values(vec![Value::object(image), Value::object(mask)]))
    }
}

/// `SplitImageWithAlpha`: the first three channels, and the inverted fourth as a mask (0 where
/// there is none).
pub struct SplitImageWithAlpha;

impl Node for SplitImageWithAlpha {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("SplitImageWithAlpha", MODULE, CATEGORY)
            .display("Split Image with Alpha")
            .required("image", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE"))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let colour = image.first_channels(image.channels.min(3));
        let data = if image.channels > 3 {
            image.data.chunks(image.channels).map(|p| 1.0 - p[3]).collect()
        } else {
            vec![0.0; image.batch * image.height * image.width]
        };
        let mask = Mask {
            batch: image.batch,
            height: image.height,
            width: image.width,
            data,
        };
        Ok(NodeOutput::values(vec![Value::object(colour), Value::object(mask)]))
    }
}

/// `JoinImageWithAlpha`: the first three channels with the inverted mask as alpha, the mask
/// resized (bilinear) to the image; the batch is the smaller of the two.
pub struct JoinImageWithAlpha;

impl Node for JoinImageWithAlpha {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("JoinImageWithAlpha", MODULE, CATEGORY)
            .display("Join Image with Alpha")
            .required("image", InputSpec::of("IMAGE"))
            .required("alpha", InputSpec::of("MASK"))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let mask = inputs.object::<Mask>("alpha")?;
        let batch = image.batch.min(mask.batch);
        ensure_fits(&[mask.batch, image.height, image.width], || {
            format!("{} masks resized to {}×{}", mask.batch, image.width, image.height)
        })?;
        let alpha = interpolate_mask(mask, image.height, image.width)?;
        let colour = image.first_channels(image.channels.min(3));
        let pixels = image.height * image.width;
        let mut data = Vec::with_capacity(batch * pixels * (colour.channels + 1));
        for b in 0..batch {
            for p in 0..pixels {
                let start = (b * pixels + p) * colour.channels;
                data.extend_from_slice(&colour.data[start..start + colour.channels]);
                data.push(1.0 - alpha.data[b * pixels + p]);
            }
        }
        Ok(image_result(Image::new(
            batch,
            image.height,
            image.width,
            colour.channels + 1,
            data,
        )?))
    }
}
