//! ComfyUI's `tiled_scale`: a position-independent function gives the same result tiled as
//! whole (the feathered weights sum out), and bad tile geometry is an error, not a hang.

use candle_core::{Device, Result, Tensor};
use easel_models::tiling::{tiled_scale, Tiling};

mod common;

use common::max_abs_difference;

/// Doubles each side by nearest-neighbour repetition and scales the values: the same whether
/// applied to a tile or to the whole.
fn double(tile: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = tile.dims4()?;
    tile.upsample_nearest2d(h * 2, w * 2)? * 3.0
}

#[test]
fn tiles_blend_back_to_the_whole_result() {
    let input = Tensor::randn(0f32, 1.0, (2, 3, 37, 50), &Device::Cpu).unwrap();
    let whole = double(&input).unwrap();
    for (tile_height, tile_width, overlap) in [(16, 16, 4), (8, 32, 2), (40, 12, 0), (64, 64, 8)] {
        let tiling = Tiling {
            tile_height,
            tile_width,
            overlap,
            scale: 2.0,
        };
        let tiled = tiled_scale(&input, &mut double, tiling, 3).unwrap();
        assert_eq!(tiled.dims(), whole.dims());
        let worst = max_abs_difference(&tiled, &whole);
        assert!(worst < 1e-5, "{tile_height}×{tile_width}/{overlap}: {worst}");
    }
}

#[test]
fn downscaling_functions_round_positions_like_comfyui() {
    let input = Tensor::randn(0f32, 1.0, (1, 3, 40, 24), &Device::Cpu).unwrap();
    let mut halve = |tile: &Tensor| -> Result<Tensor> {
        let (_, _, h, w) = tile.dims4()?;
        tile.interpolate2d(h / 2, w / 2)
    };
    let tiling = Tiling {
        tile_height: 16,
        tile_width: 16,
        overlap: 8,
        scale: 0.5,
    };
    let tiled = tiled_scale(&input, &mut halve, tiling, 3).unwrap();
    assert_eq!(tiled.dims(), &[1, 3, 20, 12]);
}

#[test]
fn an_overlap_as_large_as_the_tile_is_an_error() {
    let input = Tensor::zeros((1, 3, 40, 40), candle_core::DType::F32, &Device::Cpu).unwrap();
    let tiling = Tiling {
        tile_height: 16,
        tile_width: 16,
        overlap: 16,
        scale: 2.0,
    };
    let error = tiled_scale(&input, &mut double, tiling, 3).unwrap_err();
    assert!(error.to_string().contains("must be larger than the overlap"), "{error}");
}
