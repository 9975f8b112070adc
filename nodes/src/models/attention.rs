//! Multi-head scaled dot-product attention shared by the UNet, the VAE and the text encoders.

use candle_core::{Result, Tensor};

/// Upper bound on the bytes of one block of attention scores; longer queries are processed in
/// row blocks so that a 128×128 latent does not allocate gigabytes of scores.
const SCORE_BLOCK_BYTES: usize = 256 << 20;

/// `softmax(q·kᵀ/√d + mask)·v` with `heads` heads. `q`: [B, Nq, H·D], `k` and `v`: [B, Nk, H·D];
/// `mask` is added to the scores ([Nq, Nk], broadcast over batch and heads). Returns [B, Nq, H·D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (batch, query_length, width) = q.dims3()?;
    let key_length = k.dim(1)?;
    let head_dim = width / heads;
    let split = |t: &Tensor, length: usize| -> Result<Tensor> {
        t.reshape((batch, length, heads, head_dim))?
            .transpose(1, 2)?
            .reshape((batch * heads, length, head_dim))?
            .contiguous()
    };
    let q = split(q, query_length)?;
    let k_t = split(k, key_length)?.transpose(1, 2)?.contiguous()?;
    let v = split(v, key_length)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let rows_per_block = (SCORE_BLOCK_BYTES / (batch * heads * key_length * 4).max(1)).clamp(1, query_length.max(1));
    let mut blocks = Vec::with_capacity(query_length.div_ceil(rows_per_block));
    let mut start = 0;
    while start < query_length {
        let rows = rows_per_block.min(query_length - start);
        let q_block = q.narrow(1, start, rows)?;
        let mut scores = (q_block.matmul(&k_t)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(&mask.narrow(0, start, rows)?)?;
        }
        let probabilities = candle_nn::ops::softmax_last_dim(&scores)?;
        blocks.push(probabilities.matmul(&v)?);
        start += rows;
    }
    let out = if blocks.len() == 1 {
        blocks.remove(0)
    } else {
        Tensor::cat(&blocks, 1)?
    };
    out.reshape((batch, heads, query_length, head_dim))?
        .transpose(1, 2)?
        .reshape((batch, query_length, width))
}
