//! Helpers shared by the node tests: reading the reference fixtures, comparing tensors.
#![allow(dead_code)]

pub mod reference;

use std::sync::Arc;

use base64::Engine;
use candle_core::Tensor;
use easel_engine::{call_standalone, NodeInputs, NodeRegistry, Services, Value};
use easel_models::testmodels::write_test_models;
use easel_models::testmodels::TINY_SD1_CHECKPOINT;
use easel_nodes::builtin_registry;
use easel_nodes::latent::Latent;
use easel_nodes::paths::Paths;
use serde_json::json;
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

/// `pattern_values(count, seed, scale)` of `comfy_reference.py`:
/// `((i·7919 + seed·104729) mod 2001 − 1000) / 1000 · scale`, float32.
pub fn pattern_values(count: usize, seed: i64, scale: f32) -> Vec<f32> {
    (0..count as i64)
        .map(|i| (((i * 7919 + seed * 104729) % 2001) - 1000) as f32 / 1000.0 * scale)
        .collect()
}

/// [`pattern_values`] shaped as a tensor.
pub fn pattern(shape: &[usize], seed: i64, scale: f32) -> Tensor {
    Tensor::from_vec(
        pattern_values(shape.iter().product(), seed, scale),
        shape,
        &candle_core::Device::Cpu,
    )
    .expect("pattern tensor")
}

/// An RGB image of `height × width` whose values are the pattern's mapped into 0..1 (a hint
/// for control models).
pub fn pattern_image(height: usize, width: usize, seed: i64) -> easel_nodes::image::Image {
    let data = pattern_values(height * width * 3, seed, 0.5)
        .iter()
        .map(|v| v + 0.5)
        .collect();
    easel_nodes::image::Image::new(1, height, width, 3, data).expect("an image")
}

/// `got` has the shape and, within 2e-5 of the largest value (or of 1), the values of a
/// fixture's `{"shape", "values"}`.
pub fn assert_matches_fixture(name: &str, got: &Tensor, expected: &Json) {
    assert_eq!(got.dims(), sizes(&expected["shape"]).as_slice(), "{name}: shape");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let expected = floats(&expected["values"]);
    let scale = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 2e-5 * scale,
        "{name}: differs by {worst} (values up to {scale})"
    );
}

/// A fixture's list of sizes.
pub fn sizes(value: &Json) -> Vec<usize> {
    value
        .as_array()
        .expect("a list of sizes")
        .iter()
        .map(|v| v.as_u64().expect("a size") as usize)
        .collect()
}

/// A fixture's list of numbers, as f32.
pub fn floats(value: &Json) -> Vec<f32> {
    value
        .as_array()
        .expect("a list of numbers")
        .iter()
        .map(|v| v.as_f64().expect("a number") as f32)
        .collect()
}

/// The safetensors bytes of the tiny UNet a fixture of `generate_unet_patches.py`'s kind
/// describes (its `weights`: names and shapes), filled by the generators' weight formula:
/// `pattern_values(count, index + 11, scale)`, matrices and kernels scaled by 1/√fan-in,
/// vectors by 0.1, norm weights (vectors named `.weight`) around 1; a weight listed with a
/// `value` is filled with it.
pub fn formula_unet_file(fixture: &Json) -> Vec<u8> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (index, weight) in fixture["weights"].as_array().expect("weights").iter().enumerate() {
        let name = weight["name"].as_str().expect("a name").to_string();
        let shape = sizes(&weight["shape"]);
        let count: usize = shape.iter().product();
        let seed = index as i64 + 11;
        let mut values = if let Some(value) = weight["value"].as_f64() {
            vec![value as f32; count]
        } else if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            pattern_values(count, seed, (1.0 / (fan_in as f64).sqrt()) as f32)
        } else {
            pattern_values(count, seed, 0.1f64 as f32)
        };
        if shape.len() == 1 && name.ends_with(".weight") {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        tensors.push((name, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views = tensors.iter().map(|(name, shape, bytes)| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).expect("tensor view");
        (name.clone(), view)
    });
    safetensors::tensor::serialize(views, None).expect("safetensors bytes")
}

/// The fixture's tiny UNet ([`formula_unet_file`]) loaded through the loader's code; the
/// directory holding its file lives as long as the first value.
pub fn fixture_unet(fixture: &Json) -> (tempfile::TempDir, easel_models::architectures::unet::UNet) {
    use easel_models::architectures::unet::{HeadLayout, UNet, UNetConfig};
    use easel_models::weights::{SafetensorsFile, Weights};
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("unet.safetensors");
    std::fs::write(&path, formula_unet_file(fixture)).expect("UNet written");
    let file = Arc::new(SafetensorsFile::open(&path).expect("UNet file"));
    let config = UNetConfig::infer(file.as_ref(), "", HeadLayout::Count(8)).expect("UNet config");
    let unet = UNet::new(
        config,
        Weights::from_file(file, candle_core::DType::F32, &candle_core::Device::Cpu),
    )
    .expect("UNet");
    (dir, unet)
}

