//! comfyui_controlnet_aux's preprocessors. InpaintPreprocessor: the mask resized bilinearly to
//! the image marks the pixels over 0.5 with -1 (0 for xinsir's ControlNet); shapes the pack
//! cannot index fail with its error. DepthAnythingV2Preprocessor and the OpenCV resizes it
//! relies on, against the pack's own code (fixture from `fixtures/generate_controlnet_aux.py`).

mod common;

use candle_core::Device;
use common::{f32_values, fixture_json, formula_unet_file, j, pattern_values, setup, sizes, Setup};
use easel_engine::Value;
use easel_models::testmodels::write_pth;
use easel_models::weights::{SafetensorsFile, TensorShapes};
use easel_nodes::image::{to_u8, Image, Mask};
use easel_nodes::packs::controlnet_aux::opencv::{canny_u8, resize_area_u8, resize_cubic_f64, resize_cubic_u8, Pixels};
use easel_nodes::packs::controlnet_aux::{load_depth_anything_v2, relative_depth};
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};

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

/// The fixture's pattern as the values `(pattern + 1) / 2` of an image or f64 pixels.
fn unit_pattern(count: usize, seed: i64) -> Vec<f32> {
    pattern_values(count, seed, 0.5).iter().map(|v| v + 0.5).collect()
}

fn usize_of(case: &Json, key: &str) -> usize {
    case[key].as_u64().expect("a size") as usize
}

#[test]
fn opencv_resizes_match_cv2() {
    let fixture = fixture_json("controlnet_aux.json");
    for case in fixture["resizes"].as_array().expect("resizes") {
        let (channels, height, width) = (
            usize_of(case, "channels"),
            usize_of(case, "height"),
            usize_of(case, "width"),
        );
        let (to_height, to_width) = (usize_of(case, "to_height"), usize_of(case, "to_width"));
        let values = unit_pattern(height * width * channels, case["seed"].as_i64().unwrap());
        let expected: Vec<f64> = case["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got: Vec<f64> = if case["dtype"] == "f64" {
            let source = Pixels {
                height,
                width,
                channels,
                data: values.iter().map(|&v| f64::from(v)).collect(),
            };
            resize_cubic_f64(&source, to_height, to_width).data
        } else {
            let source = Pixels {
                height,
                width,
                channels,
                data: values.iter().map(|&v| (v * 255.0) as u8).collect(),
            };
            let out = if case["method"] == "cubic" {
                resize_cubic_u8(&source, to_height, to_width)
            } else {
                resize_area_u8(&source, to_height, to_width)
            };
            out.data.iter().map(|&v| f64::from(v)).collect()
        };
        assert_eq!(got.len(), expected.len(), "{case}");
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let tolerance = if case["dtype"] == "f64" { 1e-12 } else { 0.0 };
        assert!(
            worst <= tolerance,
            "{} {}: differs by {worst}",
            case["dtype"],
            case["method"]
        );
    }
}

/// A setup whose models folder holds the fixture's Depth Anything V2, as the ViT-S checkpoint
/// (safetensors in `models/depthanything`, or the pack's `.pth` in its download folder).
fn depth_setup(fixture: &Json, as_pth: bool) -> Setup {
    let setup = setup();
    let paths = setup.services.get::<Paths>().expect("paths");
    let bytes = formula_unet_file(fixture);
    if as_pth {
        let folder = paths
            .base
            .join("custom_nodes/comfyui_controlnet_aux/ckpts/depth-anything/Depth-Anything-V2-Small");
        std::fs::create_dir_all(&folder).unwrap();
        let staged = folder.join("weights.safetensors");
        std::fs::write(&staged, &bytes).unwrap();
        let file = SafetensorsFile::open(&staged).unwrap();
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = file
            .tensor_names()
            .map(|name| {
                let tensor =
                    easel_models::weights::MappedWeights::load(&file, name, candle_core::DType::F32, &Device::Cpu)
                        .unwrap();
                (
                    name.to_string(),
                    tensor.dims().to_vec(),
                    tensor.flatten_all().unwrap().to_vec1().unwrap(),
                )
            })
            .collect();
        let views: Vec<(&str, &[usize], &[f32])> = tensors
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
            .collect();
        write_pth(&folder.join("depth_anything_v2_vits.pth"), &views, None).unwrap();
        std::fs::remove_file(staged).unwrap();
    } else {
        let folder = paths.models.join("depthanything");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("depth_anything_v2_vits.safetensors"), bytes).unwrap();
    }
    setup
}

fn case_image(case: &Json) -> Image {
    let (batch, height, width) = (
        usize_of(case, "batch"),
        usize_of(case, "height"),
        usize_of(case, "width"),
    );
    let data = unit_pattern(batch * height * width * 3, case["seed"].as_i64().unwrap());
    Image::new(batch, height, width, 3, data).unwrap()
}

#[test]
fn depth_anything_v2_estimates_the_packs_depth() {
    let fixture = fixture_json("controlnet_aux.json");
    let setup = depth_setup(&fixture, false);
    let paths = setup.services.get::<Paths>().unwrap();
    let path = paths.models.join("depthanything/depth_anything_v2_vits.safetensors");
    let model = load_depth_anything_v2(&path, &Device::Cpu).expect("model");
    for case in fixture["cases"].as_array().unwrap() {
        let image = case_image(case);
        let expected = f32_values(&case["depth"]);
        let per_image = image.height * image.width;
        for index in 0..image.batch {
            let pixels = Pixels {
                height: image.height,
                width: image.width,
                channels: 3,
                data: image.data[index * per_image * 3..(index + 1) * per_image * 3]
                    .iter()
                    .map(|&v| to_u8(v))
                    .collect(),
            };
            let depth = relative_depth(&model, &pixels, &Device::Cpu).expect("depth");
            let expected = &expected[index * per_image..(index + 1) * per_image];
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = depth
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * scale,
                "{}x{}: differs by {worst} (depth up to {scale})",
                image.height,
                image.width
            );
        }
    }
}

