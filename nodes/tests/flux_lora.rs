//! LoRA on the tiny FLUX model: the same weight changes written in kohya's, diffusers' and
//! XLabs' namings patch the same weights by the same amounts (diffusers' separate query, key and
//! value and the single blocks' MLP input onto rows of BFL's fused matrices, its final
//! modulation's halves swapped back), the patch is `W + alpha/rank·up·down` rounded to the
//! file's bf16, and LoraLoaderModelOnly steers the model alike from each file, stacked, and on
//! GGUF weights kept quantized (the update added to the products) as on the same weights
//! dequantized with the LoRA merged in.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use common::{flat, flux_velocity, j, setup, tiny_flux_model, Setup};
use easel_engine::Value;
use easel_models::architectures::flux::ReferenceMethod;
use easel_models::formats::gguf::GgufFile;
use easel_models::kernels::sgemm::Elements;
use easel_models::lora::{load_lora, LoraKeyMap, WeightPatches};
use easel_models::testmodels::{
    self, TINY_FLUX_CONTROL_LORA, TINY_FLUX_DEV, TINY_FLUX_DEV_Q8_0, TINY_FLUX_LORA_DIFFUSERS, TINY_FLUX_LORA_KOHYA,
    TINY_FLUX_LORA_LAYERS, TINY_FLUX_LORA_XLABS, TINY_LORA_ALPHA, TINY_LORA_RANK,
};
use easel_models::weights::{MappedWeights, SafetensorsFile, TensorShapes, Weights};
use easel_nodes::model::diffusion_model::{DiffusionNetwork, Model};
use easel_nodes::paths::Paths;
use serde_json::json;

#[test]
fn every_flux_lora_naming_patches_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    testmodels::write_test_models(dir.path()).unwrap();
    let model = Arc::new(SafetensorsFile::open(&dir.path().join("diffusion_models").join(TINY_FLUX_DEV)).unwrap());
    let mut keys = LoraKeyMap::default();
    keys.add_flux(model.as_ref(), "", &testmodels::tiny_flux());
    let strength = 0.8f32;
    let patched = |file: &str| {
        let lora = SafetensorsFile::open(&dir.path().join("loras").join(file)).unwrap();
        let loaded = load_lora(&lora, &keys, strength).unwrap();
        let unused: Vec<&str> = lora
            .tensor_names()
            .filter(|name| !loaded.used.contains(*name))
            .collect();
        assert!(unused.is_empty(), "{file}: {unused:?} not loaded");
        let patches = WeightPatches::default().and(loaded.patches);
        let weights = Weights::from_file(model.clone(), DType::F32, &Device::Cpu).with_patches(patches);
        (lora, weights)
    };
    let (kohya_file, kohya) = patched(TINY_FLUX_LORA_KOHYA);
    let (_, diffusers) = patched(TINY_FLUX_LORA_DIFFUSERS);
    let (_, xlabs) = patched(TINY_FLUX_LORA_XLABS);
    let scale = strength * TINY_LORA_ALPHA / TINY_LORA_RANK as f32;
    for (layer, in_xlabs) in TINY_FLUX_LORA_LAYERS {
        let name = format!("{layer}.weight");
        let shape = model.shape(&name).unwrap().to_vec();
        let matrix = |weights: &Weights| flat(&weights.matrix(shape.as_slice(), &name).unwrap().tensor().unwrap());
        let from_kohya = matrix(&kohya);
        assert_close(&matrix(&diffusers), &from_kohya, &format!("{layer}: diffusers' names"));
        if in_xlabs {
            assert_close(&matrix(&xlabs), &from_kohya, &format!("{layer}: XLabs' names"));
        } else {
            let base = flat(&model.load(&name, DType::F32, &Device::Cpu).unwrap());
            assert!(matrix(&xlabs) == base, "{layer}: XLabs' file leaves it alone");
        }
        // W + strength·alpha/rank·up·down, rounded to the file's bf16.
        let stem = format!("lora_unet_{}", layer.replace('.', "_"));
        let load = |suffix: &str| {
            flat(
                &kohya_file
                    .load(&format!("{stem}.{suffix}"), DType::F32, &Device::Cpu)
                    .unwrap(),
            )
        };
        let (up, down) = (load("lora_up.weight"), load("lora_down.weight"));
        let base = flat(&model.load(&name, DType::F32, &Device::Cpu).unwrap());
        let cols = shape[1];
        let wanted: Vec<f32> = (0..base.len())
            .map(|index| {
                let (o, i) = (index / cols, index % cols);
                let delta: f32 = (0..TINY_LORA_RANK)
                    .map(|r| up[o * TINY_LORA_RANK + r] * down[r * cols + i])
                    .sum();
                half::bf16::from_f32(base[index] + scale * delta).to_f32()
            })
            .collect();
        assert_close(&from_kohya, &wanted, layer);
        assert!(from_kohya != base, "{layer} changed nothing");
    }
}

