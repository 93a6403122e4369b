//! A VM's QMP monitor as the operations use it: connecting within a bound
//! and asking the run status, with failures as [`VmError::Qmp`] naming the
//! operation and the directory. The QMP protocol itself is [`super::qmp`]'s;
//! this file must not issue commands that change the VM (each operation
//! does that itself, on the connection it gets here).

use std::time::Duration;

use super::error::VmError;
use super::launch::VmPaths;
use super::qmp::Qmp;

/// Bound on one QMP command of an operation (savevm of a large guest is the
/// slowest one we issue).
pub(super) const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the status query during observation, which must stay quick.
pub(super) const OBSERVE_QMP_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) async fn connect(
    paths: &VmPaths,
    timeout: Duration,
    op: &'static str,
) -> Result<Qmp, VmError> {
    Qmp::connect(&paths.qmp_socket, timeout)
        .await
        .map_err(|source| VmError::Qmp {
            op,
            dir: paths.dir.clone(),
            source,
        })
}

pub(super) async fn query_status(paths: &VmPaths, timeout: Duration) -> Result<String, VmError> {
    let mut qmp = connect(paths, timeout, "query the status").await?;
    status_of(&mut qmp, paths).await
}

pub(super) async fn status_of(qmp: &mut Qmp, paths: &VmPaths) -> Result<String, VmError> {
    let v = qmp
        .execute("query-status", None)
        .await
        .map_err(|source| VmError::Qmp {
            op: "query the status",
            dir: paths.dir.clone(),
            source,
        })?;
    Ok(v["status"].as_str().unwrap_or("unknown").to_owned())
}
