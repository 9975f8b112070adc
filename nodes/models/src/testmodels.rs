//! Random-weight models in the real file formats, for tests and `easel testmodels`: small
//! enough that a full 64×64 workflow runs in seconds on a CPU, loaded through the same code as
//! real checkpoints.
//!
//! Weights are filled as the reference SD1.5 checkpoint of ComfyUI's test run was: tensors in
//! sorted key order, one torch CPU generator seeded with 0, `randn · 0.02` for weights, ones for
//! normalisation weights, zeros for biases, stored as float16. The same writer therefore
//! rebuilds that full-size checkpoint from its layout ([`write_checkpoint`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use half::{bf16, f16};
use safetensors::tensor::{Dtype as FileDtype, TensorView};

use crate::architectures::clip_encoder::{Activation, ClipNaming};
use crate::architectures::clip_text::{ClipTextConfig, ClipTextEncoder};
use crate::architectures::flux::{Flux, FluxConfig};
use crate::architectures::flux_controlnet::{FluxControlNetConfig, FluxControlNetKind};
use crate::architectures::t5::{t5_name_to_llama_cpp, T5Config, T5Encoder};
use crate::architectures::unet::{HeadLayout, UNet, UNetConfig};
use crate::architectures::vae::{Vae, VaeConfig};
use crate::checkpoint::{
    FLUX_CLIP_L_PREFIX, FLUX_T5_PREFIX, FLUX_VAE_PREFIX, SD1_CLIP_PREFIX, SD2_CLIP_PREFIX, SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX, SDXL_REFINER_CLIP_G_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use crate::formats::ggml_quants::quantize::quantize;
use crate::formats::ggml_quants::GgmlType;
use crate::formats::gguf::{write_gguf, GgufTensorEntry, MetadataValue};
use crate::sampling::noise::CpuGenerator;
use crate::text::t5_tokenizer::T5_TOKENIZER_FOLDER;
use crate::weights::{MappedWeights, SafetensorsFile};

mod conditioning_models;
mod control_models;
mod flux_loras;
mod sd3_models;
mod upscale_models;
pub use conditioning_models::*;
pub use control_models::*;
pub use flux_loras::*;
pub use sd3_models::*;
pub use upscale_models::*;

/// How a tensor is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    Zeros,
    Ones,
    /// `randn · 0.02` from the shared generator.
    Random,
    /// 0, 1, 2, … as int64 (CLIP's `position_ids`).
    Arange,
}

/// One tensor of a model file to write.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub fill: Fill,
}

/// The file name `easel testmodels` gives the tiny SD1.x checkpoint.
pub const TINY_SD1_CHECKPOINT: &str = "easel_tiny_sd1.safetensors";

/// A tiny SD1.x UNet: 32/64 channels, two levels, attention everywhere, 64-wide context.
pub fn tiny_sd1_unet() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        model_channels: 32,
        channel_mult: vec![1, 2],
        num_res_blocks: vec![1, 1],
        input_depths: vec![1, 1],
        middle_depth: Some(1),
        output_depths: vec![1, 1, 1, 1],
        context_dim: 64,
        linear_projection: false,
        heads: HeadLayout::Count(8),
        adm_in_channels: None,
    }
}

/// A tiny CLIP-L-shaped text encoder: the full vocabulary and 77 positions, 64 wide, 2 layers.
pub fn tiny_clip_l() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 64,
        intermediate_size: 128,
        layers: 2,
        heads: 1,
        max_positions: 77,
        activation: Activation::QuickGelu,
        naming: ClipNaming::Transformers,
        projection: false,
    }
}

/// A tiny SD VAE: 32 channels, four levels (8× downscale), one residual block per level.
pub fn tiny_sd_vae() -> VaeConfig {
    VaeConfig {
        channels: 32,
        channel_mult: vec![1, 1, 1, 1],
        num_res_blocks: 1,
        latent_channels: 4,
        image_channels: 3,
        quant_convs: true,
    }
}

/// The full-size SD1.5 UNet (as in ComfyUI's reference checkpoint).
pub fn sd15_unet() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        model_channels: 320,
        channel_mult: vec![1, 2, 4, 4],
        num_res_blocks: vec![2, 2, 2, 2],
        input_depths: vec![1, 1, 1, 1, 1, 1, 0, 0],
        middle_depth: Some(1),
        output_depths: vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        context_dim: 768,
        linear_projection: false,
        heads: HeadLayout::Count(8),
        adm_in_channels: None,
    }
}

/// The full-size CLIP-L text encoder of SD1.x.
pub fn sd15_clip_l() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 768,
        intermediate_size: 3072,
        layers: 12,
        heads: 12,
        max_positions: 77,
        activation: Activation::QuickGelu,
        naming: ClipNaming::Transformers,
        projection: false,
    }
}

/// The full-size SD VAE.
pub fn sd15_vae() -> VaeConfig {
    VaeConfig {
        channels: 128,
        channel_mult: vec![1, 2, 4, 4],
        num_res_blocks: 2,
        latent_channels: 4,
        image_channels: 3,
        quant_convs: true,
    }
}

/// The full-size SDXL base UNet.
pub fn sdxl_unet() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        model_channels: 320,
        channel_mult: vec![1, 2, 4],
        num_res_blocks: vec![2, 2, 2],
        input_depths: vec![0, 0, 2, 2, 10, 10],
        middle_depth: Some(10),
        output_depths: vec![10, 10, 10, 2, 2, 2, 0, 0, 0],
        context_dim: 2048,
        linear_projection: true,
        heads: HeadLayout::Width(64),
        adm_in_channels: Some(2816),
    }
}

/// The full-size OpenCLIP ViT-bigG text encoder of SDXL, in its checkpoint (OpenCLIP) layout.
pub fn sdxl_clip_g() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 1280,
        intermediate_size: 5120,
        layers: 32,
        heads: 20,
        max_positions: 77,
        activation: Activation::Gelu,
        naming: ClipNaming::OpenClip,
        projection: true,
    }
}

