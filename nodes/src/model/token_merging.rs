//! TomePatchModel (`comfy_extras/nodes_tomesd.py`, token merging after tomesd): at the latent's
//! full resolution, each self-attention's query tokens are split into destinations (one drawn at
//! random in every 2×2 cell) and sources; the `ratio·tokens` sources most similar (cosine) to a
//! destination are averaged into it, the shorter query attends to all the keys, and every merged
//! token takes its destination's result afterwards.
//!
//! What is reproduced of ComfyUI 0.3.64: the matching on the normalised query (not the block's
//! input, as ComfyUI chose), the destinations drawn with `torch.randint(4, (h/2, w/2, 1))` from
//! torch's global CPU generator ([`easel_models::sampling::noise`]; ComfyUI on a GPU draws from
//! the GPU's generator instead), the sources merged in order of falling similarity, and the merge
//! as `scatter_reduce(mean)` including the destination, summed in that order.
//!
//! Order and ties: ComfyUI sorts with torch's CPU `argsort`, which is not stable (x86-simd-sort or
//! `std::sort`, depending on the CPU). Its destinations therefore come in a machine-dependent
//! order in the merged query, here in raster order; every query row attends alike, so after
//! unmerging this changes nothing. Where two sources are exactly as similar, which one merges
//! varies between machines in ComfyUI; here the earlier token comes first.

use std::cmp::Ordering;
use std::sync::Arc;

use candle_core::{Result, Tensor, D};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};
use easel_models::architectures::unet_patches::{
    AttentionInputs, AttentionKind, AttentionSite, PendingUntilOutput, UNetPatch,
};
use easel_models::sampling::noise::{with_global_generator, CpuGenerator};

use crate::model::diffusion_model::Model;
use crate::model::patch_nodes::patched;

/// The grid cell one destination is drawn in, `STRIDE` × `STRIDE` tokens (ComfyUI's `sx`, `sy`).
const STRIDE: usize = 2;

/// How one batch item's sources are merged.
#[derive(Clone, Debug)]
struct ItemMatching {
    /// Token positions of the sources kept, most similar first (`unm_idx`).
    kept: Vec<u32>,
    /// Token positions of the sources merged, most similar first (`src_idx`).
    merged: Vec<u32>,
    /// For each merged source, the index of its destination among the destinations (`dst_idx`).
    merged_into: Vec<u32>,
    /// For each token position, its row in the merged sequence (what `unmerge` gathers).
    unmerge_rows: Vec<u32>,
}

/// ToMe's bipartite matching of one attention's tokens (`bipartite_soft_matching_random2d`):
/// what `merge` and `unmerge` need.
#[derive(Clone, Debug)]
pub struct TokenMatching {
    tokens: usize,
    /// Token positions of the destinations, in raster order.
    destinations: Vec<u32>,
    items: Vec<ItemMatching>,
}

/// `lhs` before `rhs` in torch's descending sort: NaN first, then larger values.
fn descending(lhs: f32, rhs: f32) -> Ordering {
    match (lhs.is_nan(), rhs.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => rhs.partial_cmp(&lhs).unwrap_or(Ordering::Equal),
    }
}

/// The largest value of `row` and its first index, NaN winning as in torch's `max(dim)`.
fn best_match(row: &[f32]) -> (f32, usize) {
    let mut best = (row.first().copied().unwrap_or(f32::NAN), 0);
    for (index, &value) in row.iter().enumerate().skip(1) {
        if best.0.is_nan() {
            break;
        }
        if value.is_nan() || value > best.0 {
            best = (value, index);
        }
    }
    best
}

fn index_tensor(indices: &[u32], device: &candle_core::Device) -> Result<Tensor> {
    Tensor::from_slice(indices, indices.len(), device)
}

