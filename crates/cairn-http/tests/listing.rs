//! A volume's checkpoints over HTTP come in pages: at most 1,000 an answer on the typed route,
//! the operation route and jobs alike; the cursor pages through the whole list; bad cursors and
//! zero limits are refused with a clear error.
#![allow(missing_docs)]

mod common;

use serde_json::{json, Value};

const MANY: usize = 2100;

fn names(reply: &Value) -> Vec<String> {
    reply["value"]["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_come_in_pages_that_add_up_to_the_whole_list() {
    let api = common::serve().await;
    let secret = api.token("reader", true, None);
    let auth = format!("Bearer {secret}");
    let h = [("Authorization", auth.as_str())];
    let all: Vec<String> = (0..MANY).map(|i| format!("c{i:05}")).collect();
    for n in &all {
        api.store
            .create_checkpoint("v", n, None)
            .expect("checkpoint");
    }

    // Default pages of 1,000, oldest first, through to the end.
    let (mut got, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let path = match &after {
            None => "/api/v1/targets/v/checkpoints".to_string(),
            Some(a) => format!("/api/v1/targets/v/checkpoints?after={a}"),
        };
        let (st, r) = api.call("GET", &path, &h, None).await;
        assert_eq!(st, 200, "{r}");
        let page = names(&r);
        assert!(page.len() <= 1000, "a page of {}", page.len());
        got.extend(page);
        pages += 1;
        match r["value"]["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(got, all);
    assert_eq!(pages, 3);

    // A small page; a larger ask is held to 1,000, on every route.
    let (_, r) = api
        .call("GET", "/api/v1/targets/v/checkpoints?limit=2", &h, None)
        .await;
    assert_eq!(names(&r), ["c00000", "c00001"]);
    assert!(r["value"]["next"].is_string());
    let (_, r) = api
        .call("GET", "/api/v1/targets/v/checkpoints?limit=5000", &h, None)
        .await;
    assert_eq!(names(&r).len(), 1000);
    let op = json!({"op": "checkpoint_list", "volume": "v"}).to_string();
    let (st, r) = api.call("POST", "/api/v1/ops", &h, Some(&op)).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(names(&r).len(), 1000);
    assert!(r["value"]["next"].is_string());

    // Bad input: a cursor that is not one, a zero limit, an unknown volume.
    for (path, kind) in [
        ("/api/v1/targets/v/checkpoints?after=bogus", "invalid"),
        ("/api/v1/targets/v/checkpoints?limit=0", "invalid"),
        ("/api/v1/targets/nope/checkpoints", "not_found"),
    ] {
        let (st, r) = api.call("GET", path, &h, None).await;
        assert!((400..500).contains(&st), "{path}: {st} {r}");
        assert_eq!(r["kind"], kind, "{path}: {r}");
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}
