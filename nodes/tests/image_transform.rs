//! ComfyUI's image transform and batch nodes of `nodes_images.py`: rotation and flips as
//! `torch.rot90(image, k, dims=[2, 1])` and `torch.flip` lay pixels out, batch repeats and slices,
//! the longer side scaled to a size, and ImageAddNoise's torch noise.

use easel_engine::{call_standalone, NodeInputs, Services, Value};
use easel_models::sampling::noise::CpuGenerator;
use easel_nodes::builtin_registry;
use easel_nodes::image::Image;
use serde_json::json;

fn run(class: &str, image: &Image, inputs: serde_json::Value) -> Image {
    let registry = builtin_registry();
    let mut values: Vec<(String, Value)> = vec![("image".into(), Value::object(image.clone()))];
    for (name, value) in inputs.as_object().unwrap() {
        values.push((name.clone(), Value::Json(value.clone())));
    }
    let inputs = NodeInputs::new(values.into_iter().collect());
    let output = call_standalone(registry.get(class).unwrap().as_ref(), &Services::new(), &inputs).unwrap();
    output.outputs[0].downcast::<Image>().unwrap().clone()
}

/// `[[1, 2, 3], [4, 5, 6]]` as a one-channel image.
fn two_by_three() -> Image {
    Image::new(1, 2, 3, 1, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap()
}

fn rows(image: &Image) -> (usize, usize, Vec<f32>) {
    (image.height, image.width, image.data.clone())
}

#[test]
fn rotations_and_flips_lay_pixels_out_as_torch_does() {
    let image = two_by_three();
    let rotated = |rotation: &str| rows(&run("ImageRotate", &image, json!({"rotation": rotation})));
    assert_eq!(rotated("90 degrees"), (3, 2, vec![4.0, 1.0, 5.0, 2.0, 6.0, 3.0]));
    assert_eq!(rotated("180 degrees"), (2, 3, vec![6.0, 5.0, 4.0, 3.0, 2.0, 1.0]));
    assert_eq!(rotated("270 degrees"), (3, 2, vec![3.0, 6.0, 2.0, 5.0, 1.0, 4.0]));
    assert_eq!(rotated("none"), (2, 3, image.data.clone()));
    let flipped = |method: &str| rows(&run("ImageFlip", &image, json!({"flip_method": method})));
    assert_eq!(
        flipped("x-axis: vertically"),
        (2, 3, vec![4.0, 5.0, 6.0, 1.0, 2.0, 3.0])
    );
    assert_eq!(
        flipped("y-axis: horizontally"),
        (2, 3, vec![3.0, 2.0, 1.0, 6.0, 5.0, 4.0])
    );
}

#[test]
fn batches_repeat_and_slice_within_bounds() {
    let batch = Image::new(3, 1, 1, 1, vec![1.0, 2.0, 3.0]).unwrap();
    let repeated = run("RepeatImageBatch", &batch, json!({"amount": 2}));
    assert_eq!((repeated.batch, repeated.data), (6, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]));
    let slice = |index: i64, length: i64| {
        run(
            "ImageFromBatch",
            &batch,
            json!({"batch_index": index, "length": length}),
        )
        .data
    };
    assert_eq!(slice(1, 1), vec![2.0]);
    assert_eq!(slice(1, 10), vec![2.0, 3.0]);
    assert_eq!(slice(7, 2), vec![3.0], "an index past the end takes the last image");
}

#[test]
fn the_longer_side_is_scaled_to_the_largest_size_rounding_half_to_even() {
    let image = Image::filled(1, 10, 25, 3, 0.5);
    let scaled = run(
        "ImageScaleToMaxDimension",
        &image,
        json!({"upscale_method": "bilinear", "largest_size": 5}),
    );
    // 10 / 25 · 5 = 2.0; Python's round keeps 2.
    assert_eq!((scaled.height, scaled.width), (2, 5));
    let tall = Image::filled(1, 20, 5, 3, 0.5);
    let scaled = run(
        "ImageScaleToMaxDimension",
        &tall,
        json!({"upscale_method": "area", "largest_size": 10}),
    );
    // 5 / 20 · 10 = 2.5 rounds to 2, as Python's round does.
    assert_eq!((scaled.height, scaled.width), (10, 2));
}

#[test]
fn noise_is_torchs_randn_for_the_seed_added_and_clipped() {
    let image = Image::new(1, 4, 4, 3, (0..48).map(|i| i as f32 / 47.0).collect()).unwrap();
    let noisy = run(
        "ImageAddNoise",
        &image,
        json!({"seed": 42u64 + (1u64 << 40), "strength": 0.3}),
    );
    let noise = CpuGenerator::new(42).randn(48);
    let expected: Vec<f32> = image
        .data
        .iter()
        .zip(&noise)
        .map(|(&value, &noise)| (value + 0.3f32 * noise).clamp(0.0, 1.0))
        .collect();
    assert_eq!(noisy.data, expected);
    assert!(
        noisy.data.contains(&0.0) && noisy.data.contains(&1.0),
        "some values were clipped"
    );
}
