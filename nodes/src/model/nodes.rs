//! The nodes that patch a `MODEL` (`advanced/model` and DifferentialDiffusion): ModelSamplingDiscrete
//! (another parameterisation over the discrete σ schedule), ModelSamplingContinuousEDM and
//! ModelSamplingContinuousV (continuous σ schedules), ModelSamplingFlux (FLUX's shifted schedule
//! for the image size), ModelSamplingSD3 and ModelSamplingAuraFlow (the shifted flow schedule)
//! and DifferentialDiffusion (soft inpainting masks).

use std::sync::Arc;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::sampling::schedule::{flux_shift_for_size, ContinuousTimestep, SigmaSchedule};

use crate::model::diffusion_model::{DiffusionModel, Model, Prediction};
use crate::runtime::experimental;

/// `ModelSamplingDiscrete`: the model with another parameterisation over the discrete σ
/// schedule (LCM over its distilled 50-step schedule), optionally rescaled to zero terminal SNR.
pub struct ModelSamplingDiscrete;

impl Node for ModelSamplingDiscrete {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1(
            "ModelSamplingDiscrete",
            "comfy_extras.nodes_model_advanced",
            "advanced/model",
        )
        .display("ModelSamplingDiscrete")
        .required("model", InputSpec::of("MODEL"))
        .required(
            "sampling",
            InputSpec::combo(&["eps", "v_prediction", "lcm", "x0", "img_to_img"]),
        )
        .required("zsnr", InputSpec::of("BOOLEAN").opt("default", false))
        .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let prediction = match inputs.string("sampling")? {
            "eps" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            "lcm" => Prediction::Lcm,
            "x0" => Prediction::X0,
            "img_to_img" => Prediction::ImgToImg,
            other => return Err(NodeError::value(format!("unknown sampling '{other}'"))),
        };
        let zsnr = inputs.bool("zsnr")?;
        let schedule = SigmaSchedule::discrete_linear(0.00085, 0.012, 1000, zsnr);
        let schedule = if prediction == Prediction::Lcm {
            schedule.distilled()
        } else {
            schedule
        };
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                prediction,
                schedule,
                ..(*model.0).clone()
            },
        )))]))
    }
}

/// `DifferentialDiffusion`: the model with its inpainting mask thresholded anew at every step
/// (soft masks fade the change in gradually; see [`crate::model::diffusion_model::DiffusionModel`]).
pub struct DifferentialDiffusion;

impl Node for DifferentialDiffusion {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3(
                "DifferentialDiffusion",
                "comfy_extras.nodes_differential_diffusion",
                "_for_testing",
            )
            .display("Differential Diffusion")
            .required("model", InputSpec::of("MODEL"))
            .optional("strength", InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01))
            .output(OutputSpec::of("MODEL")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let strength = match inputs.get("strength") {
            Some(_) => inputs.float("strength")?,
            None => 1.0,
        };
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                differential_diffusion: Some(strength),
                ..(*model.0).clone()
            },
        )))]))
    }
}

/// `ModelSamplingFlux`: the model on FLUX's schedule with μ from the image size, between
/// `base_shift` at 256 latent patches and `max_shift` at 4096.
pub struct ModelSamplingFlux;

impl Node for ModelSamplingFlux {
    fn schema(&self, _: &Services) -> NodeSchema {
        let shift = |default| InputSpec::float(default, 0.0, 100.0).opt("step", 0.01);
        let size = || InputSpec::int(1024, 16, MAX_RESOLUTION).opt("step", 8);
        NodeSchema::v1(
            "ModelSamplingFlux",
            "comfy_extras.nodes_model_advanced",
            "advanced/model",
        )
        .display("ModelSamplingFlux")
        .required("model", InputSpec::of("MODEL"))
        .required("max_shift", shift(1.15))
        .required("base_shift", shift(0.5))
        .required("width", size())
        .required("height", size())
        .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let shift = flux_shift_for_size(
            inputs.float("max_shift")?,
            inputs.float("base_shift")?,
            inputs.int("width")? as f64,
            inputs.int("height")? as f64,
        );
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                prediction: Prediction::Flow,
                schedule: SigmaSchedule::flux(shift),
                ..(*model.0).clone()
            },
        )))]))
    }
}

