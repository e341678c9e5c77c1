//! The reconciler: desired specs + health → what the registry should hold.
//!
//! It owns, per service, the desired spec, the latest health from its probe,
//! and what it believes the registry holds (`remote`). Every input (a new
//! desired set, a health change, a timer, a finished write) updates local
//! state for the services it concerns and queues the writes that would make
//! the registry match: a write only where the desired and the believed-remote
//! views differ, so restarts and resyncs cause no churn.
//!
//! Its loop never awaits registry I/O. Three tasks share the work:
//! - the reconciler (this loop): state, decisions, the write [`queue`];
//! - the [`writer`]: the one task that writes (and lists), a batch at a time;
//! - the [`heartbeat`] lane: tether's liveness on its own connection.
//!
//! Anti-entropy (at start, after any registry error with capped jittered
//! backoff, and every 30 s ± 20 %) re-reads the registry in the writer,
//! re-registers what is missing and removes records this node owns that no
//! file describes. It never touches records owned by anyone else. Its fixes
//! queue behind writes caused by health changes.

pub mod heartbeat;
pub mod queue;
#[cfg(test)]
mod tests;
pub mod writer;

use crate::backoff::{jitter, Backoff};
use crate::config::ServiceSpec;
use crate::control::{self, DrainState};
use crate::health::conn::Connections;
use crate::health::supervisor::{supervise, HealthChange};
use crate::health::{Health, Status};
use crate::registry::{AgentInfo, ErrorClass, ErrorKind, Outcome, Registry, RegistryError, RemoteEntry, View, Write};
use crate::telemetry::metrics::{unix_now, Metrics};
use crate::telemetry::status::{rfc3339, ServiceStatus};
use crate::telemetry::{systemd, Telemetry};
use queue::Queue;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use writer::{Done, Work};

/// Period of anti-entropy when nothing goes wrong (±20 % jitter).
pub const ANTI_ENTROPY_EVERY: Duration = Duration::from_secs(30);
/// Retry delays after registry errors: doubling from the first to the cap, jittered.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(10);
/// Retry delays after a refusal that cannot change until a person acts (an
/// ACL denial, an invalid request): doubling from the first to the cap, jittered.
const REFUSED_FIRST: Duration = Duration::from_secs(5);
const REFUSED_CAP: Duration = Duration::from_secs(5 * 60);
/// While a refusal lasts it is logged once, then reminded at most this often.
const REMIND_EVERY: Duration = Duration::from_secs(5 * 60);
/// While some write is refused, how often the credential files are looked at.
const CREDENTIALS_EVERY: Duration = Duration::from_secs(1);
/// The loop turns at least this often when idle (the loop-alive mark that
/// `/healthz` reads, well inside its [`LOOP_STUCK_AFTER`]); more often only
/// for systemd's watchdog. Every idle wake-up costs a sidecar CPU.
///
/// [`LOOP_STUCK_AFTER`]: crate::telemetry::LOOP_STUCK_AFTER
const TICK: Duration = Duration::from_secs(10);
const _: () = assert!(TICK.as_secs() * 3 <= crate::telemetry::LOOP_STUCK_AFTER.as_secs());
/// A new service is registered once its health is known; if no result comes
/// within its check timeout plus this, it is registered critical meanwhile.
const FIRST_RESULT_GRACE: Duration = Duration::from_secs(1);
/// Output shown for a new service before its first health result.
pub const WAITING: &str = "waiting for the first gRPC health result";

/// What the registry holds for one service, as far as we know.
#[derive(Debug, Clone, PartialEq)]
struct Remote {
    fingerprint: String,
    health: Option<Health>,
    maintenance: bool,
}

/// What the registry should hold for one service.
#[derive(Debug)]
enum Desired {
    /// Not decided yet (no health result so far): leave the registry as it is.
    Undecided,
    Absent,
    Present {
        fingerprint: String,
        health: Health,
        /// Drained on a registry that keeps drained records (Consul's maintenance).
        maintenance: bool,
    },
}

/// A service whose last write the registry refused with an error retrying
/// cannot heal: it waits with backoff of minutes, and nothing else does.
struct Refused {
    backoff: Backoff,
    /// No write of this service before this.
    until: Instant,
    /// When the refusal was last logged at WARN.
    warned: Instant,
}

struct Entry {
    spec: Arc<ServiceSpec>,
    /// Latest decided health from the probe; `None` before the first result.
    health: Option<Health>,
    critical_since: Option<Instant>,
    /// When `health` last changed.
    since: Option<SystemTime>,
    added: Instant,
    remote: Option<Remote>,
    /// A write of this service is with the writer; its outcome re-syncs it.
    in_flight: bool,
    last_write_at: Option<SystemTime>,
    last_error: Option<(ErrorClass, String)>,
    refused: Option<Refused>,
    /// Taken out of the healthy set by `tether drain`, whatever its health.
    drained: bool,
    generation: u64,
    probe: CancellationToken,
}

