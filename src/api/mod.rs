//! The daemon's local API: HTTP on a Unix socket in the state directory,
//! mode 0600, so only the owner (and root) can ask or command.
//!
//! Read endpoints answer from the store (which the daemon holds locked);
//! `POST /v1/reconcile/{kind}/{name}` queues a reconcile; `/metrics` is
//! Prometheus text. Never listens on a TCP port.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::controller::metrics::Metrics;
use crate::plan::Plan;
use crate::spec::ObjectKey;
use crate::store::Store;

/// Computes a plan on request.
pub type PlanFn = Arc<dyn Fn() -> BoxFuture<'static, Plan> + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub manual: mpsc::UnboundedSender<ObjectKey>,
    pub metrics: Arc<Metrics>,
    pub plan: PlanFn,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another converge daemon answers on {path}")]
    InUse { path: PathBuf },
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ApiError::Bind {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves until the future is dropped.
pub async fn serve(listener: UnixListener, state: ApiState) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/status", get(all_status))
        .route("/v1/status/{kind}/{name}", get(one_status))
        .route("/v1/history/{kind}/{name}", get(history))
        .route("/v1/facts/{kind}/{name}", get(facts))
        .route("/v1/events", get(events))
        .route("/v1/plan", get(plan))
        .route("/v1/reconcile/{kind}/{name}", post(reconcile))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app).await
}

fn key_of(kind: &str, name: &str) -> Result<ObjectKey, Box<Response>> {
    format!("{kind}/{name}")
        .parse()
        .map_err(|e: crate::spec::KeyError| {
            Box::new((StatusCode::BAD_REQUEST, e.to_string()).into_response())
        })
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => ([("content-type", "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn store_failure(e: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

/// The status view shared with the CLI's direct-store path.
pub fn status_view(
    store: &Store,
    key: &ObjectKey,
) -> Result<Option<serde_json::Value>, crate::store::StoreError> {
    let Some(status) = store.status(key)? else {
        return Ok(None);
    };
    let facts = store.facts(key)?;
    Ok(Some(serde_json::json!({
        "key": key,
        "status": status,
        "lastSeenMs": facts.map(|f| f.observed_ms),
    })))
}

async fn all_status(State(s): State<ApiState>) -> Response {
    let statuses = match s.store.statuses() {
        Ok(v) => v,
        Err(e) => return store_failure(e),
    };
    let mut out = Vec::new();
    for (key, _) in statuses {
        match status_view(&s.store, &key) {
            Ok(Some(v)) => out.push(v),
            Ok(None) => {}
            Err(e) => return store_failure(e),
        }
    }
    json(&out)
}

async fn one_status(
    State(s): State<ApiState>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
) -> Response {
    let key = match key_of(&kind, &name) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match status_view(&s.store, &key) {
        Ok(Some(v)) => json(&v),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no status for {key}")).into_response(),
        Err(e) => store_failure(e),
    }
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn history(
    State(s): State<ApiState>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    Query(q): Query<Limit>,
) -> Response {
    let key = match key_of(&kind, &name) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match s.store.history(&key, q.limit.unwrap_or(20)) {
        Ok(v) => json(&v),
        Err(e) => store_failure(e),
    }
}

async fn facts(
    State(s): State<ApiState>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
) -> Response {
    let key = match key_of(&kind, &name) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match s.store.facts(&key) {
        Ok(Some(v)) => json(&v),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no facts for {key}")).into_response(),
        Err(e) => store_failure(e),
    }
}

async fn events(State(s): State<ApiState>, Query(q): Query<Limit>) -> Response {
    match s.store.events(q.limit.unwrap_or(50)) {
        Ok(v) => json(&v),
        Err(e) => store_failure(e),
    }
}

async fn plan(State(s): State<ApiState>) -> Response {
    let plan = (s.plan)().await;
    json(&plan)
}

async fn reconcile(
    State(s): State<ApiState>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
) -> Response {
    let key = match key_of(&kind, &name) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match s.manual.send(key.clone()) {
        Ok(()) => (StatusCode::ACCEPTED, format!("queued {key}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n").into_response(),
    }
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let body = s.metrics.render(&s.store);
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}
