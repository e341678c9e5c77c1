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
//! owned by anyone else.

use crate::config::ServiceSpec;
use crate::health::supervisor::{supervise, HealthChange};
use crate::health::{Health, Status};
use crate::registry::{AgentInfo, ErrorKind, Registry, RegistryError, RemoteEntry};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Period of anti-entropy when nothing goes wrong (±20 % jitter).
pub const ANTI_ENTROPY_EVERY: Duration = Duration::from_secs(30);
/// Retry delays after registry errors: doubling from the first to the cap, jittered.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(10);
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
    remote: Option<Remote>,
    last_write: Instant,
    generation: u64,
    probe: CancellationToken,
}

/// Read-only view for status reporting.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    pub id: String,
    pub name: String,
    pub health: Option<Health>,
    pub registered: bool,
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
    ready: watch::Sender<bool>,
}

impl<R: Registry> Reconciler<R> {
    pub fn new(registry: R, node: &str, deregister_on_shutdown: bool) -> Self {
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
            ready: watch::channel(false).0,
        }
    }

    /// Becomes true after the first successful anti-entropy pass.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
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
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(set) = desired.recv() => self.apply_desired(set).await,
                Some(change) = self.health_rx.recv() => self.apply_health(change).await,
                _ = sleep_until(self.next_heartbeat), if !self.stale => self.heartbeat().await,
                _ = sleep_until(self.next_anti_entropy) => self.anti_entropy().await,
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => self.sync_all().await,
            }
        }
        self.shutdown().await;
    }

    /// Start, stop or restart probes and records for a new desired set.
    async fn apply_desired(&mut self, set: BTreeMap<String, ServiceSpec>) {
        let removed: Vec<String> = self.entries.keys().filter(|id| !set.contains_key(*id)).cloned().collect();
        for id in removed {
            let entry = self.entries.remove(&id).expect("present");
            entry.probe.cancel();
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
                        entry.probe = spawn_probe(&self.probes, &id, self.generation, &spec, &self.health_tx);
                    }
                    entry.spec = spec;
                }
                None => {
                    tracing::info!(service = %id, file = %spec.file.display(), "service added");
                    self.generation += 1;
                    let probe = spawn_probe(&self.probes, &id, self.generation, &spec, &self.health_tx);
                    self.entries.insert(
                        id.clone(),
                        Entry {
                            spec,
                            health: None,
                            critical_since: None,
                            remote: None,
                            last_write: Instant::now(),
                            generation: self.generation,
                            probe,
                        },
                    );
                }
            }
            touched.push(id);
        }
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
        match result {
            Ok(()) => {
                let Some(entry) = self.entries.get_mut(id) else {
                    tracing::info!(service = %id, "deregistered");
                    return;
                };
                entry.last_write = Instant::now();
                match op {
                    Write::Deregister => {
                        tracing::info!(service = %id, "deregistered (critical for longer than deregister_critical_after, or not passing)");
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
            Err(e) => self.registry_error(&format!("writing service {id}"), e),
        }
    }

    async fn heartbeat(&mut self) {
        let every = self.agent.as_ref().map_or(Duration::from_secs(5), AgentInfo::heartbeat_every);
        self.next_heartbeat = Instant::now() + every;
        if let Err(e) = self.registry.heartbeat().await {
            self.registry_error("heartbeat", e);
        }
    }

    async fn ensure_agent(&mut self, agent: AgentInfo) -> bool {
        match self.registry.ensure_agent(&agent).await {
            Ok(()) => {
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
        let remote = match self.registry.list().await {
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
        let mut fixes = 0usize;
        for orphan in by_id.into_values() {
            tracing::info!(service = %orphan.id, "removing a registration owned by this node that no file describes");
            fixes += 1;
            if let Err(e) = self.registry.deregister(&orphan.id, &orphan.name).await {
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
            }
        }
        let first = self.ready.send_if_modified(|r| !std::mem::replace(r, true));
        if first || was_retrying || fixes > 0 {
            tracing::info!(fixes, services = self.entries.len(), "anti-entropy: registry in sync");
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
    }

    async fn shutdown(mut self) {
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

    /// A snapshot for status reporting.
    pub fn views(&self) -> Vec<ServiceView> {
        self.entries
            .values()
            .map(|e| ServiceView {
                id: e.spec.id.clone(),
                name: e.spec.name.clone(),
                health: e.health.clone(),
                registered: e.remote.is_some(),
            })
            .collect()
    }
}

enum Write {
    Register(Health),
    Health(Health),
    Deregister,
}

fn spawn_probe(tracker: &TaskTracker, id: &str, generation: u64, spec: &ServiceSpec, tx: &mpsc::Sender<HealthChange>) -> CancellationToken {
    let cancel = CancellationToken::new();
    tracker.spawn(supervise(id.to_string(), generation, spec.check.clone(), tx.clone(), cancel.clone()));
    cancel
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}
