//! Tensor file formats beyond safetensors (which [`crate::weights`] reads): GGUF files
//! ([`gguf`]), ggml's quantized blocks ([`ggml_quants`]), the fp8 formats ([`fp8`]) and PyTorch's
//! pickled state dicts ([`pth`]).

pub mod fp8;
pub mod ggml_quants;
pub mod gguf;
pub mod pth;
