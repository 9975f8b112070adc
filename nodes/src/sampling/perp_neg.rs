//! Perp-Neg (`comfy_extras.nodes_perpneg`): guidance measured from an empty prompt's prediction,
//! away from the negative prompt only along what it adds perpendicular to the positive one.
//!
//! - [`perp_neg`]: the arithmetic;
//! - [`PerpNegCfg`] and the PerpNeg node: a model patch whose CFG function predicts the empty
//!   prompt itself ([`GuidanceModel::predict_conditioning`]);
//! - PerpNegGuider: a GUIDER that predicts positive, negative and empty prompts as sides of its
//!   own (the guider's [`Side::Empty`]) and combines them ([`perp_neg_guidance`]), with the
//!   model's pre- and post-CFG functions around it as ComfyUI's `Guider_PerpNeg` calls them.
//!
//! [`GuidanceModel::predict_conditioning`]: crate::model::patches::GuidanceModel::predict_conditioning

use std::sync::Arc;

use candle_core::{Result, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::conditioning::Conditioning;
use crate::model::diffusion_model::{DiffusionModel, Model};
use crate::model::patches::{CfgFunction, GuidanceArgs, GuidedPredictions, ModelPatches, Side};
use crate::runtime::experimental;
use crate::sampling::custom::Guider as GuiderSocket;
use crate::sampling::guider::{is_one, ActiveEntry, Guider};

/// The Python module of both nodes.
const MODULE: &str = "comfy_extras.nodes_perpneg";

/// ComfyUI's `perp_neg` on denoised predictions: with pos = positive − empty and
/// neg = negative − empty, `empty + cond_scale·(pos − neg_scale·(neg − (⟨neg, pos⟩ / ‖pos‖²)·pos))`,
/// the inner product and the norm taken over the whole batch.
pub fn perp_neg(
    positive: &Tensor,
    negative: &Tensor,
    empty: &Tensor,
    neg_scale: f64,
    cond_scale: f64,
) -> Result<Tensor> {
    let pos = (positive - empty)?;
    let neg = (negative - empty)?;
    let inner = (&neg * &pos)?.sum_all()?;
    // `torch.norm(pos) ** 2`: the norm squared again, as ComfyUI rounds it.
    let squared_norm = pos.sqr()?.sum_all()?.sqrt()?.sqr()?;
    let along = pos.broadcast_mul(&(inner / squared_norm)?)?;
    let perpendicular = ((neg - along)? * neg_scale)?;
    empty + ((pos - perpendicular)? * cond_scale)?
}

/// The PerpNeg node's CFG function: [`perp_neg`] of the positive and negative predictions and
/// the empty conditioning's, predicted at every step.
pub struct PerpNegCfg {
    pub empty: Conditioning,
    pub neg_scale: f64,
}

impl CfgFunction for PerpNegCfg {
    fn guide(&self, args: &GuidanceArgs, cond: &Tensor, uncond: &Tensor) -> Result<Tensor> {
        let empty = args.model.predict_conditioning(&self.empty, args.x, args.sigma)?;
        let guided = perp_neg(cond, uncond, &empty, self.neg_scale, args.cond_scale)?;
        // ComfyUI's CFG functions return the noise, `x − guided`, which the sampler subtracts
        // from `x` again.
        args.x - (args.x - guided)?
    }
}

/// PerpNegGuider's empty prompt and scale, as the GUIDER socket keeps them.
#[derive(Clone, Debug)]
pub struct PerpNegGuidance {
    pub empty: Conditioning,
    pub neg_scale: f64,
}

/// PerpNegGuider's empty prompt ready for the model, and its scale.
pub(crate) struct PerpNegSide {
    pub(crate) empty: Vec<ActiveEntry>,
    pub(crate) neg_scale: f64,
}

/// Which of PerpNegGuider's sides besides the positive one are predicted, (negative, empty):
/// unless the model disables the cfg-1 optimisation, not the negative one at a `neg_scale` of 0,
/// and then not the empty one either at a `cfg` of 1 (their predictions are zeros then).
pub fn perp_neg_sides(cfg: f64, neg_scale: f64, disable_cfg1_optimization: bool) -> (bool, bool) {
    if disable_cfg1_optimization || neg_scale != 0.0 {
        return (true, true);
    }
    (false, !is_one(cfg))
}

/// PerpNegGuider's guidance once its sides are predicted (`Guider_PerpNeg.predict_noise`): the
/// model's pre-CFG functions on [positive, negative] (the empty prediction kept as it is),
/// [`perp_neg`] at the scale `args.cond_scale`, then the post-CFG functions. Returns the guided
/// prediction and the negative one.
pub fn perp_neg_guidance(
    patches: &ModelPatches,
    args: &GuidanceArgs,
    [positive, negative, empty]: [Tensor; 3],
    neg_scale: f64,
) -> Result<(Tensor, Tensor)> {
    let [positive, negative] = patches.apply_pre_cfg(args, [positive, negative])?;
    let guided = perp_neg(&positive, &negative, &empty, neg_scale, args.cond_scale)?;
    let predictions = GuidedPredictions {
        cond: positive,
        uncond: negative,
    };
    let guided = patches.apply_post_cfg(args, &predictions, guided)?;
    Ok((guided, predictions.uncond))
}

impl Guider<'_> {
    /// PerpNegGuider's prediction and its negative one: the sides [`perp_neg_sides`] asks for
    /// (positive and negative as one batch where they can be), then [`perp_neg_guidance`].
    pub(crate) fn perp_neg_guided(&self, side: &PerpNegSide, x: &Tensor, sigma: f32) -> Result<(Tensor, Tensor)> {
        let patches = &self.model.patches;
        let (with_negative, with_empty) = perp_neg_sides(self.cfg, side.neg_scale, patches.disable_cfg1_optimization);
        let (positive, negative) = match with_negative {
            true => self.predict_both(x, sigma)?,
            false => (self.predict(Side::Positive, x, sigma, None)?, x.zeros_like()?),
        };
        let empty = match with_empty {
            true => self.predict(Side::Empty, x, sigma, None)?,
            false => x.zeros_like()?,
        };
        let args = GuidanceArgs {
            x,
            sigma,
            cond_scale: self.cfg,
            cond: Side::Positive,
            uncond: with_negative.then_some(Side::Negative),
            model: self,
        };
        perp_neg_guidance(patches, &args, [positive, negative, empty], side.neg_scale)
    }
}

