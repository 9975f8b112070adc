//! The latent transform and compositing nodes on small hand-made latents, against results worked
//! out from ComfyUI's code (`torch.rot90(x, k, dims=[3, 2])`, its crop clamps and feathering).

mod common;

use candle_core::{Device, Tensor};
use common::{flat, j, setup, Setup};
use easel_engine::Value;
use easel_nodes::latent::Latent;
use serde_json::json;

fn latent(values: Vec<f32>, shape: (usize, usize, usize, usize)) -> Value {
    Value::object(Latent::new(Tensor::from_vec(values, shape, &Device::Cpu).unwrap()))
}

fn run(setup: &Setup, class: &str, inputs: Vec<(&str, Value)>) -> Tensor {
    let out = setup.call(class, inputs).unwrap();
    out[0].downcast::<Latent>().unwrap().samples.clone()
}

#[test]
fn flips_and_rotations_move_values_as_torch_does() {
    let setup = setup();
    // [[0, 1, 2], [3, 4, 5]]
    let source = latent((0..6).map(|v| v as f32).collect(), (1, 1, 2, 3));
    let flip = |method: &str| {
        run(
            &setup,
            "LatentFlip",
            vec![("samples", source.clone()), ("flip_method", j(json!(method)))],
        )
    };
    assert_eq!(flat(&flip("x-axis: vertically")), vec![3.0, 4.0, 5.0, 0.0, 1.0, 2.0]);
    assert_eq!(flat(&flip("y-axis: horizontally")), vec![2.0, 1.0, 0.0, 5.0, 4.0, 3.0]);
    let rotate = |rotation: &str| {
        run(
            &setup,
            "LatentRotate",
            vec![("samples", source.clone()), ("rotation", j(json!(rotation)))],
        )
    };
    let quarter = rotate("90 degrees");
    assert_eq!(quarter.dims(), &[1, 1, 3, 2]);
    assert_eq!(flat(&quarter), vec![3.0, 0.0, 4.0, 1.0, 5.0, 2.0]);
    assert_eq!(flat(&rotate("180 degrees")), vec![5.0, 4.0, 3.0, 2.0, 1.0, 0.0]);
    assert_eq!(flat(&rotate("270 degrees")), vec![2.0, 5.0, 1.0, 4.0, 0.0, 3.0]);
    assert_eq!(flat(&rotate("none")), (0..6).map(|v| v as f32).collect::<Vec<_>>());
}

#[test]
fn crops_stay_eight_latent_pixels_inside() {
    let setup = setup();
    let source = latent((0..256).map(|v| v as f32).collect(), (1, 1, 16, 16));
    let cropped = run(
        &setup,
        "LatentCrop",
        vec![
            ("samples", source),
            ("width", j(json!(64))),
            ("height", j(json!(64))),
            ("x", j(json!(120))),
            ("y", j(json!(8))),
        ],
    );
    assert_eq!(cropped.dims(), &[1, 1, 8, 8]);
    // x 120/8 = 15 is moved back to 16 − 8; y = 1.
    let expected: Vec<f32> = (1..9)
        .flat_map(|row| (8..16).map(move |col| (row * 16 + col) as f32))
        .collect();
    assert_eq!(flat(&cropped), expected);
}

#[test]
fn composites_paste_and_feather_inner_edges() {
    let setup = setup();
    let to = latent(vec![0.0; 64], (1, 1, 8, 8));
    let from = latent(vec![1.0; 16], (1, 1, 4, 4));
    let paste = |feather: i64| {
        flat(&run(
            &setup,
            "LatentComposite",
            vec![
                ("samples_to", to.clone()),
                ("samples_from", from.clone()),
                ("x", j(json!(16))),
                ("y", j(json!(0))),
                ("feather", j(json!(feather))),
            ],
        ))
    };
    let at = |values: &[f32], row: usize, col: usize| values[row * 8 + col];
    let sharp = paste(0);
    for row in 0..8 {
        for col in 0..8 {
            let inside = row < 4 && (2..6).contains(&col);
            assert_eq!(at(&sharp, row, col), if inside { 1.0 } else { 0.0 });
        }
    }
    // Feather 16 px = 2 latent pixels: no fade along the top border (y = 0); the bottom row and
    // the outer columns at half, the ones inside them at full.
    let feathered = paste(16);
    let (rows, cols) = ([1.0, 1.0, 1.0, 0.5], [0.5, 1.0, 1.0, 0.5]);
    for (row, row_factor) in rows.iter().enumerate() {
        for (col, col_factor) in cols.iter().enumerate() {
            assert_eq!(at(&feathered, row, col + 2), row_factor * col_factor, "({row}, {col})");
        }
    }
}

#[test]
fn blends_weigh_the_first_latent_by_the_factor() {
    let setup = setup();
    let first = latent(vec![2.0; 64], (1, 1, 8, 8));
    let blend = |second: Value| {
        run(
            &setup,
            "LatentBlend",
            vec![
                ("samples1", first.clone()),
                ("samples2", second),
                ("blend_factor", j(json!(0.25))),
            ],
        )
    };
    assert!(flat(&blend(latent(vec![4.0; 64], (1, 1, 8, 8))))
        .iter()
        .all(|v| *v == 3.5));
    // Another size is resized to the first's before blending.
    let resized = blend(latent(vec![4.0; 16], (1, 1, 4, 4)));
    assert_eq!(resized.dims(), &[1, 1, 8, 8]);
    assert!(flat(&resized).iter().all(|v| (v - 3.5).abs() < 1e-5));
}

