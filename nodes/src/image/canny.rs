//! The `Canny` node: kornia's `filters.canny` with its defaults, as ComfyUI calls it.
//!
//! Greyscale (0.299, 0.587, 0.114) → 5×5 Gaussian blur, σ = 1, reflected borders → unnormalised
//! Sobel gradients, replicated borders → magnitude `sqrt(gx² + gy² + 1e-6)` → non-maximum suppression
//! along the gradient direction rounded to 45° → strict low/high thresholds → hysteresis keeping
//! weak edges 8-connected to strong ones. The output is the 0/1 edge map on three channels.

use std::collections::VecDeque;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};

use crate::image::nodes::image_result;
use crate::image::Image;

pub struct Canny;

impl Node for Canny {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("Canny", "comfy_extras.nodes_canny", "image/preprocessors")
            .required("image", InputSpec::of("IMAGE"))
            .required("low_threshold", InputSpec::float(0.4, 0.01, 0.99).opt("step", 0.01))
            .required("high_threshold", InputSpec::float(0.8, 0.01, 0.99).opt("step", 0.01))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let low = inputs.float("low_threshold")? as f32;
        let high = inputs.float("high_threshold")? as f32;
        if image.channels != 3 && image.channels != 1 {
            return Err(NodeError::value(format!(
                "Canny expects 1 or 3 channels, got {}",
                image.channels
            )));
        }
        let (h, w) = (image.height, image.width);
        let mut data = Vec::with_capacity(image.batch * h * w * 3);
        for b in 0..image.batch {
            ctx.check_interrupt()?;
            let gray: Vec<f32> = image
                .frame(b)
                .chunks(image.channels)
                .map(|p| {
                    if p.len() == 3 {
                        0.299f32 * p[0] + 0.587f32 * p[1] + 0.114f32 * p[2]
                    } else {
                        p[0]
                    }
                })
                .collect();
            let edges = canny(&gray, h, w, low, high);
            data.extend(edges.into_iter().flat_map(|v| [v, v, v]));
        }
        Ok(image_result(Image::new(image.batch, h, w, 3, data)?))
    }
}

/// kornia's Gaussian window: `exp(-x² / 2σ²)` normalised, in float32.
fn gaussian_window(size: usize, sigma: f32) -> Vec<f32> {
    let half = (size / 2) as f32;
    let raw: Vec<f32> = (0..size)
        .map(|i| {
            let x = i as f32 - half;
            (-(x * x) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f32 = raw.iter().sum();
    raw.iter().map(|v| v / total).collect()
}

/// PyTorch's `reflect` padding index (mirror, edge not repeated).
fn reflect(i: isize, len: usize) -> usize {
    let len = len as isize;
    if len == 1 {
        return 0;
    }
    let period = 2 * (len - 1);
    let mut i = i.rem_euclid(period);
    if i >= len {
        i = period - i;
    }
    i as usize
}

fn blur(gray: &[f32], h: usize, w: usize) -> Vec<f32> {
    let kernel = gaussian_window(5, 1.0);
    let mut horizontal = vec![0.0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0f32;
            for (k, weight) in kernel.iter().enumerate() {
                acc += gray[y * w + reflect(x as isize + k as isize - 2, w)] * weight;
            }
            horizontal[y * w + x] = acc;
        }
    }
    let mut out = vec![0.0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0f32;
            for (k, weight) in kernel.iter().enumerate() {
                acc += horizontal[reflect(y as isize + k as isize - 2, h) * w + x] * weight;
            }
            out[y * w + x] = acc;
        }
    }
    out
}

/// The 8 neighbour offsets in kornia's NMS-kernel order (0° = +x, angles growing towards +y).
const DIRECTIONS: [(isize, isize); 8] = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)];

fn canny(gray: &[f32], h: usize, w: usize, low: f32, high: f32) -> Vec<f32> {
    let blurred = blur(gray, h, w);
    let at =
        |y: isize, x: isize| blurred[y.clamp(0, h as isize - 1) as usize * w + x.clamp(0, w as isize - 1) as usize];
    let mut magnitude = vec![0.0f32; h * w];
    let mut direction = vec![0usize; h * w];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let gx = (at(y - 1, x + 1) + 2.0 * at(y, x + 1) + at(y + 1, x + 1))
                - (at(y - 1, x - 1) + 2.0 * at(y, x - 1) + at(y + 1, x - 1));
            let gy = (at(y + 1, x - 1) + 2.0 * at(y + 1, x) + at(y + 1, x + 1))
                - (at(y - 1, x - 1) + 2.0 * at(y - 1, x) + at(y - 1, x + 1));
            let i = y as usize * w + x as usize;
            magnitude[i] = (gx * gx + gy * gy + 1e-6).sqrt();
            let degrees = 180.0f32 * gy.atan2(gx) / std::f32::consts::PI;
            let octant = (degrees / 45.0).round_ties_even();
            direction[i] = (octant as i64).rem_euclid(8) as usize;
        }
    }
    let neighbour = |i: usize, d: usize| {
        let (y, x) = ((i / w) as isize + DIRECTIONS[d].0, (i % w) as isize + DIRECTIONS[d].1);
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0.0
        } else {
            magnitude[y as usize * w + x as usize]
        }
    };
    // 0 = none, 1 = weak, 2 = strong.
    let mut class = vec![0u8; h * w];
    for i in 0..h * w {
        let d = direction[i];
        let is_max = magnitude[i] - neighbour(i, d) > 0.0 && magnitude[i] - neighbour(i, (d + 4) % 8) > 0.0;
        let m = if is_max { magnitude[i] } else { 0.0 };
        class[i] = u8::from(m > low) + u8::from(m > high);
    }
    let mut edges = vec![0.0f32; h * w];
    let mut queue: VecDeque<usize> = (0..h * w).filter(|&i| class[i] == 2).collect();
    for &i in &queue {
        edges[i] = 1.0;
    }
    while let Some(i) = queue.pop_front() {
        for d in DIRECTIONS {
            let (y, x) = ((i / w) as isize + d.0, (i % w) as isize + d.1);
            if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                continue;
            }
            let j = y as usize * w + x as usize;
            if class[j] == 1 && edges[j] == 0.0 {
                edges[j] = 1.0;
                queue.push_back(j);
            }
        }
    }
    edges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bright_line_gives_edges_on_both_sides() {
        let (h, w) = (12, 12);
        let gray: Vec<f32> = (0..h * w).map(|i| if i % w == 6 { 1.0 } else { 0.0 }).collect();
        let edges = canny(&gray, h, w, 0.1, 0.2);
        for y in 0..h {
            let row: Vec<usize> = (0..w).filter(|&x| edges[y * w + x] == 1.0).collect();
            assert_eq!(row, [5, 7], "row {y}");
        }
    }

    #[test]
    fn flat_images_have_no_edges() {
        assert!(canny(&[0.5; 64], 8, 8, 0.1, 0.2).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn reflect_padding_mirrors_without_repeating_the_edge() {
        assert_eq!(
            [reflect(-2, 5), reflect(-1, 5), reflect(5, 5), reflect(6, 5)],
            [2, 1, 3, 2]
        );
    }
}
