//! Where in the latent a conditioning entry applies, and how strongly: ComfyUI's areas
//! (ConditioningSetArea, …Percentage), masks (ConditioningSetMask) and strengths, resolved
//! against the latent before sampling (`resolve_areas_and_cond_masks_multidim`) into the crop a
//! prediction is made on and the weight it is blended with (`get_area_and_mult`).

use candle_core::{DType, Device, Tensor};

use crate::image::resample::interpolate_mask;
use crate::image::Mask;

/// An area as the nodes set it: in latent pixels (ConditioningSetArea divides its pixel sizes by
/// 8) or as fractions of the latent's size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AreaSpec {
    Latent(LatentArea),
    Percentage { height: f64, width: f64, y: f64, x: f64 },
}

/// An area in latent pixels: size and top-left corner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatentArea {
    pub height: usize,
    pub width: usize,
    pub y: usize,
    pub x: usize,
}

impl LatentArea {
    /// ComfyUI's `area_inside`: whether `self` lies within `other`.
    pub fn inside(&self, other: &LatentArea) -> bool {
        self.y >= other.y
            && self.x >= other.x
            && self.height + self.y <= other.height + other.y
            && self.width + self.x <= other.width + other.x
    }

    fn pixels(&self) -> usize {
        self.height * self.width
    }
}

/// The region keys of a conditioning entry; all unset by default (the whole latent at
/// strength 1).
#[derive(Clone, Debug, Default)]
pub struct CondRegion {
    pub area: Option<AreaSpec>,
    /// Multiplies the entry's weight (`strength`).
    pub strength: Option<f64>,
    /// Weights the entry per latent pixel (`mask`, resized to the latent), times `mask_strength`.
    pub mask: Option<Mask>,
    pub mask_strength: Option<f64>,
    /// Replace the area by the mask's bounding box (ConditioningSetMask's "mask bounds").
    pub set_area_to_bounds: bool,
}