/// Every tensor of a full-size SDXL base checkpoint, in ComfyUI's layout.
pub fn sdxl_checkpoint_layout() -> candle_core::Result<Vec<TensorSpec>> {
    checkpoint_layout(
        &sdxl_unet(),
        &[
            (SDXL_CLIP_L_PREFIX, &sd15_clip_l()),
            (SDXL_CLIP_G_PREFIX, &sdxl_clip_g()),
        ],
        &sd15_vae(),
    )
}

/// A tiny FLUX.1-dev: two heads of 128 (FLUX's head width, which its rotary embedding needs),
/// one double and one single block, 32-wide text tokens and a 16-wide pooled vector.
pub fn tiny_flux() -> FluxConfig {
    FluxConfig {
        in_channels: 64,
        out_channels: 16,
        hidden_size: 256,
        heads: 2,
        mlp_hidden: 512,
        context_dim: 32,
        // CLIP-L's pooled vector: the tiny CLIP-L's width.
        vector_dim: 64,
        double_blocks: 1,
        single_blocks: 1,
        guidance_embed: true,
        qkv_bias: true,
    }
}

/// A tiny T5 encoder: 32 wide, two layers of four 8-wide heads, a 64-token vocabulary.
pub fn tiny_t5() -> T5Config {
    T5Config {
        vocab_size: 64,
        d_model: 32,
        layers: 2,
        heads: 4,
        d_kv: 8,
        d_ff: 48,
    }
}

/// Every tensor of a T5 encoder in the transformers layout under `prefix`; norm weights are
/// ones.
pub fn t5_layout(config: &T5Config, prefix: &str) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    T5Encoder::new(config.clone(), recorder.var_builder(prefix).into())?;
    Ok(ones_where(recorder.specs(), "layer_norm.weight"))
}

/// `specs` with the tensors whose names end in `suffix` (norm weights) filled with ones.
fn ones_where(mut specs: Vec<TensorSpec>, suffix: &str) -> Vec<TensorSpec> {
    for spec in &mut specs {
        if spec.name.ends_with(suffix) {
            spec.fill = Fill::Ones;
        }
    }
    specs
}

/// A tiny FLUX VAE: the tiny SD VAE with 16 latent channels and no quant convolutions.
pub fn tiny_flux_vae() -> VaeConfig {
    VaeConfig {
        latent_channels: 16,
        quant_convs: false,
        ..tiny_sd_vae()
    }
}

/// Every tensor of a VAE under `prefix`.
pub fn vae_layout(config: &VaeConfig, prefix: &str) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    Vae::new(config.clone(), recorder.var_builder(prefix).into())?;
    Ok(recorder.specs())
}

/// Every tensor of a FLUX model in the BFL layout under `prefix`; the query and key norms'
/// scales are ones.
pub fn flux_layout(config: &FluxConfig, prefix: &str) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    Flux::new(config.clone(), recorder.var_builder(prefix).into())?;
    Ok(ones_where(recorder.specs(), "_norm.scale"))
}

/// Every tensor of an SD1.x single-file checkpoint with the given parts, in ComfyUI's layout.
pub fn sd1_checkpoint_layout(
    unet: &UNetConfig,
    clip: &ClipTextConfig,
    vae: &VaeConfig,
) -> candle_core::Result<Vec<TensorSpec>> {
    checkpoint_layout(unet, &[(SD1_CLIP_PREFIX, clip)], vae)
}

/// The file names `easel testmodels` gives the tiny SD2.x, SDXL and SDXL refiner checkpoints.
pub const TINY_SD2_CHECKPOINT: &str = "easel_tiny_sd2.safetensors";
pub const TINY_SDXL_CHECKPOINT: &str = "easel_tiny_sdxl.safetensors";
pub const TINY_SDXL_REFINER_CHECKPOINT: &str = "easel_tiny_sdxl_refiner.safetensors";
/// The tiny SD1.x inpainting checkpoint: its UNet takes 9 channels (noise, mask, masked image).
pub const TINY_SD1_INPAINTING_CHECKPOINT: &str = "easel_tiny_sd1_inpainting.safetensors";

/// A tiny OpenCLIP-shaped text encoder `width` wide (OpenCLIP's layout, GELU, a projection).
pub fn tiny_open_clip(width: usize) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: width,
        intermediate_size: 2 * width,
        layers: 3,
        heads: (width / 64).max(1),
        max_positions: 77,
        activation: Activation::Gelu,
        naming: ClipNaming::OpenClip,
        projection: true,
    }
}

/// The tiny OpenCLIP-bigG stand-in of the SDXL test models: 96 wide.
pub fn tiny_clip_g() -> ClipTextConfig {
    tiny_open_clip(96)
}

/// A tiny SD2.x UNet: the SD1.x one with linear projections and 64-wide heads, for a 64-wide
/// OpenCLIP-H stand-in.
pub fn tiny_sd2_unet() -> UNetConfig {
    UNetConfig {
        linear_projection: true,
        heads: HeadLayout::Width(64),
        ..tiny_sd1_unet()
    }
}

/// A tiny SDXL-shaped UNet: no attention on the first level, transformers two deep below it,
/// class conditioning of the pooled CLIP-G vector and six embedded sizes (`adm_sizes` = 6; the
/// refiner's has 5, and a context of CLIP-G alone).
pub fn tiny_sdxl_unet(context_dim: usize, adm_sizes: usize) -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        model_channels: 32,
        channel_mult: vec![1, 2],
        num_res_blocks: vec![1, 1],
        input_depths: vec![0, 2],
        middle_depth: Some(2),
        output_depths: vec![2, 2, 0, 0],
        context_dim,
        linear_projection: true,
        heads: HeadLayout::Width(64),
        adm_in_channels: Some(tiny_clip_g().hidden_size + adm_sizes * 256),
    }
}

