//! LoraSave against ComfyUI's own extraction (fixture from `fixtures/generate_lora_extract.py`):
//! the clamp and the products of the factors, the file it writes (names, shapes, dtypes, full
//! differences to the bit), and the round trip: a LoRA extracted from ModelMergeSubtract(A, B)
//! loaded onto B predicts what A predicts, closer as the rank grows.

mod common;

use candle_core::{Device, Tensor};
use common::{f32_values, fixture_json, j, pattern_values, shape, Setup};
use easel_engine::Value;
use easel_models::architectures::clip_text::ClipTextConfig;
use easel_models::checkpoint::{SD1_CLIP_PREFIX, UNET_PREFIX};
use easel_models::lora_extract::{clamp_factors, extract_lora, quantile, truncated_svd, Matrix, CLAMP_QUANTILE};
use easel_models::testmodels::{sd1_checkpoint_layout, tiny_clip_l, tiny_sd1_unet, tiny_sd_vae, Fill};
use easel_nodes::conditioning::Conditioning;
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

/// The generator's `weight_values(seed, shape)`.
fn weight_values(seed: i64, shape: &[usize]) -> Vec<f32> {
    let count = shape.iter().product();
    let scale = match shape.len() {
        0 | 1 => 0.1,
        _ => (1.0 / (shape[1..].iter().product::<usize>() as f64).sqrt()) as f32,
    };
    pattern_values(count, seed, scale)
}

fn matrix(spec: &Json) -> Matrix {
    let dims = shape(spec);
    Matrix {
        rows: dims[0],
        cols: dims[1],
        values: f32_values(spec),
    }
}

/// `up·down` of two tensors flattened to matrices.
fn product(up: &Tensor, down: &Tensor) -> Vec<f32> {
    let up = up.to_dtype(candle_core::DType::F32).unwrap().flatten_from(1).unwrap();
    let down = down.to_dtype(candle_core::DType::F32).unwrap().flatten_from(1).unwrap();
    common::flat(&up.matmul(&down).unwrap())
}