#[test]
fn depth_anything_v2_preprocessor_matches_the_pack() {
    let fixture = fixture_json("controlnet_aux.json");
    for as_pth in [false, true] {
        let setup = depth_setup(&fixture, as_pth);
        for case in fixture["cases"].as_array().unwrap() {
            let out = setup
                .call(
                    "DepthAnythingV2Preprocessor",
                    vec![
                        ("image", Value::object(case_image(case))),
                        ("ckpt_name", j(json!("depth_anything_v2_vits.pth"))),
                        ("resolution", j(case["resolution"].clone())),
                    ],
                )
                .expect("DepthAnythingV2Preprocessor");
            let out = out[0].downcast::<Image>().unwrap();
            assert_eq!(
                vec![out.batch, out.height, out.width, out.channels],
                sizes(&case["output_shape"])
            );
            let expected = levels(&case["output_levels"]);
            let mut off = 0;
            for (pixel, &level) in out.data.chunks_exact(3).zip(&expected) {
                assert!(pixel[0] == pixel[1] && pixel[1] == pixel[2], "grey");
                let got = (pixel[0] * 255.0).round() as i32;
                assert!((got - i32::from(level)).abs() <= 1, "level {got}, the pack's {level}");
                off += usize::from(got != i32::from(level));
            }
            // Float rounding may move a level across a truncation boundary; rarely.
            assert!(off * 100 <= expected.len(), "{off} of {} levels differ", expected.len());
        }
    }
}

#[test]
fn depth_anything_v2_says_where_its_checkpoint_goes() {
    let setup = setup();
    let image = Image::new(1, 8, 8, 3, vec![0.5; 8 * 8 * 3]).unwrap();
    let error = setup
        .call(
            "DepthAnythingV2Preprocessor",
            vec![
                ("image", Value::object(image)),
                ("ckpt_name", j(json!("depth_anything_v2_vitl.pth"))),
            ],
        )
        .expect_err("no checkpoint")
        .to_string();
    assert!(error.contains("depth_anything_v2_vitl.safetensors"), "{error}");
    assert!(error.contains("depthanything"), "{error}");
}

fn levels(value: &Json) -> Vec<u8> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect()
}

#[test]
fn canny_matches_cv2() {
    let fixture = fixture_json("controlnet_aux.json");
    for case in fixture["canny"].as_array().expect("canny") {
        let pixels = Pixels {
            height: usize_of(case, "height"),
            width: usize_of(case, "width"),
            channels: usize_of(case, "channels"),
            data: levels(&case["levels"]),
        };
        let low = case["low"].as_i64().unwrap() as i32;
        let high = case["high"].as_i64().unwrap() as i32;
        let edges = canny_u8(&pixels, low, high);
        let expected = levels(&case["output"]);
        let differ = edges.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{}x{}x{} at {low}/{high}",
            pixels.height, pixels.width, pixels.channels
        );
    }
}

#[test]
fn canny_edge_and_aio_preprocessors_match_the_pack() {
    let fixture = fixture_json("controlnet_aux.json");
    let setup = setup();
    for case in fixture["canny_nodes"].as_array().expect("canny nodes") {
        let (batch, height, width) = (
            usize_of(case, "batch"),
            usize_of(case, "height"),
            usize_of(case, "width"),
        );
        let data = levels(&case["levels"])
            .iter()
            .map(|&level| f32::from(level) / 255.0)
            .collect();
        let image = Value::object(Image::new(batch, height, width, 3, data).unwrap());
        let out = setup
            .call(
                "CannyEdgePreprocessor",
                vec![
                    ("image", image.clone()),
                    ("low_threshold", j(case["low"].clone())),
                    ("high_threshold", j(case["high"].clone())),
                    ("resolution", j(case["resolution"].clone())),
                ],
            )
            .expect("CannyEdgePreprocessor");
        let out = out[0].downcast::<Image>().unwrap();
        assert_eq!(
            vec![out.batch, out.height, out.width, out.channels],
            sizes(&case["output_shape"])
        );
        let got: Vec<u8> = out
            .data
            .chunks_exact(3)
            .map(|pixel| (pixel[0] * 255.0).round() as u8)
            .collect();
        assert_eq!(
            got,
            levels(&case["output_levels"]),
            "{height}x{width} at {}",
            case["resolution"]
        );
        // AIO_Preprocessor runs it with its defaults (100 and 200).
        if case["low"] == 100 && case["high"] == 200 {
            let aio = setup
                .call(
                    "AIO_Preprocessor",
                    vec![
                        ("image", image.clone()),
                        ("preprocessor", j(json!("CannyEdgePreprocessor"))),
                        ("resolution", j(case["resolution"].clone())),
                    ],
                )
                .expect("AIO_Preprocessor");
            assert_eq!(aio[0].downcast::<Image>().unwrap().data, out.data);
        }
        let none = setup
            .call(
                "AIO_Preprocessor",
                vec![("image", image.clone()), ("preprocessor", j(json!("none")))],
            )
            .expect("AIO_Preprocessor none");
        assert_eq!(
            none[0].downcast::<Image>().unwrap().data,
            image.downcast::<Image>().unwrap().data
        );
    }
}
