//! Textual inversions from ComfyUI's `embeddings` folders, found and read as ComfyUI's
//! `load_embed` does (the folders are searched by the caller's lookup): the name as given or with `.safetensors`, `.pt` or `.bin`; in a file the
//! text encoder's own key (`clip_l`), A1111's `string_to_param`, or else the first tensor.
//! `.pt`/`.bin` files are PyTorch zip archives read by candle's restricted unpickler (no code
//! runs).

use std::path::{Path, PathBuf};

use candle_core::pickle::{read_pth_tensor_info, PthTensors};
use candle_core::{DType, Device, Tensor};

use crate::text::tokenizer::EmbeddingLookup;
use crate::weights::{MappedWeights, SafetensorsFile, TensorShapes};

const EXTENSIONS: [&str; 3] = [".safetensors", ".pt", ".bin"];

/// Finds a file name in the embeddings folders: its full path, if one holds it.
pub type FindEmbeddingFile<'a> = dyn Fn(&str) -> Option<PathBuf> + 'a;

/// The embeddings of one text encoder: vectors must be `width` wide; `key` names its tensor in
/// multi-encoder files.
pub struct EmbeddingFolder<'a> {
    find_file: &'a FindEmbeddingFile<'a>,
    key: &'a str,
    width: usize,
}

impl<'a> EmbeddingFolder<'a> {
    pub fn new(find_file: &'a FindEmbeddingFile<'a>, key: &'a str, width: usize) -> Self {
        EmbeddingFolder { find_file, key, width }
    }

    fn find(&self, name: &str) -> Option<PathBuf> {
        std::iter::once(name.to_string())
            .chain(EXTENSIONS.iter().map(|extension| format!("{name}{extension}")))
            .find_map(|candidate| (self.find_file)(&candidate))
    }

    fn read(&self, path: &Path) -> candle_core::Result<Tensor> {
        let is_safetensors = path
            .extension()
            .is_some_and(|extension| extension.eq_ignore_ascii_case("safetensors"));
        if is_safetensors {
            let file = SafetensorsFile::open(path).map_err(|error| candle_core::Error::Msg(error.to_string()))?;
            let name = if file.has(self.key) {
                self.key.to_string()
            } else {
                let mut names: Vec<&str> = file.tensor_names().collect();
                names.sort_unstable();
                names
                    .first()
                    .map(|name| name.to_string())
                    .ok_or_else(|| candle_core::Error::Msg("the file holds no tensor".into()))?
            };
            return file.load(&name, DType::F32, &Device::Cpu);
        }
        let key = if read_pth_tensor_info(path, false, Some("string_to_param")).is_ok() {
            Some("string_to_param")
        } else {
            None
        };
        let infos = read_pth_tensor_info(path, false, key)?;
        let name = if key.is_none() && infos.iter().any(|info| info.name == self.key) {
            self.key.to_string()
        } else {
            infos
                .first()
                .map(|info| info.name.clone())
                .ok_or_else(|| candle_core::Error::Msg("the file holds no tensor".into()))?
        };
        PthTensors::new(path, key)?
            .get(&name)?
            .ok_or_else(|| candle_core::Error::Msg(format!("tensor {name} is missing")))?
            .to_dtype(DType::F32)
    }
}

impl EmbeddingLookup for EmbeddingFolder<'_> {
    fn embedding(&self, name: &str) -> Option<Vec<Vec<f32>>> {
        let path = self.find(name)?;
        let tensor = match self.read(&path) {
            Ok(tensor) => tensor,
            Err(error) => {
                tracing::warn!("could not load embedding {}: {error}", path.display());
                return None;
            }
        };
        let width = tensor.dims().last().copied().unwrap_or(0);
        if width != self.width {
            tracing::warn!(
                "WARNING: shape mismatch when trying to apply embedding, embedding will be ignored {width} != {}",
                self.width
            );
            return None;
        }
        let rows = tensor.reshape(((), width)).and_then(|rows| rows.to_vec2::<f32>());
        match rows {
            Ok(rows) => Some(rows),
            Err(error) => {
                tracing::warn!("could not read embedding {}: {error}", path.display());
                None
            }
        }
    }
}
