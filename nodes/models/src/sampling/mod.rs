//! The sampling core: initial and per-step noise as torch makes it on a CPU (with the Brownian
//! tree of the SDE samplers), noise schedules, and the samplers of ComfyUI's KSampler.

pub mod brownian;
pub mod noise;
pub mod samplers;
pub mod schedule;
