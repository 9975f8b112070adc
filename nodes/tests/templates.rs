//! The official ComfyUI workflow templates of Easel's families (vendored in
//! `fixtures/templates/` by `vendor_templates.py`, in the frontend's UI format) convert to API
//! prompts with Easel's own converter, then validate and run on the tiny test models and save
//! their images.
//!
//! Each template is made small by rules over its own inputs, never by a prompt written for it:
//! a model file becomes the tiny model of its family ([`stand_in`]; a FLUX template's LoRAs the
//! tiny FLUX LoRA), an embedding in a prompt the tiny embedding, a loaded image (from the input
//! or the output folder) the bundled `example.png`, and sizes and step counts shrink
//! ([`shrink`]) within the bounds of the node's schema.

mod common;

use common::{run_prompt, setup, Setup};
use easel_engine::events::EventKind;
use easel_engine::ui_workflow::to_api_prompt;
use easel_models::testmodels::{
    TINY_CLIP_G, TINY_CLIP_L, TINY_CLIP_VISION_G, TINY_EMBEDDING, TINY_FLUX_CANNY, TINY_FLUX_CHECKPOINT,
    TINY_FLUX_CONTROL_LORA, TINY_FLUX_DEV, TINY_FLUX_FILL, TINY_FLUX_LORA_KOHYA, TINY_FLUX_REDUX, TINY_FLUX_SCHNELL,
    TINY_FLUX_VAE, TINY_SD1_CHECKPOINT, TINY_SD1_CONTROLNET, TINY_SD1_GLIGEN, TINY_SD1_INPAINTING_CHECKPOINT,
    TINY_SD1_LORA, TINY_SD1_T2I_ADAPTER, TINY_SD2_CHECKPOINT, TINY_SDXL_CHECKPOINT, TINY_SDXL_REFINER_CHECKPOINT,
    TINY_SDXL_VAE, TINY_SIGLIP, TINY_T5,
};
use easel_nodes::paths::Paths;
use serde_json::{Map, Value as Json};

const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/templates");
const INPUT_IMAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../workflows/input/example.png");

/// The largest latent-image side a template keeps, in pixels: its sizes are divided by one
/// factor so that its largest `width` or `height` is at most this.
const LARGEST_SIDE: f64 = 128.0;
/// The most padding an outpainting pad adds to a side, in pixels.
const LARGEST_PAD: f64 = 32.0;
/// The most sampling steps a sampler or scheduler takes.
const MOST_STEPS: f64 = 3.0;
/// The largest image `ImageScaleToTotalPixels` makes, in megapixels.
const MOST_MEGAPIXELS: f64 = 0.01;

