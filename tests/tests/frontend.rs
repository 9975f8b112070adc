//! The requests the official frontend (1.27.10) makes at start-up (protocol §8.1), and the user data
//! and settings routes behind them.

mod common;

use common::{agent, start, start_with};
use easel_server::state::ServerSettings;
use serde_json::{json, Value as Json};

#[test]
fn the_frontend_start_up_sequence_is_answered() {
    let server = start();
    let api = &server.api;
    assert_eq!(
        api.get_json("/api/users"),
        json!({"storage": "server", "migrated": false})
    );
    assert_eq!(api.get_json("/api/i18n"), json!({}));
    assert_eq!(api.get_json("/api/settings"), json!({}));
    assert_eq!(api.post("/api/settings/Comfy.InstalledVersion", "\"1.27.10\"").0, 200);
    assert_eq!(api.get_json("/api/settings/Comfy.InstalledVersion"), json!("1.27.10"));
    assert_eq!(
        api.get_json("/api/users"),
        json!({"storage": "server", "migrated": true})
    );
    assert_eq!(api.post("/api/settings", r#"{"Comfy.TutorialCompleted": true}"#).0, 200);
    assert_eq!(
        api.get_json("/api/settings"),
        json!({"Comfy.InstalledVersion": "1.27.10", "Comfy.TutorialCompleted": true})
    );
    assert_eq!(
        api.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")
            .0,
        404
    );
    assert_eq!(api.get("/api/userdata/comfy.templates.json").0, 404);
    assert_eq!(api.get_json("/api/workflow_templates"), json!({}));
    let models = api.get_json("/api/experiment/models");
    assert_eq!(models[0]["name"], "checkpoints");
    assert!(!models.as_array().unwrap().iter().any(|m| m["name"] == "configs"));
    assert_eq!(api.get_json("/internal/files/input"), json!(["example.png"]));
    assert_eq!(api.get("/internal/files/bogus").0, 400);
    assert_eq!(api.get("/api/internal/folder_paths").0, 404);
    assert!(api.get_json("/internal/folder_paths")["checkpoints"][0]
        .as_str()
        .unwrap()
        .ends_with("models/checkpoints"));
}

#[test]
fn user_data_files_are_written_listed_moved_and_deleted() {
    let server = start();
    let api = &server.api;
    let (status, _, text) = api.post("/api/userdata/workflows%2Fa.json", r#"{"nodes": []}"#);
    assert_eq!((status, text.as_str()), (200, "\"workflows/a.json\""));
    let (status, _, text) = api.post("/api/userdata/workflows%2Fa.json?overwrite=false", "{}");
    assert_eq!((status, text.as_str()), (409, "File already exists"));
    api.post("/api/userdata/workflows%2Fsub%2Fb.json?full_info=true", "{}");

    let mut listed: Vec<Json> = api
        .get_json("/api/userdata?dir=workflows&recurse=true")
        .as_array()
        .unwrap()
        .clone();
    listed.sort_by_key(|v| v.to_string());
    assert_eq!(listed, [json!("a.json"), json!("sub/b.json")]);
    assert_eq!(api.get_json("/api/userdata?dir=workflows"), json!(["a.json"]));
    let split = api.get_json("/api/userdata?dir=workflows/sub&split=true");
    assert_eq!(split, json!([["b.json", "b.json"]]));
    let full = api.get_json("/api/userdata?dir=workflows&full_info=true");
    assert_eq!(full[0]["size"], 13);
    let v2 = api.get_json("/api/v2/userdata");
    let names: Vec<&str> = v2
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    // Directories first, then by lower-cased name (not path), as ComfyUI sorts.
    assert_eq!(
        names,
        ["workflows/sub", "workflows", "workflows/a.json", "workflows/sub/b.json"]
    );

    let (status, _, body) = api.get("/api/userdata/workflows%2Fa.json");
    assert_eq!((status, body.as_slice()), (200, br#"{"nodes": []}"#.as_slice()));
    let moved = agent()
        .post(format!(
            "{}/api/userdata/workflows%2Fa.json/move/workflows%2Fc.json",
            api.url
        ))
        .send_empty()
        .unwrap();
    assert_eq!(moved.status().as_u16(), 200);
    assert_eq!(api.get("/api/userdata/workflows%2Fa.json").0, 404);
    let deleted = agent()
        .delete(format!("{}/api/userdata/workflows%2Fc.json", api.url))
        .call()
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    assert_eq!(api.get("/api/userdata/..%2F..%2Fsecret").0, 403);
    assert_eq!(api.get("/api/userdata?dir=..").0, 403);
}

/// (status, body) of a request acting for `user` through the `comfy-user` header.
fn as_user(url: &str, user: &str, body: Option<&str>) -> (u16, String) {
    let mut response = match body {
        Some(body) => agent().post(url).header("comfy-user", user).send(body),
        None => agent().get(url).header("comfy-user", user).call(),
    }
    .unwrap();
    (
        response.status().as_u16(),
        response.body_mut().read_to_string().unwrap(),
    )
}

#[test]
fn multi_user_keeps_each_users_data_apart() {
    let server = start_with(ServerSettings {
        multi_user: true,
        ..Default::default()
    });
    let api = &server.api;
    assert_eq!(api.get_json("/api/users"), json!({"storage": "server", "users": {}}));
    let (status, _, bob) = api.post("/api/users", r#"{"username": " bob  o'neil! "}"#);
    assert_eq!(status, 200);
    let bob: String = serde_json::from_str(&bob).unwrap();
    assert!(
        bob.starts_with("bob-o-neil-_") && bob.len() == "bob-o-neil-_".len() + 36,
        "{bob}"
    );
    let (_, _, ann) = api.post("/api/users", r#"{"username": "ann"}"#);
    let ann: String = serde_json::from_str(&ann).unwrap();
    for (name, error) in [
        ("ann", "Duplicate username."),
        ("  ", "username not provided"),
        ("__system", "System User prefix not allowed"),
    ] {
        let (status, _, body) = api.post("/api/users", &json!({ "username": name }).to_string());
        assert_eq!(
            (status, serde_json::from_str::<Json>(&body).unwrap()),
            (400, json!({ "error": error }))
        );
    }
    let users = json!({"storage": "server", "users": {bob.clone(): "bob  o'neil!", ann.clone(): "ann"}});
    assert_eq!(api.get_json("/api/users"), users);
    let recorded: Json =
        serde_json::from_slice(&std::fs::read(server.base.path().join("user/users.json")).unwrap()).unwrap();
    assert_eq!(recorded, users["users"]);

    // Each user reads and writes under their own directory.
    let file = format!("{}/api/userdata/workflows%2Fa.json", api.url);
    assert_eq!(
        as_user(&file, &bob, Some("{}")),
        (200, "\"workflows/a.json\"".to_string())
    );
    assert!(server
        .base
        .path()
        .join("user")
        .join(&bob)
        .join("workflows/a.json")
        .is_file());
    assert_eq!(as_user(&file, &bob, None), (200, "{}".to_string()));
    assert_eq!(as_user(&file, &ann, None).0, 404);
    let settings = format!("{}/api/settings/Comfy.Theme", api.url);
    assert_eq!(as_user(&settings, &ann, Some("\"dark\"")).0, 200);
    assert_eq!(as_user(&settings, &ann, None), (200, "\"dark\"".to_string()));
    assert_eq!(as_user(&settings, &bob, None), (200, "null".to_string()));

    // Unknown users (no header means `default`, which is not a user here) and system ids fail as in
    // ComfyUI: 500, 401 on settings, 403 on /v2/userdata.
    assert_eq!(api.get("/api/userdata/workflows%2Fa.json").0, 500);
    assert_eq!(as_user(&file, "__system", None).0, 500);
    assert_eq!(as_user(&file, "mallory", Some("{}")).0, 500);
    assert_eq!(
        as_user(&settings, "mallory", None),
        (401, "401: Unauthorized".to_string())
    );
    assert_eq!(
        as_user(&format!("{}/api/v2/userdata", api.url), "mallory", None),
        (403, "Invalid user specified in request".to_string())
    );
    assert!(!server.base.path().join("user/mallory").exists());
}

#[test]
fn a_user_id_never_leaves_the_user_directory() {
    let base = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(base.path().join("user")).unwrap();
    std::fs::write(base.path().join("user/users.json"), r#"{"..": "up", "ok": "ok"}"#).unwrap();
    let server = common::start_in(
        base,
        ServerSettings {
            multi_user: true,
            ..Default::default()
        },
    );
    let file = format!("{}/api/userdata/x.json", server.api.url);
    assert_eq!(as_user(&file, "..", Some("{}")).0, 500);
    assert_eq!(as_user(&file, "ok", Some("{}")).0, 200);
    assert!(server.base.path().join("user/ok/x.json").is_file());
}

#[test]
fn without_multi_user_the_user_header_is_ignored() {
    let server = start();
    let file = format!("{}/api/userdata/notes.txt", server.api.url);
    assert_eq!(as_user(&file, "bob", Some("hi")).0, 200);
    assert!(server.base.path().join("user/default/notes.txt").is_file());
    assert_eq!(as_user(&file, "anyone", None), (200, "hi".to_string()));
}

#[test]
fn a_frontend_directory_is_served_behind_the_same_key() {
    let web = tempfile::tempdir().unwrap();
    std::fs::write(web.path().join("index.html"), "<html>easel</html>").unwrap();
    std::fs::create_dir_all(web.path().join("assets")).unwrap();
    std::fs::write(web.path().join("assets/app.js"), "console.log(1)").unwrap();
    std::fs::create_dir_all(web.path().join("extensions/core")).unwrap();
    std::fs::write(web.path().join("extensions/core/groupNode.js"), "").unwrap();
    let settings = easel_server::state::ServerSettings {
        api_keys: vec!["k".into()],
        front_end_root: Some(web.path().to_path_buf()),
        ..Default::default()
    };
    let server = common::start_with(settings);
    let url = &server.api.url;
    assert_eq!(agent().get(format!("{url}/")).call().unwrap().status().as_u16(), 401);
    let mut index = agent().get(format!("{url}/")).header("X-API-KEY", "k").call().unwrap();
    assert_eq!(index.headers().get("cache-control").unwrap(), "no-cache");
    assert_eq!(index.body_mut().read_to_string().unwrap(), "<html>easel</html>");
    let script = agent()
        .get(format!("{url}/assets/app.js"))
        .header("X-API-KEY", "k")
        .call()
        .unwrap();
    assert_eq!(script.status().as_u16(), 200);
    let api = agent()
        .get(format!("{url}/api/queue"))
        .header("X-API-KEY", "k")
        .call()
        .unwrap();
    assert_eq!(api.status().as_u16(), 200);
    let mut extensions = agent()
        .get(format!("{url}/api/extensions"))
        .header("X-API-KEY", "k")
        .call()
        .unwrap();
    assert_eq!(
        extensions.body_mut().read_to_string().unwrap(),
        r#"["/extensions/core/groupNode.js"]"#
    );
}

#[test]
fn safetensors_metadata_is_shown() {
    let server = start();
    let header = br#"{"__metadata__": {"format": "pt", "ss_name": "lora"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0, 0, 0, 0]);
    std::fs::write(server.base.path().join("models/loras/style.safetensors"), &file).unwrap();
    assert_eq!(
        server
            .api
            .get_json("/api/view_metadata/loras?filename=style.safetensors"),
        json!({"format": "pt", "ss_name": "lora"})
    );
    assert_eq!(server.api.get("/view_metadata/loras?filename=style.ckpt").0, 404);
    assert_eq!(
        server.api.get("/view_metadata/loras?filename=missing.safetensors").0,
        404
    );
}

#[test]
fn the_model_library_lists_model_files() {
    let server = start();
    let loras = server.base.path().join("models/loras");
    std::fs::create_dir_all(loras.join("styles/.hidden")).unwrap();
    std::fs::write(loras.join("styles/ink.safetensors"), b"1234").unwrap();
    std::fs::write(loras.join("styles/.hidden/x.safetensors"), b"1").unwrap();
    std::fs::write(loras.join("notes.txt"), b"1").unwrap();
    let files = server.api.get_json("/api/experiment/models/loras");
    assert_eq!(files.as_array().unwrap().len(), 1);
    assert_eq!(files[0]["name"], "styles/ink.safetensors");
    assert_eq!(files[0]["pathIndex"], 0);
    assert_eq!(files[0]["size"], 4);
    assert_eq!(server.api.get("/api/experiment/models/configs").0, 404);
    assert_eq!(server.api.get("/api/experiment/models/nope").0, 404);
}
