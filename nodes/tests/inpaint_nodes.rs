//! Acly's comfyui-inpaint-nodes: INPAINT_MaskedFill (neutral), INPAINT_MaskedBlur,
//! INPAINT_DenoiseToCompositingMask, INPAINT_ExpandMask and INPAINT_ShrinkMask equal the pack's
//! own nodes (1.4.2 on kornia 0.9, fixture from `fixtures/generate_inpaint_nodes.py`) on a
//! patterned image and a mask with whole, empty and partial areas, errors included; OpenCV's
//! fills are refused by name.

mod common;

use common::{fixture_json, floats, j, setup, sizes};
use easel_engine::Value;
use easel_nodes::image::{Image, Mask};
use serde_json::{json, Value as Json};

/// The fixture's image [B, H, W, C].
fn image(value: &Json) -> Image {
    let shape = sizes(&value["shape"]);
    Image::new(shape[0], shape[1], shape[2], shape[3], floats(&value["values"])).expect("an image")
}

/// The fixture's mask [B, H, W].
fn mask(value: &Json) -> Mask {
    let shape = sizes(&value["shape"]);
    Mask {
        batch: shape[0],
        height: shape[1],
        width: shape[2],
        data: floats(&value["values"]),
    }
}

#[test]
fn the_mask_and_fill_nodes_equal_the_packs() {
    let setup = setup();
    let fixture = fixture_json("inpaint_nodes.json");
    let (image, mask) = (image(&fixture["image"]), mask(&fixture["mask"]));
    for case in fixture["cases"].as_array().expect("cases") {
        let node = format!("INPAINT_{}", case["node"].as_str().expect("a node"));
        let mut inputs = vec![("mask", Value::object(mask.clone()))];
        if matches!(node.as_str(), "INPAINT_MaskedFill" | "INPAINT_MaskedBlur") {
            inputs.push(("image", Value::object(image.clone())));
        }
        for (name, value) in case["inputs"].as_object().expect("inputs") {
            inputs.push((name.as_str(), j(value.clone())));
        }
        let label = format!("{node} {}", case["inputs"]);
        let result = setup.call(&node, inputs);
        if let Some(expected) = case.get("error") {
            let error = result.err().unwrap_or_else(|| panic!("{label}: not refused"));
            let easel_engine::NodeError::Failed {
                exception_type,
                message,
            } = error
            else {
                panic!("{label}: {error}");
            };
            assert_eq!(
                format!("{exception_type}: {message}"),
                expected.as_str().unwrap(),
                "{label}"
            );
            continue;
        }
        let output = result.unwrap_or_else(|error| panic!("{label}: {error}")).remove(0);
        let (shape, values) = match (output.downcast::<Image>(), output.downcast::<Mask>()) {
            (Some(image), _) => (
                vec![image.batch, image.height, image.width, image.channels],
                image.data.clone(),
            ),
            (_, Some(mask)) => (vec![mask.batch, mask.height, mask.width], mask.data.clone()),
            _ => panic!("{label}: neither an image nor a mask"),
        };
        assert_eq!(shape, sizes(&case["output"]["shape"]), "{label}");
        let expected = floats(&case["output"]["values"]);
        let difference = values
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(difference < 1e-5, "{label}: off by {difference}");
    }
}

#[test]
fn opencv_fills_are_refused_by_name() {
    let setup = setup();
    let image = Image::filled(1, 8, 8, 3, 0.25);
    let mask = Mask::filled(1, 8, 8, 1.0);
    let error = setup
        .call(
            "INPAINT_MaskedFill",
            vec![
                ("image", Value::object(image)),
                ("mask", Value::object(mask)),
                ("fill", j(json!("telea"))),
                ("falloff", j(json!(0))),
            ],
        )
        .expect_err("refused")
        .to_string();
    assert!(error.contains("`telea` fill"), "{error}");
}
