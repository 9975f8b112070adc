//! comfyui_controlnet_aux's InpaintPreprocessor: the mask resized bilinearly to the image marks
//! the pixels over 0.5 with -1 (0 for xinsir's ControlNet); shapes the pack cannot index fail
//! with its error.

mod common;

use common::{j, setup};
use easel_engine::Value;
use easel_nodes::image::{Image, Mask};
use serde_json::json;

fn image(batch: usize, channels: usize) -> Image {
    let data = (0..batch * 4 * 6 * channels).map(|i| (i % 17) as f32 / 17.0).collect();
    Image::new(batch, 4, 6, channels, data).unwrap()
}

#[test]
fn inpaint_preprocessor_marks_the_masked_pixels() {
    let setup = setup();
    let preprocess = |image: &Image, mask: &Mask, black: Option<bool>| {
        let mut inputs = vec![
            ("image", Value::object(image.clone())),
            ("mask", Value::object(mask.clone())),
        ];
        if let Some(black) = black {
            inputs.push(("black_pixel_for_xinsir_cn", j(json!(black))));
        }
        setup.call("InpaintPreprocessor", inputs)
    };
    // A mask of the image's size: the pixels over 0.5 are marked, 0.5 itself is not.
    let source = image(1, 3);
    let values: Vec<f32> = (0..24).map(|i| [0.0, 0.5, 0.51, 1.0][i % 4]).collect();
    let mask = Mask {
        batch: 1,
        height: 4,
        width: 6,
        data: values.clone(),
    };
    for (black, marker) in [(None, -1.0), (Some(false), -1.0), (Some(true), 0.0)] {
        let out = preprocess(&source, &mask, black).expect("InpaintPreprocessor");
        let out = out[0].downcast::<Image>().unwrap();
        assert_eq!((out.height, out.width, out.channels), (4, 6, 3));
        for (pixel, m) in values.iter().enumerate() {
            let got = &out.data[pixel * 3..pixel * 3 + 3];
            let original = &source.data[pixel * 3..pixel * 3 + 3];
            if *m > 0.5 {
                assert_eq!(got, &[marker; 3], "pixel {pixel}");
            } else {
                assert_eq!(got, original, "pixel {pixel}");
            }
        }
    }
    // A mask of another size is resized: its left half masked marks the image's left half.
    let half = Mask {
        batch: 1,
        height: 2,
        width: 2,
        data: vec![1.0, 0.0, 1.0, 0.0],
    };
    let out = preprocess(&source, &half, None).expect("InpaintPreprocessor");
    let out = out[0].downcast::<Image>().unwrap();
    for row in 0..4 {
        for column in 0..6 {
            let marked = out.data[(row * 6 + column) * 3] == -1.0;
            assert_eq!(marked, column < 3, "row {row} column {column}");
        }
    }
    // The pack's indexing needs one mask per image and RGB images.
    for (image, mask) in [(image(2, 3), mask.clone()), (image(1, 4), mask.clone())] {
        let error = preprocess(&image, &mask, None).expect_err("refused").to_string();
        assert!(
            error.contains("does not match the shape of the indexed tensor"),
            "{error}"
        );
    }
}
