//! The CPU kernels against candle's own operations on random data: the fused attention
//! (with and without a mask, lengths that are not multiples of the query block) and the
//! GEMM convolution (3×3 with padding, stride 2, 1×1, bias, odd sizes).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
mod common;

use common::max_abs_difference;
use easel_models::kernels::attention::attention;
use easel_models::kernels::conv::Conv2d;

/// softmax(q·kᵀ/√d + mask)·v with candle's operations, all heads at once.
fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Tensor {
    let (batch, nq, width) = q.dims3().unwrap();
    let nk = k.dim(1).unwrap();
    let d = width / heads;
    let split = |t: &Tensor, n: usize| {
        t.reshape((batch, n, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (split(q, nq), split(k, nk), split(v, nk));
    let mut scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask).unwrap();
    }
    let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
    p.matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((batch, nq, width))
        .unwrap()
}

#[test]
fn fused_attention_matches_the_reference() {
    let device = Device::Cpu;
    for (batch, nq, nk, heads, width) in [
        (2, 130, 77, 8, 64),
        (1, 64, 64, 1, 32),
        (2, 77, 77, 4, 48),
        (1, 1, 5, 2, 8),
    ] {
        let q = Tensor::randn(0f32, 1.0, (batch, nq, width), &device).unwrap();
        let k = Tensor::randn(0f32, 1.0, (batch, nk, width), &device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (batch, nk, width), &device).unwrap();
        let ours = attention(&q, &k, &v, heads, None).unwrap();
        let expected = reference_attention(&q, &k, &v, heads, None);
        assert!(max_abs_difference(&ours, &expected) < 1e-5, "{batch}×{nq}×{nk}×{heads}");
        if nq == nk {
            let mask_values: Vec<f32> = (0..nq * nk)
                .map(|i| if i % nk > i / nk { -f32::MAX } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask_values, (nq, nk), &device).unwrap();
            let ours = attention(&q, &k, &v, heads, Some(&mask)).unwrap();
            let expected = reference_attention(&q, &k, &v, heads, Some(&mask));
            assert!(
                max_abs_difference(&ours, &expected) < 1e-5,
                "masked {batch}×{nq}×{heads}"
            );
        }
    }
}

#[test]
fn gemm_convolution_matches_candle() {
    let device = Device::Cpu;
    // (batch, in, out, height, width, kernel, stride, padding)
    let cases = [
        (2, 8, 16, 13, 11, 3, 1, 1),
        (1, 5, 7, 16, 16, 3, 2, 0),
        (1, 5, 7, 17, 15, 3, 2, 1),
        (2, 12, 6, 9, 10, 1, 1, 0),
        (1, 4, 4, 3, 3, 3, 1, 1),
        (1, 3, 5, 7, 9, 3, 1, 0),
        (1, 3, 5, 6, 6, 5, 1, 2),
        // Deeper than one packed block (C·k·k > 256) and wider than one (> 2048 output pixels
        // per chunk): packing starts mid-row of the unfolded input.
        (1, 32, 8, 40, 300, 3, 1, 1),
        (1, 30, 4, 60, 181, 3, 2, 1),
        // Small outputs, shared out by output channels, every task reading across the images.
        (2, 40, 30, 8, 8, 3, 1, 1),
        (3, 20, 50, 5, 7, 3, 2, 1),
        (2, 16, 13, 6, 6, 1, 1, 0),
    ];
    for (batch, in_channels, out_channels, height, width, kernel, stride, padding) in cases {
        let weight = Tensor::randn(0f32, 0.2, (out_channels, in_channels, kernel, kernel), &device).unwrap();
        let bias = Tensor::randn(0f32, 0.2, out_channels, &device).unwrap();
        let tensors = std::collections::HashMap::from([
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let ours = Conv2d::new(in_channels, out_channels, kernel, stride, padding, vb.into()).unwrap();
        let config = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let reference = candle_nn::Conv2d::new(weight, Some(bias), config);
        let x = Tensor::randn(0f32, 1.0, (batch, in_channels, height, width), &device).unwrap();
        let (a, b) = (ours.forward(&x).unwrap(), reference.forward(&x).unwrap());
        assert_eq!(a.dims(), b.dims());
        assert!(
            max_abs_difference(&a, &b) < 1e-4,
            "{in_channels}→{out_channels} k{kernel} s{stride} p{padding}"
        );
    }
}

/// The packed GEMM against a plain triple loop, over sizes that cross every block edge
/// (6-row and 32-column tiles, 256-deep and 96-row and 2048-column blocks), transposed and
/// strided operands, scaling and accumulation.
#[test]
fn sgemm_matches_the_definition() {
    use easel_models::kernels::sgemm::{gemm_into, Precision, View};
    let cases = [(1, 1, 1), (7, 33, 5), (13, 70, 257), (100, 2100, 300), (6, 32, 256)];
    for (m, n, k) in cases {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 17) as f32 / 17.0 - 0.5).collect();
        // b is used transposed: stored [n, k], read as [k, n].
        let lhs = View::row_major(&a, m, k);
        let rhs = View {
            data: b.as_slice().into(),
            rows: k,
            cols: n,
            row_stride: 1,
            col_stride: k,
        };
        let expected: Vec<f32> = (0..m * n)
            .map(|index| {
                let (i, j) = (index / n, index % n);
                (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum::<f32>()
            })
            .collect();
        let mut dst = vec![1.0f32; m * n];
        gemm_into(&mut dst, n, lhs, &rhs, 0.5, true, Precision::F32);
        for (index, (actual, expected)) in dst.iter().zip(&expected).enumerate() {
            let wanted = 1.0 + 0.5 * expected;
            assert!(
                (actual - wanted).abs() < 1e-3 * (1.0 + wanted.abs()),
                "{m}×{n}×{k} at {index}: {actual} vs {wanted}"
            );
        }
        let mut dst = vec![7.0f32; m * n];
        gemm_into(&mut dst, n, lhs, &rhs, 1.0, false, Precision::F32);
        assert!(
            dst.iter()
                .zip(&expected)
                .all(|(a, e)| (a - e).abs() < 1e-3 * (1.0 + e.abs())),
            "{m}×{n}×{k} overwrite"
        );
    }
}

/// Operands in f16, bf16 and fp8 (weights read in place from a file) give exactly the products
/// of their f32 widenings, whichever direction of each is contiguous.
#[test]
fn sgemm_on_half_precision_operands_matches_their_f32_copies() {
    use easel_models::formats::fp8::Fp8Format;
    use easel_models::kernels::sgemm::{gemm_into, Elements, Precision, View};
    use half::{bf16, f16};
    for (m, n, k) in [(7, 33, 5), (13, 70, 257), (100, 2100, 300)] {
        let a: Vec<f16> = (0..m * k)
            .map(|i| f16::from_f32(((i * 7919) % 97) as f32 / 31.0 - 1.5))
            .collect();
        let b: Vec<bf16> = (0..k * n)
            .map(|i| bf16::from_f32(((i * 104729) % 89) as f32 / 29.0 - 1.5))
            .collect();
        let a32: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
        let b32: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
        // a is read row-major and column-major ([k, m] stored), b transposed ([n, k] stored).
        fn view(data: Elements, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> View {
            View {
                data,
                rows,
                cols,
                row_stride,
                col_stride,
            }
        }
        for (row_stride, col_stride) in [(k, 1), (1, m)] {
            let product = |lhs: Elements, rhs: Elements| {
                let mut dst = vec![0f32; m * n];
                let lhs = view(lhs, m, k, row_stride, col_stride);
                gemm_into(&mut dst, n, lhs, &view(rhs, k, n, 1, k), 1.0, false, Precision::F32);
                dst.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let widened = product(Elements::F32(&a32), Elements::F32(&b32));
            assert!(product(Elements::F16(&a), Elements::BF16(&b)) == widened, "{m}×{n}×{k}");
            assert!(
                product(Elements::F16(&a), Elements::F32(&b32)) == widened,
                "{m}×{n}×{k}"
            );
            for format in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
                let a8: Vec<u8> = a32.iter().map(|&v| format.encode(v)).collect();
                let b8: Vec<u8> = b32.iter().map(|&v| format.encode(v)).collect();
                let widen = |bytes: &[u8]| {
                    bytes
                        .iter()
                        .map(|&b| format.values()[usize::from(b)])
                        .collect::<Vec<f32>>()
                };
                let (a8_32, b8_32) = (widen(&a8), widen(&b8));
                assert!(
                    product(Elements::F8(&a8, format), Elements::F8(&b8, format))
                        == product(Elements::F32(&a8_32), Elements::F32(&b8_32)),
                    "{format:?} {m}×{n}×{k}"
                );
            }
        }
    }
}

/// Weights in ggml blocks (GGUF tensors in place) give exactly the products of their
/// dequantized values: read transposed as a linear layer reads them (contiguous along k, each
/// panel dequantized while packed), and strided.
#[test]
fn sgemm_on_ggml_blocks_matches_the_dequantized_weights() {
    use easel_models::formats::ggml_quants::{quantize::quantize, GgmlType};
    use easel_models::kernels::sgemm::{gemm_into, Elements, Precision, View};
    let (m, n, k) = (37, 70, 512);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 97) as f32 / 31.0 - 1.5).collect();
    let weights: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 89) as f32 / 290.0 - 0.15).collect();
    for kind in [GgmlType::Q8_0, GgmlType::Q4K] {
        let blocks = quantize(kind, &weights).unwrap();
        let mut dense = vec![0f32; n * k];
        Elements::Ggml(&blocks, kind).read(0, 1, &mut dense);
        let product = |rhs: Elements| {
            // The weight matrix [n, k] read as [k, n].
            let rhs = View {
                data: rhs,
                rows: k,
                cols: n,
                row_stride: 1,
                col_stride: k,
            };
            let mut out = vec![0f32; m * n];
            gemm_into(
                &mut out,
                n,
                View::row_major(x.as_slice(), m, k),
                &rhs,
                1.0,
                false,
                Precision::F32,
            );
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert!(
            product(Elements::Ggml(&blocks, kind)) == product(Elements::F32(&dense)),
            "{kind:?}"
        );
        // Every 3rd element from 5, and a range starting inside a block.
        let (mut strided, mut ranged) = (vec![0f32; 100], vec![0f32; 300]);
        Elements::Ggml(&blocks, kind).read(5, 3, &mut strided);
        Elements::Ggml(&blocks, kind).read(70, 1, &mut ranged);
        assert!(strided.iter().enumerate().all(|(i, v)| *v == dense[5 + 3 * i]));
        assert_eq!(ranged, dense[70..370]);
        let error = dense.iter().zip(&weights).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(error < 0.02, "{kind:?} dequantizes close to the weights: {error}");
    }
}

