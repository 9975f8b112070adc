//! GGUF files (versions 2 and 3), as llama.cpp and ComfyUI-GGUF write them: memory-mapped, the
//! header parsed with every length checked against the file before anything is allocated for
//! it, and the tensors served in place in their ggml types ([`GgmlType`]), so that quantized
//! weights stay quantized and cost no memory beyond the file's pages.
//!
//! Candle's reader copies every tensor it loads out of the file (and trusts the header's
//! lengths); the gguf-rs crate parses but offers nothing for the data. This reader is the few
//! lines both would need around them. Tensor shapes are given in PyTorch's order (ggml lists the
//! fastest dimension first), or as ComfyUI-GGUF's `comfy.gguf.orig_shape.<name>` metadata says
//! where its converter reshaped a tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::{Advice, Mmap};

use crate::formats::ggml_quants::GgmlType;
use crate::kernels::sgemm::Elements;
use crate::weights::{cast_in_place, MappedWeights, TensorShapes};

/// The first four bytes of every GGUF file.
const MAGIC: &[u8; 4] = b"GGUF";
/// Tensor data alignment when the file does not give `general.alignment`.
const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: usize = 4;

/// Why a GGUF file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read '{path}': {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("'{path}' is not a valid GGUF file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("'{path}': tensor '{name}' has ggml type {type_name}, which Easel cannot read (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K)")]
    UnsupportedType {
        path: PathBuf,
        name: String,
        type_name: String,
    },
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetadataValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(text) => Some(text),
            _ => None,
        }
    }

    /// An integer value of any width, if it is one and not negative.
    pub fn as_usize(&self) -> Option<usize> {
        match *self {
            MetadataValue::U8(v) => Some(usize::from(v)),
            MetadataValue::U16(v) => Some(usize::from(v)),
            MetadataValue::U32(v) => usize::try_from(v).ok(),
            MetadataValue::U64(v) => usize::try_from(v).ok(),
            MetadataValue::I8(v) => usize::try_from(v).ok(),
            MetadataValue::I16(v) => usize::try_from(v).ok(),
            MetadataValue::I32(v) => usize::try_from(v).ok(),
            MetadataValue::I64(v) => usize::try_from(v).ok(),
            _ => None,
        }
    }

    /// The GGUF type id of the value.
    fn type_id(&self) -> u32 {
        match self {
            MetadataValue::U8(_) => 0,
            MetadataValue::I8(_) => 1,
            MetadataValue::U16(_) => 2,
            MetadataValue::I16(_) => 3,
            MetadataValue::U32(_) => 4,
            MetadataValue::I32(_) => 5,
            MetadataValue::F32(_) => 6,
            MetadataValue::Bool(_) => 7,
            MetadataValue::String(_) => 8,
            MetadataValue::Array(_) => 9,
            MetadataValue::U64(_) => 10,
            MetadataValue::I64(_) => 11,
            MetadataValue::F64(_) => 12,
        }
    }
}

/// One tensor's type, shape and place in the file.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub kind: GgmlType,
    /// In PyTorch's order (slowest dimension first).
    pub shape: Vec<usize>,
    byte_range: Range<usize>,
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    metadata: HashMap<String, MetadataValue>,
    tensors: HashMap<String, GgufTensor>,
}

