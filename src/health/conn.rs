//! Connections per target, not per service.
//!
//! Services whose checks name the same target with the same TLS settings,
//! `:authority` and metadata share one HTTP/2 connection (a tonic [`Channel`]): their Watch streams and
//! Checks are multiplexed on it, and a further connection is opened once one
//! carries [`STREAMS_PER_CONNECTION`] services. 1,000 services on 10 servers
//! are 10 connections, not 1,000.
//!
//! Each connection with Watch users has one *liveness check*: a unary `Check`
//! (service `""`) every interval (the shortest among its services), with the
//! longest timeout among them as deadline. Any answer, even NOT_FOUND or
//! UNIMPLEMENTED, means the server is alive; a deadline or a transport error
//! is published to every service on the connection, which all fail at once.
//! That is how a frozen (SIGSTOPped) server is caught: once per connection per
//! interval rather than once per service. Each published result also lets the
//! probes re-confirm their last Watch status, for rise/fall counting.
//!
//! A connection lives while a [`Lease`] on it does; its liveness task ends
//! with it.

use super::metadata::Metadata;
use super::rpc::{self, describe, endpoint, server_answered};
use crate::backoff::lock;
use crate::config::tls::{Rotation, TlsConfig};
use crate::config::MetadataSource;
use crate::config::{CheckMode, CheckSpec};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;

/// Services per connection before another connection to the same target is
/// opened (servers commonly allow 100–200 concurrent streams).
pub const STREAMS_PER_CONNECTION: usize = 100;
/// How often a connection without Watch users looks whether it was dropped.
const UNWATCHED_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    target: String,
    tls: Option<TlsConfig>,
    authority: Option<String>,
    metadata: BTreeMap<String, MetadataSource>,
}

/// The pool of connections to gRPC targets, shared by all probes.
#[derive(Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<HashMap<Key, Vec<Weak<Connection>>>>>,
}

/// The result of a connection's latest liveness check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Beat {
    /// Increases with every liveness check.
    pub seq: u64,
    /// Why the server is considered dead; `None` = it answered.
    pub error: Option<String>,
}

struct Connection {
    key: Key,
    channel: Channel,
    /// Sent on every call on this connection, its liveness check included.
    metadata: Metadata,
    rotation: Option<Rotation>,
    users: AtomicUsize,
    watchers: AtomicUsize,
    /// Shortest interval among Watch users (ms), longest timeout (ms).
    interval_ms: AtomicU64,
    timeout_ms: AtomicU64,
    beat: watch::Sender<Beat>,
    /// Signalled when a Watch user joins: the liveness task sleeps while the
    /// connection has none (poll-mode services send their own Checks).
    watch_joined: Arc<Notify>,
}

/// One service's share of a connection. Dropping it releases the share.
pub struct Lease {
    conn: Arc<Connection>,
    watch: bool,
}

impl Connections {
    pub fn new() -> Self {
        Self::default()
    }

    /// A share of a connection for `spec`'s target and TLS settings.
    pub fn get(&self, spec: &CheckSpec) -> Result<Lease, String> {
        let key =
            Key { target: spec.target.clone(), tls: spec.tls.clone(), authority: spec.authority.clone(), metadata: spec.metadata.clone() };
        let watch = spec.mode == CheckMode::Watch;
        let mut map = lock(&self.inner);
        let conns = map.entry(key.clone()).or_default();
        conns.retain(|w| w.strong_count() > 0);
        let usable =
            conns.iter().filter_map(Weak::upgrade).find(|c| c.users.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION && !c.rotated());
        let conn = match usable {
            Some(c) => c,
            None => {
                let rotation = key.tls.as_ref().map(Rotation::new);
                let watch_joined = Arc::new(Notify::new());
                let channel = channel(&key, spec.timeout)?;
                let metadata = Metadata::new(&key.metadata)?;
                let conn = Arc::new(Connection {
                    key,
                    channel,
                    metadata,
                    rotation,
                    users: AtomicUsize::new(0),
                    watchers: AtomicUsize::new(0),
                    interval_ms: AtomicU64::new(u64::MAX),
                    timeout_ms: AtomicU64::new(0),
                    beat: watch::Sender::new(Beat::default()),
                    watch_joined: watch_joined.clone(),
                });
                conns.push(Arc::downgrade(&conn));
                tokio::spawn(liveness(Arc::downgrade(&conn), watch_joined));
                conn
            }
        };
        conn.users.fetch_add(1, Ordering::Relaxed);
        if watch {
            conn.watchers.fetch_add(1, Ordering::Relaxed);
            conn.interval_ms.fetch_min(spec.interval.as_millis() as u64, Ordering::Relaxed);
            conn.timeout_ms.fetch_max(spec.timeout.as_millis() as u64, Ordering::Relaxed);
            conn.watch_joined.notify_one();
        }
        Ok(Lease { conn, watch })
    }
}