/// Every tensor of a single-file checkpoint: the UNet, the text encoders (each with the root
/// it lies under) and the VAE, in ComfyUI's layout; transformers-layout encoders get their
/// `position_ids`.
pub fn checkpoint_layout(
    unet: &UNetConfig,
    text_encoders: &[(&str, &ClipTextConfig)],
    vae: &VaeConfig,
) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    UNet::new(unet.clone(), recorder.var_builder(UNET_PREFIX).into())?;
    let mut specs = recorder.specs();
    for (prefix, config) in text_encoders {
        specs.extend(clip_text_layout(config, prefix)?);
    }
    specs.extend(vae_layout(vae, VAE_PREFIX)?);
    Ok(specs)
}

/// Every tensor of a CLIP text encoder under `prefix`; the transformers layout gets its
/// `position_ids`.
pub fn clip_text_layout(config: &ClipTextConfig, prefix: &str) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    ClipTextEncoder::new(config.clone(), recorder.var_builder(prefix).into())?;
    let mut specs = recorder.specs();
    if config.naming == ClipNaming::Transformers {
        specs.push(TensorSpec {
            name: format!("{prefix}text_model.embeddings.position_ids"),
            shape: vec![1, config.max_positions],
            fill: Fill::Arange,
        });
    }
    Ok(specs)
}

/// The files `easel testmodels` splits the tiny SDXL checkpoint into, in the folders
/// ComfyUI's split loaders read: the UNet (keys at the root), CLIP-L, CLIP-G (converted to the
/// transformers layout, as ComfyUI saves text encoders) and the VAE.
pub const TINY_SDXL_UNET: &str = "easel_tiny_sdxl_unet.safetensors";
pub const TINY_CLIP_L: &str = "easel_tiny_clip_l.safetensors";
pub const TINY_CLIP_G: &str = "easel_tiny_clip_g.safetensors";
pub const TINY_SDXL_VAE: &str = "easel_tiny_sdxl_vae.safetensors";

/// A tensor read from a file: dtype, shape and little-endian data.
type RawTensor = (FileDtype, Vec<usize>, Vec<u8>);

/// A model file to write: its model folder, file name and named tensors.
type FilePart<'a> = (&'a str, &'a str, Vec<(String, RawTensor)>);

/// The tensors of `checkpoint` under `prefix`, the prefix removed.
fn tensors_under(checkpoint: &[u8], prefix: &str) -> std::io::Result<Vec<(String, RawTensor)>> {
    let file = safetensors::SafeTensors::deserialize(checkpoint).map_err(std::io::Error::other)?;
    let mut tensors: Vec<(String, RawTensor)> = file
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let name = name.strip_prefix(prefix)?.to_string();
            Some((name, (view.dtype(), view.shape().to_vec(), view.data().to_vec())))
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// An OpenCLIP-layout text encoder in the transformers layout, as ComfyUI converts it
/// (`clip_text_transformers_convert`): renamed modules, the fused `in_proj` split into
/// q/k/v rows, `text_projection` transposed into a `text_projection.weight`.
pub fn open_clip_to_transformers(tensors: Vec<(String, RawTensor)>) -> std::io::Result<Vec<(String, RawTensor)>> {
    const RENAMES: [(&str, &str); 6] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("attn.in_proj_", ""),
    ];
    let mut converted = Vec::with_capacity(tensors.len() + 8);
    for (name, (dtype, shape, data)) in tensors {
        let fixed = match name.as_str() {
            "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
            "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
            "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
            "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
            _ => None,
        };
        if let Some(fixed) = fixed {
            converted.push((fixed.to_string(), (dtype, shape, data)));
            continue;
        }
        if name == "text_projection" {
            let (rows, cols) = (shape[0], shape[1]);
            let size = data.len() / (rows * cols);
            let mut transposed = vec![0u8; data.len()];
            for row in 0..rows {
                for col in 0..cols {
                    let from = (row * cols + col) * size;
                    let to = (col * rows + row) * size;
                    transposed[to..to + size].copy_from_slice(&data[from..from + size]);
                }
            }
            converted.push((
                "text_projection.weight".to_string(),
                (dtype, vec![cols, rows], transposed),
            ));
            continue;
        }
        let Some(rest) = name.strip_prefix("transformer.resblocks.") else {
            return Err(std::io::Error::other(format!("unexpected OpenCLIP tensor '{name}'")));
        };
        let Some((layer, tensor)) = rest.split_once('.') else {
            return Err(std::io::Error::other(format!("unexpected OpenCLIP tensor '{name}'")));
        };
        let root = format!("text_model.encoder.layers.{layer}.");
        if let Some(kind) = tensor.strip_prefix("attn.in_proj_") {
            let part = data.len() / 3;
            let mut part_shape = shape.clone();
            part_shape[0] /= 3;
            for (index, projection) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
                converted.push((
                    format!("{root}self_attn.{projection}.{kind}"),
                    (
                        dtype,
                        part_shape.clone(),
                        data[index * part..(index + 1) * part].to_vec(),
                    ),
                ));
            }
            continue;
        }
        let renamed = RENAMES
            .iter()
            .find_map(|(from, to)| tensor.strip_prefix(from).map(|rest| format!("{to}{rest}")))
            .ok_or_else(|| std::io::Error::other(format!("unexpected OpenCLIP tensor '{name}'")))?;
        converted.push((format!("{root}{renamed}"), (dtype, shape, data)));
    }
    Ok(converted)
}

/// Writes the tiny SDXL checkpoint's parts as separate files under `models_dir` (see
/// [`TINY_SDXL_UNET`]).
fn write_split_sdxl(checkpoint: &Path, models_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let bytes = std::fs::read(checkpoint)?;
    let parts = vec![
        ("diffusion_models", TINY_SDXL_UNET, tensors_under(&bytes, UNET_PREFIX)?),
        ("text_encoders", TINY_CLIP_L, tensors_under(&bytes, SDXL_CLIP_L_PREFIX)?),
        (
            "text_encoders",
            TINY_CLIP_G,
            open_clip_to_transformers(tensors_under(&bytes, SDXL_CLIP_G_PREFIX)?)?,
        ),
        ("vae", TINY_SDXL_VAE, tensors_under(&bytes, VAE_PREFIX)?),
    ];
    write_parts(models_dir, parts)
}

