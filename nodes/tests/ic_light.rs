//! IC-Light (ComfyUI-IC-Light): LightSource's gradients equal the pack's
//! `generate_gradient_image` level for level (fixture from `fixtures/generate_ic_light.py`); the
//! IC-Light offsets are added to the UNet's weights with its input convolution zero-padded first
//! (ComfyUI's `pad_weight`); ICLightConditioning concatenates the foreground's and background's
//! latents times the multiplier; the tiny "fc" and "fbc" models relight through KSampler and
//! refuse the other's conditioning with the pack's error.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_json, j, ksampler, max_abs_difference, pattern, sd1_inputs, setup, Setup};
use easel_engine::Value;
use easel_models::testmodels::{TINY_SD1_IC_LIGHT_FBC, TINY_SD1_IC_LIGHT_FC, TINY_SDXL_CHECKPOINT};
use easel_models::weights::{MappedWeights, SafetensorsFile};
use easel_nodes::conditioning::Conditioning;
use easel_nodes::image::Image;
use easel_nodes::latent::Latent;
use easel_nodes::model::diffusion_model::Model;
use serde_json::json;

#[test]
fn light_source_gradients_equal_the_packs() {
    let setup = setup();
    let fixture = fixture_json("ic_light.json");
    for case in fixture["gradients"].as_array().expect("gradients") {
        let color = |key: &str| {
            let values: Vec<String> = case[key]
                .as_array()
                .expect("a colour")
                .iter()
                .map(|v| v.as_u64().expect("a level").to_string())
                .collect();
            values.join(",")
        };
        let image = setup
            .call(
                "LightSource",
                vec![
                    ("light_position", j(case["position"].clone())),
                    ("multiplier", j(case["multiplier"].clone())),
                    ("start_color", j(json!(color("start")))),
                    ("end_color", j(json!(color("end")))),
                    ("width", j(case["width"].clone())),
                    ("height", j(case["height"].clone())),
                ],
            )
            .expect("a light")
            .remove(0);
        let image = image.downcast::<Image>().expect("an image");
        let levels: Vec<u64> = image.data.iter().map(|v| (v * 255.0).round() as u64).collect();
        let expected: Vec<u64> = case["levels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(
            levels, expected,
            "{} {}×{}",
            case["position"], case["width"], case["height"]
        );
    }
    let hex = setup
        .call(
            "LightSource",
            vec![
                ("light_position", j(json!("Left Light"))),
                ("multiplier", j(json!(1.0))),
                ("start_color", j(json!("#FF8000"))),
                ("end_color", j(json!("0,0,0"))),
                ("width", j(json!(8))),
                ("height", j(json!(8))),
                ("batch_size", j(json!(2))),
            ],
        )
        .expect("a light")
        .remove(0);
    let hex = hex.downcast::<Image>().expect("an image");
    assert_eq!(
        (hex.batch, hex.data[0], hex.data[1], hex.data[2]),
        (2, 1.0, 128.0 / 255.0, 0.0)
    );
}

fn apply_ic_light(setup: &Setup, model: &Value, file: &str) -> Result<Value, easel_engine::NodeError> {
    setup
        .call(
            "LoadAndApplyICLightUnet",
            vec![("model", model.clone()), ("model_path", j(json!(file)))],
        )
        .map(|mut out| out.remove(0))
}

