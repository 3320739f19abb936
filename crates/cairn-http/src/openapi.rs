//! The OpenAPI document, generated from the handlers' annotations and the API's types (the
//! lower crates' `openapi` feature), served at `/api/openapi.json` without a token: it holds no
//! data, and tools read it before they have one.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{checkpoints, console, lifecycle, ops, vms, volumes};

/// The API's description.
#[derive(OpenApi)]
#[openapi(
    info(title = "Cairn API", description = "VM and volume checkpoints, space, backups, lifecycle policies and events. Every /api/v1 call needs `Authorization: Bearer TOKEN` (`cairn token create`)."),
    paths(
        ops::status, ops::run,
        volumes::list, volumes::create, volumes::info, volumes::delete,
        vms::list, vms::create, vms::info, vms::delete, vms::status, vms::start, vms::stop,
        vms::kill, console::console, console::console_stream,
        checkpoints::list, checkpoints::create, checkpoints::apply, checkpoints::delete,
        checkpoints::edit, checkpoints::clone, checkpoints::space, checkpoints::freed,
        checkpoints::diff,
        lifecycle::policies, lifecycle::set_policy, lifecycle::clear_policy,
        lifecycle::prune_preview, lifecycle::events, lifecycle::event_stream,
        crate::jobs::start, crate::jobs::list, crate::jobs::info, crate::jobs::cancel,
        crate::jobs::events,
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /api/openapi.json`.
pub fn routes() -> Router {
    let doc = document();
    Router::new().route(
        "/api/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { Json(doc) }
        }),
    )
}
