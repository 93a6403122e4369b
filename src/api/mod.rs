//! The daemon's local API: HTTP on a Unix socket in the state directory,
//! mode 0600, so only the owner (and root) can ask or command.
//!
//! Read endpoints answer from the store (which the daemon holds locked);
//! `GET /v1/plan?dir=DIR` plans the daemon's desired state, and only when DIR
//! is the directory it watches (409 otherwise: a plan of another directory
//! than asked would be a lie); `POST /v1/reconcile/{kind}/{name}` queues a
//! reconcile of an object the daemon knows (404 otherwise);
//! `POST /v1/suspend/{kind}/{name}` and `/v1/resume/{kind}/{name}` suspend
//! and resume an object, then queue its reconcile;
//! `/v1/vm/{name}/snapshots`, `POST /v1/vm/{name}/snapshot/{snap}` and
//! `POST /v1/vm/{name}/revert/{snap}` and `POST /v1/vm/{name}/power/{verb}`
//! (stop, start, restart, delete) are the VM operator verbs;
//! `GET /v1/source` is the Git source's record and `POST /v1/fetch` fetches
//! it now, answering with what that fetch did; `/metrics` is Prometheus text
//! (its content type says which format version);
//! `/v1/events?after=SEQ&limit=N` lists events newest first (what a follower
//! has not seen); `GET /healthz` answers 200 while the loop runs and the
//! source was read recently, 503 with the reason otherwise. Never listens on
//! a TCP port.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
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

pub mod client;

use crate::controller::metrics::Metrics;
use crate::controller::vmops::{VmOp, VmOpOutcome};
use crate::plan::Plan;
use crate::spec::{Name, ObjectKey};
use crate::store::Store;

/// Computes a plan on request.
pub type PlanFn = Arc<dyn Fn() -> BoxFuture<'static, Plan> + Send + Sync>;

/// Carries out an operator verb on a VM: `Err` is a refusal or failure
/// whose message says what to do (answered 409).
pub type VmOpFn =
    Arc<dyn Fn(Name, VmOp) -> BoxFuture<'static, Result<VmOpOutcome, String>> + Send + Sync>;

/// Whether the daemon has an object to reconcile under a key: in the
/// desired state in force, or removed from it but still to be stopped.
pub type KnownFn = Arc<dyn Fn(&ObjectKey) -> bool + Send + Sync>;

/// The content type of Prometheus' text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    /// The desired-state directory the daemon reads: canonicalized, or
    /// for a Git source `STATE/git/current/DIR` (a link to the commit in
    /// force).
    pub dir: PathBuf,
    pub known: KnownFn,
    pub manual: mpsc::UnboundedSender<ObjectKey>,
    /// Keys to release a held artifact of at their next reconcile.
    pub retries: crate::controller::context::Retries,
    pub metrics: Arc<Metrics>,
    /// Where `POST /v1/fetch` asks the Git source to fetch now; `None`
    /// when the daemon reads a directory.
    pub fetch: Option<mpsc::UnboundedSender<crate::controller::git_source::FetchRequest>>,
    pub plan: PlanFn,
    pub vm: VmOpFn,
    pub health: Arc<crate::controller::health::Health>,
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
    #[error("listen on {path}: another converge daemon answers there; stop it first")]
    InUse { path: PathBuf },
    #[error("listen on {path}: it exists and is not a socket; move it away and start again")]
    NotASocket { path: PathBuf },
    #[error(
        "listen on {path}: cannot tell whether a daemon answers on the socket there; \
         remove it if no converge daemon runs on this state directory"
    )]
    Probe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replace the stale socket {path}: remove it and start again")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket with mode 0600. A socket another process answers on is
/// refused; one nobody answers on (left by a daemon that was killed or
/// crashed) is replaced, and that is logged. Anything else at the path is
/// refused rather than removed.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ApiError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(ApiError::InUse {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::warn!(
                    socket = %path.display(),
                    "replacing a stale socket nobody answers on (left by a daemon that did not stop cleanly)"
                );
                std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(ApiError::Probe {
                    path: path.to_path_buf(),
                    source,
                });
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::Bind {
                path: path.to_path_buf(),
                source,
            });
        }
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
        .route("/v1/source", get(source))
        .route("/v1/fetch", post(fetch))
        .route("/v1/reconcile/{kind}/{name}", post(reconcile))
        .route("/v1/suspend/{kind}/{name}", post(suspend))
        .route("/v1/resume/{kind}/{name}", post(resume))
        .route("/v1/vm", get(vm_list))
        .route("/v1/vm/{name}/snapshots", get(vm_snapshots))
        .route("/v1/vm/{name}/snapshot/{snap}", post(vm_snapshot))
        .route("/v1/vm/{name}/revert/{snap}", post(vm_revert))
        .route("/v1/vm/{name}/power/{verb}", post(vm_power))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
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
    let mut view = serde_json::json!({
        "key": key,
        "status": status,
        "lastSeenMs": facts.as_ref().map(|f| f.observed_ms),
        "suspended": store.suspension(key)?,
    });
    if key.kind == crate::spec::Kind::Machine {
        // What the target's `current` and `confirmed` pointed at when last
        // observed (after every change): the truth `status` names, whatever
        // the last attempt recorded.
        let machine = facts
            .as_ref()
            .and_then(|f| crate::driver::protocol::MachineFacts::from_record(&f.facts));
        view["current"] = machine
            .as_ref()
            .map_or(serde_json::Value::Null, |m| m.current_name().into());
        view["confirmed"] = machine
            .as_ref()
            .and_then(|m| m.confirmed.as_ref())
            .map_or(serde_json::Value::Null, |g| g.to_string().into());
        // A NixOS host's running system and whether it needs a reboot.
        view["nixos"] = machine
            .and_then(|m| m.nixos)
            .and_then(|n| serde_json::to_value(n).ok())
            .unwrap_or(serde_json::Value::Null);
    }
    Ok(Some(view))
}