/// The bf16 GEMM multiplies the operands rounded to bf16 and sums in f32: against the same
/// sums in f64, and clearly apart from the f32 product. Odd depths leave a half pair.
#[test]
fn bf16_gemm_multiplies_operands_rounded_to_bf16() {
    use easel_models::kernels::sgemm::{gemm_into, Precision, View};
    use half::bf16;
    if !Precision::bf16_supported() {
        eprintln!("this CPU has no AVX512-BF16: the bf16 GEMM is the f32 one here");
        return;
    }
    let round = |v: f32| f64::from(bf16::from_f32(v).to_f32());
    for (m, n, k) in [(7, 33, 5), (13, 70, 257), (100, 2100, 301)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1013) as f32 / 337.0 - 1.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1019) as f32 / 331.0 - 1.5).collect();
        let lhs = View::row_major(a.as_slice(), m, k);
        // b is used transposed: stored [n, k], read as [k, n].
        let rhs = View {
            data: b.as_slice().into(),
            rows: k,
            cols: n,
            row_stride: 1,
            col_stride: k,
        };
        let mut dst = vec![1.0f32; m * n];
        gemm_into(&mut dst, n, lhs, &rhs, 0.5, true, Precision::Bf16);
        let (mut worst, mut apart) = (0f64, 0f64);
        for (index, actual) in dst.iter().enumerate() {
            let (i, j) = (index / n, index % n);
            let terms = (0..k).map(|p| (a[i * k + p], b[j * k + p]));
            let rounded: f64 = terms.clone().map(|(x, y)| round(x) * round(y)).sum();
            let exact: f64 = terms.clone().map(|(x, y)| f64::from(x) * f64::from(y)).sum();
            let magnitude: f64 = terms.map(|(x, y)| f64::from(x * y).abs()).sum::<f64>() + 1.0;
            worst = worst.max((f64::from(*actual) - 1.0 - 0.5 * rounded).abs() / magnitude);
            apart = apart.max((exact - rounded).abs() / magnitude);
        }
        assert!(worst < 1e-6, "{m}×{n}×{k}: {worst}");
        assert!(
            k < 10 || apart > 1e-4,
            "{m}×{n}×{k}: bf16 rounding not visible ({apart})"
        );
    }
}

