//! ComfyUI's custom-sampling nodes (`comfy_extras.nodes_custom_sampler`): sampling taken apart
//! into its pieces — a NOISE (RandomNoise, DisableNoise; AddNoise applies one), a GUIDER
//! (BasicGuider, CFGGuider), a SAMPLER (KSamplerSelect; the sampler nodes with options are in
//! [`custom_samplers`](super::custom_samplers)) and SIGMAS (BasicScheduler and the schedule nodes,
//! cut and flipped by SplitSigmas, SplitSigmasDenoise, FlipSigmas; more in
//! [`schedulers`](super::schedulers)) — put together by SamplerCustom and SamplerCustomAdvanced,
//! which also return the last denoised estimate.

use candle_core::{DType, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeObject, NodeOutput, Services, Value};
use easel_models::sampling::noise::prepare_noise;
use easel_models::sampling::samplers::{Sampler, SAMPLER_NAMES};
use easel_models::sampling::schedule::{self, ksampler_sigmas, Scheduler};

use crate::conditioning::Conditioning;
use crate::latent::Latent;
use crate::model::diffusion_model::{DiffusionModel, Model};
use crate::runtime::tensor_error;
use crate::sampling::ksampler::{denoise_mask, seed_input, seed_spec, with_progress};
use crate::sampling::perp_neg::PerpNegGuidance;
use crate::sampling::run::{sample_guided, DualCfg, GuidedSampling};

/// The Python module of every node here.
const MODULE: &str = "comfy_extras.nodes_custom_sampler";

/// The SAMPLER socket: a sampler and its options.
#[derive(Clone, Debug)]
pub struct SamplerChoice(pub Sampler);

impl NodeObject for SamplerChoice {
    fn type_name(&self) -> &'static str {
        "SAMPLER"
    }
}

/// The SIGMAS socket: the σ of each step, then the last.
#[derive(Clone, Debug)]
pub struct Sigmas(pub Vec<f32>);

impl NodeObject for Sigmas {
    fn type_name(&self) -> &'static str {
        "SIGMAS"
    }
}

/// The NOISE socket: the initial noise drawn with `seed`, or none (which still seeds the
/// samplers' step noise, with 0 as ComfyUI's empty noise does).
#[derive(Clone, Debug)]
pub struct NoiseChoice {
    pub seed: u64,
    pub enabled: bool,
}

impl NodeObject for NoiseChoice {
    fn type_name(&self) -> &'static str {
        "NOISE"
    }
}

/// The GUIDER socket: the model and the conditioning it is guided by (no negative side for
/// BasicGuider, whose cfg is 1).
#[derive(Clone, Debug)]
pub struct Guider {
    pub model: Model,
    pub positive: Conditioning,
    pub negative: Conditioning,
    pub cfg: f64,
    /// DualCFGGuider's middle prompt (then `cfg` is its `cfg_cond2_negative`).
    pub dual: Option<DualCfg>,
    /// PerpNegGuider's empty prompt and its scale.
    pub perp_neg: Option<PerpNegGuidance>,
}

impl NodeObject for Guider {
    fn type_name(&self) -> &'static str {
        "GUIDER"
    }
}

impl Guider {
    /// The CFG guider of the `model`, `positive`, `negative` and `cfg` inputs (CFGGuider,
    /// SamplerCustom).
    fn cfg_from(inputs: &NodeInputs) -> Result<Self, NodeError> {
        Ok(Guider {
            model: inputs.object::<Model>("model")?.clone(),
            positive: inputs.object::<Conditioning>("positive")?.clone(),
            negative: inputs.object::<Conditioning>("negative")?.clone(),
            cfg: inputs.float("cfg")?,
            dual: None,
            perp_neg: None,
        })
    }
}

fn sigmas_value(sigmas: Vec<f32>) -> Value {
    Value::object(Sigmas(sigmas))
}

pub(crate) fn sigmas_output(sigmas: Vec<f32>) -> Result<NodeOutput, NodeError> {
    Ok(NodeOutput::values(vec![sigmas_value(sigmas)]))
}

/// The schema of node `name` of this module in `category`, displayed by its class name.
pub(crate) fn node_schema(name: &str, category: &str) -> NodeSchema {
    NodeSchema::v1(name, MODULE, category).display(name)
}

/// The `steps` input, as a count.
pub(crate) fn steps(inputs: &NodeInputs) -> Result<usize, NodeError> {
    Ok(inputs.int("steps")?.max(0) as usize)
}