/// `got` equals `wanted` but for sums that round to a neighbouring bf16 (the patch's products
/// are added in another order on the fast path).
fn assert_close(got: &[f32], wanted: &[f32], what: &str) {
    assert_eq!(got.len(), wanted.len(), "{what}");
    let off = got
        .iter()
        .zip(wanted)
        .filter(|(a, b)| (*a - *b).abs() > b.abs() * 1e-2 + 1e-6)
        .count();
    assert_eq!(off, 0, "{what}: {off} of {} values differ", got.len());
}

/// The FLUX model's velocity for a fixed input, as values.
fn velocity(model: &Value) -> Vec<f32> {
    flat(&flux_velocity(model, &[], ReferenceMethod::default()))
}

fn with_lora(setup: &Setup, model: &Value, lora: &str, strength: f64) -> Value {
    setup
        .call(
            "LoraLoaderModelOnly",
            vec![
                ("model", model.clone()),
                ("lora_name", j(json!(lora))),
                ("strength_model", j(json!(strength))),
            ],
        )
        .expect("a LoRA on FLUX")
        .remove(0)
}

#[test]
fn flux_loras_steer_the_model_through_the_nodes_on_safetensors_and_gguf() {
    let setup = setup();
    let model = tiny_flux_model(&setup);
    let plain = velocity(&model);
    let kohya = velocity(&with_lora(&setup, &model, TINY_FLUX_LORA_KOHYA, 0.8));
    let diffusers = velocity(&with_lora(&setup, &model, TINY_FLUX_LORA_DIFFUSERS, 0.8));
    assert!(kohya != plain, "the LoRA changes the velocity");
    let worst = kohya
        .iter()
        .zip(&diffusers)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "the same LoRA in two namings: velocities differ by {worst}"
    );
    // Stacked: the XLabs file after the kohya one.
    let kohya_model = with_lora(&setup, &model, TINY_FLUX_LORA_KOHYA, 0.8);
    let stacked = velocity(&with_lora(&setup, &kohya_model, TINY_FLUX_LORA_XLABS, 1.0));
    assert!(stacked != kohya, "the second LoRA adds to the first");

    // On GGUF weights (kept quantized, the LoRA's update added to the products) the velocity
    // equals that of the same weights dequantized to f32 with the LoRA merged into them.
    let gguf = setup
        .call("UnetLoaderGGUF", vec![("unet_name", j(json!(TINY_FLUX_DEV_Q8_0)))])
        .expect("the Q8_0 FLUX")
        .remove(0);
    let models = &setup.services.get::<Paths>().expect("paths").models;
    write_dequantized(
        &models.join("unet").join(TINY_FLUX_DEV_Q8_0),
        &models.join("diffusion_models").join(DEQUANTIZED),
    );
    let dense = setup
        .call(
            "UNETLoader",
            vec![
                ("unet_name", j(json!(DEQUANTIZED))),
                ("weight_dtype", j(json!("default"))),
            ],
        )
        .expect("the dequantized FLUX")
        .remove(0);
    let gguf_kohya = velocity(&with_lora(&setup, &gguf, TINY_FLUX_LORA_KOHYA, 0.8));
    let dense_kohya = velocity(&with_lora(&setup, &dense, TINY_FLUX_LORA_KOHYA, 0.8));
    let worst = gguf_kohya
        .iter()
        .zip(&dense_kohya)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "GGUF with the LoRA differs from its dense twin by {worst}"
    );
    assert!(gguf_kohya != velocity(&gguf), "the LoRA changes the GGUF model");
    let patched = gguf_kohya_matrix(&with_lora(&setup, &gguf, TINY_FLUX_LORA_KOHYA, 0.8));
    assert!(patched, "the patched GGUF matrix stays quantized in place");
}

