//! Stable Diffusion 3 and 3.5's MMDiT (medium, large, large turbo): a rectified-flow transformer
//! whose joint blocks give the image and text tokens their own weights and one attention over
//! both, written for the layout of Stability's files and ComfyUI's (`x_embedder`, `pos_embed`,
//! `joint_blocks.N.{context,x}_block`, `final_layer`), with the configuration read from the
//! weights: depth from the patch embedding (width 64·depth, as many heads of 64), patch size,
//! the position table's size, the class-vector and text widths, RMS query/key norms (3.5) and
//! the image blocks with a second self-attention (3.5 medium).
//!
//! [`Mmdit::forward`] takes the latent [B, C, H, W] (odd sizes padded circularly), the
//! timestep (σ·1000), the text tokens and the pooled vector, and returns the velocity in the
//! latent's shape. Hook points are explicit inputs: ControlNet residuals added to the image
//! tokens after each block ([`MmditInput::control`]) and replacements of whole blocks
//! ([`MmditInput::patches`], ComfyUI's `("double_block", i)`: SkipLayerGuidanceSD3).

use candle_core::{Module, Result, Tensor};

use crate::architectures::dit_patches::{BlockInputs, BlockOutputs, BlockSite, DitBlock, DitPatchedCall};
use crate::architectures::flux::{layer_norm, modulate, modulation, pad_circularly, patchify, MlpEmbedder, RmsNorm};
use crate::architectures::unet::timestep_embedding;
use crate::checkpoint::DetectError;
use crate::kernels::attention::attention;
use crate::kernels::linear::{linear, Linear};
use crate::weights::{TensorShapes, WeightMatrix, Weights};

/// Width of each head (MMDiT's width is 64 per block of depth).
pub(crate) const HEAD_DIM: usize = 64;
/// Width of the sinusoidal timestep embedding.
pub(crate) const TIME_EMBEDDING: usize = 256;
/// The layers of the timestep and pooled-vector embedders (`mlp.0`, SiLU, `mlp.2`).
pub(crate) const EMBEDDER_LAYERS: [&str; 2] = ["0", "2"];
/// The patch size this implementation reads (every SD3 and SD3.5 model's).
pub(crate) const PATCH: usize = 2;

/// An MMDiT's shape, read from its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct MmditConfig {
    /// Latent channels the model takes (16).
    pub in_channels: usize,
    /// Latent channels the model predicts (16).
    pub out_channels: usize,
    /// Blocks of the network's width: 64·depth wide, `depth` heads (SD3 medium 24, 3.5 large 38).
    pub depth: usize,
    /// Joint blocks (the depth, for every released model).
    pub blocks: usize,
    /// Width of the pooled vector (CLIP-L ⧺ CLIP-G: 2048), if the model embeds one.
    pub adm_in_channels: Option<usize>,
    /// Width of the text tokens (4096), if the model embeds them.
    pub context_dim: Option<usize>,
    /// Side of the square table of position embeddings, cropped around its centre per latent.
    pub pos_embed_max_size: usize,
    /// Whether queries and keys are RMS-normalised per head (SD3.5).
    pub qk_norm: bool,
    /// The blocks whose image stream has a second self-attention of its own (SD3.5 medium).
    pub x_block_self_attention: Vec<usize>,
    /// Whether the network ends in the final layer that predicts the velocity (every model; an
    /// SD3 ControlNet's trunk has none, and its last text block is a whole one).
    pub final_layer: bool,
}

