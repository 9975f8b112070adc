//! Parity with ComfyUI on the full-size random SD1.5 checkpoint of the reference run: the
//! checkpoint is rebuilt from its layout with the same fill (its sha256 is printed beside the
//! reference file's: they differ, although every stage matches ComfyUI's values), then
//! `workflow_sd15_t2i.json` runs through the engine and its image must match ComfyUI's PNG
//! within 2/255 per channel. The intermediate tensors are compared on the way, so a failure
//! says which stage drifted.
//!
//! Needs about 2.2 GB of disk and several minutes, so it is ignored by default:
//! `cargo test --release -p easel-nodes --test sd15_parity -- --ignored --nocapture`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use common::fixture_json;
use easel_engine::{
    call_standalone, validate_prompt, CacheMode, ExecutionStatus, Executor, Interrupt, NodeInputs, Prompt, Services,
    Value,
};
use easel_models::testmodels::{write_checkpoint, Fill, TensorSpec};
use easel_nodes::builtin_registry;
use easel_nodes::conditioning::Conditioning;
use easel_nodes::latent::Latent;
use easel_nodes::model_cache::ModelCache;
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

const CHECKPOINT_SHA256: &str = "a92fdf0e1c70f4f0daadcf980ca96b9a0f0f7f9eefe2a85de91eb52cdeb3329a";

fn reference_checkpoint() -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sd15_random.safetensors");
    if path.exists() {
        return path;
    }
    let layout = fixture_json("sd15_random_layout.json");
    let specs: Vec<TensorSpec> = layout["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| TensorSpec {
            name: t[0].as_str().unwrap().to_string(),
            shape: serde_json::from_value(t[1].clone()).unwrap(),
            fill: match t[2].as_str().unwrap() {
                "zeros" => Fill::Zeros,
                "ones" => Fill::Ones,
                "arange" => Fill::Arange,
                _ => Fill::Random,
            },
        })
        .collect();
    let partial = path.with_extension("partial");
    write_checkpoint(&partial, &specs).unwrap();
    let digest: String = Sha256::digest(std::fs::read(&partial).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    eprintln!("rebuilt checkpoint sha256 {digest} (reference {CHECKPOINT_SHA256})");
    std::fs::rename(&partial, &path).unwrap();
    path
}

fn max_difference(ours: &[f32], reference: &Json) -> f32 {
    let reference: Vec<f32> = serde_json::from_value::<Vec<f64>>(reference.clone())
        .unwrap()
        .into_iter()
        .map(|v| v as f32)
        .collect();
    ours.iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn flat(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
#[ignore = "builds a 2.1 GB checkpoint; run on demand"]
fn workflow_sd15_t2i_reproduces_comfyui() {
    let checkpoint = reference_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path()).finish();
    paths.prepare().unwrap();
    let checkpoints = paths.models.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    std::os::unix::fs::symlink(&checkpoint, checkpoints.join("sd15_random.safetensors")).unwrap();
    let output_dir = paths.output.clone();
    let mut services = Services::new();
    services.insert(paths);
    services.insert(ModelCache::new(u64::MAX));
    let services = Arc::new(services);
    let registry = Arc::new(builtin_registry());

    let intermediates = fixture_json("sd15_intermediates.json");
    let workflow = fixture_json("workflow_sd15_t2i.json");
    let validated = validate_prompt(&registry, &services, Prompt::from_json(workflow).unwrap(), None).expect("valid");
    let mut executor = Executor::new(registry.clone(), services.clone(), CacheMode::Classic);
    let started = std::time::Instant::now();
    let outcome = executor.execute("parity", &validated, &Json::Null, &|_| {}, &Interrupt::new());
    eprintln!(
        "workflow ran in {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        outcome.status
    );
    assert_eq!(outcome.status, ExecutionStatus::Success, "{:?}", outcome.messages);

    // The same nodes called one by one (the checkpoint comes from the model cache), to see
    // which stage drifts if the image does.
    let call = |class: &str, inputs: Vec<(&str, Value)>| -> Vec<Value> {
        let inputs = NodeInputs::new(inputs.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        let node = registry.get(class).unwrap();
        call_standalone(node.as_ref(), &services, &inputs).unwrap().outputs
    };
    let loaded = call(
        "CheckpointLoaderSimple",
        vec![("ckpt_name", Value::Json(json!("sd15_random.safetensors")))],
    );
    let encode = |text: &str| {
        call(
            "CLIPTextEncode",
            vec![("text", Value::Json(json!(text))), ("clip", loaded[1].clone())],
        )
    };
    let positive = encode("a photograph of an astronaut riding a horse");
    let negative = encode("blurry, low quality");
    for (name, conditioning) in [("positive", &positive), ("negative", &negative)] {
        let entry = conditioning[0].downcast::<Conditioning>().unwrap().0[0].clone();
        let cond = flat(&entry.cross_attention);
        let pooled = flat(entry.pooled.as_ref().unwrap());
        let reference = &intermediates[name];
        eprintln!(
            "{name}: cond first16 Δ {:.2e}, last16 Δ {:.2e}, pooled first16 Δ {:.2e}",
            max_difference(&cond[..16], &reference["cond"]["first_16"]),
            max_difference(&cond[cond.len() - 16..], &reference["cond"]["last_16"]),
            max_difference(&pooled[..16], &reference["pooled_output"]["first_16"]),
        );
    }
    let empty = call(
        "EmptyLatentImage",
        vec![
            ("width", Value::Json(json!(64))),
            ("height", Value::Json(json!(64))),
            ("batch_size", Value::Json(json!(1))),
        ],
    );
    let sampled = call(
        "KSampler",
        vec![
            ("model", loaded[0].clone()),
            ("seed", Value::Json(json!(42))),
            ("steps", Value::Json(json!(4))),
            ("cfg", Value::Json(json!(7.0))),
            ("sampler_name", Value::Json(json!("euler"))),
            ("scheduler", Value::Json(json!("normal"))),
            ("positive", positive[0].clone()),
            ("negative", negative[0].clone()),
            ("latent_image", empty[0].clone()),
            ("denoise", Value::Json(json!(1.0))),
        ],
    );
    let latent = sampled[0].downcast::<Latent>().unwrap().samples.clone();
    let latent_difference = max_difference(&flat(&latent), &intermediates["ksampler_output_latent"]["values"]);
    eprintln!("sampled latent: max |Δ| {latent_difference:.3e} (values up to ~250)");

    let saved = std::fs::read_dir(&output_dir).unwrap().next().unwrap().unwrap().path();
    let ours = image::open(&saved).unwrap().to_rgb8();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd15_t2i_output.png");
    let reference = image::open(path).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), reference.dimensions());
    let worst = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    eprintln!("image: max per-channel difference {worst}/255");
    assert!(worst <= 2, "image differs by up to {worst}/255");
}
