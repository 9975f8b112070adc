//! The image, compositing and latent nodes of `image/filters.rs`, `image/layout.rs`,
//! `image/alpha.rs` and `latent/operations.rs` against ComfyUI 0.3.64's own node classes run in
//! PyTorch 2.8 / Pillow 13 / kornia 0.9 (`fixtures/generate_image_nodes.py` made
//! `fixtures/image_nodes.json`): every value bit for bit, and ComfyUI's error messages.
//!
//! The one tolerance: where ComfyUI's result goes through `torch.sqrt` or `torch.exp` (Gaussian
//! kernels, ImageBlend's soft light), PyTorch's MKL functions are not correctly rounded and Easel's
//! are. Those cases hold a second reference, ComfyUI run with correctly rounded square roots and
//! exponentials, which must match bit for bit; the plain reference within 4e-6.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{f32_values, fixture_json, j, shape};
use easel_engine::{call_standalone, NodeInputs, NodeRegistry, Services, Value};
use easel_models::testmodels::TINY_SD1_CHECKPOINT;
use easel_nodes::builtin_registry;
use easel_nodes::conditioning::Conditioning;
use easel_nodes::image::{Image, Mask};
use easel_nodes::latent::operations::{GuidanceOperation, LatentOperation};
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::Model;
use easel_nodes::model::patches::{CallPatches, GuidanceArgs, GuidanceModel, ModelPatches, Side};
use indexmap::IndexMap;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

/// The largest difference allowed from ComfyUI's own result where only its MKL square roots
/// and exponentials differ.
const MKL_TOLERANCE: f32 = 4e-6;

/// The generator's `pattern`: `((i·7919 + seed·104729) mod 256) / 255` in float32.
fn pattern(len: usize, seed: i64) -> Vec<f32> {
    (0..len as i64)
        .map(|i| ((i * 7919 + seed * 104729) % 256) as f32 / 255.0f32)
        .collect()
}

/// The generator's `hashed`: `(((i·2654435761 + seed·40503) mod 2³²) >> 24) / 255`.
fn hashed(len: usize, seed: u64) -> Vec<f32> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed * 40503) % (1 << 32)) >> 24) as f32 / 255.0f32)
        .collect()
}

/// The generator's `signed`: `(((i·7919 + seed·104729) mod 2001) − 1000) / 1000 · scale`.
fn signed(len: usize, seed: i64, scale: f32) -> Vec<f32> {
    (0..len as i64)
        .map(|i| ((i * 7919 + seed * 104729) % 2001 - 1000) as f32 / 1000.0f32 * scale)
        .collect()
}

fn mask_from(spec: &Json) -> Mask {
    let dims = shape(spec);
    Mask {
        batch: dims[0],
        height: dims[1],
        width: dims[2],
        data: pattern(dims.iter().product(), spec["seed"].as_i64().unwrap()),
    }
}

