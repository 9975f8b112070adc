//! What a request may name: the models in the model folders (each recognised by family and
//! variant from its tensor names, cached by file size and time, and trusted for a second once found
//! by name), and the styles and presets —
//! Easel's own, built in, and the JSON files a user adds to `<base>/styles` and `<base>/presets`.

use super::request::{Family, Mode};
use easel_models::checkpoint::{detect_family, Family as ModelFamily};
use easel_models::formats::gguf::GgufFile;
use easel_models::weights::{SafetensorsFile, TensorShapes};
use easel_nodes::paths::Paths;
use rust_embed::RustEmbed;
use serde_json::{json, Map, Value as Json};
use std::collections::{BTreeMap, HashMap};
use std::fs::Metadata;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// A model file a request may name.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The name requests use (relative to its folder).
    pub name: String,
    /// `checkpoints` (model, text encoders and VAE in one file) or `diffusion_models`.
    pub folder: &'static str,
    pub family: Family,
    /// `base`, `refiner` (SDXL), `dev`, `schnell` or `fill` (FLUX).
    pub variant: &'static str,
}

impl ModelEntry {
    /// The modes this model serves.
    pub fn modes(&self) -> Vec<Mode> {
        match (self.family, self.variant) {
            (_, "refiner") => Vec::new(),
            (Family::Flux, "fill") => vec![Mode::Inpaint, Mode::Outpaint],
            (Family::Flux, _) => vec![Mode::Text2Img, Mode::Img2Img],
            // IC-Light relights with SD1.5 models.
            (Family::Sd15, _) => vec![
                Mode::Text2Img,
                Mode::Img2Img,
                Mode::Inpaint,
                Mode::Outpaint,
                Mode::Relight,
            ],
            _ => vec![Mode::Text2Img, Mode::Img2Img, Mode::Inpaint, Mode::Outpaint],
        }
    }

    /// `/v1/models`' description of the model.
    pub fn to_json(&self) -> Json {
        let modes: Vec<_> = self.modes().iter().map(|mode| mode.name()).collect();
        let add_ons = ["styles", "loras"];
        json!({
            "name": self.name,
            "folder": self.folder,
            "family": self.family.name(),
            "variant": self.variant,
            "modes": modes,
            "add_ons": add_ons,
            "refiner": self.variant == "refiner",
        })
    }
}

/// A file's size and modification time, and what it was recognised as.
type Recognised = (u64, Option<SystemTime>, Option<ModelEntry>);

/// How long a model found by name is taken as it was without looking at its file again. Only a
/// request's family and mode check rests on it: validation lists the folder itself.
const FOUND_FRESH_FOR: Duration = Duration::from_secs(1);

/// Recognised model files, kept while their size and modification time stay the same.
#[derive(Default)]
pub struct ModelCatalog {
    seen: Mutex<HashMap<PathBuf, Recognised>>,
    /// Models [`ModelCatalog::find`] found lately, by name, with when it looked.
    found: Mutex<HashMap<String, (Instant, ModelEntry)>>,
}

impl ModelCatalog {
    /// Every model of a family Easel's REST API knows, by folder then name.
    pub fn models(&self, paths: &Paths) -> Vec<ModelEntry> {
        let mut models = Vec::new();
        for folder in ["checkpoints", "diffusion_models"] {
            for name in paths.filename_list(folder) {
                let Some((path, metadata)) = paths.file_with_metadata(folder, &name) else {
                    continue;
                };
                if let Some(entry) = self.recognise(&path, &metadata, folder, &name) {
                    models.push(entry);
                }
            }
        }
        models
    }

    /// The model of this name (checkpoints first), if it is one Easel recognises.
    pub fn find(&self, paths: &Paths, name: &str) -> Option<ModelEntry> {
        let lock = || self.found.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((looked, entry)) = lock().get(name) {
            if looked.elapsed() < FOUND_FRESH_FOR {
                return Some(entry.clone());
            }
        }
        let entry = ["checkpoints", "diffusion_models"].into_iter().find_map(|folder| {
            let (path, metadata) = paths.file_with_metadata(folder, name)?;
            self.recognise(&path, &metadata, folder, name)
        });
        match &entry {
            Some(found) => lock().insert(name.to_string(), (Instant::now(), found.clone())),
            None => lock().remove(name),
        };
        entry
    }

    fn recognise(&self, path: &Path, metadata: &Metadata, folder: &'static str, name: &str) -> Option<ModelEntry> {
        let key = (metadata.len(), metadata.modified().ok());
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((size, modified, entry)) = seen.get(path) {
            if (*size, *modified) == key {
                return entry.clone();
            }
        }
        let entry = recognise_file(path, folder, name);
        seen.insert(path.to_path_buf(), (key.0, key.1, entry.clone()));
        entry
    }
}

/// A model file's family and variant from its tensor names, or `None` for anything else.
fn recognise_file(path: &Path, folder: &'static str, name: &str) -> Option<ModelEntry> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    let shapes: Box<dyn TensorShapes> = match extension.as_str() {
        "safetensors" | "sft" => Box::new(SafetensorsFile::open(path).ok()?),
        "gguf" => Box::new(GgufFile::open(path).ok()?),
        _ => return None,
    };
    let (family, variant) = classify(shapes.as_ref())?;
    Some(ModelEntry {
        name: name.to_string(),
        folder,
        family,
        variant,
    })
}

