//! DINOv2's vision transformer (`DinoVisionTransformer` as Depth Anything ships it): 14×14
//! patches embedded by a convolution, a class token (and optional register tokens), learned
//! position embeddings for a square grid resized bicubically to other grids, pre-norm blocks
//! with layer scale (attention, then a GELU MLP or a SwiGLU feed-forward), and a final layer
//! norm applied to whichever block outputs a caller takes. The architecture is read from the
//! weights (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.…`); heads are 64 wide, as in
//! every released DINOv2.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::LayerNorm;

use crate::checkpoint::DetectError;
use crate::kernels::attention::attention;
use crate::kernels::conv::Conv2d;
use crate::kernels::interpolate::bicubic_scaled;
use crate::kernels::linear::{linear, Linear};
use crate::weights::{TensorShapes, Weights};

/// Width of one attention head.
const HEAD_WIDTH: usize = 64;
/// `interpolate_offset`: added to the target grid before the scale factor is computed, so that
/// rounding cannot make the resized grid one short.
const INTERPOLATE_OFFSET: f64 = 0.1;
const NORM_EPS: f64 = 1e-6;

/// The feed-forward layer of each block.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedForward {
    /// `fc1` → GELU → `fc2`.
    Mlp { hidden: usize },
    /// `w12` (two halves) → SiLU(first)·second → `w3` (ViT-g).
    SwiGlu { hidden: usize },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dinov2Config {
    pub embed_dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub patch_size: usize,
    /// Side of the square grid the position embeddings were learned for (37 for 518 pixels).
    pub position_grid: usize,
    pub register_tokens: usize,
    pub feed_forward: FeedForward,
    /// Whether the blocks scale their residuals (`ls1`/`ls2`).
    pub layer_scale: bool,
}

impl Dinov2Config {
    /// Reads the architecture from the tensors under `prefix` (which ends with a dot, or is empty).
    pub fn infer(file: &dyn TensorShapes, prefix: &str) -> std::result::Result<Self, DetectError> {
        let shape = |name: &str| {
            let name = format!("{prefix}{name}");
            file.shape(&name).ok_or(DetectError::MissingTensor(name))
        };
        let embed_dim = *shape("cls_token")?
            .last()
            .ok_or_else(|| DetectError::Unrecognised("cls_token has no dimensions".into()))?;
        let patch = shape("patch_embed.proj.weight")?;
        let positions = shape("pos_embed")?[1] - 1;
        let position_grid = (positions as f64).sqrt() as usize;
        if position_grid * position_grid != positions {
            return Err(DetectError::Unrecognised(format!(
                "{positions} position embeddings do not form a square grid"
            )));
        }
        let depth = (0..)
            .take_while(|block| file.has(&format!("{prefix}blocks.{block}.norm1.weight")))
            .count();
        let feed_forward = if let Some(fc1) = file.shape(&format!("{prefix}blocks.0.mlp.fc1.weight")) {
            FeedForward::Mlp { hidden: fc1[0] }
        } else {
            FeedForward::SwiGlu {
                hidden: shape("blocks.0.mlp.w12.weight")?[0] / 2,
            }
        };
        if embed_dim % HEAD_WIDTH != 0 || depth == 0 {
            return Err(DetectError::Unrecognised(format!(
                "a DINOv2 of width {embed_dim} and {depth} blocks"
            )));
        }
        Ok(Dinov2Config {
            embed_dim,
            depth,
            heads: embed_dim / HEAD_WIDTH,
            patch_size: patch[2],
            position_grid,
            register_tokens: file
                .shape(&format!("{prefix}register_tokens"))
                .map_or(0, |shape| shape[1]),
            feed_forward,
            layer_scale: file.has(&format!("{prefix}blocks.0.ls1.gamma")),
        })
    }
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    layer_scale: Option<(Tensor, Tensor)>,
    norm2: LayerNorm,
    feed_forward: (Linear, Linear),
    swiglu: bool,
    heads: usize,
    width: usize,
}