pub struct Reconciler<R: Registry> {
    view: R::View,
    node: String,
    deregister_on_shutdown: bool,
    entries: HashMap<String, Entry>,
    /// What tether's own presence should be, and what was last made so.
    agent: AgentInfo,
    agent_synced: Option<AgentInfo>,
    /// The remote view cannot be trusted until the next anti-entropy succeeds.
    stale: bool,
    /// Anti-entropy is due (runs as soon as the writer is free).
    sync_due: bool,
    next_anti_entropy: Instant,
    retry: Backoff,
    /// Backoff of anti-entropy after refusals (see [`REFUSED_FIRST`]), and
    /// when such a refusal was last logged at WARN.
    retry_refused: Backoff,
    refused_warned: Option<Instant>,
    /// How many services wait after a refusal; while any do, the credential
    /// files are looked at every [`CREDENTIALS_EVERY`].
    refused: usize,
    credentials: Vec<crate::config::tls::Stamp>,
    next_credentials_check: Instant,
    /// Services with no health result yet, and when the last of their
    /// first-result graces ends.
    undecided: usize,
    undecided_until: Instant,
    /// Set by an anti-entropy read: (fixes, after errors); reported once its fixes are written.
    ae_report: Option<(u64, bool)>,
    queue: Queue,
    max_batch: usize,
    /// The writer holds a piece of work; the next goes out when it reports back.
    writer_busy: bool,
    work_tx: mpsc::Sender<Work>,
    done_rx: mpsc::Receiver<Done>,
    writer: JoinHandle<R>,
    /// Fixes queued by the current anti-entropy pass.
    fixes: u64,
    /// Deadlines (deregister-after-critical, first-result grace), checked lazily.
    timers: BinaryHeap<Reverse<(Instant, String)>>,
    lane_agent: watch::Sender<Option<AgentInfo>>,
    lane_failed: mpsc::Receiver<heartbeat::Failed>,
    lane_cancel: CancellationToken,
    lane: JoinHandle<()>,
    generation: u64,
    health_tx: mpsc::Sender<HealthChange>,
    health_rx: mpsc::Receiver<HealthChange>,
    probes: TaskTracker,
    connections: Connections,
    /// Drains kept across restarts (with the control socket).
    drains: Option<control::DrainFile>,
    /// Requests from the control socket (drain, undrain).
    control: Option<mpsc::Receiver<control::Command>>,
    anti_entropy_every: Duration,
    /// Off in unit tests, which feed health changes themselves.
    probing: bool,
    telemetry: Arc<Telemetry>,
    watchdog_every: Option<Duration>,
    next_watchdog: Instant,
}

impl<R: Registry> Reconciler<R> {
    /// Start the writer and the heartbeat lane on `registry`.
    pub fn new(registry: R, node: &str, deregister_on_shutdown: bool, telemetry: Arc<Telemetry>) -> Result<Self, RegistryError> {
        let view = registry.view();
        let max_batch = registry.max_batch().max(1);
        let lane = registry.lane()?;
        let (health_tx, health_rx) = mpsc::channel(4096);
        let (work_tx, work_rx) = mpsc::channel(1);
        let (done_tx, done_rx) = mpsc::channel(1);
        let writer = tokio::spawn(writer::run(registry, work_rx, done_tx, telemetry.clone()));
        let (lane_agent, lane_agent_rx) = watch::channel(None);
        let (lane_failed_tx, lane_failed) = mpsc::channel(4);
        let lane_cancel = CancellationToken::new();
        let lane = tokio::spawn(heartbeat::run(lane, lane_agent_rx, lane_failed_tx, telemetry.clone(), lane_cancel.clone()));
        let now = Instant::now();
        Ok(Reconciler {
            view,
            node: node.to_string(),
            deregister_on_shutdown,
            entries: HashMap::new(),
            agent: AgentInfo::for_services(node, std::iter::empty()),
            agent_synced: None,
            stale: true,
            sync_due: true,
            next_anti_entropy: now + Duration::from_secs(86400),
            retry: Backoff::new(RETRY_FIRST, RETRY_CAP),
            retry_refused: Backoff::new(REFUSED_FIRST, REFUSED_CAP),
            refused_warned: None,
            refused: 0,
            credentials: Vec::new(),
            next_credentials_check: now,
            ae_report: None,
            undecided: 0,
            undecided_until: now,
            queue: Queue::default(),
            max_batch,
            writer_busy: false,
            work_tx,
            done_rx,
            writer,
            fixes: 0,
            timers: BinaryHeap::new(),
            lane_agent,
            lane_failed,
            lane_cancel,
            lane,
            generation: 0,
            health_tx,
            health_rx,
            probes: TaskTracker::new(),
            connections: Connections::new(),
            probing: true,
            control: None,
            drains: None,
            anti_entropy_every: ANTI_ENTROPY_EVERY,
            telemetry,
            watchdog_every: systemd::watchdog_every(),
            next_watchdog: now,
        })
    }

