//! FLUX.1 (dev, schnell, fill): Black Forest Labs' rectified-flow transformer, written for the
//! BFL key layout that `flux1-dev.safetensors` and city96's GGUF files use (`img_in`,
//! `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `final_layer`, …), with the
//! configuration inferred from the weights: width, depths, heads, guidance embedding (dev) or
//! none (schnell), input channels (64 packed latent channels, 384 for fill).
//!
//! The model works on 2×2 patches of the latent, as ComfyUI's wrapper does: [`Flux::forward`]
//! takes the latent [B, C, H, W] (odd sizes padded), the text tokens (T5) and the pooled vector
//! (CLIP-L), and returns the velocity in the latent's shape. Hook points for later features are
//! explicit inputs: extra latent channels ([`FluxInput::concat`], FLUX fill), an image prompt's
//! attention in the double blocks ([`ImagePromptAttention`], IP-Adapter), ControlNet
//! residuals added after each double and single block ([`FluxControl`]) and replacements of
//! whole blocks ([`FluxInput::patches`], see [`super::dit_patches`]: SkipLayerGuidance).

use candle_core::{Device, Module, Result, Tensor, D};

use crate::architectures::dit_patches::{BlockInputs, BlockOutputs, BlockReplace, BlockSite, DitBlock, DitPatchedCall};
use crate::architectures::unet::timestep_embedding;
use crate::checkpoint::DetectError;
use crate::kernels::attention::attention;
use crate::kernels::linear::{linear, Linear};
use crate::weights::{TensorShapes, Weights};

/// The RoPE axes of every FLUX.1 model: 16 frequencies' worth of the head for the (unused)
/// text axis, 56 for rows, 56 for columns; θ = 10000.
const AXES: [usize; 3] = [16, 56, 56];
const THETA: f64 = 10000.0;
/// Width of the sinusoidal embeddings of timestep and guidance.
const TIME_EMBEDDING: usize = 256;

/// A FLUX model's shape, read from its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxConfig {
    /// Channels of the packed 2×2 patches the model takes (64 = 16·4; fill: 384 = 96·4).
    pub in_channels: usize,
    /// Latent channels the model predicts (16).
    pub out_channels: usize,
    pub hidden_size: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    /// Width of the text tokens (T5-XXL: 4096).
    pub context_dim: usize,
    /// Width of the pooled vector (CLIP-L: 768).
    pub vector_dim: usize,
    pub double_blocks: usize,
    pub single_blocks: usize,
    /// Whether the model embeds a guidance strength (dev) or not (schnell).
    pub guidance_embed: bool,
    pub qkv_bias: bool,
}

