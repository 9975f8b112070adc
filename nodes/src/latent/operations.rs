//! Latent nodes of ComfyUI's `comfy_extras/nodes_latent.py` and `nodes_rebatch.py` that combine,
//! regroup or transform latents: LatentInterpolate, LatentConcat, RebatchLatents, and the
//! latent operations (the `LATENT_OPERATION` socket, [`LatentOperation`]): the
//! LatentOperationTonemapReinhard and LatentOperationSharpen operations, applied to latents by
//! LatentApplyOperation or to the guidance by LatentApplyOperationCFG.
//!
//! Float32 arithmetic in PyTorch 2.8's CPU order, bit for bit: channel norms are summed channel
//! by channel and square-rooted correctly rounded, means are [`torch_sum`]s, standard deviations
//! are computed in double as PyTorch does. LatentOperationSharpen's kernel and convolution share
//! ImageSharpen's documented exceptions (`crate::image::filters`).

use candle_core::{DType, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeObject, NodeOutput, Services, Value};
use std::sync::Arc;

use crate::image::filters::{check_reflect_padding, convolve_reflect, sharpen_kernel, torch_sum};
use crate::image::layout::{list_batch_size, list_items};
use crate::image::Mask;
use crate::latent::arithmetic::reshape_to;
use crate::latent::{repeat_to_batch, Latent};
use crate::model::diffusion_model::{DiffusionModel, Model};
use crate::model::patches::{GuidanceArgs, PreCfgFunction};
use crate::runtime::{broadcast, ensure_fits, experimental, tensor_error};

const MODULE: &str = "comfy_extras.nodes_latent";
const OPERATIONS: &str = "latent/advanced/operations";

fn latent_output(latent: Latent) -> Result<NodeOutput, NodeError> {
    Ok(NodeOutput::values(vec![Value::object(latent)]))
}

/// A tensor's values as float32, row-major.
fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// `data` shaped `dims` on `like`'s device, in its dtype.
fn tensor_like(data: Vec<f32>, dims: &[usize], like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, dims, like.device())?.to_dtype(like.dtype())
}

/// `torch.linalg.vector_norm(x, dim=1)` of `[batch, channels, inner]` values: per batch item
/// and position, the squares added channel by channel, then the square root; `[batch, inner]`.
fn channel_norms(data: &[f32], batch: usize, channels: usize, inner: usize) -> Vec<f32> {
    let mut norms = Vec::with_capacity(batch * inner);
    for b in 0..batch {
        for p in 0..inner {
            let mut sum = 0.0f32;
            for c in 0..channels {
                let v = data[(b * channels + c) * inner + p];
                sum += v * v;
            }
            norms.push(sum.sqrt());
        }
    }
    norms
}

/// `values [batch, channels, inner] ⊙ norms [batch, inner]` as PyTorch broadcasts it: the norms
/// are right-aligned, so their batch dimension meets the channels (`[1, batch, inner]`). Returns
/// the values and the resulting channel count.
fn with_norms(
    values: &[f32],
    (batch, channels, inner): (usize, usize, usize),
    norms: &[f32],
    operation: impl Fn(f32, f32) -> f32,
) -> Result<(Vec<f32>, usize), NodeError> {
    let out_channels = broadcast(channels, batch, 1)?;
    ensure_fits(&[batch, out_channels, inner], || {
        format!("latents of {batch}×{out_channels}×{inner} values")
    })?;
    let mut out = Vec::with_capacity(batch * out_channels * inner);
    for b in 0..batch {
        for c in 0..out_channels {
            let value = &values[(b * channels + if channels == 1 { 0 } else { c }) * inner..][..inner];
            let norm = &norms[if batch == 1 { 0 } else { c } * inner..][..inner];
            out.extend(value.iter().zip(norm).map(|(&v, &n)| operation(v, n)));
        }
    }
    Ok((out, out_channels))
}

/// `torch.nan_to_num`: NaN to 0, infinities to the largest finite values.
fn nan_to_num(v: f32) -> f32 {
    if v.is_nan() {
        0.0
    } else if v == f32::INFINITY {
        f32::MAX
    } else if v == f32::NEG_INFINITY {
        f32::MIN
    } else {
        v
    }
}

/// `LatentInterpolate`: spherical-style interpolation of two latents: each normalised by its
/// channel-vector length, mixed `ratio : 1 − ratio`, renormalised, and scaled to the mixed
/// lengths. samples2 is first brought to samples1's shape (`reshape_latent_to`). As in ComfyUI
/// the lengths broadcast against the channel dimension, so a batch of more than one works only
/// when it equals the channel count.
pub struct LatentInterpolate;

