//! The nodes that add a patch to a MODEL ([`crate::model::patches`]): the guidance functions
//! (RescaleCFG, CFGZeroStar, CFGNorm, Mahiro, Epsilon Scaling, APG, TCFG, FreSca,
//! PerturbedAttentionGuidance) and the UNet block patches (FreeU, FreeU_V2,
//! PatchModelAddDownscale), with ComfyUI's schemas; and TorchCompileModel, which changes nothing.

use std::sync::{Arc, Mutex};

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::image::resample::ResizeMethod;
use crate::model::block_patches::{DeepShrink, FreeU, FreeUScales};
use crate::model::diffusion_model::{DiffusionModel, Model};
use crate::model::guidance::{
    AdaptiveProjectedGuidance, CfgNorm, CfgZeroStar, EpsilonScaling, FrequencyScaling, Mahiro, PerturbedAttention,
    RescaleCfg, TangentialDamping,
};
use crate::model::patches::ModelPatches;
use crate::runtime::experimental;

/// The node's `model` input with `patch` applied to its patches.
pub(crate) fn patched(
    inputs: &NodeInputs,
    patch: impl FnOnce(&ModelPatches) -> ModelPatches,
) -> Result<NodeOutput, NodeError> {
    let model = inputs.object::<Model>("model")?;
    let patches = patch(&model.0.patches);
    Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
        DiffusionModel {
            patches,
            ..(*model.0).clone()
        },
    )))]))
}

/// A V3 guidance node taking only the model and giving `patched_model`.
fn model_only_v3(name: &str, module: &str, category: &str) -> NodeSchema {
    NodeSchema::v3(name, module, category)
        .required("model", InputSpec::of("MODEL"))
        .output(OutputSpec::of("MODEL").named("patched_model"))
}

/// `RescaleCFG`.
pub struct RescaleCfgNode;

impl Node for RescaleCfgNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("RescaleCFG", "comfy_extras.nodes_model_advanced", "advanced/model")
            .required("model", InputSpec::of("MODEL"))
            .required("multiplier", InputSpec::float(0.7, 0.0, 1.0).opt("step", 0.01))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let multiplier = inputs.float("multiplier")?;
        patched(inputs, |patches| patches.with_cfg(Arc::new(RescaleCfg { multiplier })))
    }
}

/// `CFGZeroStar`.
pub struct CfgZeroStarNode;

impl Node for CfgZeroStarNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        model_only_v3("CFGZeroStar", "comfy_extras.nodes_cfg", "advanced/guidance")
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        patched(inputs, |patches| patches.with_post_cfg(Arc::new(CfgZeroStar)))
    }
}

/// `CFGNorm`.
pub struct CfgNormNode;

impl Node for CfgNormNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("CFGNorm", "comfy_extras.nodes_cfg", "advanced/guidance")
                .required("model", InputSpec::of("MODEL"))
                .required("strength", InputSpec::float(1.0, 0.0, 100.0).opt("step", 0.01))
                .output(OutputSpec::of("MODEL").named("patched_model")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let strength = inputs.float("strength")?;
        patched(inputs, |patches| patches.with_post_cfg(Arc::new(CfgNorm { strength })))
    }
}

/// `Mahiro`.
pub struct MahiroNode;

impl Node for MahiroNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            model_only_v3("Mahiro", "comfy_extras.nodes_mahiro", "_for_testing")
                .display("Mahiro is so cute that she deserves a better guidance function!! (。・ω・。)")
                .description("Modify the guidance to scale more on the 'direction' of the positive prompt rather than the difference between the negative prompt."),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        patched(inputs, |patches| patches.with_post_cfg(Arc::new(Mahiro)))
    }
}

/// `Epsilon Scaling`.
pub struct EpsilonScalingNode;

impl Node for EpsilonScalingNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("Epsilon Scaling", "comfy_extras.nodes_eps", "model_patches/unet")
            .required("model", InputSpec::of("MODEL"))
            .required(
                "scaling_factor",
                InputSpec::float(1.005, 0.5, 1.5)
                    .opt("step", 0.001)
                    .opt("display", "number"),
            )
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let factor = match inputs.float("scaling_factor")? {
            0.0 => 1e-9,
            factor => factor,
        };
        patched(inputs, |patches| {
            patches.with_post_cfg(Arc::new(EpsilonScaling { factor }))
        })
    }
}

