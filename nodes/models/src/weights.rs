//! Weight files: safetensors read through a memory map, validated before any tensor is touched,
//! and served to model code through [`Weights`] (as GGUF files are, through [`MappedWeights`]).
//!
//! Where a model computes in f32 on the CPU, its weight matrices (the bulk of every model) stay
//! in the map in the file's precision and the CPU kernels read them in place ([`WeightMatrix`]):
//! loading copies nothing but the small tensors, and the model needs no memory of its own for
//! them. Like every reader that maps model files, this relies on a file not being rewritten in
//! place while a model from it is in use (replacing it, as downloads and copies to a new name
//! do, is safe). Every other tensor is copied out of the map when model code asks for it,
//! converted to the dtype the model computes in. fp8 matrices (e4m3fn, e5m2) are read in place
//! too; other fp8 tensors are widened, exactly. Weights can also be rounded to an fp8 format and
//! kept so ([`Weights::stored_as`]), as ComfyUI's `weight_dtype` options store a model.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::{Advice, Mmap};
use rayon::prelude::*;
use safetensors::tensor::{Dtype as FileDtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::formats::fp8::Fp8Format;
use crate::kernels::sgemm::{Elements, Precision};
use crate::lora::{Patch, WeightPatches};

/// Why a weight file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read '{path}': {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("'{path}' is not a valid safetensors file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("'{path}': tensor '{name}' has dtype {dtype:?}, which Easel cannot load")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: FileDtype,
    },
}

/// Names and shapes of the tensors of a model, which is all architecture detection needs.
pub trait TensorShapes {
    fn shape(&self, name: &str) -> Option<&[usize]>;
    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_>;

    fn has(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    /// How many numbered entries the file has under `prefix` (`prefix0.…`, `prefix1.…`): one
    /// more than the highest number found, 0 for none.
    fn count_indices(&self, prefix: &str) -> usize {
        self.tensor_names()
            .filter_map(|name| {
                let (index, _) = name.strip_prefix(prefix)?.split_once('.')?;
                index.parse::<usize>().ok().map(|index| index + 1)
            })
            .max()
            .unwrap_or(0)
    }
}

impl TensorShapes for SafetensorsFile {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|entry| entry.shape.as_slice())
    }

    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.tensors.keys().map(String::as_str))
    }
}

impl TensorShapes for HashMap<String, Vec<usize>> {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.get(name).map(Vec::as_slice)
    }

    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.keys().map(String::as_str))
    }
}

/// A weight file read through a memory map (safetensors, or GGUF in [`crate::formats::gguf`]), as
/// [`Weights`] reads it: its tensors' elements in place where the CPU kernels can read them,
/// every tensor copied out on request.
pub trait MappedWeights: TensorShapes + Send + Sync {
    fn path(&self) -> &Path;

    /// A tensor's elements where they lie in the map, in a form the CPU kernels read; `None`
    /// where they cannot be read in place.
    fn elements(&self, name: &str) -> Option<Elements<'_>>;

    /// One tensor, copied in `dtype` on `device`.
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor>;
}

/// A weight file whose tensors are read under other names (llama.cpp's GGUF names as the
/// names the model code uses).
pub struct RenamedWeights {
    inner: Arc<dyn MappedWeights>,
    /// New name → the file's name.
    names: HashMap<String, String>,
}

impl RenamedWeights {
    /// Every tensor of `inner` under the name `rename` gives it.
    pub fn new(inner: Arc<dyn MappedWeights>, rename: impl Fn(&str) -> String) -> Self {
        let names = inner
            .tensor_names()
            .map(|name| (rename(name), name.to_string()))
            .collect();
        RenamedWeights { inner, names }
    }

    fn original(&self, name: &str) -> Option<&str> {
        self.names.get(name).map(String::as_str)
    }
}

impl TensorShapes for RenamedWeights {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.inner.shape(self.original(name)?)
    }

    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.names.keys().map(String::as_str))
    }
}

impl MappedWeights for RenamedWeights {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn elements(&self, name: &str) -> Option<Elements<'_>> {
        self.inner.elements(self.original(name)?)
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        match self.original(name) {
            Some(original) => self.inner.load(original, dtype, device),
            None => Err(candle_core::Error::Msg(format!(
                "'{}' has no tensor '{name}'",
                self.path().display()
            ))),
        }
    }
}

/// A weight file in which some tensors read zero-padded to a larger shape, their values in the
/// leading corner (ComfyUI's `pad_weight`: an IC-Light UNet's input convolution, wider than the
/// model's, before the IC-Light difference is added).
pub struct PaddedWeights {
    inner: Arc<dyn MappedWeights>,
    /// Name → the shape it reads as.
    padded: HashMap<String, Vec<usize>>,
}

impl PaddedWeights {
    pub fn new(inner: Arc<dyn MappedWeights>, padded: HashMap<String, Vec<usize>>) -> Self {
        PaddedWeights { inner, padded }
    }
}

impl TensorShapes for PaddedWeights {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        match self.padded.get(name) {
            Some(shape) => Some(shape),
            None => self.inner.shape(name),
        }
    }

    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        self.inner.tensor_names()
    }
}

