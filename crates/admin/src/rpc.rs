//! The cloud-compatible RPC API.

use crate::AdminState;
use axum::Router;

pub fn routes() -> Router<AdminState> {
    Router::new()
}
