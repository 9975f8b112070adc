//! Frequency filters of latents as FreeU's and FreSca's `Fourier_filter` compute them: each
//! [H, W] plane's 2-D FFT, centred as `torch.fft.fftshift` centres it, multiplied by a scale per
//! centred frequency, transformed back; the real part is kept.

use candle_core::{DType, Result, Tensor};
use rustfft::num_complex::Complex32;
use rustfft::FftPlanner;

/// `x` [.., H, W] with every plane filtered: `scale(row, column)` gives the factor of the
/// frequency at that place of the centred spectrum (the zero frequency at `(H/2, W/2)`).
pub fn fourier_filter(x: &Tensor, scale: impl Fn(usize, usize) -> f32) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let [.., height, width] = dims[..] else {
        return Err(candle_core::Error::Msg(format!(
            "a Fourier filter needs a tensor of at least two dimensions, not {dims:?}"
        )));
    };
    let device = x.device().clone();
    let source_dtype = x.dtype();
    let mut values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane_size = height * width;
    if plane_size == 0 {
        return Ok(x.clone());
    }
    // The mask at the spectrum's own (uncentred) indices: fftshift puts frequency k at
    // (k + n/2) mod n.
    let mask: Vec<f32> = (0..plane_size)
        .map(|index| {
            let (row, column) = (index / width, index % width);
            scale((row + height / 2) % height, (column + width / 2) % width)
        })
        .collect();
    let mut planner = FftPlanner::<f32>::new();
    let (row_forward, row_inverse) = (planner.plan_fft_forward(width), planner.plan_fft_inverse(width));
    let (column_forward, column_inverse) = (planner.plan_fft_forward(height), planner.plan_fft_inverse(height));
    let normalisation = 1.0 / plane_size as f32;
    let mut plane = vec![Complex32::default(); plane_size];
    let mut column = vec![Complex32::default(); height];
    for chunk in values.chunks_mut(plane_size) {
        for (slot, value) in plane.iter_mut().zip(chunk.iter()) {
            *slot = Complex32::new(*value, 0.0);
        }
        row_forward.process(&mut plane);
        transform_columns(&mut plane, &mut column, width, |c| column_forward.process(c));
        for (value, factor) in plane.iter_mut().zip(&mask) {
            *value *= *factor;
        }
        transform_columns(&mut plane, &mut column, width, |c| column_inverse.process(c));
        row_inverse.process(&mut plane);
        for (out, value) in chunk.iter_mut().zip(&plane) {
            *out = value.re * normalisation;
        }
    }
    Tensor::from_vec(values, dims, &device)?.to_dtype(source_dtype)
}

/// Applies `transform` to every column of the row-major `plane` (`width` columns).
fn transform_columns(
    plane: &mut [Complex32],
    column: &mut [Complex32],
    width: usize,
    transform: impl Fn(&mut [Complex32]),
) {
    for c in 0..width {
        for (row, slot) in column.iter_mut().enumerate() {
            *slot = plane[row * width + c];
        }
        transform(column);
        for (row, value) in column.iter().enumerate() {
            plane[row * width + c] = *value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_scale_of_one_everywhere_gives_the_input_back() {
        let values: Vec<f32> = (0..2 * 5 * 6).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let x = Tensor::from_vec(values.clone(), (2, 5, 6), &Device::Cpu).unwrap();
        let filtered = fourier_filter(&x, |_, _| 1.0).unwrap();
        let back = filtered.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in values.iter().zip(back) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn the_centre_holds_the_mean() {
        // Zeroing every frequency but the centred zero frequency leaves the plane's mean.
        let values: Vec<f32> = (0..4 * 4).map(|i| i as f32).collect();
        let x = Tensor::from_vec(values, (4, 4), &Device::Cpu).unwrap();
        let filtered = fourier_filter(&x, |row, column| if (row, column) == (2, 2) { 1.0 } else { 0.0 }).unwrap();
        for value in filtered.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((value - 7.5).abs() < 1e-5, "{value}");
        }
    }
}