/// Writes each part (model folder, file name, tensors) as a safetensors file under
/// `models_dir`.
fn write_parts(models_dir: &Path, parts: Vec<FilePart>) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::with_capacity(parts.len());
    for (folder, name, tensors) in parts {
        let dir = models_dir.join(folder);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        let tensors: Vec<_> = tensors
            .into_iter()
            .map(|(name, (dtype, shape, data))| (name, dtype, shape, data))
            .collect();
        write_safetensors(&path, &tensors, None)?;
        written.push(path);
    }
    Ok(written)
}

/// Textual inversions for the tiny CLIP-L: two vectors, as a safetensors file (key `emb_params`)
/// and as an A1111 `.pt` (`string_to_param["*"]`).
pub const TINY_EMBEDDING: &str = "easel_tiny_embedding";
pub const TINY_EMBEDDING_PT: &str = "easel_tiny_embedding_a1111";

/// The vectors of the tiny embeddings: `randn · 0.02` from a generator seeded with 1.
pub fn tiny_embedding_vectors() -> Vec<Vec<f32>> {
    let width = tiny_clip_l().hidden_size;
    let values = CpuGenerator::new(1).randn(2 * width);
    values
        .chunks(width)
        .map(|row| row.iter().map(|v| v * 0.02).collect())
        .collect()
}

/// Writes the test models under `models_dir` (ComfyUI's `models` folder) and returns their paths.
pub fn write_test_models(models_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let checkpoints = models_dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints)?;
    let layout =
        sd1_checkpoint_layout(&tiny_sd1_unet(), &tiny_clip_l(), &tiny_sd_vae()).map_err(std::io::Error::other)?;
    let checkpoint = checkpoints.join(TINY_SD1_CHECKPOINT);
    write_checkpoint(&checkpoint, &layout)?;

    let controlnets = models_dir.join("controlnet");
    std::fs::create_dir_all(&controlnets)?;
    let controlnet = controlnets.join(TINY_SD1_CONTROLNET);
    write_checkpoint(
        &controlnet,
        &controlnet_layout(&tiny_sd1_controlnet()).map_err(std::io::Error::other)?,
    )?;
    let union = controlnets.join(TINY_SDXL_UNION_CONTROLNET);
    write_checkpoint(
        &union,
        &controlnet_layout(&tiny_sdxl_union_controlnet()).map_err(std::io::Error::other)?,
    )?;

    let mut written = vec![checkpoint, controlnet, union];
    for (name, config) in tiny_t2i_adapters() {
        let path = controlnets.join(name);
        write_checkpoint(&path, &t2i_adapter_layout(&config).map_err(std::io::Error::other)?)?;
        written.push(path);
    }
    let open_clip_h = tiny_open_clip(64);
    let (clip_l, clip_g, vae) = (tiny_clip_l(), tiny_clip_g(), tiny_sd_vae());
    let sdxl_context = clip_l.hidden_size + clip_g.hidden_size;
    /// A checkpoint: its file name, UNet, and text encoders with their roots.
    type CheckpointParts<'a> = (&'a str, UNetConfig, Vec<(&'a str, &'a ClipTextConfig)>);
    let inpainting_unet = UNetConfig {
        in_channels: 9,
        ..tiny_sd1_unet()
    };
    let others: [CheckpointParts; 4] = [
        (
            TINY_SD1_INPAINTING_CHECKPOINT,
            inpainting_unet,
            vec![(SD1_CLIP_PREFIX, &clip_l)],
        ),
        (
            TINY_SD2_CHECKPOINT,
            tiny_sd2_unet(),
            vec![(SD2_CLIP_PREFIX, &open_clip_h)],
        ),
        (
            TINY_SDXL_CHECKPOINT,
            tiny_sdxl_unet(sdxl_context, 6),
            vec![(SDXL_CLIP_L_PREFIX, &clip_l), (SDXL_CLIP_G_PREFIX, &clip_g)],
        ),
        (
            TINY_SDXL_REFINER_CHECKPOINT,
            tiny_sdxl_unet(clip_g.hidden_size, 5),
            vec![(SDXL_REFINER_CLIP_G_PREFIX, &clip_g)],
        ),
    ];
    for (name, unet, encoders) in others {
        let path = checkpoints.join(name);
        write_checkpoint(
            &path,
            &checkpoint_layout(&unet, &encoders, &vae).map_err(std::io::Error::other)?,
        )?;
        written.push(path);
    }
    let split = write_split_sdxl(&checkpoints.join(TINY_SDXL_CHECKPOINT), models_dir)?;
    written.extend(split);

    let embeddings = models_dir.join("embeddings");
    std::fs::create_dir_all(&embeddings)?;
    let vectors = tiny_embedding_vectors();
    let shape = vec![vectors.len(), vectors[0].len()];
    let values: Vec<f32> = vectors.concat();
    let safetensors_path = embeddings.join(format!("{TINY_EMBEDDING}.safetensors"));
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(FileDtype::F32, shape.clone(), &bytes).map_err(std::io::Error::other)?;
    safetensors::serialize_to_file([("emb_params", view)], None, &safetensors_path).map_err(std::io::Error::other)?;
    let pt_path = embeddings.join(format!("{TINY_EMBEDDING_PT}.pt"));
    write_pth(&pt_path, &[("*", &shape, &values)], Some("string_to_param"))?;

    let loras = models_dir.join("loras");
    std::fs::create_dir_all(&loras)?;
    let lora = loras.join(TINY_SD1_LORA);
    write_tiny_lora(&lora, &layout)?;
    written.extend([safetensors_path, pt_path, lora]);
    written.extend(write_flux_loras(&loras)?);
    written.extend(write_flux_test_models(models_dir)?);
    written.extend(sd3_models::write_sd3_test_models(models_dir)?);
    written.extend(write_conditioning_models(models_dir)?);
    written.extend(upscale_models::write_upscale_test_models(models_dir)?);
    Ok(written)
}