impl Block {
    fn new(config: &Dinov2Config, vb: Weights) -> Result<Self> {
        let width = config.embed_dim;
        let layer_scale = if config.layer_scale {
            Some((vb.get(width, "ls1.gamma")?, vb.get(width, "ls2.gamma")?))
        } else {
            None
        };
        let feed_forward = match config.feed_forward {
            FeedForward::Mlp { hidden } => (
                linear(width, hidden, vb.pp("mlp.fc1"))?,
                linear(hidden, width, vb.pp("mlp.fc2"))?,
            ),
            FeedForward::SwiGlu { hidden } => (
                linear(width, 2 * hidden, vb.pp("mlp.w12"))?,
                linear(hidden, width, vb.pp("mlp.w3"))?,
            ),
        };
        Ok(Block {
            norm1: vb.pp("norm1").layer_norm(width, NORM_EPS)?,
            qkv: linear(width, 3 * width, vb.pp("attn.qkv"))?,
            proj: linear(width, width, vb.pp("attn.proj"))?,
            layer_scale,
            norm2: vb.pp("norm2").layer_norm(width, NORM_EPS)?,
            feed_forward,
            swiglu: matches!(config.feed_forward, FeedForward::SwiGlu { .. }),
            heads: config.heads,
            width,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        let part = |index: usize| qkv.narrow(D::Minus1, index * self.width, self.width);
        let attended = self
            .proj
            .forward(&attention(&part(0)?, &part(1)?, &part(2)?, self.heads, None)?)?;
        let x = (x + self.scaled(attended, 0)?)?;
        let hidden = self.feed_forward.0.forward(&self.norm2.forward(&x)?)?;
        let hidden = if self.swiglu {
            let half = hidden.dim(D::Minus1)? / 2;
            (hidden.narrow(D::Minus1, 0, half)?.silu()? * hidden.narrow(D::Minus1, half, half)?)?
        } else {
            hidden.gelu_erf()?
        };
        let out = self.feed_forward.1.forward(&hidden)?;
        x + self.scaled(out, 1)?
    }

    /// A residual times its layer scale (`ls1` for 0, `ls2` for 1).
    fn scaled(&self, residual: Tensor, which: usize) -> Result<Tensor> {
        match &self.layer_scale {
            Some((ls1, ls2)) => residual.broadcast_mul(if which == 0 { ls1 } else { ls2 }),
            None => Ok(residual),
        }
    }
}

pub struct Dinov2 {
    config: Dinov2Config,
    patch_embed: Conv2d,
    cls_token: Tensor,
    register_tokens: Option<Tensor>,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Dinov2 {
    pub fn new(config: Dinov2Config, vb: Weights) -> Result<Self> {
        let width = config.embed_dim;
        let patch = config.patch_size;
        let positions = config.position_grid * config.position_grid + 1;
        let blocks = (0..config.depth)
            .map(|block| Block::new(&config, vb.pp(format!("blocks.{block}"))))
            .collect::<Result<Vec<_>>>()?;
        let register_tokens = match config.register_tokens {
            0 => None,
            count => Some(vb.get((1, count, width), "register_tokens")?),
        };
        Ok(Dinov2 {
            patch_embed: Conv2d::new(3, width, patch, patch, 0, vb.pp("patch_embed.proj"))?,
            cls_token: vb.get((1, 1, width), "cls_token")?,
            register_tokens,
            pos_embed: vb.get((1, positions, width), "pos_embed")?,
            blocks,
            norm: vb.pp("norm").layer_norm(width, NORM_EPS)?,
            config,
        })
    }

    pub fn config(&self) -> &Dinov2Config {
        &self.config
    }

    /// The position embeddings for a `rows`×`columns` grid of patches from an image of `height`
    /// × `width` pixels: the learned ones where they fit (a square image of the learned grid),
    /// else the patch embeddings resized bicubically (`interpolate_pos_encoding`).
    fn position_embeddings(&self, rows: usize, columns: usize, height: usize, width: usize) -> Result<Tensor> {
        let grid = self.config.position_grid;
        if rows * columns == grid * grid && height == width {
            return Ok(self.pos_embed.clone());
        }
        let dim = self.config.embed_dim;
        let class = self.pos_embed.narrow(1, 0, 1)?;
        let patches = self
            .pos_embed
            .narrow(1, 1, grid * grid)?
            .reshape((1, grid, grid, dim))?
            .permute((0, 3, 1, 2))?;
        let scale = |cells: usize| (cells as f64 + INTERPOLATE_OFFSET) / grid as f64;
        let resized = bicubic_scaled(&patches, scale(rows), scale(columns))?;
        let (_, _, got_rows, got_columns) = resized.dims4()?;
        if (got_rows, got_columns) != (rows, columns) {
            candle_core::bail!("position embeddings resized to {got_rows}x{got_columns}, not {rows}x{columns}");
        }
        let resized = resized.permute((0, 2, 3, 1))?.reshape((1, rows * columns, dim))?;
        Tensor::cat(&[&class, &resized], 1)
    }

    /// Runs the blocks on normalised pixels [B, 3, H, W] (H and W multiples of the patch size)
    /// and returns, for each block index in `layers`, its output after the final norm without
    /// the class and register tokens: [B, patches, width], patches in row-major order.
    pub fn intermediate_layers(&self, pixels: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        let (batch, _, height, width) = pixels.dims4()?;
        let patch = self.config.patch_size;
        let (rows, columns) = (height / patch, width / patch);
        let patches = self.patch_embed.forward(pixels)?.flatten_from(2)?.transpose(1, 2)?;
        let dim = self.config.embed_dim;
        let class = self
            .cls_token
            .broadcast_as((batch, 1, dim))?
            .to_dtype(patches.dtype())?;
        let mut x = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embeddings(rows, columns, height, width)?)?;
        if let Some(registers) = &self.register_tokens {
            let registers = registers.broadcast_as((batch, self.config.register_tokens, dim))?;
            x = Tensor::cat(&[&x.narrow(1, 0, 1)?, &registers, &x.narrow(1, 1, rows * columns)?], 1)?;
        }
        let skip = 1 + self.config.register_tokens;
        let mut outputs = Vec::with_capacity(layers.len());
        for (index, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x)?;
            if layers.contains(&index) {
                outputs.push(self.norm.forward(&x)?.narrow(1, skip, rows * columns)?);
            }
        }
        if outputs.len() != layers.len() {
            candle_core::bail!("layers {layers:?} asked of a DINOv2 with {} blocks", self.blocks.len());
        }
        Ok(outputs)
    }
}
