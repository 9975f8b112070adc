//! What every model-running node shares: the device models run on, the precision diffusion models
//! multiply in (registry services), and how the ML library's errors become ComfyUI's node errors.

use candle_core::Device;
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