/// The float32 `latent_tensor` of a SaveLatent file `name` in the output folder: its shape and
/// values.
pub fn saved_latent(setup: &Setup, name: &str) -> (Vec<usize>, Vec<f32>) {
    let output = &setup.services.get::<Paths>().expect("paths").output;
    let bytes = std::fs::read(output.join(name)).expect("saved latent");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let tensor = file.tensor("latent_tensor").expect("latent_tensor");
    assert_eq!(tensor.dtype(), safetensors::Dtype::F32);
    let values = tensor
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (tensor.shape().to_vec(), values)
}

/// The tiny FLUX dev model through UNETLoader.
pub fn tiny_flux_model(setup: &Setup) -> Value {
    setup
        .call(
            "UNETLoader",
            vec![
                ("unet_name", j(json!(easel_models::testmodels::TINY_FLUX_DEV))),
                ("weight_dtype", j(json!("default"))),
            ],
        )
        .expect("tiny FLUX model")
        .remove(0)
}

/// A FLUX model's velocity for a fixed 8×8 latent, text and pooled vector (σ 0.6, guidance
/// 2.5), with `references` (Kontext's) placed by `method`.
pub fn flux_velocity(
    model: &Value,
    references: &[Tensor],
    method: easel_models::architectures::flux::ReferenceMethod,
) -> Tensor {
    use easel_models::architectures::flux::{FluxControl, FluxInput};
    let model = model.downcast::<easel_nodes::model::diffusion_model::Model>().unwrap();
    let easel_nodes::model::diffusion_model::DiffusionNetwork::Flux(flux) = &model.0.network else {
        panic!("a FLUX model");
    };
    let device = candle_core::Device::Cpu;
    let wave = |count: usize, step: f32| (0..count).map(|i| (i as f32 * step).sin()).collect::<Vec<f32>>();
    let x = Tensor::from_vec(wave(16 * 8 * 8, 0.37), (1, 16, 8, 8), &device).unwrap();
    let context = Tensor::from_vec(wave(5 * 32, 0.11), (1, 5, 32), &device).unwrap();
    let y = Tensor::from_vec(wave(64, 0.23), (1, 64), &device).unwrap();
    flux.forward(&FluxInput {
        x: &x,
        timesteps: &Tensor::new(&[0.6f32], &device).unwrap(),
        context: &context,
        y: &y,
        guidance: Some(&Tensor::new(&[2.5f32], &device).unwrap()),
        concat: None,
        attention_mask: None,
        control: FluxControl::default(),
        image_prompt: None,
        patches: None,
        reference_latents: references,
        reference_method: method,
    })
    .unwrap()
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

/// A models directory with the tiny test models, and the built-in nodes.
pub struct Setup {
    _dir: tempfile::TempDir,
    pub registry: NodeRegistry,
    pub services: Arc<Services>,
}

pub fn setup() -> Setup {
    setup_with(|_| {})
}

/// As [`setup`], with more services added by `configure`.
pub fn setup_with(configure: impl FnOnce(&mut Services)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path()).finish();
    paths.prepare().unwrap();
    write_test_models(&paths.models).unwrap();
    let mut services = Services::new();
    services.insert(paths);
    configure(&mut services);
    Setup {
        _dir: dir,
        registry: builtin_registry(),
        services: Arc::new(services),
    }
}

