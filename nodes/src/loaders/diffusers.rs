//! `DiffusersLoader`: MODEL, CLIP and VAE from a diffusers folder in `models/diffusers`, as
//! ComfyUI 0.3.64's `comfy/diffusers_load.py` reads one: `unet/`, `vae/`, `text_encoder/` and
//! (SDXL) `text_encoder_2/`, each the first file of its candidate names that exists. The UNet
//! and VAE are read under LDM names through [`ConvertedWeights`] (a renaming view over the
//! mapped file); the text encoders are in the transformers layout the CLIP loaders read. SD1.x,
//! SD2.x and SDXL folders load; folders of transformer models (`transformer/`: FLUX, SD3) are
//! refused with an error, as ComfyUI cannot load them through this node either.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde_json::{Map, Value as Json};

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::unet::UNetConfig;
use easel_models::architectures::vae::{Vae, VaeConfig};
use easel_models::checkpoint::{detect_unet_family, is_v_prediction};
use easel_models::diffusers_layout::{ConvertedWeights, DIFFUSERS_UNET_MARKER, DIFFUSERS_VAE_MARKER};
use easel_models::kernels::sgemm::Precision;
use easel_models::weights::{MappedWeights, TensorShapes, WeightSource};

use crate::loaders::models::{
    build_model, cached, diffusion_precision, file_size, load_diffusion_model, load_vae, open, undetected,
};
use crate::loaders::text_encoders::{dual_clip, single_clip};
use crate::model::diffusion_model::Model;
use crate::model::vae::VaeModel;
use crate::model_cache::FileVersion;
use crate::paths::Paths;
use crate::runtime::{device, tensor_error};

/// The node's name, used in its messages.
const NODE: &str = "DiffusersLoader";

/// The file that marks a diffusers folder.
const MODEL_INDEX: &str = "model_index.json";

/// The UNet's and the VAE's file names, in the order ComfyUI tries them.
const DIFFUSION_MODEL_FILES: [&str; 4] = [
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.bin",
    "diffusion_pytorch_model.bin",
];

/// The text encoders' file names, in the order ComfyUI tries them.
const TEXT_ENCODER_FILES: [&str; 4] = [
    "model.fp16.safetensors",
    "model.safetensors",
    "pytorch_model.fp16.bin",
    "pytorch_model.bin",
];

/// The diffusers folders of `paths` (the combo's entries): every folder under a `diffusers`
/// directory, symlinks followed, that holds a `model_index.json`, as its path relative to that
/// directory (`.` for the directory itself). ComfyUI lists them in `os.walk`'s order, which is
/// the file system's; Easel sorts each directory's list.
pub fn diffusers_folders(paths: &Paths) -> Vec<String> {
    let mut folders = Vec::new();
    for root in paths.folder_dirs("diffusers").into_iter().map(PathBuf::from) {
        let mut found = Vec::new();
        let mut visited = HashSet::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            // A symlink back up the tree would otherwise be walked forever.
            if !visited.insert(dir.canonicalize().unwrap_or_else(|_| dir.clone())) {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if entry.file_name() == MODEL_INDEX {
                    found.push(relative_name(&dir, &root));
                }
            }
        }
        found.sort();
        folders.extend(found);
    }
    folders
}

/// `os.path.relpath(dir, root)` for a `dir` inside `root`, with `/` separators.
fn relative_name(dir: &Path, root: &Path) -> String {
    match dir.strip_prefix(root) {
        Ok(relative) if !relative.as_os_str().is_empty() => relative.to_string_lossy().replace('\\', "/"),
        _ => ".".to_string(),
    }
}

/// The folder `name` of the first `diffusers` directory that has it; `name` may not leave the
/// directory.
fn find_folder(paths: &Paths, name: &str) -> Result<PathBuf, NodeError> {
    let inside = Path::new(name)
        .components()
        .all(|component| matches!(component, Component::Normal(_) | Component::CurDir));
    let found = inside
        .then(|| {
            paths
                .folder_dirs("diffusers")
                .into_iter()
                .map(|dir| PathBuf::from(dir).join(name))
                .find(|path| path.is_dir())
        })
        .flatten();
    found.ok_or_else(|| {
        NodeError::typed(
            "FileNotFoundError",
            format!("Diffusers model folder '{name}' not found in the 'diffusers' model folders."),
        )
    })
}

/// The first of `names` that exists in `dir`.
fn first_file(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|name| dir.join(name)).find(|path| path.exists())
}

/// The files of a diffusers folder that ComfyUI's `load_diffusers` reads.
struct DiffusersFiles {
    unet: PathBuf,
    vae: PathBuf,
    text_encoder: PathBuf,
    /// SDXL's second text encoder (OpenCLIP-bigG).
    text_encoder_2: Option<PathBuf>,
}

