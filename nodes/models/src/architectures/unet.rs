//! The Stable Diffusion UNet (`openaimodel.UNetModel`) read directly from the LDM key layout of
//! ComfyUI checkpoints (`input_blocks`, `middle_block`, `output_blocks`), for SD1.x, SD2.x and
//! SDXL. Its shape — channels, levels, residual blocks, where attention sits and how deep, the
//! context width, class conditioning — is inferred from the weights, so any size loads through
//! the same code.
//!
//! Hook points for features that extend the network without forking it: `in_channels` follows
//! the weights (inpainting and IC-Light models concatenate extra channels to the input),
//! [`ControlResiduals`] are added after blocks and to skip connections (ControlNet), and
//! [`UNetPatches`] see block outputs and attentions or replace attentions (FreeU, PAG,
//! IP-Adapter; see [`super::unet_patches`]).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{GroupNorm, LayerNorm};

pub use super::unet_patches::BlockPosition;
use super::unet_patches::{AttentionInputs, AttentionKind, AttentionSite, PatchedCall, UNetPatches};
use crate::checkpoint::DetectError;
use crate::kernels::attention::attention;
use crate::kernels::conv::Conv2d;
use crate::kernels::cpu::{self, with_cpu_f32};
use crate::kernels::linear::{linear, linear_no_bias, Linear};
use crate::weights::{TensorShapes, Weights};

/// How attention heads are sized: a fixed count (SD1.x: 8) or a fixed width (SD2.x, SDXL: 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadLayout {
    Count(usize),
    Width(usize),
}

impl HeadLayout {
    fn heads(self, channels: usize) -> usize {
        match self {
            HeadLayout::Count(count) => count,
            HeadLayout::Width(width) => (channels / width).max(1),
        }
    }
}

/// The architecture of one UNet, as found in its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    /// Channel multiplier of each resolution level.
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the encoder side (the decoder has one more per level).
    pub num_res_blocks: Vec<usize>,
    /// Transformer depth after each encoder residual block, in block order (0 = no attention).
    pub input_depths: Vec<usize>,
    /// Transformer depth of the middle block; `None` when it has no attention.
    pub middle_depth: Option<usize>,
    /// Transformer depth after each decoder residual block, in block order.
    pub output_depths: Vec<usize>,
    /// Width of the text conditioning (`attn2.to_k` input).
    pub context_dim: usize,
    /// SD2.x/SDXL project into and out of transformers with linear layers, SD1.x with 1×1 convs.
    pub linear_projection: bool,
    pub heads: HeadLayout,
    /// Width of the class-conditioning vector `y` (SDXL: 2816), if the model takes one.
    pub adm_in_channels: Option<usize>,
}

impl UNetConfig {
    /// Reads the architecture from the tensors under `prefix` (e.g. `model.diffusion_model.`).
    pub fn infer(file: &dyn TensorShapes, prefix: &str, heads: HeadLayout) -> std::result::Result<Self, DetectError> {
        let mut config = Self::infer_encoder(file, prefix, heads)?;
        let has = |key: &str| file.has(&format!("{prefix}{key}"));
        config.out_channels = file
            .shape(&format!("{prefix}out.2.weight"))
            .ok_or_else(|| DetectError::MissingTensor(format!("{prefix}out.2.weight")))?[0];
        let output_blocks: usize = config.num_res_blocks.iter().map(|count| count + 1).sum();
        for block in 0..output_blocks {
            if !has(&format!("output_blocks.{block}.0.out_layers.3.weight")) {
                return Err(DetectError::MissingTensor(format!(
                    "{prefix}output_blocks.{block}.0.out_layers.3.weight"
                )));
            }
            config
                .output_depths
                .push(transformer_depth(file, &format!("{prefix}output_blocks.{block}.1")));
        }
        Ok(config)
    }

