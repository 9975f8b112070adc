//! The KL autoencoder (`AutoencoderKL`) of SD1.x/SD2.x/SDXL in the LDM key layout
//! (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`), and FLUX's (16 latent
//! channels, no quant convolutions). Channel counts, depth, latent width and the quant
//! convolutions come from the weights.
//!
//! Works on raw VAE latents and on images in [-1, 1], NCHW; the nodes convert to ComfyUI's
//! [B, H, W, C] images in [0, 1].

use candle_core::{Module, Result, Tensor};
use candle_nn::GroupNorm;

use crate::checkpoint::DetectError;
use crate::kernels::attention::attention;
use crate::kernels::conv::Conv2d;
use crate::tiling::{tiled_scale, Tiling};
use crate::weights::{TensorShapes, Weights};

/// The architecture of one VAE, as found in its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Base channel count (`encoder.conv_in` output).
    pub channels: usize,
    pub channel_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Latent channels (4 for SD).
    pub latent_channels: usize,
    /// Image channels (3).
    pub image_channels: usize,
    /// Whether 1×1 convolutions sit between the latent and the encoder and decoder (SD; not
    /// FLUX).
    pub quant_convs: bool,
}

impl VaeConfig {
    pub fn infer(file: &dyn TensorShapes, prefix: &str) -> std::result::Result<Self, DetectError> {
        let shape = |key: &str| file.shape(&format!("{prefix}{key}"));
        let required = |key: &str| {
            shape(key)
                .map(<[usize]>::to_vec)
                .ok_or_else(|| DetectError::MissingTensor(format!("{prefix}{key}")))
        };
        let conv_in = required("encoder.conv_in.weight")?;
        let channels = conv_in[0];
        let image_channels = conv_in[1];
        let channel_mult: Vec<usize> = (0..)
            .map_while(|level| shape(&format!("encoder.down.{level}.block.0.conv1.weight")).map(|s| s[0] / channels))
            .collect();
        let num_res_blocks = (0..)
            .take_while(|block| shape(&format!("encoder.down.0.block.{block}.conv1.weight")).is_some())
            .count();
        if channel_mult.is_empty() || num_res_blocks == 0 {
            return Err(DetectError::MissingTensor(format!(
                "{prefix}encoder.down.0.block.0.conv1.weight"
            )));
        }
        let latent_channels = required("decoder.conv_in.weight")?[1];
        Ok(VaeConfig {
            channels,
            channel_mult,
            num_res_blocks,
            latent_channels,
            image_channels,
            quant_convs: shape("quant_conv.weight").is_some(),
        })
    }
}

fn norm(channels: usize, vb: Weights) -> Result<GroupNorm> {
    vb.group_norm(32, channels, 1e-6)
}

pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl Vae {
    pub fn new(config: VaeConfig, vb: Weights) -> Result<Self> {
        let latent = config.latent_channels;
        Ok(Vae {
            encoder: Encoder::new(&config, vb.pp("encoder"))?,
            decoder: Decoder::new(&config, vb.pp("decoder"))?,
            quant_conv: match config.quant_convs {
                true => Some(Conv2d::same(2 * latent, 2 * latent, 1, 1, vb.pp("quant_conv"))?),
                false => None,
            },
            post_quant_conv: match config.quant_convs {
                true => Some(Conv2d::same(latent, latent, 1, 1, vb.pp("post_quant_conv"))?),
                false => None,
            },
            config,
        })
    }

    /// Pixel count per latent pixel along one side (8 for SD).
    pub fn downscale(&self) -> usize {
        1 << (self.config.channel_mult.len() - 1)
    }

    /// Peak working memory of decoding (or encoding) one image of `height × width` pixels, in
    /// bytes: the widest full-resolution convolution unfolded 3×3 plus the activations kept.
    pub fn working_memory(&self, height: usize, width: usize) -> u64 {
        let mult = &self.config.channel_mult;
        let widest = self.config.channels * mult.get(1).copied().unwrap_or(mult[0]);
        (height * width * 4 * 13 * widest) as u64
    }

    /// Image in [-1, 1] → the mean of the latent distribution (ComfyUI encodes deterministically).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let moments = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        moments.narrow(1, 0, self.config.latent_channels)
    }

    /// Raw latent → image in roughly [-1, 1].
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        match &self.post_quant_conv {
            Some(conv) => self.decoder.forward(&conv.forward(latent)?),
            None => self.decoder.forward(latent),
        }
    }

    /// ComfyUI's `decode_tiled_`: the mean of three tiled decodes with latent tiles of
    /// (tile/2 wide × 2·tile high), (2·tile × tile/2) and (tile × tile), `overlap` in latent pixels.
    pub fn decode_tiled(&self, latent: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        let scale = self.downscale() as f64;
        let channels = self.config.image_channels;
        let mut decode = |tile: &Tensor| self.decode(tile);
        let shapes = [(tile * 2, tile / 2), (tile / 2, tile * 2), (tile, tile)];
        average_of_tilings(latent, &mut decode, shapes, overlap, scale, channels)
    }

    /// ComfyUI's `encode_tiled_`: the mean of three tiled encodes with pixel tiles of
    /// (tile × tile), (2·tile wide × tile/2 high) and (tile/2 × 2·tile).
    pub fn encode_tiled(&self, image: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        let scale = 1.0 / self.downscale() as f64;
        let channels = self.config.latent_channels;
        let mut encode = |tile: &Tensor| self.encode(tile);
        let shapes = [(tile, tile), (tile / 2, tile * 2), (tile * 2, tile / 2)];
        average_of_tilings(image, &mut encode, shapes, overlap, scale, channels)
    }
}

/// `(Σ tiled_scale over the (height, width) tile shapes) / 3`, summed in the given order.
fn average_of_tilings(
    input: &Tensor,
    function: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    shapes: [(usize, usize); 3],
    overlap: usize,
    scale: f64,
    channels: usize,
) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for (tile_height, tile_width) in shapes {
        let tiling = Tiling {
            tile_height,
            tile_width,
            overlap,
            scale,
        };
        let pass = tiled_scale(input, function, tiling, channels)?;
        sum = Some(match sum {
            Some(sum) => (sum + pass)?,
            None => pass,
        });
    }
    match sum {
        Some(sum) => sum / 3.0,
        None => Err(candle_core::Error::Msg("no tiling".into())),
    }
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(in_channels: usize, out_channels: usize, vb: Weights) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: norm(in_channels, vb.pp("norm1"))?,
            conv1: Conv2d::same(in_channels, out_channels, 3, 1, vb.pp("conv1"))?,
            norm2: norm(out_channels, vb.pp("norm2"))?,
            conv2: Conv2d::same(out_channels, out_channels, 3, 1, vb.pp("conv2"))?,
            shortcut: if in_channels == out_channels {
                None
            } else {
                Some(Conv2d::same(in_channels, out_channels, 1, 1, vb.pp("nin_shortcut"))?)
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&candle_nn::ops::silu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&candle_nn::ops::silu(&self.norm2.forward(&h)?)?)?;
        match &self.shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over all pixels, with 1×1 convolutions as projections.
