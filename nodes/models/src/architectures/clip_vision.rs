//! CLIP's and SigLIP's vision transformers (`CLIPVisionModelProjection` in ComfyUI's
//! `clip_model.py`): square patches embedded by a convolution, a class token (CLIP only), learned
//! position embeddings, CLIP's transformer layers ([`super::clip_encoder`]) and the pooled output
//! — CLIP's class token through `post_layernorm` and the visual projection, SigLIP's whole
//! sequence through `post_layernorm`.
//!
//! Read in transformers' layout (`vision_model.…`, `visual_projection.weight`) or OpenCLIP's
//! (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`, `transformer.resblocks.N`,
//! `ln_post`, `proj`), which ComfyUI converts at load and unCLIP checkpoints hold under
//! `embedder.model.visual.`. Width, depth, patch and image size come from the weights; heads are
//! 16, as in every configuration ComfyUI ships (ViT-L/14, ViT-H/14, ViT-bigG/14, SigLIP so400m).
//! As in ComfyUI, CLIP encoders of up to 30 layers (the ViT-L family) use quick GELU, deeper ones
//! exact GELU, and SigLIP the tanh approximation.
//!
//! [`preprocess`] is ComfyUI's `clip_preprocess`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::LayerNorm;

use crate::architectures::clip_encoder::{layer_tensor, Activation, ClipNaming, EncoderLayer, LayerShape, LayerTensor};
use crate::checkpoint::DetectError;
use crate::kernels::conv::Conv2d;
use crate::kernels::interpolate::bicubic_antialiased;
use crate::weights::{TensorShapes, Weights};

/// Heads of every released CLIP and SigLIP vision encoder.
const HEADS: usize = 16;
/// The deepest CLIP vision encoder that uses quick GELU (ViT-L has 24 layers, ViT-H 32).
const QUICK_GELU_MAX_LAYERS: usize = 30;
/// OpenAI's normalisation of CLIP's input pixels.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The encoder family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionKind {
    /// CLIP: a class token, `pre_layrnorm`, the pooled class token projected.
    Clip,
    /// SigLIP: patch embedding with a bias, no class token, the whole sequence normalised.
    SigLip,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    pub kind: VisionKind,
    pub width: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub patch_size: usize,
    pub image_size: usize,
    /// The visual projection's output width, when the file has one.
    pub projection: Option<usize>,
    pub activation: Activation,
    pub naming: ClipNaming,
}

impl ClipVisionConfig {
    /// Reads the architecture from the tensors under `prefix` (which ends with a dot, or is
    /// empty): OpenCLIP's layout when `{prefix}transformer.resblocks.0.attn.in_proj_weight` is
    /// there, else transformers' under `{prefix}vision_model.`.
    pub fn infer(file: &dyn TensorShapes, prefix: &str) -> std::result::Result<Self, DetectError> {
        let naming = match file.has(&format!("{prefix}transformer.resblocks.0.attn.in_proj_weight")) {
            true => ClipNaming::OpenClip,
            false => ClipNaming::Transformers,
        };
        let names = VisionNames(naming);
        let shape = |name: &str| {
            let name = format!("{prefix}{name}");
            file.shape(&name)
                .map(<[usize]>::to_vec)
                .ok_or(DetectError::MissingTensor(name))
        };
        let kind = match file.has(&format!("{prefix}{}", names.class_embedding())) {
            true => VisionKind::Clip,
            false => VisionKind::SigLip,
        };
        let patch = shape(names.patch_embedding())?;
        let positions = shape(names.position_embedding())?[0];
        let fc1_of = |layer: usize| {
            format!(
                "{prefix}{}.{}.weight",
                names.layer(layer),
                layer_tensor(naming, LayerTensor::Fc1)
            )
        };
        let intermediate = shape(&fc1_of(0)[prefix.len()..])?[0];
        let layers = (0..).take_while(|&layer| file.has(&fc1_of(layer))).count();
        let patches = positions - usize::from(kind == VisionKind::Clip);
        let grid = (patches as f64).sqrt().round() as usize;
        if grid * grid != patches || patch.len() != 4 || patch[1] != 3 {
            return Err(DetectError::Unrecognised(format!(
                "a vision encoder with {positions} positions and patch embedding {patch:?}"
            )));
        }
        let projection = match naming {
            ClipNaming::OpenClip => file.shape(&format!("{prefix}proj")).map(|proj| proj[1]),
            ClipNaming::Transformers => file
                .shape(&format!("{prefix}visual_projection.weight"))
                .map(|proj| proj[0]),
        };
        let activation = match kind {
            VisionKind::SigLip => Activation::GeluTanh,
            VisionKind::Clip if layers <= QUICK_GELU_MAX_LAYERS => Activation::QuickGelu,
            VisionKind::Clip => Activation::Gelu,
        };
        Ok(ClipVisionConfig {
            kind,
            width: patch[0],
            intermediate,
            layers,
            heads: HEADS,
            patch_size: patch[2],
            image_size: grid * patch[2],
            projection,
            activation,
            naming,
        })
    }