impl DiffusersFiles {
    /// Finds the parts of `folder` (the input `name`); a missing or unreadable part is an error
    /// naming the file names looked for.
    fn find(folder: &Path, name: &str) -> Result<Self, NodeError> {
        let part = |subfolder: &str, names: &[&str]| first_file(&folder.join(subfolder), names);
        let missing = |subfolder: &str, names: &[&str]| {
            let mut message = format!(
                "{NODE}: the diffusers folder '{name}' has no {subfolder}/ model (looked for {subfolder}/{})",
                names.join(", ")
            );
            if subfolder == "unet" && folder.join("transformer").is_dir() {
                message.push_str(
                    "; it holds a transformer/ model (FLUX, SD3 and the like), which DiffusersLoader does \
                     not load: load its files with UNETLoader, DualCLIPLoader and VAELoader",
                );
            }
            NodeError::typed("FileNotFoundError", message)
        };
        let files = DiffusersFiles {
            unet: part("unet", &DIFFUSION_MODEL_FILES).ok_or_else(|| missing("unet", &DIFFUSION_MODEL_FILES))?,
            text_encoder: part("text_encoder", &TEXT_ENCODER_FILES)
                .ok_or_else(|| missing("text_encoder", &TEXT_ENCODER_FILES))?,
            text_encoder_2: part("text_encoder_2", &TEXT_ENCODER_FILES),
            vae: part("vae", &DIFFUSION_MODEL_FILES).ok_or_else(|| missing("vae", &DIFFUSION_MODEL_FILES))?,
        };
        for path in files.all() {
            let safetensors = path
                .extension()
                .is_some_and(|extension| extension.eq_ignore_ascii_case("safetensors"));
            if !safetensors {
                return Err(NodeError::new(format!(
                    "{NODE}: '{}' is a PyTorch pickle, which Easel does not read; convert it to \
                     .safetensors",
                    path.display()
                )));
            }
        }
        Ok(files)
    }

    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.unet, &self.vae, &self.text_encoder]
            .into_iter()
            .chain(self.text_encoder_2.as_ref())
    }
}

/// The diffusion model of a diffusers folder's `unet/` file, multiplying in `precision`; also
/// returns the file size. As ComfyUI, a file in the LDM layout is read as it is.
pub fn load_diffusers_unet(path: &Path, device: &Device, precision: Precision) -> Result<(Model, u64), NodeError> {
    let file = open(path)?;
    if !file.has(DIFFUSERS_UNET_MARKER) {
        return load_diffusion_model(path, device, precision, None);
    }
    let weights: Arc<dyn MappedWeights> =
        Arc::new(ConvertedWeights::diffusers_unet(file).map_err(|error| NodeError::new(error.to_string()))?);
    let family = detect_unet_family(weights.as_ref(), "").map_err(|error| undetected(path, error))?;
    let unet = UNetConfig::infer(weights.as_ref(), "", family.heads()).map_err(|error| undetected(path, error))?;
    let v_prediction = is_v_prediction(weights.as_ref(), family, "");
    let source = WeightSource::new(weights, "", device, precision);
    Ok((build_model(source, family, unet, v_prediction)?, file_size(path)))
}

/// The VAE of a diffusers folder's `vae/` file (computing in f32); also returns the file size.
/// As ComfyUI, a file in the LDM layout is read as it is.
pub fn load_diffusers_vae(path: &Path, device: &Device) -> Result<(VaeModel, u64), NodeError> {
    let file = open(path)?;
    if !file.has(DIFFUSERS_VAE_MARKER) {
        return load_vae(path, device);
    }
    let weights: Arc<dyn MappedWeights> =
        Arc::new(ConvertedWeights::diffusers_vae(file).map_err(|error| NodeError::new(error.to_string()))?);
    let config = VaeConfig::infer(weights.as_ref(), "").map_err(|error| undetected(path, error))?;
    let source = WeightSource::new(weights, "", device, Precision::F32);
    let network = Arc::new(Vae::new(config, source.weights()).map_err(tensor_error)?);
    Ok((VaeModel { network, source }, file_size(path)))
}

/// `DiffusersLoader` (deprecated in ComfyUI's menus, still in its node list).
pub struct DiffusersLoader;

impl Node for DiffusersLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        let folders = services.get::<Paths>().map(diffusers_folders).unwrap_or_default();
        NodeSchema::v1(NODE, "nodes", "advanced/loaders/deprecated")
            .display(NODE)
            .required("model_path", InputSpec::combo(&folders))
            .model_folder("model_path", "diffusers")
            .output(OutputSpec::of("MODEL"))
            .output(OutputSpec::of("CLIP"))
            .output(OutputSpec::of("VAE"))
    }

    /// The version of every file the folder's parts are read from, so that a replaced file is
    /// loaded again.
    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        let paths = services.get::<Paths>()?;
        let name = inputs.get("model_path").and_then(Json::as_str)?;
        let versions = find_folder(paths, name)
            .and_then(|folder| DiffusersFiles::find(&folder, name))
            .map(|files| {
                files
                    .all()
                    .map(|path| FileVersion::of(path).map_or(Json::Null, |version| version.to_json()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Some(Ok(Json::Array(versions)))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let name = inputs.string("model_path")?;
        let folder = find_folder(ctx.services.require::<Paths>()?, name)?;
        let files = DiffusersFiles::find(&folder, name)?;
        let device = device(ctx.services);
        let precision = diffusion_precision(ctx.services);
        let model = cached(ctx, &files.unet, "diffusers unet", || {
            load_diffusers_unet(&files.unet, &device, precision)
        })?;
        let clip = match &files.text_encoder_2 {
            None => single_clip(ctx, NODE, files.text_encoder.clone(), "stable_diffusion")?,
            Some(second) => dual_clip(ctx, NODE, [files.text_encoder.clone(), second.clone()], "sdxl")?,
        };
        let vae = cached(ctx, &files.vae, "diffusers vae", || {
            load_diffusers_vae(&files.vae, &device)
        })?;
        Ok(NodeOutput::values(vec![
            Value::object((*model).clone()),
            Value::object(clip),
            Value::object((*vae).clone()),
        ]))
    }
}