impl MappedWeights for PaddedWeights {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn elements(&self, name: &str) -> Option<Elements<'_>> {
        match self.padded.contains_key(name) {
            true => None,
            false => self.inner.elements(name),
        }
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.inner.load(name, dtype, device)?;
        let Some(shape) = self.padded.get(name) else {
            return Ok(tensor);
        };
        if shape.len() != tensor.rank() || shape.iter().zip(tensor.dims()).any(|(padded, own)| padded < own) {
            candle_core::bail!("'{name}' of shape {:?} cannot be padded to {shape:?}", tensor.dims());
        }
        shape.iter().enumerate().try_fold(tensor, |tensor, (dim, &size)| {
            let own = tensor.dim(dim)?;
            tensor.pad_with_zeros(dim, 0, size - own)
        })
    }
}

/// Two weight files seen as one: the tensors `top` holds among `top_names`, and for every other
/// name the tensor `base` holds under `base_prefix` (a control-LoRA's own tensors over the UNet
/// of the model it controls).
pub struct LayeredWeights {
    top: Arc<dyn MappedWeights>,
    top_names: HashSet<String>,
    base: Arc<dyn MappedWeights>,
    base_prefix: String,
}

impl LayeredWeights {
    pub fn new(
        top: Arc<dyn MappedWeights>,
        top_names: HashSet<String>,
        base: Arc<dyn MappedWeights>,
        base_prefix: &str,
    ) -> Self {
        LayeredWeights {
            top,
            top_names,
            base,
            base_prefix: base_prefix.to_string(),
        }
    }

    /// Where the tensor `name` comes from, and its name there.
    fn source(&self, name: &str) -> (&dyn MappedWeights, String) {
        if self.top_names.contains(name) {
            (self.top.as_ref(), name.to_string())
        } else {
            (self.base.as_ref(), format!("{}{name}", self.base_prefix))
        }
    }
}

impl TensorShapes for LayeredWeights {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        if self.top_names.contains(name) {
            self.top.shape(name)
        } else {
            self.base.shape(&format!("{}{name}", self.base_prefix))
        }
    }

    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        let base = self
            .base
            .tensor_names()
            .filter_map(|name| name.strip_prefix(self.base_prefix.as_str()))
            .filter(|name| !self.top_names.contains(*name));
        Box::new(self.top_names.iter().map(String::as_str).chain(base))
    }
}

impl MappedWeights for LayeredWeights {
    fn path(&self) -> &Path {
        self.top.path()
    }

    fn elements(&self, name: &str) -> Option<Elements<'_>> {
        let (file, name) = self.source(name);
        file.elements(&name)
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let (file, name) = self.source(name);
        file.load(&name, dtype, device)
    }
}

/// `bytes` as `T` values, where they are aligned for `T` on a little-endian machine.
pub(crate) fn cast_in_place<T>(bytes: &[u8]) -> Option<&[T]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: only used for f32, f16 and bf16, plain values for which every bit pattern is valid.
    let (prefix, values, suffix) = unsafe { bytes.align_to::<T>() };
    (prefix.is_empty() && suffix.is_empty()).then_some(values)
}

/// One tensor's place in a file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: FileDtype,
    pub shape: Vec<usize>,
    byte_range: std::ops::Range<usize>,
}

/// A memory-mapped safetensors file with its validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    tensors: HashMap<String, TensorEntry>,
}

impl SafetensorsFile {
    /// Maps the file and checks its header: header length, JSON, dtypes, and that every tensor's
    /// bytes lie inside the file and do not overlap.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let io_error = |source| WeightsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        // SAFETY: the map is read-only; like every safetensors reader we rely on model files not
        // being truncated while they are in use.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        let (header_length, metadata) = SafeTensors::read_metadata(&map).map_err(|error| WeightsError::Invalid {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
        let data_start = 8 + header_length;
        let tensors = entries(&metadata, data_start);
        // Start reading the tensors in while the caller builds its model: they are copied or
        // read in place soon after. Only a hint: a kernel that ignores it costs nothing.
        let _ = map.advise(Advice::WillNeed);
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            tensors,
        })
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }
}

impl MappedWeights for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    /// fp8 data, or f32, f16 or bf16 data at an address aligned for its type.
    fn elements(&self, name: &str) -> Option<Elements<'_>> {
        let entry = self.tensors.get(name)?;
        let bytes = &self.map[entry.byte_range.clone()];
        match entry.dtype {
            FileDtype::F32 => cast_in_place::<f32>(bytes).map(Elements::F32),
            FileDtype::F16 => cast_in_place::<f16>(bytes).map(Elements::F16),
            FileDtype::BF16 => cast_in_place::<bf16>(bytes).map(Elements::BF16),
            dtype => Fp8Format::of(dtype).map(|format| Elements::F8(bytes, format)),
        }
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("'{}' has no tensor '{name}'", self.path.display())))?;
        let bytes = &self.map[entry.byte_range.clone()];
        if dtype == DType::F32 && matches!(device, Device::Cpu) {
            if let Some(values) = widen_to_f32(bytes, entry.dtype) {
                return Tensor::from_vec(values, entry.shape.as_slice(), device);
            }
        }
        let tensor = match Fp8Format::of(entry.dtype) {
            Some(format) => {
                let mut values = vec![0f32; bytes.len()];
                format.decode(bytes, &mut values);
                Tensor::from_vec(values, entry.shape.as_slice(), device)?
            }
            None => {
                let file_dtype = entry.dtype;
                let candle_dtype = DType::try_from(file_dtype).map_err(|_| {
                    candle_core::Error::Msg(
                        WeightsError::UnsupportedDtype {
                            path: self.path.clone(),
                            name: name.to_string(),
                            dtype: file_dtype,
                        }
                        .to_string(),
                    )
                })?;
                Tensor::from_raw_buffer(bytes, candle_dtype, &entry.shape, device)?
            }
        };
        if tensor.dtype() == dtype {
            Ok(tensor)
        } else {
            tensor.to_dtype(dtype)
        }
    }
}