impl MmditConfig {
    /// The configuration of the MMDiT under `prefix` (with its dot, or empty), as ComfyUI's
    /// `detect_unet_config` reads it.
    pub fn infer(file: &dyn TensorShapes, prefix: &str) -> std::result::Result<Self, DetectError> {
        let shape = |key: &str| {
            file.shape(&format!("{prefix}{key}"))
                .map(<[usize]>::to_vec)
                .ok_or_else(|| DetectError::MissingTensor(format!("{prefix}{key}")))
        };
        let has = |key: &str| file.has(&format!("{prefix}{key}"));
        let patch_embedding = shape("x_embedder.proj.weight")?;
        let &[hidden, in_channels, patch, _] = patch_embedding.as_slice() else {
            return Err(DetectError::Unrecognised(format!(
                "'{prefix}x_embedder.proj.weight' has shape {patch_embedding:?}"
            )));
        };
        if patch != PATCH || hidden % HEAD_DIM != 0 {
            return Err(DetectError::Unrecognised(format!(
                "an MMDiT with patches of {patch} and width {hidden} (SD3 has patches of 2 and a width of 64·depth)"
            )));
        }
        if has("context_processor.layers.0.attn.qkv.weight") || has("register") {
            return Err(DetectError::NotYetSupported(
                "MMDiT with a context processor or registers",
            ));
        }
        let final_layer = has("final_layer.linear.weight");
        let out_channels = match file
            .shape(&format!("{prefix}final_layer.linear.weight"))
            .and_then(<[usize]>::first)
        {
            Some(&rows) => rows / (PATCH * PATCH),
            None => in_channels,
        };
        let positions = shape("pos_embed")?;
        let pos_embed_max_size = (positions.get(1).copied().unwrap_or(0) as f64).sqrt().round() as usize;
        let blocks = (0..)
            .take_while(|n| has(&format!("joint_blocks.{n}.x_block.attn.qkv.weight")))
            .count();
        let x_block_self_attention = (0..blocks)
            .filter(|n| has(&format!("joint_blocks.{n}.x_block.attn2.qkv.weight")))
            .collect();
        Ok(MmditConfig {
            in_channels,
            out_channels,
            depth: hidden / HEAD_DIM,
            blocks,
            adm_in_channels: file
                .shape(&format!("{prefix}y_embedder.mlp.0.weight"))
                .and_then(|s| s.get(1).copied()),
            context_dim: file
                .shape(&format!("{prefix}context_embedder.weight"))
                .and_then(|s| s.get(1).copied()),
            pos_embed_max_size,
            qk_norm: has("joint_blocks.0.context_block.attn.ln_q.weight"),
            x_block_self_attention,
            final_layer,
        })
    }

    pub fn hidden_size(&self) -> usize {
        HEAD_DIM * self.depth
    }

    pub fn heads(&self) -> usize {
        self.depth
    }
}

/// One call of the model.
pub struct MmditInput<'a> {
    /// The latent [B, C, H, W].
    pub x: &'a Tensor,
    /// The timestep per batch item [B] (σ·1000).
    pub timesteps: &'a Tensor,
    /// Text tokens [B, L, context_dim].
    pub context: &'a Tensor,
    /// The pooled text vector [B, adm_in_channels].
    pub y: Option<&'a Tensor>,
    /// `control[i]` is added to the image tokens after joint block i, where given.
    pub control: &'a [Option<Tensor>],
    /// Replacements of joint blocks (`DitBlock::Double(i)`), with the call's facts.
    pub patches: Option<DitPatchedCall<'a>>,
}

/// The MMDiT.
pub struct Mmdit {
    config: MmditConfig,
    x_embedder: PatchEmbedding,
    /// The position table [1, max·max, hidden], read in place (its crops are copied per call).
    pos_embed: WeightMatrix,
    t_embedder: MlpEmbedder,
    y_embedder: Option<MlpEmbedder>,
    context_embedder: Option<Linear>,
    blocks: Vec<JointBlock>,
    /// The final layer's modulation and projection, where the network has one.
    final_layer: Option<(Linear, Linear)>,
}

