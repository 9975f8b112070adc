//! The diffusers layout of Stable Diffusion UNets and VAEs (SD1.x, SD2.x, SDXL), read under the
//! LDM names Easel's networks use, as ComfyUI reads a diffusers folder: the UNet renamed as
//! `comfy.utils.unet_to_diffusers` maps it, the VAE as `diffusers_convert.convert_vae_state_dict`
//! converts it (its attention matrices, linear in diffusers, seen as 1×1 convolutions). Also
//! the ControlNets and T2I-Adapters shipped in that layout, FLUX ControlNets among them (under
//! BFL's names, as `comfy.utils.flux_to_diffusers` maps them).
//!
//! [`ConvertedWeights`] is the view that does it: a mapped file's tensors under new names and
//! shapes, nothing copied. The text encoders of a diffusers folder need no conversion: they are
//! in the transformers layout the CLIP code reads.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::kernels::sgemm::Elements;
use crate::weights::{MappedWeights, TensorShapes};

/// The tensor every diffusers UNet has (ComfyUI's test in `unet_config_from_diffusers_unet`).
pub const DIFFUSERS_UNET_MARKER: &str = "conv_in.weight";
/// The tensor a diffusers ControlNet has (ComfyUI's test in `load_controlnet_state_dict`).
pub const DIFFUSERS_CONTROLNET_MARKER: &str = "controlnet_cond_embedding.conv_in.weight";
/// The tensor a diffusers T2I-Adapter has (ComfyUI's test in `load_t2i_adapter`).
pub const DIFFUSERS_T2I_ADAPTER_MARKER: &str = "adapter.body.0.resnets.0.block1.weight";
/// The tensor a diffusers FLUX ControlNet has (ComfyUI's test for InstantX's).
pub const DIFFUSERS_FLUX_CONTROLNET_MARKER: &str = "controlnet_x_embedder.weight";
/// The tensors a diffusers SD3 ControlNet has (ComfyUI's test in `convert_diffusers_mmdit`).
pub const DIFFUSERS_SD3_CONTROLNET_MARKERS: [&str; 2] =
    ["transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight"];
/// The tensor ComfyUI's `VAE` looks for to tell a diffusers VAE.
pub const DIFFUSERS_VAE_MARKER: &str = "decoder.up_blocks.0.resnets.0.norm1.weight";

/// What a union ControlNet has beside a ControlNet's tensors (ComfyUI keeps them as they are).
const UNION_CONTROLNET_PARTS: [&str; 4] = [
    "task_embedding",
    "transformer_layes.",
    "spatial_ch_projs.",
    "control_add_embedding.",
];

/// Why a file could not be read in the diffusers layout.
#[derive(Debug, thiserror::Error)]
pub enum DiffusersLayoutError {
    #[error("'{path}' is not a diffusers-layout {part}: it has no tensor '{marker}'")]
    NotDiffusers {
        path: String,
        part: &'static str,
        marker: &'static str,
    },
    #[error("'{path}': an SD3 ControlNet with as many blocks as its model ({blocks}) is not supported by Easel yet")]
    FullDepthSd3ControlNet { path: String, blocks: usize },
}

/// One tensor of a [`ConvertedWeights`]: the file's name for it and the shape it is served in
/// (the file's, or the same elements seen in another shape), or the file's tensors it joins
/// along the first dimension (diffusers' separate query, key and value projections as one).
struct ConvertedTensor {
    originals: Vec<String>,
    shape: Vec<usize>,
}

/// A weight file's tensors under other names, some seen in another shape with the same elements
/// in the same order (a `[out, in]` matrix as an `[out, in, 1, 1]` convolution). Tensors the
/// conversion has no name for are left out, as ComfyUI leaves them out.
pub struct ConvertedWeights {
    inner: Arc<dyn MappedWeights>,
    /// Served name → the file's tensor.
    tensors: HashMap<String, ConvertedTensor>,
}

impl ConvertedWeights {
    /// A diffusers UNet (`unet/diffusion_pytorch_model.safetensors`) under ComfyUI's LDM names.
    pub fn diffusers_unet(inner: Arc<dyn MappedWeights>) -> Result<Self, DiffusersLayoutError> {
        if !inner.has(DIFFUSERS_UNET_MARKER) {
            return Err(not_diffusers(inner.path(), "UNet", DIFFUSERS_UNET_MARKER));
        }
        let blocks = UNetBlocks::of(inner.as_ref());
        let names = inner
            .tensor_names()
            .filter_map(|name| blocks.ldm_name(name).map(|ldm| (ldm, name.to_string())))
            .collect::<Vec<_>>();
        Ok(Self::with_names(inner, names))
    }

