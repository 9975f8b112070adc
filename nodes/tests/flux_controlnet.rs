//! FLUX ControlNets: XLabs' and Mistoline's (taking the control image), InstantX's union
//! (diffusers' layout, taking the image's latent and a control type) and AliMama's inpainting
//! one (the latent and a mask channel), their residuals against
//! ComfyUI's own `ControlNetFlux` on a small FLUX filled from a formula (fixture from
//! `fixtures/generate_flux_controlnet.py`), loaded from files in their own names; and ones
//! steering FLUX sampling through ControlNetApplyAdvanced.

mod common;

use candle_core::{Device, Tensor};
use common::{assert_matches_fixture, floats, formula_unet_file, j, max_abs_difference, setup, sizes, two_euler_steps};
use easel_engine::Value;
use easel_models::architectures::flux::{FluxControl, FluxInput, ReferenceMethod};
use easel_models::architectures::flux_controlnet::{FluxControlNetConfig, FluxControlNetKind};
use easel_models::testmodels::{flux_controlnet_layout, tiny_flux, write_checkpoint, TINY_FLUX_DEV, TINY_FLUX_VAE};
use easel_nodes::controlnet::nodes::load_controlnet;
use easel_nodes::controlnet::ControlNetwork;
use easel_nodes::image::Mask;
use serde_json::{json, Value as Json};

fn tensor(value: &Json) -> Tensor {
    Tensor::from_vec(floats(&value["values"]), sizes(&value["shape"]), &Device::Cpu).unwrap()
}

#[test]
fn flux_controlnets_give_comfyuis_residuals() {
    let fixture = common::fixture_json("flux_controlnet.json");
    let inputs = &fixture["inputs"];
    let (x, timesteps, context, y, guidance) = (
        tensor(&inputs["x"]),
        tensor(&inputs["timesteps"]),
        tensor(&inputs["context"]),
        tensor(&inputs["y"]),
        tensor(&inputs["guidance"]),
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
        let (hint, control_type) = match name {
            "instantx_union" => (tensor(&inputs["latent_hint"]), Some(2)),
            "alimama_inpaint" => (tensor(&inputs["masked_latent_hint"]), None),
            _ => (tensor(&inputs["hint"]), None),
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
                    attention_mask: None,
                    control: FluxControl::default(),
                    image_prompt: None,
                    patches: None,
                    reference_latents: &[],
                    reference_method: ReferenceMethod::default(),
                },
                &hint,
                control_type,
            )
            .expect("residuals");
        for (list, key) in [(&residuals.input, "double"), (&residuals.output, "single")] {
            let expected = case[key].as_array().unwrap();
            let order = sizes(&case[format!("{key}_order")]);
            assert_eq!(list.len(), order.len(), "{name} {key}");
            for (index, (residual, which)) in list.iter().zip(order).enumerate() {
                let got = residual.as_ref().expect("a residual");
                assert_matches_fixture(&format!("{name} {key} residual {index}"), got, &expected[which]);
            }
        }
    }
}

/// A tiny FLUX ControlNet of `kind` written to the setup's controlnet folder as `file`.
fn write_tiny_controlnet(setup: &common::Setup, kind: FluxControlNetKind, file: &str) {
    let paths = setup.services.get::<easel_nodes::paths::Paths>().unwrap();
    let config = FluxControlNetConfig {
        kind,
        flux: tiny_flux(),
    };
    write_checkpoint(
        &paths.models.join("controlnet").join(file),
        &flux_controlnet_layout(&config).unwrap(),
    )
    .unwrap();
}

/// How a test applies its ControlNet: the VAE given, a union type told, and, with a mask,
/// through ControlNetInpaintingAliMamaApply.
#[derive(Default)]
struct Applied<'a> {
    vae: Option<&'a Value>,
    control_type: Option<&'a str>,
    mask: Option<Mask>,
}

