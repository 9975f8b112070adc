//! EasyCache and LazyCache (`comfy_extras/nodes_easycache.py`): between sampler steps, when
//! the input has changed little, reuse the change the model made last time (its output minus its
//! input) instead of calling it.
//!
//! Both estimate how much the output would change from how much the input changed (mean absolute
//! differences of every 8th row and column), times the ratio of output to input change measured
//! at the last two calls, over the mean absolute output; the estimates add up over skipped
//! steps, and while the sum stays under `reuse_threshold` the step is skipped. They act only
//! where σ lies between the σ of `start_percent` and that of `end_percent`.
//!
//! - [`EasyCache`] wraps the network calls ([`NetworkWrapper`]): each chunk of the batch keeps its
//!   own change, the first chunk of the run's first call decides for the whole model evaluation.
//! - [`LazyCache`] wraps the guided prediction ([`PredictionWrapper`]): one change for it all.
//!
//! State lives in the copy each sampling run makes ([`EasyCacheRun`], [`LazyCacheRun`]); its end
//! logs how many steps were skipped. Where ComfyUI 0.3.64 adds every chunk's change to the whole
//! batch (its issue #10344), each chunk gets its own, as ComfyUI does since; a step is reused only
//! when every chunk of the call has a change kept, as there.
//!
//! A chunk is known by its kind and its place among the model evaluation's calls (ComfyUI gives
//! each conditioning entry a uuid); a guidance function's extra call of the model (PAG, SAG) is
//! one more such chunk, with its own change, and on a skipped step it is skipped too (ComfyUI
//! starts a new evaluation for it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Result, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};
use easel_models::architectures::unet_patches::BatchPart;

use crate::model::patch_nodes::patched;
use crate::model::wrappers::{
    GuidedPrediction, NetworkCall, NetworkWrapper, PredictionWrapper, SamplingRun, WrappedNetwork, WrappedPrediction,
};
use crate::runtime::experimental;

/// Every how many rows and columns the change is measured (ComfyUI's `subsample_factor`).
const SUBSAMPLE_FACTOR: usize = 8;

/// What both caches are set to by their node.
#[derive(Clone, Copy, Debug)]
pub struct StepCacheSettings {
    pub reuse_threshold: f64,
    pub start_percent: f64,
    pub end_percent: f64,
    /// Log every decision.
    pub verbose: bool,
}

impl StepCacheSettings {
    /// The σ below which the cache acts and the one at or below which it stops, as ComfyUI
    /// compares them with a float32 σ.
    fn sigma_bounds(&self, run: &SamplingRun) -> (f32, f32) {
        let start = run.schedule.percent_to_sigma(self.start_percent) as f32;
        let end = run.schedule.percent_to_sigma(self.end_percent) as f32;
        (start, end)
    }
}

/// Whether σ is at or past the cache's end (`not σ > end`: NaN counts as past).
fn past_end(sigma: f32, end: f32) -> bool {
    sigma.partial_cmp(&end) != Some(std::cmp::Ordering::Greater)
}

/// Every [`SUBSAMPLE_FACTOR`]th row and column of `t`'s last two dimensions, from the first.
fn subsample(t: &Tensor) -> Result<Tensor> {
    let rank = t.rank();
    if rank < 2 {
        return Ok(t.clone());
    }
    let mut sampled = t.clone();
    for dim in [rank - 2, rank - 1] {
        let picked: Vec<u32> = (0..t.dim(dim)? as u32).step_by(SUBSAMPLE_FACTOR).collect();
        sampled = sampled.index_select(&Tensor::new(picked.as_slice(), t.device())?, dim)?;
    }
    Ok(sampled)
}

/// The mean absolute value of `t` (summed in f64, given as the float32 torch's `mean` gives).
fn mean_abs(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F64)?.abs()?.mean_all()?.to_scalar::<f64>()? as f32)
}

