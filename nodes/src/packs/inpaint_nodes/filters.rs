//! The pack's mask filters (`util.py`), on one float32 `height`×`width` plane at a time:
//! kornia's separable filtering (`filter2d_separable` with its default reflected border: a
//! horizontal pass, then a vertical one), its Gaussian window, the pack's box and linear windows,
//! and binary dilation and erosion (counts over square windows).

use easel_engine::NodeError;
use rayon::prelude::*;

use easel_models::sampling::schedule::linspace_f32;

use crate::image::filters::{check_reflect_padding, torch_sum};

/// The pack's `BlurKernel`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum BlurKernel {
    Box,
    Linear,
    Gaussian,
}

impl BlurKernel {
    pub(super) const NAMES: [&'static str; 3] = ["box", "linear", "gaussian"];

    pub(super) fn named(name: &str) -> Result<Self, NodeError> {
        match name {
            "box" => Ok(BlurKernel::Box),
            "linear" => Ok(BlurKernel::Linear),
            "gaussian" => Ok(BlurKernel::Gaussian),
            other => Err(NodeError::value(format!("Unknown blur kernel: {other}"))),
        }
    }
}

/// Planes of one shape: `count` of `height`×`width` float32 values, one after another (a mask's
/// items, or an image's channels split out); `dims` is the NCHW shape PyTorch sees, for its
/// padding errors.
pub(super) struct Planes {
    pub(super) dims: [usize; 4],
    pub(super) data: Vec<f32>,
}

impl Planes {
    fn height(&self) -> usize {
        self.dims[2]
    }

    fn width(&self) -> usize {
        self.dims[3]
    }

    fn plane(&self) -> usize {
        self.height() * self.width()
    }

    /// Every plane through `f` (its values, height, width), the planes shared out between the
    /// threads.
    fn map(&self, f: impl Fn(&[f32], usize, usize) -> Vec<f32> + Sync) -> Planes {
        let (height, width) = (self.height(), self.width());
        let planes: Vec<Vec<f32>> = self
            .data
            .par_chunks(self.plane().max(1))
            .map(|plane| f(plane, height, width))
            .collect();
        Planes {
            dims: self.dims,
            data: planes.concat(),
        }
    }
}

/// The pack's `make_odd`: an even positive size one larger.
pub(super) fn make_odd(size: i64) -> i64 {
    if size > 0 && size % 2 == 0 {
        size + 1
    } else {
        size
    }
}

/// The pack's `mask_floor`: 1 where the value is at least 0.99, else 0.
pub(super) fn mask_floor(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| if v >= 0.99 { 1.0 } else { 0.0 }).collect()
}

/// kornia's `get_gaussian_kernel1d(size, σ)`: `exp(−x²/2σ²)` at the offsets from the centre,
/// over its float32 sum.
fn gaussian_window(size: usize, sigma: f32) -> Vec<f32> {
    let centre = (size / 2) as f32;
    let shift = if size.is_multiple_of(2) { 0.5 } else { 0.0 };
    let divisor = 2.0 * (sigma * sigma);
    let window: Vec<f32> = (0..size)
        .map(|i| {
            let x = i as f32 - centre + shift;
            (-(x * x) / divisor).exp()
        })
        .collect();
    let total = torch_sum(&window);
    window.iter().map(|w| w / total).collect()
}

/// The pack's `gaussian_blur(image, size)`: kornia's `gaussian_blur2d` with σ = 0.3·(size − 1) +
/// 0.8, reflected at the edges.
pub(super) fn gaussian_blur(planes: &Planes, size: usize) -> Result<Planes, NodeError> {
    let sigma = (0.3 * (size as f64 - 1.0) + 0.8) as f32;
    filter_separable(planes, &gaussian_window(size, sigma))
}

/// The pack's `mask_blur`: a `size` window of the kind asked for (nothing for sizes up to 2).
pub(super) fn mask_blur(planes: Planes, size: usize, kind: BlurKernel) -> Result<Planes, NodeError> {
    if size <= 2 {
        return Ok(planes);
    }
    let window = match kind {
        BlurKernel::Gaussian => return gaussian_blur(&planes, size),
        BlurKernel::Box => box_window(size),
        BlurKernel::Linear if size == 3 => box_window(size),
        BlurKernel::Linear => {
            let half = size / 2;
            let ramp = linspace_f32(1.0 / half as f32, (half - 1) as f32 / half as f32, half);
            let mut window = ramp.clone();
            window.push(1.0);
            window.extend(ramp.iter().rev());
            let total = torch_sum(&window);
            window.iter().map(|w| w / total).collect()
        }
    };
    filter_separable(&planes, &window)
}

