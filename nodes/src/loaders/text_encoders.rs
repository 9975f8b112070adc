//! The text-encoder loaders: `CLIPLoader`, `DualCLIPLoader` (SDXL: CLIP-L and CLIP-G; FLUX:
//! CLIP-L and T5-XXL; SD3: any two of CLIP-L, CLIP-G and T5-XXL) and `TripleCLIPLoader` (SD3's
//! three), and what ComfyUI-GGUF's `CLIPLoaderGGUF` / `DualCLIPLoaderGGUF`
//! ([`crate::packs::gguf`]) share with them: they read GGUF text encoders too (a T5's llama.cpp
//! tensor names read as transformers' names). What a file holds is told from its tensors, so the
//! order of the files does not matter.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::t5::t5_name_from_llama_cpp;
use easel_models::checkpoint::{DetectError, Family, TextEncoderKind, TextEncoderLayout};
use easel_models::weights::{MappedWeights, RenamedWeights};

use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{
    build_t5, build_text_encoder, cached, file_names, file_size, model_file, open, open_gguf, undetected,
};
use crate::loaders::t5_tokenizer_files::TokenizerSearch;
use crate::model::clip::{Clip, TextEncoder};
use crate::runtime::device;

/// The architectures ComfyUI-GGUF's text-encoder loaders accept in `general.architecture`.
const TEXT_ARCHITECTURES: [&str; 4] = ["t5", "t5encoder", "llama", "qwen2vl"];

/// What a text-encoder file holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum EncoderFile {
    /// A CLIP text transformer this wide.
    Clip(usize),
    T5,
}

impl EncoderFile {
    fn describe(self) -> String {
        match self {
            EncoderFile::Clip(width) => format!("a CLIP text encoder {width} wide"),
            EncoderFile::T5 => "a T5 text encoder".into(),
        }
    }
}

/// A text-encoder file: safetensors, or (by its extension) a GGUF that passes ComfyUI-GGUF's
/// text-model check; a GGUF T5's tensors are read under transformers' names.
fn open_text_encoder(path: &Path) -> Result<Arc<dyn MappedWeights>, NodeError> {
    let Some(file) = open_gguf(path)? else {
        return Ok(open(path)?);
    };
    match file.architecture() {
        None | Some("pig") => Err(NodeError::typed(
            "ValueError",
            format!(
                "This text model is incompatible with llama.cpp!\nConsider using the safetensors version\n({})",
                path.display()
            ),
        )),
        Some(architecture) if !TEXT_ARCHITECTURES.contains(&architecture) => Err(NodeError::typed(
            "ValueError",
            format!("Unexpected text model architecture type in GGUF file: '{architecture}'"),
        )),
        Some("t5" | "t5encoder") => Ok(Arc::new(RenamedWeights::new(Arc::new(file), t5_name_from_llama_cpp))),
        Some(architecture) => Err(NodeError::new(format!(
            "'{}': GGUF text encoders of architecture '{architecture}' are not supported by Easel yet \
             (supported: t5)",
            path.display()
        ))),
    }
}

/// A text-encoder file, opened once and told apart by its tensors: a T5 encoder (it has T5's
/// final norm) or a CLIP one.
struct OpenedEncoder {
    path: PathBuf,
    file: Arc<dyn MappedWeights>,
    contents: EncoderFile,
}

impl OpenedEncoder {
    fn open(path: PathBuf) -> Result<Self, NodeError> {
        let file = open_text_encoder(&path)?;
        let contents = if file.has("encoder.final_layer_norm.weight") {
            EncoderFile::T5
        } else {
            EncoderFile::Clip(
                clip_layout(&path, file.as_ref(), TextEncoderKind::ClipL)?
                    .config
                    .hidden_size,
            )
        };
        Ok(OpenedEncoder { path, file, contents })
    }
}

/// The CLIP variant of a text-encoder file, told by its width as ComfyUI tells it by its
/// depth: 1024 wide is OpenCLIP-H, 1280 OpenCLIP-bigG, anything else CLIP-L.
fn clip_kind_by_width(width: usize) -> TextEncoderKind {
    match width {
        1024 => TextEncoderKind::ClipH,
        1280 => TextEncoderKind::ClipG,
        _ => TextEncoderKind::ClipL,
    }
}

/// The CLIP text encoder at the root of a standalone file, as `kind` (its activation follows it).
fn clip_layout(path: &Path, file: &dyn MappedWeights, kind: TextEncoderKind) -> Result<TextEncoderLayout, NodeError> {
    TextEncoderLayout::find(file, kind, "")
        .and_then(|found| found.ok_or_else(|| DetectError::Unrecognised("the file holds no tensor".into())))
        .map_err(|error| undetected(path, error))
}