    /// The per-channel mean and deviation the pixels are normalised with.
    pub fn normalisation(&self) -> ([f32; 3], [f32; 3]) {
        match self.kind {
            VisionKind::Clip => (CLIP_MEAN, CLIP_STD),
            VisionKind::SigLip => ([0.5; 3], [0.5; 3]),
        }
    }

    fn layer_shape(&self) -> LayerShape {
        LayerShape {
            width: self.width,
            intermediate: self.intermediate,
            heads: self.heads,
            activation: self.activation,
            naming: self.naming,
            eps: 1e-5,
        }
    }
}

/// Tensor names in one [`ClipNaming`].
#[derive(Clone, Copy)]
struct VisionNames(ClipNaming);

impl VisionNames {
    fn class_embedding(self) -> &'static str {
        match self.0 {
            ClipNaming::Transformers => "vision_model.embeddings.class_embedding",
            ClipNaming::OpenClip => "class_embedding",
        }
    }

    fn patch_embedding(self) -> &'static str {
        match self.0 {
            ClipNaming::Transformers => "vision_model.embeddings.patch_embedding.weight",
            ClipNaming::OpenClip => "conv1.weight",
        }
    }

    fn position_embedding(self) -> &'static str {
        match self.0 {
            ClipNaming::Transformers => "vision_model.embeddings.position_embedding.weight",
            ClipNaming::OpenClip => "positional_embedding",
        }
    }

    fn pre_layernorm(self) -> &'static str {
        match self.0 {
            ClipNaming::Transformers => "vision_model.pre_layrnorm",
            ClipNaming::OpenClip => "ln_pre",
        }
    }

    fn post_layernorm(self) -> &'static str {
        match self.0 {
            ClipNaming::Transformers => "vision_model.post_layernorm",
            ClipNaming::OpenClip => "ln_post",
        }
    }

    fn layer(self, layer: usize) -> String {
        match self.0 {
            ClipNaming::Transformers => format!("vision_model.encoder.layers.{layer}"),
            ClipNaming::OpenClip => format!("transformer.resblocks.{layer}"),
        }
    }
}

/// What an encoder gives for a batch of images (ComfyUI's CLIP_VISION_OUTPUT).
#[derive(Clone, Debug)]
pub struct VisionOutput {
    /// The last layer's tokens [B, N, width] (SigLIP: after `post_layernorm`).
    pub last_hidden_state: Tensor,
    /// The second-to-last layer's tokens [B, N, width].
    pub penultimate_hidden_states: Tensor,
    /// The pooled output, projected where the file has a projection: [B, projection] for CLIP,
    /// [B, N, width] for SigLIP.
    pub image_embeds: Tensor,
}

pub struct ClipVision {
    config: ClipVisionConfig,
    patch_embedding: Conv2d,
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    pre_layernorm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    /// [width, projection].
    projection: Option<Tensor>,
}

