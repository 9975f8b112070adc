//! Node outputs against ComfyUI's formulas run in PyTorch 2.8 / Pillow 13 / SciPy / kornia 0.9
//! (`fixtures/generate_image_ops.py` made `fixtures/image_ops.json`): every value bit for bit.

mod common;

use common::{f32_values, fixture_json, shape};
use easel_engine::{call_standalone, NodeInputs, Services, Value};
use easel_nodes::builtin_registry;
use easel_nodes::image::{Image, Mask};
use indexmap::IndexMap;
use serde_json::Value as Json;

/// The generator's `pattern_image`: `((i·7919 + seed·104729) mod 256) / 255` in float32.
fn pattern(len: usize, seed: i64) -> Vec<f32> {
    (0..len as i64)
        .map(|i| ((i * 7919 + seed * 104729) % 256) as f32 / 255.0f32)
        .collect()
}

/// The generator's `smooth_image`, in float32 like numpy.
fn smooth(batch: usize, height: usize, width: usize, seed: i64) -> Vec<f32> {
    let mut data = Vec::with_capacity(batch * height * width * 3);
    for b in 0..batch {
        for y in 0..height {
            for x in 0..width {
                let (xf, yf) = (x as f32, y as f32);
                let base = (xf * 0.35f32 + (seed + b as i64) as f32).sin() * (yf * 0.27f32).cos();
                let step = if xf + yf > (width as f64 * 0.8) as f32 {
                    1.0f32
                } else {
                    0.0
                };
                let value = (0.5f32 + 0.25f32 * base + 0.3f32 * step).clamp(0.0, 1.0);
                data.extend([value, value * 0.9f32, 1.0f32 - value]);
            }
        }
    }
    data
}

fn build_input(spec: &Json) -> Value {
    let dims = shape(spec);
    let seed = spec["seed"].as_i64().unwrap();
    match spec["kind"].as_str().unwrap() {
        "pattern" => {
            let data = pattern(dims.iter().product(), seed);
            Value::object(Image::new(dims[0], dims[1], dims[2], dims[3], data).unwrap())
        }
        "smooth" => {
            Value::object(Image::new(dims[0], dims[1], dims[2], 3, smooth(dims[0], dims[1], dims[2], seed)).unwrap())
        }
        "pattern_mask" => Value::object(Mask {
            batch: dims[0],
            height: dims[1],
            width: dims[2],
            data: pattern(dims.iter().product(), seed),
        }),
        other => panic!("unknown input kind {other}"),
    }
}

/// The node's outputs flattened in the generator's order (image values, then mask values).
fn flatten(outputs: &[Value]) -> Vec<f32> {
    let mut values = Vec::new();
    for output in outputs {
        if let Some(image) = output.downcast::<Image>() {
            values.extend(&image.data);
        } else if let Some(mask) = output.downcast::<Mask>() {
            values.extend(&mask.data);
        }
    }
    values
}

#[test]
fn node_outputs_match_comfyui_formulas() {
    let registry = builtin_registry();
    let services = Services::new();
    let mut failures = Vec::new();
    for case in fixture_json("image_ops.json")["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let node = registry.get(case["op"].as_str().unwrap()).unwrap();
        let mut inputs = IndexMap::new();
        for (key, spec) in case["inputs"].as_object().unwrap() {
            inputs.insert(key.clone(), build_input(spec));
        }
        for (key, value) in case["params"].as_object().unwrap() {
            inputs.insert(key.clone(), Value::Json(value.clone()));
        }
        let output = call_standalone(node.as_ref(), &services, &NodeInputs::new(inputs))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let actual = flatten(&output.outputs);
        let expected = f32_values(&case["output"]);
        let expected_shape = shape(&case["output"]);
        if actual.len() != expected.len() {
            failures.push(format!(
                "{name}: {} values, expected {} {:?}",
                actual.len(),
                expected.len(),
                expected_shape
            ));
            continue;
        }
        let differing: Vec<usize> = (0..actual.len())
            .filter(|&i| actual[i].to_bits() != expected[i].to_bits())
            .collect();
        if let Some(&first) = differing.first() {
            failures.push(format!(
                "{name}: {} of {} values differ, first at {first}: {} != {}",
                differing.len(),
                actual.len(),
                actual[first],
                expected[first]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