/// The tiny FLUX-shaped models `easel testmodels` writes: FLUX dev as bf16 safetensors (in
/// `diffusion_models`) and as GGUF Q8_0 and Q4_K (in `unet`, where city96's files go), FLUX
/// schnell, fill and canny, an XLabs-style ControlNet for it, the FLUX VAE, and T5-XXL as fp16
/// safetensors and GGUF Q8_0 with its tokenizer in `text_encoders/t5_tokenizer` (the CLIP-L is
/// [`TINY_CLIP_L`]).
pub const TINY_FLUX_DEV: &str = "easel_tiny_flux_dev.safetensors";
pub const TINY_FLUX_DEV_Q8_0: &str = "easel_tiny_flux_dev-Q8_0.gguf";
pub const TINY_FLUX_DEV_Q4_K: &str = "easel_tiny_flux_dev-Q4_K_S.gguf";
pub const TINY_FLUX_SCHNELL: &str = "easel_tiny_flux_schnell.safetensors";
/// FLUX fill: 384 input channels (latent, masked-image latent, 8×8 mask blocks; ×4 patches).
pub const TINY_FLUX_FILL: &str = "easel_tiny_flux_fill.safetensors";
/// FLUX canny/depth dev: 128 input channels (latent and the control image's latent; ×4 patches).
pub const TINY_FLUX_CANNY: &str = "easel_tiny_flux_canny_dev.safetensors";
/// The file name `easel testmodels` gives the tiny XLabs-style FLUX ControlNet (in `controlnet`;
/// as deep as the tiny FLUX: one double and one single block).
pub const TINY_FLUX_CONTROLNET: &str = "easel_tiny_flux_controlnet.safetensors";
/// FLUX dev as one checkpoint (`checkpoints/`), laid out as ComfyUI saves one: the model, CLIP-L,
/// T5 and the VAE.
pub const TINY_FLUX_CHECKPOINT: &str = "easel_tiny_flux_dev_checkpoint.safetensors";
pub const TINY_FLUX_VAE: &str = "easel_tiny_flux_vae.safetensors";
pub const TINY_T5: &str = "easel_tiny_t5xxl_fp16.safetensors";
pub const TINY_T5_Q8_0: &str = "easel_tiny_t5xxl-Q8_0.gguf";

/// The pieces of the tiny T5 vocabulary, in id order (`<pad>` 0, `</s>` 1, `<unk>` 2): single
/// letters and a few words, enough to tokenize any lower-case prompt.
const TINY_T5_PIECES: [&str; 64] = [
    "<pad>",
    "</s>",
    "<unk>",
    "▁",
    "▁a",
    "▁red",
    "▁house",
    "s",
    "▁blue",
    "h",
    "o",
    "u",
    "e",
    "a",
    "b",
    "c",
    "d",
    "f",
    "g",
    "i",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "q",
    "r",
    "t",
    "v",
    "w",
    "x",
    "y",
    "z",
    "▁cat",
    "▁photo",
    "▁of",
    "▁the",
    "▁sky",
    "▁dog",
    "▁in",
    "▁on",
    "▁with",
    "▁and",
    "▁green",
    "▁tree",
    "▁lighthouse",
    "▁at",
    "▁dusk",
    "▁mountain",
    "▁lake",
    "▁sunset",
    "▁portrait",
    "▁forest",
    "▁river",
    "▁city",
    "▁night",
    "▁bird",
    "▁flower",
    "▁garden",
    "▁white",
    "▁black",
    "▁small",
    "▁big",
];

/// Writes the tiny T5 vocabulary as a `tokenizer.json` laid out as T5's is: trailing spaces
/// stripped, a Metaspace split, Unigram pieces scored by their order.
pub fn write_tiny_t5_tokenizer(path: &Path) -> std::io::Result<()> {
    use tokenizers::models::unigram::Unigram;
    use tokenizers::normalizers::strip::Strip;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let vocab = TINY_T5_PIECES
        .iter()
        .enumerate()
        .map(|(i, piece)| (piece.to_string(), -(i as f64)))
        .collect();
    let model = Unigram::from(vocab, Some(2), false).map_err(|error| std::io::Error::other(error.to_string()))?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(Strip::new(false, true)))
        .map_err(|error| std::io::Error::other(error.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, true)));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    tokenizer
        .save(path, false)
        .map_err(|error| std::io::Error::other(error.to_string()))
}

/// Writes the tensors of `source` as a GGUF file of `architecture`, named by `rename`: matrices
/// whose rows are whole `kind` blocks in `kind`, everything else (norms, biases, odd widths) in
/// F32, as llama.cpp's and city96's converters keep them.
pub fn write_gguf_copy(
    source: &dyn MappedWeights,
    kind: GgmlType,
    architecture: &str,
    rename: &dyn Fn(&str) -> String,
    path: &Path,
) -> std::io::Result<()> {
    let mut names: Vec<&str> = source.tensor_names().collect();
    names.sort_unstable();
    let entries: Vec<GgufTensorEntry> = names
        .iter()
        .map(|name| {
            let shape = source.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
            gguf_entry(rename(name), shape, kind)
        })
        .collect();
    let mut sources = names.into_iter();
    write_gguf(path, &architecture_metadata(architecture), &entries, |entry| {
        let name = sources.next().unwrap_or_default();
        let values: Vec<f32> = source
            .load(name, DType::F32, &Device::Cpu)
            .and_then(|tensor| tensor.flatten_all()?.to_vec1())
            .map_err(std::io::Error::other)?;
        quantized_bytes(entry, &values)
    })
}

