//! Weight patches: LoRA's low-rank (and full) weight differences applied to a model's weight
//! matrices when the model is built, as ComfyUI patches them (`node-catalog.md` §F):
//! `W ← W + strength·scale·ΔW` in f32, with `ΔW = up·down` (flattened, reshaped to W) and
//! `scale = alpha / rank` (1 without alpha), several LoRAs applied in the order they were added.
//! Every patch first scales W by its `strength_model` (ComfyUI's `calculate_weight`), which
//! model merging (`W ← ratio·W + (1 − ratio)·W₂`, [`Patch::merge`]) and attention multipliers
//! ([`Patch::scale`]) use.
//!
//! A LoRA file names its layers in one of several schemes; [`LoraKeyMap`] lists, for a model,
//! every name ComfyUI accepts for each of its weights: kohya's names over the LDM keys
//! (`lora_unet_input_blocks_1_1_proj_in`) and over diffusers' (`lora_unet_down_blocks_0_…`),
//! the raw keys, diffusers/PEFT names, and the text encoder's (`lora_te_text_model_…`,
//! `text_encoder.text_model.…`); for FLUX, BFL's, kohya's, diffusers' and XLabs' names
//! ([`LoraKeyMap::add_flux`]). Tensors found for a name: `.lora_up/.lora_down` (kohya,
//! LoCon), `_lora.up/.down`, `.lora.up/.down`, `.up/.down` (XLabs),
//! `.lora_linear_layer.up/.down` (diffusers),
//! `.lora_B/.lora_A` (PEFT, also `.default`), with an optional `.alpha`, LoCon's Tucker
//! `.lora_mid` and DoRA's `.dora_scale`; LyCORIS LoHa (`.hada_w1_a` …) and LoKr (`.lokr_w1` or
//! `.lokr_w1_a/_b`, `.lokr_w2` …); or `.diff` (a full difference).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::architectures::clip_encoder::ClipNaming;
use crate::architectures::flux::FluxConfig;
use crate::architectures::mmdit::MmditConfig;
use crate::architectures::unet::{UNetConfig, TRANSFORMER_BLOCK_MATRICES};
use crate::diffusers_layout::{flux_diffusers_matrices, mmdit_diffusers_matrices, DiffusersMatrix};
use crate::kernels::sgemm::{gemm_into, Elements, Precision, View};
use crate::memory::advise_huge_pages;
use crate::weights::{LowRankUpdate, MappedWeights, SafetensorsFile, TensorShapes, WeightSource};

/// One weight difference, with the strength it is applied at.
#[derive(Clone)]
pub struct Patch {
    strength: f32,
    /// What W is multiplied by before the difference is added.
    strength_model: f32,
    difference: Difference,
    /// DoRA's magnitudes: the patched weight is renormalised to them.
    dora_scale: Option<Tensor>,
    /// The rows (start, count) of the weight the difference is for, where the weight fuses
    /// several layers (OpenCLIP's query, key and value in one `in_proj_weight`).
    rows: Option<(usize, usize)>,
}

#[derive(Clone)]
enum Difference {
    /// `scale · up·down` (up [out, rank, …], down [rank, in, …]).
    LowRank { up: Tensor, down: Tensor, scale: f32 },
    /// LoHa: `scale · (first ⊙ second)`, each the product of its two factors.
    Hadamard { first: Tensor, second: Tensor, scale: f32 },
    /// LoKr: `scale · kron(first, second)`, `first` 2-D and `second` 2-D or a convolution's 4-D.
    Kronecker { first: Tensor, second: Tensor, scale: f32 },
    /// A difference of W's shape.
    Full(Tensor),
    /// Another model's tensor `name` (under its source's prefix), with that model's own patches.
    OtherModel { source: WeightSource, name: String },
    /// Another model's tensor `name` less this model's before the patch (each under its source's
    /// prefix, with its own patches).
    OtherModelChange {
        other: WeightSource,
        original: WeightSource,
        name: String,
    },
    /// Nothing: the patch only scales W.
    Nothing,
    /// A difference whose first and second halves of rows are swapped before it is added
    /// (diffusers' FLUX final modulation holds scale then shift where BFL's holds shift, scale).
    SwappedHalves(Box<Difference>),
    /// Not a difference: W zero-padded to this shape (at the end of each dimension), as BFL's
    /// FLUX control LoRAs widen the input layer before their difference is added.
    PadTo(Vec<usize>),
    /// Not a difference: W replaced by this tensor (a `set_weight` patch).
    Set(Tensor),
}

impl Difference {
    /// The difference in f32, shaped as `weight`; `None` for [`Difference::Nothing`].
    fn shaped_as(&self, weight: &Tensor) -> Result<Option<Tensor>> {
        let difference = match self {
            Difference::LowRank { up, down, scale } => {
                let (up, down) = (up.to_dtype(DType::F32)?, down.to_dtype(DType::F32)?);
                (up.flatten_from(1)?.matmul(&down.flatten_from(1)?)? * f64::from(*scale))?
            }
            Difference::Hadamard { first, second, scale } => ((first * second)? * f64::from(*scale))?,
            Difference::Kronecker { first, second, scale } => (kronecker(first, second)? * f64::from(*scale))?,
            Difference::Full(difference) => difference.clone(),
            Difference::OtherModel { source, name } => {
                source.weights().get(weight.shape(), name)?.to_dtype(DType::F32)?
            }
            Difference::OtherModelChange { other, original, name } => {
                let other = other.weights().get(weight.shape(), name)?.to_dtype(DType::F32)?;
                let original = original.weights().get(weight.shape(), name)?.to_dtype(DType::F32)?;
                (other - original)?
            }
            Difference::Nothing | Difference::PadTo(_) | Difference::Set(_) => return Ok(None),
            Difference::SwappedHalves(inner) => {
                let Some(difference) = inner.shaped_as(weight)? else {
                    return Ok(None);
                };
                let (rows, half) = (difference.dim(0)?, difference.dim(0)? / 2);
                return Ok(Some(Tensor::cat(
                    &[difference.narrow(0, half, rows - half)?, difference.narrow(0, 0, half)?],
                    0,
                )?));
            }
        };
        if difference.elem_count() != weight.elem_count() {
            return Err(candle_core::Error::Msg(format!(
                "a LoRA difference of shape {:?} does not fit a weight of shape {:?}",
                difference.dims(),
                weight.dims()
            )));
        }
        Ok(Some(difference.reshape(weight.shape())?.to_device(weight.device())?))
    }
}

impl Patch {
    /// ComfyUI's merge patch (`add_patches(other's key patches, strength, strength_model)`):
    /// `W ← strength_model·W + strength·W₂`, W₂ the tensor `name` of `other` with its patches.
    pub fn merge(other: WeightSource, name: String, strength: f32, strength_model: f32) -> Patch {
        Patch {
            strength,
            strength_model,
            difference: Difference::OtherModel { source: other, name },
            dora_scale: None,
            rows: None,
        }
    }

    /// ComfyUI's `model_as_lora` patch (hooks applying a checkpoint): `W ← W + strength·(W₂ − W₀)`,
    /// W₂ the tensor `name` of `other` and W₀ that of `original`, the model being patched as it
    /// was before (each with its own patches).
    pub fn model_difference(other: WeightSource, original: WeightSource, name: String, strength: f32) -> Patch {
        Patch {
            strength,
            strength_model: 1.0,
            difference: Difference::OtherModelChange { other, original, name },
            dora_scale: None,
            rows: None,
        }
    }

