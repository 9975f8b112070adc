//! ComfyUI's `MODEL`, `CLIP` and `VAE` values and the nodes that patch a model.
//!
//! - [`diffusion_model`]: MODEL, a diffusion network with its prediction type, σ schedule,
//!   latent format and the inputs each family's network takes;
//! - [`clip`]: CLIP, the text encoders of a model with their tokenizers and options;
//! - [`vae`]: VAE, the autoencoder;
//! - [`nodes`]: ModelSamplingDiscrete, ModelSamplingFlux (`advanced/model`), DifferentialDiffusion.
//!
//! The networks themselves are in `easel_models::architectures`.

pub mod clip;
pub mod diffusion_model;
pub mod nodes;
pub mod vae;

use easel_engine::NodeRegistry;

/// Adds the model-patching nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::ModelSamplingDiscrete);
    registry.register(nodes::ModelSamplingFlux);
    registry.register(nodes::DifferentialDiffusion);
}
