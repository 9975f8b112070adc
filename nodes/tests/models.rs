//! Model files, detection and architectures: the full SD1.5 layout of ComfyUI's reference
//! checkpoint is exactly what our networks read, tiny test models load and run through the same
//! code, bad files are refused cleanly, and prompts tokenise as ComfyUI tokenises them.

use std::collections::HashMap;
use std::sync::Arc;

mod common;

use candle_core::{DType, Device, Tensor};
use easel_models::architectures::clip_text::{ClipTextEncoder, EncodeOptions, OutputLayer};
use easel_models::architectures::unet::{UNet, UNetInput};
use easel_models::architectures::vae::Vae;
use easel_models::checkpoint::{
    detect_checkpoint, detect_layout, DetectError, Family, SD1_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use easel_models::kernels::sgemm::Precision;
use easel_models::testmodels::{self, Fill};
use easel_models::text::tokenizer::{tokenize_with_weights, NoEmbeddings, TokenItem, END_TOKEN};
use easel_models::weights::{MappedWeights, SafetensorsFile, Weights};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture JSON")
}

#[test]
fn the_reference_sd15_layout_is_detected_and_read_exactly() {
    let layout = fixture("sd15_random_layout.json");
    let tensors = layout["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 1131);
    let shapes: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|t| {
            (
                t[0].as_str().unwrap().to_string(),
                serde_json::from_value(t[1].clone()).unwrap(),
            )
        })
        .collect();
    let detected = detect_layout(&shapes).unwrap();
    assert_eq!(detected.family, Family::Sd1);
    assert_eq!(detected.unet, testmodels::sd15_unet());
    let clips: Vec<_> = detected.text_encoders.iter().map(|e| e.config.clone()).collect();
    assert_eq!(clips, vec![testmodels::sd15_clip_l()]);
    assert_eq!(detected.vae, Some(testmodels::sd15_vae()));

    // Every tensor the networks read, with its shape and fill rule, is in the reference file and
    // nothing in the file goes unread.
    let ours: HashMap<String, (Vec<usize>, &str)> = testmodels::sd1_checkpoint_layout(
        &testmodels::sd15_unet(),
        &testmodels::sd15_clip_l(),
        &testmodels::sd15_vae(),
    )
    .unwrap()
    .into_iter()
    .map(|spec| {
        let fill = match spec.fill {
            Fill::Zeros => "zeros",
            Fill::Ones => "ones",
            Fill::Random => "randn*0.02",
            Fill::Arange => "arange",
        };
        (spec.name, (spec.shape, fill))
    })
    .collect();
    let reference: HashMap<String, (Vec<usize>, &str)> = tensors
        .iter()
        .map(|t| {
            let shape = serde_json::from_value(t[1].clone()).unwrap();
            (t[0].as_str().unwrap().to_string(), (shape, t[2].as_str().unwrap()))
        })
        .collect();
    let mut missing: Vec<_> = reference.keys().filter(|k| !ours.contains_key(*k)).collect();
    let mut extra: Vec<_> = ours.keys().filter(|k| !reference.contains_key(*k)).collect();
    missing.sort();
    extra.sort();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "unread: {missing:?}\nnot in file: {extra:?}"
    );
    for (name, expected) in &reference {
        assert_eq!(&ours[name], expected, "{name}");
    }
}

fn tiny_checkpoint() -> (tempfile::TempDir, Arc<SafetensorsFile>) {
    let dir = tempfile::tempdir().unwrap();
    let paths = testmodels::write_test_models(dir.path()).unwrap();
    let file = Arc::new(SafetensorsFile::open(&paths[0]).unwrap());
    (dir, file)
}