/// The estimate of how fast the output changes with the input, and what it is measured
/// against: the decision both caches share.
struct ChangeTracker {
    name: &'static str,
    verbose: bool,
    /// Output change over input change at the last call that measured both.
    relative_transformation_rate: Option<f32>,
    /// The estimated output changes added up since the last evaluated call.
    cumulative_change_rate: f32,
    /// The last evaluated call's input and output, subsampled, and its mean absolute output.
    input_prev: Option<Tensor>,
    output_prev: Option<Tensor>,
    output_prev_norm: Option<f32>,
    /// For the verbose log.
    output_change_rates: Vec<f32>,
    approx_output_change_rates: Vec<f32>,
}

impl ChangeTracker {
    fn new(name: &'static str, verbose: bool) -> Self {
        ChangeTracker {
            name,
            verbose,
            relative_transformation_rate: None,
            cumulative_change_rate: 0.0,
            input_prev: None,
            output_prev: None,
            output_prev_norm: None,
            output_change_rates: Vec::new(),
            approx_output_change_rates: Vec::new(),
        }
    }

    /// Forgets everything; as ComfyUI's `reset`, the rate becomes 0 (so the next estimate is 0).
    fn reset(&mut self) {
        *self = ChangeTracker {
            relative_transformation_rate: Some(0.0),
            ..ChangeTracker::new(self.name, self.verbose)
        };
    }

    /// Measures the (subsampled) input's change and adds the estimated output change up: the
    /// input change, and whether the output can be reused (the sum under `threshold` and
    /// `can_reuse`; otherwise the sum starts again).
    fn consider(&mut self, input: &Tensor, threshold: f32, can_reuse: bool) -> Result<(Option<f32>, bool)> {
        let input_change = match &self.input_prev {
            Some(previous) => Some(mean_abs(&(input - previous)?)?),
            None => None,
        };
        let (Some(norm), Some(rate), Some(change)) =
            (self.output_prev_norm, self.relative_transformation_rate, input_change)
        else {
            return Ok((input_change, false));
        };
        self.cumulative_change_rate += (rate * change) / norm;
        let cumulative = self.cumulative_change_rate;
        if cumulative < threshold && can_reuse {
            if self.verbose {
                tracing::info!(
                    "{} [verbose] - skipping step; cumulative_change_rate: {cumulative}, reuse_threshold: {threshold}",
                    self.name
                );
            }
            return Ok((input_change, true));
        }
        if self.verbose {
            tracing::info!(
                "{} [verbose] - NOT skipping step; cumulative_change_rate: {cumulative}, reuse_threshold: {threshold}",
                self.name
            );
        }
        self.cumulative_change_rate = 0.0;
        Ok((input_change, false))
    }

    /// After an evaluated call: the output's change measured against the last one gives the new
    /// rate (where the input's was measured too).
    fn observe(&mut self, output: &Tensor, input_change: Option<f32>) -> Result<()> {
        let (Some(norm), Some(previous)) = (self.output_prev_norm, &self.output_prev) else {
            return Ok(());
        };
        let output_change = mean_abs(&(output - previous)?)?;
        if self.verbose {
            self.output_change_rates.push(output_change / norm);
        }
        if let (Some(rate), Some(change)) = (self.relative_transformation_rate, input_change) {
            let approx = (rate * change) / norm;
            self.approx_output_change_rates.push(approx);
            if self.verbose {
                tracing::info!("{} [verbose] - approx_output_change_rate: {approx}", self.name);
            }
        }
        if let Some(change) = input_change {
            self.relative_transformation_rate = Some(output_change / change);
        }
        if self.verbose {
            tracing::info!("{} [verbose] - output_change_rate: {}", self.name, output_change / norm);
        }
        Ok(())
    }

    /// Keeps an evaluated call's subsampled input and output and its whole output's mean
    /// absolute value.
    fn remember(&mut self, input: Tensor, output: Tensor, whole_output: &Tensor) -> Result<()> {
        self.output_prev_norm = Some(mean_abs(whole_output)?);
        self.input_prev = Some(input);
        self.output_prev = Some(output);
        Ok(())
    }

