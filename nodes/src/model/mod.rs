//! ComfyUI's `MODEL`, `CLIP` and `VAE` values and the nodes that patch a model.
//!
//! - [`diffusion_model`]: MODEL, a diffusion network with its prediction type, σ schedule,
//!   latent format and the inputs each family's network takes;
//! - [`clip`]: CLIP, the text encoders of a model with their tokenizers and options;
//! - [`vae`]: VAE, the autoencoder;
//! - [`patches`]: the patches nodes add to a MODEL (UNet hooks, guidance functions);
//!   [`guidance`] and [`block_patches`] implement ComfyUI's, [`fourier`] their frequency filters;
//! - [`nodes`]: ModelSamplingDiscrete, ModelSamplingContinuousEDM/V, ModelSamplingFlux
//!   (`advanced/model`), DifferentialDiffusion;
//! - [`patch_nodes`]: the nodes that add patches (RescaleCFG, CFGZeroStar, APG, FreeU, PAG, …);
//! - [`merging`]: the weight-patching nodes (model and CLIP merges, attention multipliers);
//! - [`saving`]: CheckpointSave, ModelSave, CLIPSave, VAESave;
//! - [`self_attention_guidance`]: the SelfAttentionGuidance node and its patches.
//!
//! The networks themselves are in `easel_models::architectures`.

pub mod block_patches;
pub mod clip;
pub mod diffusion_model;
pub mod fourier;
pub mod guidance;
pub mod merging;
pub mod nodes;
pub mod patch_nodes;
pub mod patches;
pub mod saving;
pub mod self_attention_guidance;
pub mod vae;

use easel_engine::NodeRegistry;

/// Adds the model-patching nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::ModelSamplingDiscrete);
    registry.register(nodes::ModelSamplingFlux);
    registry.register(nodes::ModelSamplingContinuousEdm);
    registry.register(nodes::ModelSamplingContinuousV);
    registry.register(nodes::DifferentialDiffusion);
    registry.register(patch_nodes::RescaleCfgNode);
    registry.register(patch_nodes::CfgZeroStarNode);
    registry.register(patch_nodes::CfgNormNode);
    registry.register(patch_nodes::MahiroNode);
    registry.register(patch_nodes::EpsilonScalingNode);
    registry.register(patch_nodes::ApgNode);
    registry.register(patch_nodes::TcfgNode);
    registry.register(patch_nodes::FreScaNode);
    registry.register(patch_nodes::PerturbedAttentionGuidanceNode);
    registry.register(patch_nodes::FreeUNode { adaptive: false });
    registry.register(patch_nodes::FreeUNode { adaptive: true });
    registry.register(patch_nodes::PatchModelAddDownscale);
    registry.register(patch_nodes::TorchCompileModel);
    registry.register(self_attention_guidance::SelfAttentionGuidanceNode);
    registry.register(merging::ModelMergeSimple);
    registry.register(merging::ModelMergeBlocks);
    registry.register(merging::ModelMergeSubtract);
    registry.register(merging::ModelMergeAdd);
    registry.register(merging::ClipMergeSimple);
    registry.register(merging::ClipMergeSubtract);
    registry.register(merging::ClipMergeAdd);
    registry.register(merging::UNetAttentionMultiply { cross: false });
    registry.register(merging::UNetAttentionMultiply { cross: true });
    registry.register(merging::ClipAttentionMultiply);
    registry.register(saving::CheckpointSave);
    registry.register(saving::ModelSave);
    registry.register(saving::ClipSave);
    registry.register(saving::VaeSave);
}