impl Mmdit {
    pub fn new(config: MmditConfig, weights: Weights) -> Result<Self> {
        let hidden = config.hidden_size();
        let positions = config.pos_embed_max_size * config.pos_embed_max_size;
        Ok(Mmdit {
            x_embedder: PatchEmbedding::new(config.in_channels, hidden, weights.pp("x_embedder.proj"))?,
            pos_embed: weights.matrix((1, positions, hidden), "pos_embed")?,
            t_embedder: MlpEmbedder::named(TIME_EMBEDDING, hidden, weights.pp("t_embedder.mlp"), EMBEDDER_LAYERS)?,
            y_embedder: config
                .adm_in_channels
                .map(|adm| MlpEmbedder::named(adm, hidden, weights.pp("y_embedder.mlp"), EMBEDDER_LAYERS))
                .transpose()?,
            context_embedder: config
                .context_dim
                .map(|width| linear(width, hidden, weights.pp("context_embedder")))
                .transpose()?,
            blocks: (0..config.blocks)
                .map(|n| JointBlock::new(&config, n, weights.pp(format!("joint_blocks.{n}"))))
                .collect::<Result<_>>()?,
            final_layer: match config.final_layer {
                true => Some((
                    linear(hidden, 2 * hidden, weights.pp("final_layer.adaLN_modulation.1"))?,
                    linear(
                        hidden,
                        PATCH * PATCH * config.out_channels,
                        weights.pp("final_layer.linear"),
                    )?,
                )),
                false => None,
            },
            config,
        })
    }

    pub fn config(&self) -> &MmditConfig {
        &self.config
    }

    /// The embedding of the latent's 2×2 patches (without positions).
    pub(crate) fn patch_embedding(&self) -> &PatchEmbedding {
        &self.x_embedder
    }

    /// Bytes of activations one call on a [batch, C, height, width] latent needs at most, with
    /// up to 333 text tokens (CLIP's 77 and T5's 256): the widest projection of every token (the
    /// MLP's, 4·hidden), a few times over.
    pub fn working_memory(&self, batch: usize, height: usize, width: usize) -> u64 {
        const TEXT_TOKENS: usize = 333;
        let tokens = height.div_ceil(PATCH) * width.div_ceil(PATCH) + TEXT_TOKENS;
        (batch * tokens * 4 * self.config.hidden_size() * 4 * 4) as u64
    }

    /// The image tokens of the latent `x`: its 2×2 patches embedded, plus the centre of the
    /// position table the patch grid covers (ComfyUI's `cropped_pos_embed`).
    pub(crate) fn embed_patches(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let (rows, cols) = (height.div_ceil(PATCH), width.div_ceil(PATCH));
        let max = self.config.pos_embed_max_size;
        if rows > max || cols > max {
            candle_core::bail!(
                "a latent of {height}×{width} is larger than this MMDiT's position table ({max}×{max} patches of 2)"
            );
        }
        let tokens = self.x_embedder.forward(x)?;
        let (top, left) = ((max - rows) / 2, (max - cols) / 2);
        let hidden = self.config.hidden_size();
        // Each row of the crop is one run of the table.
        let mut values = vec![0f32; rows * cols * hidden];
        let read = self.pos_embed.with_elements(|elements| {
            for (row, out) in values.chunks_mut(cols * hidden).enumerate() {
                elements.read(((top + row) * max + left) * hidden, 1, out);
            }
        })?;
        let positions = match read {
            Some(()) => Tensor::from_vec(values, (rows * cols, hidden), x.device())?,
            None => self
                .pos_embed
                .tensor()?
                .reshape((max, max, hidden))?
                .narrow(0, top, rows)?
                .narrow(1, left, cols)?
                .reshape((rows * cols, hidden))?
                .to_device(x.device())?,
        };
        tokens.broadcast_add(&positions)
    }

