//! FLUX ControlNets (`comfy/ldm/flux/controlnet.py`'s `ControlNetFlux`): a copy of FLUX's input
//! layers and of a few of its double (and single) blocks, without the final layer. XLabs' and
//! TheMisto's Mistoline files take the control image (mapped to −1…1) through a small
//! convolution stack down to the latent's size; InstantX's and Shakker-Labs' (diffusers layout)
//! take the image's latent, VAE-encoded, and a union model may be told a control type, an
//! embedding put before the text tokens. The hint's 2×2 patches are projected
//! (`pos_embed_input`) and added to the latent's image tokens. After each block a linear layer
//! (Mistoline: linear + SiLU) reads the image tokens; these residuals, repeated to cover FLUX's
//! 19 double and 38 single blocks, are what the model adds after its own blocks. The
//! architecture is read from the weights in BFL's names (Mistoline's renamed as ComfyUI renames
//! them, diffusers' converted by
//! [`crate::diffusers_layout::ConvertedWeights::diffusers_flux_controlnet`]).

use candle_core::{Module, Result, Tensor};

use super::flux::{pad_circularly, patchify, Flux, FluxConfig, FluxInput};
use super::unet::ControlResiduals;
use crate::checkpoint::DetectError;
use crate::kernels::conv::Conv2d;
use crate::kernels::linear::{linear, Linear};
use crate::weights::{TensorShapes, Weights};

/// The main model's blocks the residuals are spread over (FLUX.1's depths).
const MAIN_DOUBLE_BLOCKS: usize = 19;
const MAIN_SINGLE_BLOCKS: usize = 38;
/// Channels of the hint stack's convolutions.
const HINT_CHANNELS: usize = 16;
/// Values a channel gives a token: a 2×2 patch.
const PATCH_AREA: usize = 4;
/// The tensor that marks an XLabs FLUX ControlNet (with `controlnet_blocks.0.weight`).
pub const XLABS_MARKER: &str = "double_blocks.0.img_attn.norm.key_norm.scale";
/// The tensor that marks a Mistoline FLUX ControlNet.
pub const MISTOLINE_MARKER: &str = "controlnet_blocks.0.linear.weight";
/// Mistoline's name for the single blocks' residual layers, and the name ComfyUI gives them.
pub const MISTOLINE_SINGLE_PREFIX: (&str, &str) = ("single_controlnet_blocks.", "controlnet_single_blocks.");

/// Which file family the ControlNet is: the hint's path and the residual layers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FluxControlNetKind {
    /// XLabs: eight 3×3 convolutions (three of stride 2), plain linear residual layers.
    XLabs,
    /// Mistoline: ten convolutions (1×1 among them), linear + SiLU residual layers.
    Mistoline,
    /// InstantX / Shakker-Labs / AliMama: the hint is the image's latent; `union_modes` control
    /// types (0: not a union model); `concat_mask`: a mask channel follows the latent's
    /// (AliMama's inpainting ControlNet).
    Latent { union_modes: usize, concat_mask: bool },
}