    /// A diffusers ControlNet under the LDM names of [`crate::architectures::controlnet`]: its
    /// encoder as the UNet's, the conditioning embedding as `input_hint_block` (`conv_in`, then
    /// each of `blocks`, then `conv_out`, every other index), `controlnet_down_blocks` as
    /// `zero_convs` and `controlnet_mid_block` as `middle_block_out`, a union ControlNet's parts
    /// as they are (ComfyUI's renaming in `load_controlnet_state_dict`).
    pub fn diffusers_controlnet(inner: Arc<dyn MappedWeights>) -> Result<Self, DiffusersLayoutError> {
        if !inner.has(DIFFUSERS_CONTROLNET_MARKER) {
            return Err(not_diffusers(inner.path(), "ControlNet", DIFFUSERS_CONTROLNET_MARKER));
        }
        let blocks = UNetBlocks::of(inner.as_ref());
        let hint_blocks = inner.count_indices("controlnet_cond_embedding.blocks.");
        let control_name = |name: &str| -> Option<String> {
            if let Some(tail) = name.strip_prefix("controlnet_mid_block.") {
                return Some(format!("middle_block_out.0.{tail}"));
            }
            if let Some((index, tail)) = leading_index(name.strip_prefix("controlnet_down_blocks.")?) {
                return Some(format!("zero_convs.{index}.0.{tail}"));
            }
            None
        };
        let hint_name = |name: &str| -> Option<String> {
            let rest = name.strip_prefix("controlnet_cond_embedding.")?;
            if let Some(tail) = rest.strip_prefix("conv_in.") {
                return Some(format!("input_hint_block.0.{tail}"));
            }
            if let Some(tail) = rest.strip_prefix("conv_out.") {
                return Some(format!("input_hint_block.{}.{tail}", 2 * (hint_blocks + 1)));
            }
            let (index, tail) = indexed(rest, "blocks")?;
            Some(format!("input_hint_block.{}.{tail}", 2 * (index + 1)))
        };
        // A union ControlNet's own parts keep their names but for the fused attention projection.
        let union_name = |name: &str| -> Option<String> {
            UNION_CONTROLNET_PARTS
                .iter()
                .any(|part| name.starts_with(part))
                .then(|| name.replace(".attn.in_proj_", ".attn.in_proj."))
        };
        let names = inner
            .tensor_names()
            .filter_map(|name| {
                let ldm = blocks
                    .ldm_name(name)
                    .or_else(|| control_name(name))
                    .or_else(|| hint_name(name))
                    .or_else(|| union_name(name))?;
                Some((ldm, name.to_string()))
            })
            .collect::<Vec<_>>();
        Ok(Self::with_names(inner, names))
    }

    /// A diffusers T2I-Adapter under the names of [`crate::architectures::t2i_adapter`]: the full
    /// adapter's `adapter.body.{i}.resnets.{j}.` as `body.{2i + j}.` (ComfyUI's renaming in
    /// `load_t2i_adapter`); the light adapter's (which has `out_conv`s) as `body.{i}.body.{j}.`,
    /// its extractors' own convolutions under `body.{i}.` (ComfyUI's renaming reads the light
    /// layout into the full one's names, which its light adapter does not have).
    pub fn diffusers_t2i_adapter(inner: Arc<dyn MappedWeights>) -> Result<Self, DiffusersLayoutError> {
        if !inner.has(DIFFUSERS_T2I_ADAPTER_MARKER) {
            return Err(not_diffusers(inner.path(), "T2I-Adapter", DIFFUSERS_T2I_ADAPTER_MARKER));
        }
        let light = inner.has("adapter.body.0.out_conv.weight");
        let adapter_name = |name: &str| -> Option<String> {
            let rest = name.strip_prefix("adapter.")?;
            let Some((level, rest)) = indexed(rest, "body") else {
                return Some(rest.to_string());
            };
            Some(match indexed(rest, "resnets") {
                Some((block, tail)) if light => format!("body.{level}.body.{block}.{tail}"),
                Some((block, tail)) => format!("body.{}.{tail}", 2 * level + block),
                None if light => format!("body.{level}.{rest}"),
                None => format!("body.{}.{rest}", 2 * level),
            })
        };
        let names = inner
            .tensor_names()
            .filter_map(|name| Some((adapter_name(name)?, name.to_string())))
            .collect::<Vec<_>>();
        Ok(Self::with_names(inner, names))
    }

    /// A diffusers VAE (`vae/diffusion_pytorch_model.safetensors`) under ComfyUI's LDM names.
    pub fn diffusers_vae(inner: Arc<dyn MappedWeights>) -> Result<Self, DiffusersLayoutError> {
        if !inner.has(DIFFUSERS_VAE_MARKER) {
            return Err(not_diffusers(inner.path(), "VAE", DIFFUSERS_VAE_MARKER));
        }
        let levels = inner.count_indices("decoder.up_blocks.");
        let names = inner
            .tensor_names()
            .map(|name| (vae_ldm_name(name, levels), name.to_string()))
            .collect::<Vec<_>>();
        let mut converted = Self::with_names(inner, names);
        for (name, tensor) in converted.tensors.iter_mut() {
            let attention_matrix = ["q", "k", "v", "proj_out"]
                .iter()
                .any(|module| name.ends_with(&format!("mid.attn_1.{module}.weight")));
            if attention_matrix && tensor.shape.len() == 2 {
                tensor.shape.extend([1, 1]);
            }
        }
        Ok(converted)
    }

