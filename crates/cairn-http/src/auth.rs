//! Who may call the API: every request under `/api/v1` carries `Authorization: Bearer SECRET`
//! of a token the store's owner made (`cairn token create`); read-only tokens may only read;
//! requests a browser sends from another origin are refused; an address that keeps presenting
//! wrong tokens is refused for a while. Failures are logged with the address and the reason, never the secret.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cairn_control::tokens::TokenInfo;
use cairn_control::ErrorKind;
use tracing::warn;

use crate::error::ApiError;
use crate::listen::Peer;
use crate::AppState;

/// Wrong tokens an address may present per window before it is refused.
pub const MAX_FAILURES: u32 = 10;
/// The window failures are counted in, and how long an address is then refused.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Failed attempts per client address.
#[derive(Default)]
pub struct FailureLimiter {
    by_ip: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    fn blocked(&self, ip: IpAddr) -> bool {
        let mut m = cairn_engine::sync::lock(&self.by_ip);
        match m.get(&ip) {
            Some((since, _)) if since.elapsed() >= FAILURE_WINDOW => {
                m.remove(&ip);
                false
            }
            Some((_, n)) => *n >= MAX_FAILURES,
            None => false,
        }
    }

    fn failed(&self, ip: IpAddr) {
        let mut m = cairn_engine::sync::lock(&self.by_ip);
        // Bounded: a flood from many addresses cannot grow the map without end.
        if m.len() > 10_000 {
            m.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        let e = m.entry(ip).or_insert((Instant::now(), 0));
        e.1 += 1;
    }
}

/// The caller, as the middleware found it (a request extension for the handlers).
#[derive(Debug, Clone)]
pub enum Caller {
    /// The store's owner, on the daemon's control socket (mode 0600): may do everything,
    /// tokens included.
    Owner,
    /// A TCP client with this valid token.
    Token(TokenInfo),
}

impl Caller {
    /// Refuses a writing request from a read-only token.
    pub fn may_write(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Token(t) if t.read_only => Err(ApiError::new(
                ErrorKind::Forbidden,
                format!(
                    "token '{}' is read-only and cannot {what}; use a token made without --read-only",
                    t.name
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// A browser's `Origin` must be this server (scheme, host and port as the request names it).
fn cross_origin(req: &Request) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return false;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin = origin.to_str().unwrap_or("");
    let bare = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("\u{0}");
    bare != host
}

/// The middleware in front of every `/api/v1` route.
pub async fn check(
    State(st): State<AppState>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    let ip = peer.ip();
    let path = req.uri().path().to_string();
    if cross_origin(&req) {
        warn!("http: {peer} {path}: cross-origin request refused");
        return ApiError::new(
            ErrorKind::Forbidden,
            "cross-origin requests are refused; call the API from the daemon's own page or without a browser",
        )
        .into_response();
    }
    if st.limiter.blocked(ip) {
        return ApiError::new(
            ErrorKind::Limited,
            format!(
                "too many failed attempts from {ip}; try again in {} s",
                FAILURE_WINDOW.as_secs()
            ),
        )
        .into_response();
    }
    let secret = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // A missing token is a mistake, not a guess: it is refused but not counted.
    let Some(secret) = secret else {
        warn!("http: {peer} {path}: no bearer token");
        return ApiError::new(
            ErrorKind::Auth,
            "this API needs `Authorization: Bearer TOKEN`; make a token with `cairn token create NAME`",
        )
        .into_response();
    };
    let token = match st.tokens.check(secret) {
        Ok(t) => t,
        Err(why) => {
            st.limiter.failed(ip);
            warn!("http: {peer} {path}: token refused: {why}");
            return ApiError::new(ErrorKind::Auth, format!("token refused: {why}")).into_response();
        }
    };
    // Reads are GETs; the two POST routes that may only read check the operation themselves.
    let reading = matches!(*req.method(), Method::GET | Method::HEAD)
        || path == "/api/v1/ops"
        || path == "/api/v1/jobs";
    let caller = Caller::Token(token);
    if !reading {
        if let Err(e) = caller.may_write(&format!("{} {path}", req.method())) {
            warn!("http: {peer} {path}: {}", e.0.message);
            return e.into_response();
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}