/// Loads the CLIP text encoder of `encoder` as `kind` (cached per file and kind).
fn load_clip_encoder(
    ctx: &NodeContext,
    encoder: &OpenedEncoder,
    kind: TextEncoderKind,
) -> Result<TextEncoder, NodeError> {
    let device = device(ctx.services);
    let path = &encoder.path;
    let loaded = cached(ctx, path, kind.embedding_key(), || {
        let layout = clip_layout(path, encoder.file.as_ref(), kind)?;
        Ok((
            build_text_encoder(encoder.file.clone(), layout, &device)?,
            file_size(path),
        ))
    })?;
    Ok((*loaded).clone())
}

/// Loads the T5 encoder of `encoder` with its tokenizer (cached per file).
fn load_t5(ctx: &NodeContext, encoder: &OpenedEncoder) -> Result<TextEncoder, NodeError> {
    let device = device(ctx.services);
    let search = TokenizerSearch::of(ctx.services);
    let path = &encoder.path;
    let loaded = cached(ctx, path, "t5xxl", || {
        Ok((
            build_t5(path, encoder.file.clone(), "", &device, search)?,
            file_size(path),
        ))
    })?;
    Ok((*loaded).clone())
}

/// A CLIP of one file of `clip_type` (`CLIPLoader`, `CLIPLoaderGGUF`).
pub(crate) fn single_clip(ctx: &NodeContext, node: &str, path: PathBuf, clip_type: &str) -> Result<Clip, NodeError> {
    if !matches!(clip_type, "stable_diffusion" | "sd3") {
        return Err(NodeError::new(format!(
            "{node} type '{clip_type}' is not supported by Easel yet (supported: stable_diffusion, sd3)"
        )));
    }
    let encoder = OpenedEncoder::open(path)?;
    if clip_type == "sd3" {
        return sd3_clip(ctx, node, &[encoder]);
    }
    let kind = match encoder.contents {
        EncoderFile::Clip(width) => clip_kind_by_width(width),
        EncoderFile::T5 => {
            return Err(NodeError::new(format!(
                "{node}: '{}' holds a T5 text encoder, which Easel uses with DualCLIPLoader type 'flux' \
                 (beside a CLIP-L) so far",
                encoder.path.display()
            )))
        }
    };
    // As ComfyUI: CLIP-L is SD1.x's encoder, OpenCLIP-H SD2.x's, bigG alone the refiner's.
    let family = match kind {
        TextEncoderKind::ClipL => Family::Sd1,
        TextEncoderKind::ClipH => Family::Sd2,
        TextEncoderKind::ClipG => Family::SdxlRefiner,
    };
    Ok(Clip {
        family,
        encoders: vec![load_clip_encoder(ctx, &encoder, kind)?],
        layer_from_end: None,
        t5_padding: None,
        hooks: None,
    })
}

/// A CLIP of two files of `clip_type` (`DualCLIPLoader`, `DualCLIPLoaderGGUF`): SDXL's CLIP-L
/// (the narrower) and CLIP-G, or FLUX's CLIP-L and T5-XXL, in either order.
pub(crate) fn dual_clip(
    ctx: &NodeContext,
    node: &str,
    paths: [PathBuf; 2],
    clip_type: &str,
) -> Result<Clip, NodeError> {
    if !matches!(clip_type, "sdxl" | "sd3" | "flux") {
        return Err(NodeError::new(format!(
            "{node} type '{clip_type}' is not supported by Easel yet (supported: sdxl, sd3, flux)"
        )));
    }
    let [first, second] = paths;
    let files = [OpenedEncoder::open(first)?, OpenedEncoder::open(second)?];
    if clip_type == "sd3" {
        return sd3_clip(ctx, node, &files);
    }
    let mismatch = |needs: &str| {
        NodeError::new(format!(
            "{node} type '{clip_type}' needs {needs}; the files hold {} and {}",
            files[0].contents.describe(),
            files[1].contents.describe()
        ))
    };
    if clip_type == "flux" {
        let clip_l = files
            .iter()
            .find(|encoder| matches!(encoder.contents, EncoderFile::Clip(_)));
        let t5 = files.iter().find(|encoder| encoder.contents == EncoderFile::T5);
        let (Some(clip_l), Some(t5)) = (clip_l, t5) else {
            return Err(mismatch("a CLIP-L and a T5-XXL text encoder"));
        };
        return Ok(Clip {
            family: Family::Flux,
            encoders: vec![
                load_clip_encoder(ctx, clip_l, TextEncoderKind::ClipL)?,
                load_t5(ctx, t5)?,
            ],
            layer_from_end: None,
            t5_padding: None,
            hooks: None,
        });
    }
    let (EncoderFile::Clip(first), EncoderFile::Clip(second)) = (files[0].contents, files[1].contents) else {
        return Err(mismatch("a CLIP-L and a CLIP-G text encoder"));
    };
    if first == second {
        return Err(mismatch("a CLIP-L and a CLIP-G text encoder"));
    }
    let (clip_l, clip_g) = if first < second {
        (&files[0], &files[1])
    } else {
        (&files[1], &files[0])
    };
    Ok(Clip {
        family: Family::Sdxl,
        encoders: vec![
            load_clip_encoder(ctx, clip_l, TextEncoderKind::ClipL)?,
            load_clip_encoder(ctx, clip_g, TextEncoderKind::ClipG)?,
        ],
        layer_from_end: None,
        t5_padding: None,
        hooks: None,
    })
}