impl FluxConfig {
    /// The configuration of the FLUX model under `prefix` (with its dot, or empty).
    pub fn infer(file: &dyn TensorShapes, prefix: &str) -> std::result::Result<Self, DetectError> {
        let shape = |key: &str| {
            file.shape(&format!("{prefix}{key}"))
                .map(<[usize]>::to_vec)
                .ok_or_else(|| DetectError::MissingTensor(format!("{prefix}{key}")))
        };
        let has = |key: &str| file.has(&format!("{prefix}{key}"));
        let matrix = |key: &str| -> std::result::Result<(usize, usize), DetectError> {
            match shape(key)?.as_slice() {
                &[rows, cols] => Ok((rows, cols)),
                other => Err(DetectError::Unrecognised(format!(
                    "'{prefix}{key}' has shape {other:?}"
                ))),
            }
        };
        let (hidden_size, in_channels) = matrix("img_in.weight")?;
        let (_, context_dim) = matrix("txt_in.weight")?;
        let (_, vector_dim) = matrix("vector_in.in_layer.weight")?;
        // A ControlNet built on FLUX has no final layer: it predicts nothing itself.
        let final_outputs = match has("final_layer.linear.weight") {
            true => matrix("final_layer.linear.weight")?.0,
            false => in_channels,
        };
        let (mlp_hidden, _) = matrix("double_blocks.0.img_mlp.0.weight")?;
        let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?
            .first()
            .copied()
            .unwrap_or(0);
        if head_dim != AXES.iter().sum::<usize>() || hidden_size % head_dim != 0 {
            return Err(DetectError::Unrecognised(format!(
                "a FLUX model with heads of {head_dim} in a width of {hidden_size} (FLUX.1 has heads of 128)"
            )));
        }
        let count = |block: &str, key: &str| (0..).take_while(|n| has(&format!("{block}.{n}.{key}"))).count();
        Ok(FluxConfig {
            in_channels,
            out_channels: final_outputs / 4,
            hidden_size,
            heads: hidden_size / head_dim,
            mlp_hidden,
            context_dim,
            vector_dim,
            double_blocks: count("double_blocks", "img_attn.norm.key_norm.scale"),
            single_blocks: count("single_blocks", "norm.key_norm.scale"),
            guidance_embed: has("guidance_in.in_layer.weight"),
            qkv_bias: has("double_blocks.0.img_attn.qkv.bias"),
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.heads
    }
}

/// ControlNet residuals: `double[i]` is added to the image tokens after double block i,
/// `single[i]` to the image part of the tokens after single block i (where given).
#[derive(Default)]
pub struct FluxControl<'a> {
    pub double: &'a [Option<Tensor>],
    pub single: &'a [Option<Tensor>],
}

/// Extra attention for the image tokens of the double blocks (an IP-Adapter's image prompt):
/// given a block's index and its image queries [B, L_img, hidden] (normalised, before the rotary
/// embedding), what to add to that block's image attention output before its projection; `None`
/// leaves the block as it is.
pub trait ImagePromptAttention: Send + Sync {
    fn residual(&self, block: usize, image_queries: &Tensor) -> Result<Option<Tensor>>;
}

/// One call of the model.
pub struct FluxInput<'a> {
    /// The latent [B, C, H, W].
    pub x: &'a Tensor,
    /// σ per batch item [B] (FLUX's timestep is σ itself).
    pub timesteps: &'a Tensor,
    /// Text tokens [B, L, context_dim].
    pub context: &'a Tensor,
    /// The pooled text vector [B, ≥ vector_dim].
    pub y: &'a Tensor,
    /// The guidance strength per item [B] (dev models; ignored by schnell).
    pub guidance: Option<&'a Tensor>,
    /// Channels appended to the latent before patching (FLUX fill: masked image and mask).
    pub concat: Option<&'a Tensor>,
    /// Added to every attention's scores [L, L] over the text tokens, then the image tokens
    /// (StyleModelApply's attention bias).
    pub attention_mask: Option<&'a Tensor>,
    pub control: FluxControl<'a>,
    pub image_prompt: Option<&'a dyn ImagePromptAttention>,
    /// Replacements of double and single blocks, with the call's facts.
    pub patches: Option<DitPatchedCall<'a>>,
    /// Reference latents [B, C, h, w] (FLUX Kontext): their tokens follow the image's, at
    /// rotary positions `reference_method` gives; only the image's tokens are predicted.
    pub reference_latents: &'a [Tensor],
    pub reference_method: ReferenceMethod,
}

/// Where reference latents sit in the rotary positions (ComfyUI's `ref_latents_method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReferenceMethod {
    /// At index 1, each beside the ones before it: to the right or below, whichever keeps
    /// their layout squarer.
    #[default]
    Offset,
    /// Each at its own index (1, 2, …) from the origin.
    Index,
    /// At index 0, each diagonally past the image and the ones before it (UXO/UNO).
    Uxo,
}

/// The rotary positions (index, row, column) of an image's 2×2 patches: `rows`×`cols` of them
/// from (`row_offset`, `col_offset`) (ComfyUI's `process_img` ids).
fn patch_positions(rows: usize, cols: usize, index: f32, row_offset: usize, col_offset: usize) -> Vec<[f32; 3]> {
    (0..rows * cols)
        .map(|p| [index, (p / cols + row_offset) as f32, (p % cols + col_offset) as f32])
        .collect()
}

/// The positions of each reference's patches after an image of `rows`×`cols` patches, as
/// ComfyUI's `Flux._forward` places them (offsets counted in latent pixels, then halved
/// rounding up).
fn reference_positions(
    references: &[(usize, usize)],
    rows: usize,
    cols: usize,
    method: ReferenceMethod,
) -> Vec<Vec<[f32; 3]>> {
    let (mut height, mut width, mut index) = (0, 0, 0);
    references
        .iter()
        .map(|&(ref_height, ref_width)| {
            let (row_offset, col_offset) = match method {
                ReferenceMethod::Index => {
                    index += 1;
                    (0, 0)
                }
                ReferenceMethod::Uxo => {
                    index = 0;
                    let offsets = (rows * 2 + height, cols * 2 + width);
                    height += ref_height;
                    width += ref_width;
                    offsets
                }
                ReferenceMethod::Offset => {
                    index = 1;
                    let offsets = if ref_height + height > ref_width + width {
                        (0, width)
                    } else {
                        (height, 0)
                    };
                    height = height.max(ref_height + offsets.0);
                    width = width.max(ref_width + offsets.1);
                    offsets
                }
            };
            patch_positions(
                ref_height.div_ceil(2),
                ref_width.div_ceil(2),
                index as f32,
                row_offset.div_ceil(2),
                col_offset.div_ceil(2),
            )
        })
        .collect()
}

