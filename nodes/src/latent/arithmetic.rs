//! Latent arithmetic of ComfyUI's `comfy_extras/nodes_latent.py` (`latent/advanced`): LatentAdd,
//! LatentSubtract and LatentMultiply. The second latent of a pair is first brought to the first's
//! shape as ComfyUI's `reshape_latent_to` does: resized (bilinear, centre crop) where its size
//! differs, then repeated or cut to the first's batch. The result keeps the first latent's batch
//! indices and noise mask.

use candle_core::Tensor;
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::latent::nodes::upscale_latent;
use crate::latent::{repeat_to_batch, Latent};
use crate::runtime::tensor_error;

const MODULE: &str = "comfy_extras.nodes_latent";

fn schema(class: &str) -> NodeSchema {
    NodeSchema::v3(class, MODULE, "latent/advanced")
}

/// ComfyUI's `reshape_latent_to(target.shape, latent, repeat_batch)`.
pub(crate) fn reshape_to(target: &Tensor, latent: &Latent, repeat_batch: bool) -> Result<Tensor, NodeError> {
    let (target_dims, dims) = (target.dims(), latent.samples.dims());
    let samples = if target_dims[1..] != dims[1..] {
        let (height, width) = (target_dims[target_dims.len() - 2], target_dims[target_dims.len() - 1]);
        upscale_latent(latent, "bilinear", width, height, true)?.samples
    } else {
        latent.samples.clone()
    };
    if !repeat_batch {
        return Ok(samples);
    }
    repeat_to_batch(&samples, target_dims[0]).map_err(tensor_error)
}

/// A pair of latents combined element by element, the second reshaped to the first.
fn combine(
    inputs: &NodeInputs,
    operation: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<NodeOutput, NodeError> {
    let first = inputs.object::<Latent>("samples1")?;
    let second = reshape_to(&first.samples, inputs.object::<Latent>("samples2")?, true)?;
    let samples = operation(&first.samples, &second).map_err(tensor_error)?;
    Ok(NodeOutput::values(vec![Value::object(first.with_samples(samples))]))
}

fn pair_schema(class: &str) -> NodeSchema {
    schema(class)
        .required("samples1", InputSpec::of("LATENT"))
        .required("samples2", InputSpec::of("LATENT"))
        .output(OutputSpec::of("LATENT"))
}

/// `LatentAdd`: `samples1 + samples2`.
pub struct LatentAdd;

impl Node for LatentAdd {
    fn schema(&self, _: &Services) -> NodeSchema {
        pair_schema("LatentAdd")
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        combine(inputs, |a, b| a + b)
    }
}

/// `LatentSubtract`: `samples1 - samples2`.
pub struct LatentSubtract;

impl Node for LatentSubtract {
    fn schema(&self, _: &Services) -> NodeSchema {
        pair_schema("LatentSubtract")
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        combine(inputs, |a, b| a - b)
    }
}

/// `LatentMultiply`: every value times `multiplier` (in float32, as torch multiplies a float32
/// tensor by a Python float).
pub struct LatentMultiply;

impl Node for LatentMultiply {
    fn schema(&self, _: &Services) -> NodeSchema {
        schema("LatentMultiply")
            .required("samples", InputSpec::of("LATENT"))
            .required("multiplier", InputSpec::float(1.0, -10.0, 10.0).opt("step", 0.01))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let multiplier = inputs.float("multiplier")? as f32;
        let factor = Tensor::new(multiplier, latent.samples.device())
            .and_then(|factor| factor.to_dtype(latent.samples.dtype()))
            .map_err(tensor_error)?;
        let samples = latent.samples.broadcast_mul(&factor).map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(latent.with_samples(samples))]))
    }
}