impl TokenMatching {
    /// Matches the tokens of `metric` [B, width·height, C], raster order, merging `merge_count`
    /// sources (at most all of them), with destinations drawn from `generator`. `None` where
    /// nothing merges (`merge_count` 0, a grid one token wide or high), drawing nothing.
    pub fn new(
        metric: &Tensor,
        width: usize,
        height: usize,
        merge_count: usize,
        generator: &mut CpuGenerator,
    ) -> Result<Option<Self>> {
        let (_, tokens, _) = metric.dims3()?;
        if merge_count == 0 || width == 1 || height == 1 {
            return Ok(None);
        }
        if tokens != width * height {
            return Err(candle_core::Error::Msg(format!(
                "TomePatchModel: {tokens} tokens do not make the latent's {height}×{width} grid"
            )));
        }
        let (cells_down, cells_across) = (height / STRIDE, width / STRIDE);
        let mut is_destination = vec![false; tokens];
        for cell in 0..cells_down * cells_across {
            let pick = generator.random_below((STRIDE * STRIDE) as u64) as usize;
            let row = (cell / cells_across) * STRIDE + pick / STRIDE;
            let column = (cell % cells_across) * STRIDE + pick % STRIDE;
            is_destination[row * width + column] = true;
        }
        let (destinations, sources): (Vec<u32>, Vec<u32>) =
            (0..tokens as u32).partition(|&position| is_destination[position as usize]);

        let device = metric.device();
        let normalised = metric.broadcast_div(&metric.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
        let source_metric = normalised.index_select(&index_tensor(&sources, device)?, 1)?;
        let destination_metric = normalised.index_select(&index_tensor(&destinations, device)?, 1)?;
        let scores = source_metric
            .matmul(&destination_metric.t()?.contiguous()?)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec3::<f32>()?;
        let merge_count = merge_count.min(sources.len());
        let items = scores
            .iter()
            .map(|item| {
                let best: Vec<(f32, usize)> = item.iter().map(|row| best_match(row)).collect();
                let mut order: Vec<usize> = (0..sources.len()).collect();
                order.sort_by(|&a, &b| descending(best[a].0, best[b].0));
                let (merged, kept) = order.split_at(merge_count);
                let position = |source: &usize| sources[*source];
                let merged_into: Vec<u32> = merged.iter().map(|source| best[*source].1 as u32).collect();
                let kept: Vec<u32> = kept.iter().map(position).collect();
                let merged: Vec<u32> = merged.iter().map(position).collect();
                let mut unmerge_rows = vec![0u32; tokens];
                for (row, &token) in kept.iter().enumerate() {
                    unmerge_rows[token as usize] = row as u32;
                }
                let first_destination = kept.len() as u32;
                for (index, &token) in destinations.iter().enumerate() {
                    unmerge_rows[token as usize] = first_destination + index as u32;
                }
                for (&token, &destination) in merged.iter().zip(&merged_into) {
                    unmerge_rows[token as usize] = first_destination + destination;
                }
                ItemMatching {
                    kept,
                    merged,
                    merged_into,
                    unmerge_rows,
                }
            })
            .collect();
        Ok(Some(TokenMatching {
            tokens,
            destinations,
            items,
        }))
    }

    /// The merged sequence of `x` [B, tokens, C]: per item the kept sources, then the
    /// destinations averaged with the sources merged into them.
    pub fn merge(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, tokens, _) = x.dims3()?;
        if batch != self.items.len() || tokens != self.tokens {
            return Err(candle_core::Error::Msg(format!(
                "TomePatchModel: tokens matched as [{}, {}] cannot merge a [{batch}, {tokens}] sequence",
                self.items.len(),
                self.tokens
            )));
        }
        let device = x.device();
        let destinations = index_tensor(&self.destinations, device)?;
        let merged: Vec<Tensor> = self
            .items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let tokens = x.get(index)?;
                let kept = tokens.index_select(&index_tensor(&item.kept, device)?, 0)?;
                let moved = tokens.index_select(&index_tensor(&item.merged, device)?, 0)?;
                let into = index_tensor(&item.merged_into, device)?;
                let sums = tokens.index_select(&destinations, 0)?.index_add(&into, &moved, 0)?;
                let mut counts = vec![1f32; self.destinations.len()];
                for &destination in &item.merged_into {
                    counts[destination as usize] += 1.0;
                }
                let counts = Tensor::from_vec(counts, (self.destinations.len(), 1), device)?.to_dtype(x.dtype())?;
                Tensor::cat(&[kept, sums.broadcast_div(&counts)?], 0)
            })
            .collect::<Result<_>>()?;
        Tensor::stack(&merged, 0)
    }

    /// The full sequence [B, tokens, C] from a merged one: every token its own row, merged
    /// sources their destination's.
    pub fn unmerge(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, length, _) = x.dims3()?;
        let merged_length = self.items.first().map_or(0, |item| item.kept.len()) + self.destinations.len();
        if batch != self.items.len() || length != merged_length {
            return Err(candle_core::Error::Msg(format!(
                "TomePatchModel: a [{batch}, {length}] sequence is not the [{}, {merged_length}] one merged",
                self.items.len()
            )));
        }
        let unmerged: Vec<Tensor> = self
            .items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                x.get(index)?
                    .index_select(&index_tensor(&item.unmerge_rows, x.device())?, 0)
            })
            .collect::<Result<_>>()?;
        Tensor::stack(&unmerged, 0)
    }
}

