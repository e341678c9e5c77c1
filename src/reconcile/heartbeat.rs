//! The heartbeat lane: tether's liveness (Consul's TTL check update, etcd's
//! lease keepalive) on its own task and its own registry connection. Nothing
//! queued for the writer, however slow the registry, delays it.
//!
//! It beats every `ttl/3` once the reconciler has made sure tether's own
//! presence exists (and again whenever that changes). A beat that comes more
//! than half a period late is logged and counted
//! (`tether_heartbeat_late_total`; not the first success after failures,
//! which were reported as they came); a failed one is reported to the
//! reconciler, which re-reads the registry (it may have lost tether's records)
//! while the lane retries with a capped, jittered backoff.

use crate::backoff::{jitter, Backoff};
use crate::registry::{AgentInfo, Heartbeat, RegistryError};
use crate::telemetry::metrics::unix_now;
use crate::telemetry::status::rfc3339;
use crate::telemetry::Telemetry;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

const RETRY_FIRST: Duration = Duration::from_millis(200);

/// A failed heartbeat, for the reconciler.
#[derive(Debug)]
pub struct Failed(pub RegistryError);

pub async fn run<H: Heartbeat>(
    mut lane: H,
    mut agent: watch::Receiver<Option<AgentInfo>>,
    failures: mpsc::Sender<Failed>,
    telemetry: Arc<Telemetry>,
    cancel: CancellationToken,
) {
    let m = &telemetry.metrics;
    let mut retry = Backoff::new(RETRY_FIRST, Duration::from_secs(5));
    let mut last_ok: Option<Instant> = None;
    let mut next = Instant::now();
    loop {
        let every = agent.borrow_and_update().as_ref().map(AgentInfo::heartbeat_every);
        let every = match every {
            Some(every) => every,
            None => {
                // Nothing to beat for until tether's presence exists.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = agent.changed() => if r.is_err() { return },
                }
                next = Instant::now();
                continue;
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = agent.changed() => {
                if r.is_err() {
                    return;
                }
                // Presence (re-)established or adopted: beat now (an adopted
                // liveness check may have lapsed meanwhile), then on the new cadence.
                last_ok = Some(Instant::now());
                next = Instant::now();
                continue;
            }
            _ = sleep_until(next) => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = lane.beat() => r,
        };
        m.heartbeat_seconds.observe(started.elapsed().as_secs_f64());
        m.op("heartbeat");
        match result {
            Ok(()) => {
                let now = Instant::now();
                let gap = last_ok.map(|prev| now - prev);
                if retry.is_retrying() {
                    // Not late: the failures were reported (and counted as
                    // registry errors) as they came.
                    match gap {
                        Some(gap) => tracing::info!(since_last_success = ?gap, "liveness heartbeat succeeds again"),
                        None => tracing::info!("liveness heartbeat succeeds again"),
                    }
                } else if let Some(gap) = gap.filter(|gap| *gap > every + every / 2) {
                    m.heartbeat_late.inc();
                    tracing::warn!(gap = ?gap, period = ?every, "liveness heartbeat late");
                }
                retry.reset();
                last_ok = Some(now);
                next = crate::timer::at(started + every);
                m.heartbeat_last.set(unix_now());
                telemetry.with_status(|s| s.backend.last_heartbeat = Some(rfc3339(SystemTime::now())));
            }
            Err(e) => {
                m.error("heartbeat", e.kind.as_str(), e.kind.class().as_str());
                let delay = retry.next_delay().min(every);
                next = Instant::now() + jitter(delay);
                // Never waits: with failures already waiting the reconciler
                // knows, and a lane blocked here would stop beating (and
                // hold up shutdown, which no longer reads them).
                if let Err(mpsc::error::TrySendError::Closed(_)) = failures.try_send(Failed(e)) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ErrorKind;
    use std::sync::Mutex;

    #[derive(Default)]
    struct State {
        /// Fail every beat.
        down: bool,
        /// Hold the next beat this long.
        hold: Duration,
        beats: usize,
    }

    struct Lane(Arc<Mutex<State>>);

    impl Heartbeat for Lane {
        async fn beat(&mut self) -> crate::registry::Result<()> {
            let (down, hold) = {
                let mut s = self.0.lock().unwrap();
                s.beats += 1;
                (s.down, std::mem::take(&mut s.hold))
            };
            tokio::time::sleep(hold).await;
            if down {
                return Err(RegistryError::new(ErrorKind::Unavailable, "connection refused"));
            }
            Ok(())
        }
    }

    /// A registry away for a while is reported as failures, not counted as a
    /// late heartbeat when it is back; a beat held up is counted.
    #[tokio::test(start_paused = true)]
    async fn the_first_beat_after_failures_is_not_late_and_a_held_beat_is() {
        let state = Arc::new(Mutex::new(State::default()));
        let telemetry = Arc::new(Telemetry::new("node-a", "memory", "memory"));
        let (agent_tx, agent) = watch::channel(None);
        let (failures_tx, mut failures) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(Lane(state.clone()), agent, failures_tx, telemetry.clone(), cancel.clone()));
        let every = Duration::from_secs(1);
        agent_tx.send_replace(Some(AgentInfo { node: "node-a".into(), ttl: every * 3, deregister_after: Duration::from_secs(60) }));
        tokio::time::sleep(Duration::from_secs(5)).await;
        state.lock().unwrap().down = true;
        tokio::time::sleep(Duration::from_secs(10)).await;
        state.lock().unwrap().down = false;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut failed = 0;
        while failures.try_recv().is_ok() {
            failed += 1;
        }
        assert!(failed >= 5, "the failures were reported: {failed}");
        assert_eq!(telemetry.metrics.heartbeat_late.get(), 0, "the beat after the failures is not late");
        let beats = state.lock().unwrap().beats;
        assert!(beats >= 20, "beats went on after the registry came back: {beats}");

        // A slow registry holds one beat for two periods: that one is late.
        state.lock().unwrap().hold = every * 2;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(telemetry.metrics.heartbeat_late.get(), 1, "a held beat is late");
        cancel.cancel();
        task.await.unwrap();
    }

    /// Failures nobody reads (the loop busy, or shutting down) never stop
    /// the lane: it keeps beating and stops when cancelled.
    #[tokio::test(start_paused = true)]
    async fn unread_failures_never_block_the_lane() {
        let state = Arc::new(Mutex::new(State { down: true, ..State::default() }));
        let telemetry = Arc::new(Telemetry::new("node-a", "memory", "memory"));
        let (agent_tx, agent) = watch::channel(None);
        let (failures_tx, _failures) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(Lane(state.clone()), agent, failures_tx, telemetry, cancel.clone()));
        agent_tx.send_replace(Some(AgentInfo {
            node: "node-a".into(),
            ttl: Duration::from_secs(3),
            deregister_after: Duration::from_secs(60),
        }));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let beats = state.lock().unwrap().beats;
        assert!(beats >= 8, "the lane went on trying with one unread failure waiting: {beats} beats");
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("stops at once").unwrap();
    }
}
