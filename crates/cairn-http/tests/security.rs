//! Who gets in: the API on a real TCP socket over a real store, called with plain HTTP/1.1
//! requests, with no token, a wrong one, a read-only one writing, a revoked and an expired one,
//! from another origin, too many times, and asking for what HTTP never runs.

use cairn_control::tokens::{self, TokenOp, TokenReply};
use cairn_http::{HttpConfig, HttpError};

mod common;
use common::{bearer, serve};

#[tokio::test]
async fn only_valid_tokens_get_in() {
    let api = serve().await;
    let (st, body) = api.call("GET", "/api/v1/volumes", &[], None).await;
    assert_eq!((st, body["kind"].as_str()), (401, Some("auth")), "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap_or("")
        .contains("cairn token create"));

    let wrong = bearer("cairn_not-a-real-secret");
    let (st, body) = api
        .call("GET", "/api/v1/volumes", &[("Authorization", &wrong)], None)
        .await;
    assert_eq!((st, body["kind"].as_str()), (401, Some("auth")), "{body}");

    let secret = api.token("admin", false, None);
    let ok = bearer(&secret);
    let (st, body) = api
        .call("GET", "/api/v1/volumes", &[("Authorization", &ok)], None)
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body[0]["name"], "v");

    // Revoked: the next request fails (the checker sees the file change).
    tokens::run(
        api.dir.path(),
        TokenOp::Revoke {
            name: "admin".into(),
        },
    )
    .expect("revoke");
    let (st, body) = api
        .call("GET", "/api/v1/volumes", &[("Authorization", &ok)], None)
        .await;
    assert_eq!((st, body["kind"].as_str()), (401, Some("auth")), "{body}");

    let expired = bearer(&api.token("old", false, Some(0)));
    let (st, body) = api
        .call(
            "GET",
            "/api/v1/volumes",
            &[("Authorization", &expired)],
            None,
        )
        .await;
    assert_eq!(st, 401, "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("expired"),
        "{body}"
    );
}

#[tokio::test]
async fn read_only_tokens_only_read() {
    let api = serve().await;
    let ro = bearer(&api.token("viewer", true, None));
    let auth = [("Authorization", ro.as_str())];
    let (st, _) = api
        .call("GET", "/api/v1/targets/v/checkpoints", &auth, None)
        .await;
    assert_eq!(st, 200);
    let (st, body) = api
        .call("POST", "/api/v1/targets/v/checkpoints", &auth, Some("{}"))
        .await;
    assert_eq!(
        (st, body["kind"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (st, _) = api
        .call(
            "POST",
            "/api/v1/ops",
            &auth,
            Some(r#"{"op":"volume_list"}"#),
        )
        .await;
    assert_eq!(st, 200);
    let write = r#"{"op":"volume_create","name":"w","size":4096}"#;
    let (st, body) = api.call("POST", "/api/v1/ops", &auth, Some(write)).await;
    assert_eq!(
        (st, body["kind"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (st, _) = api.call("POST", "/api/v1/jobs", &auth, Some(write)).await;
    assert_eq!(st, 403);
    let (st, _) = api.call("DELETE", "/api/v1/volumes/v", &auth, None).await;
    assert_eq!(st, 403);
    // Nothing was written.
    let (_, vols) = api.call("GET", "/api/v1/volumes", &auth, None).await;
    assert_eq!(vols.as_array().map(Vec::len), Some(1), "{vols}");
}

#[tokio::test]
async fn tokens_cannot_be_managed_over_http() {
    let api = serve().await;
    let rw = bearer(&api.token("admin", false, None));
    let auth = [("Authorization", rw.as_str())];
    let mint = r#"{"op":"token","action":"create","name":"sneaky"}"#;
    let (st, body) = api.call("POST", "/api/v1/ops", &auth, Some(mint)).await;
    assert_eq!(
        (st, body["kind"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let list = tokens::run(api.dir.path(), TokenOp::List).expect("list");
    assert!(matches!(list, TokenReply::List { tokens } if tokens.len() == 1));
}

#[tokio::test]
async fn cross_origin_requests_are_refused() {
    let api = serve().await;
    let rw = bearer(&api.token("admin", false, None));
    let evil = [
        ("Authorization", rw.as_str()),
        ("Origin", "http://evil.example"),
    ];
    let (st, body) = api.call("GET", "/api/v1/volumes", &evil, None).await;
    assert_eq!(
        (st, body["kind"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let own = format!("http://{}", api.addr);
    let same = [("Authorization", rw.as_str()), ("Origin", own.as_str())];
    let (st, _) = api.call("GET", "/api/v1/volumes", &same, None).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn an_address_that_keeps_failing_is_refused_for_a_while() {
    let api = serve().await;
    let good = bearer(&api.token("admin", false, None));
    for _ in 0..cairn_http::auth::MAX_FAILURES {
        let (st, _) = api
            .call(
                "GET",
                "/api/v1/volumes",
                &[("Authorization", "Bearer guess")],
                None,
            )
            .await;
        assert_eq!(st, 401);
    }
    // Even the right token waits now: guessing gains nothing.
    let (st, body) = api
        .call("GET", "/api/v1/volumes", &[("Authorization", &good)], None)
        .await;
    assert_eq!(
        (st, body["kind"].as_str()),
        (429, Some("limited")),
        "{body}"
    );
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_change_nothing() {
    let api = serve().await;
    let rw = bearer(&api.token("admin", false, None));
    let auth = [("Authorization", rw.as_str())];
    for (method, path, body) in [
        ("POST", "/api/v1/ops", Some("{not json")),
        ("POST", "/api/v1/ops", Some(r#"{"op":"no_such_op"}"#)),
        ("POST", "/api/v1/volumes", Some(r#"{"name":"x"}"#)),
        ("GET", "/api/v1/volumes/nope", None),
        (
            "GET",
            "/api/v1/targets/v/space/freed?checkpoints=nope",
            None,
        ),
        ("GET", "/api/v1/jobs/999", None),
        ("GET", "/api/v1/jobs/not-a-number", None),
        ("GET", "/api/v1/no/such/route", None),
    ] {
        let (st, b) = api.call(method, path, &auth, body).await;
        assert!((400..500).contains(&st), "{method} {path}: {st} {b}");
        assert!(
            b["kind"].is_string() && b["message"].is_string(),
            "{method} {path}: {b}"
        );
    }
    let (_, vols) = api.call("GET", "/api/v1/volumes", &auth, None).await;
    assert_eq!(vols.as_array().map(Vec::len), Some(1), "{vols}");
}

#[tokio::test]
async fn plain_http_off_loopback_is_refused() {
    let config = HttpConfig {
        listen: "0.0.0.0:0".parse().expect("addr"),
        tls: None,
    };
    match cairn_http::bind(&config).await {
        Err(e @ HttpError::PlainOffLoopback(_)) => {
            assert!(e.to_string().contains("--tls-cert"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("plain HTTP on 0.0.0.0 was served"),
    }
}

#[tokio::test]
async fn the_openapi_document_is_served_and_lists_the_routes() {
    let api = serve().await;
    let (st, doc) = api.call("GET", "/api/openapi.json", &[], None).await;
    assert_eq!(st, 200);
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/api/v1/ops",
        "/api/v1/volumes",
        "/api/v1/targets/{target}/checkpoints",
        "/api/v1/jobs/{id}/events",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    assert!(doc["components"]["schemas"]["Op"].is_object());
}
