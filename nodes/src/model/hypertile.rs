//! HyperTile (`comfy_extras/nodes_hypertile.py`): the self-attentions at the latent's resolution
//! (and down to `max_depth` levels below it) attend within tiles. The query's tokens are cut into
//! a grid of tiles whose counts are drawn at random among the largest divisors of the token grid's
//! sides, each tile becoming its own batch item, and the attention's output is put back together.
//!
//! What is reproduced of ComfyUI 0.3.64, quirks included:
//! - the tile counts come from `torch.randint(0, options − 1)` on torch's global CPU generator as
//!   the sampling's initial noise left it ([`easel_models::sampling::noise`]): never the last
//!   option, and a draw even from two options, where only the first can come out;
//! - the token grid's sides are `round(√(tokens·W/H))` then `round(√(tokens·H/W))` (the width
//!   first), and the tokens are cut as if they were laid out that way; on non-square latents this
//!   is not their real layout, as in ComfyUI;
//! - only the query is tiled: ComfyUI's attention reshapes the keys and values to the query's
//!   batch, so tile i attends to the i-th contiguous run of the image's tokens, as here.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};
use easel_models::architectures::unet_patches::{
    AttentionInputs, AttentionKind, AttentionSite, PendingUntilOutput, UNetPatch,
};
use easel_models::sampling::noise::{with_global_generator, CpuGenerator};

use crate::model::diffusion_model::Model;
use crate::model::patch_nodes::patched;

/// How one attention's query was tiled: `tiles_down` × `tiles_across` tiles of a
/// `rows` × `columns` token grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tiling {
    tiles_down: usize,
    tiles_across: usize,
    rows: usize,
    columns: usize,
}

/// The HyperTile patch of one node: its settings, and the tiling of the attention running now
/// (set by the input hook, undone by the output hook, as ComfyUI's `temp`).
pub struct HyperTile {
    /// `max(32, tile_size) // 8`: the smallest tile side, in latent pixels.
    latent_tile_size: usize,
    /// How many of the largest divisors the tile counts are drawn among (`swap_size`).
    swap_size: usize,
    max_depth: u32,
    /// Whether deeper levels ask for proportionally larger tiles.
    scale_depth: bool,
    pending: PendingUntilOutput<Tiling>,
}

impl HyperTile {
    /// The patch of `HyperTile(tile_size, swap_size, max_depth, scale_depth)`.
    pub fn new(tile_size: usize, swap_size: usize, max_depth: u32, scale_depth: bool) -> Self {
        HyperTile {
            latent_tile_size: tile_size.max(32) / 8,
            swap_size,
            max_depth,
            scale_depth,
            pending: PendingUntilOutput::default(),
        }
    }

    /// The level (0 = the latent's resolution) whose token count is `tokens`, up to
    /// `max_depth`; ComfyUI compares the count with `(H / 2^i)·(W / 2^i)` in floating point.
    fn depth_of(&self, tokens: usize, original_shape: &[usize; 4]) -> Option<u32> {
        let [_, _, height, width] = *original_shape;
        (0..=self.max_depth).find(|&depth| {
            let scale = 2f64.powi(depth as i32);
            (height as f64 / scale) * (width as f64 / scale) == tokens as f64
        })
    }

    /// The tiling for a query of `tokens` at `depth` of a latent of `original_shape`, drawing the
    /// tile counts from `generator`; `None` for a single tile.
    fn tiling(
        &self,
        tokens: usize,
        depth: u32,
        original_shape: &[usize; 4],
        generator: &mut CpuGenerator,
    ) -> Option<Tiling> {
        let [_, _, height, width] = *original_shape;
        let aspect_ratio = width as f64 / height as f64;
        let rows = (tokens as f64 * aspect_ratio).sqrt().round_ties_even() as usize;
        let columns = (tokens as f64 / aspect_ratio).sqrt().round_ties_even() as usize;
        let factor = if self.scale_depth { 1 << depth } else { 1 };
        let smallest = self.latent_tile_size * factor;
        let tiles_down = random_divisor(rows, smallest, self.swap_size, generator);
        let tiles_across = random_divisor(columns, smallest, self.swap_size, generator);
        (tiles_down * tiles_across > 1).then_some(Tiling {
            tiles_down,
            tiles_across,
            rows,
            columns,
        })
    }
}

/// `random_divisor(value, min_value, max_options)`: the divisors of `value` from `min_value` up
/// (`min_value` capped at `value`), the first `max_options` of them turned into `value / d`, one
/// picked with `torch.randint(0, count − 1)` when there are several. A side of 0 is one tile.
fn random_divisor(value: usize, min_value: usize, max_options: usize, generator: &mut CpuGenerator) -> usize {
    let min_value = min_value.min(value).max(1);
    let options: Vec<usize> = (min_value..=value)
        .filter(|divisor| value.is_multiple_of(*divisor))
        .take(max_options.max(1))
        .map(|divisor| value / divisor)
        .collect();
    let index = match options.len() {
        0 | 1 => 0,
        count => generator.random_below(count as u64 - 1) as usize,
    };
    options.get(index).copied().unwrap_or(1)
}

