//! DiffusersLoader on a tiny SD1.x diffusers folder: the tiny checkpoint's own tensors written
//! under their diffusers names (ComfyUI's maps, in fixtures/diffusers_names.json from
//! generate_diffusers_names.py), so that the folder's MODEL, CLIP and VAE must compute exactly
//! what the checkpoint's do. Also the combo's list, missing parts and a whole graph.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{fixture_json, j, setup, Setup};
use easel_engine::events::EventKind;
use easel_engine::Value;
use easel_models::testmodels::TINY_SD1_CHECKPOINT;
use easel_nodes::conditioning::Conditioning;
use easel_nodes::image::Image;
use easel_nodes::latent::Latent;
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};

/// A tensor to write: dtype, shape and little-endian data.
type Raw = (safetensors::Dtype, Vec<usize>, Vec<u8>);

fn paths(setup: &Setup) -> &Paths {
    setup.services.get::<Paths>().unwrap()
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Raw>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let views = tensors.iter().map(|(name, (dtype, shape, data))| {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap();
        (name.as_str(), view)
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes the tiny SD1 checkpoint as the diffusers folder `models/diffusers/<name>`: every
/// tensor renamed (and the VAE's attention matrices reshaped) as the fixture says, in
/// `unet/diffusion_pytorch_model.safetensors`, `vae/diffusion_pytorch_model.safetensors` and
/// `text_encoder/model.safetensors`, with a `model_index.json`. Returns the folder.
fn write_tiny_sd1_diffusers(setup: &Setup, name: &str) -> PathBuf {
    let names = fixture_json("diffusers_names.json");
    let prefix = names["text_encoder_prefix"].as_str().unwrap();
    let checkpoint = std::fs::read(paths(setup).models.join("checkpoints").join(TINY_SD1_CHECKPOINT)).unwrap();
    let checkpoint = safetensors::SafeTensors::deserialize(&checkpoint).unwrap();
    let mut parts: BTreeMap<&str, BTreeMap<String, Raw>> = BTreeMap::new();
    for (ldm, view) in checkpoint.tensors() {
        let (part, entry) = if let Some(unet) = ldm.strip_prefix("model.diffusion_model.") {
            ("unet", names["unet"][unet].clone())
        } else if let Some(vae) = ldm.strip_prefix("first_stage_model.") {
            ("vae", names["vae"][vae].clone())
        } else if let Some(text) = ldm.strip_prefix(prefix) {
            ("text_encoder", json!({ "name": text }))
        } else {
            panic!("the tiny checkpoint's tensor '{ldm}' has no diffusers part");
        };
        let diffusers = entry["name"]
            .as_str()
            .unwrap_or_else(|| panic!("no diffusers name for '{ldm}'"));
        let shape = match entry.get("shape") {
            Some(shape) => serde_json::from_value(shape.clone()).unwrap(),
            None => view.shape().to_vec(),
        };
        assert_eq!(shape.iter().product::<usize>(), view.shape().iter().product::<usize>());
        let tensors = parts.entry(part).or_default();
        let previous = tensors.insert(diffusers.to_string(), (view.dtype(), shape, view.data().to_vec()));
        assert!(previous.is_none(), "two tensors named '{diffusers}'");
    }
    let folder = paths(setup).models.join("diffusers").join(name);
    for (part, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        write_safetensors(&folder.join(part).join(file), &parts[part]);
    }
    let index = json!({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0"});
    std::fs::write(folder.join("model_index.json"), index.to_string()).unwrap();
    folder
}

fn load_diffusers(setup: &Setup, name: &str) -> Result<Vec<Value>, easel_engine::NodeError> {
    setup.call("DiffusersLoader", vec![("model_path", j(json!(name)))])
}

fn encode(setup: &Setup, clip: &Value, text: &str) -> Value {
    setup
        .call("CLIPTextEncode", vec![("text", j(json!(text))), ("clip", clip.clone())])
        .unwrap()[0]
        .clone()
}

fn cross_attention(conditioning: &Value) -> Vec<f32> {
    common::flat(&conditioning.downcast::<Conditioning>().unwrap().0[0].cross_attention)
}

fn decode(setup: &Setup, vae: &Value, latent: &Tensor) -> Image {
    let samples = Value::object(Latent::new(latent.clone()));
    setup
        .call("VAEDecode", vec![("samples", samples), ("vae", vae.clone())])
        .unwrap()[0]
        .downcast::<Image>()
        .unwrap()
        .clone()
}

fn encode_image(setup: &Setup, vae: &Value, image: &Image) -> Vec<f32> {
    let out = setup
        .call(
            "VAEEncode",
            vec![("pixels", Value::object(image.clone())), ("vae", vae.clone())],
        )
        .unwrap();
    common::flat(&out[0].downcast::<Latent>().unwrap().samples)
}

#[test]
fn a_diffusers_folder_loads_what_its_checkpoint_holds_bit_for_bit() {
    let setup = setup();
    write_tiny_sd1_diffusers(&setup, "tiny-sd1");
    let diffusers = load_diffusers(&setup, "tiny-sd1").unwrap();
    let checkpoint = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
        )
        .unwrap();

    // CLIP: the same embeddings, weighted prompt and all.
    let text = "a (red:1.2) fox";
    let positive = encode(&setup, &checkpoint[1], text);
    assert_eq!(
        cross_attention(&encode(&setup, &diffusers[1], text)),
        cross_attention(&positive)
    );
    let negative = encode(&setup, &checkpoint[1], "blurry");

    // MODEL: sampling with it gives the same latent (every UNet tensor takes part).
    let latent = common::empty_latent(&setup, 64, 64, 1);
    let sample =
        |model: &Value| common::ksampler(&setup, model, &positive, &negative, &latent, "euler", 3, 5.0).unwrap();
    let (from_checkpoint, from_diffusers) = (sample(&checkpoint[0]), sample(&diffusers[0]));
    assert_eq!(common::flat(&from_diffusers), common::flat(&from_checkpoint));
    assert!(
        common::flat(&from_checkpoint).iter().any(|v| *v != 0.0),
        "the sampled latent is not empty"
    );

    // VAE: the same decoded image and the same encoded latent.
    let image = decode(&setup, &checkpoint[2], &from_checkpoint);
    assert_eq!(decode(&setup, &diffusers[2], &from_checkpoint), image);
    assert_eq!(
        encode_image(&setup, &diffusers[2], &image),
        encode_image(&setup, &checkpoint[2], &image)
    );
}

#[test]
fn the_combo_lists_folders_with_a_model_index_only() {
    let setup = setup();
    write_tiny_sd1_diffusers(&setup, "tiny-sd1");
    let nested = write_tiny_sd1_diffusers(&setup, "collection/nested");
    // A folder with the parts but no model_index.json, and one with nothing, are not listed.
    let unlisted = paths(&setup).models.join("diffusers").join("no-index");
    std::fs::create_dir_all(&unlisted).unwrap();
    std::fs::copy(nested.join("model_index.json"), unlisted.join("model_index.jsn")).unwrap();
    std::fs::create_dir_all(paths(&setup).models.join("diffusers").join("empty")).unwrap();

    let info = setup.registry.object_info(&setup.services);
    assert_eq!(
        info["DiffusersLoader"]["input"]["required"]["model_path"][0],
        json!(["collection/nested", "tiny-sd1"])
    );
    assert!(load_diffusers(&setup, "collection/nested").is_ok());
    let error = load_diffusers(&setup, "no-index").unwrap_err().to_string();
    assert!(error.contains("has no unet/ model"), "{error}");
    for outside in ["../checkpoints", "/tmp"] {
        let error = load_diffusers(&setup, outside).unwrap_err().to_string();
        assert!(error.contains("not found"), "{outside}: {error}");
    }
}

#[test]
fn missing_parts_are_clear_errors() {
    let setup = setup();
    let folder = write_tiny_sd1_diffusers(&setup, "tiny-sd1");
    for (part, file) in [
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("unet", "diffusion_pytorch_model.safetensors"),
    ] {
        let kept = folder.join(format!("{part}.kept"));
        std::fs::rename(folder.join(part), &kept).unwrap();
        let error = load_diffusers(&setup, "tiny-sd1").unwrap_err().to_string();
        assert!(error.contains(&format!("has no {part}/ model")), "{error}");
        assert!(
            error.contains(&format!(
                "{part}/{}",
                if part == "text_encoder" {
                    "model.fp16.safetensors"
                } else {
                    "diffusion_pytorch_model.fp16.safetensors"
                }
            )),
            "{error}"
        );
        std::fs::rename(&kept, folder.join(part)).unwrap();
        assert!(folder.join(part).join(file).exists());
    }
    // A FLUX-style folder (a transformer/ model) is named as such.
    std::fs::rename(folder.join("unet"), folder.join("transformer")).unwrap();
    let error = load_diffusers(&setup, "tiny-sd1").unwrap_err().to_string();
    assert!(error.contains("transformer/"), "{error}");
    std::fs::rename(folder.join("transformer"), folder.join("unet")).unwrap();
    // A pickle (tried after the safetensors files) is refused before anything is read.
    let vae = folder.join("vae").join("diffusion_pytorch_model.safetensors");
    let pickle = folder.join("vae").join("diffusion_pytorch_model.bin");
    std::fs::rename(&vae, &pickle).unwrap();
    let error = load_diffusers(&setup, "tiny-sd1").unwrap_err().to_string();
    assert!(error.contains("PyTorch pickle"), "{error}");
    std::fs::rename(&pickle, &vae).unwrap();
    // An fp16 file is preferred to the full one.
    std::fs::write(
        folder.join("unet").join("diffusion_pytorch_model.fp16.safetensors"),
        b"broken",
    )
    .unwrap();
    let error = load_diffusers(&setup, "tiny-sd1").unwrap_err().to_string();
    assert!(error.contains("diffusion_pytorch_model.fp16.safetensors"), "{error}");
    std::fs::remove_file(folder.join("unet").join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    assert!(load_diffusers(&setup, "tiny-sd1").is_ok());
}

#[test]
fn the_loader_runs_in_a_graph() {
    let setup = setup();
    write_tiny_sd1_diffusers(&setup, "tiny-sd1");
    let prompt = json!({
        "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "tiny-sd1"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a (red:1.2) fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "karras", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "diffusers"}},
    });
    let events = common::run_prompt(&setup, prompt).unwrap();
    let errors: Vec<String> = events
        .iter()
        .filter(|event| event.kind == EventKind::ExecutionError)
        .map(|event| event.data.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let executed: Vec<&Json> = events
        .iter()
        .filter(|event| event.kind == EventKind::Executed)
        .map(|event| &event.data)
        .collect();
    assert_eq!(executed.len(), 1, "{executed:?}");
    assert!(paths(&setup).output.join("diffusers_00001_.png").is_file());
}