fn cfg_spec() -> InputSpec {
    InputSpec::float(8.0, 0.0, 100.0).opt("step", 0.1).opt("round", 0.01)
}

/// Runs `guider` with `noise` and the `sampler` and `sigmas` inputs on the `latent_image`
/// input: the sampled latent and the last denoised estimate (the sampled one again when no step
/// ran).
fn sample_custom(
    ctx: &NodeContext,
    inputs: &NodeInputs,
    guider: &Guider,
    noise: &NoiseChoice,
) -> Result<NodeOutput, NodeError> {
    let (sampler, sigmas) = (
        inputs.object::<SamplerChoice>("sampler")?,
        inputs.object::<Sigmas>("sigmas")?,
    );
    let latent = inputs.object::<Latent>("latent_image")?;
    let model = &guider.model.0;
    let mask = match &latent.noise_mask {
        Some(mask) => Some(denoise_mask(mask, latent.samples.dims())?),
        None => None,
    };
    let run = GuidedSampling {
        model,
        positive: &guider.positive,
        negative: &guider.negative,
        cfg: guider.cfg,
        dual: guider.dual.as_ref(),
        perp_neg: guider.perp_neg.as_ref(),
        sampler: &sampler.0,
        sigmas: &sigmas.0,
        latent,
        seed: noise.seed,
        add_noise: noise.enabled,
        denoise_mask: mask,
    };
    let sampled = with_progress(ctx, &model.latent_format, |progress| sample_guided(&run, progress))?;
    let output = latent.with_samples(sampled.samples.clone());
    let denoised = match sampled.denoised {
        Some(denoised) => latent.with_samples(denoised),
        None => output.clone(),
    };
    Ok(NodeOutput::values(vec![Value::object(output), Value::object(denoised)]))
}

/// `SamplerCustomAdvanced`.
pub struct SamplerCustomAdvanced;

impl Node for SamplerCustomAdvanced {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("SamplerCustomAdvanced", "sampling/custom_sampling")
            .required("noise", InputSpec::of("NOISE"))
            .required("guider", InputSpec::of("GUIDER"))
            .required("sampler", InputSpec::of("SAMPLER"))
            .required("sigmas", InputSpec::of("SIGMAS"))
            .required("latent_image", InputSpec::of("LATENT"))
            .output(OutputSpec::of("LATENT").named("output"))
            .output(OutputSpec::of("LATENT").named("denoised_output"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        sample_custom(
            ctx,
            inputs,
            inputs.object::<Guider>("guider")?,
            inputs.object::<NoiseChoice>("noise")?,
        )
    }
}

/// `SamplerCustom`: SamplerCustomAdvanced with its noise and CFG guider given as inputs.
pub struct SamplerCustom;

impl Node for SamplerCustom {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("SamplerCustom", "sampling/custom_sampling")
            .required("model", InputSpec::of("MODEL"))
            .required("add_noise", InputSpec::boolean(true))
            .required("noise_seed", seed_spec(None))
            .required("cfg", cfg_spec())
            .required("positive", InputSpec::of("CONDITIONING"))
            .required("negative", InputSpec::of("CONDITIONING"))
            .required("sampler", InputSpec::of("SAMPLER"))
            .required("sigmas", InputSpec::of("SIGMAS"))
            .required("latent_image", InputSpec::of("LATENT"))
            .output(OutputSpec::of("LATENT").named("output"))
            .output(OutputSpec::of("LATENT").named("denoised_output"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let noise = NoiseChoice {
            seed: seed_input(inputs, "noise_seed")?,
            enabled: inputs.bool("add_noise")?,
        };
        sample_custom(ctx, inputs, &Guider::cfg_from(inputs)?, &noise)
    }
}

/// `RandomNoise`.
pub struct RandomNoise;

impl Node for RandomNoise {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("RandomNoise", "sampling/custom_sampling/noise")
            .required("noise_seed", seed_spec(None))
            .output(OutputSpec::of("NOISE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let noise = NoiseChoice {
            seed: seed_input(inputs, "noise_seed")?,
            enabled: true,
        };
        Ok(NodeOutput::values(vec![Value::object(noise)]))
    }
}

/// `DisableNoise`.
pub struct DisableNoise;

impl Node for DisableNoise {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("DisableNoise", "sampling/custom_sampling/noise").output(OutputSpec::of("NOISE"))
    }

