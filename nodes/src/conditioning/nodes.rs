//! The conditioning nodes: prompts encoded by a CLIP (`CLIPTextEncode`, the SDXL and SD3
//! variants, clip skip) and the operations on CONDITIONING lists: combining, averaging, concatenating,
//! zeroing, timestep ranges, and the areas, masks and strengths that place an entry in the
//! latent ([`crate::conditioning::regions`]).

use candle_core::Tensor;
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::checkpoint::TextEncoderKind;

use crate::conditioning::regions::{AreaSpec, CondRegion, LatentArea};
use crate::conditioning::{CondEntry, Conditioning, SdxlSizes};
use crate::image::Mask;
use crate::model::clip::{Clip, ClipTokens, TextEncoder, TextNetwork};
use crate::paths::Paths;
use crate::runtime::tensor_error;

/// `CLIPTextEncode`: a prompt to conditioning.
pub struct ClipTextEncode;

impl Node for ClipTextEncode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("CLIPTextEncode", "nodes", "conditioning")
            .display("CLIP Text Encode (Prompt)")
            .description("Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion model towards generating specific images.")
            .required(
                "text",
                InputSpec::of("STRING")
                    .opt("multiline", true)
                    .opt("dynamicPrompts", true)
                    .opt("tooltip", "The text to be encoded."),
            )
            .required("clip", InputSpec::of("CLIP").opt("tooltip", "The CLIP model used for encoding the text."))
            .output(
                OutputSpec::of("CONDITIONING")
                    .tooltip("A conditioning containing the embedded text used to guide the diffusion model."),
            )
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = clip_input(inputs)?;
        let text = inputs.string("text")?;
        let tokens = clip.tokenize(text, ctx.services.get::<Paths>());
        let conditioning = clip.encode(&tokens).map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(conditioning)]))
    }
}

/// The CLIP input of a text-encode node, with ComfyUI's error when a checkpoint had none.
pub(crate) fn clip_input(inputs: &NodeInputs) -> Result<&Clip, NodeError> {
    inputs.optional_object::<Clip>("clip")?.ok_or_else(|| {
        NodeError::typed(
            "RuntimeError",
            "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your checkpoint does not contain a valid clip or text encoder model.",
        )
    })
}

/// A multiline prompt input with dynamic prompts, as the text-encode nodes declare them.
pub(crate) fn prompt_spec() -> InputSpec {
    InputSpec::of("STRING")
        .opt("multiline", true)
        .opt("dynamicPrompts", true)
}

/// A size input of the SDXL text-encode nodes: 0 to the maximum resolution.
fn sdxl_size_spec(default: i64) -> InputSpec {
    InputSpec::int(default, 0, MAX_RESOLUTION)
}

/// `conditioning`'s entries (just encoded, so without sizes of their own) with SDXL's size
/// keys `sizes`.
fn with_sdxl_sizes(conditioning: Conditioning, sizes: SdxlSizes) -> Conditioning {
    let entries = conditioning
        .0
        .into_iter()
        .map(|entry| CondEntry { sdxl: sizes, ..entry })
        .collect();
    Conditioning(entries)
}

/// `CLIPTextEncodeSDXL`: `text_g` for CLIP-G and `text_l` for CLIP-L (the shorter padded with
/// empty-prompt chunks to the other's chunk count), with the sizes SDXL's class conditioning
/// embeds.
pub struct ClipTextEncodeSdxl;

