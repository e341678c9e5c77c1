//! The decision core: desired specs + health + what the registry holds →
//! the writes that would make it match. No I/O and no clock reads: every
//! input carries `now`, and every output is state the task around it reads
//! back (the write queue, the next deadline, the outbox).
//!
//! Per service it owns the desired spec, the latest health from its probe,
//! what it believes the registry holds (`remote`), whether a write is in
//! flight, and whether the registry refused its last write. Every input
//! touches only the services it concerns:
//!
//! - a new desired set: the services added, changed or removed;
//! - a health change: that service;
//! - a deadline (deregister after critical, the first-result grace, the retry
//!   of a refused write): that service;
//! - a finished write: the services it carried;
//! - an anti-entropy read: every service (it is the one full pass).
//!
//! Invariants (each held by a test in `tests.rs`): at most one write per
//! service queued or in flight; while the view is stale (after a transient
//! error) nothing is queued until anti-entropy has re-read it; unknown health
//! never overwrites what the registry holds, so a restart makes no writes;
//! records this node does not own are never touched; a refused service waits
//! alone.
//!
//! The rules of what a service should be in the registry are in
//! `desired.rs`; drain requests and status snapshots in `control.rs`.

mod control;
mod damping;
mod desired;
mod errors;
mod health;

use super::queue::Queue;
use super::writer::{Done, Work};
use crate::backoff::{jitter, Backoff};
use crate::config::scan::ServiceSet;
use crate::config::{CheckSpec, ServiceSpec};
use crate::health::Health;
use crate::registry::{AgentInfo, ErrorClass, Outcome, RemoteEntry, View, Write};
use crate::telemetry::metrics::Metrics;
use damping::{Budget, Flap};
use desired::{after_write, log_written};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Retry delays after transient registry errors: doubling from the first to the cap, jittered.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(10);
/// Retry delays after a refusal that cannot change until a person acts (an
/// ACL denial, an invalid request): doubling from the first to the cap, jittered.
pub const REFUSED_FIRST: Duration = Duration::from_secs(5);
pub const REFUSED_CAP: Duration = Duration::from_secs(5 * 60);
/// While a refusal lasts it is logged once, then reminded at most this often.
const REMIND_EVERY: Duration = Duration::from_secs(5 * 60);
/// A new service is registered once its health is known; if no result comes
/// within its check timeout plus this, it is registered critical meanwhile.
pub const FIRST_RESULT_GRACE: Duration = Duration::from_secs(1);
/// Output shown for a new service before its first health result.
pub const WAITING: &str = "waiting for the first gRPC health result";

/// What the registry holds for one service, as far as we know.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Remote {
    fingerprint: String,
    health: Option<Health>,
    maintenance: bool,
}

/// What the registry should hold for one service.
#[derive(Debug)]
pub(super) enum Desired {
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
    since: Option<Instant>,
    added: Instant,
    remote: Option<Remote>,
    /// A write of this service is with the writer; its outcome re-syncs it.
    in_flight: bool,
    last_write_at: Option<Instant>,
    last_error: Option<(ErrorClass, String)>,
    refused: Option<Refused>,
    /// Taken out of the healthy set by `tether drain`, whatever its health.
    drained: bool,
    /// Which probe's results count (older probes' are ignored).
    generation: u64,
    /// Flap detection and the hold (`damping.rs`).
    flap: Flap,
    /// The write budget, and when the service waits for its next token.
    budget: Budget,
    budget_wait: Option<Instant>,
}

/// Why a service is reconciled: its writes queue by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// Its file, health, drain or a deadline changed: urgent.
    Change,
    /// Anti-entropy found it differs: a fix, behind every urgent write.
    AntiEntropy,
}

/// A probe the task around the core must start or stop.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeChange {
    Start { id: String, generation: u64, checks: Vec<CheckSpec> },
    Stop { id: String },
}