    /// Take drain and undrain requests from the control socket, and keep
    /// drains in `drains` (drains left there by an earlier run apply to the
    /// services as they come).
    pub fn with_control(mut self, commands: mpsc::Receiver<control::Command>, drains: control::DrainFile) -> Self {
        self.control = Some(commands);
        self.drains = Some(drains);
        self
    }

    /// Anti-entropy's period (±20 %) when nothing goes wrong.
    pub fn with_anti_entropy_every(mut self, every: Duration) -> Self {
        self.anti_entropy_every = every;
        self
    }

    /// Run until `shutdown` fires; `desired` delivers each new desired set.
    pub async fn run(mut self, mut desired: mpsc::Receiver<BTreeMap<String, ServiceSpec>>, shutdown: CancellationToken) {
        // The first anti-entropy pass waits for the first scan, so that it
        // registers tether's liveness with the right TTL at once.
        tokio::select! {
            _ = shutdown.cancelled() => return self.shutdown().await,
            first = desired.recv() => match first {
                Some(set) => {
                    // Drains kept for services whose files went while tether
                    // was not running end with them.
                    if let Some(d) = self.drains.as_mut() {
                        d.retain(|id| set.contains_key(id));
                    }
                    self.apply_desired(set);
                }
                None => return self.shutdown().await,
            },
        }
        loop {
            self.turn();
            self.dispatch();
            let timer = self.timers.peek().map(|Reverse((t, _))| *t);
            // Watchdog pings keep their exact period (moving the tick onto the
            // timer grid could push a ping to nearly the whole WatchdogSec).
            let tick = match self.watchdog_every {
                Some(every) => Instant::now() + every.min(TICK),
                None => crate::timer::after(TICK),
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = self.done_rx.recv() => self.on_done(done),
                Some(change) = self.health_rx.recv() => self.apply_health(change),
                Some(set) = desired.recv() => self.apply_desired(set),
                Some(heartbeat::Failed(e)) = self.lane_failed.recv() => self.on_heartbeat_failed(e),
                Some(command) = recv(&mut self.control) => self.on_control(command),
                _ = sleep_until(self.next_anti_entropy) => {
                    self.sync_due = true;
                    self.next_anti_entropy = crate::timer::after(self.anti_entropy_every);
                }
                _ = sleep_until(timer.unwrap_or(tick)), if timer.is_some() => self.fire_timers(),
                _ = sleep_until(self.next_credentials_check), if self.refused > 0 => self.check_credentials(),
                _ = sleep_until(tick) => {}
            }
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

    /// Hand the writer its next piece of work if it is free: urgent writes,
    /// then a due anti-entropy pass, then background fixes.
    fn dispatch(&mut self) {
        if self.writer_busy {
            return;
        }
        let urgent_first = !self.stale && self.queue.has_urgent();
        if self.sync_due && !urgent_first {
            self.sync_due = false;
            let agent = self.agent.clone();
            if self.work_tx.try_send(Work::Sync(agent)).is_ok() {
                self.writer_busy = true;
            }
            return;
        }
        if self.stale {
            return;
        }
        let batch = self.queue.take(self.max_batch);
        self.telemetry.metrics.write_queue.set(self.queue.len() as i64);
        if batch.is_empty() {
            self.report_in_sync();
            return;
        }
        for w in &batch {
            if let Some(e) = self.entries.get_mut(w.id()) {
                e.in_flight = true;
            }
        }
        if self.work_tx.try_send(Work::Writes(batch)).is_ok() {
            self.writer_busy = true;
        }
    }

    /// Once an anti-entropy pass's fixes are written and every new service has
    /// its first result (or its grace ran out and it was registered waiting):
    /// say so, and become ready the first time.
    fn report_in_sync(&mut self) {
        let settled = self.undecided == 0 || Instant::now() >= self.undecided_until;
        if !settled {
            return;
        }
        let Some((fixes, was_retrying)) = self.ae_report.take() else { return };
        let first = !self.telemetry.is_ready();
        if first || was_retrying || fixes > 0 {
            tracing::info!(fixes, services = self.entries.len(), "anti-entropy: registry in sync");
        }
        if first {
            self.telemetry.set_ready();
            systemd::ready();
        }
    }

    /// Start, stop or restart probes and records for a new desired set.
    fn apply_desired(&mut self, set: BTreeMap<String, ServiceSpec>) {
        let removed: Vec<String> = self.entries.keys().filter(|id| !set.contains_key(*id)).cloned().collect();
        for id in removed {
            let entry = self.entries.remove(&id).expect("present");
            if entry.refused.is_some() {
                self.refused -= 1;
            }
            if entry.health.is_none() {
                self.undecided -= 1;
            }
            entry.probe.cancel();
            self.telemetry.metrics.forget(&id);
            self.telemetry.set_service(&id, None);
            if let Some(d) = self.drains.as_mut() {
                d.set(&id, false);
            }
            tracing::info!(service = %id, file = %entry.spec.file.display(), "service file removed");
            // An in-flight write is followed up when it finishes; while stale,
            // the next anti-entropy removes it as an orphan.
            if !entry.in_flight && !self.stale {
                match entry.remote {
                    Some(_) => self.queue.put(Write::Deregister { id: id.clone(), name: entry.spec.name.clone() }, true),
                    None => self.queue.remove(&id),
                }
            }
        }
        let mut touched = Vec::new();
        for (id, spec) in set {
            match self.entries.get_mut(&id) {
                Some(entry) if *entry.spec == spec => continue,
                Some(entry) => {
                    tracing::info!(service = %id, file = %spec.file.display(), "service file changed");
                    // A refused write is tried again at once with the new file.
                    if entry.refused.take().is_some() {
                        self.refused -= 1;
                    }
                    let restart = entry.spec.check != spec.check;
                    if restart {
                        entry.probe.cancel();
                        self.generation += 1;
                        let probe = spawn_probe(self, &id, &spec);
                        let entry = self.entries.get_mut(&id).expect("present");
                        entry.generation = self.generation;
                        entry.probe = probe;
                    }
                    self.entries.get_mut(&id).expect("present").spec = Arc::new(spec);
                }
                None => {
                    tracing::info!(service = %id, file = %spec.file.display(), "service added");
                    self.generation += 1;
                    let probe = spawn_probe(self, &id, &spec);
                    self.telemetry.metrics.service_health.get_or_create(&Metrics::service(&id)).set(-1);
                    let now = Instant::now();
                    let grace_ends = now + spec.check.timeout + FIRST_RESULT_GRACE;
                    self.timers.push(Reverse((grace_ends, id.clone())));
                    self.undecided += 1;
                    self.undecided_until = self.undecided_until.max(grace_ends);
                    let drained = self.drains.as_ref().is_some_and(|d| d.contains(&id));
                    if drained {
                        tracing::info!(service = %id, "drained (kept from before tether restarted; `tether undrain` to end it)");
                        self.telemetry.metrics.service_drained.get_or_create(&Metrics::service(&id)).set(1);
                    }
                    self.entries.insert(
                        id.clone(),
                        Entry {
                            spec: Arc::new(spec),
                            health: None,
                            critical_since: None,
                            since: None,
                            added: now,
                            remote: None,
                            in_flight: false,
                            last_write_at: None,
                            last_error: None,
                            refused: None,
                            drained,
                            generation: self.generation,
                            probe,
                        },
                    );
                }
            }
            touched.push(id);
        }
        self.telemetry.metrics.services.set(self.entries.len() as i64);
        self.agent = AgentInfo::for_services(&self.node, self.entries.values().map(|e| &*e.spec));
        if self.agent_synced.as_ref() != Some(&self.agent) {
            self.sync_due = true;
        }
        for id in touched {
            self.sync(&id, true);
            self.publish(&id);
        }
        if let Some(d) = self.drains.as_mut() {
            d.save();
        }
    }

    fn apply_health(&mut self, change: HealthChange) {
        let Some(entry) = self.entries.get_mut(&change.id) else { return };
        if entry.generation != change.generation {
            return;
        }
        match change.health.status {
            Status::Critical if entry.critical_since.is_none() => {
                let now = Instant::now();
                entry.critical_since = Some(now);
                self.timers.push(Reverse((now + entry.spec.deregister_critical_after, change.id.clone())));
            }
            Status::Critical => {}
            Status::Passing => entry.critical_since = None,
        }
        let m = &self.telemetry.metrics;
        m.service_health.get_or_create(&Metrics::service(&change.id)).set(i64::from(change.health.status == Status::Passing));
        m.transition(&change.id, change.health.status.as_str());
        entry.since = Some(SystemTime::now());
        if entry.health.is_none() {
            self.undecided -= 1;
        }
        entry.health = Some(change.health);
        self.sync(&change.id, true);
        self.publish(&change.id);
    }

    /// Sync the services whose deadlines passed.
    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Reverse((_, id)) = self.timers.pop().expect("peeked");
            self.sync(&id, true);
        }
    }

