//! The `_for_testing/conditioning` nodes of `comfy_extras/nodes_cond.py`: CLIPTextEncodeControlnet
//! (a prompt encoded for the entries' ControlNets) and T5TokenizerOptions (how T5 prompts are
//! padded).

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::text::t5_tokenizer::T5Padding;

use crate::conditioning::nodes::{clip_input, prompt_spec};
use crate::conditioning::{CondEntry, Conditioning, ControlnetText};
use crate::model::clip::Clip;
use crate::paths::Paths;
use crate::runtime::{experimental, tensor_error};

const MODULE: &str = "comfy_extras.nodes_cond";
const CATEGORY: &str = "_for_testing/conditioning";

/// `CLIPTextEncodeControlnet`: every entry of `conditioning` with `text` encoded by `clip` as
/// the text its ControlNets see.
pub struct ClipTextEncodeControlnet;

impl Node for ClipTextEncodeControlnet {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("CLIPTextEncodeControlnet", MODULE, CATEGORY)
                .required("clip", InputSpec::of("CLIP"))
                .required("conditioning", InputSpec::of("CONDITIONING"))
                .required("text", prompt_spec())
                .output(OutputSpec::of("CONDITIONING")),
        )
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = clip_input(inputs)?;
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let tokens = clip.tokenize(inputs.string("text")?, ctx.services.get::<Paths>());
        let encoded = clip.encode(&tokens).map_err(tensor_error)?;
        let Some(text) = encoded.0.into_iter().next() else {
            return Err(NodeError::new("the CLIP encoded the prompt to nothing"));
        };
        let controlnet_text = ControlnetText {
            cross_attention: text.cross_attention,
            pooled: text.pooled,
        };
        let entries = conditioning
            .0
            .iter()
            .map(|entry| CondEntry {
                controlnet_text: Some(controlnet_text.clone()),
                ..entry.clone()
            })
            .collect();
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// `T5TokenizerOptions`: the CLIP with its T5 prompts padded by `min_padding` tokens and to at
/// least `min_length` (0 and 0: no padding at all, where FLUX pads to 256 by default).
pub struct T5TokenizerOptions;

impl Node for T5TokenizerOptions {
    fn schema(&self, _: &Services) -> NodeSchema {
        let count = || InputSpec::int(0, 0, 10000).opt("step", 1);
        experimental(
            NodeSchema::v3("T5TokenizerOptions", MODULE, CATEGORY)
                .required("clip", InputSpec::of("CLIP"))
                .required("min_padding", count())
                .required("min_length", count())
                .output(OutputSpec::of("CLIP")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = inputs.object::<Clip>("clip")?;
        let count = |name: &str| -> Result<usize, NodeError> { Ok(inputs.int(name)?.max(0) as usize) };
        let padding = T5Padding {
            min_padding: count("min_padding")?,
            min_length: count("min_length")?,
        };
        Ok(NodeOutput::values(vec![Value::object(Clip {
            t5_padding: Some(padding),
            ..clip.clone()
        })]))
    }
}
