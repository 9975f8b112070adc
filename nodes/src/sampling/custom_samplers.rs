//! ComfyUI's sampler nodes of `sampling/custom_sampling/samplers` beyond KSamplerSelect: each
//! picks one of KSampler's samplers and sets its options (`comfy.samplers.ksampler(name,
//! extra_options)`) — SamplerEulerAncestral(CFG++), SamplerLMS, SamplerDPMPP_3M_SDE,
//! SamplerDPMPP_2M_SDE, SamplerDPMPP_SDE, SamplerDPMPP_2S_Ancestral, SamplerDPMAdaptative,
//! SamplerER_SDE, SamplerSASolver — and those of `comfy_extras.nodes_advanced_samplers`:
//! SamplerLCMUpscale and SamplerEulerCFGpp. The `noise_device` inputs name the same generator
//! here: Easel draws the SDE samplers' Brownian-tree noise on the CPU either way.

use std::sync::Arc;

use candle_core::Tensor;
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::sampling::samplers::{
    AncestralNoise, DpmAdaptiveOptions, ErSdeNoiseScaler, ErSdeOptions, LatentResize, LcmUpscaleOptions,
    SaSolverOptions, Sampler, SolverType, TauInterval,
};

use crate::image::resample::{common_upscale, ResizeMethod};
use crate::latent::nodes::{image_as_latents, latents_as_image};
use crate::model::diffusion_model::Model;
use crate::runtime::experimental;
use crate::sampling::custom::SamplerChoice;

/// The Python module of the nodes from `nodes_custom_sampler`.
const MODULE: &str = "comfy_extras.nodes_custom_sampler";

/// The Python module of SamplerLCMUpscale and SamplerEulerCFGpp.
const ADVANCED_MODULE: &str = "comfy_extras.nodes_advanced_samplers";

const CATEGORY: &str = "sampling/custom_sampling/samplers";

/// The schema of sampler node `name` of `nodes_custom_sampler`, displayed by its class name.
fn sampler_schema(name: &str) -> NodeSchema {
    NodeSchema::v1(name, MODULE, CATEGORY).display(name)
}

/// A FLOAT option with step 0.01 and no rounding.
fn float_spec(default: f64, min: f64, max: f64) -> InputSpec {
    InputSpec::float(default, min, max)
        .opt("step", 0.01)
        .opt("round", false)
}

/// The `eta` and `s_noise` inputs, both 1 by default up to 100.
fn ancestral_inputs(schema: NodeSchema) -> NodeSchema {
    schema
        .required("eta", float_spec(1.0, 0.0, 100.0))
        .required("s_noise", float_spec(1.0, 0.0, 100.0))
}

fn noise_device_spec() -> InputSpec {
    InputSpec::combo(&["gpu", "cpu"])
}

fn ancestral_noise(inputs: &NodeInputs) -> Result<AncestralNoise, NodeError> {
    Ok(AncestralNoise {
        eta: inputs.float("eta")?,
        s_noise: inputs.float("s_noise")?,
    })
}

fn sampler_output(sampler: Sampler) -> Result<NodeOutput, NodeError> {
    Ok(NodeOutput::values(vec![Value::object(SamplerChoice(sampler))]))
}

/// A count input (ComfyUI's range keeps it from being negative).
fn count(inputs: &NodeInputs, name: &str) -> Result<usize, NodeError> {
    usize::try_from(inputs.int(name)?).map_err(|_| NodeError::value(format!("{name} must not be negative")))
}

/// `SamplerEulerAncestral`.
pub struct SamplerEulerAncestral;

impl Node for SamplerEulerAncestral {
    fn schema(&self, _: &Services) -> NodeSchema {
        ancestral_inputs(sampler_schema("SamplerEulerAncestral")).output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sampler_output(Sampler::EulerAncestral(ancestral_noise(inputs)?))
    }
}

/// `SamplerEulerAncestralCFGPP` ("SamplerEulerAncestralCFG++").
pub struct SamplerEulerAncestralCfgPp;

impl Node for SamplerEulerAncestralCfgPp {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("SamplerEulerAncestralCFGPP", MODULE, CATEGORY)
            .display("SamplerEulerAncestralCFG++")
            .required("eta", float_spec(1.0, 0.0, 1.0))
            .required("s_noise", float_spec(1.0, 0.0, 10.0))
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sampler_output(Sampler::EulerAncestralCfgPp(ancestral_noise(inputs)?))
    }
}

/// `SamplerLMS`.
pub struct SamplerLms;

impl Node for SamplerLms {
    fn schema(&self, _: &Services) -> NodeSchema {
        sampler_schema("SamplerLMS")
            .required("order", InputSpec::int(4, 1, 100))
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sampler_output(Sampler::Lms {
            order: count(inputs, "order")?,
        })
    }
}

/// `SamplerDPMPP_3M_SDE`.
pub struct SamplerDpmpp3mSde;

