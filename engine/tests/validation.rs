//! Validation parity with ComfyUI 0.3.64: every captured `POST /prompt` error, plus what ComfyUI
//! cannot report (cycles, self-links) and graphs too deep for recursion.

mod common;

use common::{fixture, registry_from_object_info, test_nodes, without_tracebacks};
use easel_engine::validate::ValidationFailure;
use easel_engine::{validate_prompt, Prompt, Services};
use serde_json::{json, Value as Json};

#[test]
fn every_captured_validation_error_matches() {
    let registry = registry_from_object_info(&fixture("object_info_sd15.json"));
    let services = Services::new();
    let mut checked = 0;
    for case in fixture("errors.json").as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let response = &case["response"];
        let Some(body) = case["request"].get("json_body") else {
            // Malformed JSON never reaches the engine: the server answers 500 (tested there).
            assert_eq!(response["status"], 500, "{id}");
            continue;
        };
        let failure = match body.get("prompt") {
            None => ValidationFailure::no_prompt(),
            Some(prompt) => {
                let prompt = Prompt::from_json(prompt.clone()).unwrap();
                validate_prompt(&registry, &services, prompt, None).expect_err(id)
            }
        };
        assert_eq!(response["status"], 400, "{id}");
        let expected = without_tracebacks(response["body"].clone());
        let actual = without_tracebacks(failure.to_json());
        assert_eq!(
            serde_json::to_string(&actual).unwrap(),
            serde_json::to_string(&expected).unwrap(),
            "case {id}"
        );
        checked += 1;
    }
    assert_eq!(checked, 12);
}

#[allow(clippy::result_large_err)]
fn validate(prompt: Json) -> Result<easel_engine::ValidatedPrompt, ValidationFailure> {
    let nodes = test_nodes();
    validate_prompt(
        &nodes.registry,
        &Services::new(),
        Prompt::from_json(prompt).unwrap(),
        None,
    )
}

#[test]
fn conversions_are_written_back() {
    let ok = validate(json!({
        "1": {"class_type": "Int", "inputs": {"value": "12"}},
        "2": {"class_type": "Int", "inputs": {"value": {"__value__": 3.9}}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}, "_meta": {"title": "out"}}
    }))
    .unwrap();
    assert_eq!(ok.prompt.input("1", "value"), Some(&json!(12)));
    assert_eq!(ok.prompt.input("2", "value"), Some(&json!(3)));
    assert_eq!(ok.prompt.title("4"), Some("out"));
    assert_eq!(ok.outputs_to_execute, ["4"]);
}

#[test]
fn cycles_and_self_links_are_errors_not_hangs() {
    let err = validate(json!({
        "1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["2", 0]}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}}
    }))
    .unwrap_err();
    let errors = &err.node_errors.to_json()["2"]["errors"][0];
    assert_eq!(errors["type"], "exception_during_inner_validation");
    assert_eq!(errors["extra_info"]["exception_type"], "DependencyCycleError");
    assert!(errors["details"]
        .as_str()
        .unwrap()
        .contains("Dependency cycle detected"));

    // Show has no outputs, so its self-link fails on the slot, as in ComfyUI.
    let err = validate(json!({"1": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})).unwrap_err();
    assert_eq!(
        err.node_errors.to_json()["1"]["errors"][0]["extra_info"]["exception_type"],
        "IndexError"
    );

    let err = validate(json!({
        "1": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}
    }))
    .unwrap_err();
    assert_eq!(
        err.node_errors.to_json()["1"]["errors"][0]["extra_info"]["exception_type"],
        "DependencyCycleError"
    );
}

