//! PyTorch `.pth`/`.pt`/`.ckpt` state dicts (`torch.save`'s zip archive of a pickle and the
//! tensors' storages), read by candle's restricted unpickler: it interprets the pickle's opcodes
//! into plain values and never imports or calls anything, so a pickle that would run code yields
//! no tensors rather than running it. The state dict may be the top-level object or sit under
//! one of the keys training scripts save it under (spandrel's list: `params_ema` for
//! Real-ESRGAN's releases, `state_dict`, `model`, …).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::{read_pth_tensor_info, PthTensors};
use candle_core::{DType, Device, Tensor};

use crate::kernels::sgemm::Elements;
use crate::weights::{MappedWeights, TensorShapes};

/// Keys under which training scripts nest the state dict, tried in this order (spandrel's
/// `canonicalize_state_dict`).
const NESTED_STATE_DICT_KEYS: [&str; 7] = [
    "model_state_dict",
    "state_dict",
    "params_ema",
    "params-ema",
    "params",
    "model",
    "net",
];

#[derive(Debug, thiserror::Error)]
pub enum PthError {
    #[error("'{path}' is not a PyTorch zip archive Easel can read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("'{path}' holds no tensors Easel can read (only plain state dicts of tensors are read)")]
    NoTensors { path: PathBuf },
}

/// A `torch.save` file's tensors; each is read from the archive when asked for (nothing is
/// read in place: the CPU kernels get copies).
pub struct PthFile {
    path: PathBuf,
    tensors: PthTensors,
    shapes: HashMap<String, Vec<usize>>,
}

impl PthFile {
    pub fn open(path: &Path) -> Result<Self, PthError> {
        let top_level = read_pth_tensor_info(path, false, None).map_err(|error| unreadable(path, error))?;
        let key = if top_level.is_empty() {
            NESTED_STATE_DICT_KEYS
                .into_iter()
                .find(|key| read_pth_tensor_info(path, false, Some(key)).is_ok_and(|infos| !infos.is_empty()))
        } else {
            None
        };
        Self::open_under(path, key)
    }

    /// The state dict under `key` of the file's top-level dict (a file that saves several, as
    /// IP-Adapter's `{"image_proj": …, "ip_adapter": …}`).
    pub fn open_nested(path: &Path, key: &str) -> Result<Self, PthError> {
        Self::open_under(path, Some(key))
    }

    fn open_under(path: &Path, key: Option<&str>) -> Result<Self, PthError> {
        let tensors = PthTensors::new(path, key).map_err(|error| unreadable(path, error))?;
        if tensors.tensor_infos().is_empty() {
            return Err(PthError::NoTensors {
                path: path.to_path_buf(),
            });
        }
        let shapes = tensors
            .tensor_infos()
            .iter()
            .map(|(name, info)| (name.clone(), info.layout.shape().dims().to_vec()))
            .collect();
        Ok(PthFile {
            path: path.to_path_buf(),
            tensors,
            shapes,
        })
    }
}

fn unreadable(path: &Path, error: candle_core::Error) -> PthError {
    PthError::Unreadable {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}

/// Whether `path` names a file PyTorch pickles (by its extension).
pub fn is_pth_path(path: &Path) -> bool {
    path.extension()
        .map(|extension| extension.to_string_lossy().to_lowercase())
        .is_some_and(|extension| matches!(extension.as_str(), "pth" | "pt" | "ckpt" | "bin"))
}

impl TensorShapes for PthFile {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.shape(name)
    }

    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        self.shapes.tensor_names()
    }
}

impl MappedWeights for PthFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn elements(&self, _: &str) -> Option<Elements<'_>> {
        None
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.tensors
            .get(name)?
            .ok_or_else(|| candle_core::Error::Msg(format!("'{}' has no tensor '{name}'", self.path.display())))?
            .to_dtype(dtype)?
            .to_device(device)
    }
}