impl GgufFile {
    /// Maps the file and parses its header: magic, version, metadata, tensor infos; every tensor
    /// must have a type Easel reads and lie inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io_error = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        // SAFETY: the map is read-only; like every model reader we rely on model files not being
        // truncated while they are in use.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        let invalid = |reason: String| GgufError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let (metadata, infos, data_start) = parse_header(&map).map_err(invalid)?;
        let mut tensors = HashMap::with_capacity(infos.len());
        for info in infos {
            let kind = GgmlType::from_id(info.type_id).ok_or_else(|| GgufError::UnsupportedType {
                path: path.to_path_buf(),
                name: info.name.clone(),
                type_name: ggml_type_name(info.type_id),
            })?;
            let elements = info.ggml_dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let bytes = elements.and_then(|elements| kind.bytes_of(elements)).ok_or_else(|| {
                invalid(format!(
                    "tensor '{}' ({:?} of {}) does not fill whole {} blocks",
                    info.name,
                    info.ggml_dims,
                    kind.name(),
                    kind.block_size()
                ))
            })?;
            // Blocks run along the fastest dimension: a row must hold whole blocks.
            if info.ggml_dims.first().is_some_and(|row| row % kind.block_size() != 0) {
                return Err(invalid(format!("tensor '{}' has rows of partial blocks", info.name)));
            }
            let start = data_start.checked_add(info.offset);
            let byte_range = match start.and_then(|start| start.checked_add(bytes).map(|end| start..end)) {
                Some(range) if range.end <= map.len() => range,
                _ => {
                    return Err(invalid(format!(
                        "the data of tensor '{}' ({bytes} bytes at offset {}) runs past the end of the file ({} bytes): the file is truncated",
                        info.name,
                        info.offset,
                        map.len()
                    )))
                }
            };
            let shape = original_shape(&metadata, &info.name)
                .filter(|shape: &Vec<usize>| shape.iter().product::<usize>() == elements.unwrap_or(0))
                .unwrap_or_else(|| info.ggml_dims.iter().rev().copied().collect());
            tensors.insert(
                info.name,
                GgufTensor {
                    kind,
                    shape,
                    byte_range,
                },
            );
        }
        let _ = map.advise(Advice::WillNeed);
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
        })
    }

    pub fn metadata(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`, if the file says.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata("general.architecture").and_then(MetadataValue::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.get(name)
    }

    /// The bytes of `name` in the map, in its ggml type.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensors
            .get(name)
            .map(|tensor| &self.map[tensor.byte_range.clone()])
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&str, &GgufTensor)> {
        self.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor))
    }
}

impl MappedWeights for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }

    /// Plain floats where aligned for their type, block types as they are.
    fn elements(&self, name: &str) -> Option<Elements<'_>> {
        let tensor = self.tensors.get(name)?;
        let bytes = &self.map[tensor.byte_range.clone()];
        match tensor.kind {
            GgmlType::F32 => cast_in_place::<f32>(bytes).map(Elements::F32),
            GgmlType::F16 => cast_in_place::<f16>(bytes).map(Elements::F16),
            GgmlType::BF16 => cast_in_place::<bf16>(bytes).map(Elements::BF16),
            kind => Some(Elements::Ggml(bytes, kind)),
        }
    }

    /// The tensor dequantized (as ComfyUI-GGUF dequantizes it), in `dtype` on `device`.
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("'{}' has no tensor '{name}'", self.path.display())))?;
        let bytes = &self.map[tensor.byte_range.clone()];
        let mut values = vec![0f32; tensor.shape.iter().product()];
        tensor.kind.dequantize_range(bytes, 0, &mut values);
        Tensor::from_vec(values, tensor.shape.as_slice(), device)?.to_dtype(dtype)
    }
}

impl TensorShapes for GgufFile {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|tensor| tensor.shape.as_slice())
    }

    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.tensors.keys().map(String::as_str))
    }
}

/// ComfyUI-GGUF's record of a tensor's shape before its converter reshaped it.
fn original_shape(metadata: &HashMap<String, MetadataValue>, name: &str) -> Option<Vec<usize>> {
    match metadata.get(&format!("comfy.gguf.orig_shape.{name}"))? {
        MetadataValue::Array(values) => values.iter().map(MetadataValue::as_usize).collect(),
        _ => None,
    }
}

/// ggml's name of a type id, for errors about types Easel does not read.
fn ggml_type_name(id: u32) -> String {
    let name = match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("{id} (unknown)"),
    };
    format!("{name} ({id})")
}

/// A tensor as the header describes it.
struct TensorInfo {
    name: String,
    /// ggml's order: fastest first.
    ggml_dims: Vec<usize>,
    type_id: u32,
    /// From the start of the tensor data.
    offset: usize,
}

type Header = (HashMap<String, MetadataValue>, Vec<TensorInfo>, usize);

fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    let mut reader = Reader { bytes, position: 0 };
    if reader.take(4)? != MAGIC {
        return Err("it does not start with 'GGUF'".into());
    }
    let version = reader.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} (Easel reads versions 2 and 3)"));
    }
    let tensor_count = reader.count(4 + 8 + 4 + 4 + 8)?;
    let metadata_count = reader.count(8 + 4)?;
    let mut metadata = HashMap::with_capacity(metadata_count);
    for _ in 0..metadata_count {
        let key = reader.string()?;
        let type_id = reader.u32()?;
        let value = reader
            .value(type_id, 0)
            .map_err(|error| format!("metadata '{key}': {error}"))?;
        metadata.insert(key, value);
    }
    let mut infos = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let name = reader.string()?;
        let dims = reader.u32()? as usize;
        if dims > MAX_DIMS {
            return Err(format!(
                "tensor '{name}' has {dims} dimensions (ggml allows {MAX_DIMS})"
            ));
        }
        let ggml_dims = (0..dims)
            .map(|_| {
                reader
                    .u64()
                    .and_then(|d| usize::try_from(d).map_err(|_| "a dimension overflows".into()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let type_id = reader.u32()?;
        let offset = usize::try_from(reader.u64()?).map_err(|_| format!("tensor '{name}': offset overflows"))?;
        infos.push(TensorInfo {
            name,
            ggml_dims,
            type_id,
            offset,
        });
    }
    let alignment = match metadata.get("general.alignment").map(MetadataValue::as_usize) {
        None => DEFAULT_ALIGNMENT,
        Some(Some(alignment)) if alignment > 0 => alignment,
        Some(_) => return Err("general.alignment is not a positive integer".into()),
    };
    let data_start = reader.position.div_ceil(alignment) * alignment;
    Ok((metadata, infos, data_start))
}

/// Little-endian reads from a header, each checked against the bytes left.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        let end = self
            .position
            .checked_add(count)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| format!("the header ends early (at byte {})", self.bytes.len()))?;
        let taken = &self.bytes[self.position..end];
        self.position = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    /// A count of items of at least `min_item_bytes` each, which the bytes left must be able to
    /// hold (so that nothing is allocated for items a file cannot have).
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, String> {
        let count = self.u64()?;
        let left = (self.bytes.len() - self.position) as u64;
        if count.saturating_mul(min_item_bytes.max(1) as u64) > left {
            return Err(format!("it claims {count} items but has only {left} bytes left"));
        }
        Ok(count as usize)
    }

    fn string(&mut self) -> Result<String, String> {
        let length = self.count(1)?;
        String::from_utf8(self.take(length)?.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }

    /// A value of GGUF type `type_id`; arrays nest at most `depth` levels deep.
    fn value(&mut self, type_id: u32, depth: usize) -> Result<MetadataValue, String> {
        Ok(match type_id {
            0 => MetadataValue::U8(self.array::<1>()?[0]),
            1 => MetadataValue::I8(self.array::<1>()?[0] as i8),
            2 => MetadataValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetadataValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetadataValue::U32(self.u32()?),
            5 => MetadataValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetadataValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetadataValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetadataValue::String(self.string()?),
            9 if depth < 4 => {
                let element_type = self.u32()?;
                let count = self.count(1)?;
                let values = (0..count)
                    .map(|_| self.value(element_type, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                MetadataValue::Array(values)
            }
            9 => return Err("arrays nested too deep".into()),
            10 => MetadataValue::U64(self.u64()?),
            11 => MetadataValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetadataValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

/// A tensor to write: name, PyTorch shape and ggml type.
#[derive(Clone)]
pub struct GgufTensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: GgmlType,
}

impl GgufTensorEntry {
    /// The bytes of its data, `None` unless its elements fill whole blocks.
    fn data_bytes(&self) -> Option<usize> {
        self.kind.bytes_of(self.shape.iter().product())
    }
}

/// Writes a GGUF v3 file (the test models Easel writes itself): `metadata` in order, then the
/// tensors of `entries`, each aligned to 32 bytes, their bytes (in the entry's type) asked of
/// `bytes_of` one tensor at a time, so that a model larger than memory can be written.
pub fn write_gguf(
    path: &Path,
    metadata: &[(&str, MetadataValue)],
    entries: &[GgufTensorEntry],
    mut bytes_of: impl FnMut(&GgufTensorEntry) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<()> {
    let aligned = |n: usize| n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    let mut header = MAGIC.to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend((entries.len() as u64).to_le_bytes());
    header.extend((metadata.len() as u64).to_le_bytes());
    for (key, entry) in metadata {
        write_string(&mut header, key);
        header.extend(entry.type_id().to_le_bytes());
        write_value(&mut header, entry);
    }
    let mut offset = 0;
    for entry in entries {
        let bytes = entry.data_bytes().ok_or_else(|| {
            std::io::Error::other(format!(
                "{}: {:?} does not fill whole blocks of {}",
                entry.name,
                entry.shape,
                entry.kind.name()
            ))
        })?;
        write_string(&mut header, &entry.name);
        header.extend((entry.shape.len() as u32).to_le_bytes());
        entry
            .shape
            .iter()
            .rev()
            .for_each(|&d| header.extend((d as u64).to_le_bytes()));
        header.extend(entry.kind.id().to_le_bytes());
        header.extend((offset as u64).to_le_bytes());
        offset = aligned(offset + bytes);
    }
    header.resize(aligned(header.len()), 0);
    let mut file = std::io::BufWriter::new(File::create(path)?);
    file.write_all(&header)?;
    for entry in entries {
        let bytes = bytes_of(entry)?;
        if Some(bytes.len()) != entry.data_bytes() {
            return Err(std::io::Error::other(format!(
                "{}: {} bytes given for {:?} in {}",
                entry.name,
                bytes.len(),
                entry.shape,
                entry.kind.name()
            )));
        }
        file.write_all(&bytes)?;
        file.write_all(&vec![0; aligned(bytes.len()) - bytes.len()])?;
    }
    file.flush()
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    out.extend((text.len() as u64).to_le_bytes());
    out.extend(text.as_bytes());
}

fn write_value(out: &mut Vec<u8>, entry: &MetadataValue) {
    match entry {
        MetadataValue::U8(v) => out.push(*v),
        MetadataValue::I8(v) => out.push(*v as u8),
        MetadataValue::U16(v) => out.extend(v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend(v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend(v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend(v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend(v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(v) => write_string(out, v),
        MetadataValue::Array(values) => {
            out.extend(values.first().map_or(0, MetadataValue::type_id).to_le_bytes());
            out.extend((values.len() as u64).to_le_bytes());
            values.iter().for_each(|v| write_value(out, v));
        }
        MetadataValue::U64(v) => out.extend(v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend(v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend(v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::ggml_quants::quantize::quantize;

    /// A tensor's entry and its bytes.
    fn tensor(name: &str, shape: &[usize], kind: GgmlType, values: &[f32]) -> (GgufTensorEntry, Vec<u8>) {
        let entry = GgufTensorEntry {
            name: name.into(),
            shape: shape.to_vec(),
            kind,
        };
        (entry, quantize(kind, values).expect("a type the tests write"))
    }

    fn write(path: &Path, metadata: &[(&str, MetadataValue)], tensors: Vec<(GgufTensorEntry, Vec<u8>)>) {
        let (entries, mut data): (Vec<_>, Vec<_>) = tensors.into_iter().unzip();
        data.reverse();
        write_gguf(path, metadata, &entries, |_| {
            data.pop().ok_or_else(|| std::io::Error::other("no more data"))
        })
        .expect("written");
    }

    /// A tensor whose bytes are not what its entry says is refused, naming it.
    #[test]
    fn tensor_data_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (entry, mut bytes) = tensor("w", &[1, 32], GgmlType::Q8_0, &[0.5; 32]);
        bytes.pop();
        let error = write_gguf(&dir.path().join("short.gguf"), &[], &[entry], |_| Ok(bytes.clone()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("w: 33 bytes given"), "{error}");
    }

    #[test]
    fn written_files_read_back_with_metadata_shapes_and_data() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("model.gguf");
        let values: Vec<f32> = (0..2 * 256).map(|i| i as f32 / 512.0).collect();
        let metadata = [
            ("general.architecture", MetadataValue::String("flux".into())),
            (
                "comfy.gguf.orig_shape.reshaped",
                MetadataValue::Array(vec![
                    MetadataValue::I32(4),
                    MetadataValue::I32(2),
                    MetadataValue::I32(4),
                ]),
            ),
            ("general.file_type", MetadataValue::U32(7)),
        ];
        let tensors = vec![
            tensor("weight", &[2, 256], GgmlType::Q8_0, &values),
            tensor("k_weight", &[1, 256], GgmlType::Q4K, &values[..256]),
            tensor("bias", &[3], GgmlType::F32, &[1.0, 2.0, 3.0]),
            tensor("reshaped", &[1, 32], GgmlType::F16, &values[..32]),
        ];
        write(&path, &metadata, tensors.clone());
        let file = GgufFile::open(&path).expect("opened");
        assert_eq!(file.architecture(), Some("flux"));
        assert_eq!(
            file.metadata("general.file_type").and_then(MetadataValue::as_usize),
            Some(7)
        );
        assert_eq!(file.shape("weight"), Some(&[2, 256][..]));
        assert_eq!(file.shape("reshaped"), Some(&[4, 2, 4][..]));
        assert_eq!(file.tensor("k_weight").map(|t| t.kind), Some(GgmlType::Q4K));
        for (entry, bytes) in &tensors {
            assert_eq!(file.tensor_bytes(&entry.name), Some(bytes.as_slice()), "{}", entry.name);
        }
    }

    /// Model code reads GGUF tensors through [`Weights`] as it reads safetensors: matrices in
    /// place in their ggml type, other tensors dequantized.
    #[test]
    fn weights_read_gguf_tensors_in_place() {
        use crate::weights::Weights;
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("model.gguf");
        let values: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.1).cos()).collect();
        let tensors = vec![
            tensor("layer.weight", &[4, 64], GgmlType::Q8_0, &values),
            tensor("layer.bias", &[4], GgmlType::F32, &values[..4]),
        ];
        write(&path, &[], tensors.clone());
        let file = std::sync::Arc::new(GgufFile::open(&path).expect("opened"));
        let weights = Weights::from_file(file.clone(), DType::F32, &Device::Cpu).pp("layer");
        let matrix = weights.matrix((4, 64), "weight").expect("matrix");
        let in_place = matrix.with_elements(|elements| matches!(elements, Elements::Ggml(_, GgmlType::Q8_0)));
        assert_eq!(in_place.expect("readable"), Some(true));
        let mut expected = vec![0f32; 256];
        GgmlType::Q8_0.dequantize_range(&tensors[0].1, 0, &mut expected);
        let copied: Vec<f32> = matrix.tensor().and_then(|t| t.flatten_all()?.to_vec1()).expect("copy");
        assert_eq!(copied, expected);
        let bias = weights.get(4, "bias").and_then(|t| t.to_vec1::<f32>()).expect("bias");
        assert_eq!(bias, values[..4].to_vec());
    }

    fn error_of(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("bad.gguf");
        std::fs::write(&path, bytes).expect("written");
        GgufFile::open(&path).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn broken_files_give_errors_that_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("good.gguf");
        let values = vec![0.5f32; 64];
        write(&path, &[], vec![tensor("w", &[2, 32], GgmlType::Q8_0, &values)]);
        let good = std::fs::read(&path).expect("read");

        assert!(error_of(b"GGML").contains("does not start with 'GGUF'"));
        let mut old = good.clone();
        old[4] = 1;
        assert!(error_of(&old).contains("GGUF version 1"));
        // The last 40 bytes: the padding after the tensor and some of its data.
        let truncated = &good[..good.len() - 40];
        let error = error_of(truncated);
        assert!(
            error.contains("bad.gguf") && error.contains("tensor 'w'") && error.contains("truncated"),
            "{error}"
        );
        // A tensor count no file could hold is refused before anything is allocated for it.
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(error_of(&huge).contains("claims"));
        // An IQ4_XS tensor (type 23): named in the error.
        // After magic, version and the two counts (24 bytes): the name (8 + 1), the dimension
        // count (4) and two dimensions (16), then the type.
        let type_at = 24 + 9 + 4 + 16;
        let mut iq = good.clone();
        iq[type_at..type_at + 4].copy_from_slice(&23u32.to_le_bytes());
        let error = error_of(&iq);
        assert!(error.contains("IQ4_XS (23)") && error.contains("'w'"), "{error}");
    }
}
