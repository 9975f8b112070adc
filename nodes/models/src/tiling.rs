//! ComfyUI's `tiled_scale`: run a size-changing function (VAE decode or encode, upscale models)
//! over overlapping tiles of a [B, C, H, W] tensor and blend the results with feathered edges,
//! so that large images fit in memory.

use candle_core::{Device, Result, Tensor};

/// Tile geometry in input pixels, with the output/input size ratio of the function.
#[derive(Clone, Copy, Debug)]
pub struct Tiling {
    pub tile_height: usize,
    pub tile_width: usize,
    pub overlap: usize,
    pub scale: f64,
}

/// Python's `round()` of a non-negative float to an index (ties to even).
fn round_index(value: f64) -> usize {
    value.round_ties_even() as usize
}

/// Tile start positions along one side: `range(0, size − overlap, tile − overlap)` clamped to
/// `[0, size − overlap]`, or `[0]` when the side fits in one tile.
fn tile_starts(size: usize, tile: usize, overlap: usize) -> Result<Vec<usize>> {
    if size <= tile {
        return Ok(vec![0]);
    }
    if tile <= overlap {
        return Err(candle_core::Error::Msg(format!(
            "tile size {tile} must be larger than the overlap {overlap}"
        )));
    }
    Ok((0..size.saturating_sub(overlap))
        .step_by(tile - overlap)
        .map(|start| start.min(size - overlap))
        .collect())
}

/// The feather weights along one side of an output tile of `length`: the `feather` outermost
/// values at each end fall off as (t + 1)/feather.
fn feather_weights(length: usize, feather: usize) -> Vec<f32> {
    let mut weights = vec![1.0f32; length];
    if feather >= length {
        return weights;
    }
    for t in 0..feather {
        let weight = ((t + 1) as f64 / feather as f64) as f32;
        weights[t] *= weight;
        weights[length - 1 - t] *= weight;
    }
    weights
}

/// Applies `function` ([1, C, h, w] → [1, out_channels, h·scale, w·scale]) tile by tile.
pub fn tiled_scale(
    samples: &Tensor,
    function: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    tiling: Tiling,
    out_channels: usize,
) -> Result<Tensor> {
    let (batch, _, height, width) = samples.dims4()?;
    let out_height = round_index(height as f64 * tiling.scale);
    let out_width = round_index(width as f64 * tiling.scale);
    let feather = round_index(tiling.overlap as f64 * tiling.scale);
    let rows = tile_starts(height, tiling.tile_height, tiling.overlap)?;
    let columns = tile_starts(width, tiling.tile_width, tiling.overlap)?;
    let plane = out_height * out_width;
    let mut items = Vec::with_capacity(batch);
    for b in 0..batch {
        let item = samples.narrow(0, b, 1)?;
        if height <= tiling.tile_height && width <= tiling.tile_width {
            items.push(function(&item)?.to_device(&Device::Cpu)?);
            continue;
        }
        let mut sum = vec![0f32; out_channels * plane];
        let mut weight_sum = vec![0f32; out_channels * plane];
        for &row in &rows {
            for &column in &columns {
                let tile_height = tiling.tile_height.min(height - row);
                let tile_width = tiling.tile_width.min(width - column);
                let tile = item.narrow(2, row, tile_height)?.narrow(3, column, tile_width)?;
                let output = function(&tile)?.to_device(&Device::Cpu)?;
                let (_, channels, output_height, output_width) = output.dims4()?;
                if channels != out_channels {
                    return Err(candle_core::Error::Msg(format!(
                        "a tile came back with {channels} channels, expected {out_channels}"
                    )));
                }
                let top = round_index(row as f64 * tiling.scale);
                let left = round_index(column as f64 * tiling.scale);
                if top + output_height > out_height || left + output_width > out_width {
                    return Err(candle_core::Error::Msg("a tile came back larger than its place".into()));
                }
                let vertical = feather_weights(output_height, feather);
                let horizontal = feather_weights(output_width, feather);
                let values = output.flatten_all()?.to_vec1::<f32>()?;
                for c in 0..channels {
                    for (y, row_weight) in vertical.iter().enumerate() {
                        let source = (c * output_height + y) * output_width;
                        let target = c * plane + (top + y) * out_width + left;
                        for (x, column_weight) in horizontal.iter().enumerate() {
                            let weight = row_weight * column_weight;
                            sum[target + x] += values[source + x] * weight;
                            weight_sum[target + x] += weight;
                        }
                    }
                }
            }
        }
        let blended: Vec<f32> = sum.iter().zip(&weight_sum).map(|(s, w)| s / w).collect();
        items.push(Tensor::from_vec(
            blended,
            (1, out_channels, out_height, out_width),
            &Device::Cpu,
        )?);
    }
    Tensor::cat(&items, 0)?.to_device(samples.device())
}