#[test]
fn tiny_models_load_and_run_through_the_real_code() {
    let (_dir, file) = tiny_checkpoint();
    let layout = detect_checkpoint(&file).unwrap();
    assert_eq!(layout.family, Family::Sd1);
    assert_eq!(layout.unet, testmodels::tiny_sd1_unet());
    let clips: Vec<_> = layout.text_encoders.iter().map(|e| e.config.clone()).collect();
    assert_eq!(clips, vec![testmodels::tiny_clip_l()]);
    assert_eq!(layout.vae, Some(testmodels::tiny_sd_vae()));

    let device = Device::Cpu;
    let clip = ClipTextEncoder::new(
        testmodels::tiny_clip_l(),
        Weights::from_file(file.clone(), DType::F32, &device).pp(SD1_CLIP_PREFIX.trim_end_matches('.')),
    )
    .unwrap();
    let chunks = tokenize_with_weights("a (red:1.3) cat", &NoEmbeddings, END_TOKEN);
    let options = EncodeOptions {
        layer: OutputLayer::Last,
        layer_norm_hidden: true,
        project_pooled: false,
        pad_token: END_TOKEN,
    };
    let encoded = clip.encode_weighted(&chunks, options).unwrap();
    assert_eq!(encoded.hidden.dims(), &[1, 77, 64]);
    assert_eq!(encoded.pooled.dims(), &[1, 64]);

    let unet = UNet::new(
        layout.unet.clone(),
        Weights::from_file(file.clone(), DType::F32, &device).pp(UNET_PREFIX.trim_end_matches('.')),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &device).unwrap();
    let timesteps = Tensor::new(&[999f32, 500.0], &device).unwrap();
    let context = Tensor::cat(&[&encoded.hidden, &encoded.hidden], 0).unwrap();
    let input = UNetInput::new(&x, &timesteps, &context);
    let out = unet.forward(&input).unwrap();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
    // In bf16 (where the CPU has it) the prediction moves by about bf16's rounding, no more.
    if Precision::bf16_supported() {
        let unet_bf16 = UNet::new(
            layout.unet.clone(),
            Weights::from_file(file.clone(), DType::F32, &device)
                .with_precision(Precision::Bf16)
                .pp(UNET_PREFIX.trim_end_matches('.')),
        )
        .unwrap();
        let out_bf16 = unet_bf16.forward(&input).unwrap();
        let scale = out.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let moved = common::max_abs_difference(&out, &out_bf16) / scale;
        assert!(
            moved > 1e-5 && moved < 3e-2,
            "bf16 moved the prediction by {moved} of its scale"
        );
    }
    // Odd latent sizes: the decoder upsamples to the size of the matching skip connection.
    let odd = Tensor::randn(0f32, 1.0, (2, 4, 7, 5), &device).unwrap();
    let out = unet.forward(&UNetInput { x: &odd, ..input }).unwrap();
    assert_eq!(out.dims(), &[2, 4, 7, 5]);

    let vae = Vae::new(
        layout.vae.unwrap(),
        Weights::from_file(file, DType::F32, &device).pp(VAE_PREFIX.trim_end_matches('.')),
    )
    .unwrap();
    let image = vae
        .decode(&Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &device).unwrap())
        .unwrap();
    assert_eq!(image.dims(), &[1, 3, 64, 64]);
    let latent = vae.encode(&image).unwrap();
    assert_eq!(latent.dims(), &[1, 4, 8, 8]);
    let values: Vec<f32> = image.flatten_all().unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
}

#[test]
fn test_models_are_written_identically_every_time() {
    let (_a, first) = tiny_checkpoint();
    let (_b, second) = tiny_checkpoint();
    assert_eq!(
        std::fs::read(first.path()).unwrap(),
        std::fs::read(second.path()).unwrap()
    );
}

#[test]
fn bad_files_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let header_bomb = write("bomb.safetensors", &u64::MAX.to_le_bytes());
    let short = write("short.safetensors", &[1, 2, 3]);
    let header = br#"{"w":{"dtype":"F32","shape":[1024,1024],"data_offsets":[0,4194304]}}"#;
    let mut past_end = (header.len() as u64).to_le_bytes().to_vec();
    past_end.extend_from_slice(header);
    past_end.extend_from_slice(&[0; 16]);
    let past_end = write("past_end.safetensors", &past_end);
    for path in [header_bomb, short, past_end] {
        let error = SafetensorsFile::open(&path).err().expect("refused");
        assert!(error.to_string().contains("is not a valid safetensors file"), "{error}");
    }

    let (_dir, tiny) = tiny_checkpoint();
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    shapes.insert("some.other.weight".into(), vec![3, 3]);
    assert!(matches!(detect_layout(&shapes), Err(DetectError::Unrecognised(_))));
    shapes.insert(format!("{UNET_PREFIX}double_blocks.0.img_attn.qkv.weight"), vec![9, 3]);
    assert_eq!(
        detect_layout(&shapes).unwrap_err().to_string(),
        "this is a FLUX.1 model, which Easel cannot run yet"
    );

    let mut partial: HashMap<String, Vec<usize>> = HashMap::new();
    for name in ["input_blocks.0.0.weight", "input_blocks.1.0.out_layers.3.weight"] {
        partial.insert(
            format!("{UNET_PREFIX}{name}"),
            tiny.entry(&format!("{UNET_PREFIX}{name}")).unwrap().shape.clone(),
        );
    }
    let error = detect_layout(&partial).unwrap_err().to_string();
    assert!(error.starts_with("missing tensor 'model.diffusion_model."), "{error}");
}