/// `b (nh h nw w) c -> (b nh nw) (h w) c`: the tiles of each item as batch items.
fn into_tiles(x: &Tensor, tiling: &Tiling) -> Result<Tensor> {
    let (batch, tokens, channels) = x.dims3()?;
    let (tile_rows, tile_columns) = (tiling.rows / tiling.tiles_down, tiling.columns / tiling.tiles_across);
    if tiling.rows * tiling.columns != tokens {
        return Err(candle_core::Error::Msg(format!(
            "HyperTile: {tokens} tokens do not make a {}×{} grid",
            tiling.rows, tiling.columns
        )));
    }
    x.reshape((
        batch,
        tiling.tiles_down,
        tile_rows,
        tiling.tiles_across,
        tile_columns,
        channels,
    ))?
    .permute((0, 1, 3, 2, 4, 5))?
    .reshape((
        batch * tiling.tiles_down * tiling.tiles_across,
        tile_rows * tile_columns,
        channels,
    ))
}

/// The inverse of [`into_tiles`].
fn from_tiles(x: &Tensor, tiling: &Tiling) -> Result<Tensor> {
    let (tiled_batch, _, channels) = x.dims3()?;
    let tiles = tiling.tiles_down * tiling.tiles_across;
    let (tile_rows, tile_columns) = (tiling.rows / tiling.tiles_down, tiling.columns / tiling.tiles_across);
    let batch = tiled_batch / tiles;
    x.reshape((
        batch,
        tiling.tiles_down,
        tiling.tiles_across,
        tile_rows,
        tile_columns,
        channels,
    ))?
    .permute((0, 1, 3, 2, 4, 5))?
    .reshape((batch, tiling.rows * tiling.columns, channels))
}

/// Keys or values [B, N, C] as ComfyUI's attention sees them beside a query of `tiled_batch`
/// items: [tiled_batch, N·B / tiled_batch, C], runs of consecutive tokens.
fn beside_tiles(x: &Tensor, tiled_batch: usize) -> Result<Tensor> {
    let (batch, tokens, channels) = x.dims3()?;
    x.reshape((tiled_batch, batch * tokens / tiled_batch, channels))
}

impl UNetPatch for HyperTile {
    fn attention_inputs(
        &self,
        kind: AttentionKind,
        site: &AttentionSite,
        inputs: AttentionInputs,
    ) -> Result<AttentionInputs> {
        if kind != AttentionKind::SelfAttention {
            return Ok(inputs);
        }
        let mut pending = self.pending.lock("HyperTile")?;
        *pending = None;
        let tokens = inputs.query.dim(1)?;
        let original_shape = &site.call.original_shape;
        let Some(depth) = self.depth_of(tokens, original_shape) else {
            return Ok(inputs);
        };
        let tiling = with_global_generator(|generator| self.tiling(tokens, depth, original_shape, generator));
        let Some(tiling) = tiling else {
            return Ok(inputs);
        };
        let query = into_tiles(&inputs.query, &tiling)?;
        let tiled_batch = query.dim(0)?;
        let tiled = AttentionInputs {
            query,
            context: beside_tiles(&inputs.context, tiled_batch)?,
            value: beside_tiles(&inputs.value, tiled_batch)?,
        };
        *pending = Some(tiling);
        Ok(tiled)
    }

    fn attention_output(&self, kind: AttentionKind, _site: &AttentionSite, output: Tensor) -> Result<Tensor> {
        if kind != AttentionKind::SelfAttention {
            return Ok(output);
        }
        match self.pending.lock("HyperTile")?.take() {
            Some(tiling) => from_tiles(&output, &tiling),
            None => Ok(output),
        }
    }
}

/// The `HyperTile` node.
pub struct HyperTileNode;

impl Node for HyperTileNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("HyperTile", "comfy_extras.nodes_hypertile", "model_patches/unet")
            .required("model", InputSpec::of("MODEL"))
            .required("tile_size", InputSpec::int(256, 1, 2048))
            .required("swap_size", InputSpec::int(2, 1, 128))
            .required("max_depth", InputSpec::int(0, 0, 10))
            .required("scale_depth", InputSpec::boolean(false))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let in_range = |name: &str, min: i64, max: i64| -> std::result::Result<i64, NodeError> {
            let value = inputs.int(name)?;
            match (min..=max).contains(&value) {
                true => Ok(value),
                false => Err(NodeError::value(format!(
                    "HyperTile's {name} must be between {min} and {max}, got {value}"
                ))),
            }
        };
        let tile_size = in_range("tile_size", 1, 2048)? as usize;
        let swap_size = in_range("swap_size", 1, 128)? as usize;
        let max_depth = in_range("max_depth", 0, 10)? as u32;
        if inputs.object::<Model>("model")?.0.network.unet().is_none() {
            return Err(NodeError::value(
                "HyperTile patches a UNet's attentions; this model has no UNet",
            ));
        }
        let patch = HyperTile::new(tile_size, swap_size, max_depth, inputs.bool("scale_depth")?);
        patched(inputs, |patches| patches.with_unet_patch(Arc::new(patch)))
    }
}