    /// The encoder half of the architecture (what a ControlNet copies): everything but
    /// `out_channels` (0) and `output_depths` (empty).
    pub fn infer_encoder(
        file: &dyn TensorShapes,
        prefix: &str,
        heads: HeadLayout,
    ) -> std::result::Result<Self, DetectError> {
        let shape = |key: &str| file.shape(&format!("{prefix}{key}"));
        let has = |key: &str| file.has(&format!("{prefix}{key}"));
        let required = |key: &str| {
            shape(key)
                .map(<[usize]>::to_vec)
                .ok_or_else(|| DetectError::MissingTensor(format!("{prefix}{key}")))
        };
        let depth_at = |block: &str| transformer_depth(file, &format!("{prefix}{block}"));
        let conv_in = required("input_blocks.0.0.weight")?;
        let (model_channels, in_channels) = (conv_in[0], conv_in[1]);

        let mut channel_mult = vec![];
        let mut num_res_blocks = vec![0];
        let mut input_depths = vec![];
        let mut block = 1;
        loop {
            if has(&format!("input_blocks.{block}.0.op.weight")) {
                num_res_blocks.push(0);
            } else if let Some(out) = shape(&format!("input_blocks.{block}.0.out_layers.3.weight")) {
                let level = num_res_blocks.len() - 1;
                if channel_mult.len() == level {
                    channel_mult.push(out[0] / model_channels);
                }
                num_res_blocks[level] += 1;
                input_depths.push(depth_at(&format!("input_blocks.{block}.1")));
            } else {
                break;
            }
            block += 1;
        }
        if channel_mult.len() != num_res_blocks.len() || channel_mult.is_empty() {
            return Err(DetectError::Unrecognised(format!(
                "the UNet under '{prefix}' has an empty resolution level"
            )));
        }
        let middle_depth = has("middle_block.1.proj_in.weight").then(|| depth_at("middle_block.1"));
        let attention_block = (0..block)
            .map(|b| format!("input_blocks.{b}.1"))
            .chain(["middle_block.1".to_string()])
            .find(|b| has(&format!("{b}.transformer_blocks.0.attn2.to_k.weight")));
        let (context_dim, linear_projection) = match attention_block {
            Some(b) => (
                required(&format!("{b}.transformer_blocks.0.attn2.to_k.weight"))?[1],
                required(&format!("{b}.proj_in.weight"))?.len() == 2,
            ),
            None => (0, false),
        };
        let adm_in_channels = shape("label_emb.0.0.weight").map(|s| s[1]);
        Ok(UNetConfig {
            in_channels,
            out_channels: 0,
            model_channels,
            channel_mult,
            num_res_blocks,
            input_depths,
            middle_depth,
            output_depths: Vec::new(),
            context_dim,
            linear_projection,
            heads,
            adm_in_channels,
        })
    }
}

/// How many transformer blocks the `SpatialTransformer` at `block` (a full key prefix) has.
fn transformer_depth(file: &dyn TensorShapes, block: &str) -> usize {
    (0..)
        .take_while(|d| file.has(&format!("{block}.transformer_blocks.{d}.norm1.weight")))
        .count()
}

/// ControlNet-style residuals: `input[i]` is added to the output of encoder block i (block 0
/// is the input convolution), `middle` to the middle block's output, `output[i]` to the skip
/// connection that decoder block i consumes. Missing entries add nothing; a residual of one
/// batch item is added to every item.
#[derive(Clone, Debug, Default)]
pub struct ControlResiduals {
    pub input: Vec<Option<Tensor>>,
    pub middle: Option<Tensor>,
    pub output: Vec<Option<Tensor>>,
}

impl ControlResiduals {
    /// These residuals plus those of the control applied `earlier` (ComfyUI's `control_merge`
    /// with the previous ControlNet's: entry by entry, whichever exists where only one does).
    pub fn merged_with(mut self, earlier: ControlResiduals) -> Result<Self> {
        fn sum(own: Option<Tensor>, earlier: Option<Tensor>) -> Result<Option<Tensor>> {
            Ok(match (own, earlier) {
                (Some(own), Some(earlier)) => Some(earlier.broadcast_add(&own)?),
                (own, earlier) => own.or(earlier),
            })
        }
        self.middle = sum(self.middle, earlier.middle)?;
        for (list, earlier) in [(&mut self.input, earlier.input), (&mut self.output, earlier.output)] {
            for (index, before) in earlier.into_iter().enumerate() {
                match list.get_mut(index) {
                    Some(own) => *own = sum(own.take(), before)?,
                    None => list.push(before),
                }
            }
        }
        Ok(self)
    }

    /// Every residual multiplied by `strength` (shared as they are at strength 1).
    pub fn scaled(&self, strength: f64) -> Result<Self> {
        if strength == 1.0 {
            return Ok(self.clone());
        }
        self.map(|residual| residual * strength)
    }

