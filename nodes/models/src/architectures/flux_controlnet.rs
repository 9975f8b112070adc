//! FLUX ControlNets that take the control image itself (`comfy/ldm/flux/controlnet.py`'s
//! `ControlNetFlux` for XLabs' and TheMisto's Mistoline files): a copy of FLUX's input layers
//! and of a few of its double (and single) blocks, without the final layer. The image (mapped to
//! −1…1) goes through a small convolution stack down to the latent's size; its 2×2 patches are
//! projected (`pos_embed_input`) and added to the latent's image tokens. After each block a
//! linear layer (Mistoline: linear + SiLU) reads the image tokens; these residuals, repeated to
//! cover FLUX's 19 double and 38 single blocks, are what the model adds after its own blocks.
//! The architecture is read from the weights in BFL's names (Mistoline's renamed as ComfyUI
//! renames them).

use candle_core::{Module, Result, Tensor};

use super::flux::{patchify, Flux, FluxConfig, FluxInput};
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
/// The tensor that marks an XLabs FLUX ControlNet (with `controlnet_blocks.0.weight`).
pub const XLABS_MARKER: &str = "double_blocks.0.img_attn.norm.key_norm.scale";
/// The tensor that marks a Mistoline FLUX ControlNet.
pub const MISTOLINE_MARKER: &str = "controlnet_blocks.0.linear.weight";
/// Mistoline's name for the single blocks' residual layers, and the name ComfyUI gives them.
pub const MISTOLINE_SINGLE_PREFIX: (&str, &str) = ("single_controlnet_blocks.", "controlnet_single_blocks.");

/// Which file family the ControlNet is: the convolution stack and residual layers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FluxControlNetKind {
    /// XLabs: eight 3×3 convolutions (three of stride 2), plain linear residual layers.
    XLabs,
    /// Mistoline: ten convolutions (1×1 among them), linear + SiLU residual layers.
    Mistoline,
}

impl FluxControlNetKind {
    /// The hint stack: (kernel, stride) of each convolution, SiLU between them.
    fn hint_layers(self) -> &'static [(usize, usize)] {
        match self {
            FluxControlNetKind::XLabs => &[(3, 1), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1)],
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
            FluxControlNetKind::XLabs => "input_hint_block",
            FluxControlNetKind::Mistoline => "input_cond_block.encoder",
        }
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
        let kind = if file.has(MISTOLINE_MARKER) {
            FluxControlNetKind::Mistoline
        } else if file.has("controlnet_blocks.0.weight") && file.has(XLABS_MARKER) {
            FluxControlNetKind::XLabs
        } else {
            return Err(DetectError::Unrecognised(
                "not an XLabs or Mistoline FLUX ControlNet".into(),
            ));
        };
        Ok(FluxControlNetConfig {
            kind,
            flux: FluxConfig::infer(file, "")?,
        })
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
            FluxControlNetKind::XLabs => ResidualLayer {
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
    flux: Flux,
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
        Ok(FluxControlNet {
            hint_input: linear(config.flux.in_channels, hidden, weights.pp("pos_embed_input"))?,
            double_layers: residual_layers("controlnet_blocks", config.flux.double_blocks)?,
            single_layers: residual_layers("controlnet_single_blocks", config.flux.single_blocks)?,
            flux: Flux::without_final_layer(config.flux, weights)?,
            hint_layers,
        })
    }

    /// The residuals for one call of the model: `input` the model's call (its latent, text,
    /// timestep, guidance and pooled text), `hint` the control image [B, 3, 8h, 8w] in 0…1.
    /// `input` holds the residuals after each of FLUX's double blocks, `output` after each single
    /// block: the ControlNet's own, repeated in turn (1, 2, 1, 2, …) to cover them.
    pub fn forward(&self, input: &FluxInput, hint: &Tensor) -> Result<ControlResiduals> {
        let mut h = ((hint * 2.0)? - 1.0)?;
        for (index, layer) in self.hint_layers.iter().enumerate() {
            if index > 0 {
                h = h.silu()?;
            }
            h = layer.forward(&h)?;
        }
        let mut tokens = self.flux.embed(input)?;
        tokens.img = tokens.img.broadcast_add(&self.hint_input.forward(&patchify(&h)?)?)?;
        let (doubles, singles) = self.flux.block_outputs(tokens)?;
        let residuals = |outputs: Vec<Tensor>, layers: &[ResidualLayer], cover: usize| -> Result<Vec<Option<Tensor>>> {
            let own = outputs
                .iter()
                .zip(layers)
                .map(|(tokens, layer)| layer.forward(tokens))
                .collect::<Result<Vec<_>>>()?;
            Ok(own.iter().cycle().take(cover).cloned().map(Some).collect())
        };
        Ok(ControlResiduals {
            input: residuals(doubles, &self.double_layers, MAIN_DOUBLE_BLOCKS)?,
            middle: None,
            output: residuals(singles, &self.single_layers, MAIN_SINGLE_BLOCKS)?,
        })
    }
}
