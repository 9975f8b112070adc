//! Tensor file formats beyond safetensors (which [`crate::weights`] reads): GGUF files
//! ([`gguf`]), ggml's quantized blocks ([`ggml_quants`]) and the fp8 formats ([`fp8`]).

pub mod fp8;
pub mod ggml_quants;
pub mod gguf;