impl Node for LatentInterpolate {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("LatentInterpolate", MODULE, "latent/advanced")
            .required("samples1", InputSpec::of("LATENT"))
            .required("samples2", InputSpec::of("LATENT"))
            .required("ratio", InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let first = inputs.object::<Latent>("samples1")?;
        let second = reshape_to(&first.samples, inputs.object::<Latent>("samples2")?, true)?;
        let ratio = inputs.float("ratio")?;
        let (keep, other) = (ratio as f32, (1.0 - ratio) as f32);
        let dims = first.samples.dims().to_vec();
        if dims.len() < 2 {
            return Err(NodeError::value(
                "LatentInterpolate needs latents with a channel dimension",
            ));
        }
        let (batch, channels) = (dims[0], dims[1]);
        let inner: usize = dims[2..].iter().product();
        let s1 = values(&first.samples).map_err(tensor_error)?;
        let s2 = values(&second).map_err(tensor_error)?;
        let (m1, m2) = (
            channel_norms(&s1, batch, channels, inner),
            channel_norms(&s2, batch, channels, inner),
        );
        let shape = (batch, channels, inner);
        let divide = |v: f32, n: f32| nan_to_num(v / n);
        let (n1, c1) = with_norms(&s1, shape, &m1, divide)?;
        let (n2, _) = with_norms(&s2, shape, &m2, divide)?;
        let mixed: Vec<f32> = n1.iter().zip(&n2).map(|(a, b)| a * keep + b * other).collect();
        let mixed_norms = channel_norms(&mixed, batch, c1, inner);
        let (direction, c2) = with_norms(&mixed, (batch, c1, inner), &mixed_norms, divide)?;
        let lengths: Vec<f32> = m1.iter().zip(&m2).map(|(a, b)| a * keep + b * other).collect();
        let (out, c3) = with_norms(&direction, (batch, c2, inner), &lengths, |v, n| v * n)?;
        let mut out_dims = dims.clone();
        out_dims[1] = c3;
        let samples = tensor_like(out, &out_dims, &first.samples).map_err(tensor_error)?;
        latent_output(first.with_samples(samples))
    }
}

/// `torch.cat` of tensors along `dim`, failing with PyTorch's message where they differ
/// elsewhere.
fn concatenate(tensors: &[&Tensor], dim: usize) -> Result<Tensor, NodeError> {
    let first = tensors[0].dims();
    for (n, t) in tensors.iter().enumerate().skip(1) {
        let dims = t.dims();
        if dims.len() != first.len() {
            return Err(NodeError::typed(
                "RuntimeError",
                format!(
                    "Tensors must have same number of dimensions: got {} and {}",
                    first.len(),
                    dims.len()
                ),
            ));
        }
        if let Some(d) = (0..dims.len()).find(|&d| d != dim && dims[d] != first[d]) {
            return Err(NodeError::typed(
                "RuntimeError",
                format!(
                    "Sizes of tensors must match except in dimension {dim}. Expected size {} but got size {} for \
                     tensor number {n} in the list.",
                    first[d], dims[d]
                ),
            ));
        }
    }
    Tensor::cat(tensors, dim).map_err(tensor_error)
}

/// `LatentConcat`: samples2 (repeated or cut to samples1's batch) after samples1 along x
/// (width), y (height) or t (the third dimension from the end); `-x`, `-y`, `-t` put it before.
pub struct LatentConcat;

impl Node for LatentConcat {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("LatentConcat", MODULE, "latent/advanced")
            .required("samples1", InputSpec::of("LATENT"))
            .required("samples2", InputSpec::of("LATENT"))
            .required("dim", InputSpec::combo_v3(&["x", "-x", "y", "-y", "t", "-t"]))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let first = inputs.object::<Latent>("samples1")?;
        let second = inputs.object::<Latent>("samples2")?;
        let batch = first.samples.dim(0).map_err(tensor_error)?;
        let mut repeated_dims = second.samples.dims().to_vec();
        if let Some(items) = repeated_dims.first_mut() {
            *items = batch;
        }
        ensure_fits(&repeated_dims, || format!("latents of {repeated_dims:?}"))?;
        let repeated = repeat_to_batch(&second.samples, batch).map_err(tensor_error)?;
        let dim = inputs.string("dim")?;
        let back = if dim.contains('x') {
            1
        } else if dim.contains('y') {
            2
        } else if dim.contains('t') {
            3
        } else {
            return Err(NodeError::value(format!("unknown dimension {dim}")));
        };
        let rank = first.samples.rank();
        let axis = rank.checked_sub(back).ok_or_else(|| {
            NodeError::typed(
                "IndexError",
                format!(
                    "Dimension out of range (expected to be in range of [-{rank}, {}], but got -{back})",
                    rank.saturating_sub(1)
                ),
            )
        })?;
        let pair = if dim.starts_with('-') {
            [&repeated, &first.samples]
        } else {
            [&first.samples, &repeated]
        };
        let samples = concatenate(&pair, axis)?;
        latent_output(first.with_samples(samples))
    }
}