/// Writes a GGUF file of `layout` filled as [`write_checkpoint_in`] fills a checkpoint, its
/// matrices in `kind`, one tensor in memory at a time (a full-size model for the benchmarks).
pub fn write_gguf_in(layout: &[TensorSpec], kind: GgmlType, architecture: &str, path: &Path) -> std::io::Result<()> {
    let mut sorted: Vec<&TensorSpec> = layout.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let entries: Vec<GgufTensorEntry> = sorted
        .iter()
        .map(|spec| gguf_entry(spec.name.clone(), spec.shape.clone(), kind))
        .collect();
    let mut generator = CpuGenerator::new(0);
    let mut specs = sorted.into_iter();
    write_gguf(path, &architecture_metadata(architecture), &entries, |entry| {
        let values = specs
            .next()
            .and_then(|spec| spec_values(spec, &mut generator))
            .ok_or_else(|| std::io::Error::other(format!("{}: GGUF test files hold no integer tensors", entry.name)))?;
        quantized_bytes(entry, &values)
    })
}

/// A GGUF entry of a test model: matrices whose rows fill whole blocks in `kind`, other tensors
/// in F32 (as ComfyUI-GGUF's files keep biases and norms).
fn gguf_entry(name: String, shape: Vec<usize>, kind: GgmlType) -> GgufTensorEntry {
    let quantized = shape.len() == 2 && shape[1].is_multiple_of(kind.block_size());
    GgufTensorEntry {
        name,
        shape,
        kind: if quantized { kind } else { GgmlType::F32 },
    }
}

