//! SD3 and SD3.5's ControlNets (ComfyUI's `comfy/cldm/mmdit.py` and `dit_embedder.py`), which
//! see the latent, the hint as a latent (the control image encoded by the VAE) and the timestep,
//! and give a residual for the image tokens after each of the MMDiT's joint blocks
//! ([`ControlResiduals::output`], which [`crate::architectures::mmdit::MmditInput::control`]
//! takes):
//!
//! - [`JointControlNet`], diffusers' `SD3ControlNetModel` (InstantX's canny, pose and tile
//!   ControlNets; AliMama's inpainting one, whose hint carries the mask as a 17th channel) read
//!   under Stability's names: a trunk of joint blocks as the MMDiT's (text included, every text
//!   block whole, no final layer) with the hint's patches added to the image tokens. It sees a
//!   pooled vector of zeros, as ComfyUI gives it. Each block's residual serves `depth / blocks`
//!   of the model's blocks (one fewer for the last).
//! - [`EmbedderControlNet`], Stability's SD3.5 ControlNets (blur, canny, depth): self-attention
//!   blocks over the image tokens only, modulated by the timestep and pooled text, the image
//!   patches embedded by the sampled model's own patch embedding (ComfyUI's `pre_run` copies it)
//!   with 2-D sine-cosine positions. Each block's residual serves `⌈depth / blocks⌉` blocks.

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::architectures::flux::MlpEmbedder;
use crate::architectures::mmdit::{
    Mmdit, MmditConfig, PatchEmbedding, SelfAttentionBlock, EMBEDDER_LAYERS, HEAD_DIM, PATCH, TIME_EMBEDDING,
};
use crate::architectures::unet::{timestep_embedding, ControlResiduals};
use crate::checkpoint::DetectError;
use crate::kernels::linear::{linear, Linear};
use crate::weights::{MappedWeights, Weights};

/// The tensor every SD3 ControlNet has (ComfyUI's test in `load_controlnet_state_dict`).
pub const SD3_CONTROLNET_MARKER: &str = "pos_embed_input.proj.weight";
/// The tensor that tells Stability's SD3.5 ControlNets from diffusers' SD3 ones.
pub const SD35_CONTROLNET_MARKER: &str = "transformer_blocks.0.adaLN_modulation.1.bias";

/// What an SD3.5 ControlNet does to the control image before encoding it, by the `control_type`
/// its file records (ComfyUI's `preprocess_image`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HintPreprocessing {
    /// Blur, or no type recorded: the image as it is.
    None,
    /// Canny: `image·255·0.5 + 0.5`.
    Canny,
    /// Depth: `1 − image`.
    Depth,
}

impl HintPreprocessing {
    /// The control image's values (in 0..1) as the ControlNet's VAE encodes them.
    pub fn apply(self, values: &mut [f32]) {
        let value: fn(f32) -> f32 = match self {
            HintPreprocessing::None => return,
            HintPreprocessing::Canny => |v| v * 255.0 * 0.5 + 0.5,
            HintPreprocessing::Depth => |v| 1.0 - v,
        };
        values.iter_mut().for_each(|v| *v = value(*v));
    }
}

/// An SD3 ControlNet's shape, read from its weights (Stability's names).
#[derive(Clone, Debug, PartialEq)]
pub enum MmditControlNetConfig {
    /// diffusers' layout: the trunk's MMDiT shape (its `depth` is the model's, its `blocks` the
    /// ControlNet's own) and the hint's channels (16, or 17 with an inpainting mask).
    Joint { trunk: MmditConfig, hint_channels: usize },
    /// Stability's SD3.5 layout: `depth` of the model (64·depth wide), `blocks` of its own, the
    /// pooled vector's width, and what its recorded control type does to the control image.
    Embedder {
        depth: usize,
        blocks: usize,
        adm_in_channels: usize,
        preprocessing: HintPreprocessing,
    },
}

