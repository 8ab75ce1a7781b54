//! The API's one error type: JSON `{"error": …, "details": [...]}` with the right status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::error;

use max300_protocol::error::Chain;

use crate::CloudError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    details: Vec<String>,
}

impl ApiError {
    /// An error with a status and a message.
    pub fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: error.into(),
            details: Vec::new(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: Vec<String>) -> ApiError {
        self.details = details;
        self
    }

    /// 404 for a thing that does not exist.
    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, what)
    }

    /// 400 for a malformed request.
    pub fn bad_request(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, what)
    }
}

impl From<CloudError> for ApiError {
    fn from(e: CloudError) -> ApiError {
        let status = match &e {
            CloudError::Document(_) => StatusCode::UNPROCESSABLE_ENTITY,
            CloudError::Busy | CloudError::Fenced(_) => StatusCode::CONFLICT,
            CloudError::Provider { .. } => StatusCode::BAD_GATEWAY,
            CloudError::Config { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // The answer says what failed and why, all the way down.
        ApiError::new(status, Chain(&e).to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            // Logged once, here, inside the request's span.
            error!(status = self.status.as_u16(), error = %self.error, "request failed");
        }
        let body = json!({"error": self.error, "details": self.details});
        (self.status, Json(body)).into_response()
    }
}
