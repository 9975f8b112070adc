//! Skip-layer guidance for DiT models (`comfy_extras.nodes_slg`): the model predicted again with
//! some of its double and single blocks skipped ([`DitPatches`] replacements that pass the
//! block's inputs through), and guidance pushed away from that prediction.
//!
//! - SkipLayerGuidanceDiT ([`SkipLayerGuidance`], a post-CFG function): within its σ range, the
//!   guided prediction plus `scale·(cond − cond with blocks skipped)`, optionally rescaled towards
//!   the positive prediction's standard deviation;
//! - SkipLayerGuidanceDiTSimple ([`SkipLayerGuidanceSimple`], a function predicting both sides):
//!   within its σ range, the negative side predicted with the blocks skipped;
//! - SkipLayerGuidanceSD3 (`comfy_extras.nodes_sd3`): SkipLayerGuidanceDiT on the MMDiT's joint
//!   blocks, without rescaling.
//!
//! A UNet has no such blocks: as in ComfyUI, the skips then change nothing, but the extra
//! prediction and the rescaling still happen.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::dit_patches::{
    BlockInputs, BlockOutputs, BlockReplace, BlockSite, DitBlock, DitPatches, OriginalBlock,
};

use crate::model::diffusion_model::{DiffusionModel, Model};
use crate::model::patches::{
    CallPatches, CondBatchFunction, GuidanceArgs, GuidedPredictions, ModelPatches, PostCfgFunction,
};
use crate::runtime::experimental;

/// The Python module of both nodes.
const MODULE: &str = "comfy_extras.nodes_slg";

/// The block numbers in `layers`: every run of ASCII digits (ComfyUI's `re.findall(r'\d+')`), a
/// number too large for any block kept as one no block has.
pub fn layer_numbers(layers: &str) -> Vec<usize> {
    layers
        .split(|c: char| !c.is_ascii_digit())
        .filter(|digits| !digits.is_empty())
        .map(|digits| digits.parse().unwrap_or(usize::MAX))
        .collect()
}

/// The double blocks named by `double_layers` and the single blocks named by `single_layers`.
pub fn skipped_blocks(double_layers: &str, single_layers: &str) -> Vec<DitBlock> {
    let double = layer_numbers(double_layers).into_iter().map(DitBlock::Double);
    let single = layer_numbers(single_layers).into_iter().map(DitBlock::Single);
    double.chain(single).collect()
}

/// A block replaced by nothing: its inputs are its outputs.
struct SkipBlock;

impl BlockReplace for SkipBlock {
    fn replace(&self, _: &BlockSite, inputs: BlockInputs, _: &OriginalBlock) -> Result<BlockOutputs> {
        Ok(inputs.unchanged())
    }
}

/// The call patches that skip `blocks`.
pub fn skipping(blocks: &[DitBlock]) -> CallPatches {
    let mut dit = DitPatches::default();
    for block in blocks {
        dit.replace(*block, Arc::new(SkipBlock));
    }
    CallPatches {
        dit,
        ..CallPatches::default()
    }
}

/// Whether `sigma` lies in [`sigma_end`, `sigma_start`] (σ falls as sampling goes on).
fn within(sigma: f32, sigma_start: f64, sigma_end: f64) -> bool {
    let sigma = f64::from(sigma);
    sigma >= sigma_end && sigma <= sigma_start
}

/// SkipLayerGuidanceDiT's post-CFG function.
pub struct SkipLayerGuidance {
    pub blocks: Vec<DitBlock>,
    pub scale: f64,
    pub rescaling_scale: f64,
    /// The σ range it applies in (from `start_percent` and `end_percent`).
    pub sigma_start: f64,
    pub sigma_end: f64,
}

impl PostCfgFunction for SkipLayerGuidance {
    fn apply(&self, args: &GuidanceArgs, predictions: &GuidedPredictions, denoised: Tensor) -> Result<Tensor> {
        if self.scale <= 0.0 || !within(args.sigma, self.sigma_start, self.sigma_end) {
            return Ok(denoised);
        }
        let skipped = args
            .model
            .predict_side(args.cond, args.x, args.sigma, &skipping(&self.blocks))?;
        let guided = (denoised + ((&predictions.cond - skipped)? * self.scale)?)?;
        if self.rescaling_scale == 0.0 {
            return Ok(guided);
        }
        let std = |t: &Tensor| -> Result<Tensor> { t.flatten_all()?.var(0)?.sqrt() };
        let factor = (std(&predictions.cond)? / std(&guided)?)?;
        let factor = factor.affine(self.rescaling_scale, 1.0 - self.rescaling_scale)?;
        guided.broadcast_mul(&factor)
    }
}

/// SkipLayerGuidanceDiTSimple's function predicting both sides: within its σ range, and where
/// the negative side is predicted at all, that side with the blocks skipped.
pub struct SkipLayerGuidanceSimple {
    pub blocks: Vec<DitBlock>,
    pub sigma_start: f64,
    pub sigma_end: f64,
}

impl CondBatchFunction for SkipLayerGuidanceSimple {
    fn predict(&self, args: &GuidanceArgs) -> Result<Option<[Tensor; 2]>> {
        let Some(uncond) = args.uncond else {
            return Ok(None);
        };
        if !within(args.sigma, self.sigma_start, self.sigma_end) {
            return Ok(None);
        }
        let cond = args
            .model
            .predict_side(args.cond, args.x, args.sigma, &CallPatches::default())?;
        let uncond = args
            .model
            .predict_side(uncond, args.x, args.sigma, &skipping(&self.blocks))?;
        Ok(Some([cond, uncond]))
    }
}

