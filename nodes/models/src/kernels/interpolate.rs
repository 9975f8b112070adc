//! PyTorch's `F.interpolate` on NCHW tensors where model code calls it (vision transformers'
//! position embeddings, DPT heads, CLIP vision's preprocessing): bilinear with
//! `align_corners=True`, bicubic (`align_corners=False`) at a given scale factor, and antialiased
//! bicubic to a given size. Each output pixel weighs a few source pixels
//! along each axis, with PyTorch's source positions, clamping and weights in f32, the width first;
//! computed with candle's gathers on any device.

use candle_core::{Result, Tensor};

/// The source indices and weights of each output index along one axis: output `i` is
/// `Σₖ weights[k][i] · input[indices[k][i]]`.
struct Taps {
    indices: Vec<Vec<u32>>,
    weights: Vec<Vec<f32>>,
}

impl Taps {
    fn new(taps: usize, output: usize) -> Self {
        Taps {
            indices: vec![Vec::with_capacity(output); taps],
            weights: vec![Vec::with_capacity(output); taps],
        }
    }

    /// Resamples `x` along `dim` (2: height, 3: width).
    fn apply(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let output = self.indices[0].len();
        let x = x.contiguous()?;
        let mut weight_shape = [1, 1, 1, 1];
        weight_shape[dim] = output;
        let mut sum: Option<Tensor> = None;
        for (indices, weights) in self.indices.iter().zip(&self.weights) {
            let indices = Tensor::from_slice(indices, output, x.device())?;
            let weights = Tensor::from_slice(weights, output, x.device())?
                .to_dtype(x.dtype())?
                .reshape(weight_shape.as_slice())?;
            let term = x.index_select(&indices, dim)?.broadcast_mul(&weights)?;
            sum = Some(match sum {
                Some(sum) => (sum + term)?,
                None => term,
            });
        }
        sum.ok_or_else(|| candle_core::Error::Msg("interpolation without taps".into()))
    }
}

/// `align_corners=True` bilinear taps: source position `i·(in−1)/(out−1)`.
fn bilinear_align_corners_taps(input: usize, output: usize) -> Taps {
    let scale = if output > 1 {
        (input - 1) as f32 / (output - 1) as f32
    } else {
        0.0
    };
    let mut taps = Taps::new(2, output);
    for i in 0..output {
        let real = scale * i as f32;
        let index = (real.floor() as usize).min(input - 1);
        let lambda = (real - index as f32).clamp(0.0, 1.0);
        let next = if index < input - 1 { index + 1 } else { index };
        taps.indices[0].push(index as u32);
        taps.indices[1].push(next as u32);
        taps.weights[0].push(1.0 - lambda);
        taps.weights[1].push(lambda);
    }
    taps
}

/// `F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)` on [B, C, H, W].
pub fn bilinear_align_corners(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, in_height, in_width) = x.dims4()?;
    let x = bilinear_align_corners_taps(in_width, width).apply(x, 3)?;
    bilinear_align_corners_taps(in_height, height).apply(&x, 2)
}

/// PyTorch's cubic convolution weights (A = −0.75) of the four pixels around fraction `t`, in
/// its order of operations (`get_cubic_upsample_coefficients`).
pub fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let opposite = 1.0 - t;
    [far(t + 1.0), near(t), near(opposite), far(opposite + 1.0)]
}

/// Bicubic taps at scale factor `scale` (source position `(i + ½)/scale − ½`, indices clamped
/// to the edge); `output` is `⌊input·scale⌋`.
fn bicubic_taps(input: usize, scale: f64) -> Taps {
    let output = (input as f64 * scale) as usize;
    let step = (1.0 / scale) as f32;
    let mut taps = Taps::new(4, output);
    for i in 0..output {
        let real = step * (i as f32 + 0.5) - 0.5;
        let floor = real.floor();
        let weights = cubic_weights(real - floor);
        for (k, weight) in weights.into_iter().enumerate() {
            let index = (floor as i64 - 1 + k as i64).clamp(0, input as i64 - 1);
            taps.indices[k].push(index as u32);
            taps.weights[k].push(weight);
        }
    }
    taps
}

