//! FLUX Kontext's nodes: ReferenceLatent (`comfy_extras/nodes_edit_model.py`) sets the latents
//! an edit model attends to, FluxKontextMultiReferenceLatentMethod how several are placed, and
//! FluxKontextImageScale resizes an image to the nearest resolution Kontext was trained at. The
//! model side is [`easel_models::architectures::flux`]'s reference tokens.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};
use easel_models::architectures::flux::ReferenceMethod;

use crate::conditioning::Conditioning;
use crate::image::resample::{common_upscale, ResizeMethod};
use crate::image::Image;
use crate::latent::Latent;
use crate::runtime::experimental;

const FLUX_MODULE: &str = "comfy_extras.nodes_flux";
const FLUX_CATEGORY: &str = "advanced/conditioning/flux";

/// The (width, height) FLUX Kontext was trained at (ComfyUI's `PREFERED_KONTEXT_RESOLUTIONS`).
const KONTEXT_RESOLUTIONS: [(usize, usize); 17] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
];

/// Adds the Kontext nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(ReferenceLatent);
    registry.register(FluxKontextImageScale);
    registry.register(FluxKontextMultiReferenceLatentMethod);
}

/// `ReferenceLatent`: the latent appended to every entry's reference latents.
pub struct ReferenceLatent;

impl Node for ReferenceLatent {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "ReferenceLatent",
            "comfy_extras.nodes_edit_model",
            "advanced/conditioning/edit_models",
        )
        .description("This node sets the guiding latent for an edit model. If the model supports it you can chain multiple to set multiple reference images.")
        .required("conditioning", InputSpec::of("CONDITIONING"))
        .optional("latent", InputSpec::of("LATENT"))
        .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let conditioning = match inputs.optional_object::<Latent>("latent")? {
            Some(latent) => conditioning.map_entries(|entry| entry.reference_latents.push(latent.samples.clone())),
            None => conditioning.clone(),
        };
        Ok(NodeOutput::values(vec![Value::object(conditioning)]))
    }
}

/// `FluxKontextMultiReferenceLatentMethod`: how every entry's reference latents are placed.
pub struct FluxKontextMultiReferenceLatentMethod;

impl Node for FluxKontextMultiReferenceLatentMethod {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("FluxKontextMultiReferenceLatentMethod", FLUX_MODULE, FLUX_CATEGORY)
                .required("conditioning", InputSpec::of("CONDITIONING"))
                .required(
                    "reference_latents_method",
                    InputSpec::combo_v3(&["offset", "index", "uxo/uno"]),
                )
                .output(OutputSpec::of("CONDITIONING")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let method = match inputs.string("reference_latents_method")? {
            "index" => ReferenceMethod::Index,
            name if name.contains("uxo") || name.contains("uso") => ReferenceMethod::Uxo,
            _ => ReferenceMethod::Offset,
        };
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let conditioning = conditioning.map_entries(|entry| entry.reference_method = Some(method));
        Ok(NodeOutput::values(vec![Value::object(conditioning)]))
    }
}

/// The Kontext resolution whose aspect ratio is nearest `width / height` (the first of equals).
pub fn kontext_resolution(width: usize, height: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let distance = |&(w, h): &(usize, usize)| (aspect - w as f64 / h as f64).abs();
    KONTEXT_RESOLUTIONS
        .iter()
        .copied()
        .min_by(|a, b| distance(a).total_cmp(&distance(b)).then(a.cmp(b)))
        .unwrap_or((1024, 1024))
}

/// `FluxKontextImageScale`: the image at the nearest Kontext resolution (Lanczos, centre crop).
pub struct FluxKontextImageScale;

impl Node for FluxKontextImageScale {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("FluxKontextImageScale", FLUX_MODULE, FLUX_CATEGORY)
            .description("This node resizes the image to one that is more optimal for flux kontext.")
            .required("image", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let (width, height) = kontext_resolution(image.width, image.height);
        let scaled = common_upscale(image, width, height, ResizeMethod::Lanczos, true, true)?;
        Ok(NodeOutput::values(vec![Value::object(scaled)]))
    }
}
