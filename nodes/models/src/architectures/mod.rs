//! The networks, one file each, with a `Config` inferred from a file's tensor shapes: the
//! Stable Diffusion UNet ([`unet`]), the autoencoder ([`vae`]), CLIP's text transformer
//! ([`clip_text`]), T5's encoder ([`t5`]) and FLUX's transformer ([`flux`]); the UNet's hook
//! points for model patches ([`unet_patches`]).

pub mod clip_text;
pub mod flux;
pub mod t5;
pub mod unet;
pub mod unet_patches;
pub mod vae;
