//! The 2-D convolution layer of the UNet and the VAE (LDM keys `weight` [O, C, k, k] and
//! `bias`): run by the GEMM kernel of [`super::cpu_kernels`] on the CPU in f32, by candle
//! elsewhere. The weights are used in place, never copied.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::cpu_kernels::{self, with_cpu_f32, ConvShape};

pub struct Conv2d {
    inner: candle_nn::Conv2d,
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
        vb: VarBuilder,
    ) -> Result<Self> {
        let config = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Conv2d {
            inner: candle_nn::conv2d(in_channels, out_channels, kernel, config, vb)?,
            kernel,
            stride,
            padding,
        })
    }

    /// A convolution that keeps the size (padding k/2) at stride `stride`.
    pub fn same(in_channels: usize, out_channels: usize, kernel: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(in_channels, out_channels, kernel, stride, kernel / 2, vb)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, in_channels, height, width) = x.dims4()?;
        let weight = self.inner.weight();
        let shape = ConvShape {
            batch,
            in_channels,
            height,
            width,
            out_channels: weight.dim(0)?,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        if weight.dim(1)? != in_channels
            || height + 2 * self.padding < self.kernel
            || width + 2 * self.padding < self.kernel
        {
            return self.inner.forward(x);
        }
        let values = match self.inner.bias() {
            Some(bias) => with_cpu_f32([x, weight, bias], |[x, weight, bias]| {
                cpu_kernels::conv2d(x, weight, Some(bias), shape)
            })?,
            None => with_cpu_f32([x, weight], |[x, weight]| cpu_kernels::conv2d(x, weight, None, shape))?,
        };
        match values {
            Some(values) => Tensor::from_vec(
                values,
                (batch, shape.out_channels, shape.out_height(), shape.out_width()),
                &Device::Cpu,
            ),
            None => self.inner.forward(x),
        }
    }
}
