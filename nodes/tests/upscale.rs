//! Upscale models: ESRGAN RRDBNets in the original, Real-ESRGAN (pixel-unshuffled x2plus) and
//! BSRGAN layouts and Real-ESRGAN's compact network against spandrel's own detection,
//! conversion and network on formula weights (fixture from
//! `fixtures/generate_upscale_models.py`), before and after its clamp; ComfyUI's tiling (a tiled
//! result equal to the untiled one outside the tiles' overlaps); the nodes on the tiny model and
//! on its PyTorch pickle; and files that are not upscale models refused, pickles that would run
//! code among them.

mod common;

use candle_core::{Device, Tensor};
use common::{assert_matches_fixture, floats, formula_unet_file, j, setup, sizes};
use easel_models::testmodels::{tiny_esrgan, TINY_ESRGAN_4X};
use easel_nodes::image::Image;
use easel_nodes::upscale::{load_upscale_model, upscale};
use serde_json::{json, Value as Json};

fn tensor(value: &Json) -> Tensor {
    Tensor::from_vec(floats(&value["values"]), sizes(&value["shape"]), &Device::Cpu).unwrap()
}

/// `tensor` [1, C, H, W] as an IMAGE.
fn image_of(tensor: &Tensor) -> Image {
    let (_, channels, height, width) = tensor.dims4().unwrap();
    let data = tensor
        .permute((0, 2, 3, 1))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    Image::new(1, height, width, channels, data).unwrap()
}

/// An IMAGE as a tensor [1, C, H, W].
fn tensor_of(image: &Image) -> Tensor {
    Tensor::from_vec(
        image.data.clone(),
        (1, image.height, image.width, image.channels),
        &Device::Cpu,
    )
    .unwrap()
    .permute((0, 3, 1, 2))
    .unwrap()
}

#[test]
fn upscale_models_give_spandrels_output() {
    let fixture = common::fixture_json("upscale_models.json");
    let image = tensor(&fixture["image"]);
    let dir = tempfile::tempdir().unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let path = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&path, formula_unet_file(case)).unwrap();
        let (network, _) = load_upscale_model(&path, &Device::Cpu).expect("an upscale model");
        assert_eq!(network.scale() as u64, case["scale"].as_u64().unwrap(), "{name}");
        assert_matches_fixture(
            &format!("{name} raw"),
            &network.unclamped(&image).unwrap(),
            &case["raw"],
        );
        let upscaled = upscale(&network, &image_of(&image), &Device::Cpu).unwrap();
        assert_matches_fixture(name, &tensor_of(&upscaled), &case["output"]);
    }
}

/// An image wider than a tile (512) is upscaled in two overlapping tiles: outside the 32-pixel
/// overlap each output pixel is one tile's, which sees all of its receptive field, so it equals
/// the whole image's; inside, the feathered blend stays close.
#[test]
fn tiles_blend_into_the_untiled_result() {
    let setup = setup();
    let model = common::models_folder(&setup, "upscale_models").join(TINY_ESRGAN_4X);
    let (network, _) = load_upscale_model(&model, &Device::Cpu).unwrap();
    let (height, width) = (12, 600);
    let data = common::pattern_values(height * width * 3, 3, 0.5)
        .iter()
        .map(|v| v + 0.5)
        .collect();
    let image = Image::new(1, height, width, 3, data).unwrap();
    let tiled = tensor_of(&upscale(&network, &image, &Device::Cpu).unwrap());
    let whole = network
        .unclamped(&tensor_of(&image))
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    assert_eq!(tiled.dims(), whole.dims());
    // Tiles start at 0 and 600 − 512 = 88: they overlap on columns 88..512.
    let scale = 4;
    let column = |t: &Tensor, start: usize, count: usize| t.narrow(3, start * scale, count * scale).unwrap();
    let difference = |a: &Tensor, b: &Tensor| common::max_abs_difference(a, b);
    assert!(difference(&column(&tiled, 0, 88), &column(&whole, 0, 88)) < 1e-6);
    assert!(difference(&column(&tiled, 512, 88), &column(&whole, 512, 88)) < 1e-6);
    assert!(difference(&column(&tiled, 88, 424), &column(&whole, 88, 424)) < 1e-2);
}