/// The tiny test model standing in for the model file `value` of input `input`, chosen by the
/// family the file's name says (a checkpoint whose name says none is an SD1.5 community model,
/// as the vendoring script assumes); `None` for an input that names no model file.
fn stand_in(input: &str, value: &str, flux: bool) -> Option<Result<&'static str, String>> {
    let unknown = || Err(format!("no tiny model stands in for {input} = {value:?}"));
    let name = value.to_ascii_lowercase();
    let model = match input {
        "ckpt_name" => Ok(if name.starts_with("sd_xl_refiner") {
            TINY_SDXL_REFINER_CHECKPOINT
        } else if name.starts_with("sd_xl_") {
            TINY_SDXL_CHECKPOINT
        } else if name.starts_with("512-inpainting") {
            // SD2's inpainting model: the tiny inpainting model is SD1-shaped (9 input channels).
            TINY_SD1_INPAINTING_CHECKPOINT
        } else if name.starts_with("v2-") {
            TINY_SD2_CHECKPOINT
        } else if name.starts_with("flux1-") {
            // The only FLUX checkpoint: dev (a schnell checkpoint has no guidance embedding).
            TINY_FLUX_CHECKPOINT
        } else {
            TINY_SD1_CHECKPOINT
        }),
        "unet_name" if name.starts_with("flux") => Ok(if name.contains("fill") {
            TINY_FLUX_FILL
        } else if name.contains("canny") || name.contains("depth") {
            TINY_FLUX_CANNY
        } else if name.contains("schnell") {
            TINY_FLUX_SCHNELL
        } else {
            TINY_FLUX_DEV
        }),
        "clip_name" | "clip_name1" | "clip_name2" if name.starts_with("clip_l") => Ok(TINY_CLIP_L),
        "clip_name" | "clip_name1" | "clip_name2" if name.starts_with("clip_g") => Ok(TINY_CLIP_G),
        "clip_name" | "clip_name1" | "clip_name2" if name.starts_with("t5xxl") => Ok(TINY_T5),
        "vae_name" if name == "ae.safetensors" => Ok(TINY_FLUX_VAE),
        // The SD VAE (SD1.x, SD2.x and SDXL share its shape).
        "vae_name" if name.starts_with("vae-ft-mse") => Ok(TINY_SDXL_VAE),
        // BFL's control LoRAs (flux1-depth-dev-lora, flux1-canny-dev-lora).
        "lora_name" if flux && (name.contains("depth-dev-lora") || name.contains("canny-dev-lora")) => {
            Ok(TINY_FLUX_CONTROL_LORA)
        }
        "lora_name" if flux => Ok(TINY_FLUX_LORA_KOHYA),
        "lora_name" => Ok(TINY_SD1_LORA),
        // The vendored templates' control models are SD1.5's.
        "control_net_name" if name.to_lowercase().contains("t2i") => Ok(TINY_SD1_T2I_ADAPTER),
        "control_net_name" => Ok(TINY_SD1_CONTROLNET),
        // CLIP vision: SigLIP for FLUX Redux, ViT-bigG for SDXL revision.
        "clip_name" if name.starts_with("sigclip") => Ok(TINY_SIGLIP),
        "clip_name" if name.starts_with("clip_vision_g") => Ok(TINY_CLIP_VISION_G),
        "style_model_name" if name.contains("redux") => Ok(TINY_FLUX_REDUX),
        "style_model_name" => unknown(),
        "gligen_name" => Ok(TINY_SD1_GLIGEN),
        "unet_name" | "clip_name" | "clip_name1" | "clip_name2" | "vae_name" => unknown(),
        _ => return None,
    };
    Some(model)
}

/// `text` with every `embedding:NAME` naming the tiny embedding instead.
fn with_tiny_embeddings(text: &str) -> String {
    const MARK: &str = "embedding:";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(MARK) {
        out.push_str(&rest[..start + MARK.len()]);
        out.push_str(TINY_EMBEDDING);
        rest = &rest[start + MARK.len()..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == ',' || c == ')')
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A number clamped into the `min`/`max` of input `name`'s schema on node class `class`.
fn within_schema(setup: &Setup, class: &str, name: &str, value: f64) -> f64 {
    let schema = setup
        .registry
        .get(class)
        .expect("a registered node")
        .schema(&setup.services);
    let options = schema
        .required
        .get(name)
        .or_else(|| schema.optional.get(name))
        .and_then(|spec| spec.options.as_ref());
    let bound = |key: &str| options.and_then(|o| o.get(key)).and_then(Json::as_f64);
    let value = bound("min").map_or(value, |min| value.max(min));
    bound("max").map_or(value, |max| value.min(max))
}

/// Shrinks the prompt's sizes and step counts (see the module's rules); every number stays within
/// its schema's bounds.
fn shrink(setup: &Setup, prompt: &mut Map<String, Json>) {
    let largest_side = prompt
        .values()
        .flat_map(|node| ["width", "height"].map(|name| node["inputs"][name].as_f64()))
        .flatten()
        .fold(0.0, f64::max);
    let factor = (largest_side / LARGEST_SIDE).max(1.0);
    for node in prompt.values_mut() {
        let class = node["class_type"].as_str().expect("class_type").to_string();
        let inputs = node["inputs"].as_object_mut().expect("inputs");
        let steps = inputs.get("steps").and_then(Json::as_f64);
        let step_ratio = steps.map_or(1.0, |steps| (MOST_STEPS / steps).min(1.0));
        for (name, value) in inputs.iter_mut() {
            let Some(number) = value.as_f64() else { continue };
            let shrunk = match name.as_str() {
                // Pixel sizes and positions, on the 8-pixel grid of the latent.
                "width" | "height" | "x" | "y" => (number / factor / 8.0).round() * 8.0,
                "left" | "top" | "right" | "bottom" => number.min(LARGEST_PAD),
                "megapixels" => number.min(MOST_MEGAPIXELS),
                "steps" => number.min(MOST_STEPS),
                // KSamplerAdvanced's window over the steps, scaled with them (an end past the
                // last step stays past it).
                "start_at_step" | "end_at_step" if steps.is_some_and(|steps| number < steps) => {
                    (number * step_ratio).round()
                }
                _ => continue,
            };
            let shrunk = within_schema(setup, &class, name, shrunk);
            // An integer input stays an integer.
            *value = if value.is_f64() {
                Json::from(shrunk)
            } else {
                Json::from(shrunk as i64)
            };
        }
    }
}

/// The template `name`'s API prompt, made to run on the tiny models: see the module's rules.
/// Every SaveImage saves under `name/` in the output directory.
fn tiny_prompt(setup: &Setup, name: &str, template: &Json) -> Result<Json, String> {
    let mut prompt = to_api_prompt(template, &setup.registry, &setup.services).map_err(|error| error.to_string())?;
    let nodes = prompt.as_object_mut().ok_or("the converted prompt is not an object")?;
    // A FLUX template's LoRAs are FLUX's.
    let flux = nodes.values().any(|node| {
        ["unet_name", "ckpt_name"].iter().any(|input| {
            node["inputs"][input]
                .as_str()
                .is_some_and(|name| name.to_ascii_lowercase().starts_with("flux"))
        })
    });
    for node in nodes.values_mut() {
        let class = node["class_type"].as_str().unwrap_or_default().to_string();
        for (input, value) in node["inputs"].as_object_mut().ok_or("a node without inputs")? {
            let Some(text) = value.as_str() else { continue };
            let replaced = match (class.as_str(), input.as_str()) {
                ("LoadImage" | "LoadImageMask", "image") => "example.png".to_string(),
                ("LoadImageOutput", "image") => "example.png [output]".to_string(),
                ("SaveImage", "filename_prefix") => format!("{name}/{text}"),
                _ => match stand_in(input, text, flux) {
                    Some(model) => model?.to_string(),
                    None => with_tiny_embeddings(text),
                },
            };
            *value = Json::String(replaced);
        }
    }
    shrink(setup, nodes);
    Ok(prompt)
}

/// The vendored templates, by name.
fn templates() -> Vec<(String, Json)> {
    let mut paths: Vec<_> = std::fs::read_dir(TEMPLATES)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (
                name,
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            )
        })
        .collect()
}