#[test]
fn gemm_linear_matches_candle() {
    use easel_models::kernels::linear::{linear, linear_no_bias};
    let device = Device::Cpu;
    for (shape, in_features, out_features) in [
        (vec![2, 77, 48], 48, 40),
        (vec![3, 5], 5, 7),
        (vec![1, 300, 16], 16, 64),
    ] {
        let weight = Tensor::randn(0f32, 0.2, (out_features, in_features), &device).unwrap();
        let bias = Tensor::randn(0f32, 0.2, out_features, &device).unwrap();
        let vb = VarBuilder::from_tensors(
            std::collections::HashMap::from([
                ("weight".to_string(), weight.clone()),
                ("bias".to_string(), bias.clone()),
            ]),
            DType::F32,
            &device,
        );
        let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &device).unwrap();
        let with_bias = linear(in_features, out_features, vb.clone().into())
            .unwrap()
            .forward(&x)
            .unwrap();
        let expected = candle_nn::Linear::new(weight.clone(), Some(bias)).forward(&x).unwrap();
        assert!(max_abs_difference(&with_bias, &expected) < 1e-5, "{shape:?}");
        let without = linear_no_bias(in_features, out_features, vb.into())
            .unwrap()
            .forward(&x)
            .unwrap();
        let expected = candle_nn::Linear::new(weight, None).forward(&x).unwrap();
        assert!(max_abs_difference(&without, &expected) < 1e-5, "{shape:?} without bias");
    }
}

#[test]
fn geglu_matches_candle_gelu() {
    let device = Device::Cpu;
    let projected = (Tensor::randn(0f32, 1.0, (3, 7, 2 * 40), &device).unwrap() * 3.0).unwrap();
    let values = projected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ours = Tensor::from_vec(easel_models::kernels::cpu::geglu(&values, 40), (3, 7, 40), &device).unwrap();
    let expected =
        (projected.narrow(2, 0, 40).unwrap() * projected.narrow(2, 40, 40).unwrap().gelu_erf().unwrap()).unwrap();
    assert!(max_abs_difference(&ours, &expected) < 1e-5);
}