    fn execute(&self, _: &NodeContext, _: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let noise = NoiseChoice {
            seed: 0,
            enabled: false,
        };
        Ok(NodeOutput::values(vec![Value::object(noise)]))
    }
}

/// `AddNoise`: the latent noised as sampling from the first σ to the last would start (by the
/// first σ alone when there is one), back in latent space, with non-finite values made 0.
pub struct AddNoise;

impl Node for AddNoise {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("AddNoise", "_for_testing/custom_sampling/noise")
            .required("model", InputSpec::of("MODEL"))
            .required("noise", InputSpec::of("NOISE"))
            .required("sigmas", InputSpec::of("SIGMAS"))
            .required("latent_image", InputSpec::of("LATENT"))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let sigmas = &inputs.object::<Sigmas>("sigmas")?.0;
        let latent = inputs.object::<Latent>("latent_image")?;
        let (Some(&first), Some(&last)) = (sigmas.first(), sigmas.last()) else {
            return Ok(NodeOutput::values(vec![Value::object(latent.clone())]));
        };
        let model = &inputs.object::<Model>("model")?.0;
        let noise = inputs.object::<NoiseChoice>("noise")?;
        let scale = if sigmas.len() > 1 { (first - last).abs() } else { first };
        let noisy = add_noise(model, noise, latent, scale).map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(latent.with_samples(noisy))]))
    }
}

/// `noise_scaling(scale, noise, latent)` in model space (an empty latent is not shifted into
/// it), scaled back out, NaN and infinities made 0.
fn add_noise(model: &DiffusionModel, noise: &NoiseChoice, latent: &Latent, scale: f32) -> candle_core::Result<Tensor> {
    let samples = latent.samples.to_dtype(DType::F32)?;
    let shape = samples.dims().to_vec();
    let drawn = if noise.enabled {
        let values = prepare_noise(noise.seed, &shape, latent.batch_index.as_deref());
        Tensor::from_vec(values, shape.as_slice(), samples.device())?
    } else {
        samples.zeros_like()?
    };
    let has_content = samples.abs()?.max_all()?.to_scalar::<f32>()? != 0.0;
    let samples = if has_content {
        model.latent_format.process_in(&samples)?
    } else {
        samples
    };
    let noisy = model.prediction.noise_scaling(scale, &drawn, &samples, false)?;
    let noisy = model.latent_format.process_out(&noisy)?;
    let finite: Vec<f32> = noisy
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|value| if value.is_finite() { value } else { 0.0 })
        .collect();
    Tensor::from_vec(finite, noisy.shape(), noisy.device())
}

/// `BasicGuider`: the model guided by one conditioning alone.
pub struct BasicGuider;

impl Node for BasicGuider {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("BasicGuider", "sampling/custom_sampling/guiders")
            .required("model", InputSpec::of("MODEL"))
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .output(OutputSpec::of("GUIDER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let guider = Guider {
            model: inputs.object::<Model>("model")?.clone(),
            positive: inputs.object::<Conditioning>("conditioning")?.clone(),
            negative: Conditioning(Vec::new()),
            cfg: 1.0,
            dual: None,
            perp_neg: None,
        };
        Ok(NodeOutput::values(vec![Value::object(guider)]))
    }
}

/// `CFGGuider`: classifier-free guidance between `positive` and `negative`.
pub struct CfgGuider;

