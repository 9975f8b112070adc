//! Easel's ML library: everything about diffusion models that would make sense outside ComfyUI's
//! node graph. It depends on no other Easel crate; the node layer (`easel-nodes`) builds
//! ComfyUI's MODEL, CLIP, VAE and sampling pipeline on top of it.
//!
//! - [`weights`]: safetensors files read through a memory map and served to model code
//!   ([`weights::Weights`]); [`formats`]: GGUF files, ggml's quantized blocks, fp8;
//! - [`lora`]: LoRA and LyCORIS weight differences patched into weights as they are built;
//!   [`lora_extract`]: LoRA factors extracted from a weight difference (truncated SVD);
//! - [`checkpoint`]: a checkpoint's family and the architecture of each part, read from its
//!   tensor shapes; [`diffusers_layout`]: diffusers-layout UNets and VAEs read under LDM names;
//! - [`architectures`]: the networks (UNet, VAE, CLIP text, T5, FLUX), each with a `Config`
//!   inferred from its weights;
//! - [`kernels`]: the CPU kernels (GEMM, convolution, attention, linear layers over stored
//!   weights);
//! - [`text`]: prompt tokenizers, prompt weights and textual inversions;
//! - [`sampling`]: noise, Brownian trees, σ schedules and the samplers;
//! - [`tiling`]: tiled processing with feathered blending; [`memory`]: memory checks and page
//!   advice for large buffers;
//! - [`testmodels`]: tiny random-weight models in the real file formats, for tests.

pub mod architectures;
pub mod checkpoint;
pub mod diffusers_layout;
pub mod formats;
pub mod kernels;
pub mod lora;
pub mod lora_extract;
pub mod memory;
pub mod sampling;
pub mod testmodels;
pub mod text;
pub mod tiling;
pub mod weights;
