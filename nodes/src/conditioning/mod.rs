//! The conditioning category: ComfyUI's `CONDITIONING` value ([`Conditioning`], a list of
//! [`CondEntry`], defined here) and the nodes that encode prompts and combine, average, concatenate,
//! time-limit and localise conditioning.
//!
//! - [`nodes`]: CLIPTextEncode, CLIPTextEncodeSDXL(Refiner), CLIPSetLastLayer and the
//!   Conditioning* nodes;
//! - [`regions`]: areas, masks and strengths of entries, resolved against a latent;
//! - [`text_options`]: CLIPTextEncodeControlnet and T5TokenizerOptions;
//! - [`gligen`]: GLIGENLoader and GLIGENTextBoxApply.

pub mod gligen;
pub mod nodes;
pub mod regions;
pub mod text_options;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use easel_engine::{NodeObject, NodeRegistry};
use easel_models::architectures::flux::ReferenceMethod;

use crate::clip_vision::unclip::UnclipImage;
use crate::conditioning::gligen::GligenBoxes;
use crate::conditioning::regions::{CondRegion, RegionError};
use crate::controlnet::ControlApplication;
use crate::hooks::HookGroup;
use crate::image::Mask;

/// Adds the conditioning nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::ClipTextEncode);
    registry.register(nodes::ClipTextEncodeSdxl);
    registry.register(nodes::ClipTextEncodeSdxlRefiner);
    registry.register(nodes::ClipTextEncodeSd3);
    registry.register(nodes::ClipSetLastLayer);
    registry.register(nodes::ConditioningCombine);
    registry.register(nodes::ConditioningAverage);
    registry.register(nodes::ConditioningConcat);
    registry.register(nodes::ConditioningZeroOut);
    registry.register(nodes::ConditioningSetTimestepRange);
    registry.register(nodes::ConditioningSetArea);
    registry.register(nodes::ConditioningSetAreaPercentage);
    registry.register(nodes::ConditioningSetAreaStrength);
    registry.register(nodes::ConditioningSetMask);
    registry.register(text_options::ClipTextEncodeControlnet);
    registry.register(text_options::T5TokenizerOptions);
    registry.register(gligen::GligenLoader);
    registry.register(gligen::GligenTextBoxApply);
}

/// Why a conditioning cannot drive a model.
#[derive(Debug, thiserror::Error)]
pub enum ConditioningError {
    #[error(
        "the conditioning's text embeddings are {found} wide but this {family} model's cross-attention \
         takes {expected}: was it encoded by another model family's text encoder (or is a refiner used \
         as a base model, or the other way round)?"
    )]
    ContextWidth {
        family: &'static str,
        found: usize,
        expected: usize,
    },
    #[error(
        "a diffusion model with {0} extra input channels is not supported by Easel yet (inpainting models have 5, InstructPix2Pix ones 4)"
    )]
    ExtraChannels(usize),
    #[error("the inpainting image cannot be used: {0}")]
    Inpaint(String),
    #[error("{0}")]
    IcLight(String),
    #[error("the conditioning has no pooled output, which this model needs ('pooled_output')")]
    NoPooledOutput,
    #[error(
        "the conditioning's pooled output is {found} wide but this {family} model needs {expected}: \
         was it encoded by another model family's text encoder (or is a refiner used as a base \
         model, or the other way round)?"
    )]
    PooledWidth {
        family: &'static str,
        found: usize,
        expected: usize,
    },
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// One conditioning entry: text embeddings and what ComfyUI keeps beside them.
#[derive(Clone, Debug)]
pub struct CondEntry {
    /// [1, tokens, width].
    pub cross_attention: Tensor,
    /// [1, width], when the text encoder produced one.
    pub pooled: Option<Tensor>,
    /// The part of sampling, as (start, end) fractions, during which the entry applies.
    pub timestep_range: Option<(f64, f64)>,
    /// The sizes SDXL's class conditioning embeds (CLIPTextEncodeSDXL and its refiner twin).
    pub sdxl: SdxlSizes,
    /// Where in the latent the entry applies, and how strongly.
    pub region: CondRegion,
    /// The image a model with extra input channels takes beside the noise
    /// (InpaintModelConditioning, InstructPixToPixConditioning).
    pub concat_image: Option<ConcatImage>,
    /// The guidance strength a FLUX dev model embeds.
    pub guidance: EmbeddedGuidance,
    /// Text conditioning meant for ControlNets instead of this entry's own
    /// (CLIPTextEncodeControlnet's `cross_attn_controlnet` and `pooled_output_controlnet`).
    pub controlnet_text: Option<ControlnetText>,
    /// The control networks applied to the entry, the last applied first (ComfyUI's `control`).
    pub control: Option<Arc<ControlApplication>>,
    /// ControlNetApply's `control_apply_to_uncond`: the negative entries of the same area that
    /// carry no control get this entry's.
    pub control_to_uncond: bool,
    /// The hooks the model samples this entry with (scheduled LoRA).
    pub hooks: Option<HookGroup>,
    /// The part of sampling a scheduled CLIP encoded the entry for (`clip_start_percent`,
    /// `clip_end_percent`): it applies only there, within its own timestep range.
    pub clip_range: Option<(f64, f64)>,
    /// A default entry (ConditioningSetDefaultCombine): it applies only where the side's
    /// other entries leave weight, with what they leave.
    pub default: bool,
    /// An additive attention bias [T + 1, T + 1] over the entry's T text tokens and the image,
    /// whose last row and column stand for every image token (ComfyUI's `attention_mask` with
    /// `attention_mask_img_shape` 1×1, as StyleModelApply sets it); read by FLUX.
    pub attention_mask: Option<Tensor>,
    /// unCLIPConditioning's images, in the order they were added (`unclip_conditioning`).
    pub unclip: Vec<UnclipImage>,
    /// GLIGENTextBoxApply's model and boxes (`gligen`).
    pub gligen: Option<GligenBoxes>,
    /// ReferenceLatent's latents [B, C, h, w], in the order added (`reference_latents`): FLUX
    /// Kontext attends to their tokens.
    pub reference_latents: Vec<Tensor>,
    /// FluxKontextMultiReferenceLatentMethod's placement of them (`reference_latents_method`).
    pub reference_method: Option<ReferenceMethod>,
}

