//! The queue survives a real `kill -9` of the `easel` process: pending prompts come back, the
//! running one is re-queued once at the front, and a prompt that kills the server twice is recorded
//! as failed; a deleted one stays deleted.

mod common;

use common::{free_port, Easel};
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

/// Waits until `/queue` shows `prompt_id` running.
fn wait_running(easel: &Easel, prompt_id: &str) -> Json {
    let started = Instant::now();
    loop {
        let queue = easel.get("/queue");
        if queue["queue_running"][0][1] == prompt_id {
            return queue;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{prompt_id} never ran: {queue}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs for minutes unless interrupted: 16 384 dilations of a 1024² mask.
fn slow(prompt_id: &str) -> Json {
    json!({"prompt_id": prompt_id, "prompt": {
        "1": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 1024, "height": 1024}},
        "2": {"class_type": "GrowMask", "inputs": {"mask": ["1", 0], "expand": 16384, "tapered_corners": true}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    }})
}

#[test]
fn the_queue_survives_kill_9() {
    let base = tempfile::tempdir().unwrap();
    let port = free_port();
    let easel = Easel::start(base.path(), port, &[]);
    easel.post("/prompt", &slow("first"));
    wait_running(&easel, "first");
    assert_eq!(easel.post("/prompt", &slow("second")).1["number"], 1);
    easel.post("/prompt", &slow("third"));
    easel.kill();

    let easel = Easel::start(base.path(), port, &[]);
    let queue = wait_running(&easel, "first");
    let pending: Vec<&Json> = queue["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| &item[1])
        .collect();
    assert_eq!(pending.len(), 2);
    assert_eq!(queue["queue_pending"][0][1], "second");
    // New prompts are numbered after the recovered ones.
    assert_eq!(easel.post("/prompt", &slow("fourth")).1["number"], 3);
    // A deleted prompt stays deleted.
    easel.post("/queue", &json!({"delete": ["third"]}));
    easel.kill();

    // "first" stopped the server twice: recorded as failed, not run again.
    let easel = Easel::start(base.path(), port, &[]);
    let queue = wait_running(&easel, "second");
    assert_eq!(queue["queue_pending"].as_array().unwrap().len(), 1);
    assert_eq!(queue["queue_pending"][0][1], "fourth");
    let entry = &easel.get("/history/first")["first"];
    assert_eq!(entry["status"]["status_str"], "error");
    assert_eq!(entry["status"]["messages"][0][1]["exception_type"], "ServerStopped");
    easel.post("/queue", &json!({"clear": true}));
    easel.post("/interrupt", &json!({}));
    let started = Instant::now();
    while easel.get("/history/second").get("second").is_none() {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(easel.get("/queue"), json!({"queue_running": [], "queue_pending": []}));
    assert_eq!(
        easel.get("/history/second")["second"]["status"]["messages"][2][0],
        "execution_interrupted"
    );
}