impl Node for SamplerDpmpp3mSde {
    fn schema(&self, _: &Services) -> NodeSchema {
        ancestral_inputs(sampler_schema("SamplerDPMPP_3M_SDE"))
            .required("noise_device", noise_device_spec())
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sampler_output(Sampler::DpmppThreeMSde(ancestral_noise(inputs)?))
    }
}

/// `SamplerDPMPP_2M_SDE`.
pub struct SamplerDpmpp2mSde;

impl Node for SamplerDpmpp2mSde {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema =
            sampler_schema("SamplerDPMPP_2M_SDE").required("solver_type", InputSpec::combo(&["midpoint", "heun"]));
        ancestral_inputs(schema)
            .required("noise_device", noise_device_spec())
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let solver = match inputs.string("solver_type")? {
            "midpoint" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            _ => return Err(NodeError::value("solver_type must be 'heun' or 'midpoint'")),
        };
        sampler_output(Sampler::DpmppTwoMSde {
            noise: ancestral_noise(inputs)?,
            solver,
        })
    }
}

/// `SamplerDPMPP_SDE`.
pub struct SamplerDpmppSde;

impl Node for SamplerDpmppSde {
    fn schema(&self, _: &Services) -> NodeSchema {
        ancestral_inputs(sampler_schema("SamplerDPMPP_SDE"))
            .required("r", float_spec(0.5, 0.0, 100.0))
            .required("noise_device", noise_device_spec())
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sampler_output(Sampler::DpmppSde {
            noise: ancestral_noise(inputs)?,
            r: inputs.float("r")?,
        })
    }
}

/// `SamplerDPMPP_2S_Ancestral`.
pub struct SamplerDpmpp2sAncestral;

impl Node for SamplerDpmpp2sAncestral {
    fn schema(&self, _: &Services) -> NodeSchema {
        ancestral_inputs(sampler_schema("SamplerDPMPP_2S_Ancestral")).output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sampler_output(Sampler::DpmppTwoSAncestral(ancestral_noise(inputs)?))
    }
}

/// `SamplerDPMAdaptative`.
pub struct SamplerDpmAdaptative;

impl Node for SamplerDpmAdaptative {
    fn schema(&self, _: &Services) -> NodeSchema {
        sampler_schema("SamplerDPMAdaptative")
            .required("order", InputSpec::int(3, 2, 3))
            .required("rtol", float_spec(0.05, 0.0, 100.0))
            .required("atol", float_spec(0.0078, 0.0, 100.0))
            .required("h_init", float_spec(0.05, 0.0, 100.0))
            .required("pcoeff", float_spec(0.0, 0.0, 100.0))
            .required("icoeff", float_spec(1.0, 0.0, 100.0))
            .required("dcoeff", float_spec(0.0, 0.0, 100.0))
            .required("accept_safety", float_spec(0.81, 0.0, 100.0))
            .required("eta", float_spec(0.0, 0.0, 100.0))
            .required("s_noise", float_spec(1.0, 0.0, 100.0))
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sampler_output(Sampler::DpmAdaptive(DpmAdaptiveOptions {
            order: count(inputs, "order")?,
            rtol: inputs.float("rtol")?,
            atol: inputs.float("atol")?,
            h_init: inputs.float("h_init")?,
            pcoeff: inputs.float("pcoeff")?,
            icoeff: inputs.float("icoeff")?,
            dcoeff: inputs.float("dcoeff")?,
            accept_safety: inputs.float("accept_safety")?,
            eta: inputs.float("eta")?,
            s_noise: inputs.float("s_noise")?,
        }))
    }
}

/// `SamplerER_SDE`: the ER-SDE solver with its own noise scaler, the reverse-time SDE (noise
/// scaler λ^(η+1)) or the ODE (no noise).
pub struct SamplerErSde;

impl Node for SamplerErSde {
    fn schema(&self, _: &Services) -> NodeSchema {
        let solver_types = ["ER-SDE", "Reverse-time SDE", "ODE"].map(|name| serde_json::json!(name));
        sampler_schema("SamplerER_SDE")
            .required("solver_type", InputSpec::of("COMBO").opt("options", solver_types.to_vec()))
            .required("max_stage", InputSpec::int(3, 1, 3))
            .required(
                "eta",
                float_spec(1.0, 0.0, 100.0).opt(
                    "tooltip",
                    "Stochastic strength of reverse-time SDE.\nWhen eta=0, it reduces to deterministic ODE. This setting doesn't apply to ER-SDE solver type.",
                ),
            )
            .required("s_noise", float_spec(1.0, 0.0, 100.0))
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let solver_type = inputs.string("solver_type")?;
        let (mut eta, mut s_noise) = (inputs.float("eta")?, inputs.float("s_noise")?);
        if solver_type == "ODE" || (solver_type == "Reverse-time SDE" && eta == 0.0) {
            eta = 0.0;
            s_noise = 0.0;
        }
        let noise_scaler = match solver_type {
            "ER-SDE" => ErSdeNoiseScaler::ErSde,
            "Reverse-time SDE" | "ODE" => ErSdeNoiseScaler::Power(eta + 1.0),
            other => return Err(NodeError::value(format!("unknown solver_type '{other}'"))),
        };
        sampler_output(Sampler::ErSde(ErSdeOptions {
            noise_scaler,
            max_stage: count(inputs, "max_stage")?,
            s_noise,
        }))
    }
}