#[test]
fn masked_composites_paste_through_the_mask_in_latent_pixels() {
    let setup = setup();
    let destination = latent(vec![0.0; 64], (1, 1, 8, 8));
    let source = latent(vec![2.0; 16], (1, 1, 4, 4));
    // A 4×4 mask, already the source's size: its left half.
    let mask = easel_nodes::image::Mask {
        batch: 1,
        height: 4,
        width: 4,
        data: (0..16).map(|i| if i % 4 < 2 { 1.0 } else { 0.0 }).collect(),
    };
    let paste = |x: i64, with_mask: bool| {
        let mut inputs = vec![
            ("destination", destination.clone()),
            ("source", source.clone()),
            ("x", j(json!(x))),
            ("y", j(json!(8))),
            ("resize_source", j(json!(false))),
        ];
        if with_mask {
            inputs.push(("mask", Value::object(mask.clone())));
        }
        flat(&run(&setup, "LatentCompositeMasked", inputs))
    };
    // x 16 → column 2, y 8 → row 1.
    let masked = paste(16, true);
    for row in 0..8 {
        for col in 0..8 {
            let inside = (1..5).contains(&row) && (2..4).contains(&col);
            assert_eq!(masked[row * 8 + col], if inside { 2.0 } else { 0.0 }, "({row}, {col})");
        }
    }
    let whole = paste(16, false);
    assert_eq!(whole.iter().filter(|v| **v == 2.0).count(), 16);
    // Past the right edge nothing is pasted.
    assert!(paste(1000, false).iter().all(|v| *v == 0.0));
}

/// LatentAdd and LatentSubtract bring the second latent to the first's shape (bilinear with a
/// centre crop, then its batch repeated or cut) before combining; LatentMultiply scales in float32.
#[test]
fn latent_arithmetic_reshapes_the_second_latent_to_the_first() {
    let setup = setup();
    let first = latent(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], (2, 1, 2, 2));
    let second = latent(vec![10.0, 20.0, 30.0, 40.0], (1, 1, 2, 2));
    let added = run(
        &setup,
        "LatentAdd",
        vec![("samples1", first.clone()), ("samples2", second.clone())],
    );
    assert_eq!(flat(&added), [11.0, 22.0, 33.0, 44.0, 15.0, 26.0, 37.0, 48.0]);
    let subtracted = run(
        &setup,
        "LatentSubtract",
        vec![("samples1", first.clone()), ("samples2", second)],
    );
    assert_eq!(
        flat(&subtracted),
        [-9.0, -18.0, -27.0, -36.0, -5.0, -14.0, -23.0, -32.0]
    );
    // A constant latent of another size stays constant when resized; the batch of three is cut.
    let other_size = latent(vec![0.5; 3 * 16], (3, 1, 4, 4));
    let added = run(
        &setup,
        "LatentAdd",
        vec![("samples1", first.clone()), ("samples2", other_size)],
    );
    assert_eq!(flat(&added), [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5]);
    let scaled = run(
        &setup,
        "LatentMultiply",
        vec![("samples", first), ("multiplier", j(json!(0.1)))],
    );
    let expected: Vec<f32> = (1..=8).map(|v| v as f32 * 0.1f32).collect();
    assert_eq!(flat(&scaled), expected);
}

/// LatentBatch appends the second batch with both batches' indices; LatentBatchSeedBehavior
/// fixes every index to the first or drops them; LatentCut takes a range along x, y or t, kept
/// within the latent (a negative index counts from the end).
#[test]
fn latent_batches_join_fix_their_seeds_and_cut() {
    let setup = setup();
    let first = latent((0..8).map(|v| v as f32).collect(), (2, 1, 2, 2));
    let second = latent(vec![9.0; 4], (1, 1, 2, 2));
    let out = setup
        .call("LatentBatch", vec![("samples1", first.clone()), ("samples2", second)])
        .unwrap();
    let joined = out[0].downcast::<Latent>().unwrap();
    assert_eq!(joined.samples.dims(), [3, 1, 2, 2]);
    assert_eq!(joined.batch_index, Some(vec![0, 1, 0]));

    let fixed = setup
        .call(
            "LatentBatchSeedBehavior",
            vec![("samples", out[0].clone()), ("seed_behavior", j(json!("fixed")))],
        )
        .unwrap();
    assert_eq!(fixed[0].downcast::<Latent>().unwrap().batch_index, Some(vec![0, 0, 0]));
    let random = setup
        .call(
            "LatentBatchSeedBehavior",
            vec![("samples", out[0].clone()), ("seed_behavior", j(json!("random")))],
        )
        .unwrap();
    assert_eq!(random[0].downcast::<Latent>().unwrap().batch_index, None);

    let cut = |dim: &str, index: i64, amount: i64| {
        let inputs = vec![
            ("samples", first.clone()),
            ("dim", j(json!(dim))),
            ("index", j(json!(index))),
            ("amount", j(json!(amount))),
        ];
        let samples = run(&setup, "LatentCut", inputs);
        (samples.dims().to_vec(), flat(&samples))
    };
    assert_eq!(cut("x", 1, 5), (vec![2, 1, 2, 1], vec![1.0, 3.0, 5.0, 7.0]));
    assert_eq!(cut("y", -1, 1), (vec![2, 1, 1, 2], vec![2.0, 3.0, 6.0, 7.0]));
    assert_eq!(cut("x", 9, 1), (vec![2, 1, 2, 1], vec![1.0, 3.0, 5.0, 7.0]));
    assert_eq!(cut("y", -9, 1).1, vec![0.0, 1.0, 4.0, 5.0]);
}