/// The generator's `build`: an input value from its spec.
fn build(spec: &Json, registry: &NodeRegistry) -> Value {
    let kind = spec["kind"].as_str().unwrap();
    if kind == "list" {
        return Value::List(
            spec["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| build(s, registry))
                .collect(),
        );
    }
    if kind == "operation" {
        let mut inputs = IndexMap::new();
        for (key, value) in spec["params"].as_object().unwrap() {
            inputs.insert(key.clone(), j(value.clone()));
        }
        let node = registry.get(spec["node"].as_str().unwrap()).unwrap();
        let output = call_standalone(node.as_ref(), &Services::new(), &NodeInputs::new(inputs)).unwrap();
        return output.outputs[0].clone();
    }
    let dims = shape(spec);
    let len = dims.iter().product();
    let seed = spec["seed"].as_i64().unwrap();
    match kind {
        "image" => Value::object(Image::new(dims[0], dims[1], dims[2], dims[3], pattern(len, seed)).unwrap()),
        "hashed" => Value::object(Image::new(dims[0], dims[1], dims[2], dims[3], hashed(len, seed as u64)).unwrap()),
        "mask" => Value::object(mask_from(spec)),
        "latent" => {
            let scale = spec["scale"].as_f64().unwrap() as f32;
            let samples = Tensor::from_vec(signed(len, seed, scale), dims, &Device::Cpu).unwrap();
            Value::object(Latent {
                samples,
                batch_index: spec.get("batch_index").map(|b| {
                    b.as_array()
                        .unwrap()
                        .iter()
                        .map(|i| i.as_u64().unwrap() as usize)
                        .collect()
                }),
                noise_mask: spec.get("noise_mask").map(mask_from),
            })
        }
        other => panic!("unknown input kind {other}"),
    }
}

/// An output value's shape and float32 values, as the generator encodes tensors.
fn tensor_of(value: &Value) -> (Vec<usize>, Vec<f32>) {
    if let Some(image) = value.downcast::<Image>() {
        let dims = vec![image.batch, image.height, image.width, image.channels];
        return (dims, image.data.clone());
    }
    if let Some(mask) = value.downcast::<Mask>() {
        return (vec![mask.batch, mask.height, mask.width], mask.data.clone());
    }
    if let Some(latent) = value.downcast::<Latent>() {
        return latent_tensor(&latent.samples);
    }
    panic!("not a tensor output: {value:?}")
}

fn latent_tensor(samples: &Tensor) -> (Vec<usize>, Vec<f32>) {
    (samples.dims().to_vec(), common::flat(samples))
}

/// How far ours may be from a reference: bit for bit, or within a tolerance.
#[derive(Clone, Copy)]
enum Match {
    Exact,
    Within(f32),
}

/// Compares one encoded tensor; returns a description of the first difference.
fn compare_tensor(path: &str, (dims, ours): (Vec<usize>, Vec<f32>), expected: &Json, how: Match) -> Option<String> {
    if dims != shape(expected) {
        return Some(format!("{path}: shape {dims:?}, expected {:?}", shape(expected)));
    }
    if let Some(digest) = expected.get("sha256") {
        let bytes: Vec<u8> = ours.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ours: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        return (ours != digest.as_str().unwrap()).then(|| format!("{path}: values differ (sha256)"));
    }
    let reference = f32_values(expected);
    let differs = |(a, b): (&f32, &f32)| match how {
        Match::Exact => a.to_bits() != b.to_bits(),
        Match::Within(tolerance) => (a - b).abs() > tolerance || a.is_nan() != b.is_nan(),
    };
    let bad: Vec<usize> = (0..ours.len())
        .filter(|&i| differs((&ours[i], &reference[i])))
        .collect();
    bad.first().map(|&i| {
        format!(
            "{path}: {} of {} values differ, first at {i}: {} != {}",
            bad.len(),
            ours.len(),
            ours[i],
            reference[i]
        )
    })
}

/// Compares an output value (image, mask, latent or list) with its encoding.
fn compare(path: &str, value: &Value, expected: &Json, how: Match) -> Vec<String> {
    if let Some(items) = expected.get("list") {
        let Value::List(ours) = value else {
            return vec![format!("{path}: not a list")];
        };
        let items = items.as_array().unwrap();
        if ours.len() != items.len() {
            return vec![format!("{path}: {} items, expected {}", ours.len(), items.len())];
        }
        return ours
            .iter()
            .zip(items)
            .enumerate()
            .flat_map(|(n, (v, e))| compare(&format!("{path}[{n}]"), v, e, how))
            .collect();
    }
    if let Some(samples) = expected.get("samples") {
        let latent = value.downcast::<Latent>().unwrap();
        let mut failures: Vec<String> = compare_tensor(path, latent_tensor(&latent.samples), samples, how)
            .into_iter()
            .collect();
        match (&latent.noise_mask, &expected["noise_mask"]) {
            (None, Json::Null) => {}
            (Some(mask), reference) if !reference.is_null() => failures.extend(compare_tensor(
                &format!("{path}.noise_mask"),
                tensor_of(&Value::object(mask.clone())),
                reference,
                how,
            )),
            (ours, _) => failures.push(format!("{path}: noise mask {}", ours.is_some())),
        }
        let indices = latent
            .batch_index
            .as_ref()
            .map(|b| b.iter().map(|&i| json!(i)).collect::<Vec<_>>());
        let expected_indices = expected["batch_index"].as_array().cloned();
        if indices != expected_indices {
            failures.push(format!(
                "{path}: batch_index {indices:?}, expected {expected_indices:?}"
            ));
        }
        return failures;
    }
    compare_tensor(path, tensor_of(value), expected, how)
        .into_iter()
        .collect()
}

/// Guidance functions here never call the model again.
struct NoModel;

impl GuidanceModel for NoModel {
    fn predict_side(&self, _: Side, _: &Tensor, _: f32, _: &CallPatches) -> candle_core::Result<Tensor> {
        unreachable!("latent operations do not call the model")
    }

    fn predict_conditioning(&self, _: &Conditioning, _: &Tensor, _: f32) -> candle_core::Result<Tensor> {
        unreachable!("latent operations do not call the model")
    }
}

/// LatentApplyOperationCFG's pre-CFG function on `[cond, uncond]`: the guided prediction.
fn guided(inputs: &IndexMap<String, Value>) -> Vec<Value> {
    let latent = |name: &str| inputs[name].downcast::<Latent>().unwrap().samples.clone();
    let operation = *inputs["operation"].downcast::<LatentOperation>().unwrap();
    let patches = ModelPatches::default().with_pre_cfg(Arc::new(GuidanceOperation(operation)));
    let (cond, uncond) = (latent("cond"), latent("uncond"));
    let args = GuidanceArgs {
        x: &cond,
        sigma: 1.0,
        cond_scale: 7.0,
        cond: Side::Positive,
        uncond: Some(Side::Negative),
        model: &NoModel,
    };
    let [out, _] = patches.apply_pre_cfg(&args, [cond.clone(), uncond]).unwrap();
    vec![Value::object(Latent::new(out))]
}

#[test]
fn nodes_match_comfyuis_own() {
    let registry = builtin_registry();
    let services = Services::new();
    let fixture = fixture_json("image_nodes.json");
    let mut failures = Vec::new();
    let cases = fixture["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let class = case["node"].as_str().unwrap();
        let mut inputs = IndexMap::new();
        for (key, spec) in case["inputs"].as_object().unwrap() {
            inputs.insert(key.clone(), build(spec, &registry));
        }
        for (key, value) in case["params"].as_object().unwrap() {
            inputs.insert(key.clone(), j(value.clone()));
        }
        let outputs = if class == "LatentApplyOperationCFG" {
            Ok(guided(&inputs))
        } else {
            let node = registry.get(class).unwrap_or_else(|| panic!("{class} is registered"));
            call_standalone(node.as_ref(), &services, &NodeInputs::new(inputs)).map(|o| o.outputs)
        };
        match (outputs, case.get("error")) {
            (Err(error), Some(expected)) => {
                if error.to_string() != expected.as_str().unwrap() {
                    failures.push(format!("{name}: error {error:?}, expected {expected}"));
                }
            }
            (Err(error), None) => failures.push(format!("{name}: {error}")),
            (Ok(_), Some(expected)) => failures.push(format!("{name}: no error, expected {expected}")),
            (Ok(outputs), None) => {
                let exact = case.get("outputs_ieee").unwrap_or(&case["outputs"]);
                let references = [(exact, Match::Exact), (&case["outputs"], Match::Within(MKL_TOLERANCE))];
                for (reference, how) in references {
                    for (n, expected) in reference.as_array().unwrap().iter().enumerate() {
                        failures.extend(compare(&format!("{name} output {n}"), &outputs[n], expected, how));
                    }
                }
            }
        }
    }
    assert!(cases.len() > 100, "the fixture has its cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn latent_apply_operation_cfg_patches_a_copy_of_the_model() {
    let setup = common::setup();
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
        )
        .unwrap();
    let operation = setup
        .call("LatentOperationTonemapReinhard", vec![("multiplier", j(json!(0.5)))])
        .unwrap();
    let patched = setup
        .call(
            "LatentApplyOperationCFG",
            vec![("model", loaded[0].clone()), ("operation", operation[0].clone())],
        )
        .unwrap();
    let before = loaded[0].downcast::<Model>().unwrap();
    let after = patched[0].downcast::<Model>().unwrap();
    assert_eq!(after.0.patches.pre_cfg.len(), before.0.patches.pre_cfg.len() + 1);
    assert!(before.0.patches.pre_cfg.is_empty(), "the input model keeps its patches");
}