/// A run of latents being regrouped by RebatchLatents: samples, noise masks, batch indices.
struct Run {
    samples: Tensor,
    mask: Mask,
    indices: Vec<usize>,
}

impl Run {
    /// ComfyUI's `get_batch`: the latent's mask (all ones at 8× its size where it has none,
    /// tiled to the batch where it has fewer items) and batch indices (its own, or counted on
    /// from `offset`).
    fn of(latent: &Latent, offset: usize) -> Result<Run, NodeError> {
        let dims = latent.samples.dims();
        if dims.len() < 4 {
            return Err(NodeError::value(
                "RebatchLatents needs latents [batch, channels, height, width]",
            ));
        }
        let batch = dims[0];
        let mask = match &latent.noise_mask {
            Some(mask) => mask.clone(),
            None => {
                let (height, width) = (dims[2] * 8, dims[3] * 8);
                ensure_fits(&[batch, height, width], || {
                    format!("a noise mask of {width}×{height} (batch {batch})")
                })?;
                Mask::filled(batch, height, width, 1.0)
            }
        };
        let mask = if mask.batch < batch && mask.batch > 0 {
            mask.repeat_to_batch(batch)
        } else {
            mask
        };
        let indices = match &latent.batch_index {
            Some(indices) => indices.clone(),
            None => (offset..offset + batch).collect(),
        };
        Ok(Run {
            samples: latent.samples.clone(),
            mask,
            indices,
        })
    }

    fn len(&self) -> Result<usize, NodeError> {
        self.samples.dim(0).map_err(tensor_error)
    }

    /// Items `start..start + count` of each part, as far as it has them.
    fn slice(&self, start: usize, count: usize) -> Result<Run, NodeError> {
        let len = self.len()?;
        let (from, to) = (start.min(len), (start + count).min(len));
        let (first, last) = (start.min(self.indices.len()), (start + count).min(self.indices.len()));
        Ok(Run {
            samples: self.samples.narrow(0, from, to - from).map_err(tensor_error)?,
            mask: self.mask.items(start, count),
            indices: self.indices[first..last].to_vec(),
        })
    }

    /// This run followed by `next`.
    fn append(self, next: Run) -> Result<Run, NodeError> {
        let samples = concatenate(&[&self.samples, &next.samples], 0)?;
        if (self.mask.height, self.mask.width) != (next.mask.height, next.mask.width) {
            let (expected, got) = if self.mask.height != next.mask.height {
                (self.mask.height, next.mask.height)
            } else {
                (self.mask.width, next.mask.width)
            };
            return Err(NodeError::typed(
                "RuntimeError",
                format!(
                    "Sizes of tensors must match except in dimension 0. Expected size {expected} but got size {got} \
                     for tensor number 1 in the list."
                ),
            ));
        }
        let mut mask = self.mask;
        mask.batch += next.mask.batch;
        mask.data.extend(next.mask.data);
        let mut indices = self.indices;
        indices.extend(next.indices);
        Ok(Run { samples, mask, indices })
    }

    /// The run as a latent; a mask of all ones (mean exactly 1) is dropped.
    fn into_latent(self) -> Latent {
        let mean = torch_sum(&self.mask.data) / self.mask.data.len() as f32;
        Latent {
            samples: self.samples,
            batch_index: Some(self.indices),
            noise_mask: (mean != 1.0).then_some(self.mask),
        }
    }
}

/// `RebatchLatents`: the latents of every input, in order, regrouped into batches of
/// `batch_size` (a batch also ends where the latent size changes), each with its items' noise
/// masks and batch indices; a list output.
pub struct RebatchLatents;