    /// What the registry should hold for an entry.
    fn desired(&self, entry: &Entry) -> Desired {
        // A registry that drops critical records drops drained ones too.
        if entry.drained && !self.view.keeps_critical() {
            return Desired::Absent;
        }
        let known = entry.health.clone().or_else(|| entry.remote.as_ref().and_then(|r| r.health.clone()));
        let health = match known {
            Some(h) => h,
            None if entry.added.elapsed() >= entry.spec.check.timeout + FIRST_RESULT_GRACE => Health::critical(WAITING),
            None => return Desired::Undecided,
        };
        if health.status == Status::Critical {
            if !self.view.keeps_critical() {
                return Desired::Absent;
            }
            if entry.critical_since.is_some_and(|t| t.elapsed() >= entry.spec.deregister_critical_after) {
                return Desired::Absent;
            }
        }
        // Computed afresh: it may depend on backend state (etcd's lease).
        Desired::Present { fingerprint: self.view.fingerprint(&entry.spec), health, maintenance: entry.drained }
    }

    /// The write that would make the registry hold the desired view of one
    /// service, if any.
    fn needed_write(&self, entry: &Entry) -> Option<Write> {
        let spec = entry.spec.clone();
        let id = spec.id.clone();
        match (self.desired(entry), &entry.remote) {
            (Desired::Undecided, _) | (Desired::Absent, None) => None,
            (Desired::Absent, Some(_)) => Some(Write::Deregister { id, name: spec.name.clone() }),
            (Desired::Present { health, .. }, None) => Some(Write::Register { spec, health }),
            (Desired::Present { fingerprint, health, .. }, Some(r)) if fingerprint != r.fingerprint => {
                Some(Write::Register { spec, health })
            }
            (Desired::Present { health, .. }, Some(r)) if !same_health(&health, r.health.as_ref()) => {
                Some(Write::Health { spec, health, was: r.health.as_ref().map(|h| h.status) })
            }
            (Desired::Present { maintenance, .. }, Some(r)) if maintenance != r.maintenance => {
                Some(Write::Maintenance { id, on: maintenance })
            }
            _ => None,
        }
    }