/// `tokens` with `residual` added to its first tokens (a ControlNet's residual covers the
/// image's tokens, not the references' after them).
fn add_to_leading(tokens: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let (total, covered) = (tokens.dim(1)?, residual.dim(1)?);
    if covered >= total {
        return tokens.broadcast_add(residual);
    }
    let leading = tokens.narrow(1, 0, covered)?.broadcast_add(residual)?;
    Tensor::cat(&[&leading, &tokens.narrow(1, covered, total - covered)?], 1)
}

/// The FLUX transformer.
pub struct Flux {
    config: FluxConfig,
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    double_blocks: Vec<DoubleStreamBlock>,
    single_blocks: Vec<SingleStreamBlock>,
    /// The final norm's modulation and projection (absent in a ControlNet's copy of FLUX).
    final_layer: Option<(Linear, Linear)>,
}

/// A call's tokens before the blocks: the image's 2×2 patches through `img_in` (`rows` ×
/// `cols` of them), the text through `txt_in`, and the vector of timestep, guidance and pooled
/// text that modulates every block.
pub struct FluxTokens {
    /// The image's patches, then the reference latents'.
    pub img: Tensor,
    pub txt: Tensor,
    pub vec: Tensor,
    /// The image's patches (its tokens are the first rows·cols of `img`).
    pub rows: usize,
    pub cols: usize,
    /// The rotary position of each token of `img`.
    pub positions: Vec<[f32; 3]>,
}

impl Flux {
    pub fn new(config: FluxConfig, weights: Weights) -> Result<Self> {
        let hidden = config.hidden_size;
        let final_layer = (
            linear(hidden, 2 * hidden, weights.pp("final_layer.adaLN_modulation.1"))?,
            linear(hidden, 4 * config.out_channels, weights.pp("final_layer.linear"))?,
        );
        Ok(Flux {
            final_layer: Some(final_layer),
            ..Self::without_final_layer(config, weights)?
        })
    }