/// A prompt encoded for the ControlNets of an entry.
#[derive(Clone, Debug)]
pub struct ControlnetText {
    pub cross_attention: Tensor,
    pub pooled: Option<Tensor>,
}

/// The guidance strength a FLUX dev model embeds for an entry: 3.5 unless FluxGuidance set one;
/// FluxDisableGuidance skips the embedding (ComfyUI's `"guidance": None`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum EmbeddedGuidance {
    #[default]
    Unset,
    Strength(f32),
    Disabled,
}

impl EmbeddedGuidance {
    /// The strength embedded, if any (ComfyUI's `Flux.extra_conds`).
    pub fn strength(self) -> Option<f32> {
        match self {
            EmbeddedGuidance::Unset => Some(DEFAULT_GUIDANCE),
            EmbeddedGuidance::Strength(strength) => Some(strength),
            EmbeddedGuidance::Disabled => None,
        }
    }
}

/// The mask channels of FLUX fill: each latent pixel's 8×8 block of mask pixels.
pub(crate) const FLUX_MASK_CHANNELS: usize = 64;

/// FLUX's guidance strength for conditioning that does not set one (ComfyUI's `Flux.extra_conds`).
pub const DEFAULT_GUIDANCE: f32 = 3.5;

/// What a model with extra input channels takes beside the noise: an encoded image (raw VAE
/// latent, `concat_latent_image`) and, from InpaintModelConditioning, the mask of the part to
/// complete (`concat_mask`; the image's masked part is greyed out).
#[derive(Clone, Debug)]
pub struct ConcatImage {
    pub latent: Tensor,
    pub mask: Option<Mask>,
}

impl ConcatImage {
    /// The mask as one channel, [B, 1, H, W] at its own (pixel) size.
    pub(crate) fn mask_channel(&self, device: &Device) -> candle_core::Result<Option<Tensor>> {
        self.mask
            .as_ref()
            .map(|mask| Tensor::from_vec(mask.data.clone(), (mask.batch, 1, mask.height, mask.width), device))
            .transpose()
    }
}

impl CondEntry {
    /// An entry of text embeddings with nothing else set.
    pub fn new(cross_attention: Tensor, pooled: Option<Tensor>) -> Self {
        CondEntry {
            cross_attention,
            pooled,
            timestep_range: None,
            sdxl: SdxlSizes::default(),
            region: CondRegion::default(),
            concat_image: None,
            guidance: EmbeddedGuidance::Unset,
            controlnet_text: None,
            control: None,
            control_to_uncond: false,
            hooks: None,
            clip_range: None,
            default: false,
            attention_mask: None,
            unclip: Vec::new(),
            gligen: None,
            reference_latents: Vec::new(),
            reference_method: None,
        }
    }
}

/// The keys of a conditioning entry SDXL's class conditioning reads; a missing one takes its
/// default when sampling (the latent's size, no crop, the size as target, the refiner's
/// aesthetic score 6 or 2.5).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SdxlSizes {
    pub width: Option<f64>,
    pub height: Option<f64>,
    pub crop_w: Option<f64>,
    pub crop_h: Option<f64>,
    pub target_width: Option<f64>,
    pub target_height: Option<f64>,
    pub aesthetic_score: Option<f64>,
}

/// The CONDITIONING socket: a list of entries.
#[derive(Clone, Debug)]
pub struct Conditioning(pub Vec<CondEntry>);

impl Conditioning {
    /// Every entry changed by `change` (ComfyUI's `conditioning_set_values`).
    pub fn map_entries(&self, change: impl Fn(&mut CondEntry)) -> Conditioning {
        let entries = self
            .0
            .iter()
            .map(|entry| {
                let mut entry = entry.clone();
                change(&mut entry);
                entry
            })
            .collect();
        Conditioning(entries)
    }

    /// Every entry with `guidance` for what a FLUX dev model embeds (FluxGuidance's and
    /// FluxDisableGuidance's `conditioning_set_values`).
    pub fn with_guidance(&self, guidance: EmbeddedGuidance) -> Conditioning {
        self.map_entries(|entry| entry.guidance = guidance)
    }
}

impl NodeObject for Conditioning {
    fn type_name(&self) -> &'static str {
        "CONDITIONING"
    }
}