    /// Every residual through `f`.
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let each = |list: &[Option<Tensor>]| -> Result<Vec<Option<Tensor>>> {
            list.iter()
                .map(|residual| residual.as_ref().map(&f).transpose())
                .collect()
        };
        Ok(ControlResiduals {
            input: each(&self.input)?,
            middle: self.middle.as_ref().map(&f).transpose()?,
            output: each(&self.output)?,
        })
    }
}

/// `h` plus a control residual (`apply_control`): one of a single item is added to every item;
/// one of another shape is left out with a warning, as ComfyUI leaves it out.
fn with_control(h: Tensor, residual: &Tensor) -> Result<Tensor> {
    let fits =
        residual.dims().get(1..) == h.dims().get(1..) && (residual.dim(0)? == 1 || residual.dim(0)? == h.dim(0)?);
    if !fits {
        tracing::warn!(
            "warning control could not be applied {:?} {:?}",
            h.dims(),
            residual.dims()
        );
        return Ok(h);
    }
    h.broadcast_add(residual)
}

/// One call of the network.
pub struct UNetInput<'a> {
    /// Latent in model space, [B, in_channels, H, W].
    pub x: &'a Tensor,
    /// One timestep per batch item, [B].
    pub timesteps: &'a Tensor,
    /// Text conditioning, [B, tokens, context_dim].
    pub context: &'a Tensor,
    /// Class conditioning, [B, adm_in_channels] (SDXL).
    pub y: Option<&'a Tensor>,
    pub control: Option<&'a ControlResiduals>,
    pub patches: Option<PatchedCall<'a>>,
}

impl<'a> UNetInput<'a> {
    /// Text conditioning only: no class conditioning, control or patches.
    pub fn new(x: &'a Tensor, timesteps: &'a Tensor, context: &'a Tensor) -> Self {
        UNetInput {
            x,
            timesteps,
            context,
            y: None,
            control: None,
            patches: None,
        }
    }
}

pub struct UNet {
    config: UNetConfig,
    encoder: Encoder,
    output_blocks: Vec<Block>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
}

/// The encoder half of the network, which a ControlNet copies: the time (and class) embedding,
/// the input blocks and the middle block.
pub(super) struct Encoder {
    model_channels: usize,
    time_embed: (Linear, Linear),
    label_embed: Option<(Linear, Linear)>,
    input_blocks: Vec<Block>,
    middle_block: Vec<Layer>,
}

impl Encoder {
    /// The encoder's layers; `transformers` numbers its transformers in the order they run
    /// (ComfyUI's `transformer_index`, which the decoder's continue). Also the channels of each
    /// input block's output (the skip connections), in block order.
    pub(super) fn new(
        config: &UNetConfig,
        vb: &Weights,
        transformers: &std::cell::Cell<usize>,
    ) -> Result<(Self, Vec<usize>)> {
        let mc = config.model_channels;
        let time_dim = mc * 4;
        let time_embed = (
            linear(mc, time_dim, vb.pp("time_embed.0"))?,
            linear(time_dim, time_dim, vb.pp("time_embed.2"))?,
        );
        let label_embed = match config.adm_in_channels {
            Some(adm) => Some((
                linear(adm, time_dim, vb.pp("label_emb.0.0"))?,
                linear(time_dim, time_dim, vb.pp("label_emb.0.2"))?,
            )),
            None => None,
        };
        let transformer =
            |channels: usize, depth: usize, vb: Weights| next_transformer(config, transformers, channels, depth, vb);

        let mut input_blocks = vec![Block {
            layers: vec![Layer::Conv(Conv2d::same(
                config.in_channels,
                mc,
                3,
                1,
                vb.pp("input_blocks.0.0"),
            )?)],
        }];
        let mut skip_channels = vec![mc];
        let mut channels = mc;
        let mut depths = config.input_depths.iter();
        let levels = config.channel_mult.len();
        for (level, &mult) in config.channel_mult.iter().enumerate() {
            for _ in 0..config.num_res_blocks[level] {
                let vb = vb.pp(format!("input_blocks.{}", input_blocks.len()));
                let out = mult * mc;
                let mut layers = vec![Layer::Res(Box::new(ResBlock::new(
                    channels,
                    out,
                    time_dim,
                    vb.pp("0"),
                )?))];
                channels = out;
                let depth = depths.next().copied().unwrap_or(0);
                if depth > 0 {
                    layers.push(Layer::Transformer(transformer(channels, depth, vb.pp("1"))?));
                }
                input_blocks.push(Block { layers });
                skip_channels.push(channels);
            }
            if level + 1 < levels {
                let vb = vb.pp(format!("input_blocks.{}.0.op", input_blocks.len()));
                input_blocks.push(Block {
                    layers: vec![Layer::Downsample(Conv2d::same(channels, channels, 3, 2, vb)?)],
                });
                skip_channels.push(channels);
            }
        }

        let mut middle_block = vec![Layer::Res(Box::new(ResBlock::new(
            channels,
            channels,
            time_dim,
            vb.pp("middle_block.0"),
        )?))];
        let last_res = match config.middle_depth {
            Some(depth) => {
                middle_block.push(Layer::Transformer(transformer(
                    channels,
                    depth,
                    vb.pp("middle_block.1"),
                )?));
                "middle_block.2"
            }
            None => "middle_block.1",
        };
        middle_block.push(Layer::Res(Box::new(ResBlock::new(
            channels,
            channels,
            time_dim,
            vb.pp(last_res),
        )?)));
        let encoder = Encoder {
            model_channels: mc,
            time_embed,
            label_embed,
            input_blocks,
            middle_block,
        };
        Ok((encoder, skip_channels))
    }

