//! ComfyUI's scheduler and σ nodes beyond those of [`custom`](super::custom): the k-diffusion
//! schedules PolyexponentialScheduler, LaplaceScheduler and VPScheduler; the tabulated
//! AlignYourStepsScheduler, GITSScheduler and OptimalStepsScheduler; and SetFirstSigma,
//! ExtendIntermediateSigmas and SamplingPercentToSigma.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::sampling::schedule::{self, linspace_f32, loglinear_interp};
use serde_json::json;

use crate::model::diffusion_model::Model;
use crate::sampling::custom::{denoise_spec, node_schema, sigma_spec, sigmas_output, steps, steps_spec, Sigmas};
use crate::sampling::noise_levels::{ALIGN_YOUR_STEPS, GITS, OPTIMAL_STEPS};

const SCHEDULERS: &str = "sampling/custom_sampling/schedulers";
const SIGMAS: &str = "sampling/custom_sampling/sigmas";

/// A FLOAT option with the given step and no rounding.
fn unrounded(default: f64, min: f64, max: f64, step: f64) -> InputSpec {
    InputSpec::float(default, min, max)
        .opt("step", step)
        .opt("round", false)
}

/// The `steps`, `sigma_max` and `sigma_min` inputs of the k-diffusion schedule nodes.
fn sigma_range_inputs(schema: NodeSchema) -> NodeSchema {
    schema
        .required("steps", steps_spec(20, 10000))
        .required("sigma_max", sigma_spec(14.614642))
        .required("sigma_min", sigma_spec(0.0291675))
}

/// `PolyexponentialScheduler`: log σ a polynomial of power ρ between the bounds.
pub struct PolyexponentialScheduler;

impl Node for PolyexponentialScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        sigma_range_inputs(node_schema("PolyexponentialScheduler", SCHEDULERS))
            .required("rho", unrounded(1.0, 0.0, 100.0, 0.01))
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sigmas_output(schedule::polyexponential(
            steps(inputs)?,
            inputs.float("sigma_min")?,
            inputs.float("sigma_max")?,
            inputs.float("rho")?,
        ))
    }
}

/// `LaplaceScheduler`: log σ spaced as the quantiles of a Laplace(μ, β) distribution, clamped to
/// the bounds (no final 0).
pub struct LaplaceScheduler;

impl Node for LaplaceScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        sigma_range_inputs(node_schema("LaplaceScheduler", SCHEDULERS))
            .required("mu", unrounded(0.0, -10.0, 10.0, 0.1))
            .required("beta", unrounded(0.5, 0.0, 10.0, 0.1))
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sigmas_output(schedule::laplace(
            steps(inputs)?,
            inputs.float("sigma_min")?,
            inputs.float("sigma_max")?,
            inputs.float("mu")?,
            inputs.float("beta")?,
        ))
    }
}

/// `VPScheduler`: the continuous variance-preserving schedule.
pub struct VpScheduler;

impl Node for VpScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("VPScheduler", SCHEDULERS)
            .required("steps", steps_spec(20, 10000))
            .required("beta_d", unrounded(19.9, 0.0, 5000.0, 0.01))
            .required("beta_min", unrounded(0.1, 0.0, 5000.0, 0.01))
            .required("eps_s", unrounded(0.001, 0.0, 1.0, 0.0001))
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sigmas_output(schedule::vp(
            steps(inputs)?,
            inputs.float("beta_d")?,
            inputs.float("beta_min")?,
            inputs.float("eps_s")?,
        ))
    }
}

/// The schema of a tabulated scheduler (a V3 node of its own module).
fn tabulated_schema(name: &str, module: &str) -> NodeSchema {
    NodeSchema::v3(name, module, SCHEDULERS)
}

/// How many of `steps` the tabulated schedulers keep for `denoise`: all from 1 up, Python's
/// `round(steps·denoise)` below, none at 0 or less.
fn denoised_steps(steps: usize, denoise: f64) -> Option<usize> {
    if denoise >= 1.0 {
        Some(steps)
    } else if denoise <= 0.0 {
        None
    } else {
        Some((steps as f64 * denoise).round_ties_even() as usize)
    }
}

