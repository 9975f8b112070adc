//! GLIGEN (`nodes.py`): the GLIGEN value, GLIGENLoader and GLIGENTextBoxApply, which adds a
//! text box to each entry; sampling turns an entry's boxes into object tokens and gives the
//! UNet's transformer blocks the model's gated attention to them ([`GligenPatch`]).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeObject, NodeOutput, Services, Value};
use easel_models::architectures::gligen::{Gligen, GligenConfig, TextBox};
use easel_models::architectures::unet_patches::{AttentionSite, UNetPatch};
use easel_models::kernels::sgemm::Precision;
use easel_models::weights::WeightSource;
use serde_json::{Map, Value as Json};

use super::{CondEntry, Conditioning};
use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{cached, file_names, file_size, model_file, open_weight_file, undetected};
use crate::model::clip::Clip;
use crate::paths::Paths;
use crate::runtime::{device, tensor_error};

const FOLDER: &str = "gligen";

/// The GLIGEN socket.
#[derive(Clone)]
pub struct GligenModel(pub Arc<Gligen>);

impl std::fmt::Debug for GligenModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Gligen")
    }
}

impl NodeObject for GligenModel {
    fn type_name(&self) -> &'static str {
        "GLIGEN"
    }
}

/// An entry's GLIGEN model and text boxes (ComfyUI's `("position", model, boxes)`).
#[derive(Clone)]
pub struct GligenBoxes {
    pub model: Arc<Gligen>,
    pub boxes: Vec<TextBox>,
}

impl std::fmt::Debug for GligenBoxes {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "GligenBoxes({} boxes)", self.boxes.len())
    }
}

/// `comfy.sd.load_gligen`: a GLIGEN file, and its size.
pub fn load_gligen(path: &Path, device: &Device) -> Result<(Gligen, u64), NodeError> {
    let file = open_weight_file(path)?;
    let config = GligenConfig::infer(file.as_ref()).map_err(|error| undetected(path, error))?;
    let source = WeightSource::new(file, "", device, Precision::F32);
    let gligen = Gligen::new(config, source.weights()).map_err(tensor_error)?;
    Ok((gligen, file_size(path)))
}

/// `GLIGENLoader`.
pub struct GligenLoader;

impl Node for GligenLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("GLIGENLoader", "nodes", "loaders")
            .display("GLIGENLoader")
            .required("gligen_name", InputSpec::combo(&file_names(services, FOLDER)))
            .model_folder("gligen_name", FOLDER)
            .output(OutputSpec::of("GLIGEN"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("gligen_name", FOLDER)])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let path = model_file(ctx, FOLDER, inputs.string("gligen_name")?)?;
        let device = device(ctx.services);
        let gligen = cached(ctx, &path, "gligen", || load_gligen(&path, &device))?;
        Ok(NodeOutput::values(vec![Value::object(GligenModel(gligen))]))
    }
}

/// `GLIGENTextBoxApply`: `text`'s pooled vector (unprojected) placed at the box `x, y, width,
/// height` (pixels, taken in whole latent pixels), added to each entry's boxes.
pub struct GligenTextBoxApply;

impl Node for GligenTextBoxApply {
    fn schema(&self, _: &Services) -> NodeSchema {
        let size = || InputSpec::int(64, 8, 16384).opt("step", 8);
        let place = || InputSpec::int(0, 0, 16384).opt("step", 8);
        NodeSchema::v1("GLIGENTextBoxApply", "nodes", "conditioning/gligen")
            .display("GLIGENTextBoxApply")
            .required("conditioning_to", InputSpec::of("CONDITIONING"))
            .required("clip", InputSpec::of("CLIP"))
            .required("gligen_textbox_model", InputSpec::of("GLIGEN"))
            .required(
                "text",
                InputSpec::of("STRING")
                    .opt("multiline", true)
                    .opt("dynamicPrompts", true),
            )
            .required("width", size())
            .required("height", size())
            .required("x", place())
            .required("y", place())
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning_to")?;
        let clip = inputs.object::<Clip>("clip")?;
        let GligenModel(model) = inputs.object::<GligenModel>("gligen_textbox_model")?;
        let tokens = clip.tokenize(inputs.string("text")?, ctx.services.get::<Paths>());
        let text = clip.unprojected_pooled(&tokens).map_err(tensor_error)?;
        let latent_pixels =
            |name: &str| -> Result<usize, NodeError> { Ok(usize::try_from(inputs.int(name)?).unwrap_or(0) / 8) };
        let text_box = TextBox {
            text,
            height: latent_pixels("height")?,
            width: latent_pixels("width")?,
            y: latent_pixels("y")?,
            x: latent_pixels("x")?,
        };
        let entries = conditioning
            .0
            .iter()
            .map(|entry| {
                let mut boxes = match &entry.gligen {
                    Some(gligen) => gligen.boxes.clone(),
                    None => Vec::new(),
                };
                boxes.push(text_box.clone());
                CondEntry {
                    gligen: Some(GligenBoxes {
                        model: model.clone(),
                        boxes,
                    }),
                    ..entry.clone()
                }
            })
            .collect();
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// The UNet patch of one model call for an entry with boxes: the object tokens made for the
/// call's latent, attended to after every transformer block's self-attention.
pub(crate) struct GligenPatch {
    model: Arc<Gligen>,
    objects: Tensor,
}

impl GligenPatch {
    /// The patch for `gligen`'s boxes on a latent of `batch × height × width`.
    pub(crate) fn new(gligen: &GligenBoxes, batch: usize, height: usize, width: usize) -> candle_core::Result<Self> {
        Ok(GligenPatch {
            objects: gligen.model.objects(&gligen.boxes, batch, height, width)?,
            model: gligen.model.clone(),
        })
    }
}

impl UNetPatch for GligenPatch {
    fn after_self_attention(&self, site: &AttentionSite, x: Tensor) -> candle_core::Result<Tensor> {
        self.model
            .after_self_attention(site.transformer_index, &x, &self.objects)
    }
}
