//! Failures by kind: a run counts them per kind instead of stopping at the first.

use std::fmt;

/// Something that went wrong with one connection. `kind` is a short, stable label the summary
/// groups by ("connection refused", "auth refused", "closed by broker"…); `detail` says more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: &'static str,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: &'static str, detail: impl Into<String>) -> Failure {
        Failure {
            kind,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for Failure {}