impl MmditControlNetConfig {
    /// The configuration of the ControlNet in `file` (Stability's names; diffusers' converted);
    /// reads the control type an SD3.5 ControlNet records.
    pub fn infer(file: &dyn MappedWeights) -> std::result::Result<Self, DetectError> {
        let hint = file
            .shape(SD3_CONTROLNET_MARKER)
            .ok_or_else(|| DetectError::MissingTensor(SD3_CONTROLNET_MARKER.into()))?;
        let &[hidden, hint_channels, _, _] = hint else {
            return Err(DetectError::Unrecognised(format!(
                "'{SD3_CONTROLNET_MARKER}' has shape {hint:?}"
            )));
        };
        if !file.has(SD35_CONTROLNET_MARKER) {
            let trunk = MmditConfig::infer(file, "")?;
            if trunk.hidden_size() != hidden {
                return Err(DetectError::Unrecognised(format!(
                    "an SD3 ControlNet whose hint embedding is {hidden} wide and its blocks {}",
                    trunk.hidden_size()
                )));
            }
            return Ok(MmditControlNetConfig::Joint { trunk, hint_channels });
        }
        let y_embedder = file
            .shape("y_embedder.mlp.0.weight")
            .ok_or_else(|| DetectError::MissingTensor("y_embedder.mlp.0.weight".into()))?;
        let &[width, adm_in_channels] = y_embedder else {
            return Err(DetectError::Unrecognised(format!(
                "'y_embedder.mlp.0.weight' has shape {y_embedder:?}"
            )));
        };
        if width == adm_in_channels || file.has("orig_y_embedder.mlp.0.weight") {
            return Err(DetectError::NotYetSupported(
                "SD3.5 ControlNet with a second pooled-vector embedder",
            ));
        }
        if width != hidden || hint_channels != 16 || hidden % HEAD_DIM != 0 {
            return Err(DetectError::Unrecognised(format!(
                "an SD3.5 ControlNet {width} wide with a hint embedding of {hint_channels} channels into {hidden}"
            )));
        }
        let control_type = match file.has("control_type") {
            true => file
                .load("control_type", DType::F32, &Device::Cpu)
                .and_then(|value| value.flatten_all()?.to_vec1::<f32>())
                .map_err(|error| DetectError::Unrecognised(format!("its 'control_type': {error}")))?
                .first()
                .map(|value| value.round() as i64),
            false => None,
        };
        Ok(MmditControlNetConfig::Embedder {
            depth: hidden / HEAD_DIM,
            blocks: (0..)
                .take_while(|n| file.has(&format!("transformer_blocks.{n}.attn.qkv.weight")))
                .count(),
            adm_in_channels,
            preprocessing: match control_type {
                Some(1) => HintPreprocessing::Canny,
                Some(2) => HintPreprocessing::Depth,
                _ => HintPreprocessing::None,
            },
        })
    }

    /// Channels of the hint latent the network takes.
    pub fn hint_channels(&self) -> usize {
        match self {
            MmditControlNetConfig::Joint { hint_channels, .. } => *hint_channels,
            MmditControlNetConfig::Embedder { .. } => 16,
        }
    }
}

/// One call of an SD3 ControlNet.
pub struct MmditControlInput<'a> {
    /// The latent [B, 16, H, W].
    pub x: &'a Tensor,
    /// The hint latent [B, hint channels, H, W].
    pub hint: &'a Tensor,
    /// The timestep per batch item [B] (σ·1000).
    pub timesteps: &'a Tensor,
    /// Text tokens [B, L, 4096].
    pub context: &'a Tensor,
    /// The pooled text vector [B, 2048].
    pub y: Option<&'a Tensor>,
}

/// An SD3 or SD3.5 ControlNet.
pub enum MmditControlNet {
    Joint(Box<JointControlNet>),
    Embedder(Box<EmbedderControlNet>),
}

impl MmditControlNet {
    pub fn new(config: MmditControlNetConfig, weights: Weights) -> Result<Self> {
        Ok(match config {
            MmditControlNetConfig::Joint { trunk, hint_channels } => {
                MmditControlNet::Joint(Box::new(JointControlNet::new(trunk, hint_channels, weights)?))
            }
            MmditControlNetConfig::Embedder {
                depth,
                blocks,
                adm_in_channels,
                preprocessing,
            } => MmditControlNet::Embedder(Box::new(EmbedderControlNet::new(
                depth,
                blocks,
                adm_in_channels,
                preprocessing,
                weights,
            )?)),
        })
    }

    /// Channels of the hint latent the network takes (17: the inpainting mask after the latent).
    pub fn hint_channels(&self) -> usize {
        match self {
            MmditControlNet::Joint(network) => network.hint_channels,
            MmditControlNet::Embedder(_) => 16,
        }
    }