impl Setup {
    /// Runs node `class` on `inputs` outside a prompt.
    pub fn call(&self, class: &str, inputs: Vec<(&str, Value)>) -> Result<Vec<Value>, easel_engine::NodeError> {
        let inputs = NodeInputs::new(inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        call_standalone(self.registry.get(class).unwrap().as_ref(), &self.services, &inputs).map(|o| o.outputs)
    }
}

/// Validates and runs an API-format prompt with the setup's services (no output cache); returns
/// the events it sent, or the validation error.
pub fn run_prompt(setup: &Setup, prompt: Json) -> Result<Vec<easel_engine::events::Event>, String> {
    use easel_engine::{validate_prompt, CacheMode, Executor, Interrupt, Prompt};
    let registry = Arc::new(builtin_registry());
    let validated = validate_prompt(&registry, &setup.services, Prompt::from_json(prompt).unwrap(), None)
        .map_err(|error| format!("{error:?}"))?;
    let events = std::sync::Mutex::new(Vec::new());
    let sink = |event: easel_engine::events::Event| events.lock().unwrap().push(event);
    Executor::new(registry, setup.services.clone(), CacheMode::None).execute(
        "p",
        &validated,
        &Json::Null,
        &sink,
        &Interrupt::new(),
    );
    Ok(events.into_inner().unwrap())
}

/// A JSON input value.
pub fn j(value: serde_json::Value) -> Value {
    Value::Json(value)
}

/// Every element of a tensor, in order.
pub fn flat(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1().unwrap()
}

/// The setup's models folder `folder` (`models/checkpoints`, say).
pub fn models_folder(setup: &Setup, folder: &str) -> std::path::PathBuf {
    setup.services.get::<Paths>().expect("paths").models.join(folder)
}

/// The float16 and float32 tensors (all the weights) of the tiny model `file` in the setup's
/// models folder `folder`, as f32 values: name, shape, values.
pub fn tiny_model_values(setup: &Setup, folder: &str, file: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(models_folder(setup, folder).join(file)).expect("a tiny model");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    tensors
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                _ => return None,
            };
            Some((name, view.shape().to_vec(), values))
        })
        .collect()
}

/// Writes a `torch.save`-style zip whose pickle would call `os.system("echo")` when Python
/// unpickled it: loaders must refuse it, not run it.
pub fn write_pickle_that_calls_a_function(path: &std::path::Path) {
    let calls_a_function = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.";
    let mut archive = zip::ZipWriter::new(std::fs::File::create(path).expect("created"));
    archive
        .start_file("archive/data.pkl", zip::write::SimpleFileOptions::default())
        .expect("entry");
    std::io::Write::write_all(&mut archive, calls_a_function).expect("pickle");
    archive.finish().expect("archive");
}

/// Copies the safetensors file `source` to `target` with float32 scalars added (as a
/// checkpoint's `edm_vpred.sigma_max`).
pub fn copy_with_scalars(source: &std::path::Path, target: &std::path::Path, scalars: &[(&str, f32)]) {
    let bytes = std::fs::read(source).expect("source file");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let values: Vec<(String, [u8; 4])> = scalars
        .iter()
        .map(|(name, v)| (name.to_string(), v.to_le_bytes()))
        .collect();
    let mut views = file.tensors();
    for (name, value) in &values {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![], value).expect("a scalar");
        views.push((name.clone(), view));
    }
    safetensors::serialize_to_file(views, None, target).expect("written");
}

/// Writes the safetensors file `source` again as `target` with every f16 tensor in `dtype`, each
/// value's bytes appended by `encode` (an fp8 copy of a test model, say); tensors of other dtypes
/// (integer position ids) are copied as they are.
pub fn rewrite_f16_file(
    source: &std::path::Path,
    target: &std::path::Path,
    dtype: safetensors::Dtype,
    encode: impl Fn(f32, &mut Vec<u8>),
) {
    let bytes = std::fs::read(source).expect("source file");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let encoded: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            if view.dtype() != safetensors::Dtype::F16 {
                return (name, view.dtype(), view.shape().to_vec(), view.data().to_vec());
            }
            let mut data = Vec::new();
            for pair in view.data().chunks_exact(2) {
                encode(half::f16::from_le_bytes([pair[0], pair[1]]).to_f32(), &mut data);
            }
            (name, dtype, view.shape().to_vec(), data)
        })
        .collect();
    let views = encoded.iter().map(|(name, dtype, shape, data)| {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).expect("tensor view");
        (name.as_str(), view)
    });
    safetensors::serialize_to_file(views, None, target).expect("written");
}

/// The tiny SD1 checkpoint's loader outputs, two prompts and an empty latent of `batch` 64×64
/// images.
pub fn sd1_inputs(setup: &Setup, batch: u32) -> (Vec<Value>, Value, Value, Value) {
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
        )
        .unwrap();
    let encode = |text: &str| {
        setup
            .call(
                "CLIPTextEncode",
                vec![("text", j(json!(text))), ("clip", loaded[1].clone())],
            )
            .unwrap()
    };
    let positive = encode("a (red:1.2) fox")[0].clone();
    let negative = encode("blurry")[0].clone();
    let latent = empty_latent(setup, 64, 64, batch);
    (loaded, positive, negative, latent)
}

