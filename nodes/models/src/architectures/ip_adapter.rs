//! IP-Adapter (h94's, as cubiq's ComfyUI_IPAdapter_plus reads it): an image projection turning a
//! CLIP vision encoder's output into a few context tokens, and for every cross-attention of the
//! UNet a key and a value projection of those tokens (`ip_adapter.N.to_k_ip`/`to_v_ip`, N odd).
//!
//! Projections, told apart by their tensors as the pack does:
//! - `ImageProjModel` (`proj`, `norm`): the pooled image embedding to 4 tokens (standard, light,
//!   ViT-G models);
//! - `MLPProjModel` (`proj.0`, `proj.2`, `proj.3`): the penultimate hidden states token by token
//!   through an MLP (full face);
//! - `Resampler` (`latents`, `proj_in`, `layers.N`, `proj_out`, `norm_out`): learned queries
//!   attending to the penultimate hidden states through perceiver layers (plus, plus face; 64-wide
//!   heads).
//!
//! FaceID models need a face-analysis model and are refused with the pack's error. Sizes come
//! from the weights.

use std::collections::BTreeMap;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::LayerNorm;

use crate::checkpoint::DetectError;
use crate::kernels::attention::attention;
use crate::kernels::linear::{linear, linear_no_bias, Linear};
use crate::weights::{TensorShapes, Weights};

/// The context width of SDXL's IP-Adapters (the pack's `is_sdxl`).
const SDXL_CONTEXT: usize = 2048;
/// SD1.5's cross-attentions, one adapter module each (SDXL's adapters have 70).
const SD15_MODULES: usize = 16;
/// Width of the resampler's attention heads.
const RESAMPLER_HEAD_WIDTH: usize = 64;
/// The pack's error for FaceID models, which need InsightFace.
pub const FACE_ID_ERROR: &str = "insightface model is required for FaceID models";