    /// The verbose log's rates at the end of a run.
    fn log_rates(&self) {
        if self.verbose {
            let (rates, approx) = (&self.output_change_rates, &self.approx_output_change_rates);
            tracing::info!(
                "{} [verbose] - output_change_rates {}: {rates:?}",
                self.name,
                rates.len()
            );
            tracing::info!(
                "{} [verbose] - approx_output_change_rates {}: {approx:?}",
                self.name,
                approx.len()
            );
        }
    }
}

/// Logs the start of a run with a cache.
fn log_enabled(name: &str, settings: &StepCacheSettings) {
    tracing::info!(
        "{name} enabled - threshold: {}, start_percent: {}, end_percent: {}",
        settings.reuse_threshold,
        settings.start_percent,
        settings.end_percent
    );
}

/// Logs the end of a run with a cache: steps skipped out of `total`.
fn log_skipped(name: &str, skipped: usize, total: usize) {
    let speedup = match total.checked_sub(skipped) {
        Some(run) if run > 0 => total as f64 / run as f64,
        _ => 1.0,
    };
    tracing::info!("{name} - skipped {skipped}/{total} steps ({speedup:.2}x speedup).");
}

/// The tensor's dtype and its shape from `from` on: what a cache's state is valid for.
fn metadata(t: &Tensor, from: usize) -> (DType, Vec<usize>) {
    (t.dtype(), t.dims().get(from..).unwrap_or_default().to_vec())
}

/// The state of a run's lock, or an error saying it was poisoned.
fn locked<'a, T>(state: &'a Mutex<T>, name: &str) -> Result<MutexGuard<'a, T>> {
    state
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name}'s state was poisoned by an earlier failure")))
}

/// A chunk of a network call: conditional or not, and which such chunk it is in the model
/// evaluation (a side's entries come in the same order every time: ComfyUI's `uuids`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ChunkKey {
    conditional: bool,
    ordinal: usize,
}

/// The EasyCache node's patch; each sampling run gets an [`EasyCacheRun`]. Outside a sampling
/// run the network runs as it is.
pub struct EasyCache {
    pub settings: StepCacheSettings,
}

impl NetworkWrapper for EasyCache {
    fn for_sampling_run(&self, run: &SamplingRun) -> Option<Arc<dyn NetworkWrapper>> {
        Some(Arc::new(EasyCacheRun::new(self.settings, run)))
    }

    fn wrap(&self, call: &NetworkCall, network: &WrappedNetwork) -> Result<Tensor> {
        network(call.input)
    }
}

/// EasyCache over one sampling run.
pub struct EasyCacheRun {
    settings: StepCacheSettings,
    start_sigma: f32,
    end_sigma: f32,
    total_steps: usize,
    state: Mutex<EasyCacheState>,
}

/// What EasyCache keeps over a run (ComfyUI's `EasyCacheHolder`).
struct EasyCacheState {
    tracker: ChangeTracker,
    /// The chunk whose change decides (`first_cond_uuid`); `None` until the first call acted on.
    first_chunk: Option<ChunkKey>,
    /// The deciding chunk chose to skip this model evaluation.
    skip_current_step: bool,
    /// The last change (output − input) of each chunk.
    changes: HashMap<ChunkKey, Tensor>,
    /// Chunks of each kind (unconditional, conditional) called so far in this model evaluation.
    called: [usize; 2],
    steps_skipped: usize,
    /// The dtype and shape past the batch the state was built for.
    metadata: Option<(DType, Vec<usize>)>,
}

impl EasyCacheRun {
    fn new(settings: StepCacheSettings, run: &SamplingRun) -> Self {
        log_enabled("EasyCache", &settings);
        let (start_sigma, end_sigma) = settings.sigma_bounds(run);
        EasyCacheRun {
            settings,
            start_sigma,
            end_sigma,
            total_steps: run.sigmas.len().saturating_sub(1),
            state: Mutex::new(EasyCacheState {
                tracker: ChangeTracker::new("EasyCache", settings.verbose),
                first_chunk: None,
                skip_current_step: false,
                changes: HashMap::new(),
                called: [0, 0],
                steps_skipped: 0,
                metadata: None,
            }),
        }
    }
}