struct AttentionBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttentionBlock {
    fn new(channels: usize, vb: Weights) -> Result<Self> {
        Ok(AttentionBlock {
            norm: norm(channels, vb.pp("norm"))?,
            q: Conv2d::same(channels, channels, 1, 1, vb.pp("q"))?,
            k: Conv2d::same(channels, channels, 1, 1, vb.pp("k"))?,
            v: Conv2d::same(channels, channels, 1, 1, vb.pp("v"))?,
            proj_out: Conv2d::same(channels, channels, 1, 1, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let h = self.norm.forward(x)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, channels, height * width))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = to_tokens(self.q.forward(&h)?)?;
        let k = to_tokens(self.k.forward(&h)?)?;
        let v = to_tokens(self.v.forward(&h)?)?;
        let out = attention(&q, &k, &v, 1, None)?;
        let out = out.transpose(1, 2)?.reshape((batch, channels, height, width))?;
        x + self.proj_out.forward(&out)?
    }
}

struct MiddleBlock {
    block_1: ResnetBlock,
    attention: AttentionBlock,
    block_2: ResnetBlock,
}

impl MiddleBlock {
    fn new(channels: usize, vb: Weights) -> Result<Self> {
        Ok(MiddleBlock {
            block_1: ResnetBlock::new(channels, channels, vb.pp("block_1"))?,
            attention: AttentionBlock::new(channels, vb.pp("attn_1"))?,
            block_2: ResnetBlock::new(channels, channels, vb.pp("block_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.block_2
            .forward(&self.attention.forward(&self.block_1.forward(x)?)?)
    }
}

struct Encoder {
    conv_in: Conv2d,
    levels: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    middle: MiddleBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(config: &VaeConfig, vb: Weights) -> Result<Self> {
        let mut channels = config.channels;
        let mut levels = Vec::new();
        for (level, &mult) in config.channel_mult.iter().enumerate() {
            let vb = vb.pp(format!("down.{level}"));
            let out = config.channels * mult;
            let mut blocks = Vec::new();
            for block in 0..config.num_res_blocks {
                blocks.push(ResnetBlock::new(channels, out, vb.pp(format!("block.{block}")))?);
                channels = out;
            }
            let downsample = if level + 1 < config.channel_mult.len() {
                Some(Conv2d::new(channels, channels, 3, 2, 0, vb.pp("downsample.conv"))?)
            } else {
                None
            };
            levels.push((blocks, downsample));
        }
        Ok(Encoder {
            conv_in: Conv2d::same(config.image_channels, config.channels, 3, 1, vb.pp("conv_in"))?,
            levels,
            middle: MiddleBlock::new(channels, vb.pp("mid"))?,
            norm_out: norm(channels, vb.pp("norm_out"))?,
            conv_out: Conv2d::same(channels, 2 * config.latent_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (blocks, downsample) in &self.levels {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if let Some(downsample) = downsample {
                // Pad one pixel on the right and bottom, then a 3×3 stride-2 convolution.
                h = downsample.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        h = self.middle.forward(&h)?;
        self.conv_out
            .forward(&candle_nn::ops::silu(&self.norm_out.forward(&h)?)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    middle: MiddleBlock,
    /// Levels from the lowest resolution up: residual blocks, then an optional upsampling conv.
    levels: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(config: &VaeConfig, vb: Weights) -> Result<Self> {
        let last_mult = config.channel_mult.last().copied().unwrap_or(1);
        let mut channels = config.channels * last_mult;
        let conv_in = Conv2d::same(config.latent_channels, channels, 3, 1, vb.pp("conv_in"))?;
        let middle = MiddleBlock::new(channels, vb.pp("mid"))?;
        let mut levels = Vec::new();
        for (level, &mult) in config.channel_mult.iter().enumerate().rev() {
            let vb = vb.pp(format!("up.{level}"));
            let out = config.channels * mult;
            let mut blocks = Vec::new();
            for block in 0..=config.num_res_blocks {
                blocks.push(ResnetBlock::new(channels, out, vb.pp(format!("block.{block}")))?);
                channels = out;
            }
            let upsample = if level > 0 {
                Some(Conv2d::same(channels, channels, 3, 1, vb.pp("upsample.conv"))?)
            } else {
                None
            };
            levels.push((blocks, upsample));
        }
        Ok(Decoder {
            conv_in,
            middle,
            levels,
            norm_out: norm(channels, vb.pp("norm_out"))?,
            conv_out: Conv2d::same(channels, config.image_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.middle.forward(&self.conv_in.forward(z)?)?;
        for (blocks, upsample) in &self.levels {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if let Some(upsample) = upsample {
                let (_, _, height, width) = h.dims4()?;
                h = upsample.forward(&h.upsample_nearest2d(height * 2, width * 2)?)?;
            }
        }
        self.conv_out
            .forward(&candle_nn::ops::silu(&self.norm_out.forward(&h)?)?)
    }
}