    /// Queue (or un-queue) the write that makes the registry hold the desired
    /// view of one service. Touches only that service.
    fn sync(&mut self, id: &str, urgent: bool) {
        if self.stale {
            return;
        }
        let Some(entry) = self.entries.get(id) else { return };
        if entry.in_flight {
            return; // re-synced when the write finishes
        }
        if entry.refused.as_ref().is_some_and(|r| Instant::now() < r.until) {
            self.queue.remove(id); // tried again when its retry timer fires
            return;
        }
        match self.needed_write(entry) {
            Some(w) => {
                if !urgent {
                    self.fixes += 1;
                }
                self.queue.put(w, urgent);
            }
            None => self.queue.remove(id),
        }
    }

    fn on_done(&mut self, done: Done) {
        self.writer_busy = false;
        match done {
            Done::Writes { writes, outcomes } => self.on_writes(writes, outcomes),
            Done::Sync(agent, Ok(remote)) => self.on_synced(agent, remote),
            Done::Sync(_, Err(e)) => self.registry_error("anti-entropy (reading the registry)", e),
        }
    }

    fn on_writes(&mut self, writes: Vec<Write>, outcomes: Vec<Outcome>) {
        let mut failed = None;
        for (w, outcome) in writes.into_iter().zip(outcomes) {
            let id = w.id().to_string();
            let done = matches!(outcome, Outcome::Done);
            let Some(entry) = self.entries.get_mut(&id) else {
                match (&w, done) {
                    (Write::Deregister { .. }, true) => tracing::info!(service = %id, "deregistered"),
                    // Its file went while the write was out: remove it now.
                    (Write::Register { spec, .. } | Write::Health { spec, .. }, true) if !self.stale => {
                        self.queue.put(Write::Deregister { id: id.clone(), name: spec.name.clone() }, true)
                    }
                    _ => {}
                }
                continue;
            };
            entry.in_flight = false;
            if done {
                entry.last_write_at = Some(SystemTime::now());
                entry.last_error = None;
                if entry.refused.take().is_some() {
                    self.refused -= 1;
                    tracing::info!(service = %id, "the registry accepts this service's writes again");
                }
                self.telemetry.metrics.service_last_write.get_or_create(&Metrics::service(&id)).set(unix_now());
                match w {
                    Write::Deregister { .. } => {
                        let why =
                            if self.view.keeps_critical() { "critical for longer than deregister_critical_after" } else { "not passing" };
                        tracing::info!(service = %id, reason = why, "deregistered");
                        entry.remote = None;
                    }
                    Write::Register { spec, health } => {
                        tracing::info!(service = %id, status = %health.status, "registered");
                        // A registration replaces every check, maintenance included.
                        let health = Some(self.view.written(None, &health));
                        entry.remote = Some(Remote { fingerprint: self.view.fingerprint(&spec), health, maintenance: false });
                    }
                    Write::Maintenance { on, .. } => {
                        tracing::info!(service = %id, "{}", if on { "drained (maintenance on)" } else { "undrained (maintenance off)" });
                        if let Some(r) = entry.remote.as_mut() {
                            r.maintenance = on;
                        }
                    }
                    Write::Health { health, was, .. } => {
                        tracing::debug!(service = %id, status = %health.status, "health written");
                        if let Some(r) = entry.remote.as_mut() {
                            // If only the status went, the reason is queued next (below).
                            r.health = Some(self.view.written(was, &health));
                        }
                    }
                }
            } else if let Outcome::Failed(e) = outcome {
                entry.last_error = Some((e.kind.class(), e.to_string()));
                match e.kind.class() {
                    ErrorClass::Permanent => {
                        if entry.refused.is_none() {
                            self.refused += 1;
                        }
                        let fresh = entry.refused.is_none();
                        let now = Instant::now();
                        let r = entry.refused.get_or_insert_with(|| Refused {
                            backoff: Backoff::new(REFUSED_FIRST, REFUSED_CAP),
                            until: now,
                            warned: now,
                        });
                        let delay = r.backoff.next_delay();
                        r.until = now + jitter(delay);
                        self.timers.push(Reverse((r.until, id.clone())));
                        let retry_in = humantime::format_duration(delay).to_string();
                        if fresh {
                            tracing::warn!(service = %id, op = w.op(), error = %e, retry_in = %retry_in,
                                "the registry refused this service's write; it waits (no other service does) and is tried again with backoff, or at once when its file or the registry credentials change");
                        } else if now >= r.warned + REMIND_EVERY {
                            r.warned = now;
                            tracing::warn!(service = %id, op = w.op(), error = %e, retry_in = %retry_in, "the registry still refuses this service's write");
                        } else {
                            tracing::debug!(service = %id, error = %e, retry_in = %retry_in, "the registry still refuses this service's write");
                        }
                        if self.refused == 1 && fresh {
                            self.credentials = self.credential_stamps();
                            self.next_credentials_check = Instant::now() + CREDENTIALS_EVERY;
                        }
                    }
                    ErrorClass::Transient => failed = Some((id.clone(), e)),
                }
            }
            self.sync(&id, true);
            self.publish(&id);
        }
        if let Some((id, e)) = failed {
            self.registry_error(&format!("writing service {id}"), e);
        }
    }

