//! Telemetry beside the pipeline: Prometheus metrics, the status snapshot,
//! the local HTTP listener that serves both, and systemd notifications.
//! Nothing here decides anything; the pipeline reports into it.

pub mod http;
pub mod metrics;
pub mod status;
pub mod systemd;

use crate::backoff::lock;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shared by the pipeline (writers) and the HTTP listener (readers).
pub struct Telemetry {
    pub metrics: metrics::Metrics,
    /// Everything in `/v1/status` but the services.
    pub status: Mutex<status::Status>,
    /// Per service, updated by the reconciler on each change of that service.
    services: Mutex<BTreeMap<String, status::ServiceStatus>>,
    ready: AtomicBool,
    started: Instant,
    /// Milliseconds since `started` at the reconciler loop's last turn.
    loop_turn_ms: AtomicU64,
}

/// The reconciler's loop is considered stuck after this long without a turn
/// (an idle loop turns every 10 s; see `reconcile::TICK`).
pub const LOOP_STUCK_AFTER: Duration = Duration::from_secs(30);

impl Telemetry {
    pub fn new(node: &str, backend: &str, endpoint: &str) -> Self {
        Telemetry {
            metrics: metrics::Metrics::new(backend),
            status: Mutex::new(status::Status::new(node, backend, endpoint)),
            services: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            started: Instant::now(),
            loop_turn_ms: AtomicU64::new(0),
        }
    }

    /// Change the shared status (poisoning never stops the agent).
    pub fn with_status<T>(&self, f: impl FnOnce(&mut status::Status) -> T) -> T {
        f(&mut lock(&self.status))
    }

    /// Record one service's status, or forget it (`None`).
    pub fn set_service(&self, id: &str, service: Option<status::ServiceStatus>) {
        let mut map = lock(&self.services);
        match service {
            Some(s) => map.insert(id.to_string(), s),
            None => map.remove(id),
        };
    }

    /// The full status, built on request.
    pub fn snapshot(&self) -> status::Status {
        let mut status = lock(&self.status).clone();
        status.ready = self.is_ready();
        let heartbeat = status.backend.last_heartbeat.clone();
        status.services = lock(&self.services)
            .values()
            .map(|s| status::ServiceStatus { last_heartbeat: if s.registered { heartbeat.clone() } else { None }, ..s.clone() })
            .collect();
        status
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Called by the reconciler's loop on every turn.
    pub fn loop_turn(&self) {
        self.loop_turn_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the reconciler's loop turned recently.
    pub fn loop_alive(&self) -> bool {
        let last = Duration::from_millis(self.loop_turn_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) < LOOP_STUCK_AFTER
    }
}