    /// The transformer without its final layer, as FLUX ControlNets copy it (their depths are
    /// the config's).
    pub fn without_final_layer(config: FluxConfig, weights: Weights) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(Flux {
            img_in: linear(config.in_channels, hidden, weights.pp("img_in"))?,
            txt_in: linear(config.context_dim, hidden, weights.pp("txt_in"))?,
            time_in: MlpEmbedder::new(TIME_EMBEDDING, hidden, weights.pp("time_in"))?,
            vector_in: MlpEmbedder::new(config.vector_dim, hidden, weights.pp("vector_in"))?,
            guidance_in: match config.guidance_embed {
                true => Some(MlpEmbedder::new(TIME_EMBEDDING, hidden, weights.pp("guidance_in"))?),
                false => None,
            },
            double_blocks: (0..config.double_blocks)
                .map(|n| DoubleStreamBlock::new(&config, weights.pp(format!("double_blocks.{n}"))))
                .collect::<Result<_>>()?,
            single_blocks: (0..config.single_blocks)
                .map(|n| SingleStreamBlock::new(&config, weights.pp(format!("single_blocks.{n}"))))
                .collect::<Result<_>>()?,
            final_layer: None,
            config,
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// Bytes of activations one call on a [batch, C, height, width] latent needs at most, with
    /// T5's 256 or 512 tokens: the widest projection of every token, a few times over.
    pub fn working_memory(&self, batch: usize, height: usize, width: usize) -> u64 {
        const TEXT_TOKENS: usize = 512;
        let tokens = height.div_ceil(2) * width.div_ceil(2) + TEXT_TOKENS;
        let widest = 3 * self.config.hidden_size + self.config.mlp_hidden;
        (batch * tokens * widest * 4 * 4) as u64
    }

    /// The tokens of a call (its latent with the extra channels, text, timestep, guidance and
    /// pooled text) before the blocks.
    pub fn embed(&self, input: &FluxInput) -> Result<FluxTokens> {
        let x = match input.concat {
            Some(extra) => Tensor::cat(&[input.x, extra], 1)?,
            None => input.x.clone(),
        };
        let (_, _, height, width) = x.dims4()?;
        let (rows, cols) = (height.div_ceil(2), width.div_ceil(2));
        let patches = |latent: &Tensor| patchify(&pad_circularly(&pad_circularly(latent, 2)?, 3)?);
        let mut img = patches(&x)?;
        let mut positions = patch_positions(rows, cols, 0.0, 0, 0);
        if !input.reference_latents.is_empty() {
            let sizes = input
                .reference_latents
                .iter()
                .map(|latent| Ok((latent.dim(2)?, latent.dim(3)?)))
                .collect::<Result<Vec<_>>>()?;
            let mut parts = vec![img];
            for (latent, placed) in
                input
                    .reference_latents
                    .iter()
                    .zip(reference_positions(&sizes, rows, cols, input.reference_method))
            {
                parts.push(patches(latent)?);
                positions.extend(placed);
            }
            img = Tensor::cat(&parts, 1)?;
        }
        let mut vec = self
            .time_in
            .forward(&timestep_embedding(&(input.timesteps * 1000.0)?, TIME_EMBEDDING)?)?;
        if let (Some(guidance_in), Some(guidance)) = (&self.guidance_in, input.guidance) {
            vec = (vec + guidance_in.forward(&timestep_embedding(&(guidance * 1000.0)?, TIME_EMBEDDING)?)?)?;
        }
        let y = input.y.narrow(1, 0, self.config.vector_dim)?;
        Ok(FluxTokens {
            img: self.img_in.forward(&img)?,
            txt: self.txt_in.forward(input.context)?,
            vec: (vec + self.vector_in.forward(&y)?)?,
            rows,
            cols,
            positions,
        })
    }

    /// The predicted velocity [B, out_channels, H, W].
    pub fn forward(&self, input: &FluxInput) -> Result<Tensor> {
        let Some((final_modulation, final_linear)) = &self.final_layer else {
            candle_core::bail!("this FLUX transformer has no final layer (it belongs to a ControlNet)");
        };
        let (batch, _, height, width) = input.x.dims4()?;
        let FluxTokens {
            mut img,
            mut txt,
            vec,
            rows,
            cols,
            positions,
        } = self.embed(input)?;
        let txt_length = txt.dim(1)?;
        let rope = Rope::new(txt_length, &positions, img.device())?;
        for n in 0..self.double_blocks.len() {
            (img, txt) = self.double_block(n, img, txt, &vec, &rope, input)?;
            if let Some(Some(residual)) = input.control.double.get(n) {
                img = add_to_leading(&img, residual)?;
            }
        }
        let mut tokens = Tensor::cat(&[&txt, &img], 1)?;
        for n in 0..self.single_blocks.len() {
            tokens = self.single_block(n, tokens, txt_length, &vec, &rope, input)?;
            if let Some(Some(residual)) = input.control.single.get(n) {
                let image = add_to_leading(&tokens.narrow(1, txt_length, tokens.dim(1)? - txt_length)?, residual)?;
                tokens = Tensor::cat(&[&tokens.narrow(1, 0, txt_length)?, &image], 1)?;
            }
        }
        let img = tokens.narrow(1, txt_length, rows * cols)?;
        let modulation = final_modulation.forward(&vec.silu()?)?.chunk(2, 1)?;
        let (shift, scale) = (modulation[0].unsqueeze(1)?, modulation[1].unsqueeze(1)?);
        let img = modulate(&layer_norm(&img)?, &shift, &scale)?;
        let out = final_linear.forward(&img)?;
        unpatchify(&out, batch, self.config.out_channels, rows, cols)?
            .narrow(2, 0, height)?
            .narrow(3, 0, width)
    }

    /// The image tokens after each double block and after each single block (their image part),
    /// as a FLUX ControlNet reads them; no patches or image prompts apply.
    pub fn block_outputs(&self, tokens: FluxTokens) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let FluxTokens {
            mut img,
            mut txt,
            vec,
            rows,
            cols,
            positions,
        } = tokens;
        let txt_length = txt.dim(1)?;
        let rope = Rope::new(txt_length, &positions, img.device())?;
        let mut doubles = Vec::with_capacity(self.double_blocks.len());
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &vec, &rope, None, None)?;
            doubles.push(img.clone());
        }
        let mut tokens = Tensor::cat(&[&txt, &img], 1)?;
        let mut singles = Vec::with_capacity(self.single_blocks.len());
        for block in &self.single_blocks {
            tokens = block.forward(&tokens, &vec, &rope, None)?;
            singles.push(tokens.narrow(1, txt_length, rows * cols)?);
        }
        Ok((doubles, singles))
    }

    /// Double block `n` on the image and text tokens, or its replacement where the call has one.
    fn double_block(
        &self,
        n: usize,
        img: Tensor,
        txt: Tensor,
        vec: &Tensor,
        rope: &Rope,
        input: &FluxInput,
    ) -> Result<(Tensor, Tensor)> {
        let block = &self.double_blocks[n];
        let image_prompt = input.image_prompt.map(|hook| (hook, n));
        let Some((replacement, site)) = replacement_of(input.patches, DitBlock::Double(n), txt.dim(1)?) else {
            return block.forward(&img, &txt, vec, rope, input.attention_mask, image_prompt);
        };
        let no_text = || candle_core::Error::Msg(format!("a replacement of FLUX double block {n} gave no text tokens"));
        let original = |inputs: BlockInputs| -> Result<BlockOutputs> {
            let txt = inputs.txt.ok_or_else(no_text)?;
            let (img, txt) = block.forward(&inputs.img, &txt, &inputs.vec, rope, input.attention_mask, image_prompt)?;
            Ok(BlockOutputs { img, txt: Some(txt) })
        };
        let inputs = BlockInputs {
            img,
            txt: Some(txt),
            vec: vec.clone(),
        };
        let out = replacement.replace(&site, inputs, &original)?;
        Ok((out.img, out.txt.ok_or_else(no_text)?))
    }

    /// Single block `n` on all tokens (the first `txt_length` text), or its replacement where the
    /// call has one.
    fn single_block(
        &self,
        n: usize,
        tokens: Tensor,
        txt_length: usize,
        vec: &Tensor,
        rope: &Rope,
        input: &FluxInput,
    ) -> Result<Tensor> {
        let block = &self.single_blocks[n];
        let Some((replacement, site)) = replacement_of(input.patches, DitBlock::Single(n), txt_length) else {
            return block.forward(&tokens, vec, rope, input.attention_mask);
        };
        let original = |inputs: BlockInputs| -> Result<BlockOutputs> {
            Ok(BlockOutputs {
                img: block.forward(&inputs.img, &inputs.vec, rope, input.attention_mask)?,
                txt: None,
            })
        };
        let inputs = BlockInputs {
            img: tokens,
            txt: None,
            vec: vec.clone(),
        };
        Ok(replacement.replace(&site, inputs, &original)?.img)
    }
}