#[test]
fn bad_links_are_reported_like_comfyui() {
    let err = validate(json!({
        "1": {"class_type": "Int", "inputs": {"value": 1}},
        "2": {"class_type": "Add", "inputs": {"a": ["1"], "b": ["1", 0, 3]}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}
    }))
    .unwrap_err();
    let node_errors = err.node_errors.to_json();
    let errors = node_errors["2"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    assert!(errors.iter().all(|e| e["type"] == "bad_linked_input"));
    assert_eq!(err.node_errors.to_json()["2"]["dependent_outputs"], json!(["3"]));

    let err = validate(json!({"3": {"class_type": "Show", "inputs": {"value": ["9", 0]}}})).unwrap_err();
    let error = &err.node_errors.to_json()["3"]["errors"][0];
    assert_eq!(error["type"], "exception_during_validation");
    assert_eq!(error["details"], "'9'");
    assert_eq!(err.error["details"], "Exception when validating node: '9'");

    let err = validate(json!({
        "1": {"class_type": "Int", "inputs": {"value": 1}},
        "3": {"class_type": "Show", "inputs": {"value": ["1", 1.5]}}
    }))
    .unwrap_err();
    assert_eq!(
        err.node_errors.to_json()["3"]["errors"][0]["extra_info"]["exception_type"],
        "TypeError"
    );
}

#[test]
fn prompt_level_errors() {
    let err = validate(json!({"1": {"inputs": {}}})).unwrap_err();
    assert_eq!(
        err.error["message"],
        "Cannot execute because a node is missing the class_type property."
    );
    assert_eq!(err.error["details"], "Node ID '#1'");
    let err = validate(json!({"1": {"class_type": 5, "inputs": {}}})).unwrap_err();
    assert_eq!(err.error["message"], "Cannot execute because node 5 does not exist.");
    let err = validate(json!({})).unwrap_err();
    assert_eq!(err.error["type"], "prompt_no_outputs");
    assert!(Prompt::from_json(json!([1, 2])).is_err());
}

#[test]
fn partial_success_and_targets() {
    let prompt = json!({
        "1": {"class_type": "Int", "inputs": {"value": 1}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "Show", "inputs": {}}
    });
    let ok = validate(prompt.clone()).unwrap();
    assert_eq!(ok.outputs_to_execute, ["2"]);
    assert_eq!(
        ok.node_errors.to_json()["3"]["errors"][0]["type"],
        "required_input_missing"
    );
    assert_eq!(ok.node_errors.to_json()["3"]["dependent_outputs"], json!(["3"]));

    let nodes = test_nodes();
    let targets = vec!["3".to_string()];
    let err = validate_prompt(
        &nodes.registry,
        &Services::new(),
        Prompt::from_json(prompt.clone()).unwrap(),
        Some(&targets),
    )
    .unwrap_err();
    assert_eq!(err.error["details"], "Required input is missing: value");
    let none: Vec<String> = vec![];
    let err = validate_prompt(
        &nodes.registry,
        &Services::new(),
        Prompt::from_json(prompt).unwrap(),
        Some(&none),
    )
    .unwrap_err();
    assert_eq!(err.error["type"], "prompt_no_outputs");
}

#[test]
fn range_and_type_errors_use_python_formatting() {
    let err = validate(json!({
        "1": {"class_type": "Int", "inputs": {"value": 1e9}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}
    }))
    .unwrap_err();
    assert_eq!(
        err.node_errors.to_json()["1"]["errors"][0]["message"],
        "Value 1000000000 bigger than max of 1000"
    );
    let err = validate(json!({
        "1": {"class_type": "Int", "inputs": {"value": null}},
        "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}
    }))
    .unwrap_err();
    assert_eq!(
        err.node_errors.to_json()["1"]["errors"][0]["details"],
        "value, None, int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"
    );
}

#[test]
fn a_100000_node_chain_validates_without_overflow() {
    let mut prompt = serde_json::Map::new();
    prompt.insert("0".into(), json!({"class_type": "Int", "inputs": {"value": 1}}));
    for i in 1..100_000 {
        prompt.insert(
            i.to_string(),
            json!({"class_type": "Add", "inputs": {"a": [(i - 1).to_string(), 0], "b": [(i - 1).to_string(), 0]}}),
        );
    }
    prompt.insert(
        "out".into(),
        json!({"class_type": "Show", "inputs": {"value": ["99999", 0]}}),
    );
    let ok = validate(Json::Object(prompt.clone())).unwrap();
    assert_eq!(ok.outputs_to_execute, ["out"]);

    // A cycle at the bottom of the chain is still found.
    prompt.insert(
        "0".into(),
        json!({"class_type": "Add", "inputs": {"a": ["99999", 0], "b": ["1", 0]}}),
    );
    assert!(validate(Json::Object(prompt)).is_err());
}

/// A V3 combo (`COMBO` with `options`) is checked against its options, with ComfyUI's error.
#[test]
fn a_v3_combo_value_outside_its_options_fails_validation() {
    use easel_engine::schema::{InputSpec, NodeSchema};
    let schema = NodeSchema::v3("Pick", "test", "test").output_node().required(
        "mode",
        InputSpec::of("COMBO")
            .opt("multiselect", false)
            .opt("options", json!(["Starts With", "Equal"])),
    );
    let (pick, _) = common::TestNode::new(schema, |_, _| Ok(easel_engine::NodeOutput::default()));
    let mut registry = easel_engine::NodeRegistry::new();
    registry.register(pick);
    let prompt =
        |mode: &str| Prompt::from_json(json!({"1": {"class_type": "Pick", "inputs": {"mode": mode}}})).unwrap();
    assert!(validate_prompt(&registry, &Services::new(), prompt("Equal"), None).is_ok());
    let failure = validate_prompt(&registry, &Services::new(), prompt("Shout"), None).unwrap_err();
    let error = &failure.node_errors.to_json()["1"]["errors"][0];
    assert_eq!(error["type"], "value_not_in_list");
    assert_eq!(error["details"], "mode: 'Shout' not in ['Starts With', 'Equal']");
    assert_eq!(
        error["extra_info"]["input_config"],
        json!(["COMBO", {"multiselect": false, "options": ["Starts With", "Equal"]}])
    );
}
