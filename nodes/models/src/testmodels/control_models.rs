//! Tiny control models (in `controlnet/`): a ControlNet copying the tiny SD1.x UNet's encoder and
//! T2I-Adapters, FLUX ControlNets' layouts, a tiny Depth Anything V2 for the depth preprocessor, and the layouts their
//! writers and the tests build other sizes from.

use super::{tiny_clip_g, tiny_clip_l, tiny_sd1_unet, tiny_sdxl_unet, Recorder, TensorSpec};
use crate::architectures::controlnet::{ControlNet, ControlNetConfig, UNION_CONTROL_TYPES};
use crate::architectures::depth_anything_v2::{DepthAnythingV2, DepthAnythingV2Config};
use crate::architectures::dinov2::{Dinov2Config, FeedForward};
use crate::architectures::flux_controlnet::{FluxControlNet, FluxControlNetConfig};
use crate::architectures::t2i_adapter::{AdapterKind, T2IAdapter, T2IAdapterConfig};

/// The file name `easel testmodels` gives the tiny SD1.x ControlNet.
pub const TINY_SD1_CONTROLNET: &str = "easel_tiny_sd1_controlnet.safetensors";
/// The file name `easel testmodels` gives the tiny union ControlNet for the tiny SDXL model (in
/// ComfyUI's names; its union parts are as wide as the tiny UNet's first level, where real ones
/// are 320 wide as SDXL's).
pub const TINY_SDXL_UNION_CONTROLNET: &str = "easel_tiny_sdxl_union_controlnet.safetensors";
/// The file names `easel testmodels` gives the tiny full T2I-Adapters for SD1.x and SDXL. The
/// SDXL one's first level lands on the tiny SDXL UNet (its last encoder block, 64 channels at
/// half the latent's size); the tiny UNets are too shallow for the SD1.x one's levels, which the
/// UNet leaves out with a warning, as ComfyUI does.
pub const TINY_SD1_T2I_ADAPTER: &str = "easel_tiny_sd1_t2i_adapter.safetensors";
pub const TINY_SDXL_T2I_ADAPTER: &str = "easel_tiny_sdxl_t2i_adapter.safetensors";

/// A ControlNet for the tiny SD1.x UNet: a copy of its encoder taking an RGB hint.
pub fn tiny_sd1_controlnet() -> ControlNetConfig {
    ControlNetConfig::copying(&tiny_sd1_unet(), 3)
}

/// A union ControlNet for the tiny SDXL UNet, knowing all eight control types.
pub fn tiny_sdxl_union_controlnet() -> ControlNetConfig {
    let unet = tiny_sdxl_unet(tiny_clip_l().hidden_size + tiny_clip_g().hidden_size, 6);
    ControlNetConfig {
        union: Some((UNION_CONTROL_TYPES.len(), unet.model_channels)),
        ..ControlNetConfig::copying(&unet, 3)
    }
}

/// Every tensor of a ControlNet in the LDM layout.
pub fn controlnet_layout(config: &ControlNetConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    ControlNet::new(config.clone(), recorder.var_builder("").into())?;
    Ok(recorder.specs())
}

/// A full T2I-Adapter taking an RGB hint, `channel` features on its first level (its levels
/// have channel × 1, 2, 4, 4), with convolutions downsampling; SDXL's (`xl`) unshuffles by 16.
pub fn tiny_t2i_adapter(channel: usize, xl: bool) -> T2IAdapterConfig {
    let unshuffle = if xl { 16 } else { 8 };
    T2IAdapterConfig {
        kind: AdapterKind::Full {
            kernel: 1,
            conv_downsample: true,
        },
        in_channels: 3 * unshuffle * unshuffle,
        channels: [channel, channel * 2, channel * 4, channel * 4],
        xl,
    }
}

/// The tiny T2I-Adapters: file name and architecture.
pub fn tiny_t2i_adapters() -> [(&'static str, T2IAdapterConfig); 2] {
    [
        (TINY_SD1_T2I_ADAPTER, tiny_t2i_adapter(32, false)),
        (TINY_SDXL_T2I_ADAPTER, tiny_t2i_adapter(64, true)),
    ]
}

/// Every tensor of a T2I-Adapter in ComfyUI's names.
pub fn t2i_adapter_layout(config: &T2IAdapterConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    T2IAdapter::new(config.clone(), recorder.var_builder("").into())?;
    Ok(recorder.specs())
}

/// A Depth Anything V2 as small as the released block choice allows: a 12-block, 64-wide DINOv2
/// (one head) with the learned 37×37 position grid, and a 16-wide head. The tests write it under
/// the names the preprocessor looks for; `easel testmodels` does not, so that it can never pass
/// for a real model.
pub fn tiny_depth_anything_v2() -> DepthAnythingV2Config {
    DepthAnythingV2Config {
        encoder: Dinov2Config {
            embed_dim: 64,
            depth: 12,
            heads: 1,
            patch_size: 14,
            position_grid: 37,
            register_tokens: 0,
            feed_forward: FeedForward::Mlp { hidden: 128 },
            layer_scale: true,
        },
        features: 16,
        out_channels: [8, 16, 32, 32],
    }
}

/// Every tensor of a Depth Anything V2 in its original names.
pub fn depth_anything_v2_layout(config: &DepthAnythingV2Config) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    DepthAnythingV2::new(config.clone(), recorder.var_builder("").into())?;
    Ok(recorder.specs())
}

/// Every tensor of an XLabs or Mistoline FLUX ControlNet in ComfyUI's names.
pub fn flux_controlnet_layout(config: &FluxControlNetConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    FluxControlNet::new(config.clone(), recorder.var_builder("").into())?;
    Ok(recorder.specs())
}
