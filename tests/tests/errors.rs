//! Every `POST /prompt` error ComfyUI 0.3.64 gave in `shared/reference/errors.json`, over HTTP:
//! status, content type and body. The txt2img nodes whose errors are captured are declared from
//! their captured schemas (validation needs only schemas); tracebacks, which are Python frames,
//! are left out of the comparison. Easel adds one key, `extra_info.model_folder` on a missing
//! model file's error; the comparison checks it and takes it out.

mod common;
#[path = "../../engine/tests/common/mod.rs"]
mod engine_common;

use common::start_with_registry;
use engine_common::{schema_from_object_info, without_tracebacks, DeclaredOnly};
use serde_json::{json, Value as Json};

fn engine_fixture(name: &str) -> Json {
    let path = common::workspace().join("engine/tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_captured_prompt_error_over_http() {
    let mut registry = easel_nodes::builtin_registry();
    for entry in engine_fixture("object_info_sd15.json").as_object().unwrap().values() {
        if !registry.contains(entry["name"].as_str().unwrap()) {
            registry.register(DeclaredOnly(schema_from_object_info(entry)));
        }
    }
    let server = start_with_registry(registry);
    // The reference server had one checkpoint; validation only looks at the folder listing.
    let checkpoints = server.base.path().join("models/checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    std::fs::write(checkpoints.join("sd15_random.safetensors"), b"").unwrap();
    let cases = engine_fixture("errors.json");
    for case in cases.as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let request = &case["request"];
        let body = match request.get("json_body") {
            Some(json) => json.to_string(),
            None => request["raw_body"].as_str().unwrap().to_string(),
        };
        let (status, content_type, text) = server.api.post("/prompt", &body);
        let expected = &case["response"];
        assert_eq!(status, expected["status"].as_u64().unwrap() as u16, "{id}");
        assert_eq!(content_type, expected["content_type"].as_str().unwrap(), "{id}");
        if expected["body_kind"] == "text" {
            assert_eq!(text, expected["body"].as_str().unwrap(), "{id}");
        } else {
            let mut actual: Json = serde_json::from_str(&text).unwrap();
            // Easel's one addition: a missing model file's error names the folder it belongs in.
            if id == "extra_ckpt_not_in_list" {
                let extra_info = &mut actual["node_errors"]["4"]["errors"][0]["extra_info"];
                let folder = extra_info.as_object_mut().unwrap().remove("model_folder");
                assert_eq!(folder, Some(json!("checkpoints")), "{id}");
            }
            assert_eq!(
                serde_json::to_string(&without_tracebacks(actual)).unwrap(),
                serde_json::to_string(&without_tracebacks(expected["body"].clone())).unwrap(),
                "{id}"
            );
        }
    }
}