    /// A FLUX ControlNet in diffusers' layout (InstantX's, Shakker-Labs' union) under BFL's names
    /// (ComfyUI's `convert_diffusers_mmdit` with `flux_to_diffusers`' map): the blocks'
    /// separate query, key and value projections joined (the single blocks' with `proj_mlp`),
    /// `controlnet_x_embedder` as `pos_embed_input`, the ControlNet's own layers as they are.
    pub fn diffusers_flux_controlnet(inner: Arc<dyn MappedWeights>) -> Result<Self, DiffusersLayoutError> {
        if !inner.has(DIFFUSERS_FLUX_CONTROLNET_MARKER) {
            return Err(not_diffusers(
                inner.path(),
                "FLUX ControlNet",
                DIFFUSERS_FLUX_CONTROLNET_MARKER,
            ));
        }
        let doubles = inner.count_indices("transformer_blocks.");
        let singles = inner.count_indices("single_transformer_blocks.");
        let mut names: Vec<(String, Vec<String>)> = Vec::new();
        for end in ["weight", "bias"] {
            for block in 0..doubles {
                let from = format!("transformer_blocks.{block}");
                let to = format!("double_blocks.{block}");
                let joined = |parts: [&str; 3]| parts.map(|part| format!("{from}.attn.{part}.{end}")).to_vec();
                names.push((format!("{to}.img_attn.qkv.{end}"), joined(["to_q", "to_k", "to_v"])));
                names.push((
                    format!("{to}.txt_attn.qkv.{end}"),
                    joined(["add_q_proj", "add_k_proj", "add_v_proj"]),
                ));
            }
            for block in 0..singles {
                let from = format!("single_transformer_blocks.{block}");
                let mut parts: Vec<String> = ["to_q", "to_k", "to_v"]
                    .iter()
                    .map(|part| format!("{from}.attn.{part}.{end}"))
                    .collect();
                parts.push(format!("{from}.proj_mlp.{end}"));
                names.push((format!("single_blocks.{block}.linear1.{end}"), parts));
            }
        }
        let renamed = |name: &str| -> Option<String> {
            if let Some((block, rest)) = indexed(name, "transformer_blocks") {
                let (_, bfl) = FLUX_DOUBLE_BLOCK.iter().find(|(diffusers, _)| *diffusers == rest)?;
                return Some(format!("double_blocks.{block}.{bfl}"));
            }
            if let Some((block, rest)) = indexed(name, "single_transformer_blocks") {
                let (_, bfl) = FLUX_SINGLE_BLOCK.iter().find(|(diffusers, _)| *diffusers == rest)?;
                return Some(format!("single_blocks.{block}.{bfl}"));
            }
            if let Some((_, bfl)) = FLUX_BASIC.iter().find(|(diffusers, _)| *diffusers == name) {
                return Some(bfl.to_string());
            }
            let own = [
                "controlnet_blocks.",
                "controlnet_single_blocks.",
                "controlnet_mode_embedder.",
            ];
            own.iter()
                .any(|prefix| name.starts_with(prefix))
                .then(|| name.to_string())
        };
        names.extend(
            inner
                .tensor_names()
                .filter_map(|name| renamed(name).map(|bfl| (bfl, vec![name.to_string()]))),
        );
        Ok(Self::joined(inner, names))
    }

    /// An SD3 ControlNet in diffusers' layout (InstantX's, AliMama's inpainting one) under
    /// Stability's names (ComfyUI's `convert_diffusers_mmdit`): the blocks' separate query, key
    /// and value projections joined, the ControlNet's own layers (`controlnet_blocks`,
    /// `pos_embed_input`) as they are. ComfyUI swaps the halves of the text modulation of the
    /// model's last block only, which a ControlNet with fewer blocks has not: one with as many is
    /// refused.
    pub fn diffusers_sd3_controlnet(inner: Arc<dyn MappedWeights>) -> Result<Self, DiffusersLayoutError> {
        if let Some(marker) = DIFFUSERS_SD3_CONTROLNET_MARKERS
            .iter()
            .find(|marker| !inner.has(marker))
        {
            return Err(not_diffusers(inner.path(), "SD3 ControlNet", marker));
        }
        let blocks = inner.count_indices("transformer_blocks.");
        let hidden = inner
            .shape(DIFFUSERS_SD3_CONTROLNET_MARKERS[1])
            .and_then(<[usize]>::first)
            .copied()
            .unwrap_or(0);
        if blocks == hidden / 64 {
            return Err(DiffusersLayoutError::FullDepthSd3ControlNet {
                path: inner.path().display().to_string(),
                blocks,
            });
        }
        let second_attention: Vec<usize> = (0..blocks)
            .filter(|n| inner.has(&format!("transformer_blocks.{n}.attn2.to_q.weight")))
            .collect();
        let mut joined: Vec<(String, Vec<String>)> = Vec::new();
        for matrix in mmdit_diffusers_matrices(blocks, hidden, &second_attention) {
            for end in ["weight", "bias"] {
                let (native, original) = (
                    format!("{}.{end}", matrix.native),
                    format!("{}.{end}", matrix.diffusers),
                );
                match joined.iter_mut().find(|(name, _)| *name == native) {
                    Some((_, originals)) => originals.push(original),
                    None => joined.push((native, vec![original])),
                }
            }
        }
        for block in 0..blocks {
            let (from, to) = (
                format!("transformer_blocks.{block}.attn"),
                format!("joint_blocks.{block}"),
            );
            for (diffusers, native) in MMDIT_QK_NORMS {
                joined.push((
                    format!("{to}.{native}.weight"),
                    vec![format!("{from}{diffusers}.weight")],
                ));
            }
        }
        joined.push(("pos_embed".into(), vec!["pos_embed.pos_embed".into()]));
        let own = ["controlnet_blocks.", "pos_embed_input."];
        joined.extend(
            inner
                .tensor_names()
                .filter(|name| own.iter().any(|prefix| name.starts_with(prefix)))
                .map(|name| (name.to_string(), vec![name.to_string()])),
        );
        Ok(Self::joined(inner, joined))
    }