#[test]
fn prompts_tokenise_as_in_comfyui() {
    let data = fixture("sd15_intermediates.json");
    for case in data["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let chunks = tokenize_with_weights(text, &NoEmbeddings, END_TOKEN);
        let ours: Vec<Vec<(u32, f64)>> = chunks
            .iter()
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|(item, weight)| match item {
                        TokenItem::Token(token) => (*token, *weight),
                        TokenItem::Embedding(_) => panic!("no embeddings here"),
                    })
                    .collect()
            })
            .collect();
        let expected: Vec<Vec<(u32, f64)>> = serde_json::from_value(case["chunks"].clone()).unwrap();
        assert_eq!(ours, expected, "{text:?}");
    }
}

/// Loaders of model kinds Easel cannot run yet list their folder's files as ComfyUI does and,
/// run, fail with an error that names what is not supported.
#[test]
fn pending_loaders_list_their_files_and_fail_clearly_when_run() {
    let setup = common::setup();
    let paths = setup.services.get::<easel_nodes::paths::Paths>().unwrap();
    let folder = paths.models.join("checkpoints");
    std::fs::write(folder.join("svd.safetensors"), b"").unwrap();
    let schema = setup
        .registry
        .get("ImageOnlyCheckpointLoader")
        .unwrap()
        .schema(&setup.services);
    let files = schema.to_object_info()["input"]["required"]["ckpt_name"][0].clone();
    assert!(
        files
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("svd.safetensors")),
        "{files}"
    );
    let error = setup
        .call(
            "ImageOnlyCheckpointLoader",
            vec![("ckpt_name", common::j(serde_json::json!("svd.safetensors")))],
        )
        .unwrap_err()
        .to_string();
    assert!(error.contains("Easel cannot run img2vid checkpoints yet"), "{error}");
}

#[test]
fn checkpoint_loader_takes_the_parameterization_from_its_config() {
    use easel_nodes::model::diffusion_model::{Model, Prediction};
    use easel_nodes::paths::Paths;
    let setup = common::setup();
    let configs = setup.services.get::<Paths>().unwrap().models.join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(
        configs.join("v2-inference-v.yaml"),
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: \"v\"\n    scale_factor: 0.18215\n",
    )
    .unwrap();
    std::fs::write(
        configs.join("v1-inference.yaml"),
        "model:\n  params:\n    scale_factor: 0.18215\n",
    )
    .unwrap();
    std::fs::write(configs.join("broken.yaml"), "model: [unclosed").unwrap();
    let load = |config: &str| {
        setup.call(
            "CheckpointLoader",
            vec![
                ("config_name", common::j(serde_json::json!(config))),
                (
                    "ckpt_name",
                    common::j(serde_json::json!(testmodels::TINY_SD1_CHECKPOINT)),
                ),
            ],
        )
    };
    let prediction = |config: &str| load(config).unwrap()[0].downcast::<Model>().unwrap().0.prediction;
    assert_eq!(prediction("v2-inference-v.yaml"), Prediction::V);
    assert_eq!(prediction("v1-inference.yaml"), Prediction::Epsilon);
    let outputs = load("v1-inference.yaml").unwrap();
    assert_eq!(outputs.len(), 3, "model, CLIP and VAE");
    let error = load("broken.yaml").expect_err("a broken config is refused");
    assert!(error.to_string().contains("is not a model config"), "{error}");
}