/// f16 or bf16 file data widened to f32 on all threads (the bulk of loading a checkpoint), with
/// the `half` crate's vectorised slice conversion (F16C for f16); `None` for other dtypes.
fn widen_to_f32(bytes: &[u8], dtype: FileDtype) -> Option<Vec<f32>> {
    /// Values per parallel task: large enough to amortise scheduling, small enough to share out.
    const CHUNK: usize = 1 << 16;
    let mut values = vec![0f32; bytes.len() / 2];
    match dtype {
        FileDtype::F16 => widen_halves::<f16>(bytes, &mut values, CHUNK),
        FileDtype::BF16 => widen_halves::<bf16>(bytes, &mut values, CHUNK),
        _ => return None,
    }
    Some(values)
}

/// Fills `values` from the little-endian 16-bit floats in `bytes`, `chunk` values per task.
fn widen_halves<H: HalfFloat>(bytes: &[u8], values: &mut [f32], chunk: usize) {
    // SAFETY: `H` is a plain 16-bit value for which every bit pattern is valid.
    let (prefix, halves, _) = unsafe { bytes.align_to::<H>() };
    if prefix.is_empty() && cfg!(target_endian = "little") {
        values
            .par_chunks_mut(chunk)
            .zip(halves.par_chunks(chunk))
            .for_each(|(out, input)| H::widen(input, out));
    } else {
        values
            .par_chunks_mut(chunk)
            .zip(bytes.par_chunks(2 * chunk))
            .for_each(|(out, input)| {
                for (value, pair) in out.iter_mut().zip(input.chunks_exact(2)) {
                    *value = H::from_le_bytes([pair[0], pair[1]]);
                }
            });
    }
}

/// f16 and bf16, widened in bulk.
trait HalfFloat: Copy + Send + Sync {
    fn widen(input: &[Self], out: &mut [f32]);
    fn from_le_bytes(bytes: [u8; 2]) -> f32;
}

impl HalfFloat for f16 {
    fn widen(input: &[Self], out: &mut [f32]) {
        input.convert_to_f32_slice(out);
    }
    fn from_le_bytes(bytes: [u8; 2]) -> f32 {
        f16::from_le_bytes(bytes).to_f32()
    }
}

impl HalfFloat for bf16 {
    fn widen(input: &[Self], out: &mut [f32]) {
        input.convert_to_f32_slice(out);
    }
    fn from_le_bytes(bytes: [u8; 2]) -> f32 {
        bf16::from_le_bytes(bytes).to_f32()
    }
}

fn entries(metadata: &Metadata, data_start: usize) -> HashMap<String, TensorEntry> {
    metadata
        .tensors()
        .into_iter()
        .map(|(name, info): (String, &TensorInfo)| {
            let (start, end) = info.data_offsets;
            let entry = TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                byte_range: data_start + start..data_start + end,
            };
            (name, entry)
        })
        .collect()
}

/// `tensor`'s values rounded to `format` (and back), in its dtype.
fn rounded_to(tensor: &Tensor, format: Fp8Format) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let table = format.values();
    let rounded: Vec<f32> = values
        .iter()
        .map(|&value| table[usize::from(format.encode(value))])
        .collect();
    Tensor::from_vec(rounded, tensor.shape(), tensor.device())?.to_dtype(tensor.dtype())
}

/// `elements` rounded to `format`, on all threads.
fn encode_elements(elements: Elements, format: Fp8Format) -> Vec<u8> {
    /// Values per parallel task.
    const CHUNK: usize = 1 << 16;
    let mut bytes = vec![0u8; elements.len()];
    bytes
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(task, out)| match elements {
            Elements::F16(values) => {
                let values = &values[task * CHUNK..task * CHUNK + out.len()];
                for (byte, value) in out.iter_mut().zip(values) {
                    *byte = format.encode_f16(*value);
                }
            }
            elements => {
                let mut values = vec![0f32; out.len()];
                elements.read(task * CHUNK, 1, &mut values);
                for (byte, value) in out.iter_mut().zip(&values) {
                    *byte = format.encode(*value);
                }
            }
        });
    bytes
}

/// A [`VarBuilder`] backend over a shared mapped file.
struct FileBackend(Arc<dyn MappedWeights>);

impl SimpleBackend for FileBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hints: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::Msg(format!(
                "'{}': tensor '{name}' has shape {:?}, the model expects {:?}",
                self.0.path().display(),
                tensor.dims(),
                shape.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.0.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.has(name)
    }
}

/// What model code builds its layers from: candle's `VarBuilder` for every tensor, and the
/// mapped file itself where the model computes in f32 on the CPU, so that weight matrices are
/// read in place; with the precision the CPU kernels multiply them in, the LoRA patches
/// applied to the matrices, and the fp8 format the weights are stored in, if any.
#[derive(Clone)]
pub struct Weights {
    builder: VarBuilder<'static>,
    mapped: Option<Arc<dyn MappedWeights>>,
    precision: Precision,
    patches: WeightPatches,
    stored_as: Option<Fp8Format>,
}

impl Weights {
    /// The tensors of `file`, in `dtype` on `device`.
    pub fn from_file(file: Arc<dyn MappedWeights>, dtype: DType, device: &Device) -> Self {
        let mapped = (dtype == DType::F32 && device.is_cpu()).then(|| file.clone());
        Weights {
            builder: VarBuilder::from_backend(Box::new(FileBackend(file)), dtype, device.clone()),
            mapped,
            precision: Precision::F32,
            patches: WeightPatches::default(),
            stored_as: None,
        }
    }