/// How the image becomes context tokens.
#[derive(Clone, Debug, PartialEq)]
pub enum ProjectionKind {
    /// `ImageProjModel`: one linear layer to `tokens` tokens, layer-normed.
    Linear { tokens: usize },
    /// `MLPProjModel`.
    Mlp,
    /// `Resampler` with `queries` learned queries `width` wide and `depth` perceiver layers.
    Resampler {
        queries: usize,
        width: usize,
        depth: usize,
        heads: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct IpAdapterConfig {
    pub projection: ProjectionKind,
    /// The width of the CLIP vision output it takes (pooled embedding or hidden state).
    pub clip_width: usize,
    /// The width of the tokens it makes.
    pub token_width: usize,
    /// The key/value projections, by module number (1, 3, 5, …): their input and output widths.
    pub layers: BTreeMap<usize, (usize, usize)>,
    /// Whether it is made for SDXL (2048-wide context, 70 modules).
    pub sdxl: bool,
}

impl IpAdapterConfig {
    /// Reads the architecture from `image_proj.…` and `ip_adapter.…` tensors.
    pub fn infer(file: &dyn TensorShapes) -> std::result::Result<Self, DetectError> {
        let shape = |name: &str| {
            file.shape(name)
                .map(<[usize]>::to_vec)
                .ok_or_else(|| DetectError::MissingTensor(name.into()))
        };
        let has = |name: &str| file.has(name);
        let is_full = has("image_proj.proj.3.weight");
        let is_portrait = has("image_proj.proj.2.weight") && !is_full;
        if is_portrait
            || has("ip_adapter.0.to_q_lora.down.weight")
            || has("image_proj.perceiver_resampler.proj_in.weight")
        {
            return Err(DetectError::Unrecognised(FACE_ID_ERROR.into()));
        }
        let mut layers = BTreeMap::new();
        for name in file.tensor_names() {
            let Some(number) = name
                .strip_prefix("ip_adapter.")
                .and_then(|rest| rest.strip_suffix(".to_k_ip.weight"))
                .and_then(|number| number.parse::<usize>().ok())
            else {
                continue;
            };
            let k = shape(name)?;
            layers.insert(number, (k[1], k[0]));
        }
        let context = match layers.get(&1) {
            Some(&(context, _)) => context,
            None => return Err(DetectError::MissingTensor("ip_adapter.1.to_k_ip.weight".into())),
        };
        let (projection, clip_width, token_width) = if is_full {
            let first = shape("image_proj.proj.0.weight")?;
            (ProjectionKind::Mlp, first[1], shape("image_proj.proj.2.weight")?[0])
        } else if has("image_proj.latents") {
            let latents = shape("image_proj.latents")?;
            let depth = (0..)
                .take_while(|layer| has(&format!("image_proj.layers.{layer}.0.to_q.weight")))
                .count();
            let inner = shape("image_proj.layers.0.0.to_q.weight")?[0];
            let projection = ProjectionKind::Resampler {
                queries: latents[1],
                width: latents[2],
                depth,
                heads: (inner / RESAMPLER_HEAD_WIDTH).max(1),
            };
            (
                projection,
                shape("image_proj.proj_in.weight")?[1],
                shape("image_proj.proj_out.weight")?[0],
            )
        } else {
            let proj = shape("image_proj.proj.weight")?;
            let width = shape("image_proj.norm.weight")?[0];
            (
                ProjectionKind::Linear {
                    tokens: proj[0] / width,
                },
                proj[1],
                width,
            )
        };
        // Real SDXL adapters have both; tiny test ones only SDXL's module count.
        let sdxl = context == SDXL_CONTEXT || layers.len() > SD15_MODULES;
        Ok(IpAdapterConfig {
            projection,
            clip_width,
            token_width,
            layers,
            sdxl,
        })
    }

    /// Whether it takes the penultimate hidden states (plus and full-face models) rather than
    /// the pooled embedding.
    pub fn takes_hidden_states(&self) -> bool {
        !matches!(self.projection, ProjectionKind::Linear { .. })
    }

    /// The number of transformers the pack's layer-dependent weights count (`layers`): 11 for an
    /// SDXL-shaped adapter (with a module 101), else 16.
    pub fn transformer_count(&self) -> usize {
        if self.layers.contains_key(&101) {
            11
        } else {
            16
        }
    }
}

/// A perceiver layer's attention: the learned queries attend to the image tokens and to
/// themselves.
struct PerceiverAttention {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
}

impl PerceiverAttention {
    fn new(width: usize, heads: usize, vb: Weights) -> Result<Self> {
        let inner = heads * RESAMPLER_HEAD_WIDTH;
        Ok(PerceiverAttention {
            norm1: vb.pp("norm1").layer_norm(width, 1e-5)?,
            norm2: vb.pp("norm2").layer_norm(width, 1e-5)?,
            to_q: linear_no_bias(width, inner, vb.pp("to_q"))?,
            to_kv: linear_no_bias(width, 2 * inner, vb.pp("to_kv"))?,
            to_out: linear_no_bias(inner, width, vb.pp("to_out"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let x = self.norm1.forward(x)?;
        let latents = self.norm2.forward(latents)?;
        let q = self.to_q.forward(&latents)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &latents], 1)?)?;
        let inner = kv.dim(D::Minus1)? / 2;
        let (k, v) = (kv.narrow(D::Minus1, 0, inner)?, kv.narrow(D::Minus1, inner, inner)?);
        self.to_out
            .forward(&attention(&q, &k.contiguous()?, &v.contiguous()?, self.heads, None)?)
    }
}

/// A perceiver layer's feed-forward: layer norm, a 4× bias-free MLP with GELU.
struct PerceiverFeedForward {
    norm: LayerNorm,
    up: Linear,
    down: Linear,
}

impl PerceiverFeedForward {
    fn new(width: usize, vb: Weights) -> Result<Self> {
        Ok(PerceiverFeedForward {
            norm: vb.pp("0").layer_norm(width, 1e-5)?,
            up: linear_no_bias(width, 4 * width, vb.pp("1"))?,
            down: linear_no_bias(4 * width, width, vb.pp("3"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.up.forward(&self.norm.forward(x)?)?.gelu_erf()?)
    }
}

enum Projection {
    Linear {
        proj: Linear,
        norm: LayerNorm,
        tokens: usize,
    },
    Mlp {
        first: Linear,
        second: Linear,
        norm: LayerNorm,
    },
    Resampler {
        latents: Tensor,
        proj_in: Linear,
        layers: Vec<(PerceiverAttention, PerceiverFeedForward)>,
        proj_out: Linear,
        norm_out: LayerNorm,
    },
}

pub struct IpAdapter {
    config: IpAdapterConfig,
    projection: Projection,
    /// The key and value projections by module number.
    layers: BTreeMap<usize, (Linear, Linear)>,
}

impl IpAdapter {
    /// The adapter whose `image_proj.` and `ip_adapter.` tensors lie under `vb`.
    pub fn new(config: IpAdapterConfig, vb: Weights) -> Result<Self> {
        let image_proj = vb.pp("image_proj");
        let (clip, width) = (config.clip_width, config.token_width);
        let projection = match config.projection {
            ProjectionKind::Linear { tokens } => Projection::Linear {
                proj: linear(clip, tokens * width, image_proj.pp("proj"))?,
                norm: image_proj.pp("norm").layer_norm(width, 1e-5)?,
                tokens,
            },
            ProjectionKind::Mlp => Projection::Mlp {
                first: linear(clip, clip, image_proj.pp("proj.0"))?,
                second: linear(clip, width, image_proj.pp("proj.2"))?,
                norm: image_proj.pp("proj.3").layer_norm(width, 1e-5)?,
            },
            ProjectionKind::Resampler {
                queries,
                width: dim,
                depth,
                heads,
            } => {
                let layers = (0..depth)
                    .map(|layer| {
                        let layer = image_proj.pp(format!("layers.{layer}"));
                        Ok((
                            PerceiverAttention::new(dim, heads, layer.pp("0"))?,
                            PerceiverFeedForward::new(dim, layer.pp("1"))?,
                        ))
                    })
                    .collect::<Result<_>>()?;
                Projection::Resampler {
                    latents: image_proj.get((1, queries, dim), "latents")?,
                    proj_in: linear(clip, dim, image_proj.pp("proj_in"))?,
                    layers,
                    proj_out: linear(dim, width, image_proj.pp("proj_out"))?,
                    norm_out: image_proj.pp("norm_out").layer_norm(width, 1e-5)?,
                }
            }
        };
        let layers = config
            .layers
            .iter()
            .map(|(&number, &(context, inner))| {
                let layer = vb.pp(format!("ip_adapter.{number}"));
                Ok((
                    number,
                    (
                        linear_no_bias(context, inner, layer.pp("to_k_ip"))?,
                        linear_no_bias(context, inner, layer.pp("to_v_ip"))?,
                    ),
                ))
            })
            .collect::<Result<_>>()?;
        Ok(IpAdapter {
            config,
            projection,
            layers,
        })
    }

    pub fn config(&self) -> &IpAdapterConfig {
        &self.config
    }

    /// The context tokens [B, T, width] of CLIP vision outputs: pooled embeddings [B, clip] for
    /// a linear projection, hidden states [B, N, clip] otherwise.
    pub fn tokens(&self, embeds: &Tensor) -> Result<Tensor> {
        match &self.projection {
            Projection::Linear { proj, norm, tokens } => {
                let width = self.config.token_width;
                norm.forward(&proj.forward(embeds)?.reshape(((), *tokens, width))?)
            }
            Projection::Mlp { first, second, norm } => {
                norm.forward(&second.forward(&first.forward(embeds)?.gelu_erf()?)?)
            }
            Projection::Resampler {
                latents,
                proj_in,
                layers,
                proj_out,
                norm_out,
            } => {
                let batch = embeds.dim(0)?;
                let x = proj_in.forward(embeds)?;
                let mut latents = latents.repeat((batch, 1, 1))?;
                for (attention, feed_forward) in layers {
                    latents = (attention.forward(&x, &latents)? + &latents)?;
                    latents = (feed_forward.forward(&latents)? + &latents)?;
                }
                norm_out.forward(&proj_out.forward(&latents)?)
            }
        }
    }

    /// The key and value [B, T, inner] of module `number` for `tokens`; `None` when the adapter
    /// has no such module.
    pub fn key_value(&self, number: usize, tokens: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        match self.layers.get(&number) {
            Some((k, v)) => Ok(Some((k.forward(tokens)?, v.forward(tokens)?))),
            None => Ok(None),
        }
    }
}