    /// What is done to the control image before it is encoded.
    pub fn preprocessing(&self) -> HintPreprocessing {
        match self {
            MmditControlNet::Joint(_) => HintPreprocessing::None,
            MmditControlNet::Embedder(network) => network.preprocessing,
        }
    }

    /// Whether the hint latent is shifted as the model's latents are: diffusers' SD3
    /// ControlNets take it scaled only (ComfyUI's "SD3 controlnet weirdness").
    pub fn shifted_hint(&self) -> bool {
        matches!(self, MmditControlNet::Embedder(_))
    }

    /// The residuals for the image tokens after each of the model's joint blocks; `model` is the
    /// MMDiT being sampled (whose patch embedding an SD3.5 ControlNet uses).
    pub fn forward(&self, input: &MmditControlInput, model: &Mmdit) -> Result<ControlResiduals> {
        let output = match self {
            MmditControlNet::Joint(network) => network.forward(input)?,
            MmditControlNet::Embedder(network) => network.forward(input, model)?,
        };
        Ok(ControlResiduals {
            input: Vec::new(),
            middle: None,
            output,
        })
    }
}

/// diffusers' SD3 ControlNet: the MMDiT's trunk, the hint's patch embedding, a linear layer
/// per block.
pub struct JointControlNet {
    trunk: Mmdit,
    hint_embedder: PatchEmbedding,
    hint_channels: usize,
    controlnet_blocks: Vec<Linear>,
}

impl JointControlNet {
    fn new(trunk: MmditConfig, hint_channels: usize, weights: Weights) -> Result<Self> {
        let hidden = trunk.hidden_size();
        let trunk = MmditConfig {
            final_layer: false,
            ..trunk
        };
        Ok(JointControlNet {
            hint_embedder: PatchEmbedding::new(hint_channels, hidden, weights.pp("pos_embed_input.proj"))?,
            controlnet_blocks: (0..trunk.blocks)
                .map(|n| linear(hidden, hidden, weights.pp(format!("controlnet_blocks.{n}"))))
                .collect::<Result<_>>()?,
            hint_channels,
            trunk: Mmdit::new(trunk, weights)?,
        })
    }

    fn forward(&self, input: &MmditControlInput) -> Result<Vec<Option<Tensor>>> {
        // A single hint serves every item of the batch.
        let mut img = self
            .trunk
            .embed_patches(input.x)?
            .broadcast_add(&self.hint_embedder.forward(input.hint)?)?;
        let zeros = input.y.map(Tensor::zeros_like).transpose()?;
        let c = self.trunk.conditioning_vector(input.timesteps, zeros.as_ref())?;
        let mut txt = self.trunk.text_tokens(input.context)?;
        let (depth, blocks) = (self.trunk.config().depth, self.controlnet_blocks.len());
        let mut output = Vec::with_capacity(depth);
        for (n, controlnet_block) in self.controlnet_blocks.iter().enumerate() {
            let (next_img, next_txt) = self.trunk.plain_joint_block(n, &img, &txt, &c)?;
            img = next_img;
            txt =
                next_txt.ok_or_else(|| candle_core::Error::Msg(format!("SD3 ControlNet block {n} ended the text")))?;
            let residual = controlnet_block.forward(&img)?;
            let serves = (depth / blocks).saturating_sub(usize::from(n + 1 == blocks));
            output.extend(std::iter::repeat_n(Some(residual), serves));
        }
        Ok(output)
    }
}

/// Stability's SD3.5 ControlNet.
pub struct EmbedderControlNet {
    depth: usize,
    t_embedder: MlpEmbedder,
    y_embedder: MlpEmbedder,
    hint_embedder: PatchEmbedding,
    blocks: Vec<SelfAttentionBlock>,
    controlnet_blocks: Vec<Linear>,
    preprocessing: HintPreprocessing,
}

