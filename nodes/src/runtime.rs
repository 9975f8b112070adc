//! What nodes share: the device models run on, the precision diffusion models multiply in
//! (registry services), how the ML library's errors become ComfyUI's node errors, memory checks,
//! PyTorch's broadcasting rule with its error, and marking a schema experimental.

use candle_core::Device;
use easel_engine::schema::NodeSchema;
use easel_engine::{NodeError, Services};
use easel_models::kernels::sgemm::Precision;
use easel_models::memory::{self, OutOfMemory};

/// Where models run: the registry's `Device` service, the CPU by default.
pub(crate) fn device(services: &Services) -> Device {
    services.get::<Device>().cloned().unwrap_or(Device::Cpu)
}

/// How diffusion models multiply on the CPU (a registry service: ComfyUI's `--bf16-unet`);
/// f32 by default. Text encoders and VAEs always compute in f32.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiffusionModelPrecision(pub Precision);

pub(crate) fn tensor_error(error: candle_core::Error) -> NodeError {
    NodeError::typed("RuntimeError", error.to_string())
}

pub(crate) fn out_of_memory(error: OutOfMemory) -> NodeError {
    NodeError::typed("OutOfMemoryError", error.to_string())
}

/// Fails with ComfyUI's `OutOfMemoryError` when a buffer of `dims` f32 values would not fit in the
/// memory available now. Nodes that allocate from their inputs check before allocating, so an
/// oversized request fails its prompt instead of aborting the process.
pub(crate) fn ensure_fits(dims: &[usize], what: impl FnOnce() -> String) -> Result<(), NodeError> {
    let bytes = dims
        .iter()
        .try_fold(4u64, |bytes, &dim| bytes.checked_mul(dim as u64))
        .unwrap_or(u64::MAX);
    memory::ensure_available(bytes, what).map_err(out_of_memory)
}

/// PyTorch's broadcasting of sizes `a` and `b` of dimension `dim`, with its error when they
/// cannot broadcast.
pub(crate) fn broadcast(a: usize, b: usize, dim: usize) -> Result<usize, NodeError> {
    match (a, b) {
        _ if a == b => Ok(a),
        (1, _) => Ok(b),
        (_, 1) => Ok(a),
        _ => Err(size_mismatch(a, b, dim)),
    }
}

/// PyTorch's error for operands whose sizes `a` and `b` of dimension `dim` differ where neither
/// is 1.
pub(crate) fn size_mismatch(a: usize, b: usize, dim: usize) -> NodeError {
    NodeError::typed(
        "RuntimeError",
        format!("The size of tensor a ({a}) must match the size of tensor b ({b}) at non-singleton dimension {dim}"),
    )
}

/// `schema` marked experimental (a V3 node's `is_experimental`).
pub(crate) fn experimental(mut schema: NodeSchema) -> NodeSchema {
    schema.experimental = true;
    schema
}