fn neg_scale_spec() -> InputSpec {
    InputSpec::float(1.0, 0.0, 100.0).opt("step", 0.01)
}

/// `PerpNeg` ("Perp-Neg (DEPRECATED by PerpNegGuider)"): the model with [`PerpNegCfg`] as its
/// CFG function.
pub struct PerpNegNode;

impl Node for PerpNegNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        let mut schema = experimental(
            NodeSchema::v3("PerpNeg", MODULE, "_for_testing")
                .display("Perp-Neg (DEPRECATED by PerpNegGuider)")
                .required("model", InputSpec::of("MODEL"))
                .required("empty_conditioning", InputSpec::of("CONDITIONING"))
                .required("neg_scale", neg_scale_spec())
                .output(OutputSpec::of("MODEL")),
        );
        schema.deprecated = true;
        schema
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let function = PerpNegCfg {
            empty: inputs.object::<Conditioning>("empty_conditioning")?.clone(),
            neg_scale: inputs.float("neg_scale")?,
        };
        let patched = DiffusionModel {
            patches: model.0.patches.with_cfg(Arc::new(function)),
            ..(*model.0).clone()
        };
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(patched)))]))
    }
}

/// `PerpNegGuider`: Perp-Neg guidance between `positive`, `negative` and `empty_conditioning`.
pub struct PerpNegGuiderNode;

impl Node for PerpNegGuiderNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("PerpNegGuider", MODULE, "_for_testing")
                .required("model", InputSpec::of("MODEL"))
                .required("positive", InputSpec::of("CONDITIONING"))
                .required("negative", InputSpec::of("CONDITIONING"))
                .required("empty_conditioning", InputSpec::of("CONDITIONING"))
                .required(
                    "cfg",
                    InputSpec::float(8.0, 0.0, 100.0).opt("step", 0.1).opt("round", 0.01),
                )
                .required("neg_scale", neg_scale_spec())
                .output(OutputSpec::of("GUIDER")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let guider = GuiderSocket {
            model: inputs.object::<Model>("model")?.clone(),
            positive: inputs.object::<Conditioning>("positive")?.clone(),
            negative: inputs.object::<Conditioning>("negative")?.clone(),
            cfg: inputs.float("cfg")?,
            dual: None,
            perp_neg: Some(PerpNegGuidance {
                empty: inputs.object::<Conditioning>("empty_conditioning")?.clone(),
                neg_scale: inputs.float("neg_scale")?,
            }),
        };
        Ok(NodeOutput::values(vec![Value::object(guider)]))
    }
}
