//! SD3 ControlNets: diffusers' layout (InstantX's, taking the hint's latent, and AliMama's
//! inpainting one, the latent and a mask channel) and Stability's SD3.5 layout (using the
//! sampled model's patch embedding), their residuals against ComfyUI's own networks on a small
//! MMDiT filled from a formula (fixture from `fixtures/generate_sd3_controlnet.py`), loaded from
//! files in their own names; and the tiny ones steering SD3 sampling through the apply nodes.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_matches_fixture, floats, formula_unet_file, j, max_abs_difference, setup, sizes, two_euler_steps};
use easel_engine::Value;
use easel_models::architectures::mmdit::{Mmdit, MmditConfig};
use easel_models::architectures::mmdit_controlnet::{HintPreprocessing, MmditControlInput};
use easel_models::testmodels::{
    tiny_mmdit, TINY_SD35, TINY_SD35_CONTROLNET, TINY_SD3_CHECKPOINT, TINY_SD3_CONTROLNET, TINY_SD3_INPAINT_CONTROLNET,
    TINY_SD3_VAE,
};
use easel_models::weights::{SafetensorsFile, Weights};
use easel_nodes::controlnet::nodes::load_controlnet;
use easel_nodes::controlnet::ControlNetwork;
use easel_nodes::image::Mask;
use serde_json::{json, Value as Json};

fn tensor(value: &Json) -> Tensor {
    Tensor::from_vec(floats(&value["values"]), sizes(&value["shape"]), &Device::Cpu).unwrap()
}

#[test]
fn sd3_controlnets_give_comfyuis_residuals() {
    let fixture = common::fixture_json("sd3_controlnet.json");
    let inputs = &fixture["inputs"];
    let (x, timesteps, context, y) = (
        tensor(&inputs["x"]),
        tensor(&inputs["timesteps"]),
        tensor(&inputs["context"]),
        tensor(&inputs["y"]),
    );
    let dir = tempfile::tempdir().unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    // The small MMDiT whose patch embedding the SD3.5 ControlNet uses.
    let model_weights = cases
        .iter()
        .find_map(|case| case.get("model_weights"))
        .expect("the model's weights");
    let model_path = dir.path().join("mmdit.safetensors");
    std::fs::write(&model_path, formula_unet_file(&json!({ "weights": model_weights }))).unwrap();
    let model_file = Arc::new(SafetensorsFile::open(&model_path).unwrap());
    let model = Mmdit::new(
        MmditConfig::infer(model_file.as_ref(), "").unwrap(),
        Weights::from_file(model_file, DType::F32, &Device::Cpu),
    )
    .unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let path = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&path, formula_unet_file(case)).unwrap();
        let (loaded, _) = load_controlnet(&path, None, &Device::Cpu).expect("an SD3 ControlNet");
        let ControlNetwork::Mmdit(network) = &loaded.network else {
            panic!("{name}: not loaded as an SD3 ControlNet");
        };
        assert_eq!(loaded.compression_ratio, 1);
        assert_eq!(loaded.network.concat_mask(), name == "alimama_inpaint", "{name}");
        assert_eq!(network.preprocessing(), HintPreprocessing::None, "{name}");
        let hint = tensor(&inputs[case["hint"].as_str().unwrap()]);
        let input = MmditControlInput {
            x: &x,
            hint: &hint,
            timesteps: &timesteps,
            context: &context,
            y: Some(&y),
        };
        let residuals = network.forward(&input, &model).expect("residuals");
        assert!(residuals.input.is_empty() && residuals.middle.is_none(), "{name}");
        let expected = case["residuals"].as_array().unwrap();
        let order = sizes(&case["order"]);
        assert_eq!(
            residuals.output.len(),
            order.len(),
            "{name}: residuals for as many blocks"
        );
        for (index, (residual, which)) in residuals.output.iter().zip(order).enumerate() {
            let got = residual.as_ref().expect("a residual");
            assert_matches_fixture(&format!("{name} residual {index}"), got, &expected[which]);
        }
    }
}

/// How a test applies its ControlNet: through ControlNetApplySD3 (VAE required) or Apply
/// ControlNet with or without the VAE, or, with a mask, ControlNetInpaintingAliMamaApply.
#[derive(Clone, Copy)]
enum Applied<'a> {
    Sd3Node,
    Advanced { with_vae: bool },
    Inpainting(&'a Mask),
}

/// The tiny SD3's model and VAE, from its single file.
fn tiny_sd3(setup: &common::Setup) -> [Value; 2] {
    let loaded = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD3_CHECKPOINT)))],
        )
        .unwrap();
    [loaded[0].clone(), loaded[2].clone()]
}