    /// Stability's SD3.5 ControlNet with its embedders under Stability's names where the file
    /// has diffusers' (ComfyUI's `MMDIT_MAP_BASIC` renaming in `load_controlnet_sd35`); its
    /// other tensors as they are.
    pub fn sd35_controlnet(inner: Arc<dyn MappedWeights>) -> Self {
        let names = inner
            .tensor_names()
            .map(|name| {
                let renamed = ["weight", "bias"].iter().find_map(|end| {
                    let stem = name.strip_suffix(&format!(".{end}"))?;
                    let (_, native) = MMDIT_BASIC.iter().find(|(diffusers, _)| *diffusers == stem)?;
                    Some(format!("{native}.{end}"))
                });
                (renamed.unwrap_or_else(|| name.to_string()), name.to_string())
            })
            .collect();
        Self::with_names(inner, names)
    }

    /// `inner`'s tensors under the names of `names` (served name, file's name), in their shapes.
    fn with_names(inner: Arc<dyn MappedWeights>, names: Vec<(String, String)>) -> Self {
        let names = names
            .into_iter()
            .map(|(name, original)| (name, vec![original]))
            .collect();
        Self::joined(inner, names)
    }

    /// `inner`'s tensors joined along their first dimension under the names of `names` (served
    /// name, the file's tensors in order); a name whose tensors the file lacks is left out.
    fn joined(inner: Arc<dyn MappedWeights>, names: Vec<(String, Vec<String>)>) -> Self {
        let tensors = names
            .into_iter()
            .filter_map(|(name, originals)| {
                let shapes: Vec<&[usize]> = originals.iter().map(|o| inner.shape(o)).collect::<Option<_>>()?;
                let mut shape = shapes.first()?.to_vec();
                if let Some(rows) = shape.first_mut() {
                    *rows = shapes.iter().filter_map(|s| s.first()).sum();
                }
                Some((name, ConvertedTensor { originals, shape }))
            })
            .collect();
        ConvertedWeights { inner, tensors }
    }
}

fn not_diffusers(path: &Path, part: &'static str, marker: &'static str) -> DiffusersLayoutError {
    DiffusersLayoutError::NotDiffusers {
        path: path.display().to_string(),
        part,
        marker,
    }
}

impl TensorShapes for ConvertedWeights {
    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|tensor| tensor.shape.as_slice())
    }

    fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.tensors.keys().map(String::as_str))
    }
}

impl MappedWeights for ConvertedWeights {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn elements(&self, name: &str) -> Option<Elements<'_>> {
        match self.tensors.get(name)?.originals.as_slice() {
            [original] => self.inner.elements(original),
            _ => None,
        }
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let Some(tensor) = self.tensors.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "'{}' has no tensor '{name}'",
                self.path().display()
            )));
        };
        let parts = tensor
            .originals
            .iter()
            .map(|original| self.inner.load(original, dtype, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.reshape(tensor.shape.as_slice())
    }
}

/// A DiT weight matrix as diffusers names it (without `.weight`), the model's own matrix (BFL's
/// for FLUX, Stability's for SD3) it is or is part of (without `.weight`), the rows of that
/// matrix it takes when the model fuses several (query, key and value; FLUX's single blocks' MLP
/// input beside them), and whether its two halves of rows come in the other order (the final
/// modulation's scale and shift).
pub struct DiffusersMatrix {
    pub diffusers: String,
    pub native: String,
    pub rows: Option<(usize, usize)>,
    pub swapped_halves: bool,
}

impl DiffusersMatrix {
    fn new(diffusers: String, native: String, rows: Option<(usize, usize)>) -> Self {
        DiffusersMatrix {
            diffusers,
            native,
            rows,
            swapped_halves: false,
        }
    }
}