fn layers_spec() -> InputSpec {
    InputSpec::string("7, 8, 9").opt("multiline", false)
}

fn percent_spec(default: f64) -> InputSpec {
    InputSpec::float(default, 0.0, 1.0).opt("step", 0.001)
}

/// The `model` input with `patch` applied to its patches, for the blocks its `double_layers`
/// and `single_layers` inputs name.
fn patched(
    inputs: &NodeInputs,
    patch: impl FnOnce(&DiffusionModel, Vec<DitBlock>) -> ModelPatches,
) -> std::result::Result<NodeOutput, NodeError> {
    let model = inputs.object::<Model>("model")?;
    let blocks = skipped_blocks(inputs.string("double_layers")?, inputs.string("single_layers")?);
    with_skip_patch(model, &blocks.clone(), |model| patch(model, blocks))
}

/// `model` with `patch` applied to its patches; the model itself (no new value) when `blocks`
/// is empty, as ComfyUI returns it.
fn with_skip_patch(
    model: &Model,
    blocks: &[DitBlock],
    patch: impl FnOnce(&DiffusionModel) -> ModelPatches,
) -> std::result::Result<NodeOutput, NodeError> {
    if blocks.is_empty() {
        return Ok(NodeOutput::values(vec![Value::object(model.clone())]));
    }
    let patched = DiffusionModel {
        patches: patch(&model.0),
        ..(*model.0).clone()
    };
    Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(patched)))]))
}

/// `SkipLayerGuidanceDiT`.
pub struct SkipLayerGuidanceDitNode;

impl Node for SkipLayerGuidanceDitNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("SkipLayerGuidanceDiT", MODULE, "advanced/guidance")
                .description("Generic version of SkipLayerGuidance node that can be used on every DiT model.")
                .required("model", InputSpec::of("MODEL"))
                .required("double_layers", layers_spec())
                .required("single_layers", layers_spec())
                .required("scale", InputSpec::float(3.0, 0.0, 10.0).opt("step", 0.1))
                .required("start_percent", percent_spec(0.01))
                .required("end_percent", percent_spec(0.15))
                .required("rescaling_scale", InputSpec::float(0.0, 0.0, 10.0).opt("step", 0.01))
                .output(OutputSpec::of("MODEL")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let (scale, rescaling_scale) = (inputs.float("scale")?, inputs.float("rescaling_scale")?);
        let (start, end) = (inputs.float("start_percent")?, inputs.float("end_percent")?);
        patched(inputs, |model, blocks| {
            model.patches.with_post_cfg(Arc::new(SkipLayerGuidance {
                blocks,
                scale,
                rescaling_scale,
                sigma_start: model.schedule.percent_to_sigma(start),
                sigma_end: model.schedule.percent_to_sigma(end),
            }))
        })
    }
}

/// `SkipLayerGuidanceSD3`: SkipLayerGuidanceDiT with `layers` as its double (joint) blocks.
pub struct SkipLayerGuidanceSd3Node;

impl Node for SkipLayerGuidanceSd3Node {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("SkipLayerGuidanceSD3", "comfy_extras.nodes_sd3", "advanced/guidance")
                .description("Generic version of SkipLayerGuidance node that can be used on every DiT model.")
                .required("model", InputSpec::of("MODEL"))
                .required("layers", layers_spec())
                .required("scale", InputSpec::float(3.0, 0.0, 10.0).opt("step", 0.1))
                .required("start_percent", percent_spec(0.01))
                .required("end_percent", percent_spec(0.15))
                .output(OutputSpec::of("MODEL")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let blocks = skipped_blocks(inputs.string("layers")?, "");
        let scale = inputs.float("scale")?;
        let (start, end) = (inputs.float("start_percent")?, inputs.float("end_percent")?);
        with_skip_patch(model, &blocks, |model| {
            model.patches.with_post_cfg(Arc::new(SkipLayerGuidance {
                blocks: blocks.clone(),
                scale,
                rescaling_scale: 0.0,
                sigma_start: model.schedule.percent_to_sigma(start),
                sigma_end: model.schedule.percent_to_sigma(end),
            }))
        })
    }
}

/// `SkipLayerGuidanceDiTSimple`.
pub struct SkipLayerGuidanceDitSimpleNode;

impl Node for SkipLayerGuidanceDitSimpleNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("SkipLayerGuidanceDiTSimple", MODULE, "advanced/guidance")
                .description("Simple version of the SkipLayerGuidanceDiT node that only modifies the uncond pass.")
                .required("model", InputSpec::of("MODEL"))
                .required("double_layers", layers_spec())
                .required("single_layers", layers_spec())
                .required("start_percent", percent_spec(0.0))
                .required("end_percent", percent_spec(1.0))
                .output(OutputSpec::of("MODEL")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let (start, end) = (inputs.float("start_percent")?, inputs.float("end_percent")?);
        patched(inputs, |model, blocks| {
            model.patches.with_cond_batch(Arc::new(SkipLayerGuidanceSimple {
                blocks,
                sigma_start: model.schedule.percent_to_sigma(start),
                sigma_end: model.schedule.percent_to_sigma(end),
            }))
        })
    }
}
