//! The networks, one file each, with a `Config` inferred from a file's tensor shapes: the
//! Stable Diffusion UNet ([`unet`]), the ControlNet copying its encoder ([`controlnet`]) and the
//! T2I-Adapter giving it features of a control image ([`t2i_adapter`]), the autoencoder
//! ([`vae`]), CLIP's text transformer ([`clip_text`]) and vision transformers ([`clip_vision`],
//! CLIP and SigLIP), sharing their layer ([`clip_encoder`]), the style models reading the latter
//! ([`style_model`]), T5's encoder ([`t5`]), FLUX's transformer ([`flux`]) and the ControlNets
//! copying it ([`flux_controlnet`]), SD3's MMDiT ([`mmdit`]) and its ControlNets
//! ([`mmdit_controlnet`]); DINOv2's vision transformer ([`dinov2`]) under Depth Anything V2's
//! depth head ([`depth_anything_v2`]); A1111's hypernetworks, MLPs patching the UNet's attention
//! inputs ([`hypernetwork`]); GLIGEN's grounding boxes ([`gligen`]); the hook points for model
//! patches of the UNet ([`unet_patches`]) and of DiTs such as FLUX and SD3 ([`dit_patches`]);
//! the upscale models ESRGAN's RRDBNet ([`esrgan`]) and Real-ESRGAN's compact network
//! ([`compact`]).

pub mod clip_encoder;
pub mod clip_text;
pub mod clip_vision;
pub mod compact;
pub mod controlnet;
pub mod depth_anything_v2;
pub mod dinov2;
pub mod dit_patches;
pub mod esrgan;
pub mod flux;
pub mod flux_controlnet;
pub mod gligen;
pub mod hypernetwork;
pub mod ip_adapter;
pub mod mmdit;
pub mod mmdit_controlnet;
pub mod style_model;
pub mod t2i_adapter;
pub mod t5;
pub mod unet;
pub mod unet_patches;
pub mod vae;
