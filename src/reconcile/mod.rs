//! The one writer: desired specs + health → registry records.
//!
//! The reconciler owns, per service, the desired spec, the latest health from
//! its probe, and what it believes the registry holds (`remote`). Every input
//! (a new desired set, a health change, a timer) updates local state and then
//! [`Reconciler::sync`]s the affected records: a write happens only where the
//! desired view and the remote view differ, so restarts and resyncs cause no
//! churn. Anti-entropy (at start, after any registry error, and on a jittered
//! period) re-reads the remote view, re-registers what is missing and removes
//! records this node owns that no file describes. It never touches records
//! owned by anyone else. Its loop also drives tether's liveness heartbeat and
//! the systemd watchdog, so a stuck loop shows up as a dead agent.

use crate::config::ServiceSpec;
use crate::health::supervisor::{supervise, HealthChange};
use crate::health::{Health, Status};
use crate::registry::{AgentInfo, ErrorKind, Registry, RegistryError, RemoteEntry};
use crate::telemetry::metrics::{unix_now, Metrics};
use crate::telemetry::status::{rfc3339, ServiceStatus};
use crate::telemetry::{systemd, Telemetry};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Period of anti-entropy when nothing goes wrong (±20 % jitter).
pub const ANTI_ENTROPY_EVERY: Duration = Duration::from_secs(30);
/// Retry delays after registry errors: doubling from the first to the cap, jittered.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(10);
/// Anti-entropy writes this many fixes at once, then at most one per spacing
/// (≤ 500/s), so a registry that lost everything is not flooded.
const AE_BURST: u64 = 100;
const AE_WRITE_SPACING: Duration = Duration::from_millis(2);
/// The loop turns at least this often (loop-alive mark, watchdog).
const TICK: Duration = Duration::from_secs(1);
/// Output shown for a new service before its first health result.
pub const WAITING: &str = "waiting for the first gRPC health result";

/// What the registry holds for one service, as far as we know.
#[derive(Debug, Clone, PartialEq)]
struct Remote {
    fingerprint: String,
    health: Option<Health>,
}

struct Entry {
    spec: ServiceSpec,
    /// Latest decided health from the probe; `None` before the first result.
    health: Option<Health>,
    critical_since: Option<Instant>,
    /// When `health` last changed.
    since: Option<SystemTime>,
    remote: Option<Remote>,
    last_write: Instant,
    last_write_at: Option<SystemTime>,
    last_error: Option<String>,
    generation: u64,
    probe: CancellationToken,
}

pub struct Reconciler<R: Registry> {
    registry: R,
    node: String,
    deregister_on_shutdown: bool,
    entries: BTreeMap<String, Entry>,
    agent: Option<AgentInfo>,
    /// The remote view cannot be trusted until the next anti-entropy succeeds.
    stale: bool,
    next_anti_entropy: Instant,
    retry_delay: Option<Duration>,
    next_heartbeat: Instant,
    generation: u64,
    health_tx: mpsc::Sender<HealthChange>,
    health_rx: mpsc::Receiver<HealthChange>,
    probes: TaskTracker,
    telemetry: Arc<Telemetry>,
    watchdog_every: Option<Duration>,
    next_watchdog: Instant,
    last_heartbeat: Option<SystemTime>,
}

impl<R: Registry> Reconciler<R> {
    pub fn new(registry: R, node: &str, deregister_on_shutdown: bool, telemetry: Arc<Telemetry>) -> Self {
        let (health_tx, health_rx) = mpsc::channel(1024);
        let now = Instant::now();
        Reconciler {
            registry,
            node: node.to_string(),
            deregister_on_shutdown,
            entries: BTreeMap::new(),
            agent: None,
            stale: true,
            next_anti_entropy: now,
            retry_delay: None,
            next_heartbeat: now,
            generation: 0,
            health_tx,
            health_rx,
            probes: TaskTracker::new(),
            telemetry,
            watchdog_every: systemd::watchdog_every(),
            next_watchdog: now,
            last_heartbeat: None,
        }
    }

