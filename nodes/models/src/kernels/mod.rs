//! CPU kernels on f32 data: the GEMM that every other kernel runs on ([`sgemm`]), linear layers
//! over weights in their stored precision ([`linear`]), convolution ([`conv`]) and attention
//! ([`attention`]), and the fused convolution and attention loops they call ([`cpu`]); PyTorch's
//! `interpolate` as model code calls it ([`interpolate`]).

pub mod attention;
pub mod conv;
pub mod cpu;
pub mod interpolate;
pub mod linear;
pub mod sgemm;