    /// The embedding every residual block takes: the timesteps' plus `added` (a union
    /// ControlNet's control type), plus SDXL's class vector `y`'s, in `dtype`.
    pub(super) fn embedding(
        &self,
        timesteps: &Tensor,
        added: Option<&Tensor>,
        y: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Tensor> {
        let t_emb = timestep_embedding(timesteps, self.model_channels)?.to_dtype(dtype)?;
        let mut emb = self
            .time_embed
            .1
            .forward(&candle_nn::ops::silu(&self.time_embed.0.forward(&t_emb)?)?)?;
        if let Some(added) = added {
            emb = emb.broadcast_add(added)?;
        }
        if let (Some((first, second)), Some(y)) = (&self.label_embed, y) {
            emb = (emb + second.forward(&candle_nn::ops::silu(&first.forward(y)?)?)?)?;
        }
        Ok(emb)
    }

    /// Runs the input blocks, handing each block's output to `after_block` (with its index),
    /// which gives what the next block takes; then the middle block, whose output is returned.
    ///
    /// Shared rows: classifier-free guidance batches cond and uncond as two copies of one latent
    /// at one timestep, which only the text tells apart. Where `may_share`, the model has no
    /// patches and the batch of `x` and of the embedding is two equal halves, the layers before
    /// the first cross-attention run on the first half only (with the same result): residual
    /// blocks take the first rows of the embedding ([`rows_for`]) and the first transformer
    /// block repeats its rows after its self-attention ([`repeated_to`]). Until then
    /// `after_block` is handed the first half.
    pub(super) fn forward(
        &self,
        x: Tensor,
        context: &Context,
        may_share: bool,
        mut after_block: impl FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let mut h = x;
        if may_share && context.patches.is_none() && halves_equal(&h)? && halves_equal(context.emb)? {
            h = h.narrow(0, 0, batch / 2)?;
        }
        for (index, block) in self.input_blocks.iter().enumerate() {
            h = block.forward(h, context, BlockPosition::Input(index), None)?;
            h = after_block(index, h)?;
        }
        for layer in &self.middle_block {
            h = layer.forward(h, context, BlockPosition::Middle, None)?;
        }
        repeated_to(&h, batch)
    }
}

/// Whether the batch of `t` is two equal halves (see [`Encoder::forward`]).
pub(super) fn halves_equal(t: &Tensor) -> Result<bool> {
    let batch = t.dim(0)?;
    if batch < 2 || !batch.is_multiple_of(2) {
        return Ok(false);
    }
    let half = batch / 2;
    let equal = t.narrow(0, 0, half)?.eq(&t.narrow(0, half, half)?)?;
    Ok(equal.flatten_all()?.min(0)?.to_scalar::<u8>()? == 1)
}

/// The first rows of `t`, as many as `h` has, where `h` holds the first half of a batch of
/// shared rows (see [`Encoder::forward`]); else `t`.
pub(super) fn rows_for(t: &Tensor, h: &Tensor) -> Result<Tensor> {
    let rows = h.dim(0)?;
    if t.dim(0)? > rows {
        t.narrow(0, 0, rows)
    } else {
        Ok(t.clone())
    }
}

/// `h` repeated to `batch` rows where it holds the first half of a batch of shared rows (see
/// [`Encoder::forward`]); else `h`.
pub(super) fn repeated_to(h: &Tensor, batch: usize) -> Result<Tensor> {
    let rows = h.dim(0)?;
    if rows == 0 || rows >= batch || !batch.is_multiple_of(rows) {
        return Ok(h.clone());
    }
    Tensor::cat(&vec![h; batch / rows], 0)
}

/// One `input_blocks.N` / `output_blocks.N`: its layers in order.
struct Block {
    layers: Vec<Layer>,
}

enum Layer {
    Conv(Conv2d),
    /// Boxed: a residual block is several times the size of the other layers.
    Res(Box<ResBlock>),
    Transformer(SpatialTransformer),
    Downsample(Conv2d),
    Upsample(Conv2d),
}

impl UNet {
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn new(config: UNetConfig, vb: Weights) -> Result<Self> {
        let mc = config.model_channels;
        let time_dim = mc * 4;
        // Transformers are numbered in the order they run (ComfyUI's `transformer_index`).
        let transformers = std::cell::Cell::new(0);
        let (encoder, mut skip_channels) = Encoder::new(&config, &vb, &transformers)?;
        let transformer =
            |channels: usize, depth: usize, vb: Weights| next_transformer(&config, &transformers, channels, depth, vb);
        let mut channels = skip_channels.last().copied().unwrap_or(mc);

        let mut output_blocks = Vec::new();
        let mut depths = config.output_depths.iter();
        for (level, &mult) in config.channel_mult.iter().enumerate().rev() {
            for index in 0..=config.num_res_blocks[level] {
                let vb = vb.pp(format!("output_blocks.{}", output_blocks.len()));
                let skip = skip_channels.pop().unwrap_or(mc);
                let out = mult * mc;
                let mut layers = vec![Layer::Res(Box::new(ResBlock::new(
                    channels + skip,
                    out,
                    time_dim,
                    vb.pp("0"),
                )?))];
                channels = out;
                let depth = depths.next().copied().unwrap_or(0);
                if depth > 0 {
                    layers.push(Layer::Transformer(transformer(channels, depth, vb.pp("1"))?));
                }
                if level > 0 && index == config.num_res_blocks[level] {
                    let vb = vb.pp(format!("{}.conv", layers.len()));
                    layers.push(Layer::Upsample(Conv2d::same(channels, channels, 3, 1, vb)?));
                }
                output_blocks.push(Block { layers });
            }
        }
        let out_norm = vb.pp("out.0").group_norm(32, channels, 1e-5)?;
        let out_conv = Conv2d::same(channels, config.out_channels, 3, 1, vb.pp("out.2"))?;
        Ok(UNet {
            config,
            encoder,
            output_blocks,
            out_norm,
            out_conv,
        })
    }

