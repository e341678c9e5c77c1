//! The heartbeat lane: tether's liveness (Consul's TTL check update, etcd's
//! lease keepalive) on its own task and its own registry connection. Nothing
//! queued for the writer, however slow the registry, delays it.
//!
//! It beats every `ttl/3` once the reconciler has made sure tether's own
//! presence exists (and again whenever that changes). A beat that comes more
//! than half a period late is logged and counted
//! (`tether_heartbeat_late_total`); a failed one is reported to the
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
                if let Some(prev) = last_ok {
                    let gap = now - prev;
                    if gap > every + every / 2 {
                        m.heartbeat_late.inc();
                        tracing::warn!(gap = ?gap, period = ?every, "liveness heartbeat late");
                    }
                }
                if retry.is_retrying() {
                    tracing::info!("liveness heartbeat succeeds again");
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
                if failures.send(Failed(e)).await.is_err() {
                    return;
                }
            }
        }
    }
}
