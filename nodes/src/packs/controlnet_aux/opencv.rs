//! The OpenCV resizes the pack's preprocessors call (`cv2.resize` of interleaved images), as
//! opencv-python 4.14 computes them: bicubic (`INTER_CUBIC`) of f64 images (weights in f32, sums
//! in f64) and of 8-bit images (the same, rounded), and area averaging (`INTER_AREA`) of 8-bit
//! images when shrinking. A resize to the same size copies, as OpenCV does.

/// An interleaved image of `channels` values a pixel, rows top to bottom.
#[derive(Clone, Debug, PartialEq)]
pub struct Pixels<T> {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<T>,
}

impl<T: Copy> Pixels<T> {
    fn at(&self, y: usize, x: usize, channel: usize) -> T {
        self.data[(y * self.width + x) * self.channels + channel]
    }
}

/// `interpolateCubic`: OpenCV's cubic weights (A = −0.75) at fraction `x`, the last making the
/// sum one.
fn cubic_weights(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// For each output index along an axis of `input` → `output` pixels: the four source indices
/// (clamped to the edge) and the fraction's weights.
fn cubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = 1.0 / (output as f64 / input as f64);
    (0..output)
        .map(|i| {
            let position = ((i as f64 + 0.5) * scale - 0.5) as f32;
            let floor = position.floor();
            let indices = std::array::from_fn(|k| (floor as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize);
            (indices, cubic_weights(position - floor))
        })
        .collect()
}

/// `cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)` of an 8-bit image: the
/// f64 resize rounded (OpenCV 4.14's 8-bit bicubic gives exactly that).
pub fn resize_cubic_u8(image: &Pixels<u8>, height: usize, width: usize) -> Pixels<u8> {
    let wide = Pixels {
        height: image.height,
        width: image.width,
        channels: image.channels,
        data: image.data.iter().map(|&value| f64::from(value)).collect(),
    };
    let resized = resize_cubic_f64(&wide, height, width);
    Pixels {
        height,
        width,
        channels: image.channels,
        data: resized
            .data
            .iter()
            .map(|value| value.round_ties_even().clamp(0.0, 255.0) as u8)
            .collect(),
    }
}

/// `cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)` of an f64 image (the
/// weights in f32, the sums in f64).
pub fn resize_cubic_f64(image: &Pixels<f64>, height: usize, width: usize) -> Pixels<f64> {
    if (image.height, image.width) == (height, width) {
        return image.clone();
    }
    let channels = image.channels;
    let columns = cubic_taps(image.width, width);
    let source_rows: Vec<Vec<f64>> = (0..image.height)
        .map(|y| {
            let mut row = Vec::with_capacity(width * channels);
            for (indices, weights) in &columns {
                for channel in 0..channels {
                    row.push((0..4).fold(0.0, |sum, k| {
                        sum + image.at(y, indices[k], channel) * f64::from(weights[k])
                    }));
                }
            }
            row
        })
        .collect();
    let mut data = Vec::with_capacity(height * width * channels);
    for (indices, weights) in cubic_taps(image.height, height) {
        let [r0, r1, r2, r3] = indices.map(|y| &source_rows[y]);
        let [b0, b1, b2, b3] = weights.map(f64::from);
        for (((v0, v1), v2), v3) in r0.iter().zip(r1).zip(r2).zip(r3) {
            data.push(v0 * b0 + v1 * b1 + v2 * b2 + v3 * b3);
        }
    }
    Pixels {
        height,
        width,
        channels,
        data,
    }
}

/// `computeResizeAreaTab`: for each output index, the source indices it covers and the share
/// of each (partly covered cells at the ends).
fn area_taps(input: usize, output: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = 1.0 / (output as f64 / input as f64);
    (0..output)
        .map(|i| {
            let start = i as f64 * scale;
            let end = start + scale;
            let cell = scale.min(input as f64 - start);
            let last = (end.floor() as usize).min(input - 1);
            let first = (start.ceil() as usize).min(last);
            let mut taps = Vec::new();
            if first as f64 - start > 1e-3 {
                taps.push((first - 1, ((first as f64 - start) / cell) as f32));
            }
            for source in first..last {
                taps.push((source, (1.0 / cell) as f32));
            }
            if end - last as f64 > 1e-3 {
                taps.push((last, ((end - last as f64).min(1.0).min(cell) / cell) as f32));
            }
            taps
        })
        .collect()
}

/// `cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)` of an 8-bit image to a
/// size no larger: whole-number factors average their blocks (2×2 rounding halves up, others to
/// even), other factors weigh the cells each output pixel covers, in f32.
pub fn resize_area_u8(image: &Pixels<u8>, height: usize, width: usize) -> Pixels<u8> {
    if (image.height, image.width) == (height, width) {
        return image.clone();
    }
    let channels = image.channels;
    let scale_x = 1.0 / (width as f64 / image.width as f64);
    let scale_y = 1.0 / (height as f64 / image.height as f64);
    let (whole_x, whole_y) = (scale_x.round(), scale_y.round());
    let whole = (scale_x - whole_x).abs() < f64::EPSILON && (scale_y - whole_y).abs() < f64::EPSILON;
    let mut data = Vec::with_capacity(height * width * channels);
    if whole {
        let (fx, fy) = (whole_x as usize, whole_y as usize);
        let halves = fx == 2 && fy == 2 && matches!(channels, 1 | 3 | 4);
        let area = 1.0 / (fx * fy) as f32;
        for y in 0..height {
            for x in 0..width {
                for channel in 0..channels {
                    let sum: i32 = (0..fy)
                        .flat_map(|dy| (0..fx).map(move |dx| (dy, dx)))
                        .map(|(dy, dx)| i32::from(image.at(y * fy + dy, x * fx + dx, channel)))
                        .sum();
                    let value = if halves {
                        (sum + 2) >> 2
                    } else {
                        (sum as f32 * area).round_ties_even() as i32
                    };
                    data.push(value.clamp(0, 255) as u8);
                }
            }
        }
    } else {
        let columns = area_taps(image.width, width);
        let row_length = width * channels;
        // Each source row averaged horizontally, once.
        let source_rows: Vec<Vec<f32>> = (0..image.height)
            .map(|y| {
                let mut row = vec![0f32; row_length];
                for (x, column_taps) in columns.iter().enumerate() {
                    for &(source_x, alpha) in column_taps {
                        for channel in 0..channels {
                            row[x * channels + channel] += f32::from(image.at(y, source_x, channel)) * alpha;
                        }
                    }
                }
                row
            })
            .collect();
        let mut sums = vec![0f32; row_length];
        for taps in area_taps(image.height, height) {
            sums.fill(0.0);
            for (source_y, beta) in taps {
                for (sum, value) in sums.iter_mut().zip(&source_rows[source_y]) {
                    *sum += beta * value;
                }
            }
            data.extend(sums.iter().map(|sum| sum.round_ties_even().clamp(0.0, 255.0) as u8));
        }
    }
    Pixels {
        height,
        width,
        channels,
        data,
    }
}

/// `tan(22.5°)` in OpenCV's Canny fixed point (15 fractional bits).
const CANNY_TAN_22_5: i64 = 13573;
const CANNY_SHIFT: u32 = 15;

/// `cv2.Canny(image, low, high)` (3×3 Sobel, L1 gradient) of an 8-bit image: 255 on edges, 0
/// elsewhere, one value a pixel. Of several channels, each pixel takes the gradient of the one
/// whose magnitude is largest.
pub fn canny_u8(image: &Pixels<u8>, low: i32, high: i32) -> Vec<u8> {
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (height, width, channels) = (image.height, image.width, image.channels);
    let at = |y: isize, x: isize, channel: usize| -> i32 {
        let y = y.clamp(0, height as isize - 1) as usize;
        let x = x.clamp(0, width as isize - 1) as usize;
        i32::from(image.at(y, x, channel))
    };
    // The Sobel derivatives of the channel with the largest |dx| + |dy| at each pixel.
    let mut dx = vec![0i32; height * width];
    let mut dy = vec![0i32; height * width];
    let mut magnitude = vec![0i32; height * width];
    for y in 0..height {
        for x in 0..width {
            let (yi, xi) = (y as isize, x as isize);
            for channel in 0..channels {
                let p = |oy: isize, ox: isize| at(yi + oy, xi + ox, channel);
                let gx = (p(-1, 1) + 2 * p(0, 1) + p(1, 1)) - (p(-1, -1) + 2 * p(0, -1) + p(1, -1));
                let gy = (p(1, -1) + 2 * p(1, 0) + p(1, 1)) - (p(-1, -1) + 2 * p(-1, 0) + p(-1, 1));
                let m = gx.abs() + gy.abs();
                let index = y * width + x;
                if channel == 0 || m > magnitude[index] {
                    (dx[index], dy[index], magnitude[index]) = (gx, gy, m);
                }
            }
        }
    }
    // Magnitudes outside the image are zero.
    let mag = |y: isize, x: isize| -> i32 {
        if y < 0 || x < 0 || y >= height as isize || x >= width as isize {
            0
        } else {
            magnitude[y as usize * width + x as usize]
        }
    };
    // 0: a weak edge, 1: no edge, 2: an edge.
    let mut map = vec![1u8; height * width];
    let mut stack = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let index = y * width + x;
            let m = magnitude[index];
            if m <= low {
                continue;
            }
            let (xs, ys) = (dx[index], dy[index]);
            let (yi, xi) = (y as isize, x as isize);
            let ax = i64::from(xs.abs());
            let ay = i64::from(ys.abs()) << CANNY_SHIFT;
            let tg22x = ax * CANNY_TAN_22_5;
            let maximum = if ay < tg22x {
                m > mag(yi, xi - 1) && m >= mag(yi, xi + 1)
            } else if ay > tg22x + (ax << (CANNY_SHIFT + 1)) {
                m > mag(yi - 1, xi) && m >= mag(yi + 1, xi)
            } else {
                let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                m > mag(yi - 1, xi - s) && m > mag(yi + 1, xi + s)
            };
            if !maximum {
                continue;
            }
            if m > high {
                map[index] = 2;
                stack.push(index);
            } else {
                map[index] = 0;
            }
        }
    }
    // Hysteresis: weak edges touching an edge (8-connected) become edges.
    while let Some(index) = stack.pop() {
        let (y, x) = ((index / width) as isize, (index % width) as isize);
        for (oy, ox) in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)] {
            let (ny, nx) = (y + oy, x + ox);
            if ny < 0 || nx < 0 || ny >= height as isize || nx >= width as isize {
                continue;
            }
            let neighbour = ny as usize * width + nx as usize;
            if map[neighbour] == 0 {
                map[neighbour] = 2;
                stack.push(neighbour);
            }
        }
    }
    map.iter().map(|&state| if state == 2 { 255 } else { 0 }).collect()
}
