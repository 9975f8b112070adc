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
//!   [`merging_blocks`]: the model-specific block merges (ModelMergeSD1, SDXL, Flux1, …);
//! - [`saving`]: CheckpointSave, ModelSave, CLIPSave, VAESave; [`lora_extract`]: LoraSave;
//! - [`self_attention_guidance`]: the SelfAttentionGuidance node and its patches;
//! - [`hypernetwork`]: HypernetworkLoader, MLPs changing the attentions' keys and values;
//! - [`hypertile`] and [`token_merging`]: HyperTile and TomePatchModel, self-attention patches
//!   that tile the query or merge its similar tokens;
//! - [`skip_layer_guidance`]: SkipLayerGuidanceDiT(Simple), guidance away from a DiT's prediction
//!   with blocks skipped;
//! - [`wrappers`]: wrappers around the network's calls and the guided predictions, with their
//!   per-run state; [`step_caches`]: EasyCache and LazyCache, which skip steps with them.
//!
//! The networks themselves are in `easel_models::architectures`.

pub mod block_patches;
pub mod clip;
pub mod diffusion_model;
pub mod fourier;
pub mod guidance;
pub mod hypernetwork;
pub mod hypertile;
pub mod lora_extract;
pub mod merging;
pub mod merging_blocks;
pub mod nodes;
pub mod patch_nodes;
pub mod patches;
pub mod saving;
pub mod self_attention_guidance;
pub mod skip_layer_guidance;
pub mod step_caches;
pub mod token_merging;
pub mod vae;
pub mod wrappers;

use easel_engine::NodeRegistry;

/// Adds the model-patching nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::ModelSamplingDiscrete);
    registry.register(nodes::ModelSamplingFlux);
    registry.register(nodes::MODEL_SAMPLING_SD3);
    registry.register(nodes::MODEL_SAMPLING_AURA_FLOW);
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
    registry.register(step_caches::EasyCacheNode);
    registry.register(step_caches::LazyCacheNode);
    registry.register(skip_layer_guidance::SkipLayerGuidanceDitNode);
    registry.register(skip_layer_guidance::SkipLayerGuidanceDitSimpleNode);
    registry.register(skip_layer_guidance::SkipLayerGuidanceSd3Node);
    registry.register(hypertile::HyperTileNode);
    registry.register(token_merging::TomePatchModelNode);
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
    for layout in [
        merging_blocks::BlockLayout::Sd1,
        merging_blocks::BlockLayout::Sd2,
        merging_blocks::BlockLayout::Sdxl,
        merging_blocks::BlockLayout::Sd3Medium,
        merging_blocks::BlockLayout::Sd35Large,
        merging_blocks::BlockLayout::Flux1,
    ] {
        registry.register(merging_blocks::ModelMergeModelSpecific { layout });
    }
    registry.register(saving::CheckpointSave);
    registry.register(saving::ModelSave);
    registry.register(saving::ClipSave);
    registry.register(saving::VaeSave);
    registry.register(lora_extract::LoraSave);
    registry.register(hypernetwork::HypernetworkLoader);
}
