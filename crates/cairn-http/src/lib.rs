//! Cairn's HTTP API on TCP and its web UI. Every route turns a request into an [`Op`], hands it
//! to the daemon's one [`Service`], and renders the reply: nothing here decides anything about
//! an operation. Tokens ([`auth`]) guard `/api/v1`; the OpenAPI document at
//! `/api/openapi.json` is generated from the same handlers ([`openapi`]); long work runs as
//! jobs whose progress streams as server-sent events ([`jobs`]); `/` serves the web UI, whose
//! files are built into the binary ([`ui`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::Router;
use cairn_control::tokens::TokenChecker;
use cairn_control::{DaemonStatus, ErrorKind, Op, Reply, Service};
use serde::de::DeserializeOwned;
use tracing::warn;

pub mod auth;
pub mod error;
pub mod jobs;
pub mod listen;
pub mod openapi;
mod routes;
mod ui;

pub use error::{status_of, ApiError};

/// Where and how to serve the API.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// TLS; required off loopback.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Why the API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Plain HTTP was asked for on an address other hosts can reach.
    #[error("plain HTTP on {0} would send tokens and data in the clear to the network; give --tls-cert and --tls-key, or listen on loopback (127.0.0.1 or a port alone)")]
    PlainOffLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    service: Arc<Service>,
    status: Arc<DaemonStatus>,
    tokens: Arc<TokenChecker>,
    limiter: Arc<auth::FailureLimiter>,
    jobs: Arc<jobs::Jobs>,
}

impl AppState {
    /// State over the daemon's `service`, answering `status` about itself.
    pub fn new(service: Arc<Service>, status: DaemonStatus) -> AppState {
        AppState {
            tokens: Arc::new(TokenChecker::new(&status.store)),
            service,
            status: Arc::new(status),
            limiter: Arc::default(),
            jobs: Arc::default(),
        }
    }

    /// Runs `op` on the service.
    async fn call(&self, op: Op) -> Result<Reply, ApiError> {
        Ok(self.service.run(op, cairn_control::no_progress()).await?)
    }
}

/// A bound listener, ready to serve.
pub struct HttpServer {
    listener: listen::HttpListener,
    local: SocketAddr,
    tls: bool,
}

/// Binds `config.listen`; refuses plain HTTP off loopback.
pub async fn bind(config: &HttpConfig) -> Result<HttpServer, HttpError> {
    if config.tls.is_none() && !config.listen.ip().is_loopback() {
        return Err(HttpError::PlainOffLoopback(config.listen));
    }
    let listen_err = |source| HttpError::Listen {
        addr: config.listen,
        source,
    };
    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen_err)?;
    let listener = listen::HttpListener::start(tcp, config.tls.clone()).map_err(listen_err)?;
    let local = axum::serve::Listener::local_addr(&listener).map_err(listen_err)?;
    Ok(HttpServer {
        listener,
        local,
        tls: config.tls.is_some(),
    })
}

impl HttpServer {
    /// The address really bound (the port, when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.local)
    }

    /// Serves until `stop` completes.
    pub async fn serve(self, state: AppState, stop: impl Future<Output = ()> + Send + 'static) {
        let app = router(state).into_make_service_with_connect_info::<listen::Peer>();
        if let Err(e) = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            warn!("HTTP API stopped: {e}");
        }
    }
}

/// Every route: the UI, the OpenAPI document, and the guarded API.
pub fn router(state: AppState) -> Router {
    let api = routes::api()
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ))
        .with_state(state.clone());
    Router::new()
        .merge(ui::routes())
        .merge(openapi::routes())
        .merge(api)
        .fallback(|| async {
            ApiError::new(ErrorKind::NotFound, "no such route; see /api/openapi.json")
        })
        .layer(body_limit())
}

/// The same routes for the store's owner on the daemon's control socket: no token (only the
/// owner can open that socket, mode 0600), so the CLI runs long work as jobs and reads their
/// progress from the same stream as the web UI.
pub fn owner_router(state: AppState) -> Router {
    routes::api()
        .layer(axum::Extension(auth::Caller::Owner))
        .layer(body_limit())
        .with_state(state)
}

/// An operation carries at most MAX_DATA bytes, base64-encoded in JSON.
fn body_limit() -> axum::extract::DefaultBodyLimit {
    axum::extract::DefaultBodyLimit::max((cairn_control::MAX_DATA as usize) * 4 / 3 + (64 << 10))
}

/// A JSON body whose rejection is an [`ApiError`] (JSON, like every other error).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::new(ErrorKind::Invalid, e.body_text())),
        }
    }
}

/// Query parameters whose rejection is an [`ApiError`].
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(ApiError::new(ErrorKind::Invalid, e.body_text())),
        }
    }
}

/// Path parameters whose rejection is an [`ApiError`].
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiError::new(ErrorKind::Invalid, e.body_text())),
        }
    }
}
