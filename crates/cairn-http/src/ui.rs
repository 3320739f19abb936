//! The web UI: one page and its script and style, built into the binary (nothing is fetched
//! from elsewhere). The page holds no data; it asks for a token and calls the API like any
//! client.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const TARGET_JS: &str = include_str!("../ui/target.js");
const STORE_JS: &str = include_str!("../ui/store.js");
const APP_CSS: &str = include_str!("../ui/app.css");

/// A strict policy: only this origin's script, style and API; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(body: &'static str, kind: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// `/` and its script and style files.
pub fn routes() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/target.js",
            get(|| async { asset(TARGET_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/store.js",
            get(|| async { asset(STORE_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
}
