//! The 2-D convolution layer of the UNet and the VAE (LDM keys `weight` [O, C, k, k] and
//! `bias`): run by the GEMM kernel of [`crate::kernels::cpu`] on the CPU in f32, reading the
//! weights in place ([`WeightMatrix`]); by candle elsewhere.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::Conv2dConfig;

use crate::kernels::cpu::{self, with_cpu_f32, ConvShape};
use crate::weights::{WeightMatrix, Weights};

pub struct Conv2d {
    weight: WeightMatrix,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        weights: Weights,
    ) -> Result<Self> {
        let bias = weights.get(out_channels, "bias")?;
        Self::with_bias(in_channels, kernel, stride, padding, &weights, bias)
    }

    /// A layer without a bias (`bias=False`).
    pub fn without_bias(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        weights: Weights,
    ) -> Result<Self> {
        let bias = Tensor::zeros(out_channels, weights.dtype(), weights.device())?;
        Self::with_bias(in_channels, kernel, stride, padding, &weights, bias)
    }

    /// The layer's `weight` with `bias` (which says how many channels come out).
    fn with_bias(
        in_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        weights: &Weights,
        bias: Tensor,
    ) -> Result<Self> {
        let out_channels = bias.dim(0)?;
        Ok(Conv2d {
            weight: weights.matrix((out_channels, in_channels, kernel, kernel), "weight")?,
            bias,
            kernel,
            stride,
            padding,
        })
    }

    /// A convolution that keeps the size (padding k/2) at stride `stride`.
    pub fn same(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        weights: Weights,
    ) -> Result<Self> {
        Self::new(in_channels, out_channels, kernel, stride, kernel / 2, weights)
    }

    /// candle's convolution, for other devices and dtypes.
    fn candle_forward(&self, x: &Tensor) -> Result<Tensor> {
        let config = Conv2dConfig {
            padding: self.padding,
            stride: self.stride,
            ..Default::default()
        };
        candle_nn::Conv2d::new(self.weight.tensor()?, Some(self.bias.clone()), config).forward(x)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, in_channels, height, width) = x.dims4()?;
        let shape = ConvShape {
            batch,
            in_channels,
            height,
            width,
            out_channels: self.weight.dims()[0],
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        if self.weight.dims()[1] != in_channels
            || height + 2 * self.padding < self.kernel
            || width + 2 * self.padding < self.kernel
        {
            return self.candle_forward(x);
        }
        let values = with_cpu_f32([x, &self.bias], |[x, bias]| {
            self.weight
                .with_elements(|weight| cpu::conv2d(x, weight, bias, shape, self.weight.precision()))
        })?
        .transpose()?
        .flatten();
        match values {
            Some(values) => Tensor::from_vec(
                values,
                (batch, shape.out_channels, shape.out_height(), shape.out_width()),
                &Device::Cpu,
            ),
            None => self.candle_forward(x),
        }
    }
}