    /// Peak working memory of one forward pass on a [batch, C, height, width] latent, in bytes:
    /// the widest convolution at full latent resolution (the first decoder block, whose input
    /// is the skip concatenated with the level below) unfolded 3×3, plus the activations kept.
    pub fn working_memory(&self, batch: usize, height: usize, width: usize) -> u64 {
        let mult = &self.config.channel_mult;
        let level_0 = self.config.model_channels * mult[0];
        let widest = level_0 + self.config.model_channels * mult.get(1).copied().unwrap_or(mult[0]);
        (batch * height * width * 4 * (9 * widest + 8 * level_0)) as u64
    }

    pub fn forward(&self, input: &UNetInput) -> Result<Tensor> {
        let emb = self
            .encoder
            .embedding(input.timesteps, None, input.y, input.x.dtype())?;
        let context = Context {
            emb: &emb,
            text: input.context,
            patches: input.patches,
        };
        let control = input.control;
        let batch = input.x.dim(0)?;
        // Residuals added to the input blocks may tell the copies of a shared batch apart.
        let may_share = control.is_none_or(|c| c.input.iter().all(Option::is_none));
        let mut skips = Vec::with_capacity(self.output_blocks.len());
        let mut h = self
            .encoder
            .forward(input.x.clone(), &context, may_share, |index, mut h| {
                if let Some(residual) = control.and_then(|c| c.input.get(index)).and_then(Option::as_ref) {
                    h = with_control(h, residual)?;
                }
                if let Some(call) = input.patches {
                    h = call.patches.input_block(call.info, index, h)?;
                }
                skips.push(repeated_to(&h, batch)?);
                if let Some(call) = input.patches {
                    h = call.patches.input_block_after_skip(call.info, index, h)?;
                }
                Ok(h)
            })?;
        if let Some(residual) = control.and_then(|c| c.middle.as_ref()) {
            h = with_control(h, residual)?;
        }
        for (index, block) in self.output_blocks.iter().enumerate() {
            let mut skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
            if let Some(residual) = control.and_then(|c| c.output.get(index)).and_then(Option::as_ref) {
                skip = with_control(skip, residual)?;
            }
            if let Some(call) = input.patches {
                (h, skip) = call.patches.output_block(call.info, index, h, skip)?;
            }
            h = Tensor::cat(&[&h, &skip], 1)?;
            let upsample_to = skips.last().map(|next| (next.dim(2), next.dim(3)));
            let upsample_to = match upsample_to {
                Some((Ok(height), Ok(width))) => Some((height, width)),
                _ => None,
            };
            h = block.forward(h, &context, BlockPosition::Output(index), upsample_to)?;
        }
        let h = candle_nn::ops::silu(&self.out_norm.forward(&h)?)?;
        self.out_conv.forward(&h)
    }
}

/// The next `SpatialTransformer` of a network, numbered in the order they run (ComfyUI's
/// `transformer_index`, which `transformers` counts across the encoder and the decoder).
fn next_transformer(
    config: &UNetConfig,
    transformers: &std::cell::Cell<usize>,
    channels: usize,
    depth: usize,
    vb: Weights,
) -> Result<SpatialTransformer> {
    let index = transformers.replace(transformers.get() + 1);
    SpatialTransformer::new(channels, depth, config.heads.heads(channels), index, config, vb)
}

/// What every layer of one forward pass shares.
pub(super) struct Context<'a> {
    pub(super) emb: &'a Tensor,
    pub(super) text: &'a Tensor,
    pub(super) patches: Option<PatchedCall<'a>>,
}