    /// `W ← W + scale·up·down` (a control-LoRA's `up` and `down`, ComfyUI's `ControlLoraOps`).
    pub fn low_rank(up: Tensor, down: Tensor, scale: f32) -> Patch {
        Patch {
            strength: 1.0,
            strength_model: 1.0,
            difference: Difference::LowRank { up, down, scale },
            dora_scale: None,
            rows: None,
        }
    }

    /// The same patch applied at `strength` instead.
    pub fn with_strength(&self, strength: f32) -> Patch {
        Patch {
            strength,
            ..self.clone()
        }
    }

    /// `W ← factor·W` (ComfyUI's `add_patches({key: (None,)}, 0.0, factor)`).
    pub fn scale(factor: f32) -> Patch {
        Patch {
            strength: 0.0,
            strength_model: factor,
            difference: Difference::Nothing,
            dora_scale: None,
            rows: None,
        }
    }

    /// `scale·ΔW` in f32, shaped as `weight`; `None` for a patch without a difference.
    fn difference(&self, weight: &Tensor) -> Result<Option<Tensor>> {
        self.difference.shaped_as(weight)
    }

    /// `weight` (f32) with this patch applied: `W + strength·ΔW`; with DoRA, `W + ΔW` scaled to
    /// the DoRA magnitudes (over W's output rows when the magnitudes are per output, else over
    /// the patched weight's input columns) and then weighed against W by the strength.
    fn apply_to(&self, weight: &Tensor) -> Result<Tensor> {
        match &self.difference {
            Difference::PadTo(shape) => return zero_padded(weight, shape),
            Difference::Set(tensor) if tensor.elem_count() == weight.elem_count() => {
                return tensor.reshape(weight.shape())?.to_device(weight.device())
            }
            Difference::Set(tensor) => {
                return Err(candle_core::Error::Msg(format!(
                    "a LoRA sets a weight of shape {:?} to one of shape {:?}",
                    weight.dims(),
                    tensor.dims()
                )))
            }
            _ => {}
        }
        let Some((start, count)) = self.rows else {
            return self.apply_to_whole(weight);
        };
        let rows = weight.dim(0)?;
        if start + count > rows {
            return Err(candle_core::Error::Msg(format!(
                "a LoRA difference for rows {start}..{} does not fit a weight of {rows} rows",
                start + count
            )));
        }
        let patched = self.apply_to_whole(&weight.narrow(0, start, count)?)?;
        Tensor::cat(
            &[
                &weight.narrow(0, 0, start)?,
                &patched,
                &weight.narrow(0, start + count, rows - start - count)?,
            ],
            0,
        )
    }

    fn apply_to_whole(&self, weight: &Tensor) -> Result<Tensor> {
        let scaled;
        let weight = if self.strength_model == 1.0 {
            weight
        } else {
            scaled = (weight * f64::from(self.strength_model))?;
            &scaled
        };
        let strength = f64::from(self.strength);
        if strength == 0.0 && self.dora_scale.is_none() {
            return Ok(weight.clone());
        }
        let Some(difference) = self.difference(weight)? else {
            return Ok(weight.clone());
        };
        let Some(dora_scale) = &self.dora_scale else {
            return weight + (difference * strength)?;
        };
        let patched = (weight + difference)?;
        let outputs = weight.dim(0)?;
        let mut norm_shape = vec![1; weight.rank()];
        let norm = if dora_scale.dim(0)? == outputs {
            norm_shape[0] = outputs;
            weight.reshape((outputs, ()))?.sqr()?.sum_keepdim(1)?.sqrt()?
        } else {
            let inputs = weight.dim(1)?;
            norm_shape[1] = inputs;
            patched
                .transpose(0, 1)?
                .reshape((inputs, ()))?
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
        };
        let norm = (norm.reshape(norm_shape.as_slice())? + f64::from(f32::EPSILON))?;
        let magnitude = dora_scale.to_device(weight.device())?.reshape(norm.shape())?;
        let renormalised = patched.broadcast_mul(&(magnitude / norm)?)?;
        if self.strength == 1.0 {
            Ok(renormalised)
        } else {
            weight + ((renormalised - weight)? * strength)?
        }
    }
}

/// `weight` zero-padded at the end of each dimension to `shape` (ComfyUI's
/// `pad_tensor_to_shape`); a shape smaller anywhere is refused.
fn zero_padded(weight: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if shape.len() != weight.rank() || shape.iter().zip(weight.dims()).any(|(to, from)| to < from) {
        return Err(candle_core::Error::Msg(format!(
            "a LoRA cannot pad a weight of shape {:?} to {shape:?}",
            weight.dims()
        )));
    }
    let mut padded = weight.clone();
    for (dim, &size) in shape.iter().enumerate() {
        let extra = size - padded.dim(dim)?;
        if extra > 0 {
            padded = padded.pad_with_zeros(dim, 0, extra)?;
        }
    }
    Ok(padded)
}

/// Rows per task when patches are applied in blocks: a multiple of the GEMM's six-row tile, and
/// few enough that a block of the widest matrices stays in the L2 cache.
const PATCH_ROWS_PER_TASK: usize = 48;

/// A precision a patched matrix is kept in.
trait StoredFloat: Copy + Default + Send {
    fn store(block: &[f32], out: &mut [Self]);
}

impl StoredFloat for f32 {
    fn store(block: &[f32], out: &mut [f32]) {
        out.copy_from_slice(block);
    }
}

impl StoredFloat for f16 {
    fn store(block: &[f32], out: &mut [f16]) {
        out.convert_from_f32_slice(block);
    }
}

impl StoredFloat for bf16 {
    fn store(block: &[f32], out: &mut [bf16]) {
        out.convert_from_f32_slice(block);
    }
}