/// SD3's CLIP of `files`, any of CLIP-L, CLIP-G and T5-XXL (ComfyUI's `sd3_clip` with the
/// encoders that are there), in SD3's order. Of two CLIP files the narrower is CLIP-L; one alone
/// is CLIP-G if it is 1280 wide, else CLIP-L.
fn sd3_clip(ctx: &NodeContext, node: &str, files: &[OpenedEncoder]) -> Result<Clip, NodeError> {
    let widths: Vec<usize> = files
        .iter()
        .filter_map(|file| match file.contents {
            EncoderFile::Clip(width) => Some(width),
            EncoderFile::T5 => None,
        })
        .collect();
    let t5_files = files.len() - widths.len();
    let distinct_clips = widths.len() < 2 || widths[0] != widths[1];
    if widths.len() > 2 || t5_files > 1 || !distinct_clips {
        let held: Vec<String> = files.iter().map(|file| file.contents.describe()).collect();
        return Err(NodeError::new(format!(
            "{node} type 'sd3' needs at most one each of CLIP-L, CLIP-G and T5-XXL; the files hold {}",
            held.join(", ")
        )));
    }
    let narrowest = widths.iter().copied().min();
    let kind_of = |width: usize| match (widths.len(), clip_kind_by_width(width)) {
        (2, _) if Some(width) == narrowest => TextEncoderKind::ClipL,
        (2, _) | (_, TextEncoderKind::ClipG) => TextEncoderKind::ClipG,
        _ => TextEncoderKind::ClipL,
    };
    let mut encoders = Vec::with_capacity(files.len());
    for kind in [TextEncoderKind::ClipL, TextEncoderKind::ClipG] {
        for file in files {
            if matches!(file.contents, EncoderFile::Clip(width) if kind_of(width) == kind) {
                encoders.push(load_clip_encoder(ctx, file, kind)?);
            }
        }
    }
    if let Some(t5) = files.iter().find(|file| file.contents == EncoderFile::T5) {
        encoders.push(load_t5(ctx, t5)?);
    }
    Ok(Clip {
        family: Family::Sd3,
        encoders,
        layer_from_end: None,
        t5_padding: None,
        hooks: None,
    })
}

/// A one-file CLIP loader node's work: the `clip_name` and `type` inputs.
pub(crate) fn single_clip_node(ctx: &NodeContext, inputs: &NodeInputs, node: &str) -> Result<NodeOutput, NodeError> {
    let path = model_file(ctx, "text_encoders", inputs.string("clip_name")?)?;
    let clip = single_clip(ctx, node, path, inputs.string("type")?)?;
    Ok(NodeOutput::values(vec![Value::object(clip)]))
}

/// A two-file CLIP loader node's work: the `clip_name1`, `clip_name2` and `type` inputs.
pub(crate) fn dual_clip_node(ctx: &NodeContext, inputs: &NodeInputs, node: &str) -> Result<NodeOutput, NodeError> {
    let paths = [
        model_file(ctx, "text_encoders", inputs.string("clip_name1")?)?,
        model_file(ctx, "text_encoders", inputs.string("clip_name2")?)?,
    ];
    let clip = dual_clip(ctx, node, paths, inputs.string("type")?)?;
    Ok(NodeOutput::values(vec![Value::object(clip)]))
}

/// The `device` input of the CLIP loaders (`cpu` forces the CPU, which is where Easel's text
/// encoders run unless a device is configured).
fn clip_device_input(schema: NodeSchema) -> NodeSchema {
    schema.optional("device", InputSpec::combo(&["default", "cpu"]).opt("advanced", true))
}