/// KSampler (two Euler steps, cfg 2: cond and uncond in one batch sharing the hint, seed 7) on
/// an SD3 `model` (with its `vae`) at 48×32 with the ControlNet `file` applied at `strength`
/// from 0 % to `end` as `how` says.
fn sample_sd3_controlled(
    setup: &common::Setup,
    [model, vae]: &[Value; 2],
    file: &str,
    (strength, end): (f64, f64),
    how: Applied,
) -> Result<Tensor, easel_engine::NodeError> {
    let (model, vae) = (model.clone(), vae.clone());
    let control = setup
        .call("ControlNetLoader", vec![("control_net_name", j(json!(file)))])?
        .remove(0);
    let widths = (4096, tiny_mmdit().adm_in_channels.unwrap());
    let (mut inputs, latent) = common::dit_control_inputs(setup, control, widths, (strength, end))?;
    let node = match how {
        Applied::Sd3Node => {
            inputs.push(("vae", vae));
            "ControlNetApplySD3"
        }
        Applied::Advanced { with_vae } => {
            if with_vae {
                inputs.push(("vae", vae));
            }
            "ControlNetApplyAdvanced"
        }
        Applied::Inpainting(mask) => {
            inputs.push(("vae", vae));
            inputs.push(("mask", Value::object(mask.clone())));
            "ControlNetInpaintingAliMamaApply"
        }
    };
    let applied = setup.call(node, inputs)?;
    two_euler_steps(setup, &model, &applied, &latent, 2.0)
}

/// The tiny SD3 ControlNet steers sampling through ControlNetApplySD3 as through Apply
/// ControlNet with the VAE (the same node underneath), needs the VAE, and applies only within
/// its range.
#[test]
fn an_sd3_controlnet_steers_sd3_sampling() {
    let setup = setup();
    let sd3 = tiny_sd3(&setup);
    let sample = |strength: f64, end: f64, how: Applied| {
        sample_sd3_controlled(&setup, &sd3, TINY_SD3_CONTROLNET, (strength, end), how).unwrap()
    };
    let uncontrolled = sample(0.0, 1.0, Applied::Sd3Node);
    let controlled = sample(1.0, 1.0, Applied::Sd3Node);
    assert!(
        max_abs_difference(&controlled, &uncontrolled) > 1e-4,
        "the ControlNet steers"
    );
    let advanced = sample(1.0, 1.0, Applied::Advanced { with_vae: true });
    assert_eq!(max_abs_difference(&advanced, &controlled), 0.0);
    let error = sample_sd3_controlled(
        &setup,
        &sd3,
        TINY_SD3_CONTROLNET,
        (1.0, 1.0),
        Applied::Advanced { with_vae: false },
    )
    .expect_err("no VAE")
    .to_string();
    assert!(error.contains("This Controlnet needs a VAE"), "{error}");
    // Only the first step (σ 1) lies in a range ending at 0 %.
    let first_step_only = sample(1.0, 0.0, Applied::Sd3Node);
    assert!(max_abs_difference(&first_step_only, &uncontrolled) > 1e-4);
    assert!(max_abs_difference(&first_step_only, &controlled) > 1e-6);
}

/// AliMama's SD3 inpainting ControlNet: with nothing masked it sees the image and a mask channel
/// of ones, as Apply ControlNet gives it; a mask clears part of the image and the channel.
#[test]
fn an_sd3_inpainting_controlnet_takes_the_kept_area_beside_the_latent() {
    let setup = setup();
    let mask = |masked: f32| Mask {
        batch: 1,
        height: 32,
        width: 48,
        data: (0..32 * 48).map(|i| if i % 48 < 24 { masked } else { 0.0 }).collect(),
    };
    let sd3 = tiny_sd3(&setup);
    let sample =
        |how: Applied| sample_sd3_controlled(&setup, &sd3, TINY_SD3_INPAINT_CONTROLNET, (1.0, 1.0), how).unwrap();
    let plain = sample(Applied::Advanced { with_vae: true });
    assert_eq!(
        max_abs_difference(&sample(Applied::Inpainting(&mask(0.0))), &plain),
        0.0
    );
    assert!(max_abs_difference(&sample(Applied::Inpainting(&mask(1.0))), &plain) > 1e-6);
}

/// Stability's SD3.5 ControlNet steers the tiny SD3.5 medium (split files: its patch embedding
/// is the model's), its recorded control type (canny) read from the file.
#[test]
fn an_sd35_controlnet_steers_sd35_sampling() {
    let setup = setup();
    let paths = setup.services.get::<easel_nodes::paths::Paths>().unwrap();
    let (loaded, _) = load_controlnet(
        &paths.models.join("controlnet").join(TINY_SD35_CONTROLNET),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let ControlNetwork::Mmdit(network) = &loaded.network else {
        panic!("not loaded as an SD3 ControlNet");
    };
    assert_eq!(network.preprocessing(), HintPreprocessing::Canny);
    let model = setup
        .call(
            "UNETLoader",
            vec![
                ("unet_name", j(json!(TINY_SD35))),
                ("weight_dtype", j(json!("default"))),
            ],
        )
        .unwrap()
        .remove(0);
    let vae = setup
        .call("VAELoader", vec![("vae_name", j(json!(TINY_SD3_VAE)))])
        .unwrap()
        .remove(0);
    let sd35 = [model, vae];
    let sample = |strength: f64| {
        sample_sd3_controlled(&setup, &sd35, TINY_SD35_CONTROLNET, (strength, 1.0), Applied::Sd3Node).unwrap()
    };
    assert!(
        max_abs_difference(&sample(1.0), &sample(0.0)) > 1e-4,
        "the ControlNet steers"
    );
}
