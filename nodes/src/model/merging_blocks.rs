//! The model-specific block merges of ComfyUI's
//! `comfy_extras/nodes_model_merging_model_specific.py` (`advanced/model_merging/model_specific`):
//! ModelMergeSD1, ModelMergeSD2, ModelMergeSDXL, ModelMergeSD3_2B, ModelMergeSD35_Large and
//! ModelMergeFlux1. Each is `ModelMergeBlocks`
//! with one ratio input per block of its network, named by the block's tensor-name prefix
//! (`input_blocks.3.`, `double_blocks.7.`, …): every tensor is merged as
//! `ratio·model1 + (1 − ratio)·model2` at the ratio of the longest prefix its name starts with
//! (the first input's where none does). The inputs are generated from [`BlockLayout`] tables.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};

use crate::model::merging::{block_ratio, merged_model};

const MODULE: &str = "comfy_extras.nodes_model_merging_model_specific";
const CATEGORY: &str = "advanced/model_merging/model_specific";

/// One entry of a block table: a single prefix, or `count` numbered ones
/// (`{stem}{index}{suffix}` for index 0..count).
enum Blocks {
    One(&'static str),
    Numbered {
        stem: &'static str,
        count: usize,
        suffix: &'static str,
    },
}

const fn numbered(stem: &'static str, count: usize, suffix: &'static str) -> Blocks {
    Blocks::Numbered { stem, count, suffix }
}

/// The SD1.x/SD2.x UNet's blocks (ComfyUI's `ModelMergeSD1`, which ModelMergeSD2 also is).
const SD1_BLOCKS: &[Blocks] = &[
    Blocks::One("time_embed."),
    Blocks::One("label_emb."),
    numbered("input_blocks.", 12, "."),
    numbered("middle_block.", 3, "."),
    numbered("output_blocks.", 12, "."),
    Blocks::One("out."),
];

/// The SDXL UNet's blocks; ComfyUI names the numbered ones without a trailing dot.
const SDXL_BLOCKS: &[Blocks] = &[
    Blocks::One("time_embed."),
    Blocks::One("label_emb."),
    numbered("input_blocks.", 9, ""),
    numbered("middle_block.", 3, ""),
    numbered("output_blocks.", 9, ""),
    Blocks::One("out."),
];

/// The FLUX.1 transformer's blocks, under the BFL tensor names.
const FLUX1_BLOCKS: &[Blocks] = &[
    Blocks::One("img_in."),
    Blocks::One("time_in."),
    Blocks::One("guidance_in"),
    Blocks::One("vector_in."),
    Blocks::One("txt_in."),
    numbered("double_blocks.", 19, "."),
    numbered("single_blocks.", 38, "."),
    Blocks::One("final_layer."),
];

/// SD3's MMDiT blocks, `joint_blocks` of them (24 in SD3 medium, 38 in SD3.5 large).
const fn sd3_blocks(joint_blocks: usize) -> [Blocks; 7] {
    [
        Blocks::One("pos_embed."),
        Blocks::One("x_embedder."),
        Blocks::One("context_embedder."),
        Blocks::One("y_embedder."),
        Blocks::One("t_embedder."),
        numbered("joint_blocks.", joint_blocks, "."),
        Blocks::One("final_layer."),
    ]
}
const SD3_2B_BLOCKS: &[Blocks] = &sd3_blocks(24);
const SD35_LARGE_BLOCKS: &[Blocks] = &sd3_blocks(38);

/// Which network's blocks a model-specific merge node has a ratio for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLayout {
    Sd1,
    Sd2,
    Sdxl,
    Sd3Medium,
    Sd35Large,
    Flux1,
}

impl BlockLayout {
    /// The node's class name.
    pub fn node_name(self) -> &'static str {
        match self {
            BlockLayout::Sd1 => "ModelMergeSD1",
            BlockLayout::Sd2 => "ModelMergeSD2",
            BlockLayout::Sdxl => "ModelMergeSDXL",
            BlockLayout::Sd3Medium => "ModelMergeSD3_2B",
            BlockLayout::Sd35Large => "ModelMergeSD35_Large",
            BlockLayout::Flux1 => "ModelMergeFlux1",
        }
    }

    /// The block prefixes, in the node's input order.
    pub fn prefixes(self) -> Vec<String> {
        let table = match self {
            BlockLayout::Sd1 | BlockLayout::Sd2 => SD1_BLOCKS,
            BlockLayout::Sdxl => SDXL_BLOCKS,
            BlockLayout::Sd3Medium => SD3_2B_BLOCKS,
            BlockLayout::Sd35Large => SD35_LARGE_BLOCKS,
            BlockLayout::Flux1 => FLUX1_BLOCKS,
        };
        table
            .iter()
            .flat_map(|blocks| match blocks {
                Blocks::One(prefix) => vec![prefix.to_string()],
                Blocks::Numbered { stem, count, suffix } => {
                    (0..*count).map(|index| format!("{stem}{index}{suffix}")).collect()
                }
            })
            .collect()
    }
}

/// `ModelMergeSD1`, `ModelMergeSD2`, `ModelMergeSDXL`, `ModelMergeSD3_2B`,
/// `ModelMergeSD35_Large`, `ModelMergeFlux1`: `ModelMergeBlocks`
/// with a ratio per block of `layout`.
pub struct ModelMergeModelSpecific {
    pub layout: BlockLayout,
}

impl Node for ModelMergeModelSpecific {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v1(self.layout.node_name(), MODULE, CATEGORY)
            .required("model1", InputSpec::of("MODEL"))
            .required("model2", InputSpec::of("MODEL"));
        self.layout
            .prefixes()
            .iter()
            .fold(schema, |schema, prefix| {
                schema.required(prefix, InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01))
            })
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut blocks = Vec::new();
        for prefix in self.layout.prefixes() {
            let ratio = inputs.float(&prefix)? as f32;
            blocks.push((prefix, ratio));
        }
        merged_model(inputs, |name| {
            let ratio = block_ratio(&blocks, name);
            (1.0 - ratio, ratio)
        })
    }
}