/// Every weight matrix of a FLUX model with `doubles` double and `singles` single blocks of
/// `hidden` width (and `mlp_hidden` wide MLPs) under its diffusers name (ComfyUI's
/// `flux_to_diffusers`, which its LoRA key maps use).
pub fn flux_diffusers_matrices(
    doubles: usize,
    singles: usize,
    hidden: usize,
    mlp_hidden: usize,
) -> Vec<DiffusersMatrix> {
    let matrix = DiffusersMatrix::new;
    let third = |index: usize| Some((index * hidden, hidden));
    let renamed = |table: &[(&str, &str)], from: &str, to: &str| -> Vec<DiffusersMatrix> {
        table
            .iter()
            .filter_map(|(diffusers, bfl)| {
                Some(matrix(
                    format!("{from}{}", diffusers.strip_suffix(".weight")?),
                    format!("{to}{}", bfl.strip_suffix(".weight")?),
                    None,
                ))
            })
            .collect()
    };
    let mut matrices = Vec::new();
    for block in 0..doubles {
        let (from, to) = (
            format!("transformer_blocks.{block}."),
            format!("double_blocks.{block}."),
        );
        for (index, (image, text)) in [("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")]
            .into_iter()
            .enumerate()
        {
            matrices.push(matrix(
                format!("{from}attn.{image}"),
                format!("{to}img_attn.qkv"),
                third(index),
            ));
            matrices.push(matrix(
                format!("{from}attn.{text}"),
                format!("{to}txt_attn.qkv"),
                third(index),
            ));
        }
        matrices.extend(renamed(&FLUX_DOUBLE_BLOCK, &from, &to));
    }
    for block in 0..singles {
        let (from, to) = (
            format!("single_transformer_blocks.{block}."),
            format!("single_blocks.{block}."),
        );
        for (index, part) in ["to_q", "to_k", "to_v"].into_iter().enumerate() {
            matrices.push(matrix(
                format!("{from}attn.{part}"),
                format!("{to}linear1"),
                third(index),
            ));
        }
        matrices.push(matrix(
            format!("{from}proj_mlp"),
            format!("{to}linear1"),
            Some((3 * hidden, mlp_hidden)),
        ));
        matrices.extend(renamed(&FLUX_SINGLE_BLOCK, &from, &to));
    }
    matrices.extend(renamed(&FLUX_BASIC, "", ""));
    matrices.push(matrix("proj_out".into(), "final_layer.linear".into(), None));
    matrices.push(DiffusersMatrix {
        swapped_halves: true,
        ..matrix("norm_out.linear".into(), "final_layer.adaLN_modulation.1".into(), None)
    });
    matrices
}

/// Every weight matrix of an MMDiT (SD3) with `blocks` joint blocks of `hidden` width under
/// its diffusers name (ComfyUI's `mmdit_to_diffusers`, which its LoRA key maps use); the
/// second self-attention only in the blocks `x_block_self_attention` names.
pub fn mmdit_diffusers_matrices(
    blocks: usize,
    hidden: usize,
    x_block_self_attention: &[usize],
) -> Vec<DiffusersMatrix> {
    let matrix = DiffusersMatrix::new;
    let third = |index: usize| Some((index * hidden, hidden));
    let mut matrices = Vec::new();
    for block in 0..blocks {
        let (from, to) = (format!("transformer_blocks.{block}."), format!("joint_blocks.{block}."));
        let mut attentions = vec![("attn", ["to_q", "to_k", "to_v"], "x_block.attn")];
        attentions.push(("attn", ["add_q_proj", "add_k_proj", "add_v_proj"], "context_block.attn"));
        if x_block_self_attention.contains(&block) {
            attentions.push(("attn2", ["to_q", "to_k", "to_v"], "x_block.attn2"));
        }
        for (attention, parts, native) in attentions {
            for (index, part) in parts.into_iter().enumerate() {
                matrices.push(matrix(
                    format!("{from}{attention}.{part}"),
                    format!("{to}{native}.qkv"),
                    third(index),
                ));
            }
        }
        let last = block + 1 == blocks;
        for (diffusers, native) in MMDIT_BLOCK {
            matrices.push(DiffusersMatrix {
                // The last text block only modulates its attention: its shift and scale come
                // the other way round in diffusers.
                swapped_halves: last && diffusers == "norm1_context.linear",
                ..matrix(format!("{from}{diffusers}"), format!("{to}{native}"), None)
            });
        }
    }
    for (diffusers, native) in MMDIT_BASIC {
        matrices.push(DiffusersMatrix {
            swapped_halves: diffusers == "norm_out.linear",
            ..matrix(diffusers.to_string(), native.to_string(), None)
        });
    }
    matrices
}

/// An MMDiT joint block's weight matrices, diffusers' name → Stability's, but for the fused
/// attention projections.
const MMDIT_BLOCK: [(&str, &str); 9] = [
    ("norm1_context.linear", "context_block.adaLN_modulation.1"),
    ("attn.to_add_out", "context_block.attn.proj"),
    ("ff_context.net.0.proj", "context_block.mlp.fc1"),
    ("ff_context.net.2", "context_block.mlp.fc2"),
    ("norm1.linear", "x_block.adaLN_modulation.1"),
    ("attn.to_out.0", "x_block.attn.proj"),
    ("attn2.to_out.0", "x_block.attn2.proj"),
    ("ff.net.0.proj", "x_block.mlp.fc1"),
    ("ff.net.2", "x_block.mlp.fc2"),
];

/// An MMDiT joint block's query and key norms: diffusers' name after `attn` → Stability's
/// within the block (without `.weight`).
const MMDIT_QK_NORMS: [(&str, &str); 6] = [
    (".norm_q", "x_block.attn.ln_q"),
    (".norm_k", "x_block.attn.ln_k"),
    (".norm_added_q", "context_block.attn.ln_q"),
    (".norm_added_k", "context_block.attn.ln_k"),
    ("2.norm_q", "x_block.attn2.ln_q"),
    ("2.norm_k", "x_block.attn2.ln_k"),
];

/// The MMDiT's other weight matrices.
const MMDIT_BASIC: [(&str, &str); 8] = [
    ("context_embedder", "context_embedder"),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("pos_embed.proj", "x_embedder.proj"),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),
    ("proj_out", "final_layer.linear"),
];