impl Node for ClipTextEncodeSdxl {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "CLIPTextEncodeSDXL",
            "comfy_extras.nodes_clip_sdxl",
            "advanced/conditioning",
        )
        .required("clip", InputSpec::of("CLIP"))
        .required("width", sdxl_size_spec(1024))
        .required("height", sdxl_size_spec(1024))
        .required("crop_w", sdxl_size_spec(0))
        .required("crop_h", sdxl_size_spec(0))
        .required("target_width", sdxl_size_spec(1024))
        .required("target_height", sdxl_size_spec(1024))
        .required("text_g", prompt_spec())
        .required("text_l", prompt_spec())
        .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = clip_input(inputs)?;
        let kinds: Vec<Option<TextEncoderKind>> = clip.encoders.iter().map(TextEncoder::clip_kind).collect();
        if !(kinds.contains(&Some(TextEncoderKind::ClipL)) && kinds.contains(&Some(TextEncoderKind::ClipG))) {
            return Err(NodeError::typed(
                "KeyError",
                "'g': CLIPTextEncodeSDXL needs an SDXL CLIP (CLIP-L and CLIP-G); this CLIP has another family's encoders",
            ));
        }
        let paths = ctx.services.get::<Paths>();
        let text_g = clip.tokenize(inputs.string("text_g")?, paths);
        let text_l = clip.tokenize(inputs.string("text_l")?, paths);
        let empty = clip.tokenize("", paths);
        let mut tokens: ClipTokens = kinds
            .iter()
            .enumerate()
            .map(|(index, kind)| match kind {
                Some(TextEncoderKind::ClipL) => text_l[index].clone(),
                _ => text_g[index].clone(),
            })
            .collect();
        let chunks = tokens.iter().map(Vec::len).max().unwrap_or(1);
        for (encoder_tokens, empty) in tokens.iter_mut().zip(&empty) {
            while encoder_tokens.len() < chunks {
                encoder_tokens.extend(empty.iter().cloned());
            }
        }
        let conditioning = clip.encode(&tokens).map_err(tensor_error)?;
        let size = |name: &str| -> Result<Option<f64>, NodeError> { Ok(Some(inputs.int(name)? as f64)) };
        let sizes = SdxlSizes {
            width: size("width")?,
            height: size("height")?,
            crop_w: size("crop_w")?,
            crop_h: size("crop_h")?,
            target_width: size("target_width")?,
            target_height: size("target_height")?,
            aesthetic_score: None,
        };
        Ok(NodeOutput::values(vec![Value::object(with_sdxl_sizes(
            conditioning,
            sizes,
        ))]))
    }
}

/// `CLIPTextEncodeSD3`: a prompt for each of SD3's encoders (CLIP-L, CLIP-G, T5-XXL). With
/// `empty_padding` "none" an empty prompt is left out of its encoder (T5 then gives its end
/// token alone; both CLIPs empty leaves the CLIP part out); CLIP-L's and CLIP-G's chunks are
/// evened out with empty-prompt chunks, as ComfyUI's tokenizer counts them whichever encoders
/// the CLIP has.
pub struct ClipTextEncodeSd3;

impl Node for ClipTextEncodeSd3 {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("CLIPTextEncodeSD3", "comfy_extras.nodes_sd3", "advanced/conditioning")
            .required("clip", InputSpec::of("CLIP"))
            .required("clip_l", prompt_spec())
            .required("clip_g", prompt_spec())
            .required("t5xxl", prompt_spec())
            .required("empty_padding", InputSpec::combo_v3(&["none", "empty_prompt"]))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = clip_input(inputs)?;
        let paths = ctx.services.get::<Paths>();
        let no_padding = inputs.string("empty_padding")? == "none";
        // Each text's tokens for every encoder; an empty text without padding has none.
        let tokens_of = |name: &str| -> Result<Option<ClipTokens>, NodeError> {
            let text = inputs.string(name)?;
            Ok((!(text.is_empty() && no_padding)).then(|| clip.tokenize(text, paths)))
        };
        let (text_l, text_g, text_t5) = (tokens_of("clip_l")?, tokens_of("clip_g")?, tokens_of("t5xxl")?);
        let empty = clip.tokenize("", paths);
        // Chunk counts as the CLIP tokenizer makes them (the same for CLIP-L and CLIP-G).
        let first_clip = clip.encoders.iter().position(|encoder| encoder.clip_kind().is_some());
        let chunks = |tokens: &Option<ClipTokens>| match (tokens, first_clip) {
            (Some(tokens), Some(index)) => tokens[index].len(),
            _ => 0,
        };
        let (chunks_l, chunks_g) = (chunks(&text_l), chunks(&text_g));
        let own =
            |tokens: &Option<ClipTokens>, index: usize| tokens.as_ref().map_or_else(Vec::new, |t| t[index].clone());
        let tokens: ClipTokens = clip
            .encoders
            .iter()
            .enumerate()
            .map(|(index, encoder)| {
                let (mut own, other_chunks) = match (&encoder.network, encoder.clip_kind()) {
                    (TextNetwork::T5 { .. }, _) => return own(&text_t5, index),
                    (_, Some(TextEncoderKind::ClipL)) => (own(&text_l, index), chunks_g),
                    _ => (own(&text_g, index), chunks_l),
                };
                while own.len() < other_chunks {
                    own.extend(empty[index].iter().cloned());
                }
                own
            })
            .collect();
        let conditioning = clip.encode(&tokens).map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(conditioning)]))
    }
}