impl EasyCacheState {
    /// The keys of a call's chunks, counted into this model evaluation.
    fn keys(&mut self, parts: &[BatchPart]) -> Vec<ChunkKey> {
        parts
            .iter()
            .map(|part| {
                let conditional = *part == BatchPart::Cond;
                let count = &mut self.called[usize::from(conditional)];
                *count += 1;
                ChunkKey {
                    conditional,
                    ordinal: *count - 1,
                }
            })
            .collect()
    }

    /// Starts again where the input's dtype or shape past the batch changed (leaving the new
    /// shape to be taken by the next call, as ComfyUI's `check_metadata` does).
    fn check_metadata(&mut self, input: &Tensor) {
        let found = metadata(input, 1);
        match &self.metadata {
            None => self.metadata = Some(found),
            Some(kept) if *kept == found => {}
            Some(_) => {
                tracing::warn!("EasyCache - Tensor shape, dtype or device changed, resetting state");
                self.tracker.reset();
                self.first_chunk = None;
                self.skip_current_step = false;
                self.changes.clear();
                self.steps_skipped = 0;
                self.metadata = None;
            }
        }
    }

    /// The input with each chunk's kept change added.
    fn reuse(&mut self, input: &Tensor, keys: &[ChunkKey]) -> Result<Tensor> {
        if self.first_chunk.is_some_and(|first| keys.contains(&first)) {
            self.steps_skipped += 1;
        }
        let size = input.dim(0)? / keys.len();
        let chunks = keys
            .iter()
            .enumerate()
            .map(|(index, key)| match self.changes.get(key) {
                Some(change) => input.narrow(0, index * size, size)? + change,
                None => Err(candle_core::Error::Msg(
                    "EasyCache has no change kept for a chunk".into(),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&chunks, 0)
    }

    /// Keeps each chunk's change, output − input.
    fn keep_changes(&mut self, output: &Tensor, input: &Tensor, keys: &[ChunkKey]) -> Result<()> {
        let change = (output - input)?;
        let size = change.dim(0)? / keys.len();
        for (index, key) in keys.iter().enumerate() {
            self.changes.insert(*key, change.narrow(0, index * size, size)?);
        }
        Ok(())
    }
}

/// Chunk `index` of `count` equal ones of `t`'s batch, subsampled.
fn chunk_subsampled(t: &Tensor, index: usize, count: usize) -> Result<Tensor> {
    let size = t.dim(0)? / count;
    subsample(&t.narrow(0, index * size, size)?)
}

impl NetworkWrapper for EasyCacheRun {
    fn start_model_evaluation(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.skip_current_step = false;
            state.called = [0, 0];
        }
    }

    fn wrap(&self, call: &NetworkCall, network: &WrappedNetwork) -> Result<Tensor> {
        let mut state = locked(&self.state, "EasyCache")?;
        let keys = state.keys(call.parts);
        if past_end(call.sigma, self.end_sigma) || keys.is_empty() {
            return network(call.input);
        }
        let input = call.input;
        let first_index = |state: &EasyCacheState| {
            state
                .first_chunk
                .and_then(|first| keys.iter().position(|key| *key == first))
        };
        let mut first = first_index(&state);
        let mut input_change = None;
        if call.sigma <= self.start_sigma {
            state.check_metadata(input);
            let can_reuse = keys.iter().all(|key| state.changes.contains_key(key));
            if state.skip_current_step && can_reuse {
                if self.settings.verbose {
                    tracing::info!(
                        "EasyCache [verbose] - was marked to skip this step by {:?}",
                        state.first_chunk
                    );
                }
                return state.reuse(input, &keys);
            }
            if state.first_chunk.is_none() {
                // ComfyUI's first chunk: its calc_cond_batch batches the sides in reverse order
                // (the negative one first), so of a call here it is the last.
                state.first_chunk = keys.last().copied();
                first = first_index(&state);
            }
            if let Some(index) = first {
                let sampled = chunk_subsampled(input, index, keys.len())?;
                let threshold = self.settings.reuse_threshold as f32;
                let (change, reuse) = state.tracker.consider(&sampled, threshold, can_reuse)?;
                input_change = change;
                if reuse {
                    state.skip_current_step = true;
                    return state.reuse(input, &keys);
                }
            }
        }
        let output = network(input)?;
        let first_output = first
            .map(|index| chunk_subsampled(&output, index, keys.len()))
            .transpose()?;
        if let Some(first_output) = &first_output {
            state.tracker.observe(first_output, input_change)?;
        }
        state.keep_changes(&output, input, &keys)?;
        if let (Some(index), Some(first_output)) = (first, first_output) {
            let first_input = chunk_subsampled(input, index, keys.len())?;
            state.tracker.remember(first_input, first_output, &output)?;
        }
        Ok(output)
    }
}

impl Drop for EasyCacheRun {
    fn drop(&mut self) {
        if let Ok(state) = self.state.lock() {
            state.tracker.log_rates();
            log_skipped("EasyCache", state.steps_skipped, self.total_steps);
        }
    }
}

/// The LazyCache node's patch; each sampling run gets a [`LazyCacheRun`]. Outside a sampling
/// run the prediction is made as it is.
pub struct LazyCache {
    pub settings: StepCacheSettings,
}

impl PredictionWrapper for LazyCache {
    fn for_sampling_run(&self, run: &SamplingRun) -> Option<Arc<dyn PredictionWrapper>> {
        Some(Arc::new(LazyCacheRun::new(self.settings, run)))
    }

    fn wrap(&self, x: &Tensor, _: f32, predict: &mut WrappedPrediction) -> Result<GuidedPrediction> {
        predict(x)
    }
}

/// LazyCache over one sampling run.
pub struct LazyCacheRun {
    settings: StepCacheSettings,
    start_sigma: f32,
    end_sigma: f32,
    total_steps: usize,
    state: Mutex<LazyCacheState>,
}

/// What LazyCache keeps over a run (ComfyUI's `LazyCacheHolder`).
struct LazyCacheState {
    tracker: ChangeTracker,
    /// The last change, denoised − x, and the negative side's last prediction (what a CFG++
    /// sampler reads on a skipped step, as ComfyUI's post-CFG hook leaves it).
    change: Option<Tensor>,
    uncond: Option<Tensor>,
    steps_skipped: usize,
    /// The dtype and shape the state was built for.
    metadata: Option<(DType, Vec<usize>)>,
}

impl LazyCacheRun {
    fn new(settings: StepCacheSettings, run: &SamplingRun) -> Self {
        log_enabled("LazyCache", &settings);
        let (start_sigma, end_sigma) = settings.sigma_bounds(run);
        LazyCacheRun {
            settings,
            start_sigma,
            end_sigma,
            total_steps: run.sigmas.len().saturating_sub(1),
            state: Mutex::new(LazyCacheState {
                tracker: ChangeTracker::new("LazyCache", settings.verbose),
                change: None,
                uncond: None,
                steps_skipped: 0,
                metadata: None,
            }),
        }
    }
}

impl LazyCacheState {
    /// As [`EasyCacheState::check_metadata`], over the whole shape.
    fn check_metadata(&mut self, x: &Tensor) {
        let found = metadata(x, 0);
        match &self.metadata {
            None => self.metadata = Some(found),
            Some(kept) if *kept == found => {}
            Some(_) => {
                tracing::warn!("LazyCache - Tensor shape, dtype or device changed, resetting state");
                self.tracker.reset();
                self.change = None;
                self.steps_skipped = 0;
                self.metadata = None;
            }
        }
    }
}

impl PredictionWrapper for LazyCacheRun {
    fn wrap(&self, x: &Tensor, sigma: f32, predict: &mut WrappedPrediction) -> Result<GuidedPrediction> {
        if past_end(sigma, self.end_sigma) {
            return predict(x);
        }
        let mut state = locked(&self.state, "LazyCache")?;
        let mut input_change = None;
        if sigma <= self.start_sigma {
            state.check_metadata(x);
            let threshold = self.settings.reuse_threshold as f32;
            let (change, reuse) = state.tracker.consider(&subsample(x)?, threshold, true)?;
            input_change = change;
            if reuse {
                let Some(kept) = &state.change else {
                    return Err(candle_core::Error::Msg("LazyCache has no change kept".into()));
                };
                let denoised = (x + kept)?;
                let uncond = state.uncond.clone();
                state.steps_skipped += 1;
                return Ok(GuidedPrediction { denoised, uncond });
            }
        }
        let prediction = predict(x)?;
        let output = &prediction.denoised;
        let sampled_output = subsample(output)?;
        state.tracker.observe(&sampled_output, input_change)?;
        state.change = Some((output - x)?);
        state.uncond = prediction.uncond.clone();
        state.tracker.remember(subsample(x)?, sampled_output, output)?;
        Ok(prediction)
    }
}

impl Drop for LazyCacheRun {
    fn drop(&mut self) {
        if let Ok(state) = self.state.lock() {
            state.tracker.log_rates();
            log_skipped("LazyCache", state.steps_skipped, self.total_steps);
        }
    }
}

/// The schema both nodes share, `name` in the tooltips.
fn cache_schema(name: &str, description: &str) -> NodeSchema {
    let float = |tooltip: String, default: f64, max: f64| {
        InputSpec::of("FLOAT")
            .opt("tooltip", tooltip)
            .opt("default", default)
            .opt("min", 0.0)
            .opt("max", max)
            .opt("step", 0.01)
    };
    experimental(
        NodeSchema::v3(name, "comfy_extras.nodes_easycache", "advanced/debug/model")
            .display(name)
            .description(description)
            .required(
                "model",
                InputSpec::of("MODEL").opt("tooltip", format!("The model to add {name} to.")),
            )
            .required(
                "reuse_threshold",
                float("The threshold for reusing cached steps.".into(), 0.2, 3.0),
            )
            .required(
                "start_percent",
                float(format!("The relative sampling step to begin use of {name}."), 0.15, 1.0),
            )
            .required(
                "end_percent",
                float(format!("The relative sampling step to end use of {name}."), 0.95, 1.0),
            )
            .required(
                "verbose",
                InputSpec::of("BOOLEAN")
                    .opt("tooltip", "Whether to log verbose information.")
                    .opt("default", false),
            )
            .output(OutputSpec::of("MODEL").tooltip(&format!("The model with {name}."))),
    )
}

/// The nodes' settings from their inputs.
fn settings(inputs: &NodeInputs) -> std::result::Result<StepCacheSettings, NodeError> {
    Ok(StepCacheSettings {
        reuse_threshold: inputs.float("reuse_threshold")?,
        start_percent: inputs.float("start_percent")?,
        end_percent: inputs.float("end_percent")?,
        verbose: inputs.bool("verbose")?,
    })
}

/// `EasyCache`.
pub struct EasyCacheNode;

impl Node for EasyCacheNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        cache_schema("EasyCache", "Native EasyCache implementation.")
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let settings = settings(inputs)?;
        patched(inputs, |patches| {
            patches.with_network_wrapper(Arc::new(EasyCache { settings }))
        })
    }
}

/// `LazyCache`.
pub struct LazyCacheNode;

impl Node for LazyCacheNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        cache_schema(
            "LazyCache",
            "A homebrew version of EasyCache - even 'easier' version of EasyCache to implement. Overall works \
             worse than EasyCache, but better in some rare cases AND universal compatibility with everything \
             in ComfyUI.",
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let settings = settings(inputs)?;
        patched(inputs, |patches| {
            patches.with_prediction_wrapper(Arc::new(LazyCache { settings }))
        })
    }
}
