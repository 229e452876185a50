//! The REST API under `/api/v1`.

use crate::AdminState;
use axum::Router;

pub fn routes() -> Router<AdminState> {
    Router::new()
}