/// The last `total_steps + 1` of `levels` as float32, the last made 0.
fn tail_of_levels(levels: &[f64], total_steps: usize) -> Vec<f32> {
    let keep = (total_steps + 1).min(levels.len());
    let mut sigmas: Vec<f32> = levels[levels.len() - keep..]
        .iter()
        .map(|sigma| *sigma as f32)
        .collect();
    if let Some(last) = sigmas.last_mut() {
        *last = 0.0;
    }
    sigmas
}

/// The σ of a table of `levels` for `steps` (log-linearly interpolated to `steps` + 1 values
/// unless that is their count) and `denoise`.
fn tabulated_sigmas(levels: &[f64], steps: usize, denoise: f64) -> Vec<f32> {
    let Some(total_steps) = denoised_steps(steps, denoise) else {
        return Vec::new();
    };
    if steps + 1 == levels.len() {
        tail_of_levels(levels, total_steps)
    } else {
        tail_of_levels(&loglinear_interp(levels, steps + 1), total_steps)
    }
}

/// The row of `table` named by the `model_type` input.
fn model_levels<'t>(table: &'t [(&str, &'t [f64])], inputs: &NodeInputs) -> Result<&'t [f64], NodeError> {
    let model_type = inputs.string("model_type")?;
    table
        .iter()
        .find(|(name, _)| *name == model_type)
        .map(|(_, levels)| *levels)
        .ok_or_else(|| NodeError::value(format!("unknown model_type '{model_type}'")))
}

/// `AlignYourStepsScheduler`: NVIDIA's optimised 10-step σ, interpolated to other counts.
pub struct AlignYourStepsScheduler;

impl Node for AlignYourStepsScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        let model_types = ALIGN_YOUR_STEPS.map(|(name, _)| name);
        tabulated_schema("AlignYourStepsScheduler", "comfy_extras.nodes_align_your_steps")
            .required("model_type", InputSpec::combo_v3(&model_types))
            .required("steps", InputSpec::int(10, 1, 10000))
            .required("denoise", denoise_spec())
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let levels = model_levels(&ALIGN_YOUR_STEPS, inputs)?;
        sigmas_output(tabulated_sigmas(levels, steps(inputs)?, inputs.float("denoise")?))
    }
}

/// `OptimalStepsScheduler`: the OptimalSteps σ of FLUX, Wan or Chroma.
pub struct OptimalStepsScheduler;

impl Node for OptimalStepsScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        let model_types = OPTIMAL_STEPS.map(|(name, _)| name);
        tabulated_schema("OptimalStepsScheduler", "comfy_extras.nodes_optimalsteps")
            .required("model_type", InputSpec::combo_v3(&model_types))
            .required("steps", InputSpec::int(20, 3, 1000))
            .required("denoise", denoise_spec())
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let levels = model_levels(&OPTIMAL_STEPS, inputs)?;
        sigmas_output(tabulated_sigmas(levels, steps(inputs)?, inputs.float("denoise")?))
    }
}

/// `GITSScheduler`: the GITS σ of `coeff` (0.80 to 1.50 in steps of 0.05, after rounding to two
/// decimals as Python's `round` does): tabulated up to 20 steps, the 20-step levels interpolated
/// beyond.
pub struct GitsScheduler;

impl Node for GitsScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        tabulated_schema("GITSScheduler", "comfy_extras.nodes_gits")
            .required("coeff", InputSpec::float(1.2, 0.8, 1.5).opt("step", 0.05))
            .required("steps", InputSpec::int(10, 2, 1000))
            .required("denoise", denoise_spec())
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let rounded = format!("{:.2}", inputs.float("coeff")?);
        let hundredths: Option<usize> = rounded.replace('.', "").parse().ok();
        let rows = hundredths
            .filter(|h| (80..=150).contains(h) && h % 5 == 0)
            .and_then(|h| GITS.get((h - 80) / 5))
            .ok_or_else(|| NodeError::value(format!("GITSScheduler has no noise levels for coeff {rounded}")))?;
        let steps = steps(inputs)?;
        let row = steps
            .checked_sub(2)
            .ok_or_else(|| NodeError::value("GITSScheduler needs at least 2 steps"))?;
        let Some(total_steps) = denoised_steps(steps, inputs.float("denoise")?) else {
            return sigmas_output(Vec::new());
        };
        let sigmas = match rows.get(row) {
            Some(levels) => tail_of_levels(levels, total_steps),
            None => tail_of_levels(&loglinear_interp(rows[rows.len() - 1], steps + 1), total_steps),
        };
        sigmas_output(sigmas)
    }
}

