//! ComfyUI-GGUF's loaders (`custom_nodes.ComfyUI-GGUF`, category `bootleg`): UnetLoaderGGUF and
//! UnetLoaderGGUFAdvanced (GGUF diffusion models, read in place with their weights kept
//! quantized), CLIPLoaderGGUF and DualCLIPLoaderGGUF (text encoders as GGUF or safetensors).

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services};
use serde_json::{Map, Value as Json};

use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{file_names, load_diffusion_model_node};
use crate::loaders::text_encoders::{
    dual_clip_node, single_clip_node, triple_clip_node, CLIP_TYPES, DUAL_CLIP_TYPES, TRIPLE_CLIP_FILES,
};

/// Adds ComfyUI-GGUF's nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(UnetLoaderGguf);
    registry.register(UnetLoaderGgufAdvanced);
    registry.register(ClipLoaderGguf);
    registry.register(DualClipLoaderGguf);
    registry.register(TripleClipLoaderGguf);
}

/// ComfyUI-GGUF's module name, as ComfyUI names a custom node pack's module.
pub(crate) const GGUF_MODULE: &str = "custom_nodes.ComfyUI-GGUF";

/// `UnetLoaderGGUF` ("Unet Loader (GGUF)").
pub struct UnetLoaderGguf;

impl Node for UnetLoaderGguf {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("UnetLoaderGGUF", GGUF_MODULE, "bootleg")
            .display("Unet Loader (GGUF)")
            .required("unet_name", InputSpec::combo(&file_names(services, "unet_gguf")))
            .model_folder("unet_name", "diffusion_models")
            .output(OutputSpec::of("MODEL"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("unet_name", "diffusion_models")])
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
            .model_folder("unet_name", "diffusion_models")
            .required("dequant_dtype", dtypes())
            .required("patch_dtype", dtypes())
            .required("patch_on_device", InputSpec::boolean(false))
            .output(OutputSpec::of("MODEL"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("unet_name", "diffusion_models")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        load_gguf_unet(ctx, inputs)
    }
}

/// The GGUF model `unet_name` (whose architecture the loader checks as ComfyUI-GGUF does).
fn load_gguf_unet(ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
    load_diffusion_model_node(ctx, inputs.string("unet_name")?, None)
}

/// The files ComfyUI-GGUF's CLIP loaders offer: the text encoders and the GGUF ones, sorted.
fn gguf_loader_file_names(services: &Services) -> Vec<String> {
    let mut names = file_names(services, "text_encoders");
    names.extend(file_names(services, "clip_gguf"));
    names.sort();
    names
}

/// ComfyUI-GGUF's `CLIPLoaderGGUF`: `CLIPLoader` over safetensors and GGUF text encoders.
pub struct ClipLoaderGguf;

impl Node for ClipLoaderGguf {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("CLIPLoaderGGUF", GGUF_MODULE, "bootleg")
            .display("CLIPLoader (GGUF)")
            .required("clip_name", InputSpec::combo(&gguf_loader_file_names(services)))
            .model_folder("clip_name", "text_encoders")
            .required("type", InputSpec::combo(&CLIP_TYPES))
            .output(OutputSpec::of("CLIP"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("clip_name", "text_encoders")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        single_clip_node(ctx, inputs, "CLIPLoaderGGUF")
    }
}

/// ComfyUI-GGUF's `DualCLIPLoaderGGUF`: `DualCLIPLoader` over safetensors and GGUF text encoders.
pub struct DualClipLoaderGguf;

impl Node for DualClipLoaderGguf {
    fn schema(&self, services: &Services) -> NodeSchema {
        let names = gguf_loader_file_names(services);
        NodeSchema::v1("DualCLIPLoaderGGUF", GGUF_MODULE, "bootleg")
            .display("DualCLIPLoader (GGUF)")
            .required("clip_name1", InputSpec::combo(&names))
            .required("clip_name2", InputSpec::combo(&names))
            .model_folder("clip_name1", "text_encoders")
            .model_folder("clip_name2", "text_encoders")
            .required("type", InputSpec::combo(&DUAL_CLIP_TYPES))
            .output(OutputSpec::of("CLIP"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(
            services,
            inputs,
            &[("clip_name1", "text_encoders"), ("clip_name2", "text_encoders")],
        )
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        dual_clip_node(ctx, inputs, "DualCLIPLoaderGGUF")
    }
}

/// ComfyUI-GGUF's `TripleCLIPLoaderGGUF`: `TripleCLIPLoader` over safetensors and GGUF text
/// encoders (SD3's).
pub struct TripleClipLoaderGguf;

impl Node for TripleClipLoaderGguf {
    fn schema(&self, services: &Services) -> NodeSchema {
        let names = gguf_loader_file_names(services);
        TRIPLE_CLIP_FILES
            .into_iter()
            .fold(
                NodeSchema::v1("TripleCLIPLoaderGGUF", GGUF_MODULE, "bootleg").display("TripleCLIPLoader (GGUF)"),
                |schema, (input, folder)| {
                    schema
                        .required(input, InputSpec::combo(&names))
                        .model_folder(input, folder)
                },
            )
            .output(OutputSpec::of("CLIP"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &TRIPLE_CLIP_FILES)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        triple_clip_node(ctx, inputs, "TripleCLIPLoaderGGUF")
    }
}