impl EmbedderControlNet {
    fn new(
        depth: usize,
        blocks: usize,
        adm_in_channels: usize,
        preprocessing: HintPreprocessing,
        weights: Weights,
    ) -> Result<Self> {
        let hidden = depth * HEAD_DIM;
        let block_config = MmditConfig {
            in_channels: 16,
            out_channels: 16,
            depth,
            blocks,
            adm_in_channels: Some(adm_in_channels),
            context_dim: None,
            pos_embed_max_size: 0,
            qk_norm: false,
            x_block_self_attention: Vec::new(),
            final_layer: false,
        };
        Ok(EmbedderControlNet {
            depth,
            t_embedder: MlpEmbedder::named(TIME_EMBEDDING, hidden, weights.pp("t_embedder.mlp"), EMBEDDER_LAYERS)?,
            y_embedder: MlpEmbedder::named(adm_in_channels, hidden, weights.pp("y_embedder.mlp"), EMBEDDER_LAYERS)?,
            hint_embedder: PatchEmbedding::new(16, hidden, weights.pp("pos_embed_input.proj"))?,
            blocks: (0..blocks)
                .map(|n| SelfAttentionBlock::new(&block_config, weights.pp(format!("transformer_blocks.{n}"))))
                .collect::<Result<_>>()?,
            controlnet_blocks: (0..blocks)
                .map(|n| linear(hidden, hidden, weights.pp(format!("controlnet_blocks.{n}"))))
                .collect::<Result<_>>()?,
            preprocessing,
        })
    }

    fn forward(&self, input: &MmditControlInput, model: &Mmdit) -> Result<Vec<Option<Tensor>>> {
        if model.config().depth != self.depth {
            candle_core::bail!(
                "an SD3.5 ControlNet for a model of depth {} cannot control one of depth {}",
                self.depth,
                model.config().depth
            );
        }
        let (_, _, height, width) = input.x.dims4()?;
        let (rows, cols) = (height.div_ceil(PATCH), width.div_ceil(PATCH));
        let positions = sincos_positions(self.depth * HEAD_DIM, rows, cols, input.x.device())?;
        let mut img = model.patch_embedding().forward(input.x)?.broadcast_add(&positions)?;
        let mut c = self
            .t_embedder
            .forward(&timestep_embedding(input.timesteps, TIME_EMBEDDING)?)?;
        if let Some(y) = input.y {
            c = (c + self.y_embedder.forward(y)?)?;
        }
        img = img.broadcast_add(&self.hint_embedder.forward(input.hint)?)?;
        let serves = self.depth.div_ceil(self.blocks.len().max(1));
        let mut output = Vec::with_capacity(serves * self.blocks.len());
        for (block, controlnet_block) in self.blocks.iter().zip(&self.controlnet_blocks) {
            img = block.forward(&img, &c)?;
            let residual = controlnet_block.forward(&img)?;
            output.extend(std::iter::repeat_n(Some(residual), serves));
        }
        Ok(output)
    }
}

/// ComfyUI's `get_2d_sincos_pos_embed_torch(hidden, cols, rows)` [rows·cols, hidden]: per
/// token, the sines then cosines of its column's grid value times `10000^(−i/(hidden/4))`,
/// then its row's; the grid spans 7.5 ± 7.5 along the shorter side, proportionally more along
/// the longer one, in f32 as torch's `linspace` makes it.
fn sincos_positions(hidden: usize, rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    const CENTER: f32 = 7.5;
    const MAGNITUDE: f32 = 7.5;
    let shorter = rows.min(cols).max(1) as f32;
    let grid = |count: usize| -> Vec<f32> {
        let half = count as f32 / shorter * MAGNITUDE;
        linspace(CENTER - half, CENTER + half, count)
    };
    let (row_values, col_values) = (grid(rows), grid(cols));
    let quarter = hidden / 4;
    let omega: Vec<f32> = (0..quarter)
        .map(|i| 1.0 / 10000f32.powf(i as f32 / quarter as f32))
        .collect();
    let mut values = Vec::with_capacity(rows * cols * hidden);
    for row in &row_values {
        for col in &col_values {
            for position in [col, row] {
                values.extend(omega.iter().map(|w| (position * w).sin()));
                values.extend(omega.iter().map(|w| (position * w).cos()));
            }
        }
    }
    Tensor::from_vec(values, (rows * cols, hidden), device)
}

/// torch's `linspace(start, end, count)` in f32: the first half stepped from `start`, the
/// second back from `end`.
fn linspace(start: f32, end: f32, count: usize) -> Vec<f32> {
    if count == 1 {
        return vec![start];
    }
    let step = (end - start) / (count - 1) as f32;
    let halfway = count / 2;
    (0..count)
        .map(|i| match i < halfway {
            true => start + step * i as f32,
            false => end - step * (count - 1 - i) as f32,
        })
        .collect()
}
