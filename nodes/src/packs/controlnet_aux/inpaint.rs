//! The pack's InpaintPreprocessor: the inpaint ControlNets' hint, the image with its masked
//! pixels marked.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use super::CONTROLNET_AUX_MODULE;
use crate::image::resample::interpolate_mask;
use crate::image::{Image, Mask};

/// `InpaintPreprocessor`: the mask resized (bilinear) to the image; every pixel where it is over
/// 0.5 becomes -1 in its first three channels (0 with `black_pixel_for_xinsir_cn`, for xinsir's
/// union ControlNet's "repaint" type).
pub struct InpaintPreprocessor;

impl Node for InpaintPreprocessor {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1(
            "InpaintPreprocessor",
            CONTROLNET_AUX_MODULE,
            "ControlNet Preprocessors/others",
        )
        .display("Inpaint Preprocessor")
        .required("image", InputSpec::of("IMAGE"))
        .required("mask", InputSpec::of("MASK"))
        .optional("black_pixel_for_xinsir_cn", InputSpec::boolean(false))
        .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let mask = inputs.object::<Mask>("mask")?;
        let black = match inputs.get("black_pixel_for_xinsir_cn") {
            Some(_) => inputs.bool("black_pixel_for_xinsir_cn")?,
            None => false,
        };
        Ok(NodeOutput::values(vec![Value::object(marked(image, mask, black)?)]))
    }
}

/// The image with the pixels under the mask set to -1 (or 0 when `black`).
fn marked(image: &Image, mask: &Mask, black: bool) -> Result<Image, NodeError> {
    // The pack indexes the image with the mask expanded to [B, H, W, 3]: the shapes must agree.
    let mask_shape = [mask.batch, image.height, image.width, 3];
    let image_shape = [image.batch, image.height, image.width, image.channels];
    if let Some(index) = (0..4).find(|&i| mask_shape[i] != image_shape[i]) {
        return Err(NodeError::typed(
            "IndexError",
            format!(
                "The shape of the mask {mask_shape:?} at index {index} does not match the shape of the indexed tensor \
                 {image_shape:?} at index {index}"
            ),
        ));
    }
    let resized = interpolate_mask(mask, image.height, image.width)?;
    let value = if black { 0.0 } else { -1.0 };
    let mut out = image.clone();
    for (pixel, m) in out.data.chunks_exact_mut(3).zip(&resized.data) {
        if *m > 0.5 {
            pixel.fill(value);
        }
    }
    Ok(out)
}
