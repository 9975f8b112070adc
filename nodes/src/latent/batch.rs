//! Latent batch nodes of ComfyUI's `comfy_extras/nodes_latent.py`: LatentBatch (two batches in
//! one, with their batch indices), LatentBatchSeedBehavior (every item's noise from the first
//! item's seed, or each its own) and LatentCut (a range along x, y or t).

use candle_core::Tensor;
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::latent::arithmetic::reshape_to;
use crate::latent::Latent;
use crate::runtime::tensor_error;

const MODULE: &str = "comfy_extras.nodes_latent";

fn latent_output(latent: Latent) -> Result<NodeOutput, NodeError> {
    Ok(NodeOutput::values(vec![Value::object(latent)]))
}

/// A latent's batch indices: its own, or `0..batch`.
fn batch_indices(latent: &Latent) -> Result<Vec<usize>, NodeError> {
    match &latent.batch_index {
        Some(indices) => Ok(indices.clone()),
        None => Ok((0..latent.samples.dim(0).map_err(tensor_error)?).collect()),
    }
}

/// `LatentBatch`: `samples2` (resized to `samples1`'s size where it differs) after `samples1`,
/// the batch indices of both in the same order; `samples1`'s noise mask is kept.
pub struct LatentBatch;

impl Node for LatentBatch {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("LatentBatch", MODULE, "latent/batch")
            .required("samples1", InputSpec::of("LATENT"))
            .required("samples2", InputSpec::of("LATENT"))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let first = inputs.object::<Latent>("samples1")?;
        let second = inputs.object::<Latent>("samples2")?;
        let resized = reshape_to(&first.samples, second, false)?;
        let samples = Tensor::cat(&[&first.samples, &resized], 0).map_err(tensor_error)?;
        let mut indices = batch_indices(first)?;
        indices.extend(batch_indices(second)?);
        latent_output(Latent {
            samples,
            batch_index: Some(indices),
            noise_mask: first.noise_mask.clone(),
        })
    }
}

/// `LatentBatchSeedBehavior`: `fixed` gives every item the first item's batch index (the same
/// noise), `random` drops the indices (each item its own noise).
pub struct LatentBatchSeedBehavior;

impl Node for LatentBatchSeedBehavior {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("LatentBatchSeedBehavior", MODULE, "latent/advanced")
            .required("samples", InputSpec::of("LATENT"))
            .required(
                "seed_behavior",
                InputSpec::of("COMBO")
                    .opt("default", "fixed")
                    .opt("multiselect", false)
                    .opt("options", serde_json::json!(["random", "fixed"])),
            )
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let batch_index = match inputs.string("seed_behavior")? {
            "random" => None,
            "fixed" => {
                let first = latent.batch_index.as_ref().and_then(|indices| indices.first()).copied();
                let batch = latent.samples.dim(0).map_err(tensor_error)?;
                Some(vec![first.unwrap_or(0); batch])
            }
            _ => latent.batch_index.clone(),
        };
        latent_output(Latent {
            batch_index,
            ..latent.clone()
        })
    }
}

/// `LatentCut`: `amount` positions from `index` (negative: from the end) along x (width),
/// y (height) or t (the third dimension from the end), kept within the latent.
pub struct LatentCut;

impl Node for LatentCut {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("LatentCut", MODULE, "latent/advanced")
            .required("samples", InputSpec::of("LATENT"))
            .required("dim", InputSpec::combo_v3(&["x", "y", "t"]))
            .required(
                "index",
                InputSpec::int(0, -MAX_RESOLUTION, MAX_RESOLUTION).opt("step", 1),
            )
            .required("amount", InputSpec::int(1, 1, MAX_RESOLUTION).opt("step", 1))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let rank = latent.samples.rank();
        let back = match inputs.string("dim")? {
            "x" => 1,
            "y" => 2,
            _ => 3,
        };
        let dim = rank
            .checked_sub(back)
            .ok_or_else(|| NodeError::value(format!("a latent of {rank} dimensions has no such dimension")))?;
        let size = latent.samples.dim(dim).map_err(tensor_error)? as i64;
        let (index, amount) = (inputs.int("index")?, inputs.int("amount")?);
        let (start, length) = if index >= 0 {
            let start = index.min(size - 1);
            (start, amount.min(size - start))
        } else {
            let start = index.max(-size);
            (size + start, amount.min(-start))
        };
        let samples = latent
            .samples
            .narrow(dim, start.max(0) as usize, length.max(0) as usize)
            .map_err(tensor_error)?;
        latent_output(latent.with_samples(samples))
    }
}