impl Node for RebatchLatents {
    fn schema(&self, _: &Services) -> NodeSchema {
        let mut schema = NodeSchema::v3("RebatchLatents", "comfy_extras.nodes_rebatch", "latent/batch")
            .display("Rebatch Latents")
            .required("latents", InputSpec::of("LATENT"))
            .required("batch_size", InputSpec::int(1, 1, 4096))
            .output(OutputSpec::of("LATENT").list());
        schema.input_is_list = true;
        schema
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let batch_size = list_batch_size(inputs)?;
        let mut output = Vec::new();
        let mut current: Option<Run> = None;
        let mut processed = 0;
        for value in list_items(inputs, "latents")? {
            let latent = value
                .downcast::<Latent>()
                .ok_or_else(|| NodeError::value(format!("Input 'latents' expects Latent, got {}", value.kind())))?;
            let next = Run::of(latent, processed)?;
            processed += next.indices.len();
            let run = match current.take() {
                None => next,
                Some(run) => {
                    let spatial = |t: &Tensor| t.dims()[t.rank() - 2..].to_vec();
                    if spatial(&run.samples) != spatial(&next.samples) {
                        output.push(run.slice(0, batch_size)?);
                        next
                    } else {
                        run.append(next)?
                    }
                }
            };
            let len = run.len()?;
            if len > batch_size {
                let whole = len / batch_size;
                for i in 0..whole {
                    output.push(run.slice(i * batch_size, batch_size)?);
                }
                if whole * batch_size < len {
                    current = Some(run.slice(whole * batch_size, len)?);
                }
            } else {
                current = Some(run);
            }
        }
        if let Some(run) = current {
            output.push(run.slice(0, batch_size)?);
        }
        let latents = output.into_iter().map(|run| Value::object(run.into_latent())).collect();
        Ok(NodeOutput::values(vec![Value::List(latents)]))
    }
}

/// The LATENT_OPERATION socket: a function from latents to latents (a Python function in
/// ComfyUI), made by the LatentOperation nodes and applied by LatentApplyOperation and
/// LatentApplyOperationCFG.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatentOperation {
    /// LatentOperationTonemapReinhard: channel-vector lengths compressed by Reinhard's
    /// `x / (x + 1)` relative to `(mean + 5·std)·multiplier` of each item's lengths.
    TonemapReinhard { multiplier: f64 },
    /// LatentOperationSharpen: the unit channel vectors sharpened by a `2·radius + 1` square
    /// kernel (a Gaussian times −10·alpha, centred to sum to one), rescaled by their lengths.
    Sharpen { radius: usize, sigma: f64, alpha: f64 },
}

impl NodeObject for LatentOperation {
    fn type_name(&self) -> &'static str {
        "LATENT_OPERATION"
    }
}

impl LatentOperation {
    /// The operation applied to latents `[batch, channels, height, width]`.
    pub fn apply(&self, latent: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = latent.dims4()?;
        let inner = height * width;
        let data = values(latent)?;
        let norms = channel_norms(&data, batch, channels, inner);
        let out = match *self {
            LatentOperation::TonemapReinhard { multiplier } => {
                tonemap_reinhard(&data, (batch, channels, inner), norms, multiplier as f32)
            }
            LatentOperation::Sharpen { radius, sigma, alpha } => {
                check_reflect_padding(radius, [batch, channels, height, width])
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let luminance: Vec<f32> = norms.iter().map(|n| n + 1e-6).collect();
                let kernel = sharpen_kernel(2 * radius + 1, sigma, alpha * -10.0);
                let mut out = Vec::with_capacity(data.len());
                for b in 0..batch {
                    let lengths = &luminance[b * inner..][..inner];
                    for c in 0..channels {
                        let plane = &data[(b * channels + c) * inner..][..inner];
                        let unit: Vec<f32> = plane.iter().zip(lengths).map(|(v, l)| v / l).collect();
                        let sharpened = convolve_reflect(&unit, height, width, &kernel, radius);
                        out.extend(lengths.iter().zip(sharpened).map(|(l, s)| l * s));
                    }
                }
                out
            }
        };
        tensor_like(out, latent.dims(), latent)
    }
}

/// LatentOperationTonemapReinhard's function on `[batch, channels, inner]` values with their
/// channel norms.
fn tonemap_reinhard(
    data: &[f32],
    (batch, channels, inner): (usize, usize, usize),
    norms: Vec<f32>,
    multiplier: f32,
) -> Vec<f32> {
    let magnitudes: Vec<f32> = norms.iter().map(|n| n + 1e-10).collect();
    let mut out = Vec::with_capacity(data.len());
    for b in 0..batch {
        let item = &magnitudes[b * inner..][..inner];
        let mean = torch_sum(item) / inner as f32;
        let std = standard_deviation(item, mean, batch == 1);
        let top = (std * 5.0 + mean) * multiplier;
        let scale = 1.0 / top;
        let compressed: Vec<f32> = item
            .iter()
            .map(|m| {
                let m = m * scale;
                m / (m + 1.0) * top
            })
            .collect();
        for c in 0..channels {
            let plane = &data[(b * channels + c) * inner..][..inner];
            out.extend(plane.iter().zip(item).zip(&compressed).map(|((v, m), n)| v / m * n));
        }
    }
    out
}