/// `SamplerSASolver`: SA-Solver stochastic (τ = `eta`) between the model's
/// `sde_start_percent` and `sde_end_percent` points.
pub struct SamplerSaSolver;

impl Node for SamplerSaSolver {
    fn schema(&self, _: &Services) -> NodeSchema {
        let percent = |default: f64| InputSpec::float(default, 0.0, 1.0).opt("step", 0.001);
        sampler_schema("SamplerSASolver")
            .required("model", InputSpec::of("MODEL").with_options())
            .required("eta", float_spec(1.0, 0.0, 10.0))
            .required("sde_start_percent", percent(0.2))
            .required("sde_end_percent", percent(0.8))
            .required("s_noise", float_spec(1.0, 0.0, 100.0))
            .required("predictor_order", InputSpec::int(3, 1, 6))
            .required("corrector_order", InputSpec::int(4, 0, 6))
            .required("use_pece", InputSpec::of("BOOLEAN").with_options())
            .required("simple_order_2", InputSpec::of("BOOLEAN").with_options())
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let schedule = &inputs.object::<Model>("model")?.0.schedule;
        let tau = TauInterval {
            start_sigma: schedule.percent_to_sigma(inputs.float("sde_start_percent")?),
            end_sigma: schedule.percent_to_sigma(inputs.float("sde_end_percent")?),
            eta: inputs.float("eta")?,
        };
        sampler_output(Sampler::SaSolver(SaSolverOptions {
            tau: Some(tau),
            s_noise: inputs.float("s_noise")?,
            predictor_order: count(inputs, "predictor_order")?,
            corrector_order: count(inputs, "corrector_order")?,
            use_pece: inputs.bool("use_pece")?,
            simple_order_2: inputs.bool("simple_order_2")?,
        }))
    }
}

/// The upscale methods of SamplerLCMUpscale, in ComfyUI's order.
const LCM_UPSCALE_METHODS: [&str; 5] = ["bislerp", "nearest-exact", "bilinear", "area", "bicubic"];

/// `common_upscale(latent, width, height, method, "disabled")` on the plain NCHW latent.
#[derive(Debug)]
struct CommonUpscale(ResizeMethod);

impl LatentResize for CommonUpscale {
    fn resize(&self, latent: &Tensor, width: usize, height: usize) -> candle_core::Result<Tensor> {
        let message = |error: NodeError| candle_core::Error::Msg(error.to_string());
        let image = latents_as_image(latent).map_err(message)?;
        let resized = common_upscale(&image, width, height, self.0, false, false).map_err(message)?;
        image_as_latents(resized, latent.device())
            .map_err(message)?
            .to_dtype(latent.dtype())
    }
}

/// `SamplerLCMUpscale`: LCM sampling that enlarges the latent by `scale_ratio` over the first
/// `scale_steps` steps (−1: half of them).
pub struct SamplerLcmUpscale;

impl Node for SamplerLcmUpscale {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("SamplerLCMUpscale", ADVANCED_MODULE, CATEGORY)
            .required("scale_ratio", InputSpec::float(1.0, 0.1, 20.0).opt("step", 0.01))
            .required("scale_steps", InputSpec::int(-1, -1, 1000).opt("step", 1))
            .required("upscale_method", InputSpec::combo_v3(&LCM_UPSCALE_METHODS))
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let method: ResizeMethod = inputs.string("upscale_method")?.parse()?;
        let scale_steps = inputs.int("scale_steps")?;
        sampler_output(Sampler::LcmUpscale(LcmUpscaleOptions {
            total_upscale: inputs.float("scale_ratio")?,
            upscale_steps: usize::try_from(scale_steps).ok(),
            resize: Arc::new(CommonUpscale(method)),
        }))
    }
}

/// `SamplerEulerCFGpp` ("SamplerEulerCFG++", experimental): KSampler's `euler_cfg_pp`, or the
/// `alternative` form that steps along x − 2·D + D_uncond.
pub struct SamplerEulerCfgPp;

impl Node for SamplerEulerCfgPp {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("SamplerEulerCFGpp", ADVANCED_MODULE, "_for_testing")
                .display("SamplerEulerCFG++")
                .required("version", InputSpec::combo_v3(&["regular", "alternative"]))
                .output(OutputSpec::of("SAMPLER")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let sampler = match inputs.string("version")? {
            "alternative" => Sampler::EulerCfgPpAlternative,
            _ => Sampler::Named("euler_cfg_pp".to_string()),
        };
        sampler_output(sampler)
    }
}
