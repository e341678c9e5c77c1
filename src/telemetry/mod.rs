//! Telemetry beside the pipeline: Prometheus metrics, the status snapshot,
//! the local HTTP listener that serves both, and systemd notifications.
//! Nothing here decides anything; the pipeline reports into it.

pub mod http;
pub mod metrics;
pub mod status;
pub mod systemd;

use crate::backoff::lock;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Shared by the pipeline (writers) and the HTTP listener (readers).
pub struct Telemetry {
    pub metrics: metrics::Metrics,
    /// Everything in `/v1/status` but the services.
    pub status: Mutex<status::Snapshot>,
    /// Per service, updated by the reconciler on each change of that service.
    services: Mutex<BTreeMap<String, status::ServiceStatus>>,
    /// Per service, the latency of its last answered probe in milliseconds,
    /// written by its supervisor on every answer (the reconciler never sees it).
    last_check_ms: Mutex<HashMap<String, f64>>,
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
            status: Mutex::new(status::Snapshot::new(node, backend, endpoint)),
            services: Mutex::new(BTreeMap::new()),
            last_check_ms: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            started: Instant::now(),
            loop_turn_ms: AtomicU64::new(0),
        }
    }

    /// Change the shared status (poisoning never stops the agent).
    pub fn with_status<T>(&self, f: impl FnOnce(&mut status::Snapshot) -> T) -> T {
        f(&mut lock(&self.status))
    }

    /// Record one service's status, or forget it (`None`).
    pub fn set_service(&self, id: &str, service: Option<status::ServiceStatus>) {
        let mut map = lock(&self.services);
        match service {
            Some(s) => {
                map.insert(id.to_string(), s);
            }
            None => {
                map.remove(id);
                drop(map);
                lock(&self.last_check_ms).remove(id);
            }
        }
    }

    /// The latency of a service's last answered probe, from the probe's
    /// supervisor. `probing` is that supervisor's token: a forgotten service's
    /// probe is cancelled before `set_service(id, None)`, so checking it under
    /// the lock keeps a last answer from writing the entry back afterwards.
    pub fn check_latency(&self, id: &str, latency: Duration, probing: &CancellationToken) {
        let ms = latency.as_micros() as f64 / 1000.0;
        let mut map = lock(&self.last_check_ms);
        if probing.is_cancelled() {
            return;
        }
        match map.get_mut(id) {
            Some(v) => *v = ms,
            None => {
                map.insert(id.to_string(), ms);
            }
        }
    }

    /// The full status, built on request.
    pub fn snapshot(&self) -> status::Snapshot {
        let mut status = lock(&self.status).clone();
        status.ready = self.is_ready();
        let heartbeat = status.backend.last_heartbeat.clone();
        let services = lock(&self.services);
        let checks = lock(&self.last_check_ms);
        status.services = services
            .iter()
            .map(|(id, s)| status::ServiceStatus {
                last_heartbeat: if s.registered { heartbeat.clone() } else { None },
                last_check_ms: checks.get(id).copied(),
                ..s.clone()
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn service(id: &str) -> status::ServiceStatus {
        status::ServiceStatus::example(id, "passing", "SERVING")
    }

    fn last_check(t: &Telemetry, id: &str) -> Option<f64> {
        t.snapshot().services.iter().find(|s| s.id == id).and_then(|s| s.last_check_ms)
    }

    #[test]
    fn last_check_latency_is_served_and_forgotten_with_its_service() {
        let t = Telemetry::new("n1", "memory", "memory");
        let probing = CancellationToken::new();
        t.set_service("a", Some(service("a")));
        assert_eq!(last_check(&t, "a"), None);
        t.check_latency("a", Duration::from_micros(1_234), &probing);
        assert_eq!(last_check(&t, "a"), Some(1.234));
        t.check_latency("a", Duration::from_micros(56_000), &probing);
        assert_eq!(last_check(&t, "a"), Some(56.0));
        // A later status of the service keeps it; the reconciler never knows it.
        t.set_service("a", Some(service("a")));
        assert_eq!(last_check(&t, "a"), Some(56.0));
        let json = serde_json::to_value(t.snapshot()).unwrap();
        assert_eq!(json["services"][0]["last_check_ms"], 56.0);

        // Forgotten: its probe is cancelled first, then its status removed;
        // a last answer after that writes nothing back.
        probing.cancel();
        t.set_service("a", None);
        t.check_latency("a", Duration::from_millis(1), &probing);
        assert!(lock(&t.last_check_ms).is_empty());
        t.set_service("a", Some(service("a")));
        assert_eq!(last_check(&t, "a"), None);
        let json = serde_json::to_value(t.snapshot()).unwrap();
        assert!(json["services"][0].get("last_check_ms").is_none(), "{json}");
    }
}