impl Block {
    fn forward(
        &self,
        mut h: Tensor,
        context: &Context,
        position: BlockPosition,
        upsample_to: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        for layer in &self.layers {
            h = layer.forward(h, context, position, upsample_to)?;
        }
        Ok(h)
    }
}

impl Layer {
    fn forward(
        &self,
        h: Tensor,
        context: &Context,
        position: BlockPosition,
        upsample_to: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        match self {
            Layer::Conv(conv) | Layer::Downsample(conv) => conv.forward(&h),
            Layer::Res(block) => block.forward(&h, context.emb),
            Layer::Transformer(transformer) => transformer.forward(&h, context, position),
            Layer::Upsample(conv) => {
                let (_, _, height, width) = h.dims4()?;
                let (height, width) = upsample_to.unwrap_or((height * 2, width * 2));
                conv.forward(&h.upsample_nearest2d(height, width)?)
            }
        }
    }
}

/// `timestep_embedding`: [cos(t·f), sin(t·f)] with f_i = exp(−ln(10000)·i/half).
pub fn timestep_embedding(timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let factor = -(10000f64.ln()) as f32;
    let frequencies: Vec<f32> = (0..half).map(|i| (factor * i as f32 / half as f32).exp()).collect();
    let frequencies = Tensor::from_vec(frequencies, (1, half), timesteps.device())?;
    let arguments = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&frequencies)?;
    Tensor::cat(&[arguments.cos()?, arguments.sin()?], D::Minus1)
}

struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb_linear: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    fn new(in_channels: usize, out_channels: usize, emb_channels: usize, vb: Weights) -> Result<Self> {
        Ok(ResBlock {
            in_norm: vb.pp("in_layers.0").group_norm(32, in_channels, 1e-5)?,
            in_conv: Conv2d::same(in_channels, out_channels, 3, 1, vb.pp("in_layers.2"))?,
            emb_linear: linear(emb_channels, out_channels, vb.pp("emb_layers.1"))?,
            out_norm: vb.pp("out_layers.0").group_norm(32, out_channels, 1e-5)?,
            out_conv: Conv2d::same(out_channels, out_channels, 3, 1, vb.pp("out_layers.3"))?,
            skip: if in_channels == out_channels {
                None
            } else {
                Some(Conv2d::same(in_channels, out_channels, 1, 1, vb.pp("skip_connection"))?)
            },
        })
    }

    fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let emb = rows_for(emb, x)?;
        let h = self
            .in_conv
            .forward(&candle_nn::ops::silu(&self.in_norm.forward(x)?)?)?;
        let emb = self
            .emb_linear
            .forward(&candle_nn::ops::silu(&emb)?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&emb)?;
        let h = self
            .out_conv
            .forward(&candle_nn::ops::silu(&self.out_norm.forward(&h)?)?)?;
        match &self.skip {
            Some(skip) => skip.forward(x)? + h,
            None => x + h,
        }
    }
}

/// A projection in or out of a transformer: 1×1 convolution (SD1.x) or linear (SD2.x, SDXL).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