/// `"3.rest"` → `(3, "rest")`.
fn leading_index(name: &str) -> Option<(usize, &str)> {
    let (index, rest) = name.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// `"resnets.1.rest"` (with `kind` `"resnets"`) → `(1, "rest")`.
fn indexed<'a>(name: &'a str, kind: &str) -> Option<(usize, &'a str)> {
    leading_index(name.strip_prefix(kind)?.strip_prefix('.')?)
}

/// A FLUX double block's diffusers names (within `transformer_blocks.N.`) → BFL's, but for the
/// joined attention projections.
const FLUX_DOUBLE_BLOCK: [(&str, &str); 20] = [
    ("attn.to_out.0.weight", "img_attn.proj.weight"),
    ("attn.to_out.0.bias", "img_attn.proj.bias"),
    ("norm1.linear.weight", "img_mod.lin.weight"),
    ("norm1.linear.bias", "img_mod.lin.bias"),
    ("norm1_context.linear.weight", "txt_mod.lin.weight"),
    ("norm1_context.linear.bias", "txt_mod.lin.bias"),
    ("attn.to_add_out.weight", "txt_attn.proj.weight"),
    ("attn.to_add_out.bias", "txt_attn.proj.bias"),
    ("ff.net.0.proj.weight", "img_mlp.0.weight"),
    ("ff.net.0.proj.bias", "img_mlp.0.bias"),
    ("ff.net.2.weight", "img_mlp.2.weight"),
    ("ff.net.2.bias", "img_mlp.2.bias"),
    ("ff_context.net.0.proj.weight", "txt_mlp.0.weight"),
    ("ff_context.net.0.proj.bias", "txt_mlp.0.bias"),
    ("ff_context.net.2.weight", "txt_mlp.2.weight"),
    ("ff_context.net.2.bias", "txt_mlp.2.bias"),
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
];

/// The same for a single block (within `single_transformer_blocks.N.`).
const FLUX_SINGLE_BLOCK: [(&str, &str); 6] = [
    ("norm.linear.weight", "modulation.lin.weight"),
    ("norm.linear.bias", "modulation.lin.bias"),
    ("proj_out.weight", "linear2.weight"),
    ("proj_out.bias", "linear2.bias"),
    ("attn.norm_q.weight", "norm.query_norm.scale"),
    ("attn.norm_k.weight", "norm.key_norm.scale"),
];

/// FLUX's layers outside the blocks (a ControlNet's input projection among them).
const FLUX_BASIC: [(&str, &str); 18] = [
    ("controlnet_x_embedder.weight", "pos_embed_input.weight"),
    ("controlnet_x_embedder.bias", "pos_embed_input.bias"),
    ("x_embedder.weight", "img_in.weight"),
    ("x_embedder.bias", "img_in.bias"),
    ("context_embedder.weight", "txt_in.weight"),
    ("context_embedder.bias", "txt_in.bias"),
    (
        "time_text_embed.timestep_embedder.linear_1.weight",
        "time_in.in_layer.weight",
    ),
    (
        "time_text_embed.timestep_embedder.linear_1.bias",
        "time_in.in_layer.bias",
    ),
    (
        "time_text_embed.timestep_embedder.linear_2.weight",
        "time_in.out_layer.weight",
    ),
    (
        "time_text_embed.timestep_embedder.linear_2.bias",
        "time_in.out_layer.bias",
    ),
    (
        "time_text_embed.text_embedder.linear_1.weight",
        "vector_in.in_layer.weight",
    ),
    ("time_text_embed.text_embedder.linear_1.bias", "vector_in.in_layer.bias"),
    (
        "time_text_embed.text_embedder.linear_2.weight",
        "vector_in.out_layer.weight",
    ),
    (
        "time_text_embed.text_embedder.linear_2.bias",
        "vector_in.out_layer.bias",
    ),
    (
        "time_text_embed.guidance_embedder.linear_1.weight",
        "guidance_in.in_layer.weight",
    ),
    (
        "time_text_embed.guidance_embedder.linear_1.bias",
        "guidance_in.in_layer.bias",
    ),
    (
        "time_text_embed.guidance_embedder.linear_2.weight",
        "guidance_in.out_layer.weight",
    ),
    (
        "time_text_embed.guidance_embedder.linear_2.bias",
        "guidance_in.out_layer.bias",
    ),
];

