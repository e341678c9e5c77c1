//! The connection to the etcd cluster: connecting (and reconnecting when the
//! TLS files rotate), the retry policy of idempotent calls, and etcd's errors
//! as [`RegistryError`]s.

use crate::config::agent::{credential_path, read_secret};
use crate::config::tls::Rotation;
use crate::config::EtcdConfig;
use crate::registry::{ErrorKind, RegistryError, Result};
use backon::ExponentialBuilder;
use etcd_client::{Client, ConnectOptions};
use std::time::Duration;

pub(super) fn err(e: etcd_client::Error) -> RegistryError {
    use etcd_client::Error as E;
    let kind = match &e {
        E::GRpcStatus(s) if s.code() == tonic::Code::NotFound || s.message().contains("lease not found") => ErrorKind::Missing,
        E::LeaseKeepAliveError(m) if m.contains("not found") => ErrorKind::Missing,
        // Refusals in form only, that heal by themselves: a user or role
        // changed between a request's auth check and its apply (etcd 3.4
        // answers InvalidArgument), a member that lost its leadership or is a
        // learner (FailedPrecondition).
        E::GRpcStatus(s) if TRANSIENT_REFUSALS.iter().any(|m| s.message().contains(m)) => ErrorKind::Unavailable,
        E::GRpcStatus(s)
            if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition) =>
        {
            ErrorKind::Rejected
        }
        _ => ErrorKind::Unavailable,
    };
    RegistryError::new(kind, format!("etcd: {e}"))
}

/// etcd 3.4's messages for refusals that heal by themselves.
const TRANSIENT_REFUSALS: [&str; 3] = ["revision of auth store is old", "not leader", "not supported for learner"];

/// Transient failures worth retrying: a member down, no leader, a lost connection.
pub(super) fn retryable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown),
        E::TransportError(_) | E::IoError(_) => true,
        _ => false,
    }
}

/// Retry policy for idempotent calls: a dead member fails a share of calls.
pub(super) fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(4)
        .with_jitter()
}

/// A new connection to the cluster (connect timeouts, HTTP/2 keepalive,
/// require-leader, auth with token refresh, TLS).
async fn connect(config: &EtcdConfig) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_tcp_keepalive(Duration::from_secs(10))
        .with_require_leader(true);
    if let Some(user) = &config.username {
        let file = config.password_file.clone().or_else(|| credential_path("etcd.password")).ok_or_else(|| {
            RegistryError::new(ErrorKind::Rejected, "etcd username is set but there is no password_file and no etcd.password credential")
        })?;
        let password = read_secret(&file).map_err(|e| RegistryError::new(ErrorKind::Rejected, e.to_string()))?;
        opts = opts.with_user(user.clone(), password).with_auto_token_refresh(true);
    }
    let tls = &config.tls;
    if tls.is_set() || config.endpoints.iter().any(|e| e.starts_with("https://")) {
        let t = tls.grpc_client().map_err(|e| RegistryError::new(ErrorKind::Rejected, format!("etcd TLS: {e}")))?;
        opts = opts.with_tls(t);
    }
    Client::connect(&config.endpoints, Some(opts)).await.map_err(err)
}

/// The cached client, or a new one; a new one also when TLS files rotated.
pub(super) async fn client_of(
    config: &EtcdConfig,
    client: &mut Option<Client>,
    rotation: &mut Option<Rotation>,
    who: &str,
) -> Result<Client> {
    if client.is_some() && config.tls.is_set() && rotation.as_ref().is_some_and(|r| r.changed(&config.tls)) {
        tracing::info!("etcd TLS files changed; {who} reconnects with them");
        *client = None;
    }
    if let Some(c) = client {
        return Ok(c.clone());
    }
    let stamp = Rotation::new(&config.tls);
    let c = connect(config).await?;
    *rotation = Some(stamp);
    *client = Some(c.clone());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_that_heal_are_transient_the_others_permanent() {
        let status = |code, msg: &str| err(etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg)));
        use tonic::Code;
        let class = |e: RegistryError| e.kind.class();
        use crate::registry::ErrorClass::{Permanent, Transient};
        assert_eq!(class(status(Code::InvalidArgument, "etcdserver: revision of auth store is old")), Transient);
        assert_eq!(class(status(Code::FailedPrecondition, "etcdserver: not leader")), Transient);
        assert_eq!(class(status(Code::FailedPrecondition, "etcdserver: rpc not supported for learner")), Transient);
        assert_eq!(class(status(Code::PermissionDenied, "etcdserver: permission denied")), Permanent);
        assert_eq!(class(status(Code::InvalidArgument, "etcdserver: request is too large")), Permanent);
        assert_eq!(class(status(Code::Unavailable, "etcdserver: leader changed")), Transient);
    }
}