    /// The predicted velocity [B, out_channels, H, W].
    pub fn forward(&self, input: &MmditInput) -> Result<Tensor> {
        let (batch, _, height, width) = input.x.dims4()?;
        let (rows, cols) = (height.div_ceil(PATCH), width.div_ceil(PATCH));
        let Some((final_modulation, final_linear)) = &self.final_layer else {
            candle_core::bail!("this MMDiT has no final layer (an SD3 ControlNet's trunk predicts nothing)");
        };
        let mut img = self.embed_patches(input.x)?;
        let c = self.conditioning_vector(input.timesteps, input.y)?;
        let mut txt = Some(self.text_tokens(input.context)?);
        for n in 0..self.blocks.len() {
            (img, txt) = self.joint_block(n, img, txt, &c, input)?;
            if let Some(Some(residual)) = input.control.get(n) {
                img = img.broadcast_add(residual)?;
            }
        }
        let final_modulation = modulation(final_modulation, &c, 2)?;
        let img = modulate(&layer_norm(&img)?, &final_modulation[0], &final_modulation[1])?;
        let out = final_linear.forward(&img)?;
        let channels = self.config.out_channels;
        out.reshape((batch, rows, cols, PATCH, PATCH, channels))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((batch, channels, rows * PATCH, cols * PATCH))?
            .narrow(2, 0, height)?
            .narrow(3, 0, width)
    }

    /// The vector the blocks are modulated by: the timestep's embedding plus the pooled text's.
    pub(crate) fn conditioning_vector(&self, timesteps: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let c = self
            .t_embedder
            .forward(&timestep_embedding(timesteps, TIME_EMBEDDING)?)?;
        match (&self.y_embedder, y) {
            (Some(y_embedder), Some(y)) => c + y_embedder.forward(y)?,
            _ => Ok(c),
        }
    }

    /// The text tokens the blocks take: the context embedded where the model embeds it.
    pub(crate) fn text_tokens(&self, context: &Tensor) -> Result<Tensor> {
        match &self.context_embedder {
            Some(embedder) => embedder.forward(context),
            None => Ok(context.clone()),
        }
    }

    /// Joint block `n` on the image and text tokens, as the model has it (no replacement).
    pub(crate) fn plain_joint_block(
        &self,
        n: usize,
        img: &Tensor,
        txt: &Tensor,
        c: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match self.blocks.get(n) {
            Some(block) => block.forward(img, txt, c),
            None => candle_core::bail!("this MMDiT has no joint block {n}"),
        }
    }

    /// Joint block `n` on the image and text tokens, or its replacement where the call has one.
    /// The last block's text stream ends the text (`None` after it).
    fn joint_block(
        &self,
        n: usize,
        img: Tensor,
        txt: Option<Tensor>,
        c: &Tensor,
        input: &MmditInput,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let block = &self.blocks[n];
        let no_text = || candle_core::Error::Msg(format!("MMDiT joint block {n} was given no text tokens"));
        let replacement = input.patches.and_then(|call| {
            let site = BlockSite {
                block: DitBlock::Double(n),
                txt_tokens: txt.as_ref().map_or(0, |t| t.dim(1).unwrap_or(0)),
                call: call.info,
            };
            call.patches.replacement(DitBlock::Double(n)).map(|r| (r, site))
        });
        let Some((replacement, site)) = replacement else {
            return block.forward(&img, &txt.ok_or_else(no_text)?, c);
        };
        let original = |inputs: BlockInputs| -> Result<BlockOutputs> {
            let (img, txt) = block.forward(&inputs.img, &inputs.txt.ok_or_else(no_text)?, &inputs.vec)?;
            Ok(BlockOutputs { img, txt })
        };
        let out = replacement.replace(
            &site,
            BlockInputs {
                img,
                txt,
                vec: c.clone(),
            },
            &original,
        )?;
        Ok((out.img, out.txt))
    }
}

/// A 2×2 patch embedding (a convolution of stride 2, ComfyUI's `PatchEmbed` without positions):
/// the latent padded circularly to even sides, each patch one token.
pub(crate) struct PatchEmbedding {
    /// The convolution as a matrix over patches [C·2·2, hidden], and its bias.
    weight: Tensor,
    bias: Tensor,
}

impl PatchEmbedding {
    pub(crate) fn new(channels: usize, hidden: usize, weights: Weights) -> Result<Self> {
        let weight = weights
            .get((hidden, channels, PATCH, PATCH), "weight")?
            .reshape((hidden, channels * PATCH * PATCH))?;
        Ok(PatchEmbedding {
            weight: weight.t()?.contiguous()?,
            bias: weights.get(hidden, "bias")?,
        })
    }

