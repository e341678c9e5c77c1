//! The reconciler: desired specs + health → what the registry should hold.
//!
//! The decisions are the [`core`]'s (no I/O, no clock reads). This module is
//! the task around it, which only moves messages: inputs in (desired sets,
//! health changes, the writer's reports, heartbeat failures, drain requests,
//! deadlines), work out to the [`writer`], and the core's outbox carried out
//! (probes started and stopped, statuses published, drains persisted off
//! the loop, the heartbeat lane told what to keep alive).
//!
//! Its loop never awaits registry I/O. Three tasks share the work:
//! - the reconciler (this loop): the core, the write [`queue`] in it;
//! - the [`writer`]: the one task that writes (and lists), a batch at a time;
//! - the [`heartbeat`] lane: tether's liveness on its own connection.
//!
//! Anti-entropy (at start, after any registry error with capped jittered
//! backoff, and every 30 s ± 20 %) re-reads the registry in the writer,
//! re-registers what is missing and removes records this node owns that no
//! file describes. It never touches records owned by anyone else. Its fixes
//! queue behind writes caused by health changes.

pub mod core;
#[cfg(test)]
mod core_tests;
pub mod heartbeat;
pub mod queue;
#[cfg(test)]
mod tests;
pub mod writer;

use self::core::{Core, Outbox, ProbeChange};
use crate::config::file::FileStamp;
use crate::config::scan::ServiceSet;
use crate::control::{self, DrainFile};
use crate::health::conn::Connections;
use crate::health::supervisor::{supervise, HealthChange};
use crate::registry::{Outcome, Registry, RegistryError, View, Write};
use crate::telemetry::status::rfc3339;
use crate::telemetry::{systemd, Telemetry};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use writer::{Done, Work};

/// While some write is refused, how often the credential files are looked at.
const CREDENTIALS_EVERY: Duration = Duration::from_secs(1);
/// How long queued writes may take at shutdown when registrations are left
/// to TTL ([`Reconciler::flush`]); systemd's stop timeout is 90 s by default.
const FLUSH_ON_SHUTDOWN: Duration = Duration::from_secs(5);
/// The loop turns at least this often when idle (the loop-alive mark that
/// `/healthz` reads, well inside its [`LOOP_STUCK_AFTER`]); more often only
/// for systemd's watchdog. Every idle wake-up costs a sidecar CPU.
///
/// [`LOOP_STUCK_AFTER`]: crate::telemetry::LOOP_STUCK_AFTER
const TICK: Duration = Duration::from_secs(10);
const _: () = assert!(TICK.as_secs() * 3 <= crate::telemetry::LOOP_STUCK_AFTER.as_secs());