impl ClipVision {
    /// The encoder whose tensors lie under `vb` (the prefix given to [`ClipVisionConfig::infer`]).
    pub fn new(config: ClipVisionConfig, vb: Weights) -> Result<Self> {
        let names = VisionNames(config.naming);
        let width = config.width;
        let patch = config.patch_size;
        let grid = config.image_size / patch;
        let patch_weights = vb.pp(names.patch_embedding().trim_end_matches(".weight"));
        let (patch_embedding, class_embedding) = match config.kind {
            VisionKind::Clip => (
                Conv2d::without_bias(3, width, patch, patch, 0, patch_weights)?,
                Some(vb.get(width, names.class_embedding())?),
            ),
            VisionKind::SigLip => (Conv2d::new(3, width, patch, patch, 0, patch_weights)?, None),
        };
        let positions = grid * grid + usize::from(class_embedding.is_some());
        let pre_layernorm = match config.kind {
            VisionKind::Clip => Some(vb.pp(names.pre_layernorm()).layer_norm(width, 1e-5)?),
            VisionKind::SigLip => None,
        };
        let layers = (0..config.layers)
            .map(|layer| EncoderLayer::new(&config.layer_shape(), vb.pp(names.layer(layer))))
            .collect::<Result<_>>()?;
        let projection = match (config.projection, config.naming) {
            (None, _) => None,
            (Some(out), ClipNaming::OpenClip) => Some(vb.get((width, out), "proj")?),
            (Some(out), ClipNaming::Transformers) => {
                Some(vb.get((out, width), "visual_projection.weight")?.t()?.contiguous()?)
            }
        };
        Ok(ClipVision {
            patch_embedding,
            class_embedding,
            position_embedding: vb.get((positions, width), names.position_embedding())?,
            pre_layernorm,
            layers,
            post_layernorm: vb.pp(names.post_layernorm()).layer_norm(width, 1e-5)?,
            projection,
            config,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// Encodes preprocessed pixels [B, 3, size, size] (see [`preprocess`]).
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let batch = pixels.dim(0)?;
        let mut x = self.patch_embedding.forward(pixels)?.flatten_from(2)?.transpose(1, 2)?;
        if let Some(class) = &self.class_embedding {
            let class = class
                .reshape((1, 1, self.config.width))?
                .broadcast_as((batch, 1, self.config.width))?;
            x = Tensor::cat(&[&class.to_dtype(x.dtype())?, &x], 1)?;
        }
        x = x.broadcast_add(&self.position_embedding)?;
        if let Some(norm) = &self.pre_layernorm {
            x = norm.forward(&x)?;
        }
        let mut penultimate = None;
        for (index, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, None)?;
            if index + 2 == self.layers.len() {
                penultimate = Some(x.clone());
            }
        }
        let penultimate_hidden_states = penultimate.unwrap_or_else(|| x.clone());
        let (last_hidden_state, pooled) = match self.config.kind {
            VisionKind::Clip => {
                let pooled = self.post_layernorm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
                (x, pooled)
            }
            VisionKind::SigLip => {
                let x = self.post_layernorm.forward(&x)?;
                (x.clone(), x)
            }
        };
        let image_embeds = match &self.projection {
            Some(projection) => pooled.broadcast_matmul(projection)?,
            None => pooled,
        };
        Ok(VisionOutput {
            last_hidden_state,
            penultimate_hidden_states,
            image_embeds,
        })
    }
}

/// ComfyUI's `clip_preprocess`: images [B, H, W, C] in 0..1 (channels past the third ignored)
/// to normalised pixels [B, 3, size, size]. With `crop`, the shorter side is scaled to `size`
/// and the centre cut out; without, the image is stretched to the square. Resampling is
/// antialiased bicubic; the pixels are then rounded to 8 bits.
pub fn preprocess(images: &Tensor, size: usize, mean: [f32; 3], std: [f32; 3], crop: bool) -> Result<Tensor> {
    let images = images.to_dtype(DType::F32)?;
    let images = images.narrow(D::Minus1, 0, images.dim(D::Minus1)?.min(3))?;
    let mut x = images.permute((0, 3, 1, 2))?;
    let (_, _, height, width) = x.dims4()?;
    if height != size || width != size {
        let (scaled_height, scaled_width) = match crop {
            true => {
                let scale = size as f64 / height.min(width) as f64;
                (
                    (scale * height as f64).round_ties_even() as usize,
                    (scale * width as f64).round_ties_even() as usize,
                )
            }
            false => (size, size),
        };
        x = bicubic_antialiased(&x, scaled_height, scaled_width)?;
        let top = (scaled_height - size) / 2;
        let left = (scaled_width - size) / 2;
        x = x.narrow(2, top, size)?.narrow(3, left, size)?;
    }
    let device = x.device().clone();
    // A true division, as PyTorch's (candle's division by a number multiplies by its inverse).
    let levels = Tensor::new(255f32, &device)?;
    let x = round_half_even(&(x * 255.0)?.clamp(0f32, 255f32)?)?.broadcast_div(&levels)?;
    let mean = Tensor::from_slice(&mean, (1, 3, 1, 1), &device)?;
    let std = Tensor::from_slice(&std, (1, 3, 1, 1), &device)?;
    x.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// `torch.round` of non-negative values: halves go to the even neighbour (candle's `round`
/// takes them away from zero).
fn round_half_even(x: &Tensor) -> Result<Tensor> {
    let rounded = x.round()?;
    let half = (x - x.floor()?)?.eq(0.5)?.to_dtype(x.dtype())?;
    let odd = (&rounded - ((&rounded / 2.0)?.floor()? * 2.0)?)?;
    rounded - (half * odd)?
}