/// The replacement of `block` in the call's patches, with where it runs.
fn replacement_of<'a>(
    patches: Option<DitPatchedCall<'a>>,
    block: DitBlock,
    txt_tokens: usize,
) -> Option<(&'a dyn BlockReplace, BlockSite<'a>)> {
    let call = patches?;
    let replacement = call.patches.replacement(block)?;
    let site = BlockSite {
        block,
        txt_tokens,
        call: call.info,
    };
    Some((replacement, site))
}

/// `x` made even along `dim` by repeating its first slice after its last (ComfyUI pads with
/// PyTorch's circular mode).
pub(crate) fn pad_circularly(x: &Tensor, dim: usize) -> Result<Tensor> {
    if x.dim(dim)? % 2 == 0 {
        return Ok(x.clone());
    }
    Tensor::cat(&[x, &x.narrow(dim, 0, 1)?], dim)
}

/// [B, C, 2R, 2C'] → [B, R·C', C·4] (channel, then patch row, then patch column).
pub(crate) fn patchify(x: &Tensor) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    let (rows, cols) = (height / 2, width / 2);
    x.reshape((batch, channels, rows, 2, cols, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((batch, rows * cols, channels * 4))
}

/// The inverse of [`patchify`].
fn unpatchify(x: &Tensor, batch: usize, channels: usize, rows: usize, cols: usize) -> Result<Tensor> {
    x.reshape((batch, rows, cols, channels, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((batch, channels, rows * 2, cols * 2))
}

/// LayerNorm over the last dimension without affine parameters, ε = 1e-6.
pub(crate) fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(variance + 1e-6)?.sqrt()?)
}

/// `(1 + scale)·x + shift`, the modulation parameters [B, 1, hidden] broadcast over tokens.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// RMSNorm over the last dimension with a learnt `scale`, ε = 1e-6.
pub(crate) struct RmsNorm {
    pub(crate) scale: Tensor,
}

impl RmsNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
        x.broadcast_div(&rms)?.broadcast_mul(&self.scale)
    }
}

