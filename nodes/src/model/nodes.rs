//! The nodes that patch a `MODEL` (`advanced/model` and DifferentialDiffusion): ModelSamplingDiscrete
//! (another parameterisation over the discrete σ schedule), ModelSamplingFlux (FLUX's shifted
//! schedule for the image size) and DifferentialDiffusion (soft inpainting masks).

use std::sync::Arc;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::sampling::schedule::{flux_shift_for_size, SigmaSchedule};

use crate::model::diffusion_model::{DiffusionModel, Model, Prediction};

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
        let mut schema = NodeSchema::v3(
            "DifferentialDiffusion",
            "comfy_extras.nodes_differential_diffusion",
            "_for_testing",
        )
        .display("Differential Diffusion")
        .required("model", InputSpec::of("MODEL"))
        .optional("strength", InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01))
        .output(OutputSpec::of("MODEL"));
        schema.experimental = true;
        schema
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
