//! Errors of metadata operations, with the cloud's error codes.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A parameter broke a rule (HTTP 400).
    Invalid,
    /// The resource does not exist (HTTP 404).
    NotFound,
    /// The resource exists already (HTTP 409).
    Conflict,
    /// A per-instance limit was reached (HTTP 400, as the cloud answers).
    Limit,
    /// Credentials missing or wrong (HTTP 401/403).
    Unauthorized,
    /// The server failed (e.g. the store refused a write) (HTTP 500).
    Internal,
}

/// A failed operation: `code` is the cloud's error code, `message` says what and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code}: {message}")]
pub struct MetaError {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
}

impl MetaError {
    pub fn invalid(message: impl Into<String>) -> Self {
        MetaError {
            kind: ErrorKind::Invalid,
            code: "ParameterCheckFailed",
            message: message.into(),
        }
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        MetaError {
            kind: ErrorKind::NotFound,
            code,
            message: message.into(),
        }
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        MetaError {
            kind: ErrorKind::Conflict,
            code,
            message: message.into(),
        }
    }
    pub fn limit(code: &'static str, message: impl Into<String>) -> Self {
        MetaError {
            kind: ErrorKind::Limit,
            code,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        MetaError {
            kind: ErrorKind::Internal,
            code: "InternalError",
            message: message.into(),
        }
    }

    /// The HTTP status the REST API answers with.
    pub fn http_status(&self) -> u16 {
        match self.kind {
            ErrorKind::Invalid | ErrorKind::Limit => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Internal => 500,
        }
    }
}