/// KSampler (two Euler steps, cfg 1, seed 7) on the tiny FLUX dev at 48×32 with the ControlNet
/// `file` applied at `strength` from 0 % to `end` as `how` says.
fn sample_flux_controlled(
    setup: &common::Setup,
    file: &str,
    (strength, end): (f64, f64),
    how: Applied,
) -> Result<Tensor, easel_engine::NodeError> {
    let Applied {
        vae,
        control_type,
        mask,
    } = how;
    let model = setup
        .call(
            "UNETLoader",
            vec![
                ("unet_name", j(json!(TINY_FLUX_DEV))),
                ("weight_dtype", j(json!("default"))),
            ],
        )?
        .remove(0);
    let mut control = setup
        .call("ControlNetLoader", vec![("control_net_name", j(json!(file)))])?
        .remove(0);
    if let Some(control_type) = control_type {
        control = setup
            .call(
                "SetUnionControlNetType",
                vec![("control_net", control), ("type", j(json!(control_type)))],
            )?
            .remove(0);
    }
    let flux = tiny_flux();
    let widths = (flux.context_dim, flux.vector_dim);
    let (mut inputs, latent) = common::dit_control_inputs(setup, control, widths, (strength, end))?;
    if let Some(vae) = vae {
        inputs.push(("vae", vae.clone()));
    }
    let node = match mask {
        Some(mask) => {
            inputs.push(("mask", Value::object(mask)));
            "ControlNetInpaintingAliMamaApply"
        }
        None => "ControlNetApplyAdvanced",
    };
    let applied = setup.call(node, inputs)?;
    two_euler_steps(setup, &model, &applied, &latent, 1.0)
}

#[test]
fn an_xlabs_controlnet_steers_flux_sampling() {
    let setup = setup();
    let file = "tiny_xlabs.safetensors";
    write_tiny_controlnet(&setup, FluxControlNetKind::XLabs, file);
    let sample =
        |strength: f64, end: f64| sample_flux_controlled(&setup, file, (strength, end), Applied::default()).unwrap();
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

/// A union ControlNet taking latents encodes its hint with the apply node's VAE (and refuses to
/// run without one, as ComfyUI does), and reads the control type it is told.
#[test]
fn a_latent_union_controlnet_encodes_its_hint_and_reads_its_type() {
    let setup = setup();
    let file = "tiny_union_pro.safetensors";
    write_tiny_controlnet(
        &setup,
        FluxControlNetKind::Latent {
            union_modes: 8,
            concat_mask: false,
        },
        file,
    );
    let vae = setup
        .call("VAELoader", vec![("vae_name", j(json!(TINY_FLUX_VAE)))])
        .unwrap()
        .remove(0);
    let error = sample_flux_controlled(&setup, file, (1.0, 1.0), Applied::default())
        .expect_err("no VAE")
        .to_string();
    assert!(error.contains("This Controlnet needs a VAE"), "{error}");
    let with_vae = |strength: f64, control_type: Option<&str>| {
        let how = Applied {
            vae: Some(&vae),
            control_type,
            mask: None,
        };
        sample_flux_controlled(&setup, file, (strength, 1.0), how).unwrap()
    };
    let uncontrolled = with_vae(0.0, None);
    let auto = with_vae(1.0, None);
    let depth = with_vae(1.0, Some("depth"));
    assert!(max_abs_difference(&auto, &uncontrolled) > 1e-4, "the ControlNet steers");
    assert!(max_abs_difference(&depth, &auto) > 1e-6, "the control type matters");
}

/// AliMama's inpainting ControlNet through its apply node: with nothing masked it sees the image
/// and a mask channel of ones, as Apply ControlNet gives it; a mask clears part of the image and
/// the channel.
#[test]
fn an_inpainting_controlnet_takes_the_kept_area_beside_the_latent() {
    let setup = setup();
    let file = "tiny_alimama.safetensors";
    let kind = FluxControlNetKind::Latent {
        union_modes: 0,
        concat_mask: true,
    };
    write_tiny_controlnet(&setup, kind, file);
    let vae = setup
        .call("VAELoader", vec![("vae_name", j(json!(TINY_FLUX_VAE)))])
        .unwrap()
        .remove(0);
    let mask = |masked: f32| Mask {
        batch: 1,
        height: 32,
        width: 48,
        data: (0..32 * 48).map(|i| if i % 48 < 24 { masked } else { 0.0 }).collect(),
    };
    let sample = |mask: Option<Mask>| {
        let how = Applied {
            vae: Some(&vae),
            control_type: None,
            mask,
        };
        sample_flux_controlled(&setup, file, (1.0, 1.0), how).unwrap()
    };
    let plain = sample(None);
    assert_eq!(max_abs_difference(&sample(Some(mask(0.0))), &plain), 0.0);
    assert!(max_abs_difference(&sample(Some(mask(1.0))), &plain) > 1e-6);
}
