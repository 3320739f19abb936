//! Long work as jobs, over a real TCP socket on a real store: a backup and a restore cancelled
//! while they copy stop there (the checkpoint they read is free again at once, no backup and no
//! half-restored volume is left), and the repository works on.

use serde_json::{json, Value};

mod common;
use common::{bearer, Api};

/// Bytes in the volume backed up: enough random data that copying it outlasts a few polls.
const SIZE: u64 = 384 << 20;

/// Fills `vol` with incompressible bytes.
fn fill(api: &Api, vol: &str) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 4 << 20];
    for off in (0..SIZE).step_by(buf.len()) {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        api.store.write(vol, off, &buf).expect("write");
    }
}

/// Starts `op` as a job, waits until it reports progress, cancels it, and returns what the
/// cancel answered.
async fn cancel_midway(api: &Api, auth: &str, op: Value) -> Value {
    let h = [("Authorization", auth)];
    let (st, job) = api
        .call("POST", "/api/v1/jobs", &h, Some(&op.to_string()))
        .await;
    assert_eq!(st, 202, "{job}");
    let path = format!("/api/v1/jobs/{}", job["id"]);
    loop {
        let (_, j) = api.call("GET", &path, &h, None).await;
        assert_eq!(
            j["status"]["state"], "running",
            "the job ended before it could be cancelled; make SIZE bigger: {j}"
        );
        if j["progress"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (st, j) = api.call("DELETE", &path, &h, None).await;
    assert_eq!(st, 200, "{j}");
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_copies_stop_and_leave_nothing_half_made() {
    let api = common::serve().await;
    let auth = bearer(&api.token("ops", false, None));
    let h = [("Authorization", auth.as_str())];
    api.store.create_volume("big", SIZE).expect("volume");
    fill(&api, "big");
    api.store.create_checkpoint("big", "one", None).expect("cp");
    let repo = json!({ "repo": api.dir.path().join("repo") });
    let init = json!({ "op": "backup", "backup": "init", "repo": repo, "encrypt": false });
    let (st, body) = api
        .call("POST", "/api/v1/ops", &h, Some(&init.to_string()))
        .await;
    assert_eq!(st, 200, "{body}");

    // A backup cancelled while it copies: no backup, and its checkpoint is free at once.
    let create = json!({ "op": "backup", "backup": "create", "target": "big@one", "repo": repo });
    let j = cancel_midway(&api, &auth, create).await;
    assert_eq!(j["status"]["state"], "cancelled", "{j}");
    let list = json!({ "op": "backup", "backup": "list", "repo": repo });
    let (_, body) = api
        .call("POST", "/api/v1/ops", &h, Some(&list.to_string()))
        .await;
    assert_eq!(body["value"]["value"]["backups"], json!([]), "{body}");
    let (st, body) = api
        .call("DELETE", "/api/v1/targets/big/checkpoints/one", &h, None)
        .await;
    assert_eq!(st, 200, "a stopped backup holds nothing: {body}");

    // A finished backup, then a restore of it cancelled while it copies: no volume is left.
    api.store.create_checkpoint("big", "two", None).expect("cp");
    let create = json!({ "op": "backup", "backup": "create", "target": "big@two", "repo": repo });
    let (st, body) = api
        .call("POST", "/api/v1/ops", &h, Some(&create.to_string()))
        .await;
    assert_eq!(st, 200, "{body}");
    let id = body["value"]["value"]["id"].as_str().expect("backup id");
    let restore = json!({ "op": "backup", "backup": "restore", "repo": repo, "id": id,
        "to": { "kind": "volume", "name": "copy" } });
    let j = cancel_midway(&api, &auth, restore).await;
    assert_eq!(j["status"]["state"], "cancelled", "{j}");
    let names: Vec<String> = api
        .store
        .list_volumes()
        .expect("volumes")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["big", "v"], "a cancelled restore leaves no volume");

    // The repository still verifies, and the jobs list says what happened.
    let verify = json!({ "op": "backup", "backup": "verify", "repo": repo });
    let (st, body) = api
        .call("POST", "/api/v1/ops", &h, Some(&verify.to_string()))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["value"]["value"]["problems"], json!([]), "{body}");
    let (_, jobs) = api.call("GET", "/api/v1/jobs", &h, None).await;
    let states: Vec<&str> = jobs
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["status"]["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(states, ["cancelled", "cancelled"], "{jobs}");
}