/// A 6×10 pattern upscaled through UpscaleModelLoader and ImageUpscaleWithModel with the model
/// `file`.
fn upscaled_by_the_nodes(setup: &common::Setup, file: &str) -> Image {
    let model = setup
        .call("UpscaleModelLoader", vec![("model_name", j(json!(file)))])
        .unwrap()
        .remove(0);
    let image = easel_engine::Value::object(common::pattern_image(6, 10, 5));
    let out = setup
        .call(
            "ImageUpscaleWithModel",
            vec![("upscale_model", model), ("image", image)],
        )
        .unwrap();
    out[0].downcast::<Image>().unwrap().clone()
}

#[test]
fn the_nodes_upscale_with_the_tiny_model() {
    let upscaled = upscaled_by_the_nodes(&setup(), TINY_ESRGAN_4X);
    assert_eq!(
        (upscaled.height, upscaled.width, upscaled.channels),
        (24, 40, tiny_esrgan().out_channels)
    );
    assert!(upscaled.data.iter().all(|v| (0.0..=1.0).contains(v)));
}

/// The tiny model saved as a PyTorch pickle the way Real-ESRGAN's releases are (under
/// `params_ema`) with `DataParallel`'s `module.` before every name upscales as its safetensors
/// twin; a pickle that would call a function is refused, not run.
#[test]
fn pickled_upscale_models_upscale_as_their_safetensors_twins() {
    let setup = setup();
    let folder = common::models_folder(&setup, "upscale_models");
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        common::tiny_model_values(&setup, "upscale_models", TINY_ESRGAN_4X)
            .into_iter()
            .map(|(name, shape, values)| (format!("module.{name}"), shape, values))
            .collect();
    let views: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(name, shape, values)| (name.as_str(), shape.as_slice(), values.as_slice()))
        .collect();
    easel_models::testmodels::write_pth(&folder.join("tiny_esrgan.pth"), &views, Some("params_ema")).unwrap();
    common::write_pickle_that_calls_a_function(&folder.join("calls.pth"));

    assert_eq!(
        upscaled_by_the_nodes(&setup, TINY_ESRGAN_4X).data,
        upscaled_by_the_nodes(&setup, "tiny_esrgan.pth").data
    );
    let error = setup
        .call("UpscaleModelLoader", vec![("model_name", j(json!("calls.pth")))])
        .expect_err("refused")
        .to_string();
    assert!(error.contains("holds no tensors Easel can read"), "{error}");
}

#[test]
fn files_that_are_not_upscale_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not_an_upscaler.safetensors");
    let one = 1f32.to_le_bytes();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &one).unwrap();
    safetensors::serialize_to_file([("encoder.weight", view)], None, &path).unwrap();
    let error = load_upscale_model(&path, &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("not an upscale model architecture Easel runs"),
        "{error}"
    );
}

/// An upscale whose output would not fit in memory fails with ComfyUI's `OutOfMemoryError`
/// before allocating it.
#[test]
fn an_upscale_too_large_for_memory_fails_its_prompt() {
    let setup = setup();
    let model = common::models_folder(&setup, "upscale_models").join(TINY_ESRGAN_4X);
    let (network, _) = load_upscale_model(&model, &Device::Cpu).unwrap();
    // 8192² upscaled 4×: 32768² pixels, 36 GiB of output, weights and result.
    let image = Image::filled(1, 8192, 8192, 3, 0.5);
    let Err(easel_engine::NodeError::Failed {
        exception_type,
        message,
    }) = upscale(&network, &image, &Device::Cpu)
    else {
        panic!("an upscale of 32768² was not refused");
    };
    assert_eq!(exception_type, "OutOfMemoryError", "{message}");
}
