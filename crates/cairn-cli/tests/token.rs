//! `cairn token ...` with and without a daemon: the secret is printed once and never listed,
//! the store keeps only its hash, a revoked token is gone, and bad input gets a clear error.
#![allow(missing_docs)]

mod common;
use common::*;

#[test]
fn tokens() {
    tokens_in(env());
}

#[test]
fn tokens_through_daemon() {
    tokens_in(env_with_daemon());
}

fn tokens_in(e: Env) {
    let made = json(
        &e,
        &["token", "create", "ci", "--read-only", "--expires", "30d"],
    );
    let secret = made["secret"].as_str().expect("secret").to_string();
    assert!(secret.starts_with("cairn_"), "{made}");
    assert_eq!(made["token"]["read_only"], true, "{made}");
    assert!(made["token"]["expires_ms"].as_u64().is_some(), "{made}");
    let plain = ok(&e, &["token", "create", "admin"]);
    assert!(plain.trim().starts_with("cairn_"), "{plain}");

    let list = ok(&e, &["token", "list"]);
    assert!(list.contains("ci") && list.contains("read-only") && list.contains("admin"));
    assert!(!list.contains(&secret), "a listing never shows a secret");
    let kept = std::fs::read_to_string(e.store.join("tokens.json")).expect("tokens.json");
    assert!(!kept.contains(&secret), "the store keeps only a hash");

    fails(&e, &["token", "create", "ci"], "exists");
    fails(&e, &["token", "create", "x", "--expires", "soon"], "soon");
    ok(&e, &["token", "revoke", "ci"]);
    fails(&e, &["token", "revoke", "ci"], "ci");
    let names: Vec<String> = json(&e, &["token", "list"])["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(names, ["admin"]);
}
