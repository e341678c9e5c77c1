//! One task per service: runs its probe, applies rise/fall, reports changes.

use super::conn::Connections;
use super::probe::Probe;
use super::threshold::Threshold;
use super::{Health, Status};
use crate::backoff::{jitter, Backoff};
use crate::config::{CheckSpec, NotServing};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Retries of a probe that cannot be built: doubling from the first to the cap, jittered.
const BUILD_RETRY_FIRST: Duration = Duration::from_millis(500);
const BUILD_RETRY_CAP: Duration = Duration::from_secs(30);

/// A health change of one service, sent to the reconciler.
#[derive(Debug, Clone)]
pub struct HealthChange {
    pub id: String,
    /// Which probe generation produced it; stale generations are ignored.
    pub generation: u64,
    pub health: Health,
}

/// Probe `spec` until `cancel` fires, sending every state change to `tx`.
pub async fn supervise(
    id: String,
    generation: u64,
    spec: CheckSpec,
    connections: Connections,
    tx: mpsc::Sender<HealthChange>,
    cancel: CancellationToken,
    telemetry: Arc<Telemetry>,
) {
    let latency = telemetry.metrics.check_duration.get_or_create_owned(&Metrics::service(&id));
    // A probe that cannot be built yet (a CA, certificate or key file not
    // there yet) is critical meanwhile, and built again with backoff: the
    // files are read anew each time, so they are picked up when they appear.
    let mut retry = Backoff::new(BUILD_RETRY_FIRST, BUILD_RETRY_CAP);
    let mut reported: Option<String> = None;
    let mut probe = loop {
        match Probe::new(spec.clone(), &connections) {
            Ok(p) => break p,
            Err(e) => {
                if reported.as_deref() != Some(e.as_str()) {
                    tracing::warn!(service = %id, error = %e, "cannot build the health probe; retrying");
                    let change = HealthChange { id: id.clone(), generation, health: Health::critical(e.clone()) };
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tx.send(change) => {}
                    }
                    reported = Some(e);
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(jitter(retry.next_delay())) => {}
                }
            }
        }
    };
    // A critical result reported while the probe could not be built counts
    // as the current state: the next change is a change from it.
    let mut threshold = Threshold::new(spec.rise, spec.fall);
    let mut sent = None;
    if reported.is_some() {
        threshold.assume(Status::Critical);
        sent = Some(Status::Critical);
    }
    loop {
        let obs = tokio::select! {
            _ = cancel.cancelled() => return,
            obs = probe.next() => obs,
        };
        if let Some(d) = obs.latency {
            latency.observe(d.as_secs_f64());
            telemetry.check_latency(&id, d, &cancel);
        }
        threshold.observe(obs.ok);
        // An answered NOT_SERVING is a warning if the check says so; a crash
        // or an unreachable server is always critical.
        let status = match threshold.state() {
            Some(Status::Critical) if spec.not_serving == NotServing::Warning && super::rpc::is_not_serving(&obs) => Some(Status::Warning),
            s => s,
        };
        if status.is_some() && status != sent {
            sent = status;
            let status = status.expect("some");
            // Logged by the reconciler's core, which knows whether the service is flapping.
            let change = HealthChange { id: id.clone(), generation, health: Health { status, output: obs.output } };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.send(change) => {}
            }
        }
    }
}