    /// Anti-entropy read back: adopt the registry's view, then queue fixes.
    fn on_synced(&mut self, agent: AgentInfo, remote: Vec<RemoteEntry>) {
        let was_retrying = self.retry.is_retrying() || self.retry_refused.is_retrying();
        self.retry.reset();
        self.retry_refused.reset();
        self.refused_warned = None;
        self.stale = false;
        self.next_anti_entropy = Instant::now() + jitter(self.anti_entropy_every);
        if self.agent_synced.as_ref() != Some(&agent) {
            self.lane_agent.send_replace(Some(agent.clone()));
        }
        self.agent_synced = Some(agent);
        if self.agent_synced.as_ref() != Some(&self.agent) {
            self.sync_due = true; // the services changed meanwhile
        }
        let mut by_id: HashMap<String, RemoteEntry> = remote.into_iter().map(|r| (r.id.clone(), r)).collect();
        for (id, entry) in self.entries.iter_mut() {
            entry.remote = by_id.remove(id).map(|r| Remote { fingerprint: r.fingerprint, health: r.health, maintenance: r.maintenance });
        }
        self.queue.clear();
        self.fixes = 0;
        for orphan in by_id.into_values() {
            tracing::info!(service = %orphan.id, "removing a registration owned by this node that no file describes");
            self.fixes += 1;
            self.queue.put(Write::Deregister { id: orphan.id, name: orphan.name }, false);
        }
        let ids: Vec<String> = self.entries.keys().cloned().collect();
        for id in &ids {
            self.sync(id, false);
            self.publish(id);
        }
        let m = &self.telemetry.metrics;
        m.anti_entropy_runs.inc();
        m.anti_entropy_fixes.inc_by(self.fixes);
        if was_retrying {
            m.registry_reconnects.inc();
        }
        self.ae_report = Some((self.fixes, was_retrying));
        self.telemetry.with_status(|s| {
            s.backend.last_anti_entropy = Some(rfc3339(SystemTime::now()));
            s.backend.connected = true;
            s.backend.last_error = None;
        });
    }