    /// The same weights, their matrices multiplied in `precision` by the CPU kernels.
    pub fn with_precision(self, precision: Precision) -> Self {
        Weights { precision, ..self }
    }

    /// The same weights with `patches` applied to the matrices (a copy of each matrix patched).
    pub fn with_patches(self, patches: WeightPatches) -> Self {
        Weights { patches, ..self }
    }

    /// The same weights stored in `format` where it is given: every tensor rounded to it (after
    /// its patches) and every matrix kept in it, as ComfyUI stores a model loaded with an fp8
    /// `weight_dtype` (a quarter of the memory of f32 copies, half of f16 ones).
    pub fn stored_as(self, format: Option<Fp8Format>) -> Self {
        Weights {
            stored_as: format,
            ..self
        }
    }

    /// The device the model's tensors are copied to.
    pub fn device(&self) -> &Device {
        self.builder.device()
    }

    /// The dtype the model's tensors are copied in.
    pub fn dtype(&self) -> DType {
        self.builder.dtype()
    }

    /// The weights under `prefix` (joined with a dot, as `VarBuilder::pp`).
    pub fn pp(&self, prefix: impl ToString) -> Self {
        Weights {
            builder: self.builder.pp(prefix),
            mapped: self.mapped.clone(),
            precision: self.precision,
            patches: self.patches.clone(),
            stored_as: self.stored_as,
        }
    }

    /// The tensor `name`, which must have `shape`, copied in the model's dtype (patched where
    /// patches change it, rounded to the format the weights are stored in).
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> candle_core::Result<Tensor> {
        self.get_with_hints(shape, name, candle_nn::Init::Const(0.0))
    }

    /// [`Weights::get`] with the initialisation candle's layers declare (which the test-model
    /// writer follows: norm weights are ones).
    fn get_with_hints(
        &self,
        shape: impl Into<Shape>,
        name: &str,
        hints: candle_nn::Init,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let full_name = self.full_name(name);
        // A patch that widens the tensor (to `shape`) reads it at its own shape first.
        let base = match self.patches.padded_shape(&full_name) {
            Some(padded) if padded == shape.dims() => self.builder.get_unchecked(name)?,
            _ => self.builder.get_with_hints(shape, name, hints)?,
        };
        let tensor = self.patches.apply(&full_name, base)?;
        match self.stored_as {
            Some(format) => rounded_to(&tensor, format),
            None => Ok(tensor),
        }
    }

    /// A group norm over `channels` in `groups` with this module's `weight` and `bias`.
    pub fn group_norm(&self, groups: usize, channels: usize, eps: f64) -> candle_core::Result<candle_nn::GroupNorm> {
        let (weight, bias) = self.norm_parameters(channels)?;
        candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)
    }

    /// A layer norm over the last `size` values with this module's `weight` and `bias`.
    pub fn layer_norm(&self, size: usize, eps: f64) -> candle_core::Result<candle_nn::LayerNorm> {
        let (weight, bias) = self.norm_parameters(size)?;
        Ok(candle_nn::LayerNorm::new(weight, bias, eps))
    }

    /// A norm's `weight` (initially ones) and `bias` (zeros) over `size` values.
    fn norm_parameters(&self, size: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let weight = self.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        Ok((weight, self.get(size, "bias")?))
    }

    /// `name` with the prefix, as the file names it.
    fn full_name(&self, name: &str) -> String {
        let prefix = self.builder.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }

    /// The weight matrix `name`, which must have `shape`: in place where the file is mapped and
    /// holds it in f32, f16, bf16 or fp8 and no patch changes it, else a copy (in the file's
    /// precision where patched on the CPU, else in the model's dtype); kept in the format the
    /// weights are stored in, if any.
    pub fn matrix(&self, shape: impl Into<Shape>, name: &str) -> candle_core::Result<WeightMatrix> {
        let matrix = self.matrix_as_found(shape.into(), name)?;
        match self.stored_as {
            Some(format) => matrix.stored_as(format),
            None => Ok(matrix),
        }
    }

    /// [`Weights::matrix`] before any rounding to the stored format.
    fn matrix_as_found(&self, shape: Shape, name: &str) -> candle_core::Result<WeightMatrix> {
        let dims = shape.dims();
        let full_name = self.full_name(name);
        let in_place = self
            .mapped
            .as_ref()
            .and_then(|file| file.elements(&full_name).map(|elements| (file, elements)));
        let widened = self.patches.padded_shape(&full_name) == Some(dims);
        if let (Some((file, _)), false) = (in_place, widened) {
            if file.shape(&full_name) != Some(dims) {
                return Err(candle_core::Error::Msg(format!(
                    "'{}': tensor '{full_name}' has shape {:?}, the model expects {dims:?}",
                    file.path().display(),
                    file.shape(&full_name).unwrap_or_default(),
                )));
            }
        }
        if self.patches.touches(&full_name) {
            // Patched in f32, then kept in the file's precision, as ComfyUI rounds patched
            // weights back to their dtype: the patched model needs no more memory than the file.
            // (fp8 weights are kept in f16: ComfyUI rounds them back to fp8 stochastically.)
            if let (Some((file, elements)), Some(&rows)) = (in_place, dims.first()) {
                let cols = shape.elem_count() / rows.max(1);
                // Quantized weights stay in place: their products add the LoRA's update.
                if let (Elements::Ggml(..), Some(low_rank)) =
                    (elements, self.patches.low_rank_updates(&full_name, rows, cols)?)
                {
                    return Ok(self.mapped_matrix(file, full_name, dims, Some(Arc::new(low_rank))));
                }
                if let Some(tensor) = self
                    .patches
                    .apply_low_rank_in_blocks(&full_name, elements, rows, cols)?
                {
                    return Ok(self.matrix_of(tensor.reshape(dims)?));
                }
            }
            let patched = self.get(shape, name)?;
            let tensor = match in_place.map(|(_, elements)| elements) {
                Some(Elements::F16(_) | Elements::F8(..) | Elements::Ggml(..)) => patched.to_dtype(DType::F16)?,
                Some(Elements::BF16(_)) => patched.to_dtype(DType::BF16)?,
                _ => patched,
            };
            return Ok(self.matrix_of(tensor));
        }
        if let Some((file, _)) = in_place {
            return Ok(self.mapped_matrix(file, full_name, dims, None));
        }
        Ok(self.matrix_of(self.builder.get(shape, name)?))
    }

    /// The matrix `name` of `dims` read in place from `file`, with `low_rank` updates if any.
    fn mapped_matrix(
        &self,
        file: &Arc<dyn MappedWeights>,
        name: String,
        dims: &[usize],
        low_rank: Option<Arc<Vec<LowRankUpdate>>>,
    ) -> WeightMatrix {
        WeightMatrix {
            shape: dims.to_vec(),
            storage: MatrixStorage::Mapped {
                file: file.clone(),
                name,
            },
            precision: self.precision,
            low_rank,
        }
    }

    /// A weight matrix held as `tensor`, multiplied in these weights' precision.
    fn matrix_of(&self, tensor: Tensor) -> WeightMatrix {
        WeightMatrix {
            shape: tensor.dims().to_vec(),
            storage: MatrixStorage::Tensor(tensor),
            precision: self.precision,
            low_rank: None,
        }
    }
}