pub struct Reconciler<R: Registry> {
    core: Core<R::View>,
    view: R::View,
    deregister_on_shutdown: bool,
    max_batch: usize,
    /// The writer holds a piece of work; the next goes out when it reports back.
    writer_busy: bool,
    work_tx: mpsc::Sender<Work>,
    done_rx: mpsc::Receiver<Done>,
    writer: JoinHandle<R>,
    lane_agent: watch::Sender<Option<crate::registry::AgentInfo>>,
    lane_failed: mpsc::Receiver<heartbeat::Failed>,
    lane_cancel: CancellationToken,
    lane: JoinHandle<()>,
    health_tx: mpsc::Sender<HealthChange>,
    health_rx: mpsc::Receiver<HealthChange>,
    probes: TaskTracker,
    /// The running probe of each service.
    probe_tokens: HashMap<String, CancellationToken>,
    connections: Connections,
    /// The drained set, persisted by its own task (off the loop).
    drains: Option<(mpsc::UnboundedSender<KeepDrains>, JoinHandle<()>)>,
    /// Requests from the control socket (drain, undrain).
    control: Option<mpsc::Receiver<control::Command>>,
    /// Off in unit tests, which feed health changes themselves.
    probing: bool,
    telemetry: Arc<Telemetry>,
    watchdog_every: Option<Duration>,
    next_watchdog: Instant,
    /// The backend's credential files as they were ([`FileStamp`]), looked at every
    /// [`CREDENTIALS_EVERY`] while the registry refuses some service's writes.
    credentials: Vec<Option<FileStamp>>,
    next_credentials_check: Instant,
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
            core: Core::new(view.clone(), node, BTreeSet::new(), telemetry.clone(), now),
            view,
            deregister_on_shutdown,
            max_batch,
            writer_busy: false,
            work_tx,
            done_rx,
            writer,
            lane_agent,
            lane_failed,
            lane_cancel,
            lane,
            health_tx,
            health_rx,
            probes: TaskTracker::new(),
            probe_tokens: HashMap::new(),
            connections: Connections::new(),
            drains: None,
            control: None,
            probing: true,
            telemetry,
            watchdog_every: systemd::watchdog_every(),
            next_watchdog: now,
            credentials: Vec::new(),
            next_credentials_check: now,
        })
    }

    /// Take drain and undrain requests from the control socket, and keep
    /// drains in `drains` (drains left there by an earlier run apply to the
    /// services as they come).
    pub fn with_control(mut self, commands: mpsc::Receiver<control::Command>, drains: DrainFile) -> Self {
        self.core.keep_drains(drains.ids().clone());
        let (tx, rx) = mpsc::unbounded_channel();
        self.drains = Some((tx, tokio::spawn(persist_drains(drains, rx))));
        self.control = Some(commands);
        self
    }

    /// Anti-entropy's period (±20 %) when nothing goes wrong.
    pub fn with_anti_entropy_every(mut self, every: Duration) -> Self {
        self.core.set_anti_entropy_every(every);
        self
    }

    /// Run until `shutdown` fires; `desired` delivers each new desired set.
    pub async fn run(mut self, mut desired: mpsc::Receiver<ServiceSet>, shutdown: CancellationToken) {
        // The first anti-entropy pass waits for the first scan, so that it
        // registers tether's liveness with the right TTL at once.
        tokio::select! {
            _ = shutdown.cancelled() => return self.shutdown().await,
            first = desired.recv() => match first {
                Some(set) => self.core.service_set(set, Instant::now()),
                None => return self.shutdown().await,
            },
        }
        loop {
            self.turn();
            self.dispatch();
            self.carry_out();
            // Watchdog pings keep their exact period (moving the tick onto the
            // timer grid could push a ping to nearly the whole WatchdogSec).
            let tick = match self.watchdog_every {
                Some(every) => Instant::now() + every.min(TICK),
                None => crate::timer::after(TICK),
            };
            let deadline = self.core.next_deadline();
            let refused = self.core.refused() > 0;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = self.done_rx.recv() => {
                    self.writer_busy = false;
                    self.core.done(done, Instant::now());
                }
                Some(change) = self.health_rx.recv() => self.core.health(change, Instant::now()),
                Some(set) = desired.recv() => self.core.service_set(set, Instant::now()),
                Some(heartbeat::Failed(e)) = self.lane_failed.recv() => self.core.heartbeat_failed(e, Instant::now()),
                Some(command) = recv(&mut self.control) => self.on_control(command),
                _ = sleep_until(deadline), if deadline < tick => self.core.fire(Instant::now()),
                _ = sleep_until(self.next_credentials_check), if refused => self.check_credentials(),
                _ = sleep_until(tick) => self.core.fire(Instant::now()),
            }
        }
        self.shutdown().await;
    }

    /// A drain, undrain or state request. A drain or undrain is answered
    /// once the drained set is on disk, so that a crash right after the
    /// answer keeps it.
    fn on_control(&mut self, command: control::Command) {
        let response = self.core.control(&command.request, Instant::now());
        match (self.core.out.drains.take(), &self.drains) {
            (Some(ids), Some((tx, _))) => {
                if let Err(mpsc::error::SendError(keep)) = tx.send(KeepDrains { ids, reply: Some((command.reply, response)) }) {
                    keep.answer(None);
                }
            }
            _ => {
                let _ = command.reply.send(response);
            }
        }
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

    /// Hand the writer its next piece of work if it is free.
    fn dispatch(&mut self) {
        if self.writer_busy {
            return;
        }
        if let Some(work) = self.core.take_work(self.max_batch, Instant::now()) {
            if self.work_tx.try_send(work).is_ok() {
                self.writer_busy = true;
            }
        }
    }

    /// Carry out what the core decided: probes, statuses, drains, the lane.
    fn carry_out(&mut self) {
        let out = std::mem::take(&mut self.core.out);
        let Outbox { probes, changed, drains, lane_agent, backend, in_sync } = out;
        for change in probes {
            match change {
                ProbeChange::Start { id, generation, checks } => {
                    let token = self.spawn_probe(&id, generation, checks);
                    if let Some(old) = self.probe_tokens.insert(id, token) {
                        old.cancel();
                    }
                }
                ProbeChange::Stop { id } => {
                    if let Some(old) = self.probe_tokens.remove(&id) {
                        old.cancel();
                    }
                }
            }
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        for id in changed {
            self.telemetry.set_service(&id, self.core.status(&id, now, wall));
        }
        if let (Some(ids), Some((tx, _))) = (drains, &self.drains) {
            let _ = tx.send(KeepDrains { ids, reply: None });
        }
        if let Some(agent) = lane_agent {
            self.lane_agent.send_replace(Some(agent));
        }
        match backend {
            Some(None) => self.telemetry.with_status(|s| {
                s.backend.last_anti_entropy = Some(rfc3339(wall));
                s.backend.connected = true;
                s.backend.last_error = None;
            }),
            Some(Some(error)) => self.telemetry.with_status(|s| {
                s.backend.connected = false;
                s.backend.last_error = Some(format!("{}: {error}", rfc3339(wall)));
            }),
            None => {}
        }
        if let Some((fixes, was_retrying)) = in_sync {
            let first = !self.telemetry.is_ready();
            if first || was_retrying || fixes > 0 {
                tracing::info!(fixes, services = self.core.services(), "anti-entropy: registry in sync");
            }
            if first {
                self.telemetry.set_ready();
                systemd::ready();
            }
        }
    }

    fn spawn_probe(&self, id: &str, generation: u64, checks: Vec<crate::config::CheckSpec>) -> CancellationToken {
        let cancel = CancellationToken::new();
        if self.probing {
            self.probes.spawn(supervise(
                id.to_string(),
                generation,
                checks,
                self.connections.clone(),
                self.health_tx.clone(),
                cancel.clone(),
                self.telemetry.clone(),
            ));
        }
        cancel
    }

    /// While writes are refused: when a credential file changed (a new ACL
    /// token, say), the refused services are tried again at once. The first
    /// look only notes the files as they are.
    fn check_credentials(&mut self) {
        self.next_credentials_check = Instant::now() + CREDENTIALS_EVERY;
        let now: Vec<Option<FileStamp>> = self.view.credential_files().iter().map(|p| FileStamp::of(p)).collect();
        if self.credentials.is_empty() {
            self.credentials = now;
            return;
        }
        if now != self.credentials {
            self.credentials = now;
            self.core.credentials_changed(Instant::now());
        }
    }

    /// With registrations left to expire by TTL, what is queued is written
    /// first (a flip to critical queued as SIGTERM came must not stay passing
    /// for another TTL), for at most [`FLUSH_ON_SHUTDOWN`].
    async fn flush(&mut self) {
        let deadline = Instant::now() + FLUSH_ON_SHUTDOWN;
        for probe in self.probe_tokens.values() {
            probe.cancel(); // no new health from here on
        }
        loop {
            if self.writer_busy {
                match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                    Ok(Some(done)) => {
                        self.writer_busy = false;
                        self.core.done(done, Instant::now());
                    }
                    _ => return,
                }
            }
            match self.core.take_work(self.max_batch, Instant::now()) {
                Some(work @ Work::Writes(_)) if Instant::now() < deadline => {
                    if self.work_tx.send(work).await.is_err() {
                        return;
                    }
                    self.writer_busy = true;
                }
                _ => return,
            }
        }
    }

    async fn shutdown(mut self) {
        systemd::stopping();
        if !self.deregister_on_shutdown {
            self.flush().await;
        }
        let Reconciler { core, probe_tokens, probes, work_tx, writer, lane_cancel, lane, deregister_on_shutdown, drains, .. } = self;
        // The last change of the drained set reaches the disk.
        if let Some((tx, persist)) = drains {
            drop(tx);
            let _ = persist.await;
        }
        for token in probe_tokens.values() {
            token.cancel();
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
        tracing::info!(services = core.services(), "shutting down; deregistering owned services");
        let owned: Vec<Write> = match registry.list().await {
            Ok(list) => list.into_iter().map(|r| Write::Deregister { id: r.id, name: r.name }).collect(),
            Err(_) => core.deregistrations(),
        };
        for chunk in owned.chunks(registry.max_batch().max(1)) {
            let outcomes = registry.apply(chunk).await;
            let failed = outcomes.iter().find_map(|o| match o {
                Outcome::Failed(e) => Some(e.clone()),
                _ => None,
            });
            if let Some(e) = failed {
                tracing::warn!(error = %e, "could not deregister every service on shutdown; those left will expire by TTL");
                if e.kind.class() == crate::registry::ErrorClass::Transient {
                    break;
                }
            }
        }
        if let Err(e) = registry.shutdown(true).await {
            tracing::warn!(error = %e, "could not remove tether's own registration; it will expire by TTL");
        }
    }
}

/// A new drained set for the disk, with the control request to answer once
/// it is there.
struct KeepDrains {
    ids: BTreeSet<String>,
    reply: Option<(oneshot::Sender<control::Response>, control::Response)>,
}

impl KeepDrains {
    fn answer(self, warning: Option<&String>) {
        if let Some((reply, mut response)) = self.reply {
            response.warning = warning.cloned();
            let _ = reply.send(response);
        }
    }
}

/// Keep the drained set on disk, off the reconciler's loop: the latest of the
/// changes waiting is written once (a temporary file renamed), on the
/// blocking pool, and then the requests that made them are answered.
async fn persist_drains(mut file: DrainFile, mut rx: mpsc::UnboundedReceiver<KeepDrains>) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while let Ok(next) = rx.try_recv() {
            waiting.push(next);
        }
        let ids = waiting.last().map(|k| k.ids.clone()).unwrap_or_default();
        file.replace(ids);
        let saved = tokio::task::spawn_blocking(move || {
            let result = file.save();
            (file, result)
        })
        .await;
        let Ok((saved, result)) = saved else { return };
        file = saved;
        waiting.into_iter().for_each(|k| k.answer(result.as_ref().err()));
    }
}

/// The next message of an optional channel; never, without one.
async fn recv<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
