//! How failures reach HTTP clients: the operation's [`OpError`] as JSON (`kind`, `message`)
//! with the status code its kind maps to, here and only here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_control::{ErrorKind, OpError};

/// The HTTP status of an error kind.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Exists | ErrorKind::State => StatusCode::CONFLICT,
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Busy => StatusCode::LOCKED,
        ErrorKind::Corrupt | ErrorKind::Io | ErrorKind::Vm => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Daemon | ErrorKind::Remote => StatusCode::BAD_GATEWAY,
        ErrorKind::Auth => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::Limited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Cancelled => StatusCode::CONFLICT,
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError(pub OpError);

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError(OpError::new(kind, message))
    }

    /// A reply of a shape the route did not expect (a bug, not the caller's fault).
    pub fn unexpected(what: &str) -> ApiError {
        ApiError::new(
            ErrorKind::Daemon,
            format!("the service answered {what} with an unexpected reply"),
        )
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (status_of(self.0.kind), Json(self.0)).into_response()
    }
}