/// `CLIPTextEncodeSDXLRefiner`: a prompt with the aesthetic score and size the refiner's class
/// conditioning embeds.
pub struct ClipTextEncodeSdxlRefiner;

impl Node for ClipTextEncodeSdxlRefiner {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "CLIPTextEncodeSDXLRefiner",
            "comfy_extras.nodes_clip_sdxl",
            "advanced/conditioning",
        )
        .required("ascore", InputSpec::float(6.0, 0.0, 1000.0).opt("step", 0.01))
        .required("width", sdxl_size_spec(1024))
        .required("height", sdxl_size_spec(1024))
        .required("text", prompt_spec())
        .required("clip", InputSpec::of("CLIP"))
        .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = clip_input(inputs)?;
        let tokens = clip.tokenize(inputs.string("text")?, ctx.services.get::<Paths>());
        let conditioning = clip.encode(&tokens).map_err(tensor_error)?;
        let sizes = SdxlSizes {
            width: Some(inputs.int("width")? as f64),
            height: Some(inputs.int("height")? as f64),
            aesthetic_score: Some(inputs.float("ascore")?),
            ..SdxlSizes::default()
        };
        Ok(NodeOutput::values(vec![Value::object(with_sdxl_sizes(
            conditioning,
            sizes,
        ))]))
    }
}

/// `CLIPSetLastLayer`: take the text encoder's output from an earlier layer (clip skip).
pub struct ClipSetLastLayer;

impl Node for ClipSetLastLayer {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("CLIPSetLastLayer", "nodes", "conditioning")
            .display("CLIP Set Last Layer")
            .required("clip", InputSpec::of("CLIP"))
            .required("stop_at_clip_layer", InputSpec::int(-1, -24, -1).opt("step", 1))
            .output(OutputSpec::of("CLIP"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = inputs.object::<Clip>("clip")?;
        let layer = inputs.int("stop_at_clip_layer")?;
        Ok(NodeOutput::values(vec![Value::object(Clip {
            layer_from_end: Some(layer.unsigned_abs() as usize),
            ..clip.clone()
        })]))
    }
}

/// `ConditioningCombine`: both lists, one after the other.
pub struct ConditioningCombine;

impl Node for ConditioningCombine {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ConditioningCombine", "nodes", "conditioning")
            .display("Conditioning (Combine)")
            .required("conditioning_1", InputSpec::of("CONDITIONING"))
            .required("conditioning_2", InputSpec::of("CONDITIONING"))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut entries = inputs.object::<Conditioning>("conditioning_1")?.0.clone();
        entries.extend(inputs.object::<Conditioning>("conditioning_2")?.0.iter().cloned());
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// The first entry of `conditioning_from`, which ComfyUI's Average and Concat nodes apply (they
/// warn when there are more).
fn first_from<'a>(inputs: &'a NodeInputs, node: &str) -> Result<&'a CondEntry, NodeError> {
    let from = &inputs.object::<Conditioning>("conditioning_from")?.0;
    if from.len() > 1 {
        tracing::warn!(
            "Warning: {node} conditioning_from contains more than 1 cond, only the first one will actually be applied to conditioning_to."
        );
    }
    from.first()
        .ok_or_else(|| NodeError::typed("IndexError", "list index out of range"))
}

/// `ConditioningAverage`: each entry of `conditioning_to` weighted by the strength against the
/// first of `conditioning_from` (cut or zero-padded to its token count), pooled vectors too.
pub struct ConditioningAverage;