/// The names of the files under `folder` (recursively).
fn files_under(folder: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            names.extend(files_under(&path));
        } else {
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names
}

#[test]
fn every_vendored_template_validates_runs_and_saves_its_images() {
    let setup = setup();
    let paths = setup.services.get::<Paths>().unwrap();
    std::fs::copy(INPUT_IMAGE, paths.input.join("example.png")).unwrap();
    // LoadImageOutput reads the output folder.
    std::fs::copy(INPUT_IMAGE, paths.output.join("example.png")).unwrap();
    let templates = templates();
    // The 21 templates of SD1.x, SD2.x, SDXL and FLUX.1 whose nodes Easel had when vendored.
    assert!(templates.len() >= 21, "{}", templates.len());
    let mut failures = Vec::new();
    for (name, template) in &templates {
        let prompt = match tiny_prompt(&setup, name, template) {
            Ok(prompt) => prompt,
            Err(error) => {
                failures.push(format!("{name}: {error}"));
                continue;
            }
        };
        let saves = prompt
            .as_object()
            .unwrap()
            .values()
            .filter(|node| node["class_type"] == "SaveImage")
            .count();
        let events = match run_prompt(&setup, prompt) {
            Ok(events) => events,
            Err(error) => {
                failures.push(format!("{name}: invalid: {error}"));
                continue;
            }
        };
        let errors: Vec<String> = events
            .iter()
            .filter(|event| event.kind == EventKind::ExecutionError)
            .map(|event| event.data.to_string())
            .collect();
        if !errors.is_empty() {
            failures.push(format!("{name}: {errors:?}"));
            continue;
        }
        assert!(
            events.iter().any(|event| event.kind == EventKind::ExecutionSuccess),
            "{name}"
        );
        // Every SaveImage saved at least one PNG (a batch may save more).
        let saved = files_under(&paths.output.join(name));
        if saves == 0 || saved.len() < saves || !saved.iter().all(|file| file.ends_with(".png")) {
            failures.push(format!("{name}: {saves} SaveImage nodes saved {saved:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The rules make a template small: its model files name tiny models, its sizes and steps
/// shrink within the schema's bounds, its embedding and image are the bundled ones.
#[test]
fn a_template_is_made_small_by_rules_over_its_own_inputs() {
    let setup = setup();
    let templates = templates();
    let find = |name: &str| &templates.iter().find(|(n, _)| n == name).expect("vendored").1;

    let area = tiny_prompt(&setup, "area_composition", find("area_composition")).unwrap();
    // The upscale's 1088×1920 becomes 72×128 (÷15), the 704×1280 latent 48×88; the 704×384
    // areas keep ConditioningSetArea's minimum height 64.
    assert_eq!(area["22"]["inputs"]["width"], 72);
    assert_eq!(area["22"]["inputs"]["height"], 128);
    assert_eq!(area["5"]["inputs"]["width"], 48);
    assert_eq!(area["5"]["inputs"]["height"], 88);
    assert_eq!(area["18"]["inputs"]["height"], 64);
    assert_eq!(area["18"]["inputs"]["y"], 48);
    assert_eq!(area["20"]["inputs"]["vae_name"], TINY_SDXL_VAE);
    assert_eq!(area["44"]["inputs"]["ckpt_name"], TINY_SD1_CHECKPOINT);
    assert_eq!(area["3"]["inputs"]["steps"], 3);

    let refiner = tiny_prompt(&setup, "sdxl_refiner", find("sdxl_refiner_prompt_example")).unwrap();
    // 25 steps, the base's 0–20 and the refiner's 20–10000: 3 steps, 0–2 and 2–10000.
    assert_eq!(refiner["10"]["inputs"]["steps"], 3);
    assert_eq!(refiner["10"]["inputs"]["end_at_step"], 2);
    assert_eq!(refiner["11"]["inputs"]["start_at_step"], 2);
    assert_eq!(refiner["11"]["inputs"]["end_at_step"], 10000);
    assert_eq!(refiner["12"]["inputs"]["ckpt_name"], TINY_SDXL_REFINER_CHECKPOINT);
    assert_eq!(refiner["19"]["inputs"]["filename_prefix"], "sdxl_refiner/ComfyUI");

    let embedding = tiny_prompt(&setup, "embedding", find("embedding_example")).unwrap();
    assert_eq!(
        embedding["6"]["inputs"]["text"],
        format!("photograph in the style of embedding:{TINY_EMBEDDING} girl with blonde hair\nlandscape scenery view")
    );
    assert_eq!(embedding["4"]["inputs"]["ckpt_name"], TINY_SD2_CHECKPOINT);

    let outpaint = tiny_prompt(&setup, "outpaint", find("flux_fill_outpaint_example")).unwrap();
    assert_eq!(outpaint["44"]["inputs"]["left"], 32);
    assert_eq!(outpaint["44"]["inputs"]["top"], 0);
    assert_eq!(outpaint["17"]["inputs"]["image"], "example.png");
    assert_eq!(outpaint["31"]["inputs"]["unet_name"], TINY_FLUX_FILL);
    assert_eq!(outpaint["34"]["inputs"]["clip_name2"], TINY_T5);

    // A node saved without widget values has the values a new widget has.
    let default = tiny_prompt(&setup, "default", find("default")).unwrap();
    assert_eq!(default["9"]["inputs"]["filename_prefix"], "default/ComfyUI");

    let img2img = tiny_prompt(&setup, "img2img", find("image2image")).unwrap();
    assert_eq!(img2img["18"]["inputs"]["megapixels"], 0.01);

    assert_eq!(
        stand_in("unet_name", "hidream_i1_dev_fp8.safetensors", false)
            .unwrap()
            .unwrap_err(),
        "no tiny model stands in for unet_name = \"hidream_i1_dev_fp8.safetensors\""
    );
    assert!(stand_in("sampler_name", "euler", false).is_none());
    // A FLUX template's LoRA is the tiny FLUX LoRA.
    let one_reward = tiny_prompt(&setup, "one_reward", find("image_flux.1_fill_dev_OneReward")).unwrap();
    let loras: Vec<&Json> = one_reward
        .as_object()
        .unwrap()
        .values()
        .filter_map(|node| node["inputs"].get("lora_name"))
        .collect();
    assert!(
        !loras.is_empty() && loras.iter().all(|name| *name == TINY_FLUX_LORA_KOHYA),
        "{loras:?}"
    );
}
