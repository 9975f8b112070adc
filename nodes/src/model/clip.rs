//! ComfyUI's `CLIP` value: a model's text encoders (CLIP or T5 networks with their tokenizers),
//! the layer they are read at, and how a prompt becomes the tokens and conditioning of each.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use candle_core::{Tensor, D};
use easel_engine::NodeObject;
use easel_models::architectures::clip_text::{ClipTextEncoder, EncodeOptions, OutputLayer};
use easel_models::architectures::t5::T5Encoder;
use easel_models::checkpoint::{Family, TextEncoderKind};
use easel_models::lora::Patch;
use easel_models::text::embeddings::EmbeddingFolder;
use easel_models::text::t5_tokenizer::{T5Padding, T5Tokenizer, T5_EMBEDDING_KEY};
use easel_models::text::tokenizer::{tokenize_with_weights, EmbeddingLookup, NoEmbeddings, WeightedToken, END_TOKEN};
use easel_models::weights::WeightSource;

use crate::conditioning::{CondEntry, Conditioning};
use crate::hooks::keyframes::clip_schedule;
use crate::hooks::patching::hooked_encoders;
use crate::hooks::HookGroup;
use crate::paths::Paths;

/// The network of one text encoder of a CLIP.
#[derive(Clone)]
pub enum TextNetwork {
    /// A CLIP text transformer of the given kind.
    Clip {
        kind: TextEncoderKind,
        encoder: Arc<ClipTextEncoder>,
    },
    /// T5-XXL and its vocabulary (FLUX).
    T5 {
        encoder: Arc<T5Encoder>,
        tokenizer: Arc<T5Tokenizer>,
    },
}

/// One text encoder of a CLIP.
#[derive(Clone)]
pub struct TextEncoder {
    pub network: TextNetwork,
    /// What the encoder was built from (LoRA nodes build it again with their patches).
    pub source: WeightSource,
}

impl TextEncoder {
    /// The encoder built again with `more` weight patches after its own.
    pub fn with_weight_patches(&self, more: HashMap<String, Vec<Patch>>) -> candle_core::Result<TextEncoder> {
        if more.is_empty() {
            return Ok(self.clone());
        }
        let source = self.source.patched(more);
        let network = match &self.network {
            TextNetwork::Clip { kind, encoder } => TextNetwork::Clip {
                kind: *kind,
                encoder: Arc::new(ClipTextEncoder::new(encoder.config().clone(), source.weights())?),
            },
            TextNetwork::T5 { encoder, tokenizer } => TextNetwork::T5 {
                encoder: Arc::new(T5Encoder::new(encoder.config().clone(), source.weights())?),
                tokenizer: tokenizer.clone(),
            },
        };
        Ok(TextEncoder { network, source })
    }

    /// The CLIP kind of the encoder (none for T5).
    pub fn clip_kind(&self) -> Option<TextEncoderKind> {
        match &self.network {
            TextNetwork::Clip { kind, .. } => Some(*kind),
            TextNetwork::T5 { .. } => None,
        }
    }
}

/// The CLIP socket: the text encoders of a model family (SDXL: CLIP-L then CLIP-G; FLUX: CLIP-L
/// then T5-XXL) and the layer CLIPSetLastLayer chose.
#[derive(Clone)]
pub struct Clip {
    pub family: Family,
    pub encoders: Vec<TextEncoder>,
    /// `stop_at_clip_layer` counted from the end (1 = the last layer), when it was set.
    pub layer_from_end: Option<usize>,
    /// How T5 prompts are padded, when T5TokenizerOptions set it (else the family's way).
    pub t5_padding: Option<T5Padding>,
    /// The hooks SetClipHooks gave it.
    pub hooks: Option<Arc<ClipHooks>>,
}

/// What SetClipHooks sets on a CLIP (ComfyUI's `forced_hooks`, `use_clip_schedule` and
/// `apply_hooks_to_conds`).
#[derive(Clone)]
pub struct ClipHooks {
    /// The hooks the encoders are patched with, at their CLIP strengths.
    pub hooks: HookGroup,
    /// Whether prompts are encoded once per range of the hooks' keyframes, each range's entries
    /// limited to it; else once, every hook at strength 1.
    pub scheduled: bool,
    /// The hooks given to the conditioning entries encoded.
    pub for_conds: Option<HookGroup>,
}

/// One encoding by a CLIP with hooks: its range of sampling (none: all of it) and the hooks'
/// keyframe strengths there.
type HookedEncoding = (Option<(f64, f64)>, Vec<f64>);