fn box_window(size: usize) -> Vec<f32> {
    vec![1.0 / size as f32; size]
}

/// kornia's `filter2d_separable` with an odd `window` for both directions, reflected at the
/// edges (`F.pad(…, mode="reflect")`): the horizontal pass then the vertical one. A border wider
/// than the plane fails as PyTorch's padding does.
fn filter_separable(planes: &Planes, window: &[f32]) -> Result<Planes, NodeError> {
    check_reflect_padding(window.len() / 2, planes.dims)?;
    Ok(planes.map(|plane, height, width| {
        let across = correlate_lines(plane, height, width, window, Direction::Rows);
        correlate_lines(&across, height, width, window, Direction::Columns)
    }))
}

#[derive(Clone, Copy)]
enum Direction {
    Rows,
    Columns,
}

/// Each row (or column) of a plane correlated with `window`, centred, reflected past the edges.
fn correlate_lines(plane: &[f32], height: usize, width: usize, window: &[f32], direction: Direction) -> Vec<f32> {
    let radius = window.len() as isize / 2;
    let (lines, length, along, between) = match direction {
        Direction::Rows => (height, width, 1, width),
        Direction::Columns => (width, height, width, 1),
    };
    let mut out = vec![0f32; plane.len()];
    for line in 0..lines {
        for position in 0..length {
            let mut sum = 0f32;
            for (tap, weight) in window.iter().enumerate() {
                let index = reflect(position as isize + tap as isize - radius, length);
                sum = weight.mul_add(plane[line * between + index * along], sum);
            }
            out[line * between + position * along] = sum;
        }
    }
    out
}

/// `index` reflected into `0..length` without repeating the edge (the padding is checked to be
/// less than the length).
fn reflect(index: isize, length: usize) -> usize {
    let last = length as isize - 1;
    let mirrored = if index < 0 {
        -index
    } else if index > last {
        2 * last - index
    } else {
        index
    };
    mirrored.clamp(0, last) as usize
}

/// The pack's `binary_dilation`: 1 wherever a positive value lies within `radius` (a square
/// window, zeros past the edges), else 0.
pub(super) fn binary_dilation(planes: &Planes, radius: usize) -> Planes {
    planes.map(|plane, height, width| {
        let positive: Vec<bool> = plane.iter().map(|&v| v > 0.0).collect();
        let any = |count: usize| count > 0;
        let rows = window_pass(&positive, height, width, radius, false, Direction::Rows, any);
        flags(&window_pass(
            &rows,
            height,
            width,
            radius,
            false,
            Direction::Columns,
            any,
        ))
    })
}

/// The pack's `binary_erosion`: 1 where the whole square window of `radius` (ones past the
/// edges) sums to its size, that is holds only ones, else 0.
pub(super) fn binary_erosion(planes: &Planes, radius: usize) -> Planes {
    let size = 2 * radius + 1;
    planes.map(|plane, height, width| {
        let ones: Vec<bool> = plane.iter().map(|&v| v == 1.0).collect();
        let all = |count: usize| count == size;
        let rows = window_pass(&ones, height, width, radius, true, Direction::Rows, all);
        flags(&window_pass(
            &rows,
            height,
            width,
            radius,
            true,
            Direction::Columns,
            all,
        ))
    })
}

fn flags(set: &[bool]) -> Vec<f32> {
    set.iter().map(|&set| if set { 1.0 } else { 0.0 }).collect()
}

/// Along each row (or column), whether `keep` holds for the number of set flags within
/// `radius` of each position, the positions past the edges counted as set where `outside_set`.
fn window_pass(
    set: &[bool],
    height: usize,
    width: usize,
    radius: usize,
    outside_set: bool,
    direction: Direction,
    keep: impl Fn(usize) -> bool,
) -> Vec<bool> {
    let (lines, length, along, between) = match direction {
        Direction::Rows => (height, width, 1, width),
        Direction::Columns => (width, height, width, 1),
    };
    let mut out = vec![false; set.len()];
    let mut prefix = vec![0usize; length + 1];
    for line in 0..lines {
        for position in 0..length {
            prefix[position + 1] = prefix[position] + usize::from(set[line * between + position * along]);
        }
        for position in 0..length {
            let first = position.saturating_sub(radius);
            let last = (position + radius).min(length - 1);
            let outside = if outside_set {
                (radius - (position - first)) + (position + radius - last)
            } else {
                0
            };
            out[line * between + position * along] = keep(prefix[last + 1] - prefix[first] + outside);
        }
    }
    out
}