/// Linear, SiLU, linear: the timestep, guidance and vector embedders (FLUX's `in_layer` and
/// `out_layer`, SD3's `mlp.0` and `mlp.2`).
pub(crate) struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn new(in_features: usize, hidden: usize, weights: Weights) -> Result<Self> {
        Self::named(in_features, hidden, weights, ["in_layer", "out_layer"])
    }

    /// The embedder whose layers are `names` under `weights`.
    pub(crate) fn named(in_features: usize, hidden: usize, weights: Weights, names: [&str; 2]) -> Result<Self> {
        Ok(MlpEmbedder {
            in_layer: linear(in_features, hidden, weights.pp(names[0]))?,
            out_layer: linear(hidden, hidden, weights.pp(names[1]))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)
    }
}

/// The rotary position embedding of the text tokens (all at position 0) followed by the image
/// tokens (row, column): per token and frequency pair, cos and sin [L, head_dim / 2].
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The angles of `txt_length` text tokens (at the origin) and of image tokens at
    /// `image_positions`.
    fn new(txt_length: usize, image_positions: &[[f32; 3]], device: &Device) -> Result<Self> {
        let frequencies: Vec<f64> = AXES
            .iter()
            .flat_map(|&dim| (0..dim / 2).map(move |i| 1.0 / THETA.powf((2 * i) as f64 / dim as f64)))
            .collect();
        let positions = std::iter::repeat_n([0.0f32; 3], txt_length).chain(image_positions.iter().copied());
        let pairs = frequencies.len();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for position in positions {
            let mut pair = 0;
            for (axis, &dim) in AXES.iter().enumerate() {
                for _ in 0..dim / 2 {
                    // As PyTorch: f32 positions times f64 frequencies, cos and sin in f64.
                    let angle = f64::from(position[axis]) * frequencies[pair];
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                    pair += 1;
                }
            }
        }
        let length = txt_length + image_positions.len();
        Ok(Rope {
            cos: Tensor::from_vec(cos, (length, pairs), device)?,
            sin: Tensor::from_vec(sin, (length, pairs), device)?,
        })
    }

    /// `x` [B, L, H, D] with each pair (x₀, x₁) of every head rotated by its token's angle:
    /// (cos·x₀ − sin·x₁, sin·x₀ + cos·x₁).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, length, heads, head_dim) = x.dims4()?;
        let pairs = x.reshape((batch, length, heads, head_dim / 2, 2))?;
        let (x0, x1) = (pairs.narrow(4, 0, 1)?.squeeze(4)?, pairs.narrow(4, 1, 1)?.squeeze(4)?);
        let cos = self.cos.reshape((1, length, 1, head_dim / 2))?;
        let sin = self.sin.reshape((1, length, 1, head_dim / 2))?;
        let out0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let out1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Tensor::stack(&[out0, out1], 4)?.reshape((batch, length, heads, head_dim))
    }
}

/// Query/key normalisation of an attention layer (`norm.query_norm`, `norm.key_norm`).
struct QkNorm {
    query: RmsNorm,
    key: RmsNorm,
}

impl QkNorm {
    fn new(head_dim: usize, weights: &Weights) -> Result<Self> {
        Ok(QkNorm {
            query: RmsNorm {
                scale: weights.get(head_dim, "norm.query_norm.scale")?,
            },
            key: RmsNorm {
                scale: weights.get(head_dim, "norm.key_norm.scale")?,
            },
        })
    }

    /// Queries, keys and values [B, L, H, D] of `qkv` [B, L, 3·H·D] (in that order), queries and
    /// keys normalised.
    fn split(&self, qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, length, width) = qkv.dims3()?;
        let head_dim = width / 3 / heads;
        let parts = qkv.reshape((batch, length, 3, heads, head_dim))?;
        let part = |i| parts.narrow(2, i, 1)?.squeeze(2);
        Ok((self.query.forward(&part(0)?)?, self.key.forward(&part(1)?)?, part(2)?))
    }
}

/// Attention of `q`, `k`, `v` [B, L, H, D] with the rotary embedding and an optional additive
/// mask [L, L]; [B, L, H·D].
fn rope_attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope, mask: Option<&Tensor>) -> Result<Tensor> {
    let (batch, length, heads, head_dim) = q.dims4()?;
    let flat = |t: Tensor| t.reshape((batch, length, heads * head_dim));
    attention(
        &flat(rope.apply(q)?)?,
        &flat(rope.apply(k)?)?,
        &flat(v.clone())?,
        heads,
        mask,
    )
}