/// The TomePatchModel patch: the merge ratio, and the matching of the attention running now (set
/// by the input hook, undone by the output hook, as ComfyUI's `u`).
pub struct TokenMerging {
    ratio: f64,
    pending: PendingUntilOutput<TokenMatching>,
}

impl TokenMerging {
    /// The patch of `TomePatchModel(ratio)`.
    pub fn new(ratio: f64) -> Self {
        TokenMerging {
            ratio,
            pending: PendingUntilOutput::default(),
        }
    }
}

impl UNetPatch for TokenMerging {
    fn attention_inputs(
        &self,
        kind: AttentionKind,
        site: &AttentionSite,
        inputs: AttentionInputs,
    ) -> Result<AttentionInputs> {
        if kind != AttentionKind::SelfAttention {
            return Ok(inputs);
        }
        let mut pending = self.pending.lock("TomePatchModel")?;
        *pending = None;
        let tokens = inputs.query.dim(1)?;
        let [_, _, height, width] = site.call.original_shape;
        // `get_functions`: only where the query has the latent's resolution (its downsampling,
        // ⌈√(latent tokens // tokens)⌉, is 1); ComfyUI divides by zero on longer queries.
        if tokens > height * width {
            return Err(candle_core::Error::Msg(format!(
                "TomePatchModel: a self-attention of {tokens} tokens on a {height}×{width} latent"
            )));
        }
        let downsample = ((height * width / tokens.max(1)) as f64).sqrt().ceil();
        if tokens == 0 || downsample > 1.0 {
            return Ok(inputs);
        }
        let merge_count = (tokens as f64 * self.ratio) as usize;
        let matching = with_global_generator(|generator| {
            TokenMatching::new(&inputs.query, width, height, merge_count, generator)
        })?;
        let Some(matching) = matching else {
            return Ok(inputs);
        };
        let merged = AttentionInputs {
            query: matching.merge(&inputs.query)?,
            ..inputs
        };
        *pending = Some(matching);
        Ok(merged)
    }

    fn attention_output(&self, kind: AttentionKind, _site: &AttentionSite, output: Tensor) -> Result<Tensor> {
        if kind != AttentionKind::SelfAttention {
            return Ok(output);
        }
        match self.pending.lock("TomePatchModel")?.take() {
            Some(matching) => matching.unmerge(&output),
            None => Ok(output),
        }
    }
}

/// The `TomePatchModel` node.
pub struct TomePatchModelNode;

impl Node for TomePatchModelNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("TomePatchModel", "comfy_extras.nodes_tomesd", "model_patches/unet")
            .required("model", InputSpec::of("MODEL"))
            .required("ratio", InputSpec::float(0.3, 0.0, 1.0).opt("step", 0.01))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let ratio = inputs.float("ratio")?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(NodeError::value(format!(
                "TomePatchModel's ratio must be between 0 and 1, got {ratio}"
            )));
        }
        if inputs.object::<Model>("model")?.0.network.unet().is_none() {
            return Err(NodeError::value(
                "TomePatchModel patches a UNet's attentions; this model has no UNet",
            ));
        }
        patched(inputs, |patches| {
            patches.with_unet_patch(Arc::new(TokenMerging::new(ratio)))
        })
    }
}