impl FluxControlNetKind {
    /// The hint stack: (kernel, stride) of each convolution, SiLU between them.
    fn hint_layers(self) -> &'static [(usize, usize)] {
        match self {
            FluxControlNetKind::XLabs => &[(3, 1), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1)],
            FluxControlNetKind::Latent { .. } => &[],
            FluxControlNetKind::Mistoline => &[
                (3, 1),
                (1, 1),
                (3, 1),
                (3, 2),
                (3, 1),
                (3, 2),
                (3, 1),
                (3, 2),
                (1, 1),
                (3, 1),
            ],
        }
    }

    fn hint_prefix(self) -> &'static str {
        match self {
            FluxControlNetKind::XLabs | FluxControlNetKind::Latent { .. } => "input_hint_block",
            FluxControlNetKind::Mistoline => "input_cond_block.encoder",
        }
    }

    /// Whether the hint is the image's latent rather than the image.
    pub fn takes_latent(self) -> bool {
        matches!(self, FluxControlNetKind::Latent { .. })
    }

    /// Whether a mask channel follows the latent's in the hint.
    pub fn concat_mask(self) -> bool {
        matches!(self, FluxControlNetKind::Latent { concat_mask: true, .. })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FluxControlNetConfig {
    pub kind: FluxControlNetKind,
    /// The copied transformer (its depths are the ControlNet's).
    pub flux: FluxConfig,
}

impl FluxControlNetConfig {
    /// The ControlNet's architecture (Mistoline's tensors under ComfyUI's names).
    pub fn infer(file: &dyn TensorShapes) -> std::result::Result<Self, DetectError> {
        let flux = FluxConfig::infer(file, "")?;
        let kind = if file.has(MISTOLINE_MARKER) {
            FluxControlNetKind::Mistoline
        } else if file.has("input_hint_block.0.weight") {
            FluxControlNetKind::XLabs
        } else if let Some(&[_, channels]) = file.shape("pos_embed_input.weight") {
            let concat_mask = channels == flux.in_channels + PATCH_AREA;
            if channels != flux.in_channels && !concat_mask {
                return Err(DetectError::Unrecognised(format!(
                    "a FLUX ControlNet taking {channels} channels of 2×2 patches"
                )));
            }
            FluxControlNetKind::Latent {
                union_modes: file
                    .shape("controlnet_mode_embedder.weight")
                    .map_or(0, |shape| shape[0]),
                concat_mask,
            }
        } else {
            return Err(DetectError::Unrecognised("not a FLUX ControlNet".into()));
        };
        Ok(FluxControlNetConfig { kind, flux })
    }
}

/// A layer reading the image tokens after a block.
struct ResidualLayer {
    linear: Linear,
    silu: bool,
}

impl ResidualLayer {
    fn new(hidden: usize, kind: FluxControlNetKind, weights: Weights) -> Result<Self> {
        Ok(match kind {
            FluxControlNetKind::XLabs | FluxControlNetKind::Latent { .. } => ResidualLayer {
                linear: linear(hidden, hidden, weights)?,
                silu: false,
            },
            FluxControlNetKind::Mistoline => ResidualLayer {
                linear: linear(hidden, hidden, weights.pp("linear"))?,
                silu: true,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.linear.forward(x)?;
        if self.silu {
            out.silu()
        } else {
            Ok(out)
        }
    }
}

pub struct FluxControlNet {
    kind: FluxControlNetKind,
    flux: Flux,
    /// The control types' embeddings [types, hidden] (union models).
    mode_embeddings: Option<Tensor>,
    hint_layers: Vec<Conv2d>,
    hint_input: Linear,
    double_layers: Vec<ResidualLayer>,
    single_layers: Vec<ResidualLayer>,
}

impl FluxControlNet {
    pub fn new(config: FluxControlNetConfig, weights: Weights) -> Result<Self> {
        let hidden = config.flux.hidden_size;
        let kind = config.kind;
        let mut in_channels = 3;
        let mut hint_layers = Vec::new();
        for (index, &(kernel, stride)) in kind.hint_layers().iter().enumerate() {
            let layer = weights.pp(format!("{}.{}", kind.hint_prefix(), 2 * index));
            hint_layers.push(Conv2d::same(in_channels, HINT_CHANNELS, kernel, stride, layer)?);
            in_channels = HINT_CHANNELS;
        }
        let residual_layers = |name: &str, count: usize| {
            (0..count)
                .map(|n| ResidualLayer::new(hidden, kind, weights.pp(format!("{name}.{n}"))))
                .collect::<Result<Vec<_>>>()
        };
        let mode_embeddings = match kind {
            FluxControlNetKind::Latent { union_modes, .. } if union_modes > 0 => {
                Some(weights.get((union_modes, hidden), "controlnet_mode_embedder.weight")?)
            }
            _ => None,
        };
        Ok(FluxControlNet {
            kind,
            mode_embeddings,
            hint_input: linear(
                config.flux.in_channels + if kind.concat_mask() { PATCH_AREA } else { 0 },
                hidden,
                weights.pp("pos_embed_input"),
            )?,
            double_layers: residual_layers("controlnet_blocks", config.flux.double_blocks)?,
            single_layers: residual_layers("controlnet_single_blocks", config.flux.single_blocks)?,
            flux: Flux::without_final_layer(config.flux, weights)?,
            hint_layers,
        })
    }

    pub fn kind(&self) -> FluxControlNetKind {
        self.kind
    }

    /// The residuals for one call of the model: `input` the model's call (its latent, text,
    /// timestep, guidance and pooled text), `hint` the control image [B, 3, 8h, 8w] in 0…1 or,
    /// for a ControlNet that takes latents, the image's latent in model space [B, 16, h, w]
    /// (and the mask, [B, 17, h, w], for one that concatenates it);
    /// `control_type` a union model's control type. `input` holds the residuals after each of
    /// FLUX's double blocks, `output` after each single block: the ControlNet's own, repeated to
    /// cover them (in turn, 1, 2, 1, 2, …; a latent ControlNet's each several times over,
    /// 1, 1, 2, 2, …).
    pub fn forward(&self, input: &FluxInput, hint: &Tensor, control_type: Option<usize>) -> Result<ControlResiduals> {
        let h = if self.kind.takes_latent() {
            pad_circularly(&pad_circularly(hint, 2)?, 3)?
        } else {
            let mut h = ((hint * 2.0)? - 1.0)?;
            for (index, layer) in self.hint_layers.iter().enumerate() {
                if index > 0 {
                    h = h.silu()?;
                }
                h = layer.forward(&h)?;
            }
            h
        };
        let mut tokens = self.flux.embed(input)?;
        tokens.img = tokens.img.broadcast_add(&self.hint_input.forward(&patchify(&h)?)?)?;
        if let (Some(embeddings), Some(control_type)) = (&self.mode_embeddings, control_type) {
            let types = embeddings.dim(0)?;
            if control_type >= types {
                candle_core::bail!("control type {control_type} is beyond this union ControlNet's {types}");
            }
            let (batch, _, hidden) = tokens.txt.dims3()?;
            let mode = embeddings
                .narrow(0, control_type, 1)?
                .unsqueeze(0)?
                .broadcast_as((batch, 1, hidden))?;
            tokens.txt = Tensor::cat(&[&mode.to_dtype(tokens.txt.dtype())?, &tokens.txt], 1)?;
        }
        let (doubles, singles) = self.flux.block_outputs(tokens)?;
        let consecutive = self.kind.takes_latent();
        let residuals = |outputs: Vec<Tensor>, layers: &[ResidualLayer], cover: usize| -> Result<Vec<Option<Tensor>>> {
            let own = outputs
                .iter()
                .zip(layers)
                .map(|(tokens, layer)| layer.forward(tokens))
                .collect::<Result<Vec<_>>>()?;
            if own.is_empty() {
                return Ok(Vec::new());
            }
            let repeat = cover.div_ceil(own.len());
            Ok((0..cover)
                .map(|index| Some(own[if consecutive { index / repeat } else { index % own.len() }].clone()))
                .collect())
        };
        Ok(ControlResiduals {
            input: residuals(doubles, &self.double_layers, MAIN_DOUBLE_BLOCKS)?,
            middle: None,
            output: residuals(singles, &self.single_layers, MAIN_SINGLE_BLOCKS)?,
        })
    }
}
