//! Easel's built-in nodes, with ComfyUI's names, schemas and arithmetic.
//!
//! - [`image`]: the `IMAGE` and `MASK` values;
//! - [`resample`]: PyTorch's and Pillow's resampling, as ComfyUI uses them;
//! - [`image_io`]: decoding image files and writing PNGs with metadata;
//! - [`paths`]: ComfyUI's directory layout and model folders (a service nodes look up);
//! - [`tiling`]: ComfyUI's tiled processing with feathered blending;
//! - [`image_nodes`], [`mask_nodes`], [`canny`], [`loader_nodes`], [`lora_nodes`],
//!   [`conditioning_nodes`], [`diffusion_nodes`], [`latent_nodes`], [`vae_nodes`]: the node classes;
//!   [`pending_loader_nodes`]: loaders of model kinds not run yet, declared for clients.
//!
//! [`builtin_registry`] registers every node.

pub mod canny;
pub mod clip_loader_nodes;
pub mod cond_regions;
pub mod conditioning_nodes;
pub mod custom_sampling_nodes;
pub mod diffusion;
pub mod diffusion_nodes;
pub mod flux_nodes;
pub mod image;
pub mod image_io;
pub mod image_nodes;
pub mod latent_nodes;
pub mod latent_preview;
pub mod loader_nodes;
pub mod lora_nodes;
pub mod mask_nodes;
pub mod model_cache;
pub mod paths;
pub mod pending_loader_nodes;
pub mod resample;
pub mod t5_tokenizer_files;
pub mod vae_nodes;

use easel_engine::NodeRegistry;

/// A registry with every built-in node.
pub fn builtin_registry() -> NodeRegistry {
    let mut registry = NodeRegistry::new();
    register_builtin_nodes(&mut registry);
    registry
}

/// Adds every built-in node to `registry`.
pub fn register_builtin_nodes(registry: &mut NodeRegistry) {
    use image_nodes::*;
    use mask_nodes::*;
    registry.register(LoadImage);
    registry.register(LoadImageMask);
    registry.register(SaveImage);
    registry.register(PreviewImage::default());
    registry.register(ImageScale);
    registry.register(ImageScaleBy);
    registry.register(ImageInvert);
    registry.register(ImageCrop);
    registry.register(ImageBatch);
    registry.register(ImagePadForOutpaint);
    registry.register(ImageCompositeMasked);
    registry.register(EmptyImage);
    registry.register(ImageToMask);
    registry.register(MaskToImage);
    registry.register(SolidMask);
    registry.register(InvertMask);
    registry.register(GrowMask);
    registry.register(FeatherMask);
    registry.register(ThresholdMask);
    registry.register(CropMask);
    registry.register(canny::Canny);
    registry.register(SaveImageWebsocket);
    registry.register(loader_nodes::CheckpointLoaderSimple);
    registry.register(loader_nodes::UnetLoader);
    registry.register(clip_loader_nodes::ClipLoader);
    registry.register(clip_loader_nodes::DualClipLoader);
    registry.register(loader_nodes::VaeLoader);
    for loader in &pending_loader_nodes::PENDING_LOADERS {
        registry.register(loader);
    }
    registry.register(lora_nodes::LoraLoader);
    registry.register(lora_nodes::LoraLoaderModelOnly);
    registry.register(conditioning_nodes::ClipTextEncode);
    registry.register(conditioning_nodes::ClipTextEncodeSdxl);
    registry.register(conditioning_nodes::ClipTextEncodeSdxlRefiner);
    registry.register(conditioning_nodes::ClipSetLastLayer);
    registry.register(diffusion_nodes::EmptyLatentImage);
    registry.register(diffusion_nodes::KSampler);
    registry.register(diffusion_nodes::KSamplerAdvanced);
    registry.register(diffusion_nodes::ModelSamplingDiscrete);
    registry.register(diffusion_nodes::DifferentialDiffusion);
    registry.register(flux_nodes::UnetLoaderGguf);
    registry.register(flux_nodes::UnetLoaderGgufAdvanced);
    registry.register(clip_loader_nodes::ClipLoaderGguf);
    registry.register(clip_loader_nodes::DualClipLoaderGguf);
    registry.register(conditioning_nodes::ClipTextEncodeFlux);
    registry.register(flux_nodes::FluxGuidance);
    registry.register(flux_nodes::ModelSamplingFlux);
    registry.register(flux_nodes::EmptySd3LatentImage);
    registry.register(custom_sampling_nodes::SamplerCustom);
    registry.register(custom_sampling_nodes::SamplerCustomAdvanced);
    registry.register(custom_sampling_nodes::RandomNoise);
    registry.register(custom_sampling_nodes::DisableNoise);
    registry.register(custom_sampling_nodes::BasicGuider);
    registry.register(custom_sampling_nodes::CfgGuider);
    registry.register(custom_sampling_nodes::DualCfgGuider);
    registry.register(custom_sampling_nodes::KSamplerSelect);
    registry.register(custom_sampling_nodes::BasicScheduler);
    registry.register(custom_sampling_nodes::KarrasScheduler);
    registry.register(custom_sampling_nodes::ExponentialScheduler);
    registry.register(custom_sampling_nodes::BetaSamplingScheduler);
    registry.register(custom_sampling_nodes::SdTurboScheduler);
    registry.register(custom_sampling_nodes::SplitSigmas);
    registry.register(custom_sampling_nodes::SplitSigmasDenoise);
    registry.register(custom_sampling_nodes::FlipSigmas);
    registry.register(vae_nodes::VaeDecode);
    registry.register(vae_nodes::VaeEncode);
    registry.register(vae_nodes::VaeEncodeForInpaint);
    registry.register(vae_nodes::InpaintModelConditioning);
    registry.register(vae_nodes::VaeDecodeTiled);
    registry.register(vae_nodes::VaeEncodeTiled);
    registry.register(conditioning_nodes::ConditioningCombine);
    registry.register(conditioning_nodes::ConditioningAverage);
    registry.register(conditioning_nodes::ConditioningConcat);
    registry.register(conditioning_nodes::ConditioningZeroOut);
    registry.register(conditioning_nodes::ConditioningSetTimestepRange);
    registry.register(conditioning_nodes::ConditioningSetArea);
    registry.register(conditioning_nodes::ConditioningSetAreaPercentage);
    registry.register(conditioning_nodes::ConditioningSetAreaStrength);
    registry.register(conditioning_nodes::ConditioningSetMask);
    registry.register(diffusion_nodes::LatentUpscale);
    registry.register(diffusion_nodes::LatentUpscaleBy);
    registry.register(diffusion_nodes::LatentFromBatch);
    registry.register(diffusion_nodes::RepeatLatentBatch);
    registry.register(diffusion_nodes::SetLatentNoiseMask);
    registry.register(latent_nodes::LatentFlip);
    registry.register(latent_nodes::LatentRotate);
    registry.register(latent_nodes::LatentCrop);
    registry.register(latent_nodes::LatentComposite);
    registry.register(latent_nodes::LatentCompositeMasked);
    registry.register(latent_nodes::LatentBlend);
}