fn architecture_metadata(architecture: &str) -> [(&'static str, MetadataValue); 1] {
    [("general.architecture", MetadataValue::String(architecture.into()))]
}

fn quantized_bytes(entry: &GgufTensorEntry, values: &[f32]) -> std::io::Result<Vec<u8>> {
    quantize(entry.kind, values)
        .ok_or_else(|| std::io::Error::other(format!("the test models cannot write {:?}", entry.kind)))
}

/// Writes the tiny FLUX-shaped models (see [`TINY_FLUX_DEV`]) under `models_dir`.
fn write_flux_test_models(models_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let folder = |name: &str| -> std::io::Result<PathBuf> {
        let dir = models_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    };
    let (diffusion_models, unet, vae, text_encoders) = (
        folder("diffusion_models")?,
        folder("unet")?,
        folder("vae")?,
        folder("text_encoders")?,
    );
    let layout_error = std::io::Error::other;
    let dev = diffusion_models.join(TINY_FLUX_DEV);
    write_checkpoint_in(
        &dev,
        &flux_layout(&tiny_flux(), "").map_err(layout_error)?,
        FileDtype::BF16,
    )?;
    let schnell_config = FluxConfig {
        guidance_embed: false,
        ..tiny_flux()
    };
    let schnell = diffusion_models.join(TINY_FLUX_SCHNELL);
    write_checkpoint_in(
        &schnell,
        &flux_layout(&schnell_config, "").map_err(layout_error)?,
        FileDtype::BF16,
    )?;
    for (name, in_channels) in [(TINY_FLUX_FILL, 384), (TINY_FLUX_CANNY, 128)] {
        let config = FluxConfig {
            in_channels,
            ..tiny_flux()
        };
        write_checkpoint_in(
            &diffusion_models.join(name),
            &flux_layout(&config, "").map_err(layout_error)?,
            FileDtype::BF16,
        )?;
    }
    let controlnet = folder("controlnet")?.join(TINY_FLUX_CONTROLNET);
    let controlnet_config = FluxControlNetConfig {
        kind: FluxControlNetKind::XLabs,
        flux: tiny_flux(),
    };
    write_checkpoint_in(
        &controlnet,
        &flux_controlnet_layout(&controlnet_config).map_err(layout_error)?,
        FileDtype::BF16,
    )?;
    let checkpoint = folder("checkpoints")?.join(TINY_FLUX_CHECKPOINT);
    let mut parts = flux_layout(&tiny_flux(), UNET_PREFIX).map_err(layout_error)?;
    parts.extend(clip_text_layout(&tiny_clip_l(), FLUX_CLIP_L_PREFIX).map_err(layout_error)?);
    parts.extend(t5_layout(&tiny_t5(), FLUX_T5_PREFIX).map_err(layout_error)?);
    parts.extend(vae_layout(&tiny_flux_vae(), FLUX_VAE_PREFIX).map_err(layout_error)?);
    write_checkpoint_in(&checkpoint, &parts, FileDtype::BF16)?;
    let dev_file = SafetensorsFile::open(&dev).map_err(std::io::Error::other)?;
    let keep_name = |name: &str| name.to_string();
    let dev_q8 = unet.join(TINY_FLUX_DEV_Q8_0);
    write_gguf_copy(&dev_file, GgmlType::Q8_0, "flux", &keep_name, &dev_q8)?;
    let dev_q4 = unet.join(TINY_FLUX_DEV_Q4_K);
    write_gguf_copy(&dev_file, GgmlType::Q4K, "flux", &keep_name, &dev_q4)?;
    let flux_vae = vae.join(TINY_FLUX_VAE);
    write_checkpoint(&flux_vae, &vae_layout(&tiny_flux_vae(), "").map_err(layout_error)?)?;
    let t5 = text_encoders.join(TINY_T5);
    write_checkpoint(&t5, &t5_layout(&tiny_t5(), "").map_err(layout_error)?)?;
    let t5_file = SafetensorsFile::open(&t5).map_err(std::io::Error::other)?;
    let t5_q8 = text_encoders.join(TINY_T5_Q8_0);
    write_gguf_copy(&t5_file, GgmlType::Q8_0, "t5encoder", &t5_name_to_llama_cpp, &t5_q8)?;
    let tokenizer = text_encoders.join(T5_TOKENIZER_FOLDER).join("tokenizer.json");
    write_tiny_t5_tokenizer(&tokenizer)?;
    Ok(vec![
        dev,
        schnell,
        diffusion_models.join(TINY_FLUX_FILL),
        diffusion_models.join(TINY_FLUX_CANNY),
        controlnet,
        checkpoint,
        dev_q8,
        dev_q4,
        flux_vae,
        t5,
        t5_q8,
        tokenizer,
    ])
}

/// A LoRA for the tiny SD1.x checkpoint, in the `loras` folder.
pub const TINY_SD1_LORA: &str = "easel_tiny_sd1_lora.safetensors";

/// The rank and alpha of every layer of the tiny LoRA: scale alpha/rank = 0.5.
pub const TINY_LORA_RANK: usize = 4;
pub const TINY_LORA_ALPHA: f32 = 2.0;

/// How a LoRA file names a layer's two factors.
#[derive(Clone, Copy, Debug)]
pub enum LoraNaming {
    /// `.lora_up.weight` / `.lora_down.weight` (kohya, LyCORIS LoCon).
    Kohya,
    /// `.lora_B.weight` / `.lora_A.weight` (PEFT).
    Peft,
    /// `.lora_linear_layer.up.weight` / `.down.weight` (diffusers).
    Diffusers,
}

impl LoraNaming {
    /// The (up, down) tensor names for layer `name`.
    pub fn factor_names(self, name: &str) -> (String, String) {
        match self {
            LoraNaming::Kohya => (format!("{name}.lora_up.weight"), format!("{name}.lora_down.weight")),
            LoraNaming::Peft => (format!("{name}.lora_B.weight"), format!("{name}.lora_A.weight")),
            LoraNaming::Diffusers => (
                format!("{name}.lora_linear_layer.up.weight"),
                format!("{name}.lora_linear_layer.down.weight"),
            ),
        }
    }
}

/// The tiny LoRA's layers: the name in the LoRA file (in the schemes real LoRAs use), how its
/// factors are named, and the checkpoint tensor ComfyUI patches with it.
pub const TINY_LORA_LAYERS: &[(&str, LoraNaming, &str)] = &[
    (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        LoraNaming::Kohya,
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    ),
    (
        "lora_unet_down_blocks_1_resnets_0_conv1",
        LoraNaming::Kohya,
        "model.diffusion_model.input_blocks.3.0.in_layers.2.weight",
    ),
    (
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        LoraNaming::Kohya,
        "model.diffusion_model.input_blocks.2.0.op.weight",
    ),
    (
        "lora_unet_mid_block_attentions_0_proj_in",
        LoraNaming::Kohya,
        "model.diffusion_model.middle_block.1.proj_in.weight",
    ),
    (
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        LoraNaming::Kohya,
        "model.diffusion_model.output_blocks.1.2.conv.weight",
    ),
    (
        "lora_unet_up_blocks_1_resnets_1_conv_shortcut",
        LoraNaming::Kohya,
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
    ),
    (
        "lora_unet_output_blocks_2_1_proj_out",
        LoraNaming::Kohya,
        "model.diffusion_model.output_blocks.2.1.proj_out.weight",
    ),
    (
        "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor.to_out",
        LoraNaming::Peft,
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.weight",
    ),
    (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        LoraNaming::Kohya,
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    ),
    (
        "text_encoder.text_model.encoder.layers.1.mlp.fc2",
        LoraNaming::Diffusers,
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
    ),
];

/// A tensor of the tiny LoRA that matches no layer (ComfyUI logs it as not loaded).
pub const TINY_LORA_UNMATCHED: &str = "lora_unet_no_such_layer.lora_up.weight";

/// Writes the tiny LoRA for the checkpoint `layout`: for each of [`TINY_LORA_LAYERS`], random
/// f16 factors of rank [`TINY_LORA_RANK`] shaped as LoCon does for convolutions (down
/// [r, C, k, k], up [O, r, 1, 1]), and an f32 alpha.
pub fn write_tiny_lora(path: &Path, layout: &[TensorSpec]) -> std::io::Result<()> {
    let mut generator = CpuGenerator::new(7);
    let mut buffers: Vec<(String, FileDtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, naming, target) in TINY_LORA_LAYERS {
        let shape = &layout
            .iter()
            .find(|spec| spec.name == *target)
            .ok_or_else(|| std::io::Error::other(format!("the tiny checkpoint has no '{target}'")))?
            .shape;
        let (up_shape, down_shape) = match shape.as_slice() {
            [out, input] => (vec![*out, TINY_LORA_RANK], vec![TINY_LORA_RANK, *input]),
            [out, input, kh, kw] => (vec![*out, TINY_LORA_RANK, 1, 1], vec![TINY_LORA_RANK, *input, *kh, *kw]),
            other => return Err(std::io::Error::other(format!("'{target}' has shape {other:?}"))),
        };
        let (up_name, down_name) = naming.factor_names(name);
        for (tensor, shape) in [(up_name, up_shape), (down_name, down_shape)] {
            let values = generator.randn(shape.iter().product()).into_iter().map(|v| v * 0.5);
            buffers.push((tensor, FileDtype::F16, shape, half_bytes(values)));
        }
        buffers.push((
            format!("{name}.alpha"),
            FileDtype::F32,
            vec![],
            TINY_LORA_ALPHA.to_le_bytes().to_vec(),
        ));
    }
    buffers.push((
        TINY_LORA_UNMATCHED.to_string(),
        FileDtype::F16,
        vec![1, 1],
        half_bytes([1.0].into_iter()),
    ));
    write_safetensors(path, &buffers, None)
}

/// Writes float32 tensors as a PyTorch zip checkpoint (`torch.save` layout: `archive/data.pkl`
/// with a protocol-2 pickle of the dict, `archive/data/<n>` with each storage), optionally nested
/// one dict deeper under `nested_under`.
pub fn write_pth(path: &Path, tensors: &[(&str, &[usize], &[f32])], nested_under: Option<&str>) -> std::io::Result<()> {
    write_pth_dicts(path, &[(nested_under, tensors)])
}

/// Float32 tensors of a PyTorch pickle: name, shape, values.
pub type PthTensor<'a> = (&'a str, &'a [usize], &'a [f32]);