/// Where a network's weights come from, kept with the network so that it can be built again
/// with more LoRA patches without reading its file again: the mapped file, the prefix of the
/// network's tensors there, how the network computes, and the fp8 format it is stored in, if
/// any ([`Weights::stored_as`]).
#[derive(Clone)]
pub struct WeightSource {
    pub file: Arc<dyn MappedWeights>,
    /// The tensor name prefix, without its final dot (`model.diffusion_model`).
    pub prefix: String,
    pub device: Device,
    pub precision: Precision,
    pub patches: WeightPatches,
    pub stored_as: Option<Fp8Format>,
}

impl WeightSource {
    /// The tensors under `prefix` (with or without its final dot; empty for the root) of
    /// `file`, unpatched, their matrices multiplied in `precision`.
    pub fn new(file: Arc<dyn MappedWeights>, prefix: &str, device: &Device, precision: Precision) -> Self {
        WeightSource {
            file,
            prefix: prefix.trim_end_matches('.').to_string(),
            device: device.clone(),
            precision,
            patches: WeightPatches::default(),
            stored_as: None,
        }
    }

    /// The same source with `more` patches after its own.
    pub fn patched(&self, more: HashMap<String, Vec<Patch>>) -> WeightSource {
        WeightSource {
            patches: self.patches.and(more),
            ..self.clone()
        }
    }

    /// The network's weights, computing in f32.
    pub fn weights(&self) -> Weights {
        let weights = Weights::from_file(self.file.clone(), DType::F32, &self.device)
            .with_precision(self.precision)
            .with_patches(self.patches.clone())
            .stored_as(self.stored_as);
        if self.prefix.is_empty() {
            weights
        } else {
            weights.pp(&self.prefix)
        }
    }

    /// What the network's tensor names start with: the prefix and its dot, or nothing for a
    /// network at the root of its file.
    pub fn name_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}.", self.prefix)
        }
    }
}

/// Weights from any `VarBuilder`, every tensor copied through it.
impl From<VarBuilder<'static>> for Weights {
    fn from(builder: VarBuilder<'static>) -> Self {
        Weights {
            builder,
            mapped: None,
            precision: Precision::F32,
            patches: WeightPatches::default(),
            stored_as: None,
        }
    }
}

/// A layer's weight matrix ([out, in], or a convolution's [out, in, k, k]) and the precision
/// the CPU kernels multiply it in; for quantized weights a LoRA patches, the low-rank updates
/// the products add instead of a patched copy.
pub struct WeightMatrix {
    shape: Vec<usize>,
    storage: MatrixStorage,
    precision: Precision,
    /// Shared behind one pointer: matrices are many, and all but a few have none.
    low_rank: Option<Arc<Vec<LowRankUpdate>>>,
}

/// A low-rank difference `factor·up·down` (up [out, rank], down [rank, in]) that a matrix's
/// products add as `factor·(x·downᵀ)·upᵀ`, so that a LoRA on ggml-quantized weights (as
/// ComfyUI-GGUF patches them on the fly) needs no dense copy of the matrix. The factors are the
/// LoRA's own tensors (shared with its patches, in the file's precision), contiguous on the CPU
/// in f32, f16 or bf16, as [`LowRankUpdate::new`] makes them.
#[derive(Clone)]
pub struct LowRankUpdate {
    up: Tensor,
    down: Tensor,
    pub rank: usize,
    pub factor: f32,
}