struct SpatialTransformer {
    /// Its place among the network's transformers, in running order.
    index: usize,
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn new(
        channels: usize,
        depth: usize,
        heads: usize,
        index: usize,
        config: &UNetConfig,
        vb: Weights,
    ) -> Result<Self> {
        let projection = |vb: Weights| -> Result<Projection> {
            Ok(if config.linear_projection {
                Projection::Linear(linear(channels, channels, vb)?)
            } else {
                Projection::Conv(Conv2d::same(channels, channels, 1, 1, vb)?)
            })
        };
        let blocks = (0..depth)
            .map(|d| {
                TransformerBlock::new(
                    channels,
                    heads,
                    config.context_dim,
                    vb.pp(format!("transformer_blocks.{d}")),
                )
            })
            .collect::<Result<_>>()?;
        Ok(SpatialTransformer {
            index,
            norm: vb.pp("norm").group_norm(32, channels, 1e-6)?,
            proj_in: projection(vb.pp("proj_in"))?,
            blocks,
            proj_out: projection(vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Context, position: BlockPosition) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let mut h = self.norm.forward(x)?;
        if let Projection::Conv(conv) = &self.proj_in {
            h = conv.forward(&h)?;
        }
        h = h.permute((0, 2, 3, 1))?.reshape((batch, height * width, channels))?;
        if let Projection::Linear(linear) = &self.proj_in {
            h = linear.forward(&h)?;
        }
        for (depth, block) in self.blocks.iter().enumerate() {
            let site = context.patches.map(|call| AttentionSite {
                call: call.info,
                block: position,
                block_index: depth,
                transformer_index: self.index,
                heads: block.self_attention.heads,
                dim_head: channels / block.self_attention.heads,
            });
            let patches = context.patches.map(|call| call.patches);
            h = block.forward(&h, context.text, patches.zip(site.as_ref()))?;
        }
        if let Projection::Linear(linear) = &self.proj_out {
            h = linear.forward(&h)?;
        }
        // The first block may have repeated shared rows (see `Encoder::forward`).
        let rows = h.dim(0)?;
        h = h
            .reshape((rows, height, width, channels))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        if let Projection::Conv(conv) = &self.proj_out {
            h = conv.forward(&h)?;
        }
        h + repeated_to(x, rows)?
    }
}

/// The weight matrices of a transformer block, under `transformer_blocks.N.` (the layers
/// LoRAs patch).
pub const TRANSFORMER_BLOCK_MATRICES: [&str; 10] = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
];

struct TransformerBlock {
    norm1: LayerNorm,
    self_attention: CrossAttention,
    norm2: LayerNorm,
    cross_attention: CrossAttention,
    norm3: LayerNorm,
    feed_forward: GegluFeedForward,
}

impl TransformerBlock {
    fn new(channels: usize, heads: usize, context_dim: usize, vb: Weights) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: vb.pp("norm1").layer_norm(channels, 1e-5)?,
            self_attention: CrossAttention::new(channels, channels, heads, vb.pp("attn1"))?,
            norm2: vb.pp("norm2").layer_norm(channels, 1e-5)?,
            cross_attention: CrossAttention::new(channels, context_dim, heads, vb.pp("attn2"))?,
            norm3: vb.pp("norm3").layer_norm(channels, 1e-5)?,
            feed_forward: GegluFeedForward::new(channels, vb.pp("ff"))?,
        })
    }

    /// The block on `x` attending to `text`, with the model's patches where it has some.
    fn forward(&self, x: &Tensor, text: &Tensor, patches: Option<(&UNetPatches, &AttentionSite)>) -> Result<Tensor> {
        let normed = self.norm1.forward(x)?;
        let attended = match patches {
            Some((patches, site)) => {
                let inputs = AttentionInputs {
                    query: normed.clone(),
                    context: normed.clone(),
                    value: normed,
                };
                self.self_attention
                    .forward_patched(AttentionKind::SelfAttention, patches, site, inputs)?
            }
            None => self.self_attention.forward(&normed, &normed)?,
        };
        // Shared rows end here: the cross-attention tells the copies apart.
        let x = repeated_to(&(x + attended)?, text.dim(0)?)?;
        let x = match patches {
            Some((patches, site)) => patches.after_self_attention(site, x)?,
            None => x,
        };
        let normed = self.norm2.forward(&x)?;
        let cross = match patches {
            Some((patches, site)) => {
                let inputs = AttentionInputs {
                    query: normed,
                    context: text.clone(),
                    value: text.clone(),
                };
                self.cross_attention
                    .forward_patched(AttentionKind::CrossAttention, patches, site, inputs)?
            }
            None => self.cross_attention.forward(&normed, text)?,
        };
        let x = (x + cross)?;
        self.feed_forward.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// The transformer block's feed-forward (`FeedForward(glu=True)`): a projection to twice four
/// times the width, one half gating the other through GELU, and a projection back.
pub(crate) struct GegluFeedForward {
    geglu: Linear,
    out: Linear,
}

impl GegluFeedForward {
    /// The layer whose `net.0.proj` and `net.2` lie under `vb`.
    pub(crate) fn new(channels: usize, vb: Weights) -> Result<Self> {
        let inner = channels * 4;
        Ok(GegluFeedForward {
            geglu: linear(channels, inner * 2, vb.pp("net.0.proj"))?,
            out: linear(inner, channels, vb.pp("net.2"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let projected = self.geglu.forward(x)?;
        let half = projected.dim(D::Minus1)? / 2;
        let gated = match with_cpu_f32([&projected], |[values]| cpu::geglu(values, half))? {
            Some(values) => {
                let mut shape = projected.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = half;
                }
                Tensor::from_vec(values, shape, projected.device())?
            }
            None => (projected.narrow(D::Minus1, 0, half)? * projected.narrow(D::Minus1, half, half)?.gelu_erf()?)?,
        };
        self.out.forward(&gated)
    }
}

/// Multi-head attention with bias-free q/k/v projections and a biased output projection.
pub(crate) struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    pub(crate) fn new(query_dim: usize, context_dim: usize, heads: usize, vb: Weights) -> Result<Self> {
        Ok(CrossAttention {
            to_q: linear_no_bias(query_dim, query_dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, query_dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, query_dim, vb.pp("to_v"))?,
            to_out: linear(query_dim, query_dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out.forward(&attention(&q, &k, &v, self.heads, None)?)
    }

    /// The attention with `patches`: its inputs patched, the attention itself replaced where a
    /// replacement is set for this site, its output patched.
    fn forward_patched(
        &self,
        kind: AttentionKind,
        patches: &UNetPatches,
        site: &AttentionSite,
        inputs: AttentionInputs,
    ) -> Result<Tensor> {
        let inputs = patches.attention_inputs(kind, site, inputs)?;
        let q = self.to_q.forward(&inputs.query)?;
        let k = self.to_k.forward(&inputs.context)?;
        let v = self.to_v.forward(&inputs.value)?;
        let attended = match patches.replacement(kind, site.block, site.block_index) {
            Some(replacement) => replacement.attend(site, &q, &k, &v)?,
            None => attention(&q, &k, &v, self.heads, None)?,
        };
        patches.attention_output(kind, site, self.to_out.forward(&attended)?)
    }
}
