//! Every bundled workflow (`workflows/*.json`, `workflows/rest/v1/*.json`) runs on the tiny test models and the bundled input
//! images, saves what its `SaveImage` nodes name, and saves the same bytes when run again.

mod common;

use common::{run_prompt, setup};
use easel_engine::events::EventKind;
use easel_nodes::paths::Paths;

const WORKFLOWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../workflows");

#[test]
fn every_bundled_workflow_runs_and_saves_its_images() {
    let setup = setup();
    let paths = setup.services.get::<Paths>().unwrap();
    for entry in std::fs::read_dir(format!("{WORKFLOWS}/input")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), paths.input.join(entry.file_name())).unwrap();
    }
    // The bundled workflows, and those the REST API builds its prompts from.
    let mut workflows: Vec<_> = [WORKFLOWS.to_string(), format!("{WORKFLOWS}/rest/v1")]
        .iter()
        .flat_map(|folder| std::fs::read_dir(folder).unwrap())
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "json"))
        .collect();
    workflows.sort();
    assert!(workflows.len() >= 5, "{workflows:?}");
    // Every workflow runs twice: the second run must save the same bytes.
    let mut stems = std::collections::BTreeSet::new();
    for path in workflows.iter().chain(&workflows) {
        let workflow: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let prefixes: Vec<String> = workflow
            .as_object()
            .unwrap()
            .values()
            .filter(|node| node["class_type"] == "SaveImage")
            .map(|node| node["inputs"]["filename_prefix"].as_str().unwrap().to_string())
            .collect();
        let events = run_prompt(&setup, workflow).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let errors: Vec<_> = events
            .iter()
            .filter(|event| event.kind == EventKind::ExecutionError)
            .map(|event| event.data.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        assert!(events.iter().any(|event| event.kind == EventKind::ExecutionSuccess));
        for prefix in prefixes {
            stems.insert(prefix.rsplit('/').next().unwrap_or(&prefix).to_string());
            // A prefix may name a subfolder of the output directory.
            let target = paths.output.join(&prefix);
            let stem = target.file_name().unwrap().to_string_lossy().into_owned();
            let saved = std::fs::read_dir(target.parent().unwrap()).unwrap().any(|entry| {
                entry
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{stem}_"))
            });
            assert!(saved, "{}: nothing saved as {prefix}", path.display());
        }
    }
    let mut saved: std::collections::BTreeMap<String, Vec<std::path::PathBuf>> = Default::default();
    let mut folders = vec![paths.output.clone()];
    let mut files = Vec::new();
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // `prefix_NNNNN_.png`: the counter goes on from the first run to the second.
        if let Some(stem) = name
            .strip_suffix("_.png")
            .and_then(|n| n.rsplit_once('_'))
            .map(|(stem, _)| stem)
        {
            saved.entry(stem.to_string()).or_default().push(path);
        }
    }
    assert!(stems.iter().all(|stem| saved.contains_key(stem)), "{stems:?} {saved:?}");
    for (stem, mut files) in saved {
        files.sort();
        assert!(files.len() % 2 == 0, "{stem}: {files:?}");
        let (first, second) = files.split_at(files.len() / 2);
        for (a, b) in first.iter().zip(second) {
            assert_eq!(
                std::fs::read(a).unwrap(),
                std::fs::read(b).unwrap(),
                "{stem}: {a:?} vs {b:?}"
            );
        }
    }
    // The SDXL checkpoint split into separate files (UNet, CLIP-L, CLIP-G converted to the
    // transformers layout, VAE) makes the checkpoint's image, pixel for pixel.
    let pixels = |name: &str| image::open(paths.output.join(name)).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels("sdxl_split_files_00001_.png"), pixels("sdxl_txt2img_00001_.png"));
}

/// A workflow saved in the frontend's UI format becomes the API prompt of the same graph: widget
/// values in schema order (the seed's `control_after_generate` and LoadImageMask's upload value
/// skipped), links through a Reroute and a bypassed loader, a PrimitiveNode's value kept as its
/// target's widget value, and the muted SaveImage, the Note and the virtual nodes left out.
#[test]
fn a_ui_format_workflow_converts_to_its_api_prompt() {
    use easel_engine::ui_workflow::{is_ui_workflow, to_api_prompt};
    let setup = setup();
    let ui = common::fixture_json("ui_workflow_sd15_lora.json");
    assert!(is_ui_workflow(&ui));
    let mut converted = to_api_prompt(&ui, &setup.registry, &setup.services).unwrap();
    let mask_loader = converted.as_object_mut().unwrap().remove("16").unwrap();
    assert_eq!(
        mask_loader["inputs"],
        serde_json::json!({"image": "example.png", "channel": "alpha"})
    );
    let mut api: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{WORKFLOWS}/sd15_lora.json")).unwrap()).unwrap();
    // The built-in page's manifest is not part of the frontend's workflow.
    for node in api.as_object_mut().unwrap().values_mut() {
        node["_meta"].as_object_mut().unwrap().remove("easel");
    }
    assert!(!is_ui_workflow(&api));
    assert_eq!(converted, api);
}

/// Workflows with subgraphs made by the official frontend 1.58.1 convert to what that frontend's
/// own graphToPrompt queued for them (`*.api.json`, captured from the frontend). In the first the
/// prompts and the KSampler became a subgraph (seed and both texts promoted to the instance,
/// whose text was then changed; steps fed by the outer PrimitiveNode): inner nodes keyed
/// `"17:6"`, links through the boundaries, the instance's values for promoted inputs. In the
/// second that instance and the VAEDecode became a subgraph in turn (`"18:17:6"`, an inner
/// instance's output leaving through the outer one's).
#[test]
fn ui_workflows_with_subgraphs_convert_as_the_frontend_flattens_them() {
    use easel_engine::ui_workflow::to_api_prompt;
    let setup = setup();
    for name in [
        "ui_workflow_sd15_lora_subgraph",
        "ui_workflow_sd15_lora_nested_subgraph",
    ] {
        let ui = common::fixture_json(&format!("{name}.json"));
        let converted = to_api_prompt(&ui, &setup.registry, &setup.services).unwrap();
        assert_eq!(converted, common::fixture_json(&format!("{name}.api.json")), "{name}");
    }
    let ui = common::fixture_json("ui_workflow_sd15_lora_subgraph.json");
    let converted = to_api_prompt(&ui, &setup.registry, &setup.services).unwrap();
    assert_eq!(converted["17:6"]["inputs"]["text"], "INSTANCE TEXT");
    assert_eq!(converted["17:3"]["inputs"]["positive"], serde_json::json!(["17:6", 0]));
}