/// A float input whose tooltip comes first, as V3 nodes with tooltips list it.
fn float_with_tooltip(
    tooltip: &str,
    default: f64,
    min: impl Into<serde_json::Value>,
    max: impl Into<serde_json::Value>,
    step: f64,
) -> InputSpec {
    InputSpec::of("FLOAT")
        .opt("tooltip", tooltip)
        .opt("default", default)
        .opt("min", min)
        .opt("max", max)
        .opt("step", step)
}

/// `APG` (Adaptive Projected Guidance).
pub struct ApgNode;

impl Node for ApgNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("APG", "comfy_extras.nodes_apg", "sampling/custom_sampling")
            .display("Adaptive Projected Guidance")
            .required("model", InputSpec::of("MODEL"))
            .required(
                "eta",
                float_with_tooltip(
                    "Controls the scale of the parallel guidance vector. Default CFG behavior at a setting of 1.",
                    1.0,
                    -10.0,
                    10.0,
                    0.01,
                ),
            )
            .required(
                "norm_threshold",
                float_with_tooltip(
                    "Normalize guidance vector to this value, normalization disable at a setting of 0.",
                    5.0,
                    0.0,
                    50.0,
                    0.1,
                ),
            )
            .required(
                "momentum",
                float_with_tooltip(
                    "Controls a running average of guidance during diffusion, disabled at a setting of 0.",
                    0.0,
                    -5.0,
                    1.0,
                    0.01,
                ),
            )
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let apg = AdaptiveProjectedGuidance {
            eta: inputs.float("eta")?,
            norm_threshold: inputs.float("norm_threshold")?,
            momentum: inputs.float("momentum")?,
            state: Mutex::new((None, None)),
        };
        patched(inputs, |patches| patches.with_pre_cfg(Arc::new(apg)))
    }
}

/// `TCFG` (Tangential Damping CFG).
pub struct TcfgNode;

impl Node for TcfgNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        model_only_v3("TCFG", "comfy_extras.nodes_tcfg", "advanced/guidance")
            .display("Tangential Damping CFG")
            .description("TCFG – Tangential Damping CFG (2503.18137)\n\nRefine the uncond (negative) to align with the cond (positive) for improving quality.")
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        patched(inputs, |patches| patches.with_pre_cfg(Arc::new(TangentialDamping)))
    }
}

/// `FreSca`.
pub struct FreScaNode;

impl Node for FreScaNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("FreSca", "comfy_extras.nodes_fresca", "_for_testing")
                .display("FreSca")
                .description("Applies frequency-dependent scaling to the guidance")
                .required("model", InputSpec::of("MODEL"))
                .required(
                    "scale_low",
                    float_with_tooltip("Scaling factor for low-frequency components", 1.0, 0, 10, 0.01),
                )
                .required(
                    "scale_high",
                    float_with_tooltip("Scaling factor for high-frequency components", 1.25, 0, 10, 0.01),
                )
                .required(
                    "freq_cutoff",
                    InputSpec::of("INT")
                        .opt(
                            "tooltip",
                            "Number of frequency indices around center to consider as low-frequency",
                        )
                        .opt("default", 20)
                        .opt("min", 1)
                        .opt("max", 10000)
                        .opt("step", 1),
                )
                .output(OutputSpec::of("MODEL")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let scaling = FrequencyScaling {
            scale_low: inputs.float("scale_low")? as f32,
            scale_high: inputs.float("scale_high")? as f32,
            freq_cutoff: inputs.int("freq_cutoff")?.max(1) as usize,
        };
        patched(inputs, |patches| patches.with_pre_cfg(Arc::new(scaling)))
    }
}

/// `PerturbedAttentionGuidance`.
pub struct PerturbedAttentionGuidanceNode;

impl Node for PerturbedAttentionGuidanceNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "PerturbedAttentionGuidance",
            "comfy_extras.nodes_pag",
            "model_patches/unet",
        )
        .required("model", InputSpec::of("MODEL"))
        .required(
            "scale",
            InputSpec::float(3.0, 0.0, 100.0).opt("step", 0.01).opt("round", 0.01),
        )
        .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        if model.0.network.unet().is_none() {
            return Err(NodeError::value(
                "PerturbedAttentionGuidance patches a UNet's middle block; this model has none",
            ));
        }
        let scale = inputs.float("scale")?;
        patched(inputs, |patches| {
            patches.with_post_cfg(Arc::new(PerturbedAttention { scale }))
        })
    }
}