impl Lease {
    pub fn channel(&self) -> Channel {
        self.conn.channel.clone()
    }

    /// The metadata every call of this check carries.
    pub fn metadata(&self) -> &Metadata {
        &self.conn.metadata
    }

    /// The connection's liveness results.
    pub fn beats(&self) -> watch::Receiver<Beat> {
        self.conn.beat.subscribe()
    }

    /// Whether the TLS files this connection was built from changed since.
    pub fn rotated(&self) -> bool {
        self.conn.rotated()
    }
}

impl Connection {
    fn rotated(&self) -> bool {
        match (&self.rotation, &self.key.tls) {
            (Some(r), Some(tls)) => r.changed(tls),
            _ => false,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.users.fetch_sub(1, Ordering::Relaxed);
        if self.watch {
            self.conn.watchers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A connection's liveness task: ends when the connection is dropped. While
/// the connection has no Watch user it sleeps until one joins (or
/// [`UNWATCHED_RECHECK`] passes, to notice a dropped connection), so a
/// poll-only connection costs no extra wake-ups.
async fn liveness(conn: Weak<Connection>, watch_joined: Arc<Notify>) {
    loop {
        let Some((interval, _)) = settings(&conn) else { return };
        if conn.upgrade().is_none_or(|c| c.watchers.load(Ordering::Relaxed) == 0) {
            tokio::select! {
                _ = watch_joined.notified() => {}
                _ = tokio::time::sleep(UNWATCHED_RECHECK) => {}
            }
            continue;
        }
        tokio::time::sleep_until(crate::timer::after(interval)).await;
        let Some(c) = conn.upgrade() else { return };
        if c.watchers.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let (_, deadline) = settings(&conn).expect("alive");
        let channel = c.channel.clone();
        let mut req = tonic::Request::new(HealthCheckRequest { service: String::new() });
        // Any answer means alive, Unauthenticated too: a metadata file that
        // cannot be read fails the services' own checks, not this one.
        let _ = c.metadata.apply(&mut req);
        drop(c);
        req.set_timeout(deadline);
        let error = match tokio::time::timeout(deadline, rpc::check(channel, req)).await {
            Err(_) => Some(format!("deadline exceeded after {}", humantime::format_duration(deadline))),
            Ok(Ok(_)) => None,
            Ok(Err(status)) if server_answered(&status) => None,
            Ok(Err(status)) => Some(describe(&status, deadline)),
        };
        let Some(c) = conn.upgrade() else { return };
        if let Some(e) = &error {
            tracing::debug!(target = %c.key.target, error = %e, "connection liveness check failed");
        }
        c.beat.send_modify(|b| {
            b.seq += 1;
            b.error = error;
        });
    }
}

/// A lazily connecting channel to the key's target: `host:port` over TCP,
/// or `unix:///path` over a Unix socket (`:authority` then `localhost`
/// unless `authority` says otherwise).
fn channel(key: &Key, connect_timeout: Duration) -> Result<Channel, String> {
    let Some(path) = key.target.strip_prefix("unix://") else {
        return Ok(endpoint(&key.target, connect_timeout, key.tls.as_ref(), key.authority.as_deref())?.connect_lazy());
    };
    let path = std::path::PathBuf::from(path);
    let authority = key.authority.as_deref().unwrap_or("localhost");
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    });
    Ok(endpoint(authority, connect_timeout, key.tls.as_ref(), None)?.connect_with_connector_lazy(connector))
}

fn settings(conn: &Weak<Connection>) -> Option<(Duration, Duration)> {
    let c = conn.upgrade()?;
    let interval = match c.interval_ms.load(Ordering::Relaxed) {
        u64::MAX => Duration::from_secs(5),
        ms => Duration::from_millis(ms.max(10)),
    };
    let timeout = Duration::from_millis(c.timeout_ms.load(Ordering::Relaxed).max(100));
    Some((interval, timeout))
}