/// `F.interpolate(x, scale_factor=(scale_h, scale_w), mode="bicubic")` on [B, C, H, W]: the
/// output is ⌊H·scale_h⌋ × ⌊W·scale_w⌋, and the source positions follow the scale factors
/// (not the sizes), as PyTorch does when it is given them.
pub fn bicubic_scaled(x: &Tensor, scale_height: f64, scale_width: f64) -> Result<Tensor> {
    let (_, _, in_height, in_width) = x.dims4()?;
    let x = bicubic_taps(in_width, scale_width).apply(x, 3)?;
    bicubic_taps(in_height, scale_height).apply(&x, 2)
}

/// Pillow's bicubic filter (A = −0.5), which PyTorch's antialiased resampling uses (`aa_filter`),
/// with the fused multiply-adds its x86-64 build computes it with.
fn antialias_cubic(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0).mul_add(x, -(A + 3.0)) * x).mul_add(x, 1.0)
    } else if x < 2.0 {
        A.mul_add(x, -5.0 * A).mul_add(x, 8.0 * A).mul_add(x, -4.0 * A)
    } else {
        0.0
    }
}

/// Antialiased bicubic taps (`_compute_indices_min_size_weights_aa`): output `i` weighs the
/// source pixels within the filter's support, widened by the scale when shrinking, around centre
/// `scale·(i + ½)`, with weights normalised to sum to one; positions in PyTorch's mix of float
/// and double arithmetic. Rows with fewer pixels than the widest are padded with zero weights.
fn antialiased_bicubic_taps(input: usize, output: usize) -> Taps {
    let scale = input as f32 / output as f32;
    let (support, inverse_scale) = if scale >= 1.0 {
        ((2.0 * f64::from(scale)) as f32, (1.0 / f64::from(scale)) as f32)
    } else {
        (2.0, 1.0)
    };
    let rows: Vec<(usize, Vec<f32>)> = (0..output)
        .map(|i| {
            let center = (f64::from(scale) * (i as f64 + 0.5)) as f32;
            let first = ((f64::from(center - support) + 0.5) as i64).max(0) as usize;
            let end = ((f64::from(center + support) + 0.5) as i64).clamp(0, input as i64) as usize;
            let weights: Vec<f32> = (first..end.max(first))
                .map(|j| {
                    let offset = (f64::from(j as f32 - center) + 0.5) * f64::from(inverse_scale);
                    antialias_cubic(offset as f32)
                })
                .collect();
            let total: f32 = weights.iter().sum();
            let weights = if total != 0.0 {
                weights.iter().map(|w| w / total).collect()
            } else {
                weights
            };
            (first, weights)
        })
        .collect();
    let width = rows.iter().map(|(_, weights)| weights.len()).max().unwrap_or(0).max(1);
    let mut taps = Taps::new(width, output);
    for (first, weights) in rows {
        for k in 0..width {
            let (index, weight) = match weights.get(k) {
                Some(&weight) => (first + k, weight),
                None => (first.min(input - 1), 0.0),
            };
            taps.indices[k].push(index as u32);
            taps.weights[k].push(weight);
        }
    }
    taps
}

/// `F.interpolate(x, size=(height, width), mode="bicubic", antialias=True)` on [B, C, H, W].
pub fn bicubic_antialiased(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, in_height, in_width) = x.dims4()?;
    let x = match in_width == width {
        true => x.clone(),
        false => antialiased_bicubic_taps(in_width, width).apply(x, 3)?,
    };
    match in_height == height {
        true => Ok(x),
        false => antialiased_bicubic_taps(in_height, height).apply(&x, 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bilinear_align_corners_keeps_the_corners_and_interpolates_between() {
        let x = Tensor::from_vec(vec![0f32, 3.0, 6.0, 9.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let out = bilinear_align_corners(&x, 3, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(out, vec![0.0, 1.5, 3.0, 3.0, 4.5, 6.0, 6.0, 7.5, 9.0]);
    }

    #[test]
    fn bicubic_scaled_matches_torch() {
        // F.interpolate(torch.tensor([[[[0., 1., 4., 9.]]]]), scale_factor=(1, 1.5), mode="bicubic")
        let x = Tensor::from_vec(vec![0f32, 1.0, 4.0, 9.0], (1, 1, 1, 4), &Device::Cpu).unwrap();
        let out = bicubic_scaled(&x, 1.0, 1.5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let torch = [-0.086_805_58, 0.218_75, 1.430_555, 3.152_777_7, 6.781_25, 9.434_029];
        assert_eq!(out.len(), torch.len());
        for (a, b) in out.iter().zip(torch) {
            assert!((a - b).abs() < 1e-5, "{out:?}");
        }
    }
}