/// EmptyLatentImage of `batch` `width` × `height` images.
pub fn empty_latent(setup: &Setup, width: u32, height: u32, batch: u32) -> Value {
    setup
        .call(
            "EmptyLatentImage",
            vec![
                ("width", j(json!(width))),
                ("height", j(json!(height))),
                ("batch_size", j(json!(batch))),
            ],
        )
        .expect("EmptyLatentImage")
        .remove(0)
}

/// KSampler (seed 7, karras, full denoise) on the given inputs: the sampled latent.
#[allow(clippy::too_many_arguments)]
pub fn ksampler(
    setup: &Setup,
    model: &Value,
    positive: &Value,
    negative: &Value,
    latent: &Value,
    sampler: &str,
    steps: u32,
    cfg: f64,
) -> Result<Tensor, easel_engine::NodeError> {
    ksampler_scheduled(
        setup,
        model,
        [positive, negative],
        latent,
        (sampler, "karras"),
        steps,
        cfg,
    )
}

/// KSampler's one Euler step (seed 7, the `simple` schedule: σ 1 → 0 on a flow model) at
/// `cfg`: the sampled latent.
pub fn one_euler_step(
    setup: &Setup,
    model: &Value,
    positive: &Value,
    negative: &Value,
    latent: &Value,
    cfg: f64,
) -> Tensor {
    ksampler_scheduled(setup, model, [positive, negative], latent, ("euler", "simple"), 1, cfg).unwrap()
}

/// KSampler's two Euler steps (seed 7, the `simple` schedule) at `cfg`, the prompts an apply
/// node gave: the sampled latent.
pub fn two_euler_steps(
    setup: &Setup,
    model: &Value,
    applied: &[Value],
    latent: &Value,
    cfg: f64,
) -> Result<Tensor, easel_engine::NodeError> {
    let [positive, negative] = applied else {
        panic!("an apply node gives a positive and a negative prompt");
    };
    ksampler_scheduled(setup, model, [positive, negative], latent, ("euler", "simple"), 2, cfg)
}

/// KSampler (seed 7, full denoise) with `sampler` on `scheduler`'s sigmas.
fn ksampler_scheduled(
    setup: &Setup,
    model: &Value,
    [positive, negative]: [&Value; 2],
    latent: &Value,
    (sampler, scheduler): (&str, &str),
    steps: u32,
    cfg: f64,
) -> Result<Tensor, easel_engine::NodeError> {
    let out = setup.call(
        "KSampler",
        vec![
            ("model", model.clone()),
            ("seed", j(json!(7))),
            ("steps", j(json!(steps))),
            ("cfg", j(json!(cfg))),
            ("sampler_name", j(json!(sampler))),
            ("scheduler", j(json!(scheduler))),
            ("positive", positive.clone()),
            ("negative", negative.clone()),
            ("latent_image", latent.clone()),
            ("denoise", j(json!(1.0))),
        ],
    )?;
    Ok(out[0].downcast::<Latent>().unwrap().samples.clone())
}

/// An apply node's named inputs.
pub type NodeInputList = Vec<(&'static str, Value)>;

/// What the DiT ControlNet tests apply a ControlNet with: one text entry (3 tokens
/// `context_width` wide and a pooled vector `pooled_width` wide, sine waves) as both prompts,
/// the 32×48 pattern image, `strength` from 0 % to `end`; and an empty 48×32 latent of 16
/// channels.
pub fn dit_control_inputs(
    setup: &Setup,
    control: Value,
    (context_width, pooled_width): (usize, usize),
    (strength, end): (f64, f64),
) -> Result<(NodeInputList, Value), easel_engine::NodeError> {
    use easel_nodes::conditioning::{CondEntry, Conditioning};
    let wave = |count: usize, step: f32| -> Vec<f32> { (0..count).map(|i| (i as f32 * step).sin()).collect() };
    let device = candle_core::Device::Cpu;
    let entry = CondEntry::new(
        Tensor::from_vec(wave(3 * context_width, 0.37), (1, 3, context_width), &device).unwrap(),
        Some(Tensor::from_vec(wave(pooled_width, 0.53), (1, pooled_width), &device).unwrap()),
    );
    let text = Value::object(Conditioning(vec![entry]));
    let latent = setup
        .call(
            "EmptySD3LatentImage",
            vec![
                ("width", j(json!(48))),
                ("height", j(json!(32))),
                ("batch_size", j(json!(1))),
            ],
        )?
        .remove(0);
    let inputs = vec![
        ("positive", text.clone()),
        ("negative", text),
        ("control_net", control),
        ("image", Value::object(pattern_image(32, 48, 5))),
        ("strength", j(json!(strength))),
        ("start_percent", j(json!(0.0))),
        ("end_percent", j(json!(end))),
    ];
    Ok((inputs, latent))
}