/// The `count` modulation vectors `lin` makes of `vec` (a double block's stream: shift, scale and
/// gate of its attention and of its MLP), each [B, 1, hidden].
pub(crate) fn modulation(lin: &Linear, vec: &Tensor, count: usize) -> Result<Vec<Tensor>> {
    lin.forward(&vec.silu()?)?
        .unsqueeze(1)?
        .chunk(count, D::Minus1)?
        .into_iter()
        .map(|t| t.contiguous())
        .collect()
}

/// One stream (image or text) of a double block.
struct Stream {
    modulation: Linear,
    qkv: Linear,
    norm: QkNorm,
    proj: Linear,
    mlp_in: Linear,
    mlp_out: Linear,
}

impl Stream {
    fn new(config: &FluxConfig, weights: Weights, name: &str) -> Result<Self> {
        let hidden = config.hidden_size;
        let attention = weights.pp(format!("{name}_attn"));
        let qkv = if config.qkv_bias {
            linear(hidden, 3 * hidden, attention.pp("qkv"))?
        } else {
            crate::kernels::linear::linear_no_bias(hidden, 3 * hidden, attention.pp("qkv"))?
        };
        Ok(Stream {
            modulation: linear(hidden, 6 * hidden, weights.pp(format!("{name}_mod.lin")))?,
            qkv,
            norm: QkNorm::new(config.head_dim(), &attention)?,
            proj: linear(hidden, hidden, attention.pp("proj"))?,
            mlp_in: linear(hidden, config.mlp_hidden, weights.pp(format!("{name}_mlp.0")))?,
            mlp_out: linear(config.mlp_hidden, hidden, weights.pp(format!("{name}_mlp.2")))?,
        })
    }

    /// The modulation vectors and this stream's normalised queries, keys and values.
    fn prepare(&self, x: &Tensor, vec: &Tensor, heads: usize) -> Result<(Vec<Tensor>, (Tensor, Tensor, Tensor))> {
        let modulation = modulation(&self.modulation, vec, 6)?;
        let modulated = modulate(&layer_norm(x)?, &modulation[0], &modulation[1])?;
        let qkv = self.norm.split(&self.qkv.forward(&modulated)?, heads)?;
        Ok((modulation, qkv))
    }

    /// `x` after its attention output and its MLP, gated.
    fn finish(&self, x: &Tensor, attention: &Tensor, modulation: &[Tensor]) -> Result<Tensor> {
        let x = (x + self.proj.forward(attention)?.broadcast_mul(&modulation[2])?)?;
        let hidden = modulate(&layer_norm(&x)?, &modulation[3], &modulation[4])?;
        let mlp = self.mlp_out.forward(&self.mlp_in.forward(&hidden)?.gelu()?)?;
        x + mlp.broadcast_mul(&modulation[5])?
    }
}

/// Image and text tokens, each with their own weights, attending jointly (text first).
struct DoubleStreamBlock {
    img: Stream,
    txt: Stream,
    heads: usize,
}

impl DoubleStreamBlock {
    fn new(config: &FluxConfig, weights: Weights) -> Result<Self> {
        Ok(DoubleStreamBlock {
            img: Stream::new(config, weights.clone(), "img")?,
            txt: Stream::new(config, weights, "txt")?,
            heads: config.heads,
        })
    }

    /// `mask`: added to the attention scores; `image_prompt`: the image-prompt hook and this
    /// block's index.
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        image_prompt: Option<(&dyn ImagePromptAttention, usize)>,
    ) -> Result<(Tensor, Tensor)> {
        let (img_modulation, img_qkv) = self.img.prepare(img, vec, self.heads)?;
        let (txt_modulation, txt_qkv) = self.txt.prepare(txt, vec, self.heads)?;
        // The queries, keys and values are dropped once attended (peak memory).
        let (out, prompt_residual) = {
            let ((img_q, img_k, img_v), (txt_q, txt_k, txt_v)) = (img_qkv, txt_qkv);
            let prompt_residual = match image_prompt {
                Some((hook, block)) => {
                    let (batch, length, heads, head_dim) = img_q.dims4()?;
                    hook.residual(block, &img_q.reshape((batch, length, heads * head_dim))?)?
                }
                None => None,
            };
            let joint = |t: &Tensor, i: &Tensor| Tensor::cat(&[t, i], 1);
            let out = rope_attention(
                &joint(&txt_q, &img_q)?,
                &joint(&txt_k, &img_k)?,
                &joint(&txt_v, &img_v)?,
                rope,
                mask,
            )?;
            (out, prompt_residual)
        };
        let txt_length = txt.dim(1)?;
        let txt_attention = out.narrow(1, 0, txt_length)?;
        let img_attention = out.narrow(1, txt_length, img.dim(1)?)?;
        let img_attention = match prompt_residual {
            Some(residual) => (img_attention + residual)?,
            None => img_attention,
        };
        Ok((
            self.img.finish(img, &img_attention, &img_modulation)?,
            self.txt.finish(txt, &txt_attention, &txt_modulation)?,
        ))
    }
}