fn classify(file: &dyn TensorShapes) -> Option<(Family, &'static str)> {
    let flux_prefix = ["", "model.diffusion_model."]
        .into_iter()
        .find(|prefix| file.has(&format!("{prefix}double_blocks.0.img_attn.qkv.weight")));
    if let Some(prefix) = flux_prefix {
        let variant = if file
            .shape(&format!("{prefix}img_in.weight"))
            .is_some_and(|shape| shape.contains(&384))
        {
            "fill"
        } else if file.has(&format!("{prefix}guidance_in.in_layer.weight")) {
            "dev"
        } else {
            "schnell"
        };
        return Some((Family::Flux, variant));
    }
    let family = detect_family(file)
        .or_else(|_| easel_models::checkpoint::detect_unet_family(file, ""))
        .ok()?;
    match family {
        ModelFamily::Sd1 => Some((Family::Sd15, "base")),
        ModelFamily::Sdxl => Some((Family::Sdxl, "base")),
        ModelFamily::SdxlRefiner => Some((Family::Sdxl, "refiner")),
        ModelFamily::Sd3 => Some((Family::Sd3, "base")),
        ModelFamily::Flux | ModelFamily::Sd2 => None,
    }
}

/// The model a request without `model` gets: the configured default of its family, else the
/// first of the family (by name) that serves the mode, checkpoints before split files.
pub fn default_model<'a>(
    models: &'a [ModelEntry],
    family: Family,
    mode: Mode,
    configured: Option<&str>,
) -> Option<&'a ModelEntry> {
    if let Some(name) = configured {
        if let Some(entry) = models
            .iter()
            .find(|entry| entry.name == name && entry.modes().contains(&mode))
        {
            return Some(entry);
        }
    }
    models
        .iter()
        .find(|entry| entry.family == family && entry.modes().contains(&mode))
}

#[derive(RustEmbed)]
#[folder = "data/"]
struct BuiltIn;

/// A named prompt template: `{prompt}` in `prompt` is replaced by the request's prompt, and
/// `negative_prompt` is added to the request's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Style {
    pub name: String,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
}

impl Style {
    /// The request's prompts with this style applied (Fooocus' rule).
    pub fn apply(&self, prompt: &str, negative: &str) -> (String, String) {
        let positive = if self.prompt.contains("{prompt}") {
            self.prompt.replace("{prompt}", prompt)
        } else if self.prompt.is_empty() {
            prompt.to_string()
        } else {
            format!("{prompt}, {}", self.prompt)
        };
        let negative = [negative, self.negative_prompt.as_str()]
            .into_iter()
            .filter(|part| !part.trim().is_empty())
            .collect::<Vec<_>>()
            .join(", ");
        (positive, negative)
    }
}

/// A named set of request fields, applied under the request's own.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Preset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Fields of `/v1/generate`.
    #[schema(value_type = Object)]
    pub fields: Map<String, Json>,
}

/// Styles by name: the built-in `styles/*.json`, then `<base>/styles/*.json` (a user's file may
/// redefine a built-in style). Each file is a list of styles.
pub fn styles(paths: &Paths) -> BTreeMap<String, Style> {
    let mut styles = BTreeMap::new();
    for text in data_files("styles", paths) {
        match serde_json::from_str::<Vec<Style>>(&text.1) {
            Ok(list) => styles.extend(list.into_iter().map(|style| (style.name.clone(), style))),
            Err(error) => tracing::warn!(file = %text.0, "not a list of styles: {error}"),
        }
    }
    styles
}

/// Presets by name, from the built-in `presets/*.json` and `<base>/presets/*.json`; each file is
/// one preset.
pub fn presets(paths: &Paths) -> BTreeMap<String, Preset> {
    let mut presets = BTreeMap::new();
    for text in data_files("presets", paths) {
        match serde_json::from_str::<Preset>(&text.1) {
            Ok(preset) => {
                presets.insert(preset.name.clone(), preset);
            }
            Err(error) => tracing::warn!(file = %text.0, "not a preset: {error}"),
        }
    }
    presets
}

/// `(file name, text)` of the JSON files of a data folder: built in first, then the user's, each
/// by name.
fn data_files(folder: &str, paths: &Paths) -> Vec<(String, String)> {
    let mut built_in: Vec<_> = BuiltIn::iter()
        .filter(|name| name.starts_with(&format!("{folder}/")) && name.ends_with(".json"))
        .collect();
    built_in.sort();
    let mut files: Vec<(String, String)> = built_in
        .iter()
        .filter_map(|name| {
            let file = BuiltIn::get(name)?;
            Some((name.to_string(), String::from_utf8_lossy(&file.data).into_owned()))
        })
        .collect();
    let mut user: Vec<PathBuf> = std::fs::read_dir(paths.base.join(folder))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "json") && path.is_file())
        .collect();
    user.sort();
    files.extend(user.into_iter().filter_map(|path| {
        let text = std::fs::read_to_string(&path).ok()?;
        Some((path.display().to_string(), text))
    }));
    files
}