impl Node for CfgGuider {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("CFGGuider", "sampling/custom_sampling/guiders")
            .required("model", InputSpec::of("MODEL"))
            .required("positive", InputSpec::of("CONDITIONING"))
            .required("negative", InputSpec::of("CONDITIONING"))
            .required("cfg", cfg_spec())
            .output(OutputSpec::of("GUIDER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput::values(vec![Value::object(Guider::cfg_from(inputs)?)]))
    }
}

/// `DualCFGGuider`: guidance from `negative` to `cond2` (scale `cfg_cond2_negative`) and from
/// `cond2` to `cond1` (scale `cfg_conds`), in the regular or nested style.
pub struct DualCfgGuider;

impl Node for DualCfgGuider {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("DualCFGGuider", "sampling/custom_sampling/guiders")
            .required("model", InputSpec::of("MODEL"))
            .required("cond1", InputSpec::of("CONDITIONING"))
            .required("cond2", InputSpec::of("CONDITIONING"))
            .required("negative", InputSpec::of("CONDITIONING"))
            .required("cfg_conds", cfg_spec())
            .required("cfg_cond2_negative", cfg_spec())
            .required("style", InputSpec::combo(&["regular", "nested"]))
            .output(OutputSpec::of("GUIDER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let guider = Guider {
            model: inputs.object::<Model>("model")?.clone(),
            positive: inputs.object::<Conditioning>("cond1")?.clone(),
            negative: inputs.object::<Conditioning>("negative")?.clone(),
            cfg: inputs.float("cfg_cond2_negative")?,
            dual: Some(DualCfg {
                middle: inputs.object::<Conditioning>("cond2")?.clone(),
                cfg_conds: inputs.float("cfg_conds")?,
                nested: inputs.string("style")? == "nested",
            }),
            perp_neg: None,
        };
        Ok(NodeOutput::values(vec![Value::object(guider)]))
    }
}

/// `KSamplerSelect`.
pub struct KSamplerSelect;

impl Node for KSamplerSelect {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("KSamplerSelect", "sampling/custom_sampling/samplers")
            .required("sampler_name", InputSpec::combo(&SAMPLER_NAMES))
            .output(OutputSpec::of("SAMPLER"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let name = inputs.string("sampler_name")?.to_string();
        Ok(NodeOutput::values(vec![Value::object(SamplerChoice(Sampler::Named(
            name,
        )))]))
    }
}

pub(crate) fn steps_spec(default: i64, max: i64) -> InputSpec {
    InputSpec::int(default, 1, max)
}

pub(crate) fn denoise_spec() -> InputSpec {
    InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01)
}

/// `BasicScheduler`: the model's σ for `steps` by a scheduler; with `denoise` below 1, the last
/// `steps` of a longer schedule (none at 0).
pub struct BasicScheduler;

impl Node for BasicScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schedulers: Vec<&str> = Scheduler::ALL.iter().map(|s| s.name()).collect();
        node_schema("BasicScheduler", "sampling/custom_sampling/schedulers")
            .required("model", InputSpec::of("MODEL"))
            .required("scheduler", InputSpec::combo(&schedulers))
            .required("steps", steps_spec(20, 10000))
            .required("denoise", denoise_spec())
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let scheduler: Scheduler = inputs.string("scheduler")?.parse().map_err(|_| {
            NodeError::value(format!(
                "unknown scheduler '{}'",
                inputs.string("scheduler").unwrap_or("")
            ))
        })?;
        let steps = steps(inputs)?;
        let denoise = inputs.float("denoise")?;
        let sigmas = ksampler_sigmas(&model.0.schedule, scheduler, steps, denoise.min(1.0), false);
        sigmas_output(sigmas)
    }
}

pub(crate) fn sigma_spec(default: f64) -> InputSpec {
    InputSpec::float(default, 0.0, 5000.0)
        .opt("step", 0.01)
        .opt("round", false)
}

/// `KarrasScheduler`: Karras et al.'s σ between the given bounds.
pub struct KarrasScheduler;

impl Node for KarrasScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("KarrasScheduler", "sampling/custom_sampling/schedulers")
            .required("steps", steps_spec(20, 10000))
            .required("sigma_max", sigma_spec(14.614642))
            .required("sigma_min", sigma_spec(0.0291675))
            .required(
                "rho",
                InputSpec::float(7.0, 0.0, 100.0).opt("step", 0.01).opt("round", false),
            )
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let sigmas = schedule::karras(
            steps(inputs)?,
            inputs.float("sigma_min")?,
            inputs.float("sigma_max")?,
            inputs.float("rho")?,
        );
        sigmas_output(sigmas)
    }
}

/// `ExponentialScheduler`: σ evenly spaced in log σ between the given bounds.
pub struct ExponentialScheduler;

impl Node for ExponentialScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("ExponentialScheduler", "sampling/custom_sampling/schedulers")
            .required("steps", steps_spec(20, 10000))
            .required("sigma_max", sigma_spec(14.614642))
            .required("sigma_min", sigma_spec(0.0291675))
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let sigmas = schedule::exponential(steps(inputs)?, inputs.float("sigma_min")?, inputs.float("sigma_max")?);
        sigmas_output(sigmas)
    }
}

/// `BetaSamplingScheduler`: the model's σ at the quantiles of a Beta(α, β) distribution.
pub struct BetaSamplingScheduler;

