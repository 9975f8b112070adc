//! The light-map nodes of the relight route: WAS Node Suite's "Image Blending Mode" equals the
//! suite's node (pilgram on Pillow) level for level in every mode and with partial percentages,
//! and KJNodes' RemapImageRange and RemapMaskRange equal the pack's (fixture from
//! `fixtures/generate_light_map_nodes.py`).

mod common;

use common::{fixture_json, j, pattern_values, setup};
use easel_engine::Value;
use easel_nodes::image::{Image, Mask};
use serde_json::json;

/// The fixture's pattern image of `seed`, values in 0…1.
fn pattern_image(shape: &[usize], seed: i64) -> Image {
    let values = pattern_values(shape.iter().product(), seed, 0.5)
        .into_iter()
        .map(|v| v + 0.5)
        .collect();
    Image::new(shape[0], shape[1], shape[2], shape[3], values).expect("an image")
}

fn shape(fixture: &serde_json::Value) -> Vec<usize> {
    fixture["shape"]
        .as_array()
        .expect("a shape")
        .iter()
        .map(|side| side.as_u64().expect("a side") as usize)
        .collect()
}

#[test]
fn image_blending_mode_equals_the_suites_in_every_mode() {
    let setup = setup();
    let fixture = fixture_json("light_map_nodes.json");
    let shape = shape(&fixture);
    let a = pattern_image(&shape, 3);
    let b = pattern_image(&shape, 4);
    // Four levels only: equal channels, black and white.
    let coarse = Image {
        data: b.data.iter().map(|v| (v * 4.0).floor() / 4.0).collect(),
        ..b.clone()
    };
    for case in fixture["blends"].as_array().expect("blends") {
        let image_b = if case["image_b"] == "pattern" { &b } else { &coarse };
        let blended = setup
            .call(
                "Image Blending Mode",
                vec![
                    ("image_a", Value::object(a.clone())),
                    ("image_b", Value::object(image_b.clone())),
                    ("mode", j(case["mode"].clone())),
                    ("blend_percentage", j(case["blend_percentage"].clone())),
                ],
            )
            .expect("a blend")
            .remove(0);
        let blended = blended.downcast::<Image>().expect("an image");
        let levels: String = blended
            .data
            .iter()
            .map(|v| format!("{:02x}", (v * 255.0).round() as u8))
            .collect();
        let expected = case["levels"].as_str().expect("levels");
        let first_difference = levels
            .as_bytes()
            .chunks(2)
            .zip(expected.as_bytes().chunks(2))
            .position(|(ours, theirs)| ours != theirs);
        assert_eq!(
            first_difference, None,
            "{} at {} with {}: value {:?} differs",
            case["mode"], case["blend_percentage"], case["image_b"], first_difference
        );
    }
}

#[test]
fn image_blending_mode_broadcasts_batches_and_refuses_mismatched_sizes() {
    let setup = setup();
    let a = Image::new(2, 2, 2, 3, (0..24).map(|v| v as f32 / 24.0).collect()).expect("an image");
    let b = Image::filled(1, 2, 2, 3, 0.5);
    let call = |image_b: Image| {
        setup.call(
            "Image Blending Mode",
            vec![
                ("image_a", Value::object(a.clone())),
                ("image_b", Value::object(image_b)),
                ("mode", j(json!("multiply"))),
                ("blend_percentage", j(json!(1.0))),
            ],
        )
    };
    let blended = call(b).expect("a blend").remove(0);
    let blended = blended.downcast::<Image>().expect("an image");
    assert_eq!(blended.batch, 2);
    // The second item multiplied by the one source image: 127/255 of each level, truncated.
    let level = (a.data[12] * 255.0) as u32;
    assert_eq!((blended.data[12] * 255.0).round() as u32, level * 127 / 255);
    let error = call(Image::filled(1, 3, 2, 3, 0.5)).expect_err("sizes differ");
    assert!(error.to_string().contains("images do not match"), "{error}");
}

/// `expected` (at 9 significant digits) equals `ours` to float32 precision.
fn assert_close(ours: &[f32], case: &serde_json::Value, what: &str) {
    let expected = case["first"].as_array().expect("values");
    for (index, (ours, theirs)) in ours.iter().zip(expected).enumerate() {
        let theirs = theirs.as_f64().expect("a value");
        assert!(
            (f64::from(*ours) - theirs).abs() <= 1e-7,
            "{what} {case}: value {index} is {ours}, the pack's {theirs}"
        );
    }
    let sum: f64 = ours.iter().map(|v| f64::from(*v)).sum();
    let expected_sum = case["sum"].as_f64().expect("a sum");
    assert!(
        (sum - expected_sum).abs() < 1e-4,
        "{what} {case}: sum {sum}, the pack's {expected_sum}"
    );
}

#[test]
fn remap_nodes_equal_the_packs() {
    let setup = setup();
    let fixture = fixture_json("light_map_nodes.json");
    let shape = shape(&fixture);
    let a = pattern_image(&shape, 3);
    for case in fixture["remap_image"].as_array().expect("image remaps") {
        let remapped = setup
            .call(
                "RemapImageRange",
                vec![
                    ("image", Value::object(a.clone())),
                    ("min", j(case["min"].clone())),
                    ("max", j(case["max"].clone())),
                    ("clamp", j(case["clamp"].clone())),
                ],
            )
            .expect("a remap")
            .remove(0);
        assert_close(
            &remapped.downcast::<Image>().expect("an image").data,
            case,
            "RemapImageRange",
        );
    }
    // The mask is the red channel at 0.8, so its largest value is below 1.
    let red: Vec<f32> = a.data.iter().step_by(3).map(|v| v * 0.8).collect();
    let mask = Mask {
        batch: shape[0],
        height: shape[1],
        width: shape[2],
        data: red,
    };
    for case in fixture["remap_mask"].as_array().expect("mask remaps") {
        let remapped = setup
            .call(
                "RemapMaskRange",
                vec![
                    ("mask", Value::object(mask.clone())),
                    ("min", j(case["min"].clone())),
                    ("max", j(case["max"].clone())),
                ],
            )
            .expect("a remap")
            .remove(0);
        assert_close(
            &remapped.downcast::<Mask>().expect("a mask").data,
            case,
            "RemapMaskRange",
        );
    }
}