/// The UNet's parts whose names need no block arithmetic (ComfyUI's `UNET_MAP_BASIC`): diffusers
/// name → LDM name.
const UNET_BASIC: [(&str, &str); 18] = [
    ("class_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("class_embedding.linear_1.bias", "label_emb.0.0.bias"),
    ("class_embedding.linear_2.weight", "label_emb.0.2.weight"),
    ("class_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("add_embedding.linear_1.bias", "label_emb.0.0.bias"),
    ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
    ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("conv_in.weight", "input_blocks.0.0.weight"),
    ("conv_in.bias", "input_blocks.0.0.bias"),
    ("conv_norm_out.weight", "out.0.weight"),
    ("conv_norm_out.bias", "out.0.bias"),
    ("conv_out.weight", "out.2.weight"),
    ("conv_out.bias", "out.2.bias"),
    ("time_embedding.linear_1.weight", "time_embed.0.weight"),
    ("time_embedding.linear_1.bias", "time_embed.0.bias"),
    ("time_embedding.linear_2.weight", "time_embed.2.weight"),
    ("time_embedding.linear_2.bias", "time_embed.2.bias"),
];

/// A residual block's modules (ComfyUI's `UNET_MAP_RESNET`): diffusers → LDM.
const UNET_RESNET: [(&str, &str); 6] = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
];

/// A diffusers residual block's tensor (`conv1.weight`) under its LDM name (`in_layers.2.weight`).
fn resnet_tensor(tail: &str) -> Option<String> {
    UNET_RESNET
        .iter()
        .find_map(|(diffusers, ldm)| tail.strip_prefix(diffusers).map(|rest| format!("{ldm}{rest}")))
}

/// The block structure of a diffusers UNet, which numbers the LDM's `input_blocks` and
/// `output_blocks`: per level, how many residual blocks go down and up, and which of the up
/// ones are followed by a transformer.
struct UNetBlocks {
    down_resnets: Vec<usize>,
    up_resnets: Vec<usize>,
    up_attentions: HashSet<(usize, usize)>,
}

impl UNetBlocks {
    fn of(file: &dyn TensorShapes) -> Self {
        let per_level = |prefix: &str, kind: &str| {
            let levels = file.count_indices(prefix);
            (0..levels)
                .map(|level| file.count_indices(&format!("{prefix}{level}.{kind}.")))
                .collect::<Vec<_>>()
        };
        let up_attentions = file
            .tensor_names()
            .filter_map(|name| {
                let (level, rest) = leading_index(name.strip_prefix("up_blocks.")?)?;
                let (block, _) = indexed(rest, "attentions")?;
                Some((level, block))
            })
            .collect();
        UNetBlocks {
            down_resnets: per_level("down_blocks.", "resnets"),
            up_resnets: per_level("up_blocks.", "resnets"),
            up_attentions,
        }
    }

    /// The `input_blocks` index of level `level`'s first residual block: after `conv_in` and
    /// every earlier level's residual blocks and downsampler.
    fn first_input_block(&self, level: usize) -> usize {
        1 + self.down_resnets[..level.min(self.down_resnets.len())]
            .iter()
            .map(|blocks| blocks + 1)
            .sum::<usize>()
    }

    /// The `output_blocks` index of up level `level`'s first residual block.
    fn first_output_block(&self, level: usize) -> usize {
        self.up_resnets[..level.min(self.up_resnets.len())].iter().sum()
    }

    /// The LDM name of the diffusers tensor `name`; `None` for a tensor ComfyUI does not map.
    fn ldm_name(&self, name: &str) -> Option<String> {
        if let Some((_, ldm)) = UNET_BASIC.iter().find(|(diffusers, _)| *diffusers == name) {
            return Some(ldm.to_string());
        }
        if let Some(rest) = name.strip_prefix("down_blocks.") {
            let (level, rest) = leading_index(rest)?;
            let first = self.first_input_block(level);
            if let Some((block, tail)) = indexed(rest, "resnets") {
                return Some(format!("input_blocks.{}.0.{}", first + block, resnet_tensor(tail)?));
            }
            if let Some((block, tail)) = indexed(rest, "attentions") {
                return Some(format!("input_blocks.{}.1.{tail}", first + block));
            }
            let tail = rest.strip_prefix("downsamplers.0.conv.")?;
            let downsampler = first + self.down_resnets.get(level)?;
            return Some(format!("input_blocks.{downsampler}.0.op.{tail}"));
        }
        if let Some(rest) = name.strip_prefix("mid_block.") {
            if let Some((block, tail)) = indexed(rest, "resnets") {
                return Some(format!("middle_block.{}.{}", 2 * block, resnet_tensor(tail)?));
            }
            let (_, tail) = indexed(rest, "attentions").filter(|(block, _)| *block == 0)?;
            return Some(format!("middle_block.1.{tail}"));
        }
        let rest = name.strip_prefix("up_blocks.")?;
        let (level, rest) = leading_index(rest)?;
        let first = self.first_output_block(level);
        if let Some((block, tail)) = indexed(rest, "resnets") {
            return Some(format!("output_blocks.{}.0.{}", first + block, resnet_tensor(tail)?));
        }
        if let Some((block, tail)) = indexed(rest, "attentions") {
            return Some(format!("output_blocks.{}.1.{tail}", first + block));
        }
        let tail = rest.strip_prefix("upsamplers.0.conv.")?;
        let last = self.up_resnets.get(level)?.checked_sub(1)?;
        // The upsampler follows the level's last block: after its transformer, if it has one.
        let position = if self.up_attentions.contains(&(level, last)) {
            2
        } else {
            1
        };
        Some(format!("output_blocks.{}.{position}.conv.{tail}", first + last))
    }
}

/// The mid-block attention's modules (ComfyUI's `vae_conversion_map_attn`): diffusers (both
/// the current names and those of diffusers before 0.15) → LDM.
const VAE_ATTENTION: [(&str, &str); 9] = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
    ("query.", "q."),
    ("key.", "k."),
    ("value.", "v."),
    ("proj_attn.", "proj_out."),
];