/// `SetFirstSigma`: the σ with the first replaced.
pub struct SetFirstSigma;

impl Node for SetFirstSigma {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("SetFirstSigma", SIGMAS)
            .required("sigmas", InputSpec::of("SIGMAS"))
            .required("sigma", unrounded(136.0, 0.0, 20000.0, 0.001))
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut sigmas = inputs.object::<Sigmas>("sigmas")?.0.clone();
        let first = sigmas
            .first_mut()
            .ok_or_else(|| NodeError::value("SetFirstSigma: the sigmas are empty (index 0 is out of bounds)"))?;
        *first = inputs.float("sigma")? as f32;
        sigmas_output(sigmas)
    }
}

/// `ExtendIntermediateSigmas`: `steps − 1` σ inserted after each σ within [`end_at_sigma`,
/// `start_at_sigma`] (a negative start: no upper bound), spaced linearly, or along a quarter
/// sine or cosine, towards the next σ.
pub struct ExtendIntermediateSigmas;

impl Node for ExtendIntermediateSigmas {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("ExtendIntermediateSigmas", SIGMAS)
            .required("sigmas", InputSpec::of("SIGMAS"))
            .required("steps", InputSpec::int(2, 1, 100))
            .required("start_at_sigma", unrounded(-1.0, -1.0, 20000.0, 0.01))
            .required("end_at_sigma", unrounded(12.0, 0.0, 20000.0, 0.01))
            .required("spacing", InputSpec::combo(&["linear", "cosine", "sine"]))
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let sigmas = &inputs.object::<Sigmas>("sigmas")?.0;
        let steps = steps(inputs)?.max(1);
        let start_at_sigma = inputs.float("start_at_sigma")?;
        let start = if start_at_sigma < 0.0 {
            f32::INFINITY
        } else {
            start_at_sigma as f32
        };
        let end = inputs.float("end_at_sigma")? as f32;
        let quarter_turn = |x: f32| x * std::f32::consts::PI / 2.0;
        let positions = &linspace_f32(0.0, 1.0, steps + 1)[1..steps];
        let spacing: Vec<f32> = match inputs.string("spacing")? {
            "linear" => positions.to_vec(),
            "cosine" => positions.iter().map(|x| quarter_turn(*x).sin()).collect(),
            "sine" => positions.iter().map(|x| 1.0 - quarter_turn(*x).cos()).collect(),
            other => return Err(NodeError::value(format!("unknown spacing '{other}'"))),
        };
        let mut extended = Vec::with_capacity(sigmas.len() * steps);
        for pair in sigmas.windows(2) {
            let (current, next) = (pair[0], pair[1]);
            extended.push(current);
            if end <= current && current <= start {
                extended.extend(spacing.iter().map(|fraction| fraction * (next - current) + current));
            }
        }
        extended.extend(sigmas.last());
        sigmas_output(extended)
    }
}

/// `SamplingPercentToSigma`: the model's σ at a fraction of sampling (with
/// `return_actual_sigma`, its σ_max at 0 and σ_min at 1 rather than the interval bounds).
pub struct SamplingPercentToSigma;

impl Node for SamplingPercentToSigma {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("SamplingPercentToSigma", SIGMAS)
            .required("model", InputSpec::of("MODEL").with_options())
            .required("sampling_percent", InputSpec::float(0.0, 0.0, 1.0).opt("step", 0.0001))
            .required(
                "return_actual_sigma",
                InputSpec::boolean(false).opt(
                    "tooltip",
                    "Return the actual sigma value instead of the value used for interval checks.\nThis only affects results at 0.0 and 1.0.",
                ),
            )
            .output(OutputSpec::of("FLOAT").named("sigma_value"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let schedule = &inputs.object::<Model>("model")?.0.schedule;
        let percent = inputs.float("sampling_percent")?;
        let mut sigma = schedule.percent_to_sigma(percent);
        if inputs.bool("return_actual_sigma")? {
            if percent == 0.0 {
                sigma = f64::from(schedule.sigma_max());
            } else if percent == 1.0 {
                sigma = f64::from(schedule.sigma_min());
            }
        }
        Ok(NodeOutput::values(vec![Value::Json(json!(sigma))]))
    }
}