/// `FreeU` (`adaptive` false) and `FreeU_V2` (true).
pub struct FreeUNode {
    pub adaptive: bool,
}

impl Node for FreeUNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        let (name, defaults) = match self.adaptive {
            false => ("FreeU", [1.1, 1.2]),
            true => ("FreeU_V2", [1.3, 1.4]),
        };
        let factor = |default| InputSpec::float(default, 0.0, 10.0).opt("step", 0.01);
        NodeSchema::v1(name, "comfy_extras.nodes_freelunch", "model_patches/unet")
            .required("model", InputSpec::of("MODEL"))
            .required("b1", factor(defaults[0]))
            .required("b2", factor(defaults[1]))
            .required("s1", factor(0.9))
            .required("s2", factor(0.2))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let Some(unet) = model.0.network.unet() else {
            return Err(NodeError::value(
                "FreeU patches a UNet's decoder; this model has no UNet",
            ));
        };
        let freeu = FreeU {
            model_channels: unet.config().model_channels,
            scales: [
                FreeUScales {
                    backbone: inputs.float("b1")?,
                    skip: inputs.float("s1")?,
                },
                FreeUScales {
                    backbone: inputs.float("b2")?,
                    skip: inputs.float("s2")?,
                },
            ],
            adaptive: self.adaptive,
        };
        patched(inputs, |patches| patches.with_unet_patch(Arc::new(freeu)))
    }
}

/// `PatchModelAddDownscale` (Kohya deep shrink).
pub struct PatchModelAddDownscale;

const DEEP_SHRINK_METHODS: [&str; 5] = ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"];

impl Node for PatchModelAddDownscale {
    fn schema(&self, _: &Services) -> NodeSchema {
        let percent = |default| InputSpec::float(default, 0.0, 1.0).opt("step", 0.001);
        NodeSchema::v3(
            "PatchModelAddDownscale",
            "comfy_extras.nodes_model_downscale",
            "model_patches/unet",
        )
        .display("PatchModelAddDownscale (Kohya Deep Shrink)")
        .required("model", InputSpec::of("MODEL"))
        .required("block_number", InputSpec::int(3, 1, 32).opt("step", 1))
        .required("downscale_factor", InputSpec::float(2.0, 0.1, 9.0).opt("step", 0.001))
        .required("start_percent", percent(0.0))
        .required("end_percent", percent(0.35))
        .required("downscale_after_skip", InputSpec::boolean(true))
        .required("downscale_method", InputSpec::combo_v3(&DEEP_SHRINK_METHODS))
        .required("upscale_method", InputSpec::combo_v3(&DEEP_SHRINK_METHODS))
        .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        if model.0.network.unet().is_none() {
            return Err(NodeError::value(
                "PatchModelAddDownscale patches a UNet's blocks; this model has no UNet",
            ));
        }
        let schedule = &model.0.schedule;
        let shrink = DeepShrink {
            block: inputs.int("block_number")?.max(0) as usize,
            factor: inputs.float("downscale_factor")?,
            sigma_start: schedule.percent_to_sigma(inputs.float("start_percent")?),
            sigma_end: schedule.percent_to_sigma(inputs.float("end_percent")?),
            after_skip: inputs.bool("downscale_after_skip")?,
            downscale: inputs.string("downscale_method")?.parse::<ResizeMethod>()?,
            upscale: inputs.string("upscale_method")?.parse::<ResizeMethod>()?,
        };
        patched(inputs, |patches| patches.with_unet_patch(Arc::new(shrink)))
    }
}

/// `TorchCompileModel`: accepted so that workflows using it run; Easel has no PyTorch to
/// compile with, so the model is passed on as it is (and the log says so).
pub struct TorchCompileModel;

impl Node for TorchCompileModel {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("TorchCompileModel", "comfy_extras.nodes_torch_compile", "_for_testing")
                .required("model", InputSpec::of("MODEL"))
                .required("backend", InputSpec::combo_v3(&["inductor", "cudagraphs"]))
                .output(OutputSpec::of("MODEL")),
        )
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        tracing::info!(
            node = ctx.node_id,
            "TorchCompileModel: Easel does not compile models with torch; the model runs as it is"
        );
        Ok(NodeOutput::values(vec![Value::object(model.clone())]))
    }
}