/// The dequantized copy of the GGUF FLUX, in `diffusion_models`.
const DEQUANTIZED: &str = "easel_tiny_flux_dev_dequantized.safetensors";

/// Every tensor of the GGUF file at `from`, dequantized, as f32 safetensors at `to`.
fn write_dequantized(from: &std::path::Path, to: &std::path::Path) {
    let gguf = GgufFile::open(from).expect("the GGUF file");
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = gguf
        .tensor_names()
        .map(|name| {
            let tensor = gguf.load(name, DType::F32, &Device::Cpu).expect("a tensor");
            let bytes = flat(&tensor).iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_string(), tensor.dims().to_vec(), bytes)
        })
        .collect();
    let views = tensors.iter().map(|(name, shape, bytes)| {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).expect("a view");
        (name.as_str(), view)
    });
    safetensors::serialize_to_file(views, None, to).expect("written");
}

/// Whether the model's first patched matrix (the image attention's qkv) is read from the
/// quantized file, with the LoRA as low-rank updates.
fn gguf_kohya_matrix(model: &Value) -> bool {
    let model = model.downcast::<Model>().unwrap();
    let weights = model.0.source.weights();
    let matrix = weights
        .matrix((768, 256), "double_blocks.0.img_attn.qkv.weight")
        .expect("the matrix");
    matrix.low_rank().len() == 1
        && matrix
            .with_base_elements(|elements| matches!(elements, Elements::Ggml(..)))
            .expect("elements")
            == Some(true)
}

/// A control LoRA in BFL's format (flux1-depth-dev-lora's) widens the input layer: the model
/// takes 128 channels, `img_in` is the base zero-padded plus the LoRA's difference (its bias
/// moved by `lora_B.bias`), and the single block's norm scales are the LoRA's own.
#[test]
fn a_bfl_control_lora_widens_the_input_layer_and_sets_the_norms() {
    let setup = setup();
    let model = tiny_flux_model(&setup);
    let controlled = with_lora(&setup, &model, TINY_FLUX_CONTROL_LORA, 1.0);
    let controlled = controlled.downcast::<Model>().unwrap();
    let DiffusionNetwork::Flux(flux) = &controlled.0.network else {
        panic!("a FLUX model");
    };
    assert_eq!(flux.config().in_channels, 128);
    let models = &setup.services.get::<Paths>().expect("paths").models;
    let lora = SafetensorsFile::open(&models.join("loras").join(TINY_FLUX_CONTROL_LORA)).unwrap();
    let base = SafetensorsFile::open(&models.join("diffusion_models").join(TINY_FLUX_DEV)).unwrap();
    let load = |file: &SafetensorsFile, name: &str| flat(&file.load(name, DType::F32, &Device::Cpu).unwrap());
    let weights = controlled.0.source.weights();
    let (hidden, inputs) = (256, 128);
    let patched = flat(
        &weights
            .matrix((hidden, inputs), "img_in.weight")
            .unwrap()
            .tensor()
            .unwrap(),
    );
    let (original, up, down) = (
        load(&base, "img_in.weight"),
        load(&lora, "img_in.lora_B.weight"),
        load(&lora, "img_in.lora_A.weight"),
    );
    let wanted: Vec<f32> = (0..hidden * inputs)
        .map(|index| {
            let (o, i) = (index / inputs, index % inputs);
            let base = if i < 64 { original[o * 64 + i] } else { 0.0 };
            let delta: f32 = (0..TINY_LORA_RANK)
                .map(|r| up[o * TINY_LORA_RANK + r] * down[r * inputs + i])
                .sum();
            half::bf16::from_f32(base + delta).to_f32()
        })
        .collect();
    assert_close(&patched, &wanted, "img_in.weight");
    let bias = flat(&weights.get(hidden, "img_in.bias").unwrap());
    let bias_wanted: Vec<f32> = load(&base, "img_in.bias")
        .iter()
        .zip(load(&lora, "img_in.lora_B.bias"))
        .map(|(b, d)| half::bf16::from_f32(b + d).to_f32())
        .collect();
    assert_close(&bias, &bias_wanted, "img_in.bias");
    let scale = flat(&weights.get(128, "single_blocks.0.norm.key_norm.scale").unwrap());
    assert_eq!(
        scale,
        load(&lora, "single_blocks.0.norm.key_norm.scale"),
        "the key norm's scale is set"
    );
}
