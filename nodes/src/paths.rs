//! ComfyUI's directory layout (`folder_paths.py`): the base, input, output, temp and user
//! directories, the model folder registry with its extensions, `extra_model_paths.yaml`, and the
//! file lists that fill loader combos. Every path a client names is resolved inside its directory.

use indexmap::IndexMap;
use serde_yaml_ng::Value as Yaml;
use std::io;
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

/// ComfyUI's model file extensions (`supported_pt_extensions`).
pub const MODEL_EXTENSIONS: [&str; 8] = [".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"];

/// Extensions ComfyUI lists as images in the input directory.
const IMAGE_EXTENSIONS: [&str; 12] = [
    ".png", ".jpg", ".jpeg", ".jpe", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ico", ".avif", ".svg",
];

#[derive(Debug, Error)]
pub enum PathsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
}

/// Which files a model folder lists.
#[derive(Debug, Clone, PartialEq)]
pub enum Extensions {
    /// Any file (`custom_nodes`, and folders created by `extra_model_paths.yaml`).
    Any,
    /// Files whose lower-cased extension is one of these (`""` = no extension).
    Only(Vec<String>),
}

impl Extensions {
    fn models() -> Self {
        Extensions::Only(MODEL_EXTENSIONS.iter().map(|s| s.to_string()).collect())
    }