/// `ModelSamplingSD3` and `ModelSamplingAuraFlow`: the model as a rectified flow on
/// `ModelSamplingDiscreteFlow` with the given shift; the network's timestep is σ·`multiplier`
/// (SD3: 1000, AuraFlow: 1).
pub struct ModelSamplingShiftedFlow {
    pub name: &'static str,
    pub default_shift: f64,
    pub multiplier: f64,
}

/// The two nodes of [`ModelSamplingShiftedFlow`].
pub const MODEL_SAMPLING_SD3: ModelSamplingShiftedFlow = ModelSamplingShiftedFlow {
    name: "ModelSamplingSD3",
    default_shift: 3.0,
    multiplier: 1000.0,
};
pub const MODEL_SAMPLING_AURA_FLOW: ModelSamplingShiftedFlow = ModelSamplingShiftedFlow {
    name: "ModelSamplingAuraFlow",
    default_shift: 1.73,
    multiplier: 1.0,
};

impl Node for ModelSamplingShiftedFlow {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1(self.name, "comfy_extras.nodes_model_advanced", "advanced/model")
            .display(self.name)
            .required("model", InputSpec::of("MODEL"))
            .required(
                "shift",
                InputSpec::float(self.default_shift, 0.0, 100.0).opt("step", 0.01),
            )
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                prediction: Prediction::Flow,
                schedule: SigmaSchedule::flow(inputs.float("shift")?, self.multiplier),
                ..(*model.0).clone()
            },
        )))]))
    }
}

/// The σ bounds of the continuous model-sampling nodes.
fn sigma_bound(default: f64) -> InputSpec {
    InputSpec::float(default, 0.0, 1000.0)
        .opt("step", 0.001)
        .opt("round", false)
}

/// The model on a continuous σ schedule between `sigma_min` and `sigma_max` with `prediction`.
fn continuous_model(
    inputs: &NodeInputs,
    timestep: ContinuousTimestep,
    prediction: Prediction,
) -> Result<NodeOutput, NodeError> {
    let model = inputs.object::<Model>("model")?;
    let (sigma_min, sigma_max) = (inputs.float("sigma_min")?, inputs.float("sigma_max")?);
    if !(sigma_min > 0.0 && sigma_max > 0.0) {
        return Err(NodeError::value(format!(
            "sigma_min and sigma_max must be above 0 (got {sigma_min} and {sigma_max})"
        )));
    }
    Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
        DiffusionModel {
            prediction,
            schedule: SigmaSchedule::continuous(timestep, sigma_min, sigma_max),
            ..(*model.0).clone()
        },
    )))]))
}

/// `ModelSamplingContinuousEDM`: the model on EDM's continuous schedule (timestep ¼·ln σ), with
/// a v, EDM (σ_data 0.5) or ε parameterisation.
pub struct ModelSamplingContinuousEdm;

impl Node for ModelSamplingContinuousEdm {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1(
            "ModelSamplingContinuousEDM",
            "comfy_extras.nodes_model_advanced",
            "advanced/model",
        )
        .required("model", InputSpec::of("MODEL"))
        .required(
            "sampling",
            InputSpec::combo(&["v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow"]),
        )
        .required("sigma_max", sigma_bound(120.0))
        .required("sigma_min", sigma_bound(0.002))
        .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let prediction = match inputs.string("sampling")? {
            "v_prediction" => Prediction::V,
            "edm" => Prediction::Edm,
            "eps" => Prediction::Epsilon,
            other @ ("edm_playground_v2.5" | "cosmos_rflow") => {
                return Err(NodeError::value(format!(
                    "sampling '{other}' needs a model family Easel does not run yet (Playground v2.5's latent format, Cosmos)"
                )))
            }
            other => return Err(NodeError::value(format!("unknown sampling '{other}'"))),
        };
        continuous_model(inputs, ContinuousTimestep::Edm, prediction)
    }
}

/// `ModelSamplingContinuousV`: the model on a continuous schedule whose timestep is 2·atan(σ)/π,
/// predicting v.
pub struct ModelSamplingContinuousV;

impl Node for ModelSamplingContinuousV {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1(
            "ModelSamplingContinuousV",
            "comfy_extras.nodes_model_advanced",
            "advanced/model",
        )
        .required("model", InputSpec::of("MODEL"))
        .required("sampling", InputSpec::combo(&["v_prediction"]))
        .required("sigma_max", sigma_bound(500.0))
        .required("sigma_min", sigma_bound(0.03))
        .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        continuous_model(inputs, ContinuousTimestep::V, Prediction::V)
    }
}