/// Why a region cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("the conditioning area starts at ({x}, {y}) latent pixels, outside the {width}×{height} latent")]
    Outside {
        x: usize,
        y: usize,
        width: usize,
        height: usize,
    },
    #[error("the conditioning mask cannot be used: {0}")]
    Mask(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A region resolved against a latent: the area (unclamped, as ComfyUI compares areas) and the
/// mask resized to the latent, [mask batch, H, W].
#[derive(Clone, Debug)]
pub struct ResolvedRegion {
    pub area: Option<LatentArea>,
    mask: Option<Tensor>,
    mask_strength: f64,
    strength: f64,
}

impl ResolvedRegion {
    /// Whether the entry covers the whole latent with weight 1 (so it can share a batch).
    fn is_whole(&self) -> bool {
        self.area.is_none() && self.mask.is_none() && self.strength == 1.0
    }

    /// Resolves `region` for a latent of `height × width` latent pixels.
    pub fn new(region: &CondRegion, height: usize, width: usize, device: &Device) -> Result<Self, RegionError> {
        let mut area = region.area.map(|area| match area {
            AreaSpec::Latent(area) => area,
            AreaSpec::Percentage {
                height: h,
                width: w,
                y,
                x,
            } => {
                let scale = |fraction: f64, size: usize| (fraction * size as f64).round_ties_even().max(0.0) as usize;
                LatentArea {
                    height: scale(h, height).max(1),
                    width: scale(w, width).max(1),
                    y: scale(y, height),
                    x: scale(x, width),
                }
            }
        });
        let mask = match &region.mask {
            Some(mask) => {
                let resized = interpolate_mask(mask, height, width).map_err(|e| RegionError::Mask(e.to_string()))?;
                if region.set_area_to_bounds {
                    area = Some(bounding_box(&resized.data, resized.batch, height, width));
                }
                Some(Tensor::from_vec(resized.data, (resized.batch, height, width), device)?)
            }
            None => None,
        };
        Ok(ResolvedRegion {
            area,
            mask,
            mask_strength: region.mask_strength.unwrap_or(1.0),
            strength: region.strength.unwrap_or(1.0),
        })
    }

    /// The area clamped to a latent of `height × width` (ComfyUI narrows the input to it).
    fn clamped_area(&self, height: usize, width: usize) -> Result<Option<LatentArea>, RegionError> {
        let Some(area) = self.area else {
            return Ok(None);
        };
        if area.y >= height || area.x >= width {
            return Err(RegionError::Outside {
                x: area.x,
                y: area.y,
                width,
                height,
            });
        }
        Ok(Some(LatentArea {
            height: area.height.min(height - area.y),
            width: area.width.min(width - area.x),
            ..area
        }))
    }

    /// Where in a [batch, channels, height, width] latent the entry predicts — its area clamped
    /// to the latent (`None`: everywhere) — and the weight of its prediction there: the mask
    /// (cropped, times its strength) or ones, times the strength; an area without a mask is
    /// feathered over up to 8 pixels on each side that does not touch the latent's border.
    /// `None` for an entry over the whole latent at weight 1.
    pub fn placement(
        &self,
        shape: &[usize],
        device: &Device,
    ) -> Result<Option<(Option<LatentArea>, Tensor)>, RegionError> {
        if self.is_whole() {
            return Ok(None);
        }
        let &[batch, channels, height, width] = shape else {
            return Err(RegionError::Mask(format!("a latent of shape {shape:?}")));
        };
        let area = self.clamped_area(height, width)?;
        let (area_height, area_width, y, x) = match area {
            Some(area) => (area.height, area.width, area.y, area.x),
            None => (height, width, 0, 0),
        };
        let weight = match &self.mask {
            Some(mask) => {
                let items = mask.dim(0)?.min(batch);
                let cropped = mask
                    .narrow(0, 0, items)?
                    .narrow(1, y, area_height)?
                    .narrow(2, x, area_width)?;
                let scaled = (cropped * self.mask_strength)?.unsqueeze(1)?;
                scaled.repeat((batch / items, channels, 1, 1))?
            }
            None => Tensor::ones((batch, channels, area_height, area_width), DType::F32, device)?,
        };
        let weight = (weight * self.strength)?;
        let weight = match (area, &self.mask) {
            (Some(area), None) => feather(weight, &area, height, width)?,
            _ => weight,
        };
        Ok(Some((area, weight)))
    }
}

/// ComfyUI's feathering of an area without a mask: on each side away from the latent's border,
/// the `t`-th row or column from the edge is scaled by (t + 1)/rr, rr = min(8, size / 4).
fn feather(weight: Tensor, area: &LatentArea, height: usize, width: usize) -> Result<Tensor, RegionError> {
    let (batch, channels, area_height, area_width) = weight.dims4()?;
    let mut values: Vec<f32> = weight.flatten_all()?.to_vec1()?;
    let plane = area_height * area_width;
    let sides = [
        (0usize, area_height, area.y, area.y + area.height < height),
        (1, area_width, area.x, area.x + area.width < width),
    ];
    for (dim, size, offset, inner_end) in sides {
        let rr = (size / 4).min(8);
        for t in 0..rr {
            let factor = (t + 1) as f32 / rr as f32;
            let lines = [(offset != 0).then_some(t), inner_end.then(|| size - 1 - t)];
            for line in lines.into_iter().flatten() {
                for item in 0..batch * channels {
                    let start = item * plane;
                    if dim == 0 {
                        for value in &mut values[start + line * area_width..start + (line + 1) * area_width] {
                            *value *= factor;
                        }
                    } else {
                        for row in 0..area_height {
                            values[start + row * area_width + line] *= factor;
                        }
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        values,
        (batch, channels, area_height, area_width),
        weight.device(),
    )?)
}

/// ComfyUI's `set_area_to_bounds`: the bounding box of the mask's non-zero pixels over the
/// batch, at least 8×8; (8, 8, 0, 0) for an empty mask.
fn bounding_box(data: &[f32], batch: usize, height: usize, width: usize) -> LatentArea {
    let mut bounds: Option<(usize, usize, usize, usize)> = None;
    for item in 0..batch {
        for row in 0..height {
            for column in 0..width {
                if data[(item * height + row) * width + column] != 0.0 {
                    bounds = Some(match bounds {
                        None => (row, column, row, column),
                        Some((top, left, bottom, right)) => {
                            (top.min(row), left.min(column), bottom.max(row), right.max(column))
                        }
                    });
                }
            }
        }
    }
    match bounds {
        None => LatentArea {
            height: 8,
            width: 8,
            y: 0,
            x: 0,
        },
        Some((top, left, bottom, right)) => LatentArea {
            height: (bottom - top + 1).max(8),
            width: (right - left + 1).max(8),
            y: top,
            x: left,
        },
    }
}

/// ComfyUI's `create_cond_with_same_area_if_none`: for an entry with `area`, the index of the
/// entry on the other side whose text conditioning an entry with the same area takes there —
/// the smallest one whose area contains it, else the first without an area — or `None` when
/// that side already has the area (or no candidate).
pub fn same_area_source(area: &LatentArea, others: &[Option<LatentArea>]) -> Option<usize> {
    let mut smallest: Option<usize> = None;
    for (index, other) in others.iter().enumerate() {
        match other {
            Some(candidate) if area.inside(candidate) => {
                smallest = match smallest.map(|s| others[s]) {
                    None | Some(None) => Some(index),
                    Some(Some(current)) if current.pixels() > candidate.pixels() => Some(index),
                    Some(Some(_)) => smallest,
                };
            }
            Some(_) => {}
            None => {
                if smallest.is_none() {
                    smallest = Some(index);
                }
            }
        }
    }
    let found = smallest?;
    match others[found] {
        Some(existing) if existing == *area => None,
        _ => Some(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(height: usize, width: usize, y: usize, x: usize) -> LatentArea {
        LatentArea { height, width, y, x }
    }

    #[test]
    fn an_inner_area_is_feathered_on_its_inner_sides_only() {
        let region = ResolvedRegion {
            area: Some(area(8, 16, 0, 4)),
            mask: None,
            mask_strength: 1.0,
            strength: 0.5,
        };
        let (placed, weight) = region.placement(&[1, 1, 8, 24], &Device::Cpu).unwrap().unwrap();
        assert_eq!(placed, Some(area(8, 16, 0, 4)));
        let rows: Vec<Vec<f32>> = weight.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        // Width 16: rr = 4 on the left (x = 4 ≠ 0) and right (4 + 16 < 24); height 8 touches
        // both borders, so rows are not feathered.
        assert_eq!(
            rows[3],
            vec![0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.375, 0.25, 0.125]
        );
        assert_eq!(rows[0], rows[7]);
    }

    #[test]
    fn same_area_sources_follow_comfyui() {
        let whole = None;
        let half = Some(area(4, 8, 0, 0));
        let quarter = Some(area(4, 4, 0, 0));
        // The smallest containing area wins over an area-less entry listed first.
        assert_eq!(same_area_source(&area(2, 2, 1, 1), &[whole, half, quarter]), Some(2));
        // Nothing contains it: the first area-less entry.
        assert_eq!(same_area_source(&area(2, 2, 6, 6), &[half, whole]), Some(1));
        // The other side already has this very area.
        assert_eq!(same_area_source(&area(4, 4, 0, 0), &[quarter]), None);
        assert_eq!(same_area_source(&area(2, 2, 6, 6), &[half]), None);
    }

    #[test]
    fn mask_bounds_and_percentages_resolve_to_latent_areas() {
        let mut data = vec![0.0; 2 * 16 * 16];
        data[3 * 16 + 5] = 1.0;
        data[16 * 16 + 12 * 16 + 9] = 0.5;
        assert_eq!(bounding_box(&data, 2, 16, 16), area(10, 8, 3, 5));
        assert_eq!(bounding_box(&[0.0; 4], 1, 2, 2), area(8, 8, 0, 0));
        let region = CondRegion {
            area: Some(AreaSpec::Percentage {
                height: 0.5,
                width: 0.01,
                y: 0.25,
                x: 0.5,
            }),
            ..CondRegion::default()
        };
        let resolved = ResolvedRegion::new(&region, 10, 12, &Device::Cpu).unwrap();
        // round(0.5·10) = 5, max(1, round(0.12)) = 1, round(2.5) = 2 (half to even), round(6).
        assert_eq!(resolved.area, Some(area(5, 1, 2, 6)));
    }
}