    fn matches(&self, file: &Path) -> bool {
        match self {
            Extensions::Any => true,
            Extensions::Only(list) => {
                let ext = file
                    .extension()
                    .map(|e| format!(".{}", e.to_string_lossy().to_lowercase()))
                    .unwrap_or_default();
                list.contains(&ext)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct ModelFolder {
    dirs: Vec<PathBuf>,
    extensions: Extensions,
}

/// The directories of one Easel instance.
#[derive(Debug, Clone)]
pub struct Paths {
    pub base: PathBuf,
    pub models: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub temp: PathBuf,
    pub user: PathBuf,
    folders: IndexMap<String, ModelFolder>,
}

/// ComfyUI's legacy folder names.
fn canonical_folder(name: &str) -> &str {
    match name {
        "clip" => "text_encoders",
        "unet" => "diffusion_models",
        other => other,
    }
}

impl Paths {
    /// The default layout under `base` (ComfyUI's `--base-directory`).
    pub fn new(base: impl Into<PathBuf>) -> Self {
        let base = absolute(&base.into());
        let models = base.join("models");
        let model_folder = |subdirs: &[&str], extensions: Extensions| ModelFolder {
            dirs: subdirs.iter().map(|d| models.join(d)).collect(),
            extensions,
        };
        // ComfyUI's registration order, which `GET /models` shows.
        let pt = Extensions::models;
        let only = |extensions: &[&str]| Extensions::Only(extensions.iter().map(|e| e.to_string()).collect());
        let mut folders = IndexMap::new();
        for (name, dirs, extensions) in [
            ("checkpoints", &["checkpoints"][..], pt()),
            ("configs", &["configs"], only(&[".yaml"])),
            ("loras", &["loras"], pt()),
            ("vae", &["vae"], pt()),
            ("text_encoders", &["text_encoders", "clip"], pt()),
            ("diffusion_models", &["unet", "diffusion_models"], pt()),
            ("clip_vision", &["clip_vision"], pt()),
            ("style_models", &["style_models"], pt()),
            ("embeddings", &["embeddings"], pt()),
            ("diffusers", &["diffusers"], only(&["folder"])),
            ("vae_approx", &["vae_approx"], pt()),
            ("controlnet", &["controlnet", "t2i_adapter"], pt()),
            ("gligen", &["gligen"], pt()),
            ("upscale_models", &["upscale_models"], pt()),
            ("custom_nodes", &[], Extensions::Any),
            ("hypernetworks", &["hypernetworks"], pt()),
            ("photomaker", &["photomaker"], pt()),
            ("classifiers", &["classifiers"], only(&[""])),
            ("model_patches", &["model_patches"], pt()),
            ("audio_encoders", &["audio_encoders"], pt()),
            // ComfyUI-GGUF's folders (its nodes are built in): GGUF files beside the others.
            ("unet_gguf", &["unet", "diffusion_models"], only(&[".gguf"])),
            ("clip_gguf", &["text_encoders", "clip"], only(&[".gguf"])),
            // ComfyUI_IPAdapter_plus's folder.
            ("ipadapter", &["ipadapter"], pt()),
        ] {
            let mut folder = model_folder(dirs, extensions);
            if name == "custom_nodes" {
                folder.dirs = vec![base.join("custom_nodes")];
            }
            folders.insert(name.to_string(), folder);
        }
        Paths {
            input: base.join("input"),
            output: base.join("output"),
            temp: base.join("temp"),
            user: base.join("user"),
            models,
            base,
            folders,
        }
    }

    pub fn with_input(mut self, dir: impl Into<PathBuf>) -> Self {
        self.input = absolute(&dir.into());
        self
    }

    pub fn with_output(mut self, dir: impl Into<PathBuf>) -> Self {
        self.output = absolute(&dir.into());
        self
    }

    /// ComfyUI's `--temp-directory D` puts temporary files in `D/temp`.
    pub fn with_temp_parent(mut self, dir: impl Into<PathBuf>) -> Self {
        self.temp = absolute(&dir.into()).join("temp");
        self
    }

    pub fn with_user(mut self, dir: impl Into<PathBuf>) -> Self {
        self.user = absolute(&dir.into());
        self
    }

    /// Appends the output-directory model folders, as ComfyUI does after reading extra paths.
    pub fn finish(mut self) -> Self {
        for (folder, sub) in [
            ("checkpoints", "checkpoints"),
            ("text_encoders", "clip"),
            ("vae", "vae"),
            ("diffusion_models", "diffusion_models"),
            ("loras", "loras"),
        ] {
            let dir = self.output.join(sub);
            self.add_model_folder_path(folder, dir, false);
        }
        self
    }

    /// Creates the input, output, temp, user and model directories that are missing. The temp
    /// directory is emptied first, as ComfyUI does at start-up.
    pub fn prepare(&self) -> io::Result<()> {
        if self.temp.exists() {
            std::fs::remove_dir_all(&self.temp)?;
        }
        for dir in [&self.input, &self.output, &self.temp, &self.user] {
            std::fs::create_dir_all(dir)?;
        }
        for folder in self.folders.values() {
            for dir in &folder.dirs {
                if dir.starts_with(&self.models) {
                    std::fs::create_dir_all(dir)?;
                }
            }
        }
        Ok(())
    }

    /// `folder_paths.add_model_folder_path`.
    pub fn add_model_folder_path(&mut self, folder: &str, dir: PathBuf, is_default: bool) {
        let folder = canonical_folder(folder).to_string();
        match self.folders.get_mut(&folder) {
            Some(entry) => {
                if let Some(position) = entry.dirs.iter().position(|d| *d == dir) {
                    if is_default {
                        let existing = entry.dirs.remove(position);
                        entry.dirs.insert(0, existing);
                    }
                } else if is_default {
                    entry.dirs.insert(0, dir);
                } else {
                    entry.dirs.push(dir);
                }
            }
            None => {
                self.folders.insert(
                    folder,
                    ModelFolder {
                        dirs: vec![dir],
                        extensions: Extensions::Any,
                    },
                );
            }
        }
    }

    /// Reads an `extra_model_paths.yaml` in ComfyUI's format.
    pub fn load_extra_model_paths(&mut self, yaml_path: &Path) -> Result<(), PathsError> {
        let text = std::fs::read_to_string(yaml_path).map_err(|source| PathsError::Read {
            path: yaml_path.to_path_buf(),
            source,
        })?;
        let config: Yaml = serde_yaml_ng::from_str(&text).map_err(|e| PathsError::Yaml {
            path: yaml_path.to_path_buf(),
            message: e.to_string(),
        })?;
        let yaml_dir = absolute(yaml_path).parent().map(Path::to_path_buf).unwrap_or_default();
        let Yaml::Mapping(sections) = config else {
            return Ok(());
        };
        for (_, section) in sections {
            let Yaml::Mapping(section) = section else {
                continue;
            };
            let base_path = section.get("base_path").and_then(Yaml::as_str).map(|b| {
                let expanded = PathBuf::from(expand_vars(&expand_home(b)));
                if expanded.is_absolute() {
                    expanded
                } else {
                    normalize(&yaml_dir.join(expanded))
                }
            });
            let is_default = section.get("is_default").and_then(Yaml::as_bool).unwrap_or(false);
            for (key, value) in &section {
                let (Some(folder), Some(lines)) = (key.as_str(), value.as_str()) else {
                    continue;
                };
                if folder == "base_path" || folder == "is_default" {
                    continue;
                }
                for line in lines.split('\n').filter(|l| !l.is_empty()) {
                    let path = match &base_path {
                        Some(base) => base.join(line),
                        None if Path::new(line).is_absolute() => PathBuf::from(line),
                        None => yaml_dir.join(line),
                    };
                    self.add_model_folder_path(folder, normalize(&path), is_default);
                }
            }
        }
        Ok(())
    }

    /// Registered model folder names, in ComfyUI's registration order (`GET /models`).
    pub fn folder_names(&self) -> impl Iterator<Item = &str> {
        self.folders.keys().map(String::as_str)
    }

    /// The directories of a model folder, as strings (`/internal/folder_paths`).
    pub fn folder_dirs(&self, folder: &str) -> Vec<String> {
        self.folders
            .get(canonical_folder(folder))
            .map(|f| f.dirs.iter().map(|d| d.to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// `folder_paths.get_filename_list`: relative paths (with `/`) of matching files under every
    /// directory of `folder`, recursively, sorted and de-duplicated.
    pub fn filename_list(&self, folder: &str) -> Vec<String> {
        let Some(entry) = self.folders.get(canonical_folder(folder)) else {
            return Vec::new();
        };
        let mut names = Vec::new();
        for dir in &entry.dirs {
            let mut stack = vec![dir.clone()];
            while let Some(current) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&current) else {
                    continue;
                };
                for item in entries.flatten() {
                    let path = item.path();
                    if path.is_dir() {
                        if item.file_name() != ".git" {
                            stack.push(path);
                        }
                    } else if entry.extensions.matches(&path) {
                        if let Ok(relative) = path.strip_prefix(dir) {
                            names.push(relative.to_string_lossy().replace('\\', "/"));
                        }
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// The file `name` of `folder`, from the first directory that has it.
    pub fn full_path(&self, folder: &str, name: &str) -> Option<PathBuf> {
        self.file_with_metadata(folder, name).map(|(path, _)| path)
    }

    /// [`Paths::full_path`] with the file's metadata, from the one `stat` that found it.
    pub fn file_with_metadata(&self, folder: &str, name: &str) -> Option<(PathBuf, std::fs::Metadata)> {
        let entry = self.folders.get(canonical_folder(folder))?;
        let relative = safe_relative(name)?;
        entry.dirs.iter().find_map(|dir| {
            let path = dir.join(&relative);
            let metadata = std::fs::metadata(&path).ok().filter(std::fs::Metadata::is_file)?;
            Some((path, metadata))
        })
    }

    /// The directory of a `type` (`input`, `output`, `temp`), as `/view` and uploads use.
    pub fn directory_by_type(&self, kind: &str) -> Option<&Path> {
        match kind {
            "input" => Some(&self.input),
            "output" => Some(&self.output),
            "temp" => Some(&self.temp),
            _ => None,
        }
    }

    /// `folder_paths.get_annotated_filepath`: `name.png`, `sub/name.png` or `name.png [output]`
    /// (`[input]`, `[temp]`), inside that directory; `None` for a name that would leave it.
    pub fn annotated_filepath(&self, name: &str) -> Option<PathBuf> {
        let (name, kind) = split_annotation(name);
        let dir = self.directory_by_type(kind.unwrap_or("input"))?;
        Some(dir.join(safe_relative(name)?))
    }

    /// Top-level input files ComfyUI lists as images (LoadImage's combo), sorted.
    pub fn input_images(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .input_files()
            .into_iter()
            .filter(|name| {
                let lower = name.to_lowercase();
                IMAGE_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
            })
            .collect();
        names.sort();
        names
    }

    /// Every top-level input file (LoadImageMask's combo), sorted.
    pub fn input_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.input)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// Splits ComfyUI's directory annotation off a file name: `a.png [output]` → (`a.png`,
/// `Some("output")`); also ` [input]` and ` [temp]`.
pub fn split_annotation(name: &str) -> (&str, Option<&'static str>) {
    for kind in ["output", "input", "temp"] {
        if let Some(stripped) = name
            .strip_suffix(']')
            .and_then(|n| n.strip_suffix(kind))
            .and_then(|n| n.strip_suffix(" ["))
        {
            return (stripped, Some(kind));
        }
    }
    (name, None)
}

/// Writes `bytes` to `path` through a temporary file in the same folder, renamed over the name: a
/// full disk leaves no truncated file (the temporary one is removed), readers never see a partial
/// one, and a symlink at `path` is replaced instead of followed out of its folder.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new()
        .prefix(".easel-")
        .suffix(".part")
        .tempfile_in(folder)?;
    file.write_all(bytes)?;
    file.as_file().sync_data()?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
}

/// Whether `path`, once created, lies inside `base` (which may not exist yet either), symlinks
/// resolved. For checking before creating anything: both are resolved as far as they exist, the
/// plain names below that appended.
pub fn contained_once_created(base: &Path, path: &Path) -> bool {
    match (resolved_as_far_as_exists(base), resolved_as_far_as_exists(path)) {
        (Some(base), Some(path)) => path.starts_with(base),
        _ => false,
    }
}

/// `path` with its nearest existing ancestor resolved (symlinks, `..`) and the rest appended.
fn resolved_as_far_as_exists(path: &Path) -> Option<PathBuf> {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(resolved) = existing.canonicalize() {
            return Some(rest.iter().rev().fold(resolved, |path, part| path.join(part)));
        }
        rest.push(existing.file_name()?);
        existing = existing.parent()?;
    }
}

/// A client-given relative path, if it has no root, no `..` and no drive.
pub fn safe_relative(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        normalize(path)
    } else {
        std::env::current_dir()
            .map(|cwd| normalize(&cwd.join(path)))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

/// `os.path.normpath`: resolves `.` and `..` lexically.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn expand_home(path: &str) -> String {
    match (path.strip_prefix('~'), std::env::var("HOME")) {
        (Some(rest), Ok(home)) if rest.is_empty() || rest.starts_with('/') => {
            format!("{home}{rest}")
        }
        _ => path.to_string(),
    }
}

/// `os.path.expandvars`: `$NAME` and `${NAME}`; unknown variables stay as written.
fn expand_vars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match std::env::var(name) {
            Ok(value) if !name.is_empty() => out.push_str(&value),
            _ => out.push_str(&rest[start..start + 1 + consumed]),
        }
        rest = &rest[start + 1 + consumed..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_paths_stay_inside() {
        assert_eq!(split_annotation("a.png [temp]"), ("a.png", Some("temp")));
        assert_eq!(split_annotation("a.png [input]"), ("a.png", Some("input")));
        assert_eq!(split_annotation("a.png[output]"), ("a.png[output]", None));
        assert_eq!(safe_relative("a/b.png"), Some(PathBuf::from("a/b.png")));
        assert_eq!(safe_relative("../x.png"), None);
        assert_eq!(safe_relative("/etc/passwd"), None);
        assert_eq!(safe_relative(""), None);
        let paths = Paths::new("/srv/easel");
        assert_eq!(
            paths.annotated_filepath("x.png [output]"),
            Some(PathBuf::from("/srv/easel/output/x.png"))
        );
        assert_eq!(
            paths.annotated_filepath("sub/x.png"),
            Some(PathBuf::from("/srv/easel/input/sub/x.png"))
        );
        assert_eq!(paths.annotated_filepath("../../x.png"), None);
    }

    #[test]
    fn extra_model_paths_yaml() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("EASEL_TEST_MODELS", "lib");
        let yaml = dir.path().join("extra.yaml");
        std::fs::write(
            &yaml,
            "a111:\n  base_path: ${EASEL_TEST_MODELS}/webui\n  checkpoints: models/Stable-diffusion\n  loras: |\n    models/Lora\n    models/LyCORIS\n  clip: clip\nother:\n  is_default: true\n  checkpoints: /abs/ckpts\n  animatediff_models: anim\nempty:\n",
        )
        .unwrap();
        let base = dir.path().join("base");
        let mut paths = Paths::new(&base);
        paths.load_extra_model_paths(&yaml).unwrap();
        let paths = paths.finish();
        let ckpt = &paths.folders["checkpoints"].dirs;
        assert_eq!(ckpt[0], PathBuf::from("/abs/ckpts"));
        assert_eq!(ckpt[1], base.join("models/checkpoints"));
        assert_eq!(ckpt[2], dir.path().join("lib/webui/models/Stable-diffusion"));
        assert_eq!(ckpt[3], base.join("output/checkpoints"));
        assert_eq!(
            paths.folders["loras"].dirs[2],
            dir.path().join("lib/webui/models/LyCORIS")
        );
        assert_eq!(
            paths.folders["text_encoders"].dirs[2],
            dir.path().join("lib/webui/clip")
        );
        assert_eq!(paths.folders["animatediff_models"].dirs, [dir.path().join("anim")]);
        assert_eq!(paths.folders["animatediff_models"].extensions, Extensions::Any);
    }

    #[test]
    fn filename_lists_are_recursive_filtered_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        paths.prepare().unwrap();
        let ckpts = dir.path().join("models/checkpoints");
        std::fs::create_dir_all(ckpts.join("sd/.git")).unwrap();
        for name in [
            "b.safetensors",
            "a.ckpt",
            "notes.txt",
            "sd/c.safetensors",
            "sd/.git/d.safetensors",
        ] {
            std::fs::write(ckpts.join(name), b"x").unwrap();
        }
        assert_eq!(
            paths.filename_list("checkpoints"),
            ["a.ckpt", "b.safetensors", "sd/c.safetensors"]
        );
        assert_eq!(
            paths.full_path("checkpoints", "sd/c.safetensors"),
            Some(ckpts.join("sd/c.safetensors"))
        );
        assert_eq!(paths.full_path("checkpoints", "../x"), None);
    }
}