    /// Run until `shutdown` fires; `desired` delivers each new desired set.
    pub async fn run(mut self, mut desired: mpsc::Receiver<BTreeMap<String, ServiceSpec>>, shutdown: CancellationToken) {
        // The first anti-entropy pass waits for the first scan, so that it
        // registers tether's liveness with the right TTL at once.
        tokio::select! {
            _ = shutdown.cancelled() => return self.shutdown().await,
            first = desired.recv() => match first {
                Some(set) => self.apply_desired(set).await,
                None => return self.shutdown().await,
            },
        }
        loop {
            self.turn();
            let deadline = self.next_deadline();
            let tick = Instant::now() + self.watchdog_every.map_or(TICK, |w| w.min(TICK));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(set) = desired.recv() => self.apply_desired(set).await,
                Some(change) = self.health_rx.recv() => self.apply_health(change).await,
                _ = sleep_until(self.next_heartbeat), if !self.stale => self.heartbeat().await,
                _ = sleep_until(self.next_anti_entropy) => self.anti_entropy().await,
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => self.sync_all().await,
                _ = sleep_until(tick) => {}
            }
            self.publish();
        }
        self.shutdown().await;
    }

    /// Marks the loop alive, and pings systemd's watchdog when due.
    fn turn(&mut self) {
        self.telemetry.loop_turn();
        if let Some(every) = self.watchdog_every {
            if Instant::now() >= self.next_watchdog {
                systemd::watchdog();
                self.next_watchdog = Instant::now() + every;
            }
        }
    }

    /// Start, stop or restart probes and records for a new desired set.
    async fn apply_desired(&mut self, set: BTreeMap<String, ServiceSpec>) {
        let removed: Vec<String> = self.entries.keys().filter(|id| !set.contains_key(*id)).cloned().collect();
        for id in removed {
            let entry = self.entries.remove(&id).expect("present");
            entry.probe.cancel();
            self.telemetry.metrics.forget(&id);
            tracing::info!(service = %id, file = %entry.spec.file.display(), "service file removed");
            if entry.remote.is_some() && !self.stale {
                self.write(&id, entry.spec.name.clone(), Write::Deregister).await;
            }
            // If stale, the next anti-entropy removes it as an orphan.
        }
        let mut touched = Vec::new();
        for (id, spec) in set {
            match self.entries.get_mut(&id) {
                Some(entry) if entry.spec == spec => continue,
                Some(entry) => {
                    tracing::info!(service = %id, file = %spec.file.display(), "service file changed");
                    if entry.spec.check != spec.check {
                        entry.probe.cancel();
                        self.generation += 1;
                        entry.generation = self.generation;
                        entry.probe = spawn_probe(&self.probes, &id, self.generation, &spec, &self.health_tx, &self.telemetry);
                    }
                    entry.spec = spec;
                }
                None => {
                    tracing::info!(service = %id, file = %spec.file.display(), "service added");
                    self.generation += 1;
                    let probe = spawn_probe(&self.probes, &id, self.generation, &spec, &self.health_tx, &self.telemetry);
                    self.telemetry.metrics.service_health.get_or_create(&Metrics::service(&id)).set(-1);
                    self.entries.insert(
                        id.clone(),
                        Entry {
                            spec,
                            health: None,
                            critical_since: None,
                            since: None,
                            remote: None,
                            last_write: Instant::now(),
                            last_write_at: None,
                            last_error: None,
                            generation: self.generation,
                            probe,
                        },
                    );
                }
            }
            touched.push(id);
        }
        self.telemetry.metrics.services.set(self.entries.len() as i64);
        let agent = AgentInfo::for_services(&self.node, self.entries.values().map(|e| &e.spec));
        if self.agent.as_ref() != Some(&agent) && !self.stale {
            self.ensure_agent(agent).await;
        }
        for id in touched {
            self.sync(&id).await;
        }
    }

    async fn apply_health(&mut self, change: HealthChange) {
        let Some(entry) = self.entries.get_mut(&change.id) else { return };
        if entry.generation != change.generation {
            return;
        }
        entry.critical_since = match change.health.status {
            Status::Critical => entry.critical_since.or(Some(Instant::now())),
            Status::Passing => None,
        };
        let m = &self.telemetry.metrics;
        m.service_health.get_or_create(&Metrics::service(&change.id)).set(i64::from(change.health.status == Status::Passing));
        m.transition(&change.id, change.health.status.as_str());
        entry.since = Some(SystemTime::now());
        entry.health = Some(change.health);
        self.sync(&change.id).await;
    }

    /// What the registry should hold for an entry: `None` = nothing.
    fn desired_view(&self, entry: &Entry) -> Option<Remote> {
        let health = entry
            .health
            .clone()
            .or_else(|| entry.remote.as_ref().and_then(|r| r.health.clone()))
            .unwrap_or_else(|| Health::critical(WAITING));
        if health.status == Status::Critical {
            if !self.registry.keeps_critical() {
                return None;
            }
            if entry.critical_since.is_some_and(|t| t.elapsed() >= entry.spec.deregister_critical_after) {
                return None;
            }
        }
        // Computed afresh: it may depend on backend state (etcd's lease).
        Some(Remote { fingerprint: self.registry.fingerprint(&entry.spec), health: Some(health) })
    }

    /// Make the registry hold the desired view of one service.
    async fn sync(&mut self, id: &str) {
        if self.stale {
            return;
        }
        let Some(entry) = self.entries.get(id) else { return };
        let desired = self.desired_view(entry);
        let name = entry.spec.name.clone();
        let refresh_due = self.registry.refresh_after().is_some_and(|d| entry.last_write.elapsed() >= d);
        let op = match (&desired, &entry.remote) {
            (None, None) => return,
            (None, Some(_)) => Write::Deregister,
            (Some(d), None) => Write::Register(d.health.clone().expect("desired health")),
            (Some(d), Some(r)) if d.fingerprint != r.fingerprint => Write::Register(d.health.clone().expect("desired health")),
            (Some(d), Some(r)) if d.health != r.health || refresh_due => Write::Health(d.health.clone().expect("desired health")),
            _ => return,
        };
        self.write(id, name, op).await;
    }

    async fn write(&mut self, id: &str, name: String, op: Write) {
        let result = match (&op, self.entries.get(id)) {
            (Write::Deregister, _) => self.registry.deregister(id, &name).await,
            (Write::Register(h), Some(e)) => self.registry.register(&e.spec, h).await,
            (Write::Health(h), Some(e)) => self.registry.set_health(&e.spec, h).await,
            (_, None) => return,
        };
        let op_name = op.name();
        self.count(op_name, &result);
        let Some(entry) = self.entries.get_mut(id) else {
            match result {
                Ok(()) => tracing::info!(service = %id, "deregistered"),
                Err(e) => self.registry_error(&format!("deregistering removed service {id}"), e),
            }
            return;
        };
        match result {
            Ok(()) => {
                entry.last_write = Instant::now();
                entry.last_write_at = Some(SystemTime::now());
                entry.last_error = None;
                self.telemetry.metrics.service_last_write.get_or_create(&Metrics::service(id)).set(unix_now());
                match op {
                    Write::Deregister => {
                        let why = if self.registry.keeps_critical() {
                            "critical for longer than deregister_critical_after"
                        } else {
                            "not passing"
                        };
                        tracing::info!(service = %id, reason = why, "deregistered");
                        entry.remote = None;
                    }
                    Write::Register(h) => {
                        tracing::info!(service = %id, status = %h.status, "registered");
                        entry.remote = Some(Remote { fingerprint: self.registry.fingerprint(&entry.spec), health: Some(h) });
                    }
                    Write::Health(h) => {
                        tracing::debug!(service = %id, status = %h.status, "health written");
                        if let Some(r) = entry.remote.as_mut() {
                            r.health = Some(h);
                        }
                    }
                }
            }
            Err(e) => {
                entry.last_error = Some(e.to_string());
                self.registry_error(&format!("writing service {id}"), e);
            }
        }
    }

    fn count(&self, op: &str, result: &Result<(), RegistryError>) {
        let m = &self.telemetry.metrics;
        m.op(op);
        if let Err(e) = result {
            m.error(op, e.kind.as_str());
        }
    }

    async fn heartbeat(&mut self) {
        let every = self.agent.as_ref().map_or(Duration::from_secs(5), AgentInfo::heartbeat_every);
        self.next_heartbeat = Instant::now() + every;
        let result = self.registry.heartbeat().await;
        self.count("heartbeat", &result);
        match result {
            Ok(()) => self.heartbeat_ok(),
            Err(e) => self.registry_error("heartbeat", e),
        }
    }

    fn heartbeat_ok(&mut self) {
        self.last_heartbeat = Some(SystemTime::now());
        self.telemetry.metrics.heartbeat_last.set(unix_now());
    }

    async fn ensure_agent(&mut self, agent: AgentInfo) -> bool {
        let result = self.registry.ensure_agent(&agent).await;
        self.count("ensure_agent", &result);
        match result {
            Ok(()) => {
                self.heartbeat_ok();
                self.next_heartbeat = Instant::now() + agent.heartbeat_every();
                self.agent = Some(agent);
                true
            }
            Err(e) => {
                self.registry_error("registering tether's own liveness", e);
                false
            }
        }
    }

    /// Re-read the registry and fix every difference.
    async fn anti_entropy(&mut self) {
        let agent = AgentInfo::for_services(&self.node, self.entries.values().map(|e| &e.spec));
        self.stale = true;
        if !self.ensure_agent(agent).await {
            return;
        }
        let listed = self.registry.list().await;
        self.count("list", &listed.as_ref().map(drop).map_err(Clone::clone));
        let remote = match listed {
            Ok(r) => r,
            Err(e) => return self.registry_error("listing registered services", e),
        };
        let was_retrying = self.retry_delay.take().is_some();
        self.stale = false;
        self.next_anti_entropy = Instant::now() + jitter(ANTI_ENTROPY_EVERY);
        let mut by_id: HashMap<String, RemoteEntry> = remote.into_iter().map(|r| (r.id.clone(), r)).collect();
        for (id, entry) in self.entries.iter_mut() {
            entry.remote = by_id.remove(id).map(|r| Remote { fingerprint: r.fingerprint, health: r.health });
        }
        let mut fixes = 0u64;
        for orphan in by_id.into_values() {
            tracing::info!(service = %orphan.id, "removing a registration owned by this node that no file describes");
            fixes += 1;
            let result = self.registry.deregister(&orphan.id, &orphan.name).await;
            self.count("deregister", &result);
            if let Err(e) = result {
                return self.registry_error("removing an orphaned registration", e);
            }
        }
        let ids: Vec<String> = self.entries.keys().cloned().collect();
        for id in ids {
            let before = self.entries.get(&id).map(|e| e.remote.clone());
            self.sync(&id).await;
            if self.stale {
                return;
            }
            if self.entries.get(&id).map(|e| e.remote.clone()) != before {
                fixes += 1;
                // A registry that lost everything gets it back at a capped rate.
                if fixes > AE_BURST {
                    tokio::time::sleep(AE_WRITE_SPACING).await;
                }
            }
        }
        let m = &self.telemetry.metrics;
        m.anti_entropy_runs.inc();
        m.anti_entropy_fixes.inc_by(fixes);
        if was_retrying {
            m.registry_reconnects.inc();
        }
        let first = !self.telemetry.is_ready();
        if first || was_retrying || fixes > 0 {
            tracing::info!(fixes, services = self.entries.len(), "anti-entropy: registry in sync");
        }
        {
            let mut status = self.telemetry.status.lock().expect("status lock");
            status.backend.last_anti_entropy = Some(rfc3339(SystemTime::now()));
        }
        if first {
            self.telemetry.set_ready();
            systemd::ready();
        }
    }

    async fn sync_all(&mut self) {
        let ids: Vec<String> = self.entries.keys().cloned().collect();
        for id in ids {
            self.sync(&id).await;
        }
    }

    /// The next time a critical service reaches its deregister deadline.
    fn next_deadline(&self) -> Option<Instant> {
        if self.stale || !self.registry.keeps_critical() {
            return None;
        }
        self.entries
            .values()
            .filter(|e| e.remote.is_some())
            .filter_map(|e| e.critical_since.map(|t| t + e.spec.deregister_critical_after))
            .min()
    }

    fn registry_error(&mut self, what: &str, e: RegistryError) {
        let delay = match self.retry_delay {
            None => RETRY_FIRST,
            Some(d) => (d * 2).min(RETRY_CAP),
        };
        self.retry_delay = Some(delay);
        self.stale = true;
        self.next_anti_entropy = Instant::now() + jitter(delay);
        match e.kind {
            ErrorKind::Missing => tracing::warn!(error = %e, "{what}: registry lost tether's records; re-registering"),
            _ => tracing::warn!(error = %e, retry_in = ?delay, "{what} failed"),
        }
        let mut status = self.telemetry.status.lock().expect("status lock");
        status.backend.last_error = Some(format!("{}: {what}: {e}", rfc3339(SystemTime::now())));
    }

    /// Publish the status snapshot.
    fn publish(&self) {
        let heartbeat = self.last_heartbeat.map(rfc3339);
        let services = self
            .entries
            .values()
            .map(|e| ServiceStatus {
                id: e.spec.id.clone(),
                name: e.spec.name.clone(),
                file: e.spec.file.display().to_string(),
                health: e.health.as_ref().map_or("unknown", |h| h.status.as_str()).to_string(),
                output: e.health.as_ref().map_or(WAITING.to_string(), |h| h.output.clone()),
                since: e.since.map(rfc3339),
                registered: e.remote.is_some(),
                last_write: e.last_write_at.map(rfc3339),
                last_heartbeat: e.remote.as_ref().and(heartbeat.clone()),
                last_error: e.last_error.clone(),
            })
            .collect();
        let mut status = self.telemetry.status.lock().expect("status lock");
        status.services = services;
        status.ready = self.telemetry.is_ready();
        status.backend.connected = !self.stale;
        status.backend.last_heartbeat = heartbeat;
    }

    async fn shutdown(mut self) {
        systemd::stopping();
        for entry in self.entries.values() {
            entry.probe.cancel();
        }
        self.probes.close();
        if !self.deregister_on_shutdown {
            tracing::info!("shutting down; leaving registrations to expire by TTL (deregister_on_shutdown = false)");
            let _ = self.registry.shutdown(false).await;
            return;
        }
        tracing::info!(services = self.entries.len(), "shutting down; deregistering owned services");
        let owned: Vec<(String, String)> = match self.registry.list().await {
            Ok(list) => list.into_iter().map(|r| (r.id, r.name)).collect(),
            Err(_) => self.entries.values().map(|e| (e.spec.id.clone(), e.spec.name.clone())).collect(),
        };
        for (id, name) in owned {
            if let Err(e) = self.registry.deregister(&id, &name).await {
                tracing::warn!(service = %id, error = %e, "could not deregister on shutdown; it will expire by TTL");
            }
        }
        if let Err(e) = self.registry.shutdown(true).await {
            tracing::warn!(error = %e, "could not remove tether's own registration; it will expire by TTL");
        }
    }
}

enum Write {
    Register(Health),
    Health(Health),
    Deregister,
}

impl Write {
    fn name(&self) -> &'static str {
        match self {
            Write::Register(_) => "register",
            Write::Health(_) => "set_health",
            Write::Deregister => "deregister",
        }
    }
}

fn spawn_probe(
    tracker: &TaskTracker,
    id: &str,
    generation: u64,
    spec: &ServiceSpec,
    tx: &mpsc::Sender<HealthChange>,
    telemetry: &Arc<Telemetry>,
) -> CancellationToken {
    let cancel = CancellationToken::new();
    tracker.spawn(supervise(id.to_string(), generation, spec.check.clone(), tx.clone(), cancel.clone(), telemetry.clone()));
    cancel
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}