/// The largest difference of `ours` from `expected`, relative to `expected`'s largest value.
fn relative_error(ours: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(ours.len(), expected.len());
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    ours.iter().zip(expected).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

#[test]
fn extraction_matches_comfyuis_up_to_the_signs_of_the_singular_vectors() {
    let fixture = fixture_json("lora_extract.json");
    for case in fixture["extract"].as_array().unwrap() {
        let dims = shape(case);
        let rank = case["rank"].as_u64().unwrap() as usize;
        let mut diff = weight_values(case["seed"].as_i64().unwrap(), &dims);
        let diagonal = case["diagonal"].as_f64().unwrap() as f32;
        for i in 0..dims[0].min(dims[1]) {
            diff[i * dims[1] + i] += diagonal;
        }
        let label = format!("{dims:?} rank {rank}");

        // The singular values and the truncated reconstruction do not depend on the signs.
        let cols = diff.len() / dims[0];
        let (us, vh, singular) = truncated_svd(
            &Matrix {
                rows: dims[0],
                cols,
                values: diff.clone(),
            },
            rank.min(dims[1]),
        )
        .unwrap();
        let expected_singular = f32_values(&case["singular_values"]);
        assert!(
            relative_error(&singular, &expected_singular) < 1e-5,
            "{label}: singular values"
        );
        let us_tensor = Tensor::from_vec(us.values.clone(), (us.rows, us.cols), &Device::Cpu).unwrap();
        let vh_tensor = Tensor::from_vec(vh.values.clone(), (vh.rows, vh.cols), &Device::Cpu).unwrap();
        let truncated = product(&us_tensor, &vh_tensor);
        assert!(
            relative_error(&truncated, &f32_values(&case["truncated"])) < 1e-5,
            "{label}: truncated reconstruction"
        );

        // The clamp on torch's own factors gives torch's clamped factors, to the bit.
        let (mut up, mut down) = (matrix(&case["us"]), matrix(&case["vh"]));
        let all: Vec<f32> = up.values.iter().chain(&down.values).copied().collect();
        assert_eq!(
            quantile(&all, CLAMP_QUANTILE),
            case["hi"].as_f64().unwrap() as f32,
            "{label}: bound"
        );
        clamp_factors(&mut up, &mut down);
        assert_eq!(up.values, f32_values(&case["up"]), "{label}: clamped up");
        assert_eq!(down.values, f32_values(&case["down"]), "{label}: clamped down");

        // Our factors have torch's shapes, and are torch's with the signs of the singular-vector
        // pairs ours have, clamped: each pair of torch's flipped to ours, then the clamp.
        let (up, down) = extract_lora(&Tensor::from_vec(diff, dims.as_slice(), &Device::Cpu).unwrap(), rank).unwrap();
        assert_eq!(up.dims(), shape(&case["up"]).as_slice(), "{label}");
        assert_eq!(down.dims(), shape(&case["down"]).as_slice(), "{label}");
        let (mut torch_us, mut torch_vh) = (matrix(&case["us"]), matrix(&case["vh"]));
        for pair in 0..torch_vh.rows {
            let row = pair * torch_vh.cols..(pair + 1) * torch_vh.cols;
            let dot: f32 = torch_vh.values[row.clone()]
                .iter()
                .zip(&vh.values[row.clone()])
                .map(|(a, b)| a * b)
                .sum();
            if dot < 0.0 {
                torch_vh.values[row].iter_mut().for_each(|value| *value = -*value);
                for i in 0..torch_us.rows {
                    torch_us.values[i * torch_us.cols + pair] *= -1.0;
                }
            }
        }
        clamp_factors(&mut torch_us, &mut torch_vh);
        let up_error = relative_error(&common::flat(&up), &torch_us.values);
        let down_error = relative_error(&common::flat(&down), &torch_vh.values);
        assert!(
            up_error < 1e-4 && down_error < 1e-4,
            "{label}: factors off by {up_error}, {down_error}"
        );
    }
}

/// ‖ours − expected‖ / ‖expected‖.
fn frobenius_error(ours: &[f32], expected: &[f32]) -> f32 {
    let norm = |values: &mut dyn Iterator<Item = f32>| values.map(|v| v * v).sum::<f32>().sqrt();
    norm(&mut ours.iter().zip(expected).map(|(a, b)| a - b)) / norm(&mut expected.iter().copied())
}

/// The tiny SD1 checkpoint's layout (its CLIP with a 300-token vocabulary, as the fixture's),
/// every UNet and CLIP tensor filled as the generator fills model `index` (0 = A, 1 = B), in f32.
fn write_formula_checkpoint(path: &std::path::Path, fixture: &Json, index: usize) {
    let vocab_size = fixture["clip_vocab_size"].as_u64().unwrap() as usize;
    let clip = ClipTextConfig {
        vocab_size,
        ..tiny_clip_l()
    };
    let mut layout = sd1_checkpoint_layout(&tiny_sd1_unet(), &clip, &tiny_sd_vae()).unwrap();
    layout.sort_by(|a, b| a.name.cmp(&b.name));
    let unet_seed = fixture["unet_seeds"][index].as_i64().unwrap();
    let clip_seed = fixture["clip_seeds"][index].as_i64().unwrap();
    let (mut unet_index, mut clip_index, mut other_index) = (0, 0, 0);
    let mut buffers = Vec::new();
    for spec in &layout {
        if spec.fill == Fill::Arange {
            let bytes: Vec<u8> = (0..spec.shape.iter().product::<usize>() as i64)
                .flat_map(i64::to_le_bytes)
                .collect();
            buffers.push((spec.name.clone(), safetensors::Dtype::I64, spec.shape.clone(), bytes));
            continue;
        }
        let seed = if spec.name.starts_with(UNET_PREFIX) {
            unet_index += 1;
            unet_seed + unet_index - 1
        } else if spec.name.starts_with(SD1_CLIP_PREFIX) {
            clip_index += 1;
            clip_seed + clip_index - 1
        } else {
            other_index += 1;
            2000 + other_index
        };
        let bytes = weight_values(seed, &spec.shape)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        buffers.push((spec.name.clone(), safetensors::Dtype::F32, spec.shape.clone(), bytes));
    }
    let views = buffers.iter().map(|(name, dtype, shape, bytes)| {
        (
            name.as_str(),
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Models A and B (MODEL, CLIP) loaded from formula-filled checkpoints.
fn models_a_and_b(setup: &Setup, fixture: &Json) -> [Vec<Value>; 2] {
    let paths = setup.services.get::<Paths>().unwrap();
    let folder = paths.models.join("checkpoints");
    [0, 1].map(|index| {
        let name = format!("formula_{index}.safetensors");
        write_formula_checkpoint(&folder.join(&name), fixture, index);
        setup
            .call("CheckpointLoaderSimple", vec![("ckpt_name", j(json!(name)))])
            .unwrap()
    })
}

fn subtract(setup: &Setup, class: &str, inputs: [(&str, Value); 2], multiplier: f64) -> Value {
    let [first, second] = inputs;
    setup
        .call(class, vec![first, second, ("multiplier", j(json!(multiplier)))])
        .unwrap()
        .remove(0)
}

/// Runs LoraSave; the written file's path under the output folder is `file`.
fn lora_save(setup: &Setup, inputs: &Json, model: Option<Value>, clip: Option<Value>) {
    let mut call = vec![
        ("filename_prefix", j(inputs["filename_prefix"].clone())),
        ("rank", j(inputs["rank"].clone())),
        ("lora_type", j(inputs["lora_type"].clone())),
        ("bias_diff", j(inputs["bias_diff"].clone())),
    ];
    if let Some(model) = model {
        call.push(("model_diff", model));
    }
    if let Some(clip) = clip {
        call.push(("text_encoder_diff", clip));
    }
    assert!(setup.call("LoraSave", call).unwrap().is_empty());
}

#[test]
fn lora_save_writes_comfyuis_file() {
    let fixture = fixture_json("lora_extract.json");
    let setup = common::setup();
    let [a, b] = models_a_and_b(&setup, &fixture);
    let output = setup.services.get::<Paths>().unwrap().output.clone();
    for save in fixture["saves"].as_array().unwrap() {
        let inputs = &save["inputs"];
        let multiplier = inputs["multiplier"].as_f64().unwrap();
        let model = inputs["model_diff"].as_bool().unwrap().then(|| {
            subtract(
                &setup,
                "ModelMergeSubtract",
                [("model1", a[0].clone()), ("model2", b[0].clone())],
                multiplier,
            )
        });
        let clip = inputs["text_encoder_diff"].as_bool().unwrap().then(|| {
            subtract(
                &setup,
                "CLIPMergeSubtract",
                [("clip1", a[1].clone()), ("clip2", b[1].clone())],
                multiplier,
            )
        });
        lora_save(&setup, inputs, model, clip);
        let file = save["file"].as_str().unwrap();
        let bytes = std::fs::read(output.join(file)).unwrap_or_else(|_| panic!("{file} written"));
        let written = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert!(
            save["metadata"].is_null() && header.metadata().is_none(),
            "{file}: no metadata"
        );

        // ComfyUI also writes the SD1 CLIP's text projection, which SD1 checkpoints lack (its
        // uninitialised weights; the identity in the fixture's models, a zero difference).
        let expected: Vec<&Json> = save["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|entry| !entry["name"].as_str().unwrap().contains(".text_projection."))
            .collect();
        let mut names: Vec<&str> = written.names();
        names.sort();
        let expected_names: Vec<&str> = expected.iter().map(|entry| entry["name"].as_str().unwrap()).collect();
        assert_eq!(names, expected_names, "{file}: tensor names");
        for entry in expected {
            let name = entry["name"].as_str().unwrap();
            let tensor = written.tensor(name).unwrap();
            assert_eq!(tensor.shape(), shape(entry).as_slice(), "{name}");
            assert_eq!(
                format!("{:?}", tensor.dtype()),
                entry["dtype"].as_str().unwrap(),
                "{name}"
            );
            if let Some(hash) = entry["sha256"].as_str() {
                let ours: String = Sha256::digest(tensor.data())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(ours, hash, "{name}: the full difference differs from ComfyUI's");
            }
        }
        if !inputs["text_encoder_diff"].as_bool().unwrap() {
            let ours: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            if inputs["lora_type"] == "full_diff" {
                assert_eq!(ours, save["file_sha256"].as_str().unwrap(), "{file}: the whole file");
            }
        }
        let load = |name: String| {
            let view = written.tensor(&name).unwrap();
            let values: Vec<f32> = view
                .data()
                .chunks(2)
                .map(|pair| half::f16::from_le_bytes([pair[0], pair[1]]).to_f32())
                .collect();
            Tensor::from_vec(values, view.shape(), &Device::Cpu).unwrap()
        };
        for (key, expected) in save["products"].as_object().unwrap() {
            let ours = product(
                &load(format!("{key}.lora_up.weight")),
                &load(format!("{key}.lora_down.weight")),
            );
            // The signs of the singular vectors move the clamp bound, so products are close, not
            // equal: flipping one pair of torch's own factors moves the skip connection's by 13%.
            let error = frobenius_error(&ours, &f32_values(expected));
            eprintln!("{file} {key}: up·down off by {error} (Frobenius)");
            assert!(error < 0.2, "{file} {key}: up·down off by {error}");
        }
    }
}

#[test]
fn an_extracted_lora_on_model_b_predicts_what_model_a_predicts() {
    let fixture = fixture_json("lora_extract.json");
    let setup = common::setup();
    let [a, b] = models_a_and_b(&setup, &fixture);
    let (_, positive, negative, latent) = common::sd1_inputs(&setup, 1);
    let sample = |model: &Value| {
        common::flat(&common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 2, 4.0).unwrap())
    };
    let (from_a, from_b) = (sample(&a[0]), sample(&b[0]));
    let difference = subtract(
        &setup,
        "ModelMergeSubtract",
        [("model1", a[0].clone()), ("model2", b[0].clone())],
        1.0,
    );
    let paths = setup.services.get::<Paths>().unwrap();
    let mut errors = Vec::new();
    for (index, (rank, lora_type)) in [(2, "standard"), (16, "standard"), (128, "standard"), (8, "full_diff")]
        .into_iter()
        .enumerate()
    {
        let prefix = format!("round_trip_{index}");
        let inputs = json!({"filename_prefix": prefix, "rank": rank, "lora_type": lora_type, "bias_diff": true});
        lora_save(&setup, &inputs, Some(difference.clone()), None);
        let name = format!("{prefix}_00001_.safetensors");
        std::fs::copy(paths.output.join(&name), paths.models.join("loras").join(&name)).unwrap();
        let patched = setup
            .call(
                "LoraLoaderModelOnly",
                vec![
                    ("model", b[0].clone()),
                    ("lora_name", j(json!(name))),
                    ("strength_model", j(json!(1.0))),
                ],
            )
            .unwrap()
            .remove(0);
        errors.push(relative_error(&sample(&patched), &from_a));
    }
    let apart = relative_error(&from_b, &from_a);
    eprintln!("A vs B {apart}; B + LoRA vs A at rank 2, 16, full, full_diff: {errors:?}");
    // ComfyUI's clamp (the 0.99 quantile of U·S and Vᵀ together) caps the largest factor values
    // at every rank, so a standard LoRA of these weights, whose singular values decay slowly,
    // gets no closer past a few ranks; each moves B towards A.
    for (rank, error) in [2, 16, 128].iter().zip(&errors) {
        assert!(*error < 0.8 * apart, "rank {rank}: {error} vs {apart} apart");
    }
    assert!(
        errors[3] < 1e-3 * apart.max(1.0),
        "full difference: within float16 rounding"
    );
}

/// A text-encoder LoRA LoraSave writes (ComfyUI's generic `text_encoders.clip_l.transformer.…`
/// keys) loads with LoraLoader: on CLIP B, the full difference encodes as CLIP A does.
#[test]
fn an_extracted_text_encoder_lora_on_clip_b_encodes_as_clip_a() {
    let fixture = fixture_json("lora_extract.json");
    let setup = common::setup();
    let [a, b] = models_a_and_b(&setup, &fixture);
    let encode = |clip: &Value| {
        let out = setup
            .call(
                "CLIPTextEncode",
                vec![("text", j(json!("a fox"))), ("clip", clip.clone())],
            )
            .unwrap();
        common::flat(&out[0].downcast::<Conditioning>().unwrap().0[0].cross_attention)
    };
    let (from_a, from_b) = (encode(&a[1]), encode(&b[1]));
    let difference = subtract(
        &setup,
        "CLIPMergeSubtract",
        [("clip1", a[1].clone()), ("clip2", b[1].clone())],
        1.0,
    );
    let inputs = json!({"filename_prefix": "clip_round_trip", "rank": 8, "lora_type": "full_diff", "bias_diff": true});
    lora_save(&setup, &inputs, None, Some(difference));
    let paths = setup.services.get::<Paths>().unwrap();
    let name = "clip_round_trip_00001_.safetensors";
    std::fs::copy(paths.output.join(name), paths.models.join("loras").join(name)).unwrap();
    let patched = setup
        .call(
            "LoraLoader",
            vec![
                ("model", b[0].clone()),
                ("clip", b[1].clone()),
                ("lora_name", j(json!(name))),
                ("strength_model", j(json!(0.0))),
                ("strength_clip", j(json!(1.0))),
            ],
        )
        .unwrap();
    let error = relative_error(&encode(&patched[1]), &from_a);
    let apart = relative_error(&from_b, &from_a);
    assert!(
        error < 1e-3 * apart.max(1.0),
        "B + text-encoder LoRA vs A: {error} ({apart} apart)"
    );
}