/// A [rows, cols] matrix made block by block of rows across threads: `patch_block(first row,
/// block)` fills an f32 block, which is stored in `T`. The matrix is written into fresh memory
/// on huge pages (see [`advise_huge_pages`]) by the threads that compute it.
fn patched_blocks<T: StoredFloat>(
    rows: usize,
    cols: usize,
    patch_block: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Vec<T> {
    let elements = rows * cols;
    let mut out = Vec::with_capacity(elements);
    let fresh = &mut out.spare_capacity_mut()[..elements];
    advise_huge_pages(fresh);
    fresh
        .par_chunks_mut(PATCH_ROWS_PER_TASK * cols.max(1))
        .enumerate()
        .for_each(|(task, out)| {
            let mut block = vec![0f32; out.len()];
            patch_block(task * PATCH_ROWS_PER_TASK, &mut block);
            let mut stored = vec![T::default(); out.len()];
            T::store(&block, &mut stored);
            for (slot, value) in out.iter_mut().zip(stored) {
                slot.write(value);
            }
        });
    // SAFETY: the tasks' chunks cover the first `elements` slots, and each task wrote all of its.
    unsafe { out.set_len(elements) };
    out
}

/// The patches of a model, by full tensor name in its file, each list in the order added.
#[derive(Clone, Default)]
pub struct WeightPatches(Arc<HashMap<String, Vec<Patch>>>);

impl WeightPatches {
    /// These patches followed by `more`.
    pub fn and(&self, more: HashMap<String, Vec<Patch>>) -> WeightPatches {
        let mut all = (*self.0).clone();
        for (name, patches) in more {
            all.entry(name).or_default().extend(patches);
        }
        WeightPatches(Arc::new(all))
    }

    /// Whether the tensor `name` has patches.
    pub fn touches(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The shape the patches of `name` pad it to, if they pad it (BFL's FLUX control LoRAs).
    pub fn padded_shape(&self, name: &str) -> Option<&[usize]> {
        self.0
            .get(name)?
            .iter()
            .rev()
            .find_map(|patch| match &patch.difference {
                Difference::PadTo(shape) => Some(shape.as_slice()),
                _ => None,
            })
    }

    /// The patches of the [rows, cols] matrix `name` as low-rank updates (`factor = strength ·
    /// scale`); `None` unless every patch of `name` is a plain low-rank one (no DoRA, no row
    /// range, no scaling of W) of the matrix's shape.
    pub fn low_rank_updates(&self, name: &str, rows: usize, cols: usize) -> Result<Option<Vec<LowRankUpdate>>> {
        let Some(patches) = self.0.get(name) else {
            return Ok(None);
        };
        let mut updates = Vec::with_capacity(patches.len());
        for patch in patches {
            let (Difference::LowRank { up, down, scale }, None, None, 1.0) =
                (&patch.difference, &patch.dora_scale, patch.rows, patch.strength_model)
            else {
                return Ok(None);
            };
            let (up, down) = (up.flatten_from(1)?, down.flatten_from(1)?);
            let ((up_rows, rank), (down_rank, down_cols)) = (up.dims2()?, down.dims2()?);
            if up_rows != rows || down_rank != rank || down_cols != cols {
                return Ok(None);
            }
            updates.push(LowRankUpdate::new(up, down, patch.strength * scale)?);
        }
        Ok(Some(updates))
    }

    /// The matrix `name` ([rows, cols] `base` elements, in place in a mapped file) with its
    /// patches applied in one pass over blocks of rows shared out across threads: each block
    /// widened to f32, every low-rank difference added by the GEMM, then rounded back to the
    /// base's precision, as ComfyUI rounds patched weights. `None` unless the patches are
    /// [`WeightPatches::low_rank_updates`] and the base is f32, f16 or bf16 (not fp8 or ggml
    /// blocks): the general path then applies them.
    pub fn apply_low_rank_in_blocks(
        &self,
        name: &str,
        base: Elements,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Tensor>> {
        let Some(updates) = self.low_rank_updates(name, rows, cols)? else {
            return Ok(None);
        };
        if base.len() != rows * cols {
            return Ok(None);
        }
        LowRankUpdate::with_factors(&updates, |factors| {
            let patch_block = |first: usize, block: &mut [f32]| {
                base.read(first * cols, 1, block);
                let block_rows = block.len() / cols;
                for update in factors {
                    let rank = update.rank;
                    // Always in range: the factors' shapes were checked against the matrix's.
                    let Some(up) = update.up.range(first * rank, block_rows * rank) else {
                        continue;
                    };
                    let down = View::row_major(update.down, rank, cols);
                    let up = View::row_major(up, block_rows, rank);
                    gemm_into(block, cols, up, &down, update.factor, true, Precision::F32);
                }
            };
            let tensor = match base {
                Elements::F16(_) => Tensor::from_vec(
                    patched_blocks::<f16>(rows, cols, &patch_block),
                    (rows, cols),
                    &Device::Cpu,
                )?,
                Elements::BF16(_) => Tensor::from_vec(
                    patched_blocks::<bf16>(rows, cols, &patch_block),
                    (rows, cols),
                    &Device::Cpu,
                )?,
                Elements::F32(_) => Tensor::from_vec(
                    patched_blocks::<f32>(rows, cols, &patch_block),
                    (rows, cols),
                    &Device::Cpu,
                )?,
                Elements::F8(..) | Elements::Ggml(..) => return Ok(None),
            };
            Ok(Some(tensor))
        })?
    }

    /// `base` (the tensor `name`) with its patches applied, computed in f32 and returned in
    /// `base`'s dtype.
    pub fn apply(&self, name: &str, base: Tensor) -> Result<Tensor> {
        let Some(patches) = self.0.get(name) else {
            return Ok(base);
        };
        let dtype = base.dtype();
        let mut weight = base.to_dtype(DType::F32)?;
        for patch in patches {
            weight = patch.apply_to(&weight)?;
        }
        weight.to_dtype(dtype)
    }
}

/// How LoRA files name one text-encoder slot: the kohya prefixes (`lora_te`, `lora_te1`,
/// `lora_te2`, …) and the diffusers module (`text_encoder`, `text_encoder_2`).
#[derive(Clone, Copy, Debug)]
pub struct ClipLoraNames {
    pub kohya: &'static [&'static str],
    pub diffusers: &'static str,
    /// The encoder's name in ComfyUI's CLIP state dict (`clip_l`, `clip_g`, `clip_h`), which
    /// the generic `text_encoders.<name>.transformer.…` keys (LoraSave's) use.
    pub comfy: &'static str,
}

/// For each name a LoRA may give a weight, the full name of that weight in the model's file.
#[derive(Default)]
pub struct LoraKeyMap(HashMap<String, PatchTarget>);

/// The model tensor a LoRA layer patches, which of its rows when it fuses several layers, and
/// whether the LoRA's halves of rows come in the other order (see [`Difference::SwappedHalves`]).
#[derive(Clone, Debug, PartialEq, Eq)]
struct PatchTarget {
    tensor: String,
    rows: Option<(usize, usize)>,
    swapped_halves: bool,
}

impl LoraKeyMap {
    /// The names of a UNet's weight matrices, whose tensors lie under `prefix` in `file`.
    pub fn add_unet(&mut self, file: &dyn TensorShapes, prefix: &str, config: &UNetConfig) {
        let diffusers = diffusers_unet_names(config);
        for name in file.tensor_names() {
            let Some(key) = name.strip_prefix(prefix).and_then(|k| k.strip_suffix(".weight")) else {
                continue;
            };
            let target = name.to_string();
            self.insert(format!("lora_unet_{}", key.replace('.', "_")), &target);
            self.insert(format!("diffusion_model.{key}"), &target);
            if let Some(diffusers_key) = diffusers.get(key) {
                let underscored = diffusers_key.replace('.', "_");
                self.insert(format!("lora_unet_{underscored}"), &target);
                self.insert(format!("lycoris_{underscored}"), &target);
                // diffusers' own LoRAs name attention processors.
                let processor = diffusers_key.replace(".to_", ".processor.to_");
                let processor = match processor.strip_suffix(".to_out.0") {
                    Some(stem) => format!("{stem}.to_out"),
                    None => processor,
                };
                self.insert(format!("unet.{processor}"), &target);
                self.insert(processor, &target);
            }
        }
    }

    /// The names of a CLIP text encoder's attention and MLP matrices, whose tensors lie under
    /// `prefix` (ending `text_model.`) in `file`: kohya's `lora_te_` (and SDXL's `lora_te1_`,
    /// The names of a text encoder's layer matrices, whose tensors lie under `prefix` (the
    /// encoder's root) in `file` in `naming`'s layout, under the LoRA names of its slot
    /// (`names`). In OpenCLIP's layout query, key and value are the three thirds of one fused
    /// `in_proj_weight`; their LoRAs patch those rows.
    pub fn add_clip(&mut self, file: &dyn TensorShapes, prefix: &str, naming: ClipNaming, names: ClipLoraNames) {
        /// Each matrix's name in the transformers layout, in OpenCLIP's, and which third of
        /// OpenCLIP's matrix it is.
        const MATRICES: [(&str, &str, Option<usize>); 6] = [
            ("mlp.fc1", "mlp.c_fc", None),
            ("mlp.fc2", "mlp.c_proj", None),
            ("self_attn.k_proj", "attn.in_proj", Some(1)),
            ("self_attn.q_proj", "attn.in_proj", Some(0)),
            ("self_attn.v_proj", "attn.in_proj", Some(2)),
            ("self_attn.out_proj", "attn.out_proj", None),
        ];
        let layers_root = match naming {
            ClipNaming::Transformers => "text_model.encoder.layers.",
            ClipNaming::OpenClip => "transformer.resblocks.",
        };
        let generic = format!("text_encoders.{}.transformer.", names.comfy);
        // ComfyUI's generic keys name every weight of its state dict, which keeps the
        // transformers layout: a transformers-layout encoder's weights all have one; an
        // OpenCLIP-layout encoder's layer matrices get theirs below.
        if let ClipNaming::Transformers = naming {
            for name in file.tensor_names() {
                if let Some(module) = name.strip_prefix(prefix).and_then(|k| k.strip_suffix(".weight")) {
                    self.insert(format!("{generic}{module}"), name);
                }
            }
        }
        for name in file.tensor_names() {
            let Some((layer, tensor)) = name
                .strip_prefix(prefix)
                .and_then(|k| k.strip_prefix(layers_root))
                .and_then(|rest| rest.split_once('.'))
            else {
                continue;
            };
            let Some(module) = tensor
                .strip_suffix(".weight")
                .or_else(|| tensor.strip_suffix("_weight"))
            else {
                continue;
            };
            for (matrix, open_clip, third) in MATRICES {
                let rows = match naming {
                    ClipNaming::Transformers if matrix == module => None,
                    ClipNaming::OpenClip if open_clip == module => {
                        let fused_rows = file.shape(name).and_then(|shape| shape.first().copied()).unwrap_or(0);
                        third.map(|third| (third * fused_rows / 3, fused_rows / 3))
                    }
                    _ => continue,
                };
                let underscored = matrix.replace('.', "_");
                for kohya in names.kohya {
                    self.insert_rows(
                        format!("{kohya}_text_model_encoder_layers_{layer}_{underscored}"),
                        name,
                        rows,
                    );
                }
                self.insert_rows(
                    format!("{}.text_model.encoder.layers.{layer}.{matrix}", names.diffusers),
                    name,
                    rows,
                );
                self.insert_rows(
                    format!("{generic}text_model.encoder.layers.{layer}.{matrix}"),
                    name,
                    rows,
                );
            }
        }
    }

    /// Keys for an SD3 MMDiT under `prefix`, as ComfyUI's `model_lora_keys_unet` makes them:
    /// kohya's (`lora_unet_joint_blocks_0_x_block_attn_qkv`) and the generic
    /// (`diffusion_model.…`) names of every weight, and diffusers' (`transformer.…`, also as
    /// `base_model.model.…`, OneTrainer's `lora_transformer_` and simpletuner's `lycoris_`), whose
    /// separate query, key and value patch rows of the fused matrices.
    pub fn add_mmdit(&mut self, file: &dyn TensorShapes, prefix: &str, config: &MmditConfig) {
        for name in file.tensor_names() {
            let Some(key) = name.strip_prefix(prefix).and_then(|key| key.strip_suffix(".weight")) else {
                continue;
            };
            self.insert(format!("lora_unet_{}", key.replace('.', "_")), name);
            self.insert(format!("diffusion_model.{key}"), name);
        }
        let matrices = mmdit_diffusers_matrices(config.blocks, config.hidden_size(), &config.x_block_self_attention);
        self.add_diffusers_matrices(file, prefix, matrices, true);
    }

    /// Keys for the diffusers names of `matrices` that `file` has under `prefix`:
    /// `transformer.…`, simpletuner's `lycoris_…`, OneTrainer's `lora_transformer_…` and, with
    /// `base_model`, `base_model.model.…`; each patches its rows of the model's matrix.
    fn add_diffusers_matrices(
        &mut self,
        file: &dyn TensorShapes,
        prefix: &str,
        matrices: Vec<DiffusersMatrix>,
        base_model: bool,
    ) {
        for matrix in matrices {
            let tensor = format!("{prefix}{}.weight", matrix.native);
            if !file.has(&tensor) {
                continue;
            }
            let underscored = matrix.diffusers.replace('.', "_");
            let mut names = vec![
                format!("transformer.{}", matrix.diffusers),
                format!("lycoris_{underscored}"),
                format!("lora_transformer_{underscored}"),
            ];
            if base_model {
                names.push(format!("base_model.model.{}", matrix.diffusers));
            }
            for lora_name in names {
                let target = PatchTarget {
                    tensor: tensor.clone(),
                    rows: matrix.rows,
                    swapped_halves: matrix.swapped_halves,
                };
                self.insert_target(lora_name, target);
            }
        }
    }

    /// The names of a FLUX model's weight matrices, whose tensors lie under `prefix` in `file`
    /// (ComfyUI's key map for FLUX): kohya's over BFL's names (`lora_unet_double_blocks_0_…`),
    /// BFL's own (`diffusion_model.…`, and `…linear1_qkv` for the single blocks' query, key and
    /// value rows), diffusers' (`transformer.…`, also as simpletuner's `lycoris_` and
    /// OneTrainer's `lora_transformer_`), whose separate query, key and value (and the single
    /// blocks' MLP input) patch rows of BFL's fused matrices, XLabs' attention processors
    /// (`double_blocks.0.processor.qkv_lora1`, …, as ComfyUI converts them for USO), and the
    /// bare names of BFL's control LoRAs (layers, and the norms' scales they set).
    pub fn add_flux(&mut self, file: &dyn TensorShapes, prefix: &str, config: &FluxConfig) {
        let hidden = config.hidden_size;
        for name in file.tensor_names() {
            let Some(key) = name.strip_prefix(prefix) else {
                continue;
            };
            // The norms' scales, which BFL's control LoRAs set, under their bare names.
            if key.ends_with("_norm.scale") {
                self.insert(key.to_string(), name);
            }
            let Some(key) = key.strip_suffix(".weight") else {
                continue;
            };
            self.insert(format!("lora_unet_{}", key.replace('.', "_")), name);
            self.insert(format!("diffusion_model.{key}"), name);
            // BFL's control LoRAs name layers bare.
            self.insert(key.to_string(), name);
            if key.ends_with(".linear1") {
                self.insert_rows(format!("diffusion_model.{key}_qkv"), name, Some((0, 3 * hidden)));
            }
        }
        let full = |bfl: &str| format!("{prefix}{bfl}.weight");
        let matrices = flux_diffusers_matrices(config.double_blocks, config.single_blocks, hidden, config.mlp_hidden);
        self.add_diffusers_matrices(file, prefix, matrices, false);
        const XLABS: [(&str, &str); 4] = [
            ("qkv_lora1", "img_attn.qkv"),
            ("qkv_lora2", "txt_attn.qkv"),
            ("proj_lora1", "img_attn.proj"),
            ("proj_lora2", "txt_attn.proj"),
        ];
        for block in 0..config.double_blocks {
            for (xlabs, bfl) in XLABS {
                let target = full(&format!("double_blocks.{block}.{bfl}"));
                self.insert(format!("double_blocks.{block}.processor.{xlabs}"), &target);
            }
        }
        for block in 0..config.single_blocks {
            let linear1 = full(&format!("single_blocks.{block}.linear1"));
            self.insert_rows(
                format!("single_blocks.{block}.processor.qkv_lora"),
                &linear1,
                Some((0, 3 * hidden)),
            );
            let linear2 = full(&format!("single_blocks.{block}.linear2"));
            self.insert(format!("single_blocks.{block}.processor.proj_lora"), &linear2);
        }
    }

    fn insert(&mut self, lora_name: String, target: &str) {
        self.insert_rows(lora_name, target, None);
    }

    fn insert_rows(&mut self, lora_name: String, target: &str, rows: Option<(usize, usize)>) {
        self.insert_target(
            lora_name,
            PatchTarget {
                tensor: target.to_string(),
                rows,
                swapped_halves: false,
            },
        );
    }

    fn insert_target(&mut self, lora_name: String, target: PatchTarget) {
        self.0.entry(lora_name).or_insert(target);
    }
}

/// Patches scaling the self-attention projections of a CLIP text encoder whose tensors lie under
/// `prefix` in `file` (ComfyUI's CLIPAttentionMultiply): the query, key, value and output
/// projections' weights and biases by `factors` in that order. OpenCLIP's fused `in_proj`
/// tensors get one patch per third.
pub fn clip_attention_scales(
    file: &dyn TensorShapes,
    prefix: &str,
    naming: ClipNaming,
    factors: [f32; 4],
) -> HashMap<String, Vec<Patch>> {
    let mut patches: HashMap<String, Vec<Patch>> = HashMap::new();
    for name in file.tensor_names() {
        let Some(key) = name.strip_prefix(prefix) else {
            continue;
        };
        let targets: Vec<(usize, Option<usize>)> = match naming {
            ClipNaming::Transformers => ["q_proj", "k_proj", "v_proj", "out_proj"]
                .iter()
                .enumerate()
                .filter(|(_, projection)| {
                    [".weight", ".bias"]
                        .iter()
                        .any(|suffix| key.ends_with(&format!("self_attn.{projection}{suffix}")))
                })
                .map(|(index, _)| (index, None))
                .collect(),
            ClipNaming::OpenClip if key.ends_with("attn.in_proj_weight") || key.ends_with("attn.in_proj_bias") => {
                (0..3).map(|third| (third, Some(third))).collect()
            }
            ClipNaming::OpenClip if key.ends_with("attn.out_proj.weight") || key.ends_with("attn.out_proj.bias") => {
                vec![(3, None)]
            }
            ClipNaming::OpenClip => Vec::new(),
        };
        for (index, third) in targets {
            if factors[index] == 1.0 {
                continue;
            }
            let rows = third.map(|third| {
                let fused_rows = file.shape(name).and_then(|shape| shape.first().copied()).unwrap_or(0);
                (third * fused_rows / 3, fused_rows / 3)
            });
            patches.entry(name.to_string()).or_default().push(Patch {
                rows,
                ..Patch::scale(factors[index])
            });
        }
    }
    patches
}

/// The patches a LoRA file makes, at `strength`, by full tensor name; and the file's tensors
/// they were made from (ComfyUI logs the others as "lora key not loaded").
pub struct LoadedLora {
    pub patches: HashMap<String, Vec<Patch>>,
    pub used: HashSet<String>,
}

/// The (up, down) tensor name pairs a LoRA may store for layer `name`.
fn low_rank_names(name: &str) -> [(String, String); 7] {
    [
        (format!("{name}.lora_up.weight"), format!("{name}.lora_down.weight")),
        (format!("{name}_lora.up.weight"), format!("{name}_lora.down.weight")),
        (format!("{name}.lora.up.weight"), format!("{name}.lora.down.weight")),
        (
            format!("{name}.lora_linear_layer.up.weight"),
            format!("{name}.lora_linear_layer.down.weight"),
        ),
        (format!("{name}.lora_B.weight"), format!("{name}.lora_A.weight")),
        (
            format!("{name}.lora_B.default.weight"),
            format!("{name}.lora_A.default.weight"),
        ),
        // XLabs' FLUX LoRAs.
        (format!("{name}.up.weight"), format!("{name}.down.weight")),
    ]
}

/// Reads the patches `lora` makes to a model with `keys`, each at `strength`.
pub fn load_lora(lora: &SafetensorsFile, keys: &LoraKeyMap, strength: f32) -> Result<LoadedLora> {
    let mut used = HashSet::new();
    let mut patches: HashMap<String, Vec<Patch>> = HashMap::new();
    // BFL's FLUX control LoRAs (ComfyUI's `convert_lora_bfl_control`): the input layer widened
    // to the LoRA's input, biases as `lora_B.bias`, the norms' scales set outright.
    let bfl_control = lora.has("img_in.lora_A.weight") && lora.has("single_blocks.0.norm.key_norm.scale");
    let plain = |difference| Patch {
        strength,
        strength_model: 1.0,
        difference,
        dora_scale: None,
        rows: None,
    };
    for (lora_name, target) in &keys.0 {
        if bfl_control && lora_name.ends_with(".scale") && lora.has(lora_name) {
            let set = Difference::Set(take(lora, &mut used, lora_name.clone())?);
            patches.entry(target.tensor.clone()).or_default().push(plain(set));
            continue;
        }
        // A full difference of the layer's bias (`.diff_b`, BFL's `.lora_B.bias`), beside any of
        // its weight.
        let bias_name = [format!("{lora_name}.diff_b"), format!("{lora_name}.lora_B.bias")]
            .into_iter()
            .find(|name| lora.has(name))
            .unwrap_or_default();
        let bias_target = target.tensor.strip_suffix("weight").map(|stem| format!("{stem}bias"));
        if let (true, Some(bias_target)) = (lora.has(&bias_name), bias_target) {
            let patch = Patch {
                strength,
                strength_model: 1.0,
                difference: Difference::Full(take(lora, &mut used, bias_name)?),
                dora_scale: None,
                rows: target.rows,
            };
            patches.entry(bias_target).or_default().push(patch);
        }
        let Some(difference) = read_difference(lora, lora_name, &mut used)? else {
            continue;
        };
        if let (true, Difference::LowRank { up, down, .. }) = (bfl_control && lora_name == "img_in", &difference) {
            let shape = vec![up.dim(0)?, down.dim(1)?];
            patches
                .entry(target.tensor.clone())
                .or_default()
                .push(plain(Difference::PadTo(shape)));
        }
        let difference = match target.swapped_halves {
            true => Difference::SwappedHalves(Box::new(difference)),
            false => difference,
        };
        let dora_name = format!("{lora_name}.dora_scale");
        let dora_scale = if lora.has(&dora_name) {
            Some(take(lora, &mut used, dora_name)?)
        } else {
            None
        };
        let patch = Patch {
            strength,
            strength_model: 1.0,
            difference,
            dora_scale,
            rows: target.rows,
        };
        patches.entry(target.tensor.clone()).or_default().push(patch);
    }
    Ok(LoadedLora { patches, used })
}

/// Loads tensor `name` in f32 and records it as used.
fn take(lora: &SafetensorsFile, used: &mut HashSet<String>, name: String) -> Result<Tensor> {
    let tensor = lora.load(&name, DType::F32, &Device::Cpu)?;
    used.insert(name);
    Ok(tensor)
}

/// Loads the low-rank factor `name` as the file stores it where that is f32, f16 or bf16 (the
/// products widen it exactly, as ComfyUI computes the difference in f32), else in f32, and
/// records it as used: a model's LoRA factors are held once, in the file's precision.
fn take_factor(lora: &SafetensorsFile, used: &mut HashSet<String>, name: String) -> Result<Tensor> {
    let dtype = lora
        .entry(&name)
        .and_then(|entry| DType::try_from(entry.dtype).ok())
        .filter(|dtype| matches!(dtype, DType::F32 | DType::F16 | DType::BF16))
        .unwrap_or(DType::F32);
    let tensor = lora.load(&name, dtype, &Device::Cpu)?;
    used.insert(name);
    Ok(tensor)
}

/// The difference `lora` stores for layer `name`, in whichever format it uses (LyCORIS's
/// CP-decomposed LoHa and LoKr included); `None` when it has none Easel reads.
fn read_difference(lora: &SafetensorsFile, name: &str, used: &mut HashSet<String>) -> Result<Option<Difference>> {
    let key = |suffix: &str| format!("{name}.{suffix}");
    let has = |suffix: &str| lora.has(&key(suffix));
    // alpha / dim where the file has an alpha and the format a dimension, else 1.
    let scale = |dim: Option<usize>, used: &mut HashSet<String>| -> Result<f32> {
        if !has("alpha") {
            return Ok(1.0);
        }
        let alpha = take(lora, used, key("alpha"))?
            .flatten_all()?
            .get(0)?
            .to_scalar::<f32>()?;
        Ok(dim.map_or(1.0, |dim| alpha / dim.max(1) as f32))
    };
    if let Some((up_name, down_name)) = low_rank_names(name)
        .into_iter()
        .find(|(up, down)| lora.has(up) && lora.has(down))
    {
        let up = take_factor(lora, used, up_name)?;
        let mut down = take_factor(lora, used, down_name)?;
        let rank = down.dim(0)?;
        if has("lora_mid.weight") {
            down = tucker_down(&down.to_dtype(DType::F32)?, &take(lora, used, key("lora_mid.weight"))?)?;
        }
        let scale = scale(Some(rank), used)?;
        return Ok(Some(Difference::LowRank { up, down, scale }));
    }
    const HADAMARD: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
    if HADAMARD.iter().all(|suffix| has(suffix)) {
        let [w1a, w1b, w2a, w2b] = HADAMARD.map(|suffix| take(lora, used, key(suffix)));
        let (w1a, w1b, w2a, w2b) = (w1a?, w1b?.flatten_from(1)?, w2a?, w2b?.flatten_from(1)?);
        let scale = scale(Some(w1b.dim(0)?), used)?;
        let (first, second) = if has("hada_t1") && has("hada_t2") {
            (
                cp_product(&take(lora, used, key("hada_t1"))?, &w1b, &w1a)?,
                cp_product(&take(lora, used, key("hada_t2"))?, &w2b, &w2a)?,
            )
        } else {
            (w1a.flatten_from(1)?.matmul(&w1b)?, w2a.flatten_from(1)?.matmul(&w2b)?)
        };
        return Ok(Some(Difference::Hadamard { first, second, scale }));
    }
    let factor = |whole: &str, used: &mut HashSet<String>| -> Result<Option<(Tensor, Option<usize>)>> {
        if has(whole) {
            return Ok(Some((take(lora, used, key(whole))?, None)));
        }
        let (a, b) = (format!("{whole}_a"), format!("{whole}_b"));
        if !has(&a) || !has(&b) {
            return Ok(None);
        }
        let b = take(lora, used, key(&b))?;
        let dim = b.dim(0)?;
        let a = take(lora, used, key(&a))?;
        // Only the second factor has a CP form (`lokr_t2`).
        let product = if whole == "lokr_w2" && has("lokr_t2") {
            cp_product(&take(lora, used, key("lokr_t2"))?, &b.flatten_from(1)?, &a)?
        } else {
            a.matmul(&b.flatten_from(1)?)?
        };
        Ok(Some((product, Some(dim))))
    };
    if (has("lokr_w1") || has("lokr_w1_a")) && (has("lokr_w2") || has("lokr_w2_a")) {
        if let (Some((first, first_dim)), Some((second, second_dim))) =
            (factor("lokr_w1", used)?, factor("lokr_w2", used)?)
        {
            let scale = scale(second_dim.or(first_dim), used)?;
            return Ok(Some(Difference::Kronecker { first, second, scale }));
        }
    }
    if has("diff") {
        return Ok(Some(Difference::Full(take(lora, used, key("diff"))?)));
    }
    Ok(None)
}

/// LyCORIS's CP-decomposed factor, `einsum('i j k l, j r, i p -> p r k l', core, b, a)`: the
/// core [R₁, R₂, k, l] taken to [out, in, k, l] by `a` [R₁, out] and `b` [R₂, in].
fn cp_product(core: &Tensor, b: &Tensor, a: &Tensor) -> Result<Tensor> {
    let (r1, r2, k, l) = core.dims4()?;
    let (out, input) = (a.dim(1)?, b.dim(1)?);
    let cores = core.permute((2, 3, 0, 1))?.reshape((k * l, r1, r2))?;
    let product = a
        .t()?
        .unsqueeze(0)?
        .broadcast_matmul(&cores)?
        .broadcast_matmul(&b.unsqueeze(0)?)?;
    product.permute((1, 2, 0))?.reshape((out, input, k, l))
}

/// `torch.kron` of a 2-D `first` [m, n] (or [m, n, 1, 1]) and `second` [p, q, …]: [m·p, n·q, …],
/// element (i·p + j, c·q + d, …) = first[i, c] · second[j, d, …].
fn kronecker(first: &Tensor, second: &Tensor) -> Result<Tensor> {
    let (m, n) = (first.dim(0)?, first.dim(1)?);
    let (p, q) = (second.dim(0)?, second.dim(1)?);
    let rest: Vec<usize> = second.dims()[2..].to_vec();
    let inner: usize = rest.iter().product();
    let product = first
        .reshape((m, 1, n, 1, 1))?
        .broadcast_mul(&second.reshape((1, p, 1, q, inner))?)?;
    let mut shape = vec![m * p, n * q];
    shape.extend(rest);
    product.reshape(shape)
}

/// LoCon's Tucker form: the 1×1 `down` [r, C, 1, 1] and the core `mid` [r, r, k, k] made into
/// one `down` [r, C, k, k].
fn tucker_down(down: &Tensor, mid: &Tensor) -> Result<Tensor> {
    let (rank, inputs) = (down.dim(0)?, down.dim(1)?);
    let (_, _, kh, kw) = mid.dims4()?;
    down.transpose(0, 1)?
        .flatten_from(1)?
        .matmul(&mid.transpose(0, 1)?.flatten_from(1)?)?
        .reshape((inputs, rank, kh, kw))?
        .transpose(0, 1)?
        .contiguous()
}

/// diffusers' names for a UNet's blocks, by LDM key (without `.weight`), for the weight
/// matrices LoRAs patch: convolutions and linear layers of the residual blocks, transformers,
/// resamplers and the stem and head.
fn diffusers_unet_names(config: &UNetConfig) -> HashMap<String, String> {
    /// LDM names inside a residual block, and diffusers'.
    const RESNET: [(&str, &str); 4] = [
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.3", "conv2"),
        ("skip_connection", "conv_shortcut"),
    ];
    fn resnet(ldm: String, diffusers: String, names: &mut HashMap<String, String>) {
        for (inner_ldm, inner_diffusers) in RESNET {
            names.insert(format!("{ldm}.{inner_ldm}"), format!("{diffusers}.{inner_diffusers}"));
        }
    }
    let mut names = HashMap::new();
    // Transformers (LDM name, diffusers name, depth): their contents keep their names.
    let mut transformers: Vec<(String, String, usize)> = Vec::new();
    let levels = config.channel_mult.len();
    let mut block = 1;
    let mut input_attention = config.input_depths.iter();
    for level in 0..levels {
        for j in 0..config.num_res_blocks[level] {
            resnet(
                format!("input_blocks.{block}.0"),
                format!("down_blocks.{level}.resnets.{j}"),
                &mut names,
            );
            if let Some(&depth) = input_attention.next().filter(|depth| **depth > 0) {
                transformers.push((
                    format!("input_blocks.{block}.1"),
                    format!("down_blocks.{level}.attentions.{j}"),
                    depth,
                ));
            }
            block += 1;
        }
        if level + 1 < levels {
            names.insert(
                format!("input_blocks.{block}.0.op"),
                format!("down_blocks.{level}.downsamplers.0.conv"),
            );
            block += 1;
        }
    }
    resnet("middle_block.0".into(), "mid_block.resnets.0".into(), &mut names);
    if let Some(depth) = config.middle_depth {
        transformers.push(("middle_block.1".into(), "mid_block.attentions.0".into(), depth));
        resnet("middle_block.2".into(), "mid_block.resnets.1".into(), &mut names);
    } else {
        resnet("middle_block.1".into(), "mid_block.resnets.1".into(), &mut names);
    }
    let mut block = 0;
    for up in 0..levels {
        let level = levels - 1 - up;
        let count = config.num_res_blocks[level] + 1;
        for j in 0..count {
            resnet(
                format!("output_blocks.{block}.0"),
                format!("up_blocks.{up}.resnets.{j}"),
                &mut names,
            );
            let depth = config.output_depths.get(block).copied().unwrap_or(0);
            let attention = depth > 0;
            if attention {
                transformers.push((
                    format!("output_blocks.{block}.1"),
                    format!("up_blocks.{up}.attentions.{j}"),
                    depth,
                ));
            }
            if j + 1 == count && level > 0 {
                let index = if attention { 2 } else { 1 };
                names.insert(
                    format!("output_blocks.{block}.{index}.conv"),
                    format!("up_blocks.{up}.upsamplers.0.conv"),
                );
            }
            block += 1;
        }
    }
    for (ldm, diffusers) in [
        ("input_blocks.0.0", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
        ("out.2", "conv_out"),
    ] {
        names.insert(ldm.to_string(), diffusers.to_string());
    }
    for (ldm, diffusers, depth) in transformers {
        for inner in ["proj_in", "proj_out"] {
            names.insert(format!("{ldm}.{inner}"), format!("{diffusers}.{inner}"));
        }
        for d in 0..depth {
            for inner in TRANSFORMER_BLOCK_MATRICES {
                names.insert(
                    format!("{ldm}.transformer_blocks.{d}.{inner}"),
                    format!("{diffusers}.transformer_blocks.{d}.{inner}"),
                );
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).expect("tensor")
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.flatten_all().and_then(|t| t.to_vec1()).expect("values")
    }

    /// A LoRA file of f32 tensors.
    fn lora_file(tensors: &[(&str, &[usize], &[f32])]) -> (tempfile::TempDir, SafetensorsFile) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("lora.safetensors");
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), data)| {
                let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), data);
                (*name, view.expect("view"))
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).expect("written");
        let file = SafetensorsFile::open(&path).expect("opened");
        (dir, file)
    }

    #[test]
    fn low_rank_patches_applied_in_blocks_equal_the_whole_matrix_computation() {
        let (rows, cols, rank) = (2 * PATCH_ROWS_PER_TASK + 5, 37, 3);
        let wave = |count: usize, step: f32| (0..count).map(|i| (i as f32 * step).sin()).collect::<Vec<f32>>();
        // Factors as LoRA files store them: f32, and f16 (read in place, widened exactly).
        let low_rank = |strength, up_step, down_step, scale, dtype| Patch {
            strength,
            strength_model: 1.0,
            difference: Difference::LowRank {
                up: tensor(&wave(rows * rank, up_step), &[rows, rank])
                    .to_dtype(dtype)
                    .expect("up"),
                down: tensor(&wave(rank * cols, down_step), &[rank, cols])
                    .to_dtype(dtype)
                    .expect("down"),
                scale,
            },
            dora_scale: None,
            rows: None,
        };
        let patches = WeightPatches::default().and(HashMap::from([(
            "w".to_string(),
            vec![
                low_rank(0.7, 0.31, 0.17, 0.5, DType::F32),
                low_rank(-1.2, 0.05, 0.9, 1.0, DType::F16),
            ],
        )]));
        let base: Vec<f16> = wave(rows * cols, 0.013).into_iter().map(f16::from_f32).collect();
        let blocks = patches
            .apply_low_rank_in_blocks("w", Elements::F16(&base), rows, cols)
            .expect("patched")
            .expect("low-rank patches take the block path");
        let whole = patches
            .apply(
                "w",
                Tensor::from_slice(&base, (rows, cols), &Device::Cpu).expect("base"),
            )
            .expect("patched");
        assert_eq!(blocks.dtype(), DType::F16);
        let (blocks, whole) = (
            values(&blocks.to_dtype(DType::F32).expect("f32")),
            values(&whole.to_dtype(DType::F32).expect("f32")),
        );
        let unpatched: Vec<f32> = base.iter().map(|value| value.to_f32()).collect();
        for (i, (block, whole)) in blocks.iter().zip(&whole).enumerate() {
            // Equal up to the f32 summation order, which may move the f16 rounding by one step.
            assert!(
                (block - whole).abs() <= whole.abs() * 1e-3 + 1e-6,
                "element {i}: {block} vs {whole}"
            );
        }
        assert!(
            blocks
                .iter()
                .zip(&unpatched)
                .filter(|(patched, base)| patched != base)
                .count()
                > rows * cols / 2
        );
    }

    #[test]
    fn loha_and_lokr_differences_are_hadamard_and_kronecker_products() {
        let (a, b, c, d) = ([1.0f32, 2.0], [3.0f32, -1.0, 0.5], [0.5f32, -2.0], [1.0f32, 1.0, 2.0]);
        let (_dir, lora) = lora_file(&[
            ("loha.hada_w1_a", &[2, 1], &a),
            ("loha.hada_w1_b", &[1, 3], &b),
            ("loha.hada_w2_a", &[2, 1], &c),
            ("loha.hada_w2_b", &[1, 3], &d),
            ("loha.alpha", &[], &[2.0]),
            ("lokr.lokr_w1", &[1, 2], &[2.0, -1.0]),
            ("lokr.lokr_w2_a", &[2, 1], &[1.0, 3.0]),
            ("lokr.lokr_w2_b", &[1, 1], &[0.5]),
            ("lokr.alpha", &[], &[4.0]),
        ]);
        let mut keys = LoraKeyMap::default();
        keys.insert("loha".into(), "w_loha");
        keys.insert("lokr".into(), "w_lokr");
        let loaded = load_lora(&lora, &keys, 1.0).expect("loaded");
        assert_eq!(loaded.used.len(), 9);
        // LoHa: alpha / rank 1 = 2; (a⊗b) ⊙ (c⊗d).
        let zeros = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("zeros");
        let loha = values(&loaded.patches["w_loha"][0].apply_to(&zeros).expect("patched"));
        let expected: Vec<f32> = (0..6)
            .map(|i| 2.0 * a[i / 3] * b[i % 3] * c[i / 3] * d[i % 3])
            .collect();
        assert_eq!(loha, expected);
        // LoKr: w2 = w2_a·w2_b = [0.5, 1.5]ᵀ, alpha / dim 1 = 4; kron([[2, −1]], w2) is 2×2.
        let zeros = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).expect("zeros");
        let lokr = values(&loaded.patches["w_lokr"][0].apply_to(&zeros).expect("patched"));
        assert_eq!(lokr, vec![4.0, -2.0, 12.0, -6.0]);
    }

    /// `einsum('i j k l, j r, i p -> p r k l', core, b, a)` by loops.
    fn cp_by_hand(core: &[f32], b: &[f32], a: &[f32], (r1, r2, k, l): (usize, usize, usize, usize)) -> Vec<f32> {
        let (out, input) = (a.len() / r1, b.len() / r2);
        let mut result = vec![0f32; out * input * k * l];
        for p in 0..out {
            for r in 0..input {
                for kk in 0..k * l {
                    let mut sum = 0f32;
                    for i in 0..r1 {
                        for j in 0..r2 {
                            sum += core[(i * r2 + j) * k * l + kk] * b[j * input + r] * a[i * out + p];
                        }
                    }
                    result[(p * input + r) * k * l + kk] = sum;
                }
            }
        }
        result
    }

    #[test]
    fn cp_decomposed_loha_and_lokr_and_bias_differences_patch_as_comfyui() {
        let dims = (2, 2, 1, 2);
        let t1 = [1.0f32, -1.0, 0.5, 2.0, 0.0, 1.0, -0.5, 1.5];
        let t2 = [0.5f32, 0.5, 1.0, -1.0, 2.0, 0.0, 1.0, 1.0];
        let w1a = [1.0f32, 0.0, 2.0, -1.0, 1.0, 0.5];
        let w1b = [0.5f32, 1.0, -1.0, 2.0];
        let w2a = [2.0f32, 1.0, 0.0, 1.0, -1.0, 1.0];
        let w2b = [1.0f32, 1.0, 0.5, -0.5];
        let (_dir, lora) = lora_file(&[
            ("loha.hada_t1", &[2, 2, 1, 2], &t1),
            ("loha.hada_t2", &[2, 2, 1, 2], &t2),
            ("loha.hada_w1_a", &[2, 3], &w1a),
            ("loha.hada_w1_b", &[2, 2], &w1b),
            ("loha.hada_w2_a", &[2, 3], &w2a),
            ("loha.hada_w2_b", &[2, 2], &w2b),
            ("loha.alpha", &[], &[4.0]),
            ("lokr.lokr_w1", &[1, 1], &[3.0]),
            ("lokr.lokr_t2", &[2, 2, 1, 2], &t1),
            ("lokr.lokr_w2_a", &[2, 3], &w1a),
            ("lokr.lokr_w2_b", &[2, 2], &w1b),
            ("full.diff", &[2], &[1.0, 2.0]),
            ("full.diff_b", &[2], &[0.25, -0.5]),
        ]);
        let mut keys = LoraKeyMap::default();
        keys.insert("loha".into(), "w_loha.weight");
        keys.insert("lokr".into(), "w_lokr.weight");
        keys.insert("full".into(), "w_full.weight");
        let loaded = load_lora(&lora, &keys, 1.0).expect("loaded");
        assert_eq!(loaded.used.len(), 13);
        let zeros = Tensor::zeros((3, 2, 1, 2), DType::F32, &Device::Cpu).expect("zeros");
        // LoHa: alpha / rank 2 = 2; the two CP products multiplied elementwise.
        let first = cp_by_hand(&t1, &w1b, &w1a, dims);
        let second = cp_by_hand(&t2, &w2b, &w2a, dims);
        let expected: Vec<f32> = first.iter().zip(&second).map(|(x, y)| 2.0 * x * y).collect();
        let loha = values(&loaded.patches["w_loha.weight"][0].apply_to(&zeros).expect("patched"));
        assert_eq!(loha, expected);
        // LoKr: kron([[3]], CP(t2, w2_b, w2_a)), no alpha.
        let lokr = values(&loaded.patches["w_lokr.weight"][0].apply_to(&zeros).expect("patched"));
        let expected: Vec<f32> = cp_by_hand(&t1, &w1b, &w1a, dims).iter().map(|v| 3.0 * v).collect();
        assert_eq!(lokr, expected);
        // `.diff_b` patches the bias beside the weight's `.diff`.
        let bias = values(
            &loaded.patches["w_full.bias"][0]
                .apply_to(&tensor(&[1.0, 1.0], &[2]))
                .expect("patched"),
        );
        assert_eq!(bias, vec![1.25, 0.5]);
        assert!(loaded.patches.contains_key("w_full.weight"));
    }

    #[test]
    fn kronecker_products_of_convolution_factors_keep_the_kernel() {
        let first = tensor(&[1.0, 2.0], &[1, 2]);
        let second = tensor(&(0..8).map(|v| v as f32).collect::<Vec<_>>(), &[1, 2, 2, 2]);
        let product = kronecker(&first, &second).expect("kron");
        assert_eq!(product.dims(), &[1, 4, 2, 2]);
        let expected: Vec<f32> = [1.0f32, 2.0]
            .iter()
            .flat_map(|f| (0..8).map(move |v| f * v as f32))
            .collect();
        assert_eq!(values(&product), expected);
    }

    #[test]
    fn tucker_cores_compose_with_the_down_projection() {
        let down_values: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
        let mid_values: Vec<f32> = (0..36).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0).collect();
        let composed = values(
            &tucker_down(
                &tensor(&down_values, &[2, 3, 1, 1]),
                &tensor(&mid_values, &[2, 2, 3, 3]),
            )
            .expect("composed"),
        );
        for i in 0..2 {
            for c in 0..3 {
                for tap in 0..9 {
                    let expected: f32 = (0..2)
                        .map(|j| mid_values[(i * 2 + j) * 9 + tap] * down_values[j * 3 + c])
                        .sum();
                    assert!((composed[(i * 3 + c) * 9 + tap] - expected).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn dora_renormalises_the_patched_weight_per_output_or_input() {
        let weight = [1.0f32, 2.0, 2.0, 0.0, 3.0, 4.0];
        let (up, down) = ([1.0f32, -1.0], [0.5f32, 0.0, 1.0]);
        let patched: Vec<f32> = (0..6).map(|i| weight[i] + 2.0 * up[i / 3] * down[i % 3]).collect();
        let patch = |dora: &[f32], shape: &[usize]| Patch {
            strength: 0.5,
            strength_model: 1.0,
            difference: Difference::LowRank {
                up: tensor(&up, &[2, 1]),
                down: tensor(&down, &[1, 3]),
                scale: 2.0,
            },
            dora_scale: Some(tensor(dora, shape)),
            rows: None,
        };
        let base = tensor(&weight, &[2, 3]);
        let blend = |renormalised: Vec<f32>| -> Vec<f32> {
            (0..6)
                .map(|i| weight[i] + 0.5 * (renormalised[i] - weight[i]))
                .collect()
        };
        // Per output row: the norms of W's rows (3 and 5).
        let per_row = values(&patch(&[6.0, 10.0], &[2, 1]).apply_to(&base).expect("patched"));
        let expected = blend((0..6).map(|i| patched[i] * 2.0).collect());
        assert!(
            per_row.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-5),
            "{per_row:?}"
        );
        // Per input column: the norms of the patched weight's columns.
        let column_norm = |c: usize| (patched[c].powi(2) + patched[3 + c].powi(2)).sqrt();
        let per_column = values(&patch(&[1.0, 1.0, 1.0], &[1, 3]).apply_to(&base).expect("patched"));
        let expected = blend((0..6).map(|i| patched[i] / column_norm(i % 3)).collect());
        assert!(
            per_column.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-5),
            "{per_column:?}"
        );
    }
}
