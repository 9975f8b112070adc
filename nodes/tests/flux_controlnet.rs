//! FLUX ControlNets taking the control image (XLabs, Mistoline): their residuals against
//! ComfyUI's own `ControlNetFlux` on a small FLUX filled from a formula (fixture from
//! `fixtures/generate_flux_controlnet.py`), loaded from files in their own names; and one
//! steering FLUX sampling through ControlNetApplyAdvanced.

mod common;

use candle_core::{Device, Tensor};
use common::{floats, formula_unet_file, j, max_abs_difference, setup, sizes};
use easel_engine::Value;
use easel_models::architectures::flux::{FluxControl, FluxInput};
use easel_models::architectures::flux_controlnet::{FluxControlNetConfig, FluxControlNetKind};
use easel_models::testmodels::{flux_controlnet_layout, tiny_flux, write_checkpoint, TINY_FLUX_DEV};
use easel_nodes::conditioning::{CondEntry, Conditioning};
use easel_nodes::controlnet::nodes::load_controlnet;
use easel_nodes::controlnet::ControlNetwork;
use easel_nodes::latent::Latent;
use serde_json::{json, Value as Json};

fn tensor(value: &Json) -> Tensor {
    Tensor::from_vec(floats(&value["values"]), sizes(&value["shape"]), &Device::Cpu).unwrap()
}

#[test]
fn flux_controlnets_give_comfyuis_residuals() {
    let fixture = common::fixture_json("flux_controlnet.json");
    let inputs = &fixture["inputs"];
    let (x, timesteps, context, y, guidance, hint) = (
        tensor(&inputs["x"]),
        tensor(&inputs["timesteps"]),
        tensor(&inputs["context"]),
        tensor(&inputs["y"]),
        tensor(&inputs["guidance"]),
        tensor(&inputs["hint"]),
    );
    let dir = tempfile::tempdir().unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        // Mistoline's files name the single blocks' layers as ComfyUI does not.
        let mut weights = case.clone();
        for weight in weights["weights"].as_array_mut().unwrap() {
            let renamed = weight["name"]
                .as_str()
                .unwrap()
                .replace("controlnet_single_blocks.", "single_controlnet_blocks.");
            if name == "mistoline" {
                weight["name"] = json!(renamed);
            }
        }
        let path = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&path, formula_unet_file(&weights)).unwrap();
        let (loaded, _) = load_controlnet(&path, None, &Device::Cpu).expect("a FLUX ControlNet");
        let ControlNetwork::Flux(network) = &loaded.network else {
            panic!("{name}: not loaded as a FLUX ControlNet");
        };
        let residuals = network
            .forward(
                &FluxInput {
                    x: &x,
                    timesteps: &timesteps,
                    context: &context,
                    y: &y,
                    guidance: Some(&guidance),
                    concat: None,
                    control: FluxControl::default(),
                    image_prompt: None,
                    patches: None,
                },
                &hint,
            )
            .expect("residuals");
        assert_eq!(residuals.input.len(), case["double_count"].as_u64().unwrap() as usize);
        assert_eq!(residuals.output.len(), case["single_count"].as_u64().unwrap() as usize);
        for (list, expected) in [
            (&residuals.input, &case["double"]),
            (&residuals.output, &case["single"]),
        ] {
            let expected = expected.as_array().unwrap();
            for (index, residual) in list.iter().enumerate() {
                let want = tensor(&expected[index % expected.len()]);
                let got = residual.as_ref().expect("a residual");
                let scale = floats(&expected[index % expected.len()]["values"])
                    .iter()
                    .fold(1f32, |m, v| m.max(v.abs()));
                assert!(
                    max_abs_difference(got, &want) <= 2e-5 * scale,
                    "{name} residual {index}: differs by {}",
                    max_abs_difference(got, &want)
                );
            }
        }
    }
}

#[test]
fn an_xlabs_controlnet_steers_flux_sampling() {
    let setup = setup();
    let paths = setup.services.get::<easel_nodes::paths::Paths>().unwrap();
    let config = FluxControlNetConfig {
        kind: FluxControlNetKind::XLabs,
        flux: tiny_flux(),
    };
    write_checkpoint(
        &paths.models.join("controlnet/tiny_flux_controlnet.safetensors"),
        &flux_controlnet_layout(&config).unwrap(),
    )
    .unwrap();
    let model = setup
        .call(
            "UNETLoader",
            vec![
                ("unet_name", j(json!(TINY_FLUX_DEV))),
                ("weight_dtype", j(json!("default"))),
            ],
        )
        .unwrap()
        .remove(0);
    let control = setup
        .call(
            "ControlNetLoader",
            vec![("control_net_name", j(json!("tiny_flux_controlnet.safetensors")))],
        )
        .unwrap()
        .remove(0);
    let flux = tiny_flux();
    let wave = |count: usize, step: f32| -> Vec<f32> { (0..count).map(|i| (i as f32 * step).sin()).collect() };
    let entry = CondEntry::new(
        Tensor::from_vec(wave(3 * flux.context_dim, 0.37), (1, 3, flux.context_dim), &Device::Cpu).unwrap(),
        Some(Tensor::from_vec(wave(flux.vector_dim, 0.53), (1, flux.vector_dim), &Device::Cpu).unwrap()),
    );
    let text = Value::object(Conditioning(vec![entry]));
    let image = Value::object(common::pattern_image(32, 48, 5));
    let latent = setup
        .call(
            "EmptySD3LatentImage",
            vec![
                ("width", j(json!(48))),
                ("height", j(json!(32))),
                ("batch_size", j(json!(1))),
            ],
        )
        .unwrap()
        .remove(0);
    let sample = |strength: f64, end: f64| -> Tensor {
        let applied = setup
            .call(
                "ControlNetApplyAdvanced",
                vec![
                    ("positive", text.clone()),
                    ("negative", text.clone()),
                    ("control_net", control.clone()),
                    ("image", image.clone()),
                    ("strength", j(json!(strength))),
                    ("start_percent", j(json!(0.0))),
                    ("end_percent", j(json!(end))),
                ],
            )
            .expect("ControlNetApplyAdvanced");
        let sampled = setup
            .call(
                "KSampler",
                vec![
                    ("model", model.clone()),
                    ("seed", j(json!(7))),
                    ("steps", j(json!(2))),
                    ("cfg", j(json!(1.0))),
                    ("sampler_name", j(json!("euler"))),
                    ("scheduler", j(json!("simple"))),
                    ("positive", applied[0].clone()),
                    ("negative", applied[1].clone()),
                    ("latent_image", latent.clone()),
                    ("denoise", j(json!(1.0))),
                ],
            )
            .expect("KSampler");
        sampled[0].downcast::<Latent>().unwrap().samples.clone()
    };
    let uncontrolled = sample(0.0, 1.0);
    let controlled = sample(1.0, 1.0);
    assert!(
        max_abs_difference(&controlled, &uncontrolled) > 1e-4,
        "the ControlNet steers"
    );
    // FLUX places the start of sampling at σ 1, so a range ending at 0 % still covers the first
    // step (σ 1) and no other, as in ComfyUI.
    let first_step_only = sample(1.0, 0.0);
    assert!(max_abs_difference(&first_step_only, &uncontrolled) > 1e-4);
    assert!(max_abs_difference(&first_step_only, &controlled) > 1e-6);
}
