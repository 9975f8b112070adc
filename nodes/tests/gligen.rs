//! GLIGEN against ComfyUI's own `comfy.gligen` on a tiny file with weights filled from a formula
//! (fixture from `fixtures/generate_gligen.py`): the object tokens of two boxes and each fuser
//! module's gated attention to them; then the tiny SD1.x GLIGEN through GLIGENLoader and
//! GLIGENTextBoxApply steering KSampler.

mod common;

use candle_core::Device;
use common::{
    assert_matches_fixture, fixture_json, formula_unet_file, j, ksampler, max_abs_difference, pattern, sd1_inputs,
    setup, sizes,
};
use easel_models::architectures::gligen::TextBox;
use easel_models::testmodels::TINY_SD1_GLIGEN;
use easel_nodes::conditioning::gligen::load_gligen;
use easel_nodes::conditioning::Conditioning;
use serde_json::json;

#[test]
fn gligen_objects_and_modules_match_comfyui() {
    let fixture = fixture_json("gligen.json");
    let dir = tempfile::tempdir().expect("a directory");
    let path = dir.path().join("gligen.safetensors");
    std::fs::write(&path, formula_unet_file(&fixture)).expect("written");
    let (gligen, _) = load_gligen(&path, &Device::Cpu).expect("loads");
    assert_eq!(gligen.config().modules.len(), 2);
    let latent = sizes(&fixture["latent"]);
    let text_dim = gligen.config().text_dim;
    let boxes: Vec<TextBox> = fixture["boxes"]
        .as_array()
        .expect("boxes")
        .iter()
        .map(|b| {
            let number = |i: usize| b[i].as_u64().expect("a number");
            TextBox {
                text: pattern(&[1, text_dim], number(0) as i64, 1.0),
                height: number(1) as usize,
                width: number(2) as usize,
                y: number(3) as usize,
                x: number(4) as usize,
            }
        })
        .collect();
    let objects = gligen
        .objects(&boxes, latent[0], latent[2], latent[3])
        .expect("objects");
    assert_matches_fixture("objects", &objects.narrow(0, 0, 1).unwrap(), &fixture["objects"]);
    for module in fixture["modules"].as_array().expect("modules") {
        let index = module["index"].as_u64().expect("an index") as usize;
        let x = pattern(&sizes(&module["x"]), module["x_seed"].as_i64().expect("a seed"), 1.0);
        let out = gligen.after_self_attention(index, &x, &objects).expect("attended");
        assert_matches_fixture(&format!("module {index}"), &out, &module["out"]);
    }
}

#[test]
fn gligen_boxes_steer_sd1() {
    let setup = setup();
    let (loaded, positive, negative, latent) = sd1_inputs(&setup, 1);
    let gligen = setup
        .call("GLIGENLoader", vec![("gligen_name", j(json!(TINY_SD1_GLIGEN)))])
        .expect("loads")
        .remove(0);
    let boxed = |conditioning: &easel_engine::Value, text: &str, x: u32| {
        setup
            .call(
                "GLIGENTextBoxApply",
                vec![
                    ("conditioning_to", conditioning.clone()),
                    ("clip", loaded[1].clone()),
                    ("gligen_textbox_model", gligen.clone()),
                    ("text", j(json!(text))),
                    ("width", j(json!(32))),
                    ("height", j(json!(24))),
                    ("x", j(json!(x))),
                    ("y", j(json!(8))),
                ],
            )
            .expect("a box")
            .remove(0)
    };
    let one = boxed(&positive, "a red ball", 0);
    let two = boxed(&one, "a blue cube", 16);
    let boxes = |value: &easel_engine::Value| {
        let entry = &value.downcast::<Conditioning>().expect("conditioning").0[0];
        entry.gligen.as_ref().map_or(0, |gligen| gligen.boxes.len())
    };
    assert_eq!((boxes(&one), boxes(&two)), (1, 2));
    let first = &one.downcast::<Conditioning>().unwrap().0[0]
        .gligen
        .as_ref()
        .unwrap()
        .boxes[0];
    assert_eq!(
        (first.width, first.height, first.x, first.y),
        (4, 3, 0, 1),
        "latent pixels"
    );
    let sample = |positive: &easel_engine::Value| {
        ksampler(&setup, &loaded[0], positive, &negative, &latent, "euler", 2, 5.0).expect("sampled")
    };
    let plain = sample(&positive);
    let with_one = sample(&one);
    assert!(max_abs_difference(&plain, &with_one) > 1e-5, "a box steers");
    assert!(max_abs_difference(&with_one, &sample(&two)) > 1e-5, "so does another");
}