    /// A drain, undrain or drain-state request from the control socket.
    fn on_control(&mut self, command: control::Command) {
        let (ids, all) = match &command.request {
            control::Request::Drain { ids, all } | control::Request::Undrain { ids, all } | control::Request::State { ids, all } => {
                (ids.clone(), *all)
            }
        };
        let mut targets: Vec<String> = if all { self.entries.keys().cloned().collect() } else { ids };
        targets.sort();
        targets.dedup();
        let unknown: Vec<&str> = targets.iter().filter(|id| !self.entries.contains_key(*id)).map(String::as_str).collect();
        let error = if !unknown.is_empty() {
            Some(format!("no service with id {}; `tether status` lists the ids", unknown.join(", ")))
        } else if targets.is_empty() && !all {
            Some("name at least one service id, or use --all".to_string())
        } else {
            None
        };
        if let Some(error) = error {
            let _ = command.reply.send(control::Response { error: Some(error), services: vec![] });
            return;
        }
        let set = match command.request {
            control::Request::Drain { .. } => Some(true),
            control::Request::Undrain { .. } => Some(false),
            control::Request::State { .. } => None,
        };
        if let Some(on) = set {
            for id in &targets {
                let entry = self.entries.get_mut(id).expect("checked");
                if entry.drained != on {
                    entry.drained = on;
                    if let Some(d) = self.drains.as_mut() {
                        d.set(id, on);
                    }
                    tracing::info!(service = %id, "{}", if on { "drain requested" } else { "undrain requested" });
                    self.telemetry.metrics.service_drained.get_or_create(&Metrics::service(id)).set(i64::from(on));
                }
                self.sync(id, true);
                self.publish(id);
            }
            // One rewrite per request, however many services it drained.
            if let Some(d) = self.drains.as_mut() {
                d.save();
            }
        }
        let services = targets
            .iter()
            .map(|id| {
                let entry = &self.entries[id];
                let applied = !self.stale && !entry.in_flight && self.needed_write(entry).is_none();
                DrainState { id: id.clone(), drained: entry.drained, applied }
            })
            .collect();
        let _ = command.reply.send(control::Response { error: None, services });
    }

    fn credential_stamps(&self) -> Vec<crate::config::tls::Stamp> {
        self.view.credential_files().iter().map(|p| vec![std::fs::metadata(p).and_then(|m| m.modified()).ok()]).collect()
    }

    /// While writes are refused: when a credential file changed (a new ACL
    /// token, say), try every refused service again at once.
    fn check_credentials(&mut self) {
        self.next_credentials_check = Instant::now() + CREDENTIALS_EVERY;
        let now = self.credential_stamps();
        if now == self.credentials {
            return;
        }
        self.credentials = now;
        tracing::info!(services = self.refused, "registry credentials changed; trying refused writes again");
        let ids: Vec<String> = self.entries.iter().filter(|(_, e)| e.refused.is_some()).map(|(id, _)| id.clone()).collect();
        for id in ids {
            if let Some(r) = self.entries.get_mut(&id).and_then(|e| e.refused.as_mut()) {
                r.until = Instant::now();
            }
            self.sync(&id, true);
            self.publish(&id);
        }
    }

    fn on_heartbeat_failed(&mut self, e: RegistryError) {
        if self.stale {
            tracing::debug!(error = %e, "heartbeat failed while re-reading the registry");
            return;
        }
        self.registry_error("heartbeat", e);
    }

    fn registry_error(&mut self, what: &str, e: RegistryError) {
        let class = e.kind.class();
        let delay = match class {
            ErrorClass::Transient => self.retry.next_delay(),
            ErrorClass::Permanent => self.retry_refused.next_delay(),
        };
        self.stale = true;
        self.sync_due = false;
        self.queue.clear();
        self.ae_report = None;
        self.next_anti_entropy = Instant::now() + jitter(delay);
        let retry_in = humantime::format_duration(delay).to_string();
        match (e.kind, class) {
            (ErrorKind::Missing, _) => tracing::warn!(error = %e, "{what}: registry lost tether's records; re-registering"),
            (_, ErrorClass::Transient) => tracing::warn!(error = %e, retry_in = %retry_in, "{what} failed"),
            (_, ErrorClass::Permanent) => {
                // Said once, then reminded at most every few minutes.
                let now = Instant::now();
                if self.refused_warned.is_none_or(|t| now >= t + REMIND_EVERY) {
                    self.refused_warned = Some(now);
                    tracing::warn!(error = %e, retry_in = %retry_in, "{what} refused by the registry; retrying with backoff");
                } else {
                    tracing::debug!(error = %e, retry_in = %retry_in, "{what} refused by the registry");
                }
            }
        }
        self.telemetry.with_status(|s| {
            s.backend.connected = false;
            s.backend.last_error = Some(format!("{}: {what}: {e} ({})", rfc3339(SystemTime::now()), class.as_str()));
        });
    }