    /// The tokens [B, patches, hidden] of `x` [B, C, H, W], row by row.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let patches = patchify(&pad_circularly(&pad_circularly(x, 2)?, 3)?)?;
        patches.broadcast_matmul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// One stream of a joint block attending to its own tokens only (ComfyUI's `DismantledBlock`
/// called alone, as the SD3.5 ControlNets' blocks are).
pub(crate) struct SelfAttentionBlock {
    stream: Stream,
    heads: usize,
}

impl SelfAttentionBlock {
    /// The block of `config`'s width under `weights` (`adaLN_modulation.1`, `attn`, `mlp`).
    pub(crate) fn new(config: &MmditConfig, weights: Weights) -> Result<Self> {
        Ok(SelfAttentionBlock {
            stream: Stream::new(config, weights, false, false)?,
            heads: config.heads(),
        })
    }

    /// The tokens `x` after the block, modulated by `c`.
    pub(crate) fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let prepared = self.stream.prepare(x, c)?;
        let [q, k, v] = &prepared.qkv;
        let out = attention(q, k, v, self.heads, None)?;
        self.stream.finish(x, &out, None, &prepared.modulation)
    }
}

/// A self-attention's projections: the fused queries, keys and values, their optional RMS
/// norms per head, and the output projection (absent in the last text block).
struct SelfAttention {
    qkv: Linear,
    norms: Option<(RmsNorm, RmsNorm)>,
    proj: Option<Linear>,
    heads: usize,
}

impl SelfAttention {
    fn new(config: &MmditConfig, weights: Weights, with_projection: bool) -> Result<Self> {
        let hidden = config.hidden_size();
        let norms = match config.qk_norm {
            true => Some((
                RmsNorm {
                    scale: weights.get(HEAD_DIM, "ln_q.weight")?,
                },
                RmsNorm {
                    scale: weights.get(HEAD_DIM, "ln_k.weight")?,
                },
            )),
            false => None,
        };
        Ok(SelfAttention {
            qkv: linear(hidden, 3 * hidden, weights.pp("qkv"))?,
            norms,
            proj: with_projection
                .then(|| linear(hidden, hidden, weights.pp("proj")))
                .transpose()?,
            heads: config.heads(),
        })
    }

    /// Queries, keys and values [B, L, hidden] of the (modulated) tokens `x`, queries and keys
    /// normalised per head where the model does.
    fn project(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        let (batch, length, _) = x.dims3()?;
        let parts = self.qkv.forward(x)?.reshape((batch, length, 3, self.heads, HEAD_DIM))?;
        let part = |i: usize| parts.narrow(2, i, 1)?.squeeze(2);
        let (q, k) = match &self.norms {
            Some((query, key)) => (query.forward(&part(0)?)?, key.forward(&part(1)?)?),
            None => (part(0)?, part(1)?),
        };
        let flat = |t: Tensor| t.reshape((batch, length, self.heads * HEAD_DIM));
        Ok([flat(q)?, flat(k)?, flat(part(2)?)?])
    }

    fn output(&self, attention: &Tensor) -> Result<Tensor> {
        match &self.proj {
            Some(proj) => proj.forward(attention),
            None => candle_core::bail!("the last MMDiT text block has no output projection"),
        }
    }
}

/// One stream (text or image) of a joint block, modulated by the timestep and pooled vector:
/// `modulations` vectors (2 for the last text block, which only attends; 6; 9 with a second
/// self-attention).
struct Stream {
    modulation: Linear,
    attention: SelfAttention,
    second_attention: Option<SelfAttention>,
    mlp: Option<(Linear, Linear)>,
    modulations: usize,
}

/// What a stream keeps from before the attention to after it: its modulation vectors.
struct Prepared {
    modulation: Vec<Tensor>,
    qkv: [Tensor; 3],
    second_qkv: Option<[Tensor; 3]>,
}