pub(crate) const CLIP_TYPES: [&str; 16] = [
    "stable_diffusion",
    "stable_cascade",
    "sd3",
    "stable_audio",
    "mochi",
    "ltxv",
    "pixart",
    "cosmos",
    "lumina2",
    "wan",
    "hidream",
    "chroma",
    "ace",
    "omnigen2",
    "qwen_image",
    "hunyuan_image",
];

pub(crate) const DUAL_CLIP_TYPES: [&str; 6] = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"];

/// `CLIPLoader` ("Load CLIP"): one text-encoder file.
pub struct ClipLoader;

impl Node for ClipLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        clip_device_input(
            NodeSchema::v1("CLIPLoader", "nodes", "advanced/loaders")
                .display("Load CLIP")
                .description("[Recipes]\n\nstable_diffusion: clip-l\nstable_cascade: clip-g\nsd3: t5 xxl/ clip-g / clip-l\nstable_audio: t5 base\nmochi: t5 xxl\ncosmos: old t5 xxl\nlumina2: gemma 2 2B\nwan: umt5 xxl\n hidream: llama-3.1 (Recommend) or t5\nomnigen2: qwen vl 2.5 3B")
                .required("clip_name", InputSpec::combo(&file_names(services, "text_encoders")))
                .model_folder("clip_name", "text_encoders")
                .required("type", InputSpec::combo(&CLIP_TYPES)),
        )
        .output(OutputSpec::of("CLIP"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("clip_name", "text_encoders")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        single_clip_node(ctx, inputs, "CLIPLoader")
    }
}

/// `DualCLIPLoader`: two text-encoder files that together make a family's CLIP.
pub struct DualClipLoader;

impl Node for DualClipLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        let names = file_names(services, "text_encoders");
        clip_device_input(
            NodeSchema::v1("DualCLIPLoader", "nodes", "advanced/loaders")
                .display("DualCLIPLoader")
                .description("[Recipes]\n\nsdxl: clip-l, clip-g\nsd3: clip-l, clip-g / clip-l, t5 / clip-g, t5\nflux: clip-l, t5\nhidream: at least one of t5 or llama, recommended t5 and llama\nhunyuan_image: qwen2.5vl 7b and byt5 small")
                .required("clip_name1", InputSpec::combo(&names))
                .required("clip_name2", InputSpec::combo(&names))
                .model_folder("clip_name1", "text_encoders")
                .model_folder("clip_name2", "text_encoders")
                .required("type", InputSpec::combo(&DUAL_CLIP_TYPES)),
        )
        .output(OutputSpec::of("CLIP"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(
            services,
            inputs,
            &[("clip_name1", "text_encoders"), ("clip_name2", "text_encoders")],
        )
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        dual_clip_node(ctx, inputs, "DualCLIPLoader")
    }
}

/// `TripleCLIPLoader`: SD3's CLIP-L, CLIP-G and T5-XXL files, in any order.
pub struct TripleClipLoader;

impl Node for TripleClipLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        let names = file_names(services, "text_encoders");
        NodeSchema::v3("TripleCLIPLoader", "comfy_extras.nodes_sd3", "advanced/loaders")
            .description("[Recipes]\n\nsd3: clip-l, clip-g, t5")
            .required("clip_name1", InputSpec::combo_v3(&names))
            .required("clip_name2", InputSpec::combo_v3(&names))
            .required("clip_name3", InputSpec::combo_v3(&names))
            .model_folder("clip_name1", "text_encoders")
            .model_folder("clip_name2", "text_encoders")
            .model_folder("clip_name3", "text_encoders")
            .output(OutputSpec::of("CLIP"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &TRIPLE_CLIP_FILES)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        triple_clip_node(ctx, inputs, "TripleCLIPLoader")
    }
}

/// The file inputs of the three-file CLIP loaders, and their folder.
pub(crate) const TRIPLE_CLIP_FILES: [(&str, &str); 3] = [
    ("clip_name1", "text_encoders"),
    ("clip_name2", "text_encoders"),
    ("clip_name3", "text_encoders"),
];

/// A three-file CLIP loader node's work (`TripleCLIPLoader`, `TripleCLIPLoaderGGUF`): SD3's
/// CLIP of the `clip_name1`, `clip_name2` and `clip_name3` inputs.
pub(crate) fn triple_clip_node(ctx: &NodeContext, inputs: &NodeInputs, node: &str) -> Result<NodeOutput, NodeError> {
    let files = TRIPLE_CLIP_FILES
        .into_iter()
        .map(|(input, folder)| OpenedEncoder::open(model_file(ctx, folder, inputs.string(input)?)?))
        .collect::<Result<Vec<_>, NodeError>>()?;
    let clip = sd3_clip(ctx, node, &files)?;
    Ok(NodeOutput::values(vec![Value::object(clip)]))
}
