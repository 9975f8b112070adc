//! Helpers shared by the node tests: reading the reference fixtures, comparing tensors.
#![allow(dead_code)]

use base64::Engine;
use serde_json::Value as Json;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

pub fn fixture_json(name: &str) -> Json {
    let text = std::fs::read_to_string(std::path::Path::new(FIXTURES).join(name)).expect("fixture exists");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// The `shape` of a `{"shape", "f32_base64"}` array.
pub fn shape(spec: &Json) -> Vec<usize> {
    spec["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|v| v.as_u64().expect("dimension") as usize)
        .collect()
}

/// The little-endian float32 values of a `{"shape", "f32_base64"}` array.
pub fn f32_values(spec: &Json) -> Vec<f32> {
    let text = spec["f32_base64"].as_str().expect("f32_base64");
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).expect("base64");
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The largest absolute elementwise difference of two tensors of the same shape.
pub fn max_abs_difference(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of the same shape")
}