impl Stream {
    fn new(config: &MmditConfig, weights: Weights, pre_only: bool, second_attention: bool) -> Result<Self> {
        let hidden = config.hidden_size();
        let modulations = match (pre_only, second_attention) {
            (true, _) => 2,
            (false, false) => 6,
            (false, true) => 9,
        };
        let mlp = match pre_only {
            true => None,
            false => Some((
                linear(hidden, 4 * hidden, weights.pp("mlp.fc1"))?,
                linear(4 * hidden, hidden, weights.pp("mlp.fc2"))?,
            )),
        };
        Ok(Stream {
            modulation: linear(hidden, modulations * hidden, weights.pp("adaLN_modulation.1"))?,
            attention: SelfAttention::new(config, weights.pp("attn"), !pre_only)?,
            second_attention: second_attention
                .then(|| SelfAttention::new(config, weights.pp("attn2"), true))
                .transpose()?,
            mlp,
            modulations,
        })
    }

    /// The modulation vectors and the queries, keys and values of `x` (and of its second
    /// self-attention).
    fn prepare(&self, x: &Tensor, c: &Tensor) -> Result<Prepared> {
        let modulation = modulation(&self.modulation, c, self.modulations)?;
        let normed = layer_norm(x)?;
        let qkv = self
            .attention
            .project(&modulate(&normed, &modulation[0], &modulation[1])?)?;
        let second_qkv = match &self.second_attention {
            Some(attention) => Some(attention.project(&modulate(&normed, &modulation[6], &modulation[7])?)?),
            None => None,
        };
        Ok(Prepared {
            modulation,
            qkv,
            second_qkv,
        })
    }

    /// `x` after its gated attention outputs and its gated MLP.
    fn finish(&self, x: &Tensor, attention: &Tensor, second: Option<&Tensor>, modulation: &[Tensor]) -> Result<Tensor> {
        let Some((fc1, fc2)) = &self.mlp else {
            candle_core::bail!("the last MMDiT text block has no MLP");
        };
        let mut x = (x + self.attention.output(attention)?.broadcast_mul(&modulation[2])?)?;
        if let (Some(attention2), Some(second)) = (&self.second_attention, second) {
            x = (x + attention2.output(second)?.broadcast_mul(&modulation[8])?)?;
        }
        let hidden = modulate(&layer_norm(&x)?, &modulation[3], &modulation[4])?;
        let mlp = fc2.forward(&fc1.forward(&hidden)?.gelu()?)?;
        x + mlp.broadcast_mul(&modulation[5])?
    }
}

/// Text (`context_block`) and image (`x_block`) streams attending jointly, text first.
struct JointBlock {
    context: Stream,
    x: Stream,
    heads: usize,
}

impl JointBlock {
    fn new(config: &MmditConfig, n: usize, weights: Weights) -> Result<Self> {
        let last = n + 1 == config.blocks && config.final_layer;
        let second_attention = config.x_block_self_attention.contains(&n);
        Ok(JointBlock {
            context: Stream::new(config, weights.pp("context_block"), last, false)?,
            x: Stream::new(config, weights.pp("x_block"), false, second_attention)?,
            heads: config.heads(),
        })
    }

    /// The image and text tokens after the block; the last block gives no text.
    fn forward(&self, img: &Tensor, txt: &Tensor, c: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let context = self.context.prepare(txt, c)?;
        let image = self.x.prepare(img, c)?;
        let txt_length = txt.dim(1)?;
        let joint = |i: usize| Tensor::cat(&[&context.qkv[i], &image.qkv[i]], 1);
        let out = attention(&joint(0)?, &joint(1)?, &joint(2)?, self.heads, None)?;
        let second = match &image.second_qkv {
            Some([q, k, v]) => Some(attention(q, k, v, self.heads, None)?),
            None => None,
        };
        let img_attention = out.narrow(1, txt_length, img.dim(1)?)?;
        let img = self.x.finish(img, &img_attention, second.as_ref(), &image.modulation)?;
        let txt = match self.context.mlp {
            Some(_) => Some(
                self.context
                    .finish(txt, &out.narrow(1, 0, txt_length)?, None, &context.modulation)?,
            ),
            None => None,
        };
        Ok((img, txt))
    }
}