/// One list of chunks per text encoder of a CLIP, in its order (T5: one chunk).
pub type ClipTokens = Vec<Vec<Vec<WeightedToken>>>;

impl Clip {
    /// How ComfyUI reads CLIP encoder `kind`'s output in this family: SD1.x and FLUX the last
    /// layer's (CLIP-L padded with the end token; FLUX keeps only its pooled vector, unprojected);
    /// SD2.x the penultimate layer's, normed; SDXL and its refiner the penultimate layer's without
    /// the final norm, CLIP-G's pooled vector projected and its chunks padded with 0. A layer set
    /// by CLIPSetLastLayer replaces the default.
    pub fn options(&self, kind: TextEncoderKind) -> EncodeOptions {
        let (default_layer, layer_norm_hidden) = match self.family {
            Family::Sd1 | Family::Flux => (OutputLayer::Last, true),
            Family::Sd2 => (OutputLayer::FromEnd(2), true),
            _ => (OutputLayer::FromEnd(2), false),
        };
        let open_clip = kind != TextEncoderKind::ClipL;
        EncodeOptions {
            layer: self.output_layer(default_layer),
            layer_norm_hidden,
            project_pooled: open_clip,
            pad_token: if open_clip { 0 } else { END_TOKEN },
        }
    }

    fn output_layer(&self, default: OutputLayer) -> OutputLayer {
        self.layer_from_end.map_or(default, OutputLayer::FromEnd)
    }

    /// `text` tokenized for every encoder (textual inversions from `paths`' embeddings folders).
    pub fn tokenize(&self, text: &str, paths: Option<&Paths>) -> ClipTokens {
        let find_embedding = paths.map(|paths| move |name: &str| paths.full_path("embeddings", name));
        self.encoders
            .iter()
            .map(|encoder| {
                let (key, width) = match &encoder.network {
                    TextNetwork::Clip { kind, encoder } => (kind.embedding_key(), encoder.width()),
                    TextNetwork::T5 { encoder, .. } => (T5_EMBEDDING_KEY, encoder.config().d_model),
                };
                let folder = find_embedding
                    .as_ref()
                    .map(|find| EmbeddingFolder::new(find, key, width));
                let embeddings: &dyn EmbeddingLookup = match &folder {
                    Some(folder) => folder,
                    None => &NoEmbeddings,
                };
                match &encoder.network {
                    TextNetwork::Clip { kind, .. } => {
                        tokenize_with_weights(text, embeddings, self.options(*kind).pad_token)
                    }
                    TextNetwork::T5 { tokenizer, .. } => {
                        let padding = self.t5_padding.unwrap_or(match self.family {
                            Family::Sd3 => T5Padding::to_length(SD3_T5_MIN_LENGTH),
                            _ => T5Padding::FLUX,
                        });
                        vec![tokenizer.tokenize_with_weights(text, embeddings, padding)]
                    }
                }
            })
            .collect()
    }

    /// Encodes tokens into conditioning (ComfyUI's `encode_from_tokens_scheduled`): one entry,
    /// or with scheduled hooks one per range of their keyframes, each limited to its range; the
    /// entries carry the hooks meant for them.
    pub fn encode(&self, tokens: &ClipTokens) -> candle_core::Result<Conditioning> {
        let Some(hooks) = &self.hooks else {
            let (hidden, pooled) = self.encode_with(&self.encoders, tokens)?;
            return Ok(Conditioning(vec![CondEntry::new(hidden, pooled)]));
        };
        let group = &hooks.hooks;
        let encodings: Vec<HookedEncoding> = if hooks.scheduled {
            let keyframes: Vec<_> = group.hooks().iter().map(|hook| &hook.keyframes).collect();
            clip_schedule(&keyframes)
                .into_iter()
                .map(|(range, keyframes)| {
                    let strengths = keyframes.iter().map(|k| k.map_or(1.0, |k| k.strength)).collect();
                    (Some(range), strengths)
                })
                .collect()
        } else {
            vec![(None, vec![1.0; group.hooks().len()])]
        };
        let mut entries = Vec::with_capacity(encodings.len());
        for (range, strengths) in encodings {
            let encoders = hooked_encoders(&self.encoders, self.family, group, &strengths)?;
            let (hidden, pooled) = self.encode_with(&encoders, tokens)?;
            entries.push(CondEntry {
                clip_range: range,
                hooks: hooks.for_conds.clone(),
                ..CondEntry::new(hidden, pooled)
            });
        }
        Ok(Conditioning(entries))
    }

