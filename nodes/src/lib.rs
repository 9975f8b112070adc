//! Easel's built-in nodes, with ComfyUI's names, schemas and arithmetic, in folders named by
//! ComfyUI category or node pack; each folder registers its own nodes. The ML they run (file
//! formats, architectures, kernels, sampling math) is the `easel-models` crate.
//!
//! - [`image`]: the `IMAGE` and `MASK` values and the image nodes; [`mask`]: the mask nodes;
//! - [`latent`]: the `LATENT` value and the latent and VAE nodes;
//! - [`conditioning`]: the `CONDITIONING` value and the prompt and conditioning nodes;
//! - [`controlnet`]: control models and applying them; [`clip_vision`]: CLIP vision encoders
//!   and what reads their outputs (style models, unCLIP);
//! - [`model`]: the `MODEL`, `CLIP` and `VAE` values and the model-patching nodes;
//! - [`sampling`]: KSampler, the custom-sampling nodes and the sampling run under them;
//! - [`loaders`]: checkpoint, diffusion-model, text-encoder, VAE and LoRA loaders;
//! - [`hooks`]: scheduled LoRA (hooks on conditioning and CLIP);
//! - [`upscale`]: upscale models (UpscaleModelLoader, ImageUpscaleWithModel);
//! - [`flux`]: FLUX's own nodes; [`packs`]: nodes of custom-node packs (ComfyUI-GGUF,
//!   comfyui_controlnet_aux);
//! - [`utils`]: primitives and string operations (Python's `str` and `re` semantics);
//! - [`paths`]: ComfyUI's directory layout and model folders, [`model_cache`]: loaded models
//!   shared between nodes, [`runtime`]: device, precision and error conversion (services and
//!   helpers the folders share).
//!
//! [`builtin_registry`] registers every node.

pub mod clip_vision;
pub mod conditioning;
pub mod controlnet;
pub mod flux;
pub mod hooks;
pub mod image;
pub mod latent;
pub mod loaders;
pub mod mask;
pub mod model;
pub mod model_cache;
pub mod packs;
pub mod paths;
pub mod runtime;
pub mod sampling;
pub mod saved_files;
pub mod upscale;
pub mod utils;

use easel_engine::NodeRegistry;

/// A registry with every built-in node.
pub fn builtin_registry() -> NodeRegistry {
    let mut registry = NodeRegistry::new();
    register_builtin_nodes(&mut registry);
    registry
}

/// Adds every built-in node to `registry`, folder by folder.
pub fn register_builtin_nodes(registry: &mut NodeRegistry) {
    image::register(registry);
    mask::register(registry);
    loaders::register(registry);
    conditioning::register(registry);
    controlnet::register(registry);
    clip_vision::register(registry);
    latent::register(registry);
    sampling::register(registry);
    model::register(registry);
    flux::register(registry);
    hooks::register(registry);
    packs::register(registry);
    upscale::register(registry);
    utils::register(registry);
}
