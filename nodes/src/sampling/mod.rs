//! The sampling core: initial and per-step noise as torch makes it on a CPU, noise schedules,
//! and the samplers of ComfyUI's KSampler.

pub mod noise;
pub mod samplers;
pub mod schedule;