    /// The pooled vector of `tokens` without the text projection, the last CLIP encoder's
    /// (`encode_from_tokens(…, return_pooled="unprojected")`, what GLIGEN boxes hold).
    pub fn unprojected_pooled(&self, tokens: &ClipTokens) -> candle_core::Result<Tensor> {
        let mut pooled = None;
        for (encoder, chunks) in self.encoders.iter().zip(tokens) {
            if let TextNetwork::Clip { kind, encoder } = &encoder.network {
                let options = EncodeOptions {
                    project_pooled: false,
                    ..self.options(*kind)
                };
                pooled = Some(encoder.encode_weighted(chunks, options)?.pooled);
            }
        }
        pooled.ok_or_else(|| candle_core::Error::Msg("this CLIP has no CLIP text encoder to pool with".into()))
    }

    /// Encodes tokens with `encoders` (this CLIP's, or them patched by hooks) into hidden
    /// states and a pooled vector. SD3: see [`Clip::encode_sd3`]. FLUX: T5's hidden states and
    /// CLIP-L's pooled vector (ComfyUI's `FluxClipModel`). Otherwise each CLIP's hidden states,
    /// cut to the shortest and joined along the channels (SDXL: CLIP-L ⧺ CLIP-G), and the last
    /// one's pooled vector.
    fn encode_with(
        &self,
        encoders: &[TextEncoder],
        tokens: &ClipTokens,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        if self.family == Family::Sd3 {
            return self
                .encode_sd3(encoders, tokens)
                .map(|(hidden, pooled)| (hidden, Some(pooled)));
        }
        let mut clip_hidden = Vec::with_capacity(encoders.len());
        let mut t5_hidden = None;
        let mut pooled = None;
        for (encoder, chunks) in encoders.iter().zip(tokens) {
            match &encoder.network {
                TextNetwork::Clip { kind, encoder } => {
                    let encoded = encoder.encode_weighted(chunks, self.options(*kind))?;
                    clip_hidden.push(encoded.hidden);
                    pooled = Some(encoded.pooled);
                }
                TextNetwork::T5 { encoder, .. } => {
                    let layer = self.output_layer(OutputLayer::Last);
                    t5_hidden = Some(encoder.encode_weighted(chunks, layer)?);
                }
            }
        }
        let hidden = match t5_hidden {
            Some(hidden) => hidden,
            None => {
                let tokens = clip_hidden
                    .iter()
                    .map(|h| h.dim(1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let cut_to = tokens.into_iter().min().unwrap_or(0);
                let hidden = clip_hidden
                    .iter()
                    .map(|h| h.narrow(1, 0, cut_to))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&hidden, D::Minus1)?
            }
        };
        Ok((hidden, pooled))
    }
}

/// SD3's T5 prompts are padded to at least this many tokens (ComfyUI's `T5XXLTokenizer`).
const SD3_T5_MIN_LENGTH: usize = 77;
/// Widths ComfyUI's `SD3ClipModel` fixes: CLIP-L's and CLIP-G's pooled vectors (zeros for a
/// missing encoder; CLIP-G's hidden states are placed after CLIP-L's width), and the width the
/// CLIP hidden states are padded to, T5-XXL's.
const SD3_CLIP_L_WIDTH: usize = 768;
const SD3_CLIP_G_WIDTH: usize = 1280;
const SD3_CONTEXT_WIDTH: usize = 4096;
/// The tokens of the text SD3 conditions on when no encoder gives any.
const SD3_EMPTY_TOKENS: usize = 77;

impl Clip {
    /// SD3's conditioning from whichever of CLIP-L, CLIP-G and T5-XXL the CLIP has (ComfyUI's
    /// `SD3ClipModel`): when either CLIP has tokens, their hidden states joined along the
    /// channels (cut to the shorter; CLIP-G alone placed after 768 zero channels) and padded
    /// with zeros to 4096, and the pooled vectors CLIP-L ⧺ CLIP-G (zeros for a missing one);
    /// then T5's hidden states appended as more tokens. With nothing encoded, 77 zero tokens
    /// and a zero pooled vector. Zero pooled vectors are as wide as the encoder's own (ComfyUI
    /// fixes the real ones' 768 and 1280, which a missing encoder gets). An encoder given no
    /// chunks (CLIPTextEncodeSD3's empty prompts without padding) is left out; T5 then encodes
    /// its end token alone.
    fn encode_sd3(&self, encoders: &[TextEncoder], tokens: &ClipTokens) -> candle_core::Result<(Tensor, Tensor)> {
        let device = encoders
            .first()
            .map_or(candle_core::Device::Cpu, |encoder| encoder.source.device.clone());
        let clip_tokens = encoders
            .iter()
            .zip(tokens)
            .any(|(encoder, chunks)| encoder.clip_kind().is_some() && !chunks.is_empty());
        let (mut clip_l, mut clip_g, mut t5) = (None, None, None);
        for (encoder, chunks) in encoders.iter().zip(tokens) {
            match &encoder.network {
                TextNetwork::Clip { kind, encoder } if clip_tokens => {
                    let encoded = encoder.encode_weighted(chunks, self.options(*kind))?;
                    match kind {
                        TextEncoderKind::ClipL => clip_l = Some(encoded),
                        _ => clip_g = Some(encoded),
                    }
                }
                TextNetwork::Clip { .. } => {}
                TextNetwork::T5 { encoder, .. } => {
                    t5 = Some(encoder.encode_weighted(chunks, self.output_layer(OutputLayer::Last))?);
                }
            }
        }
        let pooled_width = |wanted: TextEncoderKind, missing: usize| {
            encoders
                .iter()
                .find_map(|encoder| match &encoder.network {
                    TextNetwork::Clip { kind, encoder } if *kind == wanted => Some(encoder.width()),
                    _ => None,
                })
                .unwrap_or(missing)
        };
        let l_width = pooled_width(TextEncoderKind::ClipL, SD3_CLIP_L_WIDTH);
        let g_width = pooled_width(TextEncoderKind::ClipG, SD3_CLIP_G_WIDTH);
        let zeros = |width: usize| Tensor::zeros((1, width), candle_core::DType::F32, &device);
        let mut pooled = None;
        let mut hidden = None;
        if clip_tokens {
            let joined = match (&clip_l, &clip_g) {
                (Some(l), Some(g)) => {
                    let cut_to = l.hidden.dim(1)?.min(g.hidden.dim(1)?);
                    Some(Tensor::cat(
                        &[l.hidden.narrow(1, 0, cut_to)?, g.hidden.narrow(1, 0, cut_to)?],
                        D::Minus1,
                    )?)
                }
                (Some(l), None) => Some(l.hidden.clone()),
                (None, Some(g)) => Some(g.hidden.pad_with_zeros(D::Minus1, SD3_CLIP_L_WIDTH, 0)?),
                (None, None) => None,
            };
            if let Some(joined) = joined {
                let width = joined.dim(D::Minus1)?;
                hidden = Some(joined.pad_with_zeros(D::Minus1, 0, SD3_CONTEXT_WIDTH.saturating_sub(width))?);
            }
            let l_pooled = clip_l.map_or_else(|| zeros(l_width), |l| Ok(l.pooled))?;
            let g_pooled = clip_g.map_or_else(|| zeros(g_width), |g| Ok(g.pooled))?;
            pooled = Some(Tensor::cat(&[l_pooled, g_pooled], D::Minus1)?);
        }
        let hidden = match (hidden, t5) {
            (Some(clip), Some(t5)) => {
                let (clip_width, t5_width) = (clip.dim(D::Minus1)?, t5.dim(D::Minus1)?);
                if clip_width != t5_width {
                    return Err(candle_core::Error::Msg(format!(
                        "SD3 conditioning joins CLIP's hidden states, padded to {clip_width} channels, with \
                         T5's, which has {t5_width}: SD3 takes T5-XXL (4096 wide)"
                    )));
                }
                Tensor::cat(&[clip, t5], 1)?
            }
            (Some(clip), None) => clip,
            (None, Some(t5)) => t5,
            (None, None) => Tensor::zeros(
                (1, SD3_EMPTY_TOKENS, SD3_CONTEXT_WIDTH),
                candle_core::DType::F32,
                &device,
            )?,
        };
        let pooled = match pooled {
            Some(pooled) => pooled,
            None => zeros(l_width + g_width)?,
        };
        Ok((hidden, pooled))
    }
}

impl fmt::Debug for Clip {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<comfy.sd.CLIP>")
    }
}

impl NodeObject for Clip {
    fn type_name(&self) -> &'static str {
        "CLIP"
    }
}
