//! The nodes FLUX workflows use beside the common ones: ComfyUI-GGUF's UNet loaders (GGUF files
//! read in place, weights kept quantized), FluxGuidance, ModelSamplingFlux and
//! EmptySD3LatentImage.

use std::sync::Arc;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::diffusion::{Conditioning, DiffusionModel, Model, Prediction};
use crate::diffusion_nodes::{empty_latent, MAX_RESOLUTION};
use crate::loader_nodes::{file_names, load_diffusion_model_node};
use easel_models::sampling::schedule::{flux_shift_for_size, SigmaSchedule};

/// ComfyUI-GGUF's module name, as ComfyUI names a custom node pack's module.
pub(crate) const GGUF_MODULE: &str = "custom_nodes.ComfyUI-GGUF";

/// `UnetLoaderGGUF` ("Unet Loader (GGUF)").
pub struct UnetLoaderGguf;

impl Node for UnetLoaderGguf {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("UnetLoaderGGUF", GGUF_MODULE, "bootleg")
            .display("Unet Loader (GGUF)")
            .required("unet_name", InputSpec::combo(&file_names(services, "unet_gguf")))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        load_gguf_unet(ctx, inputs)
    }
}

/// `UnetLoaderGGUFAdvanced` ("Unet Loader (GGUF/Advanced)"). Easel dequantizes as the default
/// `dequant_dtype` does (f16 arithmetic) and computes in f32 on the CPU, so the dtype options
/// change nothing here; LoRA patches are not applied to GGUF models yet.
pub struct UnetLoaderGgufAdvanced;

impl Node for UnetLoaderGgufAdvanced {
    fn schema(&self, services: &Services) -> NodeSchema {
        let dtypes =
            || InputSpec::combo(&["default", "target", "float32", "float16", "bfloat16"]).opt("default", "default");
        NodeSchema::v1("UnetLoaderGGUFAdvanced", GGUF_MODULE, "bootleg")
            .display("Unet Loader (GGUF/Advanced)")
            .required("unet_name", InputSpec::combo(&file_names(services, "unet_gguf")))
            .required("dequant_dtype", dtypes())
            .required("patch_dtype", dtypes())
            .required("patch_on_device", InputSpec::boolean(false))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        load_gguf_unet(ctx, inputs)
    }
}

/// The GGUF model `unet_name` (whose architecture the loader checks as ComfyUI-GGUF does).
fn load_gguf_unet(ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
    load_diffusion_model_node(ctx, inputs.string("unet_name")?, None)
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
            conditioning.with_guidance(guidance),
        )]))
    }
}

/// `ModelSamplingFlux`: the model on FLUX's schedule with μ from the image size, between
/// `base_shift` at 256 latent patches and `max_shift` at 4096.
pub struct ModelSamplingFlux;

impl Node for ModelSamplingFlux {
    fn schema(&self, _: &Services) -> NodeSchema {
        let shift = |default| InputSpec::float(default, 0.0, 100.0).opt("step", 0.01);
        let size = || InputSpec::int(1024, 16, MAX_RESOLUTION).opt("step", 8);
        NodeSchema::v1(
            "ModelSamplingFlux",
            "comfy_extras.nodes_model_advanced",
            "advanced/model",
        )
        .display("ModelSamplingFlux")
        .required("model", InputSpec::of("MODEL"))
        .required("max_shift", shift(1.15))
        .required("base_shift", shift(0.5))
        .required("width", size())
        .required("height", size())
        .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let shift = flux_shift_for_size(
            inputs.float("max_shift")?,
            inputs.float("base_shift")?,
            inputs.int("width")? as f64,
            inputs.int("height")? as f64,
        );
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                prediction: Prediction::Flow,
                schedule: SigmaSchedule::flux(shift),
                ..(*model.0).clone()
            },
        )))]))
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