/// What the task around the core must carry out after an input.
#[derive(Debug, Default)]
pub struct Outbox {
    pub probes: Vec<ProbeChange>,
    /// Services whose status changed (publish them; gone ones are forgotten).
    pub changed: BTreeSet<String>,
    /// The drained set changed: persist it.
    pub drains: Option<BTreeSet<String>>,
    /// tether's own presence was made so: tell the heartbeat lane.
    pub lane_agent: Option<AgentInfo>,
    /// The registry answers again (`None`) or failed (`Some(why)`), for status.
    pub backend: Option<Option<String>>,
    /// An anti-entropy pass's fixes are all written: (fixes, after errors).
    pub in_sync: Option<(u64, bool)>,
}

pub struct Core<V: View> {
    view: V,
    node: String,
    entries: HashMap<String, Entry>,
    /// Drained ids, including those of services not (yet) in the desired set.
    drained: BTreeSet<String>,
    /// The last desired set read every file; the drains of an earlier run
    /// were matched against one such set.
    complete: bool,
    drains_pruned: bool,
    /// Registrations no file describes, kept by the last anti-entropy pass.
    kept_orphans: usize,
    /// Services whose files went while a write of theirs was out, by id:
    /// their names, for the deregistration that follows it.
    removed_in_flight: HashMap<String, String>,
    /// What tether's own presence should be, and what was last made so.
    agent: AgentInfo,
    agent_synced: Option<AgentInfo>,
    /// The remote view cannot be trusted until the next anti-entropy succeeds.
    stale: bool,
    /// Anti-entropy is due (runs as soon as the writer is free).
    sync_due: bool,
    next_anti_entropy: Instant,
    anti_entropy_every: Duration,
    retry: Backoff,
    /// Backoff of anti-entropy after refusals, and when one was last logged at WARN.
    retry_refused: Backoff,
    refused_warned: Option<Instant>,
    /// How many services wait after a refusal.
    refused: usize,
    /// Services with no health result yet, and when the last of their
    /// first-result graces ends.
    undecided: usize,
    undecided_until: Instant,
    /// Set by an anti-entropy read: (fixes, after errors); reported once its fixes are written.
    in_sync_report: Option<(u64, bool)>,
    queue: Queue,
    /// Fixes queued by the current anti-entropy pass.
    fixes: u64,
    /// Deadlines of services, checked lazily.
    timers: BinaryHeap<Reverse<(Instant, String)>>,
    generation: u64,
    metrics: Arc<crate::telemetry::Telemetry>,
    pub out: Outbox,
}

impl<V: View> Core<V> {
    pub fn new(view: V, node: &str, drained: BTreeSet<String>, telemetry: Arc<crate::telemetry::Telemetry>, now: Instant) -> Self {
        Core {
            view,
            node: node.to_string(),
            entries: HashMap::new(),
            drained,
            complete: false,
            drains_pruned: false,
            kept_orphans: 0,
            removed_in_flight: HashMap::new(),
            agent: AgentInfo::for_services(node, std::iter::empty()),
            agent_synced: None,
            stale: true,
            sync_due: true,
            next_anti_entropy: now + Duration::from_secs(86400),
            anti_entropy_every: crate::config::agent::ANTI_ENTROPY_EVERY,
            retry: Backoff::new(RETRY_FIRST, RETRY_CAP),
            retry_refused: Backoff::new(REFUSED_FIRST, REFUSED_CAP),
            refused_warned: None,
            refused: 0,
            undecided: 0,
            undecided_until: now,
            in_sync_report: None,
            queue: Queue::default(),
            fixes: 0,
            timers: BinaryHeap::new(),
            generation: 0,
            metrics: telemetry,
            out: Outbox::default(),
        }
    }

    /// Drains kept from an earlier run: services start drained if listed.
    pub fn keep_drains(&mut self, ids: BTreeSet<String>) {
        self.drained = ids;
    }

