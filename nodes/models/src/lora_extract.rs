//! LoRA extraction, as ComfyUI's `extract_lora` (`comfy_extras/nodes_lora_extract.py`) computes
//! it: a weight difference ΔW [out, in] (a convolution's [out, in, k, k] flattened to
//! [out, in·k·k]) factored by its SVD truncated to `rank` (at most `min(out, in)`), `up` = U·S
//! [out, rank] and `down` = Vᵀ [rank, in·k·k]; then both factors clamped to ±(the 0.99 quantile
//! of all their elements together), which caps the few largest values. A convolution's factors
//! take its shape again: `up` [out, rank, 1, 1], `down` [rank, in, k, k].
//!
//! The SVD is faer's thin one in f32 (ComfyUI takes torch's full one, the same singular values
//! and truncated product; its factors may differ from torch's by the signs of singular-vector
//! pairs, which moves the clamp bound slightly).

use candle_core::{DType, Device, Tensor};

/// The quantile of the factors' elements they are clamped to (ComfyUI's `CLAMP_QUANTILE`).
pub const CLAMP_QUANTILE: f32 = 0.99;

/// Why a difference could not be factored.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("a weight of shape {0:?} is neither a matrix nor a convolution kernel")]
    NotAMatrix(Vec<usize>),
    #[error("the weight difference has non-finite values")]
    NotFinite,
    #[error("the SVD did not converge")]
    NoConvergence,
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A matrix [rows, cols] in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

/// The SVD of `matrix` truncated to its `rank` largest singular values: U·S [rows, rank] and
/// Vᵀ [rank, cols] (`rank` at most `min(rows, cols)`), and every singular value, largest first.
pub fn truncated_svd(matrix: &Matrix, rank: usize) -> Result<(Matrix, Matrix, Vec<f32>), ExtractError> {
    let Matrix { rows, cols, values } = matrix;
    let (rows, cols) = (*rows, *cols);
    if values.iter().any(|value| !value.is_finite()) {
        return Err(ExtractError::NotFinite);
    }
    let rank = rank.min(rows).min(cols);
    let svd = faer::Mat::<f32>::from_fn(rows, cols, |i, j| values[i * cols + j])
        .thin_svd()
        .map_err(|_| ExtractError::NoConvergence)?;
    let (u, v, s) = (svd.U(), svd.V(), svd.S().column_vector());
    let singular_values: Vec<f32> = (0..rows.min(cols)).map(|j| s[j]).collect();
    let us = Matrix {
        rows,
        cols: rank,
        values: (0..rows)
            .flat_map(|i| (0..rank).map(move |j| u[(i, j)] * s[j]))
            .collect(),
    };
    let vh = Matrix {
        rows: rank,
        cols,
        values: (0..rank).flat_map(|j| (0..cols).map(move |i| v[(i, j)])).collect(),
    };
    Ok((us, vh, singular_values))
}

/// `torch.quantile(values, q)` (linear interpolation) of finite `values`, in f32 as torch
/// computes it: the rank `q·(n − 1)`, and `torch.lerp` (fused) between the sorted values
/// around it.
pub fn quantile(values: &[f32], q: f32) -> f32 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f32::total_cmp);
    let Some(last) = sorted.len().checked_sub(1) else {
        return f32::NAN;
    };
    let rank = q * last as f32;
    let below = (rank.floor() as usize).min(last);
    let above = (rank.ceil() as usize).min(last);
    let weight = rank - below as f32;
    let (start, end) = (sorted[below], sorted[above]);
    // torch's CPU lerp, with its fused multiply-adds.
    if weight.abs() < 0.5 {
        weight.mul_add(end - start, start)
    } else {
        (weight - 1.0).mul_add(end - start, end)
    }
}

/// Both factors clamped to ±(the [`CLAMP_QUANTILE`] quantile of their elements together).
pub fn clamp_factors(up: &mut Matrix, down: &mut Matrix) {
    let all: Vec<f32> = up.values.iter().chain(&down.values).copied().collect();
    let high = quantile(&all, CLAMP_QUANTILE);
    for value in up.values.iter_mut().chain(down.values.iter_mut()) {
        *value = value.max(-high).min(high);
    }
}

/// ComfyUI's `extract_lora(diff, rank)`: the clamped low-rank factors `(up, down)` of `diff`
/// (a matrix or a convolution kernel), in f32 on the CPU.
pub fn extract_lora(diff: &Tensor, rank: usize) -> Result<(Tensor, Tensor), ExtractError> {
    let dims = diff.dims().to_vec();
    let (out, input, kernel) = match dims.as_slice() {
        [out, input] => (*out, *input, None),
        [out, input, kh, kw] => (*out, *input, Some((*kh, *kw))),
        _ => return Err(ExtractError::NotAMatrix(dims)),
    };
    let rank = rank.min(input).min(out);
    let values: Vec<f32> = diff
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let cols = values.len() / out.max(1);
    let (mut up, mut down, _) = truncated_svd(
        &Matrix {
            rows: out,
            cols,
            values,
        },
        rank,
    )?;
    clamp_factors(&mut up, &mut down);
    let (up_shape, down_shape) = match kernel {
        None => (vec![out, rank], vec![rank, input]),
        Some((kh, kw)) => (vec![out, rank, 1, 1], vec![rank, input, kh, kw]),
    };
    Ok((
        Tensor::from_vec(up.values, up_shape, &Device::Cpu)?,
        Tensor::from_vec(down.values, down_shape, &Device::Cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_between_the_sorted_values() {
        let values = [3.0f32, -1.0, 2.0, 0.0, 1.0];
        assert_eq!(quantile(&values, 0.0), -1.0);
        assert_eq!(quantile(&values, 1.0), 3.0);
        assert_eq!(quantile(&values, 0.5), 1.0);
        // rank 0.99·4 = 3.96: 2 + 0.96·(3 − 2).
        assert!((quantile(&values, 0.99) - 2.96).abs() < 1e-6);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn the_full_rank_factors_reproduce_the_matrix() {
        let values: Vec<f32> = (0..12).map(|i| ((i * 7) % 5) as f32 - 2.0 + 0.1 * i as f32).collect();
        let matrix = Matrix {
            rows: 3,
            cols: 4,
            values: values.clone(),
        };
        let (us, vh, singular) = truncated_svd(&matrix, 8).expect("svd");
        assert_eq!((us.rows, us.cols, vh.rows, vh.cols), (3, 3, 3, 4));
        assert!(singular.windows(2).all(|pair| pair[0] >= pair[1]));
        for i in 0..3 {
            for j in 0..4 {
                let product: f32 = (0..3).map(|r| us.values[i * 3 + r] * vh.values[r * 4 + j]).sum();
                assert!((product - values[i * 4 + j]).abs() < 1e-5, "({i}, {j})");
            }
        }
    }

    #[test]
    fn weights_of_other_ranks_and_non_finite_differences_are_errors() {
        let vector = Tensor::zeros(4, DType::F32, &Device::Cpu).expect("tensor");
        assert!(matches!(extract_lora(&vector, 2), Err(ExtractError::NotAMatrix(_))));
        let nan = Tensor::from_vec(vec![f32::NAN; 4], (2, 2), &Device::Cpu).expect("tensor");
        assert!(matches!(extract_lora(&nan, 2), Err(ExtractError::NotFinite)));
    }
}