/// All tokens with shared weights: attention and MLP computed side by side from one
/// projection, joined by one output projection.
struct SingleStreamBlock {
    modulation: Linear,
    linear1: Linear,
    linear2: Linear,
    norm: QkNorm,
    hidden: usize,
    heads: usize,
}

impl SingleStreamBlock {
    fn new(config: &FluxConfig, weights: Weights) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(SingleStreamBlock {
            modulation: linear(hidden, 3 * hidden, weights.pp("modulation.lin"))?,
            linear1: linear(hidden, 3 * hidden + config.mlp_hidden, weights.pp("linear1"))?,
            linear2: linear(hidden + config.mlp_hidden, hidden, weights.pp("linear2"))?,
            norm: QkNorm::new(config.head_dim(), &weights)?,
            hidden,
            heads: config.heads,
        })
    }

    /// Intermediates are dropped as soon as they are used: the widest ones (the projection,
    /// 3·hidden + mlp wide, and the joined attention and MLP outputs) decide the peak memory,
    /// so the projection is gone before the attention runs.
    fn forward(&self, x: &Tensor, vec: &Tensor, rope: &Rope, mask: Option<&Tensor>) -> Result<Tensor> {
        let modulation = modulation(&self.modulation, vec, 3)?;
        let (qkv, mlp) = {
            let projected = self
                .linear1
                .forward(&modulate(&layer_norm(x)?, &modulation[0], &modulation[1])?)?;
            let width = projected.dim(D::Minus1)?;
            let mlp = projected
                .narrow(D::Minus1, 3 * self.hidden, width - 3 * self.hidden)?
                .gelu()?;
            (projected.narrow(D::Minus1, 0, 3 * self.hidden)?.contiguous()?, mlp)
        };
        let attention = {
            let (q, k, v) = self.norm.split(&qkv, self.heads)?;
            drop(qkv);
            rope_attention(&q, &k, &v, rope, mask)?
        };
        let joined = Tensor::cat(&[&attention, &mlp], D::Minus1)?;
        drop((attention, mlp));
        let out = self.linear2.forward(&joined)?;
        drop(joined);
        x + out.broadcast_mul(&modulation[2])?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (index, row, column) of each patch of a `rows`×`cols` grid from `offset`.
    fn grid(index: f32, rows: usize, cols: usize, offset: (usize, usize)) -> Vec<[f32; 3]> {
        let mut positions = Vec::new();
        for row in 0..rows {
            for col in 0..cols {
                positions.push([index, (row + offset.0) as f32, (col + offset.1) as f32]);
            }
        }
        positions
    }

    /// Two references (6×10 and 4×4 latent pixels) after an 8×8 latent (4×4 patches), placed
    /// by hand as ComfyUI's `Flux._forward` does.
    #[test]
    fn references_are_placed_as_comfyui_places_them() {
        let references = [(6, 10), (4, 4)];
        // Offset: the first at the origin (it is wider than tall), the second below it (the
        // layout so far is 6×10: below keeps it squarer), both at index 1.
        assert_eq!(
            reference_positions(&references, 4, 4, ReferenceMethod::Offset),
            vec![grid(1.0, 3, 5, (0, 0)), grid(1.0, 2, 2, (3, 0))]
        );
        // Index: each at the origin, at indices 1 and 2.
        assert_eq!(
            reference_positions(&references, 4, 4, ReferenceMethod::Index),
            vec![grid(1.0, 3, 5, (0, 0)), grid(2.0, 2, 2, (0, 0))]
        );
        // UXO: index 0, past the image (8 latent pixels = 4 patches) and the first reference.
        assert_eq!(
            reference_positions(&references, 4, 4, ReferenceMethod::Uxo),
            vec![grid(0.0, 3, 5, (4, 4)), grid(0.0, 2, 2, (7, 9))]
        );
        // Odd sizes round up, as the patches are padded.
        assert_eq!(
            reference_positions(&[(5, 3)], 4, 4, ReferenceMethod::Offset),
            vec![grid(1.0, 3, 2, (0, 0))]
        );
    }
}
