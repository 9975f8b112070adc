//! Acly's comfyui-inpaint-nodes: INPAINT_MaskedFill (neutral), INPAINT_MaskedBlur,
//! INPAINT_DenoiseToCompositingMask, INPAINT_ExpandMask and INPAINT_ShrinkMask equal the pack's
//! own nodes (1.4.2 on kornia 0.9, fixture from `fixtures/generate_inpaint_nodes.py`) on a
//! patterned image and a mask with whole, empty and partial areas, errors included; OpenCV's
//! fills are refused by name; INPAINT_VAEEncodeInpaintConditioning gives InpaintModelConditioning's
//! outputs and the greyed-out image's latent with the rounded mask.

mod common;

use common::{fixture_json, floats, j, max_abs_difference, sd1_inputs, setup, sizes};
use easel_engine::Value;
use easel_nodes::conditioning::Conditioning;
use easel_nodes::image::{Image, Mask};
use easel_nodes::latent::Latent;
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

#[test]
fn vae_encode_inpaint_conditioning_adds_the_greyed_images_latent_to_inpaint_model_conditioning() {
    let setup = setup();
    let (loaded, positive, negative, _) = sd1_inputs(&setup, 1);
    let image = Value::object(common::pattern_image(64, 64, 3));
    // A soft-edged square: values of 0.5 exactly round to 0 (half to even).
    let mut mask = Mask::filled(1, 64, 64, 0.0);
    for y in 16..48 {
        for x in 16..48 {
            let edge = y == 16 || y == 47 || x == 16 || x == 47;
            mask.data[y * 64 + x] = if edge { 0.5 } else { 1.0 };
        }
    }
    let inputs = || {
        vec![
            ("positive", positive.clone()),
            ("negative", negative.clone()),
            ("vae", loaded[2].clone()),
            ("pixels", image.clone()),
            ("mask", Value::object(mask.clone())),
        ]
    };
    let pack = setup
        .call("INPAINT_VAEEncodeInpaintConditioning", inputs())
        .expect("the pack's node");
    let mut core_inputs = inputs();
    core_inputs.push(("noise_mask", j(json!(true))));
    let core = setup
        .call("InpaintModelConditioning", core_inputs)
        .expect("InpaintModelConditioning");

    let latent = |value: &Value| value.downcast::<Latent>().expect("a latent").clone();
    let (samples, expected) = (latent(&pack[3]), latent(&core[2]));
    assert_eq!(max_abs_difference(&samples.samples, &expected.samples), 0.0);
    assert_eq!(samples.noise_mask, expected.noise_mask);
    let concat = |value: &Value| {
        let conditioning = value.downcast::<Conditioning>().expect("conditioning");
        conditioning.0[0].concat_image.clone().expect("a concat image")
    };
    for (pack_side, core_side) in [(&pack[0], &core[0]), (&pack[1], &core[1])] {
        assert_eq!(
            max_abs_difference(&concat(pack_side).latent, &concat(core_side).latent),
            0.0
        );
    }
    let inpaint = latent(&pack[2]);
    assert_eq!(max_abs_difference(&inpaint.samples, &concat(&core[0]).latent), 0.0);
    let rounded = inpaint.noise_mask.expect("a noise mask");
    let resized = expected.noise_mask.expect("a noise mask");
    assert!(rounded.data.iter().all(|v| *v == 0.0 || *v == 1.0));
    for (r, v) in rounded.data.iter().zip(&resized.data) {
        assert_eq!(*r, v.round_ties_even());
    }
    assert!(resized.data.contains(&0.5), "the edge stays at 0.5 through the resize");
}