/// One row per VM the store knows, for `converge vm list` (shared with the
/// CLI's direct-store path): desired (from the last spec seen) and observed
/// (from the last facts), and its Ready condition.
pub fn vm_rows(store: &Store) -> Result<Vec<serde_json::Value>, crate::store::StoreError> {
    let mut rows = Vec::new();
    for (key, status) in store.statuses()? {
        if key.kind != crate::spec::Kind::VirtualMachine {
            continue;
        }
        let document = store.spec(&key)?.map(|r| r.spec).unwrap_or_default();
        let spec = document.get("spec").cloned().unwrap_or_default();
        let facts = store.facts(&key)?;
        let observed_ms = facts.as_ref().map(|f| f.observed_ms);
        let facts = facts.map(|f| f.facts).unwrap_or_default();
        let ready = status.condition(crate::store::records::ConditionKind::Ready);
        rows.push(serde_json::json!({
            "name": key.name.as_str(),
            "host": spec.get("host"),
            "state": spec.get("state"),
            "cpus": spec.get("cpus"),
            "memory": spec.get("memory"),
            "forwards": spec.pointer("/network/forwards"),
            "running": facts.get("running"),
            "pid": facts.get("pid"),
            "qmpStatus": facts.get("qmpStatus"),
            "disks": facts.get("disks"),
            "ready": ready.map(|c| c.status),
            "reason": ready.map(|c| c.reason),
            "message": ready.map(|c| c.message.clone()),
            "lastSeenMs": observed_ms,
        }));
    }
    Ok(rows)
}

async fn vm_list(State(s): State<ApiState>) -> Response {
    match vm_rows(&s.store) {
        Ok(rows) => json(&rows),
        Err(e) => store_failure(e),
    }
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

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
    /// Only events with a higher sequence number.
    after: Option<u64>,
    /// Only events about this object, or `source`.
    key: Option<String>,
}