/// `torch.std` (unbiased) of one item as PyTorch computes it in double: for a single-item
/// batch (`whole`), two passes around the float32 mean; otherwise Welford's running update.
fn standard_deviation(values: &[f32], mean: f32, whole: bool) -> f32 {
    let divisor = (values.len() as f64 - 1.0).max(0.0);
    let squares = if whole {
        let mean = f64::from(mean);
        values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>()
    } else {
        let (mut running, mut m2) = (0.0f64, 0.0f64);
        for (n, &v) in values.iter().enumerate() {
            let delta = f64::from(v) - running;
            running += delta / (n + 1) as f64;
            m2 = delta.mul_add(f64::from(v) - running, m2);
        }
        m2
    };
    (squares / divisor).sqrt() as f32
}

/// `LatentApplyOperation`: the operation applied to the latents (batch indices and noise mask
/// kept).
pub struct LatentApplyOperation;

impl Node for LatentApplyOperation {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("LatentApplyOperation", MODULE, OPERATIONS)
                .required("samples", InputSpec::of("LATENT"))
                .required("operation", InputSpec::of("LATENT_OPERATION"))
                .output(OutputSpec::of("LATENT")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let operation = inputs.object::<LatentOperation>("operation")?;
        let samples = operation.apply(&latent.samples).map_err(tensor_error)?;
        latent_output(latent.with_samples(samples))
    }
}

/// LatentApplyOperationCFG's pre-CFG function: the operation applied to the guidance
/// `cond − uncond`, which is then added back to `uncond`.
pub struct GuidanceOperation(pub LatentOperation);

impl PreCfgFunction for GuidanceOperation {
    fn apply(&self, _: &GuidanceArgs, [cond, uncond]: [Tensor; 2]) -> candle_core::Result<[Tensor; 2]> {
        let guided = (self.0.apply(&(&cond - &uncond)?)? + &uncond)?;
        Ok([guided, uncond])
    }
}

/// `LatentApplyOperationCFG`: the model with the operation applied to its guidance before CFG
/// ([`GuidanceOperation`]).
pub struct LatentApplyOperationCfg;

impl Node for LatentApplyOperationCfg {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("LatentApplyOperationCFG", MODULE, OPERATIONS)
                .required("model", InputSpec::of("MODEL"))
                .required("operation", InputSpec::of("LATENT_OPERATION"))
                .output(OutputSpec::of("MODEL")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let operation = *inputs.object::<LatentOperation>("operation")?;
        let patches = model.0.patches.with_pre_cfg(Arc::new(GuidanceOperation(operation)));
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                patches,
                ..(*model.0).clone()
            },
        )))]))
    }
}

/// `LatentOperationTonemapReinhard`.
pub struct LatentOperationTonemapReinhard;

impl Node for LatentOperationTonemapReinhard {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("LatentOperationTonemapReinhard", MODULE, OPERATIONS)
                .required("multiplier", InputSpec::float(1.0, 0.0, 100.0).opt("step", 0.01))
                .output(OutputSpec::of("LATENT_OPERATION")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let multiplier = inputs.float("multiplier")?;
        Ok(NodeOutput::values(vec![Value::object(
            LatentOperation::TonemapReinhard { multiplier },
        )]))
    }
}

/// `LatentOperationSharpen`.
pub struct LatentOperationSharpen;

impl Node for LatentOperationSharpen {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("LatentOperationSharpen", MODULE, OPERATIONS)
                .required("sharpen_radius", InputSpec::int(9, 1, 31).opt("step", 1))
                .required("sigma", InputSpec::float(1.0, 0.1, 10.0).opt("step", 0.1))
                .required("alpha", InputSpec::float(0.1, 0.0, 5.0).opt("step", 0.01))
                .output(OutputSpec::of("LATENT_OPERATION")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let radius = inputs.int("sharpen_radius")?;
        let radius = usize::try_from(radius)
            .map_err(|_| NodeError::value(format!("sharpen_radius must not be negative, got {radius}")))?;
        Ok(NodeOutput::values(vec![Value::object(LatentOperation::Sharpen {
            radius,
            sigma: inputs.float("sigma")?,
            alpha: inputs.float("alpha")?,
        })]))
    }
}
