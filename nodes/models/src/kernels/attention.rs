//! Multi-head scaled dot-product attention shared by the UNet, the VAE and the text encoders:
//! on the CPU in f32 by the fused kernel of [`crate::kernels::cpu`], elsewhere with candle's
//! operations in query blocks that keep the score matrix small.

use candle_core::{Device, Result, Tensor};

use crate::kernels::cpu::{self, with_cpu_f32};

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
    let k = split(k, key_length)?;
    let v = split(v, key_length)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let out = match fused_on_cpu(&q, &k, &v, mask, scale as f32)? {
        Some(out) => out,
        None => blocked(&q, &k, &v, mask, scale)?,
    };
    out.reshape((batch, heads, query_length, head_dim))?
        .transpose(1, 2)?
        .reshape((batch, query_length, width))
}

/// The fused CPU kernel, when all inputs are CPU f32 tensors.
fn fused_on_cpu(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f32) -> Result<Option<Tensor>> {
    let (batch_heads, query_length, head_dim) = q.dims3()?;
    let key_length = k.dim(1)?;
    let run = |q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>| {
        cpu::attention(q, k, v, mask, batch_heads, query_length, key_length, head_dim, scale)
    };
    let values = match mask {
        Some(mask) => with_cpu_f32([q, k, v, mask], |[q, k, v, mask]| run(q, k, v, Some(mask)))?,
        None => with_cpu_f32([q, k, v], |[q, k, v]| run(q, k, v, None))?,
    };
    values
        .map(|values| Tensor::from_vec(values, (batch_heads, query_length, head_dim), &Device::Cpu))
        .transpose()
}

/// Attention with candle's operations, in blocks of query rows.
fn blocked(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (batch_heads, query_length, _) = q.dims3()?;
    let key_length = k.dim(1)?;
    let k_t = k.transpose(1, 2)?.contiguous()?;
    let rows_per_block = (SCORE_BLOCK_BYTES / (batch_heads * key_length * 4).max(1)).clamp(1, query_length.max(1));
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
        blocks.push(probabilities.matmul(v)?);
        start += rows;
    }
    if blocks.len() == 1 {
        Ok(blocks.remove(0))
    } else {
        Tensor::cat(&blocks, 1)
    }
}