#[test]
fn ic_light_offsets_are_added_to_the_padded_unet() {
    let setup = setup();
    let (loaded, _, _, _) = sd1_inputs(&setup, 1);
    let patched = apply_ic_light(&setup, &loaded[0], TINY_SD1_IC_LIGHT_FC).expect("applies");
    let base = loaded[0].downcast::<Model>().expect("a model");
    let patched = patched.downcast::<Model>().expect("a model");
    assert!(patched.0.ic_light);
    let models = &setup.services.get::<easel_nodes::paths::Paths>().unwrap().models;
    let offsets = SafetensorsFile::open(&models.join("diffusion_models").join(TINY_SD1_IC_LIGHT_FC)).expect("opens");
    let offset = |name: &str, shape: &[usize]| {
        offsets
            .load(name, DType::F32, &Device::Cpu)
            .expect("an offset")
            .reshape(shape)
            .unwrap()
    };
    let conv = "input_blocks.0.0.weight";
    let own = base.0.source.weights().get((32, 4, 3, 3), conv).expect("the model's");
    let padded = Tensor::cat(&[&own, &own.zeros_like().unwrap()], 1).unwrap();
    let expected = (padded + offset(conv, &[32, 8, 3, 3])).unwrap();
    let merged = patched.0.source.weights().get((32, 8, 3, 3), conv).expect("merged");
    assert_eq!(max_abs_difference(&merged, &expected), 0.0);
    let bias = "out.2.bias";
    let expected = (base.0.source.weights().get(4, bias).unwrap() + offset(bias, &[4])).unwrap();
    assert_eq!(
        max_abs_difference(&patched.0.source.weights().get(4, bias).unwrap(), &expected),
        0.0
    );

    let sdxl = setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SDXL_CHECKPOINT)))],
        )
        .expect("loads");
    let error = apply_ic_light(&setup, &sdxl[0], TINY_SD1_IC_LIGHT_FC).unwrap_err();
    assert_eq!(
        error.to_string(),
        "Attempted to load SDXL model, IC-Light is only compatible with SD 1.5 models."
    );
}

#[test]
fn ic_light_relights_with_its_conditioning() {
    let setup = setup();
    let (loaded, positive, negative, _) = sd1_inputs(&setup, 1);
    let latent = |seed: i64| Value::object(Latent::new(pattern(&[1, 4, 8, 8], seed, 1.0)));
    let condition = |background: Option<Value>, multiplier: f64| {
        let mut inputs = vec![
            ("positive", positive.clone()),
            ("negative", negative.clone()),
            ("vae", loaded[2].clone()),
            ("foreground", latent(3)),
            ("multiplier", j(json!(multiplier))),
        ];
        if let Some(background) = background {
            inputs.push(("opt_background", background));
        }
        setup.call("ICLightConditioning", inputs).expect("conditioned")
    };
    let fc_conditioning = condition(None, 0.5);
    let concat = |value: &Value| {
        let entry = &value.downcast::<Conditioning>().expect("conditioning").0[0];
        entry
            .concat_image
            .as_ref()
            .expect("a concatenated latent")
            .latent
            .clone()
    };
    let foreground = pattern(&[1, 4, 8, 8], 3, 1.0);
    assert_eq!(
        max_abs_difference(&concat(&fc_conditioning[0]), &(&foreground * 0.5).unwrap()),
        0.0
    );
    let empty = &fc_conditioning[2].downcast::<Latent>().expect("a latent").samples;
    assert_eq!(empty.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let fbc_conditioning = condition(Some(latent(4)), 0.18215);
    let background = pattern(&[1, 4, 8, 8], 4, 1.0);
    let joined = (Tensor::cat(&[&foreground, &background], 1).unwrap() * 0.18215).unwrap();
    assert_eq!(max_abs_difference(&concat(&fbc_conditioning[1]), &joined), 0.0);

    let fc = apply_ic_light(&setup, &loaded[0], TINY_SD1_IC_LIGHT_FC).expect("applies");
    let fbc = apply_ic_light(&setup, &loaded[0], TINY_SD1_IC_LIGHT_FBC).expect("applies");
    let sample = |model: &Value, conditioning: &[Value]| {
        ksampler(
            &setup,
            model,
            &conditioning[0],
            &conditioning[1],
            &conditioning[2],
            "euler",
            2,
            1.5,
        )
    };
    let relit = sample(&fc, &fc_conditioning).expect("samples");
    let brighter = sample(&fc, &condition(None, 1.0)).expect("samples");
    assert!(max_abs_difference(&relit, &brighter) > 1e-5, "the foreground steers");
    sample(&fbc, &fbc_conditioning).expect("samples");
    let error = sample(&fc, &fbc_conditioning).unwrap_err().to_string();
    assert!(
        error.contains("Input channels 12 does not match model in_channels 8"),
        "{error}"
    );
}
