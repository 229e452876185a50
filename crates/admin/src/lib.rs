//! Ferry's management surfaces, served together on one HTTP listener (default
//! `127.0.0.1:18083`):
//!
//! - [`rest`]: the REST API under `/api/v1` (JSON, admin-key authentication) and its OpenAPI 3
//!   document at `/api/v1/openapi.json`.
//! - [`rpc`]: the cloud-compatible RPC API (`/?Action=…&Version=2020-04-20`, HMAC-SHA1 request
//!   signatures), so the cloud's official SDKs work against Ferry.
//! - [`metrics`]: the broker's counters at `/metrics` (Prometheus text format, admin key).
//!
//! Neither holds state of its own: they call [`ferry_meta::Meta`] (resources) and
//! [`ferry_broker::Control`] (clients, kick, publish).

pub mod metrics;
pub mod openapi;
pub mod rest;
pub mod rpc;

use ferry_broker::Control;
use ferry_meta::Meta;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Called after a rule of an instance changed, so that the change takes effect at once (the
/// rules engine reloads); the API answers once it resolves.
pub type RulesChanged =
    Arc<dyn Fn(String) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What the handlers use.
#[derive(Clone)]
pub struct AdminState {
    pub meta: Arc<Meta>,
    pub control: Control,
    /// The rules engine's reload; `None` when no rules run (rules are then only stored).
    pub rules_changed: Option<RulesChanged>,
}

/// The whole management application.
pub fn app(state: AdminState) -> axum::Router {
    rest::routes()
        .merge(rpc::routes())
        .route("/metrics", metrics::route())
        .with_state(state)
}

/// Serves the management API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