    pub fn set_anti_entropy_every(&mut self, every: Duration) {
        self.anti_entropy_every = every;
    }

    fn m(&self) -> &Metrics {
        &self.metrics.metrics
    }

    /// The earliest deadline: a service's, or anti-entropy's.
    pub fn next_deadline(&self) -> Instant {
        let service = self.timers.peek().map(|Reverse((t, _))| *t);
        service.map_or(self.next_anti_entropy, |t| t.min(self.next_anti_entropy))
    }

    /// How many services wait after a refused write.
    pub fn refused(&self) -> usize {
        self.refused
    }

    /// A desired set from the services directory. The first one read in
    /// full ends the drains kept for services whose files went while tether
    /// was not running. Until then, and whenever a file cannot be read, a
    /// registration no service describes is kept (`complete`).
    pub fn service_set(&mut self, desired: ServiceSet, now: Instant) {
        self.complete = desired.complete;
        if self.complete && !self.drains_pruned {
            self.drains_pruned = true;
            let before = self.drained.len();
            self.drained.retain(|id| desired.services.contains_key(id));
            if self.drained.len() != before {
                self.out.drains = Some(self.drained.clone());
            }
        }
        self.desired_set(desired.services, now);
    }

    /// Start, stop or restart probes and records for a new desired set.
    pub fn desired_set(&mut self, set: BTreeMap<String, ServiceSpec>, now: Instant) {
        let removed: Vec<String> = self.entries.keys().filter(|id| !set.contains_key(*id)).cloned().collect();
        for id in removed {
            let entry = self.entries.remove(&id).expect("present");
            if entry.refused.is_some() {
                self.refused -= 1;
            }
            if entry.health.is_none() {
                self.undecided -= 1;
            }
            self.out.probes.push(ProbeChange::Stop { id: id.clone() });
            self.m().forget(&id);
            self.out.changed.insert(id.clone());
            if self.drained.remove(&id) {
                self.out.drains = Some(self.drained.clone());
            }
            tracing::info!(service = %id, file = %entry.spec.file.display(), "service file removed");
            // An in-flight write is followed up when it finishes; while stale,
            // the next anti-entropy removes it as an orphan.
            if entry.in_flight {
                self.removed_in_flight.insert(id.clone(), entry.spec.name.clone());
            } else if !self.stale {
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
                    if entry.spec.checks != spec.checks {
                        self.generation += 1;
                        entry.generation = self.generation;
                        self.out.probes.push(ProbeChange::Start {
                            id: id.clone(),
                            generation: self.generation,
                            checks: spec.checks.clone(),
                        });
                    }
                    entry.spec = Arc::new(spec);
                }
                None => {
                    tracing::info!(service = %id, file = %spec.file.display(), "service added");
                    self.removed_in_flight.remove(&id);
                    self.generation += 1;
                    self.out.probes.push(ProbeChange::Start { id: id.clone(), generation: self.generation, checks: spec.checks.clone() });
                    self.m().service_health.get_or_create(&Metrics::service(&id)).set(-1);
                    let grace_ends = now + spec.first_result_within() + FIRST_RESULT_GRACE;
                    self.timers.push(Reverse((grace_ends, id.clone())));
                    self.undecided += 1;
                    self.undecided_until = self.undecided_until.max(grace_ends);
                    let drained = self.drained.contains(&id);
                    if drained {
                        tracing::info!(service = %id, "drained (kept from before tether restarted; `tether undrain` to end it)");
                        self.m().service_drained.get_or_create(&Metrics::service(&id)).set(1);
                    }
                    let budget = Budget::full(&spec.damping, now);
                    let entry = Entry {
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
                        flap: Flap::default(),
                        budget,
                        budget_wait: None,
                    };
                    self.entries.insert(id.clone(), entry);
                }
            }
            touched.push(id);
        }
        self.m().services.set(self.entries.len() as i64);
        self.agent = AgentInfo::for_services(&self.node, self.entries.values().map(|e| &*e.spec));
        if self.agent_synced.as_ref() != Some(&self.agent) {
            self.sync_due = true;
        }
        for id in touched {
            self.reconcile(&id, Cause::Change, now);
        }
    }

    /// Deadlines that passed: services are synced, anti-entropy becomes due.
    pub fn fire(&mut self, now: Instant) {
        if now >= self.next_anti_entropy {
            self.sync_due = true;
            self.next_anti_entropy = now + jitter(self.anti_entropy_every);
        }
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Reverse((_, id)) = self.timers.pop().expect("peeked");
            self.reconcile(&id, Cause::Change, now);
        }
    }

    /// The writer's next piece of work, if any: urgent writes, then a due
    /// anti-entropy pass, then background fixes. Marks the writes in flight.
    pub fn take_work(&mut self, max_batch: usize, now: Instant) -> Option<Work> {
        let urgent_first = !self.stale && self.queue.has_urgent();
        if self.sync_due && !urgent_first {
            self.sync_due = false;
            return Some(Work::Sync(self.agent.clone()));
        }
        if self.stale {
            return None;
        }
        let batch = self.queue.take(max_batch);
        self.m().write_queue.set(self.queue.len() as i64);
        if batch.is_empty() {
            self.report_in_sync(now);
            return None;
        }
        for w in &batch {
            if let Some(e) = self.entries.get_mut(w.id()) {
                e.in_flight = true;
            }
        }
        Some(Work::Writes(batch))
    }

    /// Once an anti-entropy pass's fixes are written and every new service has
    /// its first result (or its grace ran out): report it.
    fn report_in_sync(&mut self, now: Instant) {
        // A deadline already due (a grace that ended: its registration is not
        // queued yet) is handled first.
        let due = self.timers.peek().is_some_and(|Reverse((t, _))| *t <= now);
        if !due && (self.undecided == 0 || now >= self.undecided_until) {
            if let Some(report) = self.in_sync_report.take() {
                self.out.in_sync = Some(report);
            }
        }
    }

    /// Queue (or un-queue) the write that makes the registry hold the desired
    /// view of one service. Touches only that service; its status changed.
    fn reconcile(&mut self, id: &str, cause: Cause, now: Instant) {
        self.out.changed.insert(id.to_string());
        self.settle_flap(id, now);
        if self.stale {
            return;
        }
        let Some(entry) = self.entries.get(id) else { return };
        if entry.in_flight {
            return; // re-synced when the write finishes
        }
        if entry.refused.as_ref().is_some_and(|r| now < r.until) {
            self.queue.remove(id); // tried again when its retry deadline passes
            return;
        }
        if entry.budget_wait.is_some_and(|t| now < t) {
            return; // reconciled again when its next token comes
        }
        match self.needed_write(entry, now) {
            Some(w) => {
                // A write already queued has paid; replacing it is free.
                if !self.queue.contains(id) {
                    let entry = self.entries.get_mut(id).expect("present");
                    entry.budget_wait = None;
                    if let Err(at) = entry.budget.take(&entry.spec.damping, now) {
                        entry.budget_wait = Some(at);
                        self.timers.push(Reverse((at, id.to_string())));
                        self.m().budget_waits.get_or_create(&Metrics::service(id)).inc();
                        tracing::debug!(service = %id, "write budget spent; writing the latest state when the next token comes");
                        return;
                    }
                }
                let urgent = cause == Cause::Change;
                if !urgent {
                    self.fixes += 1;
                }
                self.queue.put(w, urgent);
            }
            None => self.queue.remove(id),
        }
    }

    /// The writer's report.
    pub fn done(&mut self, done: Done, now: Instant) {
        match done {
            Done::Writes { writes, outcomes } => self.written(writes, outcomes, now),
            Done::Sync(agent, Ok(remote)) => self.adopt(agent, remote, now),
            Done::Sync(_, Err(e)) => self.registry_error("anti-entropy (reading the registry)", e, now),
        }
    }

    fn written(&mut self, writes: Vec<Write>, outcomes: Vec<Outcome>, now: Instant) {
        let mut failed = None;
        for (w, outcome) in writes.into_iter().zip(outcomes) {
            let id = w.id().to_string();
            let done = matches!(outcome, Outcome::Done);
            let Some(entry) = self.entries.get_mut(&id) else {
                // Its file went while the write was out: whatever the write
                // left (a record, maintenance, or one that was there before a
                // refusal) is removed now; while stale, by anti-entropy.
                let name = self.removed_in_flight.remove(&id);
                match (&w, done, name) {
                    (Write::Deregister { .. }, true, _) => tracing::info!(service = %id, "deregistered"),
                    (_, _, Some(name)) if !self.stale => self.queue.put(Write::Deregister { id: id.clone(), name }, true),
                    _ => {}
                }
                continue;
            };
            entry.in_flight = false;
            match outcome {
                Outcome::Done => {
                    entry.last_write_at = Some(now);
                    entry.last_error = None;
                    if entry.refused.take().is_some() {
                        self.refused -= 1;
                        tracing::info!(service = %id, "the registry accepts this service's writes again");
                    }
                    self.metrics
                        .metrics
                        .service_last_write
                        .get_or_create(&Metrics::service(&id))
                        .set(crate::telemetry::metrics::unix_now());
                    entry.remote = after_write(&self.view, &w, entry.remote.take());
                    log_written(&w, self.view.keeps_critical());
                }
                Outcome::Failed(e) => {
                    entry.last_error = Some((e.kind.class(), e.to_string()));
                    match e.kind.class() {
                        ErrorClass::Permanent => {
                            let fresh = entry.refused.is_none();
                            if fresh {
                                self.refused += 1;
                            }
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
                        }
                        ErrorClass::Transient => failed = Some((id.clone(), e)),
                    }
                }
                Outcome::NotTried => {}
            }
            self.reconcile(&id, Cause::Change, now);
        }
        if let Some((id, e)) = failed {
            self.registry_error(&format!("writing service {id}"), e, now);
        }
    }

    /// Anti-entropy read back: adopt the registry's view, then queue fixes.
    fn adopt(&mut self, agent: AgentInfo, remote: Vec<RemoteEntry>, now: Instant) {
        let was_retrying = self.retry.is_retrying() || self.retry_refused.is_retrying();
        self.retry.reset();
        self.retry_refused.reset();
        self.refused_warned = None;
        self.stale = false;
        self.next_anti_entropy = now + jitter(self.anti_entropy_every);
        if self.agent_synced.as_ref() != Some(&agent) {
            self.out.lane_agent = Some(agent.clone());
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
        let kept = if self.complete { 0 } else { by_id.len() };
        if kept > 0 && kept != self.kept_orphans {
            let ids: Vec<&String> = by_id.keys().collect();
            tracing::warn!(services = ?ids, "keeping registrations of this node that no file describes while a service file cannot be read (see its error); they are not probed, and are removed once every file is read");
        }
        self.kept_orphans = kept;
        for orphan in by_id.into_values().filter(|_| kept == 0) {
            tracing::info!(service = %orphan.id, "removing a registration owned by this node that no file describes");
            self.fixes += 1;
            self.queue.put(Write::Deregister { id: orphan.id, name: orphan.name }, false);
        }
        let ids: Vec<String> = self.entries.keys().cloned().collect();
        for id in &ids {
            self.reconcile(id, Cause::AntiEntropy, now);
        }
        let m = &self.metrics.metrics;
        m.anti_entropy_runs.inc();
        m.anti_entropy_fixes.inc_by(self.fixes);
        if was_retrying {
            m.registry_reconnects.inc();
        }
        self.in_sync_report = Some((self.fixes, was_retrying));
        self.out.backend = Some(None);
    }
}