impl Node for BetaSamplingScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        let shape = || InputSpec::float(0.6, 0.0, 50.0).opt("step", 0.01).opt("round", false);
        node_schema("BetaSamplingScheduler", "sampling/custom_sampling/schedulers")
            .required("model", InputSpec::of("MODEL"))
            .required("steps", steps_spec(20, 10000))
            .required("alpha", shape())
            .required("beta", shape())
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let sigmas = schedule::beta(
            &model.0.schedule,
            steps(inputs)?,
            inputs.float("alpha")?,
            inputs.float("beta")?,
        );
        sigmas_output(sigmas)
    }
}

/// `SDTurboScheduler`: timesteps 999, 899, … (from the `denoise` part of the ten), then 0.
pub struct SdTurboScheduler;

impl Node for SdTurboScheduler {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("SDTurboScheduler", "sampling/custom_sampling/schedulers")
            .required("model", InputSpec::of("MODEL"))
            .required("steps", steps_spec(1, 10))
            .required(
                "denoise",
                InputSpec::float(1.0, 0.0, 1.0).opt("min", 0).opt("step", 0.01),
            )
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let steps = steps(inputs)?;
        let start = 10 - (10.0 * inputs.float("denoise")?) as usize;
        let mut sigmas: Vec<f32> = (1..=10)
            .rev()
            .map(|n| (n * 100 - 1) as f32)
            .skip(start)
            .take(steps)
            .map(|timestep| model.0.schedule.sigma(timestep))
            .collect();
        sigmas.push(0.0);
        sigmas_output(sigmas)
    }
}

/// `SplitSigmas`: σ up to and from step `step` (which both keep).
pub struct SplitSigmas;

impl Node for SplitSigmas {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("SplitSigmas", "sampling/custom_sampling/sigmas")
            .required("sigmas", InputSpec::of("SIGMAS"))
            .required("step", InputSpec::int(0, 0, 10000))
            .output(OutputSpec::of("SIGMAS").named("high_sigmas"))
            .output(OutputSpec::of("SIGMAS").named("low_sigmas"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let sigmas = &inputs.object::<Sigmas>("sigmas")?.0;
        let step = (inputs.int("step")?.max(0) as usize).min(sigmas.len());
        let high = sigmas[..(step + 1).min(sigmas.len())].to_vec();
        let low = sigmas[step..].to_vec();
        Ok(NodeOutput::values(vec![sigmas_value(high), sigmas_value(low)]))
    }
}

/// `SplitSigmasDenoise`: the last `denoise` part of the steps apart from those before it (as
/// Python's negative slices cut them).
pub struct SplitSigmasDenoise;

impl Node for SplitSigmasDenoise {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("SplitSigmasDenoise", "sampling/custom_sampling/sigmas")
            .required("sigmas", InputSpec::of("SIGMAS"))
            .required("denoise", denoise_spec())
            .output(OutputSpec::of("SIGMAS").named("high_sigmas"))
            .output(OutputSpec::of("SIGMAS").named("low_sigmas"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let sigmas = &inputs.object::<Sigmas>("sigmas")?.0;
        let steps = sigmas.len().saturating_sub(1);
        let total = (steps as f64 * inputs.float("denoise")?).round_ties_even() as usize;
        // sigmas[:-total] (empty for total 0) and sigmas[-(total + 1):].
        let high = match total {
            0 => Vec::new(),
            total => sigmas[..sigmas.len().saturating_sub(total)].to_vec(),
        };
        let low = sigmas[sigmas.len().saturating_sub(total + 1)..].to_vec();
        Ok(NodeOutput::values(vec![sigmas_value(high), sigmas_value(low)]))
    }
}

/// `FlipSigmas`: σ in reverse, a leading 0 made 0.0001.
pub struct FlipSigmas;

impl Node for FlipSigmas {
    fn schema(&self, _: &Services) -> NodeSchema {
        node_schema("FlipSigmas", "sampling/custom_sampling/sigmas")
            .required("sigmas", InputSpec::of("SIGMAS"))
            .output(OutputSpec::of("SIGMAS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut sigmas = inputs.object::<Sigmas>("sigmas")?.0.clone();
        sigmas.reverse();
        if let Some(first) = sigmas.first_mut().filter(|first| **first == 0.0) {
            *first = 0.0001;
        }
        sigmas_output(sigmas)
    }
}