async fn events(State(s): State<ApiState>, Query(q): Query<EventsQuery>) -> Response {
    let key = match q
        .key
        .map(|k| k.parse::<crate::store::EventSubject>())
        .transpose()
    {
        Ok(key) => key,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    match s
        .store
        .events_after(q.after.unwrap_or(0), q.limit.unwrap_or(50), key.as_ref())
    {
        Ok(v) => json(&v),
        Err(e) => store_failure(e),
    }
}

async fn source(State(s): State<ApiState>) -> Response {
    match s.store.source() {
        Ok(Some(record)) => json(&record),
        Ok(None) => (StatusCode::NOT_FOUND, "no Git source\n").into_response(),
        Err(e) => store_failure(e),
    }
}

/// How long `POST /v1/fetch` waits for the fetch it asked for.
const FETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(290);

/// Fetches the Git source now and answers with what that fetch did.
async fn fetch(State(s): State<ApiState>) -> Response {
    let Some(fetch) = &s.fetch else {
        return (
            StatusCode::CONFLICT,
            "this daemon reads a directory, not a Git remote: start it with --git URL to fetch\n",
        )
            .into_response();
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if fetch.send(reply).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n").into_response();
    }
    match tokio::time::timeout(FETCH_WAIT, answer).await {
        Ok(Ok(outcome)) => json(&outcome),
        Ok(Err(_)) => (StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n").into_response(),
        Err(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "the fetch did not end in time; `converge status` shows the source when it does\n",
        )
            .into_response(),
    }
}

async fn healthz(State(s): State<ApiState>) -> Response {
    match s.health.check(crate::store::records::now_ms()) {
        Ok(sentence) => (StatusCode::OK, format!("ok: {sentence}\n")).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {reason}\n"),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct PlanQuery {
    /// The directory the client asks a plan of (canonicalized by it).
    dir: Option<String>,
}

async fn plan(State(s): State<ApiState>, Query(q): Query<PlanQuery>) -> Response {
    if let Some(asked) = q.dir {
        let asked = PathBuf::from(asked);
        let asked = std::fs::canonicalize(&asked).unwrap_or(asked);
        // Resolved now: a Git source's directory is a link that moves
        // from commit to commit.
        let watched = std::fs::canonicalize(&s.dir).unwrap_or_else(|_| s.dir.clone());
        if asked != watched {
            let message = format!(
                "a converge daemon holds the store of this state directory for {watched}, and it \
                 plans only that directory, not {asked}: plan {watched} (converge plan --dir \
                 {watched}), or stop the daemon to plan {asked} against this store\n",
                watched = s.dir.display(),
                asked = asked.display(),
            );
            return (StatusCode::CONFLICT, message).into_response();
        }
    }
    let plan = (s.plan)().await;
    json(&plan)
}

/// `?retry=true`: release the object's held artifact first.
#[derive(Debug, Default, Deserialize)]
struct ReconcileQuery {
    #[serde(default)]
    retry: bool,
}

async fn reconcile(
    State(s): State<ApiState>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    Query(query): Query<ReconcileQuery>,
) -> Response {
    let key = match key_of(&kind, &name) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    if !(s.known)(&key) {
        let message = format!(
            "{key} is not in the desired state of {dir}, so there is nothing to reconcile: \
             check the key (`converge status` lists the objects converge knows) or add it to the YAML\n",
            dir = s.dir.display(),
        );
        return (StatusCode::NOT_FOUND, message).into_response();
    }
    if query.retry {
        if let Ok(mut keys) = s.retries.lock() {
            keys.insert(key.clone());
        }
    }
    let note = if query.retry {
        " (a held artifact is released: it is tried again)"
    } else {
        ""
    };
    match s.manual.send(key.clone()) {
        Ok(()) => (StatusCode::ACCEPTED, format!("queued {key}{note}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n").into_response(),
    }
}

async fn suspend(
    State(s): State<ApiState>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
) -> Response {
    suspension(&s, &kind, &name, true)
}

async fn resume(
    State(s): State<ApiState>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
) -> Response {
    suspension(&s, &kind, &name, false)
}

/// Suspends or resumes, then queues a reconcile: its status says so at
/// once, and a resumed object converges at once.
fn suspension(s: &ApiState, kind: &str, name: &str, suspend: bool) -> Response {
    use crate::controller::suspend::{self, SuspendError};
    let key = match key_of(kind, name) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let done = if suspend {
        suspend::suspend(&s.store, &key, "suspend")
    } else {
        suspend::resume(&s.store, &key)
    };
    match done {
        Ok(message) => {
            let _ = s.manual.send(key);
            (StatusCode::OK, format!("{message}\n")).into_response()
        }
        Err(e @ SuspendError::Unknown { .. }) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Err(e @ SuspendError::NotSuspendable { .. }) => {
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
        Err(e) => store_failure(crate::telemetry::error_chain(&e)),
    }
}

async fn vm_op(s: &ApiState, name: &str, op: VmOp) -> Response {
    let name = match Name::new(name) {
        Ok(n) => n,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    match (s.vm)(name, op).await {
        Ok(outcome) => json(&outcome),
        Err(message) => (StatusCode::CONFLICT, message).into_response(),
    }
}

async fn vm_snapshots(State(s): State<ApiState>, UrlPath(name): UrlPath<String>) -> Response {
    vm_op(&s, &name, VmOp::Snapshots).await
}

async fn vm_snapshot(
    State(s): State<ApiState>,
    UrlPath((name, snap)): UrlPath<(String, String)>,
) -> Response {
    vm_op(&s, &name, VmOp::Snapshot(snap)).await
}

async fn vm_revert(
    State(s): State<ApiState>,
    UrlPath((name, snap)): UrlPath<(String, String)>,
) -> Response {
    vm_op(&s, &name, VmOp::Revert(snap)).await
}

/// `stop`, `start`, `restart`, `delete`.
async fn vm_power(
    State(s): State<ApiState>,
    UrlPath((name, verb)): UrlPath<(String, String)>,
) -> Response {
    let op = match verb.as_str() {
        "stop" => VmOp::Stop,
        "start" => VmOp::Start,
        "restart" => VmOp::Restart,
        "delete" => VmOp::Delete,
        other => {
            return (StatusCode::NOT_FOUND, format!("no VM verb {other:?}\n")).into_response();
        }
    };
    vm_op(&s, &name, op).await
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let body = s.metrics.render(&s.store);
    ([("content-type", METRICS_CONTENT_TYPE)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_replaces_a_socket_nobody_answers_on() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("converge.sock");
        drop(bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its socket file");
        let _listener = bind(&path).unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    #[tokio::test]
    async fn bind_refuses_a_socket_that_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("converge.sock");
        let _first = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(ApiError::InUse { .. })));
        std::os::unix::net::UnixStream::connect(&path).unwrap();
    }

    #[tokio::test]
    async fn bind_refuses_to_remove_what_is_not_a_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("converge.sock");
        std::fs::write(&path, "not a socket").unwrap();
        assert!(matches!(bind(&path), Err(ApiError::NotASocket { .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    }
}