/// [`write_pth`] with several groups of tensors: each nested under its key in the top dict
/// (`torch.save({"a": {...}, "b": {...}})`, as IP-Adapter `.bin` files are), or at the top for
/// `None`.
pub fn write_pth_dicts(path: &Path, groups: &[(Option<&str>, &[PthTensor])]) -> std::io::Result<()> {
    fn unicode(pickle: &mut Vec<u8>, text: &str) {
        pickle.push(b'X');
        pickle.extend((text.len() as u32).to_le_bytes());
        pickle.extend(text.as_bytes());
    }
    fn int(pickle: &mut Vec<u8>, value: usize) {
        pickle.push(b'J');
        pickle.extend((value as i32).to_le_bytes());
    }
    fn ints(pickle: &mut Vec<u8>, values: &[usize]) {
        pickle.push(b'(');
        values.iter().for_each(|v| int(pickle, *v));
        pickle.push(b't');
    }

    let mut pickle = vec![0x80, 2, b'}'];
    let mut storages: Vec<&[f32]> = Vec::new();
    for (nested_under, tensors) in groups {
        if let Some(key) = nested_under {
            unicode(&mut pickle, key);
            pickle.push(b'}');
        }
        pickle.push(b'(');
        for (name, shape, values) in tensors.iter() {
            unicode(&mut pickle, name);
            pickle.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            pickle.push(b'(');
            unicode(&mut pickle, "storage");
            pickle.extend(b"ctorch\nFloatStorage\n");
            unicode(&mut pickle, &storages.len().to_string());
            storages.push(values);
            unicode(&mut pickle, "cpu");
            int(&mut pickle, shape.iter().product());
            pickle.extend(b"tQK\x00");
            ints(&mut pickle, shape);
            let strides: Vec<usize> = (0..shape.len()).map(|d| shape[d + 1..].iter().product()).collect();
            ints(&mut pickle, &strides);
            pickle.push(0x89);
            pickle.extend(b"ccollections\nOrderedDict\n)RtR");
        }
        pickle.push(b'u');
        if nested_under.is_some() {
            pickle.push(b's');
        }
    }
    pickle.push(b'.');

    let mut archive = zip::ZipWriter::new(std::fs::File::create(path)?);
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        archive.start_file(name, options).map_err(std::io::Error::other)?;
        std::io::Write::write_all(&mut archive, bytes)
    };
    add("archive/data.pkl", &pickle)?;
    for (index, values) in storages.iter().enumerate() {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        add(&format!("archive/data/{index}"), &bytes)?;
    }
    add("archive/version", b"3\n")?;
    archive.finish().map_err(std::io::Error::other)?;
    Ok(())
}

/// Writes a safetensors file with the tensors of `layout`, filled as described in the module
/// documentation (float16, int64 for [`Fill::Arange`]), metadata `{"format": "pt"}`.
pub fn write_checkpoint(path: &Path, layout: &[TensorSpec]) -> std::io::Result<()> {
    write_checkpoint_in(path, layout, FileDtype::F16)
}

/// [`write_checkpoint`] with floating-point weights stored as `float_dtype` (F16, BF16 or F32;
/// the values are the float16 ones in every case, so only the storage differs).
pub fn write_checkpoint_in(path: &Path, layout: &[TensorSpec], float_dtype: FileDtype) -> std::io::Result<()> {
    let mut sorted: Vec<&TensorSpec> = layout.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut generator = CpuGenerator::new(0);
    let mut buffers: Vec<(String, FileDtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(sorted.len());
    for spec in sorted {
        let Some(values) = spec_values(spec, &mut generator) else {
            let numel = spec.shape.iter().product::<usize>() as i64;
            let bytes = (0..numel).flat_map(i64::to_le_bytes).collect();
            buffers.push((spec.name.clone(), FileDtype::I64, spec.shape.clone(), bytes));
            continue;
        };
        let halves = values.into_iter();
        let (dtype, bytes) = match float_dtype {
            FileDtype::BF16 => (
                float_dtype,
                halves.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
            ),
            FileDtype::F32 => (float_dtype, halves.flat_map(f32::to_le_bytes).collect()),
            _ => (FileDtype::F16, half_bytes(halves)),
        };
        buffers.push((spec.name.clone(), dtype, spec.shape.clone(), bytes));
    }
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(path, &buffers, Some(metadata))
}

/// A float tensor's values as `spec.fill` says, rounded to f16 (so that every file type holds
/// the same values); `None` for an integer tensor ([`Fill::Arange`]).
fn spec_values(spec: &TensorSpec, generator: &mut CpuGenerator) -> Option<Vec<f32>> {
    let numel: usize = spec.shape.iter().product();
    let values = match spec.fill {
        Fill::Arange => return None,
        Fill::Zeros => vec![0.0; numel],
        Fill::Ones => vec![1.0; numel],
        Fill::Random => generator.randn(numel).into_iter().map(|v| v * 0.02).collect(),
    };
    Some(values.into_iter().map(|v| f16::from_f32(v).to_f32()).collect())
}

/// Writes tensors given as (name, dtype, shape, little-endian data) as a safetensors file.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, FileDtype, Vec<usize>, Vec<u8>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> std::io::Result<()> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(std::io::Error::other)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, metadata, path).map_err(std::io::Error::other)
}

fn half_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect()
}

/// A `VarBuilder` backend that hands out zeros and records what was asked for.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<TensorSpec>>>);

impl Recorder {
    fn var_builder(&self, prefix: &str) -> VarBuilder<'static> {
        let vb = VarBuilder::from_backend(Box::new(self.clone()), DType::F32, Device::Cpu);
        match prefix.trim_end_matches('.') {
            "" => vb,
            prefix => vb.pp(prefix),
        }
    }

    fn specs(&self) -> Vec<TensorSpec> {
        self.0.lock().map(|specs| specs.clone()).unwrap_or_default()
    }
}

impl SimpleBackend for Recorder {
    fn get(&self, shape: Shape, name: &str, hints: Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let fill = if name.ends_with(".bias") {
            Fill::Zeros
        } else if matches!(hints, Init::Const(value) if value == 1.0) {
            Fill::Ones
        } else {
            Fill::Random
        };
        if let Ok(mut specs) = self.0.lock() {
            specs.push(TensorSpec {
                name: name.to_string(),
                shape: shape.dims().to_vec(),
                fill,
            });
        }
        // One zero seen through the shape: a full-size model's layout allocates nothing.
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "the layout recorder needs a shape for '{name}'"
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
