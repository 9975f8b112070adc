//! ComfyUI's `ClipTokenWeightEncoder.encode_token_weights`, shared by the CLIP and T5 encoders:
//! the chunks of a prompt are encoded in one batch, with an empty prompt appended when any token
//! is weighted; a token of weight w ≠ 1 becomes `empty + (token − empty)·w`, taken at the same
//! position of the empty prompt's output; the chunks are then joined along the tokens.

use candle_core::{Result, Tensor};

use crate::text::tokenizer::{TokenItem, WeightedToken};

/// Encodes `chunks` with `forward`, which maps a batch of equal-length token rows to their hidden
/// states [B, N, width] and whatever else the encoder gives per batch (`extra`, returned as it
/// comes). The empty prompt is `empty_start` padded with `pad` to the longest chunk. Returns
/// [1, N·chunks, width] (the empty prompt's [1, N, width] when there are no chunks).
pub fn encode_token_weights<E>(
    chunks: &[Vec<WeightedToken>],
    empty_start: &[u32],
    pad: u32,
    forward: impl FnOnce(&[Vec<TokenItem>]) -> Result<(Tensor, E)>,
) -> Result<(Tensor, E)> {
    let has_weights = chunks.iter().flatten().any(|(_, weight)| *weight != 1.0);
    let mut batch: Vec<Vec<TokenItem>> = chunks
        .iter()
        .map(|chunk| chunk.iter().map(|(item, _)| item.clone()).collect())
        .collect();
    if has_weights || batch.is_empty() {
        let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
        let mut empty: Vec<TokenItem> = empty_start.iter().map(|&token| TokenItem::Token(token)).collect();
        empty.resize(longest.max(empty_start.len()), TokenItem::Token(pad));
        batch.push(empty);
    }
    let (hidden, extra) = forward(&batch)?;
    if chunks.is_empty() {
        let last = hidden.dim(0)? - 1;
        return Ok((hidden.narrow(0, last, 1)?, extra));
    }
    let mut outputs = Vec::with_capacity(chunks.len());
    for (index, chunk) in chunks.iter().enumerate() {
        let z = hidden.get(index)?;
        let z = if has_weights {
            let empty = hidden.get(hidden.dim(0)? - 1)?;
            let weights: Vec<f32> = chunk.iter().map(|(_, weight)| *weight as f32).collect();
            let weights = Tensor::from_vec(weights, (chunk.len(), 1), hidden.device())?;
            // Only positions with a weight ≠ 1 change; for the others (z − e)·1 + e is z itself.
            let weighted = (z.broadcast_sub(&empty)?.broadcast_mul(&weights)? + &empty)?;
            let changed: Vec<u8> = chunk.iter().map(|(_, weight)| u8::from(*weight != 1.0)).collect();
            let changed = Tensor::from_vec(changed, (chunk.len(), 1), hidden.device())?;
            changed.broadcast_as(z.shape())?.where_cond(&weighted, &z)?
        } else {
            z
        };
        outputs.push(z.unsqueeze(0)?);
    }
    Ok((Tensor::cat(&outputs, 1)?, extra))
}
