//! Registry backends behind one trait. Backends store what they are told;
//! they never decide health, and only the reconciler calls them.

pub mod consul;
pub mod etcd;

use crate::config::ServiceSpec;
use crate::health::{Health, Status};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// What the agent itself needs from the registry, derived from all services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub node: String,
    /// Liveness TTL: the shortest `ttl` of all services (15s with none).
    pub ttl: Duration,
    /// The longest `deregister_critical_after` of all services (1m with none).
    pub deregister_after: Duration,
}

impl AgentInfo {
    pub fn for_services<'a>(node: &str, specs: impl Iterator<Item = &'a ServiceSpec>) -> Self {
        let mut ttl = None::<Duration>;
        let mut dereg = Duration::from_secs(60);
        for s in specs {
            ttl = Some(ttl.map_or(s.ttl, |t| t.min(s.ttl)));
            dereg = dereg.max(s.deregister_critical_after);
        }
        AgentInfo { node: node.to_string(), ttl: ttl.unwrap_or(Duration::from_secs(15)), deregister_after: dereg }
    }

    /// How often liveness is heartbeated.
    pub fn heartbeat_every(&self) -> Duration {
        self.ttl / 3
    }
}

/// A service found in the registry, owned by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteEntry {
    pub id: String,
    pub name: String,
    /// Compared with [`View::fingerprint`] of the desired spec.
    pub fingerprint: String,
    pub health: Option<Health>,
    /// In maintenance (drained) on a registry that keeps drained records (Consul).
    pub maintenance: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The registry could not be reached, or timed out.
    Unavailable,
    /// Something tether relies on is gone (e.g. the registry lost its state).
    Missing,
    /// The registry refused the request.
    Rejected,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Missing => "missing",
            ErrorKind::Rejected => "rejected",
        }
    }

    /// Whether retrying can help without a person acting.
    pub fn class(self) -> ErrorClass {
        match self {
            ErrorKind::Unavailable | ErrorKind::Missing => ErrorClass::Transient,
            ErrorKind::Rejected => ErrorClass::Permanent,
        }
    }
}

/// Errors by whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Can heal by itself (transport, timeouts, 5xx, 429, a lost leader, lost
    /// state): the registry is re-read and the writes retried with capped,
    /// jittered backoff of seconds.
    Transient,
    /// Cannot change until a person acts (Consul 400/403/404 on a write, etcd
    /// permission denied or invalid argument): only the refused service
    /// waits, with backoff of minutes, and is retried at once when its file
    /// or the registry credentials change.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RegistryError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RegistryError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RegistryError { kind, message: message.into() }
    }
}

pub type Result<T> = std::result::Result<T, RegistryError>;

/// What became of one write of a batch given to [`Registry::apply`].
#[derive(Debug, Clone)]
pub enum Outcome {
    Done,
    Failed(RegistryError),
    /// Not attempted: an earlier write of the batch failed in a way that can
    /// heal (the registry is unreachable), so the rest were not sent.
    NotTried,
}

/// One registry write, as queued by the reconciler and done by its writer.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Write the whole record with this health, and in maintenance (drained)
    /// from the first moment when `maintenance` (only on registries that keep
    /// critical records: elsewhere a drained record is absent).
    Register { spec: Arc<ServiceSpec>, health: Health, maintenance: bool },
    /// Change only the health of a record the registry holds; `was` is the
    /// status it holds now, as far as tether knows (None: unknown).
    Health { spec: Arc<ServiceSpec>, health: Health, was: Option<Status> },
    /// Remove the record.
    Deregister { id: String, name: String },
    /// Take the record out of (or back into) the healthy set without removing
    /// it (Consul's maintenance mode); only on registries that keep critical records.
    Maintenance { id: String, on: bool },
}

impl Write {
    pub fn id(&self) -> &str {
        match self {
            Write::Register { spec, .. } | Write::Health { spec, .. } => &spec.id,
            Write::Deregister { id, .. } | Write::Maintenance { id, .. } => id,
        }
    }