/// One [`LowRankUpdate`] with its factors read in place.
#[derive(Clone, Copy)]
pub struct LowRankFactors<'a> {
    pub up: Elements<'a>,
    pub down: Elements<'a>,
    pub rank: usize,
    pub factor: f32,
}

impl LowRankUpdate {
    /// `factor·up·down` for 2-D `up` [rows, rank] and `down` [rank, cols]; factors the CPU
    /// kernels cannot read in place are copied to the CPU in f32.
    pub fn new(up: Tensor, down: Tensor, factor: f32) -> candle_core::Result<Self> {
        let readable = |tensor: Tensor| -> candle_core::Result<Tensor> {
            let in_place = tensor.device().is_cpu()
                && tensor.is_contiguous()
                && matches!(tensor.dtype(), DType::F32 | DType::F16 | DType::BF16);
            match in_place {
                true => Ok(tensor),
                false => tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous(),
            }
        };
        let rank = down.dim(0)?;
        Ok(LowRankUpdate {
            up: readable(up)?,
            down: readable(down)?,
            rank,
            factor,
        })
    }

    /// `factor·up·down` in f32, of shape [rows, cols].
    fn difference(&self) -> candle_core::Result<Tensor> {
        self.up.to_dtype(DType::F32)?.matmul(&self.down.to_dtype(DType::F32)?)? * f64::from(self.factor)
    }

    /// Runs `f` on the factors of `updates`, read in place.
    pub fn with_factors<R>(
        updates: &[LowRankUpdate],
        f: impl FnOnce(&[LowRankFactors]) -> R,
    ) -> candle_core::Result<R> {
        let guards: Vec<_> = updates
            .iter()
            .map(|update| [update.up.storage_and_layout(), update.down.storage_and_layout()])
            .collect();
        let factors = updates
            .iter()
            .zip(&guards)
            .map(|(update, [(up, up_layout), (down, down_layout)])| {
                Ok(LowRankFactors {
                    up: factor_elements(up, up_layout, &update.up)?,
                    down: factor_elements(down, down_layout, &update.down)?,
                    rank: update.rank,
                    factor: update.factor,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(f(&factors))
    }
}

/// The elements of a [`LowRankUpdate`]'s factor `tensor` (its storage and layout held).
fn factor_elements<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    tensor: &Tensor,
) -> candle_core::Result<Elements<'a>> {
    cpu_elements(storage, layout, tensor.elem_count())
        .ok_or_else(|| candle_core::Error::Msg("a low-rank factor is not readable in place".into()))
}

/// The `count` elements of contiguous CPU storage in f32, f16 or bf16; `None` for others.
fn cpu_elements<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
    count: usize,
) -> Option<Elements<'a>> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        return None;
    };
    if !layout.is_contiguous() {
        return None;
    }
    let range = layout.start_offset()..layout.start_offset() + count;
    match cpu {
        candle_core::CpuStorage::F32(values) => values.get(range).map(Elements::F32),
        candle_core::CpuStorage::F16(values) => values.get(range).map(Elements::F16),
        candle_core::CpuStorage::BF16(values) => values.get(range).map(Elements::BF16),
        _ => None,
    }
}

enum MatrixStorage {
    /// In the mapped file, in the file's precision.
    Mapped { file: Arc<dyn MappedWeights>, name: String },
    /// A tensor in the model's dtype, on the model's device.
    Tensor(Tensor),
    /// Rounded to an fp8 format, in memory.
    Fp8 { bytes: Vec<u8>, format: Fp8Format },
}