/// The LDM name of a diffusers VAE tensor, in a VAE of `levels` levels (the decoder's levels are
/// numbered from the bottom in the LDM, from the top in diffusers).
fn vae_ldm_name(name: &str, levels: usize) -> String {
    let Some((side, rest)) = name
        .strip_prefix("encoder.")
        .map(|rest| ("encoder", rest))
        .or_else(|| name.strip_prefix("decoder.").map(|rest| ("decoder", rest)))
    else {
        return name.to_string();
    };
    let resnet = |tail: &str| tail.replace("conv_shortcut", "nin_shortcut");
    let converted = vae_block_name(rest, levels, resnet).unwrap_or_else(|| match rest.strip_prefix("conv_norm_out.") {
        Some(tail) => format!("norm_out.{tail}"),
        None => rest.to_string(),
    });
    format!("{side}.{converted}")
}

/// The LDM name of an encoder's or decoder's tensor inside a level or the mid block (`rest`
/// after `encoder.`/`decoder.`); `None` for the tensors outside them.
fn vae_block_name(rest: &str, levels: usize, resnet: impl Fn(&str) -> String) -> Option<String> {
    if let Some(rest) = rest.strip_prefix("down_blocks.") {
        let (level, rest) = leading_index(rest)?;
        if let Some((block, tail)) = indexed(rest, "resnets") {
            return Some(format!("down.{level}.block.{block}.{}", resnet(tail)));
        }
        let tail = rest.strip_prefix("downsamplers.0.")?;
        return Some(format!("down.{level}.downsample.{tail}"));
    }
    if let Some(rest) = rest.strip_prefix("up_blocks.") {
        let (level, rest) = leading_index(rest)?;
        let ldm_level = levels.checked_sub(level + 1)?;
        if let Some((block, tail)) = indexed(rest, "resnets") {
            return Some(format!("up.{ldm_level}.block.{block}.{}", resnet(tail)));
        }
        let tail = rest.strip_prefix("upsamplers.0.")?;
        return Some(format!("up.{ldm_level}.upsample.{tail}"));
    }
    let rest = rest.strip_prefix("mid_block.")?;
    if let Some((block, tail)) = indexed(rest, "resnets") {
        return Some(format!("mid.block_{}.{}", block + 1, resnet(tail)));
    }
    let (_, tail) = indexed(rest, "attentions")?;
    let module = VAE_ATTENTION
        .iter()
        .find_map(|(diffusers, ldm)| tail.strip_prefix(diffusers).map(|rest| format!("{ldm}{rest}")))?;
    Some(format!("mid.attn_1.{module}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet_of(names: &[&str]) -> UNetBlocks {
        let shapes: HashMap<String, Vec<usize>> = names.iter().map(|name| (name.to_string(), vec![1])).collect();
        UNetBlocks::of(&shapes)
    }

    #[test]
    fn sdxl_levels_without_attention_number_their_upsamplers_after_the_resnet() {
        // SDXL's last up level has no transformers; its first two do.
        let mut names = Vec::new();
        for level in 0..3 {
            names.push(format!("down_blocks.{level}.resnets.0.conv1.weight"));
            names.push(format!("down_blocks.{level}.resnets.1.conv1.weight"));
            for block in 0..3 {
                names.push(format!("up_blocks.{level}.resnets.{block}.conv1.weight"));
                if level < 2 {
                    names.push(format!("up_blocks.{level}.attentions.{block}.proj_in.weight"));
                }
            }
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let unet = unet_of(&names);
        let ldm = |name: &str| unet.ldm_name(name);
        assert_eq!(
            ldm("down_blocks.2.resnets.1.conv1.weight").as_deref(),
            Some("input_blocks.8.0.in_layers.2.weight")
        );
        assert_eq!(
            ldm("down_blocks.1.downsamplers.0.conv.bias").as_deref(),
            Some("input_blocks.6.0.op.bias")
        );
        assert_eq!(
            ldm("up_blocks.0.upsamplers.0.conv.weight").as_deref(),
            Some("output_blocks.2.2.conv.weight")
        );
        assert_eq!(
            ldm("up_blocks.1.attentions.2.norm.bias").as_deref(),
            Some("output_blocks.5.1.norm.bias")
        );
        assert_eq!(
            ldm("up_blocks.2.resnets.2.conv_shortcut.weight").as_deref(),
            Some("output_blocks.8.0.skip_connection.weight")
        );
        assert_eq!(
            ldm("add_embedding.linear_2.bias").as_deref(),
            Some("label_emb.0.2.bias")
        );
        assert_eq!(
            ldm("mid_block.resnets.1.time_emb_proj.weight").as_deref(),
            Some("middle_block.2.emb_layers.1.weight")
        );
        assert_eq!(ldm("unknown.weight"), None);
    }

    #[test]
    fn vae_attention_reads_both_diffusers_namings() {
        for (diffusers, ldm) in [
            (
                "encoder.mid_block.attentions.0.query.weight",
                "encoder.mid.attn_1.q.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_q.weight",
                "encoder.mid.attn_1.q.weight",
            ),
            (
                "decoder.mid_block.attentions.0.proj_attn.bias",
                "decoder.mid.attn_1.proj_out.bias",
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.bias",
                "decoder.mid.attn_1.proj_out.bias",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.weight",
                "decoder.mid.attn_1.norm.weight",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv_shortcut.weight",
                "decoder.up.3.block.2.nin_shortcut.weight",
            ),
            (
                "decoder.up_blocks.1.upsamplers.0.conv.weight",
                "decoder.up.2.upsample.conv.weight",
            ),
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ] {
            assert_eq!(vae_ldm_name(diffusers, 4), ldm, "{diffusers}");
        }
    }
}