    /// The operation's name in metrics and logs.
    pub fn op(&self) -> &'static str {
        match self {
            Write::Register { .. } => "register",
            Write::Health { .. } => "set_health",
            Write::Deregister { .. } => "deregister",
            Write::Maintenance { .. } => "maintenance",
        }
    }
}

/// What the reconciler needs to know of a backend without doing I/O: how to
/// compare records. Cheap to clone; may read state shared with the backend
/// (etcd's current lease).
pub trait View: Clone + Send + Sync + 'static {
    /// Whether critical services stay registered (Consul) or are removed (etcd).
    fn keeps_critical(&self) -> bool;

    /// A string equal to a [`RemoteEntry::fingerprint`] exactly when the
    /// registry already holds this spec.
    fn fingerprint(&self, spec: &ServiceSpec) -> String;

    /// What the registry holds after one write of `to` (a registration, or a
    /// health change from status `was`): `to` itself, unless the backend
    /// writes a new status and its reason apart. Then the status alone, and
    /// the reconciler queues the reason as a write of its own, behind the
    /// status writes already waiting (Consul: a critical check is added,
    /// then its output set, since Consul 1.8 takes no output at check
    /// registration).
    fn written(&self, was: Option<Status>, to: &Health) -> Health {
        let _ = was;
        to.clone()
    }

    /// The files the backend's credentials come from (an ACL token, a
    /// password, TLS files): when one changes, writes the registry refused
    /// are tried again at once.
    fn credential_files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}

/// [`View::written`] of a backend that writes a new critical status and its
/// reason apart: a service turning critical holds the status alone, with no
/// reason yet; any other write leaves `to`.
pub fn status_then_reason(was: Option<Status>, to: &Health) -> Health {
    match to.status {
        Status::Critical | Status::Warning if was != Some(to.status) => Health { status: to.status, output: String::new() },
        _ => to.clone(),
    }
}

/// tether's liveness, on its own connection to the registry: nothing queued
/// for the writer can delay it.
pub trait Heartbeat: Send + 'static {
    /// Tell the registry tether is alive.
    fn beat(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// A registry as the reconciler's writer sees it. Only the writer task calls
/// these (and the shutdown path, after the writer stopped).
pub trait Registry: Send + 'static {
    type View: View;
    type Lane: Heartbeat;

    fn view(&self) -> Self::View;

    /// A heartbeat lane with its own connection.
    fn lane(&self) -> Result<Self::Lane>;

    /// The most writes [`Registry::apply`] takes at once.
    fn max_batch(&self) -> usize;

    /// Make sure tether's own presence (Consul: its service and liveness
    /// check; etcd: its lease) matches `agent`, and list every service owned
    /// by this node: one read of the registry.
    fn sync_agent(&mut self, agent: &AgentInfo) -> impl Future<Output = Result<Vec<RemoteEntry>>> + Send;

    /// Every service owned by this node.
    fn list(&mut self) -> impl Future<Output = Result<Vec<RemoteEntry>>> + Send;

    /// Do `writes` in order, and say what became of each: one [`Outcome`]
    /// per write, in the same order. The contract:
    ///
    /// - a failure that can heal ([`ErrorClass::Transient`]) ends the batch:
    ///   the writes not yet sent are [`Outcome::NotTried`] (writes already
    ///   in flight beside it report their own outcomes);
    /// - a failure that cannot ([`ErrorClass::Permanent`]) is its own
    ///   write's: the others are still done, and never fail because of it
    ///   (etcd tries the writes of a refused transaction one by one).
    fn apply(&mut self, writes: &[Write]) -> impl Future<Output = Vec<Outcome>> + Send;

    /// Before anything is written: whether another live agent holds this
    /// identity against this registry (`Some(why)`), watching its liveness
    /// record for up to one heartbeat period (see `identity`). Reads only.
    fn claim(&mut self) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Tether is stopping: remove its own presence when `deregister`, else
    /// leave it to expire (marked stopped, so a restart adopts it at once).
    fn shutdown(&mut self, deregister: bool) -> impl Future<Output = Result<()>> + Send;
}