impl WeightMatrix {
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The matrix as an f32 tensor (a copy where it is mapped or kept in half precision, with
    /// its low-rank updates added), for candle's operations.
    pub fn tensor(&self) -> candle_core::Result<Tensor> {
        let mut tensor = self.base_tensor()?;
        for update in self.low_rank() {
            tensor = (tensor + update.difference()?.reshape(self.shape.as_slice())?)?;
        }
        Ok(tensor)
    }

    /// The low-rank updates the matrix's products add (none but for LoRAs on quantized weights).
    pub fn low_rank(&self) -> &[LowRankUpdate] {
        self.low_rank.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The stored matrix as an f32 tensor, without its low-rank updates.
    fn base_tensor(&self) -> candle_core::Result<Tensor> {
        match &self.storage {
            MatrixStorage::Mapped { file, name } => file.load(name, DType::F32, &Device::Cpu),
            MatrixStorage::Tensor(tensor) => tensor.to_dtype(DType::F32),
            MatrixStorage::Fp8 { bytes, format } => {
                let mut values = vec![0f32; bytes.len()];
                format.decode(bytes, &mut values);
                Tensor::from_vec(values, self.shape.as_slice(), &Device::Cpu)
            }
        }
    }

    /// The matrix kept in `format`: where it is not already, its elements rounded to it in
    /// memory (on the CPU), or its tensor's values rounded (other devices).
    fn stored_as(self, format: Fp8Format) -> candle_core::Result<WeightMatrix> {
        let bytes = self.with_elements(|elements| match elements {
            Elements::F8(_, stored) if stored == format => None,
            elements => Some(encode_elements(elements, format)),
        })?;
        let storage = match (bytes, self.storage) {
            (Some(Some(bytes)), _) => MatrixStorage::Fp8 { bytes, format },
            (Some(None), storage) => storage,
            (None, MatrixStorage::Tensor(tensor)) => MatrixStorage::Tensor(rounded_to(&tensor, format)?),
            (None, storage) => storage,
        };
        Ok(WeightMatrix { storage, ..self })
    }

    /// Runs `f` on the elements where the CPU kernels can read them (mapped data, fp8 bytes, or
    /// a contiguous CPU tensor in f32, f16 or bf16); `None` for other devices and dtypes, and
    /// for a matrix with low-rank updates (which [`WeightMatrix::tensor`] adds).
    pub fn with_elements<R>(&self, f: impl FnOnce(Elements) -> R) -> candle_core::Result<Option<R>> {
        if !self.low_rank().is_empty() {
            return Ok(None);
        }
        self.with_base_elements(f)
    }

    /// [`WeightMatrix::with_elements`] on the stored matrix, for kernels that add its
    /// [`WeightMatrix::low_rank`] updates themselves.
    pub fn with_base_elements<R>(&self, f: impl FnOnce(Elements) -> R) -> candle_core::Result<Option<R>> {
        match &self.storage {
            MatrixStorage::Mapped { file, name } => Ok(file.elements(name).map(f)),
            MatrixStorage::Fp8 { bytes, format } => Ok(Some(f(Elements::F8(bytes, *format)))),
            MatrixStorage::Tensor(tensor) => {
                let (storage, layout) = tensor.storage_and_layout();
                Ok(cpu_elements(&storage, layout, tensor.elem_count()).map(f))
            }
        }
    }

    /// Row `row` of a 2-D matrix (an embedding's vector) as a tensor on `device`.
    pub fn row(&self, row: usize, device: &Device) -> candle_core::Result<Tensor> {
        let width = self.shape.get(1).copied().unwrap_or(0);
        if row >= self.shape.first().copied().unwrap_or(0) {
            return Err(candle_core::Error::Msg(format!(
                "row {row} is out of range for a matrix of shape {:?}",
                self.shape
            )));
        }
        if let MatrixStorage::Tensor(tensor) = &self.storage {
            return tensor.get(row)?.to_dtype(DType::F32);
        }
        let values = self.with_elements(|elements| {
            let mut values = vec![0f32; width];
            elements.read(row * width, 1, &mut values);
            values
        })?;
        match values {
            Some(values) => Tensor::from_vec(values, width, device),
            None => self.tensor()?.get(row)?.to_device(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of `tensors` (name, dtype, shape, data) stored back to back in that
    /// order, the data starting 8-byte aligned.
    fn handmade_file(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> (tempfile::TempDir, Arc<SafetensorsFile>) {
        let mut offset = 0;
        let entries: Vec<String> = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                let entry = format!(
                    "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{offset},{}]}}",
                    offset + data.len()
                );
                offset += data.len();
                entry
            })
            .collect();
        let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
        header.resize(header.len().div_ceil(8) * 8, b' ');
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        tensors.iter().for_each(|(_, _, _, data)| bytes.extend(data));
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("weights.safetensors");
        std::fs::write(&path, bytes).expect("file written");
        let file = SafetensorsFile::open(&path).expect("valid file");
        (dir, Arc::new(file))
    }

    /// Every element of `matrix` as the CPU kernels read it, with the name of its precision.
    fn read_in_place(matrix: &WeightMatrix) -> Option<(&'static str, Vec<f32>)> {
        matrix
            .with_elements(|elements| {
                let mut values = vec![0f32; elements.len()];
                elements.read(0, 1, &mut values);
                let precision = match elements {
                    Elements::F32(_) => "f32",
                    Elements::F16(_) => "f16",
                    Elements::BF16(_) => "bf16",
                    Elements::F8(_, Fp8Format::E4M3Fn) => "fp8_e4m3fn",
                    Elements::F8(_, Fp8Format::E5M2) => "fp8_e5m2",
                    Elements::Ggml(_, kind) => kind.name(),
                };
                (precision, values)
            })
            .expect("readable")
    }

    const VALUES: [f32; 6] = [0.5, -1.25, 3.0, 0.0, -0.375, 96.0];

    #[test]
    fn weight_matrices_are_read_in_place_in_the_files_precision() {
        type Encode = fn(f32) -> Vec<u8>;
        let encodings: [(&str, &str, Encode); 3] = [
            ("F32", "f32", |v| v.to_le_bytes().to_vec()),
            ("F16", "f16", |v| f16::from_f32(v).to_le_bytes().to_vec()),
            ("BF16", "bf16", |v| bf16::from_f32(v).to_le_bytes().to_vec()),
        ];
        for (dtype, precision, encode) in encodings {
            let data = VALUES.iter().flat_map(|&v| encode(v)).collect();
            let (_dir, file) = handmade_file(&[("layer.weight", dtype, vec![2, 3], data)]);
            let weights = Weights::from_file(file.clone(), DType::F32, &Device::Cpu).pp("layer");
            let matrix = weights.matrix((2, 3), "weight").expect("matrix");
            assert!(matches!(matrix.storage, MatrixStorage::Mapped { .. }), "{dtype}");
            assert_eq!(read_in_place(&matrix), Some((precision, VALUES.to_vec())));
            assert_eq!(
                matrix.row(1, &Device::Cpu).and_then(|r| r.to_vec1::<f32>()).ok(),
                Some(VALUES[3..].to_vec())
            );
            assert!(matrix.row(2, &Device::Cpu).is_err());
            assert_eq!(
                matrix.tensor().and_then(|t| t.flatten_all()?.to_vec1::<f32>()).ok(),
                Some(VALUES.to_vec())
            );
            let error = weights
                .matrix((3, 2), "weight")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains("has shape [2, 3], the model expects [3, 2]"), "{error}");
            // In f16 on the CPU, the model gets copies in its dtype.
            let copied = Weights::from_file(file, DType::F16, &Device::Cpu)
                .pp("layer")
                .matrix((2, 3), "weight");
            assert!(matches!(copied.map(|m| m.storage), Ok(MatrixStorage::Tensor(t)) if t.dtype() == DType::F16));
        }
    }

    #[test]
    fn fp8_matrices_are_read_in_place_and_other_fp8_tensors_widened() {
        // 0.5, -1.25, 3, 0, -0.375, 96 in e4m3fn and e5m2.
        for (dtype, format, bytes) in [
            ("F8_E4M3", "fp8_e4m3fn", vec![0x30, 0xba, 0x44, 0x00, 0xac, 0x6c]),
            ("F8_E5M2", "fp8_e5m2", vec![0x38, 0xbd, 0x42, 0x00, 0xb6, 0x56]),
        ] {
            let (_dir, file) = handmade_file(&[("layer.weight", dtype, vec![2, 3], bytes)]);
            let weights = Weights::from_file(file, DType::F32, &Device::Cpu).pp("layer");
            let matrix = weights.matrix((2, 3), "weight").expect("matrix");
            assert!(matches!(matrix.storage, MatrixStorage::Mapped { .. }), "{dtype}");
            assert_eq!(read_in_place(&matrix), Some((format, VALUES.to_vec())));
            let tensor = weights
                .get((2, 3), "weight")
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>());
            assert_eq!(tensor.ok(), Some(VALUES.to_vec()));
        }
    }

    /// Stored as fp8 (ComfyUI's `weight_dtype`), f16 weights are rounded to the nearest fp8
    /// value: matrices kept as fp8 bytes, other tensors rounded in the model's dtype; weights
    /// already in that format stay in place.
    #[test]
    fn weights_stored_as_fp8_are_rounded_to_it() {
        let values = [0.3f32, -1.1, 3.0, 100.0, -0.01, 440.0];
        let halves: Vec<u8> = values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let (_dir, file) = handmade_file(&[
            ("layer.weight", "F16", vec![2, 3], halves.clone()),
            ("layer.bias", "F16", vec![6], halves),
            ("fp8.weight", "F8_E4M3", vec![1, 2], vec![0x38, 0xb8]),
        ]);
        for format in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
            let expected: Vec<f32> = values
                .iter()
                .map(|&v| format.values()[usize::from(format.encode(f16::from_f32(v).to_f32()))])
                .collect();
            let weights = Weights::from_file(file.clone(), DType::F32, &Device::Cpu).stored_as(Some(format));
            let matrix = weights.pp("layer").matrix((2, 3), "weight").expect("matrix");
            assert!(matches!(matrix.storage, MatrixStorage::Fp8 { .. }));
            assert_eq!(read_in_place(&matrix), Some((format.name(), expected.clone())));
            let bias = weights.pp("layer").get(6, "bias").and_then(|t| t.to_vec1::<f32>());
            assert_eq!(bias.ok(), Some(expected.clone()));
            let already = weights.pp("fp8").matrix((1, 2), "weight").expect("matrix");
            let stays_mapped = matches!(already.storage, MatrixStorage::Mapped { .. });
            assert_eq!(stays_mapped, format == Fp8Format::E4M3Fn, "{format:?}");
            assert_eq!(read_in_place(&already).map(|(_, values)| values), Some(vec![1.0, -1.0]));
        }
        // 500 is beyond e4m3fn's range: NaN, as PyTorch's cast gives.
        let e4m3 = Fp8Format::E4M3Fn;
        assert!(e4m3.values()[usize::from(e4m3.encode(500.0))].is_nan());
    }

    #[test]
    fn misaligned_weights_are_copied_and_still_computed_on() {
        let data = VALUES.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (_dir, file) = handmade_file(&[("pad", "F16", vec![1], vec![0, 0]), ("weight", "F32", vec![2, 3], data)]);
        let matrix = Weights::from_file(file, DType::F32, &Device::Cpu)
            .matrix((2, 3), "weight")
            .expect("matrix");
        assert!(matches!(matrix.storage, MatrixStorage::Tensor(_)));
        assert_eq!(read_in_place(&matrix), Some(("f32", VALUES.to_vec())));
    }

    #[test]
    fn half_floats_widen_exactly_at_any_alignment() {
        let bytes: Vec<u8> = (0..2001u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for dtype in [FileDtype::F16, FileDtype::BF16] {
            let scalar = |pair: &[u8]| match dtype {
                FileDtype::F16 => f16::from_le_bytes([pair[0], pair[1]]).to_f32(),
                _ => bf16::from_le_bytes([pair[0], pair[1]]).to_f32(),
            };
            // Offsets 0 and 1 take the aligned (vectorised) and the unaligned path; chunks of 7
            // values leave a partial chunk.
            for offset in [0, 1] {
                let slice = &bytes[offset..offset + 2000];
                let expected: Vec<f32> = slice.chunks_exact(2).map(scalar).collect();
                let mut widened = vec![0f32; 1000];
                match dtype {
                    FileDtype::F16 => widen_halves::<f16>(slice, &mut widened, 7),
                    _ => widen_halves::<bf16>(slice, &mut widened, 7),
                }
                assert_eq!(bits(&widened), bits(&expected));
                assert_eq!(widen_to_f32(slice, dtype).as_deref().map(bits), Some(bits(&expected)));
            }
        }
    }
}
