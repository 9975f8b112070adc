//! Every built-in node's `/object_info` entry equals ComfyUI 0.3.64's, key order included. Combos
//! filled from folders (LoadImage's file list) are compared after substituting the captured list.
//! ComfyUI-GGUF's and comfyui_controlnet_aux's nodes were not installed in the captured run: their
//! entries (`object_info_gguf_nodes.json`, `object_info_controlnet_aux_nodes.json`) are written
//! from the packs' `INPUT_TYPES`, display names and `CATEGORY` as ComfyUI serialises V1 nodes
//! (AIO_Preprocessor's list holding the preprocessors Easel has: the pack's holds every one it
//! could import, which depends on the machine). ComfyUI_IPAdapter_plus's, ComfyUI-IC-Light's and
//! the relight nodes of ComfyUI-KJNodes and WAS Node Suite (`object_info_ipadapter_nodes.json`,
//! `object_info_ic_light_nodes.json`, `object_info_light_map_nodes.json`) are copied from
//! `GET /object_info` of ComfyUI 0.3.64 run with the packs installed; comfyui-inpaint-nodes'
//! (`object_info_inpaint_nodes.json`) are its V3 nodes' own `GET_NODE_INFO_V1()`, which that
//! route returns (written by `fixtures/generate_inpaint_nodes.py`).

use easel_engine::Services;
use easel_nodes::builtin_registry;
use serde_json::Value as Json;

fn reference() -> Json {
    let read = |name: &str| -> Json {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let mut reference = read("object_info_nodes.json");
    for pack in [
        "object_info_gguf_nodes.json",
        "object_info_controlnet_aux_nodes.json",
        "object_info_ipadapter_nodes.json",
        "object_info_ic_light_nodes.json",
        "object_info_light_map_nodes.json",
        "object_info_inpaint_nodes.json",
    ] {
        let Json::Object(entries) = read(pack) else {
            panic!("{pack} is an object");
        };
        reference.as_object_mut().unwrap().extend(entries);
    }
    reference
}

/// Inputs whose combo lists come from the disk rather than from the node.
const FILE_COMBOS: &[(&str, &str)] = &[
    ("LoadImage", "image"),
    ("ImageOnlyCheckpointLoader", "ckpt_name"),
    ("LoadImageMask", "image"),
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("unCLIPCheckpointLoader", "ckpt_name"),
    ("CLIPVisionLoader", "clip_name"),
    ("StyleModelLoader", "style_model_name"),
    ("GLIGENLoader", "gligen_name"),
    ("IPAdapterModelLoader", "ipadapter_file"),
    ("LoadAndApplyICLightUnet", "model_path"),
    ("CheckpointLoader", "config_name"),
    ("CheckpointLoader", "ckpt_name"),
    ("LoraLoader", "lora_name"),
    ("LoraLoaderModelOnly", "lora_name"),
    ("UNETLoader", "unet_name"),
    ("CLIPLoader", "clip_name"),
    ("DualCLIPLoader", "clip_name1"),
    ("DualCLIPLoader", "clip_name2"),
    ("VAELoader", "vae_name"),
    ("DiffusersLoader", "model_path"),
    ("UnetLoaderGGUF", "unet_name"),
    ("UnetLoaderGGUFAdvanced", "unet_name"),
    ("CLIPLoaderGGUF", "clip_name"),
    ("DualCLIPLoaderGGUF", "clip_name1"),
    ("DualCLIPLoaderGGUF", "clip_name2"),
    ("CreateHookLora", "lora_name"),
    ("CreateHookLoraModelOnly", "lora_name"),
    ("CreateHookModelAsLora", "ckpt_name"),
    ("CreateHookModelAsLoraModelOnly", "ckpt_name"),
];

#[test]
fn every_registered_node_matches_comfyui_object_info() {
    let reference = reference();
    let registry = builtin_registry();
    let ours = registry.object_info(&Services::new());
    let mut compared = 0;
    for name in registry.class_names() {
        let expected = reference
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no reference entry"));
        let mut actual = ours[name].clone();
        for &(class, input) in FILE_COMBOS {
            if class == name {
                actual["input"]["required"][input][0] = expected["input"]["required"][input][0].clone();
            }
        }
        assert_eq!(
            serde_json::to_string_pretty(&actual).unwrap(),
            serde_json::to_string_pretty(expected).unwrap(),
            "{name}"
        );
        compared += 1;
    }
    assert_eq!(
        compared,
        reference.as_object().unwrap().len(),
        "a reference node is not registered"
    );
}