    /// Publish one service's status.
    fn publish(&self, id: &str) {
        let Some(e) = self.entries.get(id) else { return };
        let status = ServiceStatus {
            id: e.spec.id.clone(),
            name: e.spec.name.clone(),
            file: e.spec.file.display().to_string(),
            health: e.health.as_ref().map_or("unknown", |h| h.status.as_str()).to_string(),
            output: e.health.as_ref().map_or(WAITING.to_string(), |h| h.output.clone()),
            since: e.since.map(rfc3339),
            registered: e.remote.is_some(),
            last_write: e.last_write_at.map(rfc3339),
            last_heartbeat: None,
            last_error: e.last_error.as_ref().map(|(_, m)| m.clone()),
            error_class: e.last_error.as_ref().map(|(c, _)| c.as_str().to_string()),
            next_attempt: match (&e.refused, &e.last_error) {
                (Some(r), _) => Some(rfc3339(SystemTime::now() + r.until.saturating_duration_since(Instant::now()))),
                (None, Some((ErrorClass::Transient, _))) if self.stale => {
                    Some(rfc3339(SystemTime::now() + self.next_anti_entropy.saturating_duration_since(Instant::now())))
                }
                _ => None,
            },
            drained: e.drained,
        };
        self.telemetry.set_service(id, Some(status));
    }

    async fn shutdown(self) {
        systemd::stopping();
        let Reconciler { entries, probes, work_tx, writer, lane_cancel, lane, deregister_on_shutdown, .. } = self;
        for entry in entries.values() {
            entry.probe.cancel();
        }
        probes.close();
        lane_cancel.cancel();
        drop(work_tx);
        let _ = lane.await;
        // The writer finishes what it holds, then hands the registry back.
        let mut registry = match writer.await {
            Ok(r) => r,
            Err(e) => return tracing::error!(error = %e, "the registry writer failed; registrations will expire by TTL"),
        };
        if !deregister_on_shutdown {
            tracing::info!("shutting down; leaving registrations to expire by TTL (deregister_on_shutdown = false)");
            let _ = registry.shutdown(false).await;
            return;
        }
        tracing::info!(services = entries.len(), "shutting down; deregistering owned services");
        let owned: Vec<Write> = match registry.list().await {
            Ok(list) => list.into_iter().map(|r| Write::Deregister { id: r.id, name: r.name }).collect(),
            Err(_) => entries.values().map(|e| Write::Deregister { id: e.spec.id.clone(), name: e.spec.name.clone() }).collect(),
        };
        for chunk in owned.chunks(registry.max_batch().max(1)) {
            let outcomes = registry.apply(chunk).await;
            let failed = outcomes.iter().find_map(|o| match o {
                Outcome::Failed(e) => Some(e.clone()),
                _ => None,
            });
            if let Some(e) = failed {
                tracing::warn!(error = %e, "could not deregister every service on shutdown; those left will expire by TTL");
                if e.kind.class() == ErrorClass::Transient {
                    break;
                }
            }
        }
        if let Err(e) = registry.shutdown(true).await {
            tracing::warn!(error = %e, "could not remove tether's own registration; it will expire by TTL");
        }
    }
}

/// The next message of an optional channel; never, without one.
async fn recv<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Equal for the registry's purposes: a passing record needs no particular
/// output (Consul takes none at registration); a critical one carries its reason.
fn same_health(desired: &Health, remote: Option<&Health>) -> bool {
    remote.is_some_and(|r| r.status == desired.status && (desired.status == Status::Passing || r.output == desired.output))
}

fn spawn_probe<R: Registry>(r: &Reconciler<R>, id: &str, spec: &ServiceSpec) -> CancellationToken {
    let cancel = CancellationToken::new();
    if !r.probing {
        return cancel;
    }
    r.probes.spawn(supervise(
        id.to_string(),
        r.generation,
        spec.check.clone(),
        r.connections.clone(),
        r.health_tx.clone(),
        cancel.clone(),
        r.telemetry.clone(),
    ));
    cancel
}