impl Node for ConditioningAverage {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ConditioningAverage", "nodes", "conditioning")
            .required("conditioning_to", InputSpec::of("CONDITIONING"))
            .required("conditioning_from", InputSpec::of("CONDITIONING"))
            .required(
                "conditioning_to_strength",
                InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01),
            )
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let from = first_from(inputs, "ConditioningAverage")?;
        let strength = inputs.float("conditioning_to_strength")?;
        let weighted = |to: &Tensor, from: &Tensor| (to * strength)? + (from * (1.0 - strength))?;
        let entries = inputs
            .object::<Conditioning>("conditioning_to")?
            .0
            .iter()
            .map(|to| {
                let (_, tokens, width) = to.cross_attention.dims3()?;
                let from_tokens = from.cross_attention.dim(1)?;
                let mut source = from.cross_attention.narrow(1, 0, from_tokens.min(tokens))?;
                if from_tokens < tokens {
                    let padding = Tensor::zeros((1, tokens - from_tokens, width), source.dtype(), source.device())?;
                    source = Tensor::cat(&[&source, &padding], 1)?;
                }
                // An entry without a pooled vector averages the source's with itself, as ComfyUI.
                let pooled = match (&to.pooled, &from.pooled) {
                    (to_pooled, Some(from_pooled)) => {
                        Some(weighted(to_pooled.as_ref().unwrap_or(from_pooled), from_pooled)?)
                    }
                    (to_pooled, None) => to_pooled.clone(),
                };
                Ok(CondEntry {
                    cross_attention: weighted(&to.cross_attention, &source)?,
                    pooled,
                    ..to.clone()
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// `ConditioningConcat`: the first entry of `conditioning_from`'s tokens appended to each entry
/// of `conditioning_to`.
pub struct ConditioningConcat;

impl Node for ConditioningConcat {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ConditioningConcat", "nodes", "conditioning")
            .display("Conditioning (Concat)")
            .required("conditioning_to", InputSpec::of("CONDITIONING"))
            .required("conditioning_from", InputSpec::of("CONDITIONING"))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let from = first_from(inputs, "ConditioningConcat")?;
        let entries = inputs
            .object::<Conditioning>("conditioning_to")?
            .0
            .iter()
            .map(|to| {
                Ok(CondEntry {
                    cross_attention: Tensor::cat(&[&to.cross_attention, &from.cross_attention], 1)?,
                    ..to.clone()
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// `ConditioningZeroOut`: zero embeddings and pooled vectors.
pub struct ConditioningZeroOut;

impl Node for ConditioningZeroOut {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ConditioningZeroOut", "nodes", "advanced/conditioning")
            .display("ConditioningZeroOut")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let entries = inputs
            .object::<Conditioning>("conditioning")?
            .0
            .iter()
            .map(|entry| {
                Ok(CondEntry {
                    cross_attention: entry.cross_attention.zeros_like()?,
                    pooled: entry.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
                    ..entry.clone()
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// `ConditioningSetTimestepRange`: the entries apply only between `start` and `end` of sampling.
pub struct ConditioningSetTimestepRange;

impl Node for ConditioningSetTimestepRange {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ConditioningSetTimestepRange", "nodes", "advanced/conditioning")
            .display("ConditioningSetTimestepRange")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("start", InputSpec::float(0.0, 0.0, 1.0).opt("step", 0.001))
            .required("end", InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.001))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let range = Some((inputs.float("start")?, inputs.float("end")?));
        let entries = inputs
            .object::<Conditioning>("conditioning")?
            .0
            .iter()
            .map(|entry| CondEntry {
                timestep_range: range,
                ..entry.clone()
            })
            .collect();
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// Every entry of the `conditioning` input with its region changed by `change`.
fn with_region(inputs: &NodeInputs, change: impl Fn(&mut CondRegion)) -> Result<NodeOutput, NodeError> {
    let entries = inputs
        .object::<Conditioning>("conditioning")?
        .0
        .iter()
        .map(|entry| {
            let mut entry = entry.clone();
            change(&mut entry.region);
            entry
        })
        .collect();
    Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
}

/// The area nodes' change: `area` at the `strength` input, not bounded by a mask.
fn set_area(inputs: &NodeInputs, area: AreaSpec) -> Result<NodeOutput, NodeError> {
    let strength = inputs.float("strength")?;
    with_region(inputs, |region| {
        region.area = Some(area);
        region.strength = Some(strength);
        region.set_area_to_bounds = false;
    })
}

fn region_strength_spec() -> InputSpec {
    InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.01)
}

/// `ConditioningSetArea`: the entries apply to a rectangle given in pixels (kept in latent
/// pixels, sizes and offsets divided by 8), at a strength.
pub struct ConditioningSetArea;

impl Node for ConditioningSetArea {
    fn schema(&self, _: &Services) -> NodeSchema {
        let size = || InputSpec::int(64, 64, MAX_RESOLUTION).opt("step", 8);
        let offset = || InputSpec::int(0, 0, MAX_RESOLUTION).opt("step", 8);
        NodeSchema::v1("ConditioningSetArea", "nodes", "conditioning")
            .display("Conditioning (Set Area)")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("width", size())
            .required("height", size())
            .required("x", offset())
            .required("y", offset())
            .required("strength", region_strength_spec())
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = |name: &str| -> Result<usize, NodeError> { Ok(inputs.int(name)?.max(0) as usize / 8) };
        let area = LatentArea {
            height: latent("height")?,
            width: latent("width")?,
            y: latent("y")?,
            x: latent("x")?,
        };
        set_area(inputs, AreaSpec::Latent(area))
    }
}

/// `ConditioningSetAreaPercentage`: the entries apply to a rectangle given as fractions of the
/// latent's size, at a strength.
pub struct ConditioningSetAreaPercentage;

impl Node for ConditioningSetAreaPercentage {
    fn schema(&self, _: &Services) -> NodeSchema {
        // ComfyUI writes the offsets' default as an integer 0, the sizes' as 1.0.
        let fraction = |default: serde_json::Value| {
            InputSpec::of("FLOAT")
                .opt("default", default)
                .opt("min", 0)
                .opt("max", 1.0)
                .opt("step", 0.01)
        };
        NodeSchema::v1("ConditioningSetAreaPercentage", "nodes", "conditioning")
            .display("Conditioning (Set Area with Percentage)")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("width", fraction(1.0.into()))
            .required("height", fraction(1.0.into()))
            .required("x", fraction(0.into()))
            .required("y", fraction(0.into()))
            .required("strength", region_strength_spec())
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let area = AreaSpec::Percentage {
            height: inputs.float("height")?,
            width: inputs.float("width")?,
            y: inputs.float("y")?,
            x: inputs.float("x")?,
        };
        set_area(inputs, area)
    }
}

/// `ConditioningSetAreaStrength`: the entries' strength alone.
pub struct ConditioningSetAreaStrength;

impl Node for ConditioningSetAreaStrength {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ConditioningSetAreaStrength", "nodes", "conditioning")
            .display("ConditioningSetAreaStrength")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("strength", region_strength_spec())
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let strength = inputs.float("strength")?;
        with_region(inputs, |region| region.strength = Some(strength))
    }
}

/// `ConditioningSetMask`: the entries apply where the mask is, weighted by it times the
/// strength; "mask bounds" also crops the prediction to the mask's bounding box.
pub struct ConditioningSetMask;

impl Node for ConditioningSetMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ConditioningSetMask", "nodes", "conditioning")
            .display("Conditioning (Set Mask)")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("mask", InputSpec::of("MASK"))
            .required("strength", region_strength_spec())
            .required("set_cond_area", InputSpec::combo(&["default", "mask bounds"]))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mask = inputs.object::<Mask>("mask")?.clone();
        let strength = inputs.float("strength")?;
        let bounds = inputs.string("set_cond_area")? != "default";
        with_region(inputs, |region| {
            region.mask = Some(mask.clone());
            region.mask_strength = Some(strength);
            region.set_area_to_bounds = bounds;
        })
    }
}
