//! FLUX's own nodes (ComfyUI's `comfy_extras/nodes_flux.py`, `advanced/conditioning/flux`):
//! CLIPTextEncodeFlux, FluxGuidance and FluxDisableGuidance, and Kontext's ([`kontext`]). FLUX models load through the common loaders
//! ([`crate::loaders`]) or ComfyUI-GGUF's ([`crate::packs::gguf`]); ModelSamplingFlux is with the
//! model nodes ([`crate::model::nodes`]), EmptySD3LatentImage with the latent ones.

pub mod kontext;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};

use crate::conditioning::nodes::{clip_input, prompt_spec};
use crate::conditioning::{Conditioning, EmbeddedGuidance};
use crate::model::clip::{ClipTokens, TextNetwork};
use crate::paths::Paths;
use crate::runtime::tensor_error;

/// Adds the FLUX nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    kontext::register(registry);
    registry.register(ClipTextEncodeFlux);
    registry.register(FluxGuidance);
    registry.register(FluxDisableGuidance);
}

/// `FluxGuidance`: the guidance strength a FLUX dev model embeds, on every entry.
pub struct FluxGuidance;

impl Node for FluxGuidance {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("FluxGuidance", "comfy_extras.nodes_flux", "advanced/conditioning/flux")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("guidance", InputSpec::float(3.5, 0.0, 100.0).opt("step", 0.1))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let guidance = inputs.float("guidance")? as f32;
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        Ok(NodeOutput::values(vec![Value::object(
            conditioning.with_guidance(EmbeddedGuidance::Strength(guidance)),
        )]))
    }
}

/// `FluxDisableGuidance`: no guidance embedding at all on every entry.
pub struct FluxDisableGuidance;

impl Node for FluxDisableGuidance {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "FluxDisableGuidance",
            "comfy_extras.nodes_flux",
            "advanced/conditioning/flux",
        )
        .description("This node completely disables the guidance embed on Flux and Flux like models")
        .required("conditioning", InputSpec::of("CONDITIONING"))
        .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        Ok(NodeOutput::values(vec![Value::object(
            conditioning.with_guidance(EmbeddedGuidance::Disabled),
        )]))
    }
}

/// `CLIPTextEncodeFlux`: `clip_l` for FLUX's CLIP-L (its pooled vector) and `t5xxl` for T5-XXL
/// (the hidden states), with the guidance strength a FLUX dev model embeds.
pub struct ClipTextEncodeFlux;

impl Node for ClipTextEncodeFlux {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "CLIPTextEncodeFlux",
            "comfy_extras.nodes_flux",
            "advanced/conditioning/flux",
        )
        .required("clip", InputSpec::of("CLIP"))
        .required("clip_l", prompt_spec())
        .required("t5xxl", prompt_spec())
        .required("guidance", InputSpec::float(3.5, 0.0, 100.0).opt("step", 0.1))
        .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = clip_input(inputs)?;
        if !clip
            .encoders
            .iter()
            .any(|encoder| matches!(encoder.network, TextNetwork::T5 { .. }))
        {
            return Err(NodeError::typed(
                "KeyError",
                "'t5xxl': CLIPTextEncodeFlux needs a FLUX CLIP (CLIP-L and T5-XXL, DualCLIPLoader type flux)",
            ));
        }
        let paths = ctx.services.get::<Paths>();
        let text_l = clip.tokenize(inputs.string("clip_l")?, paths);
        let text_t5 = clip.tokenize(inputs.string("t5xxl")?, paths);
        let tokens: ClipTokens = clip
            .encoders
            .iter()
            .enumerate()
            .map(|(index, encoder)| match encoder.network {
                TextNetwork::T5 { .. } => text_t5[index].clone(),
                TextNetwork::Clip { .. } => text_l[index].clone(),
            })
            .collect();
        let conditioning = clip.encode(&tokens).map_err(tensor_error)?;
        let guidance = inputs.float("guidance")? as f32;
        Ok(NodeOutput::values(vec![Value::object(
            conditioning.with_guidance(EmbeddedGuidance::Strength(guidance)),
        )]))
    }
}
