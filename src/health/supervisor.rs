//! One task per service: runs its probe, applies rise/fall, reports changes.

use super::conn::Connections;
use super::probe::Probe;
use super::threshold::Threshold;
use super::{Health, Status};
use crate::config::CheckSpec;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::Telemetry;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
    let mut probe = match Probe::new(spec.clone(), &connections) {
        Ok(p) => p,
        Err(e) => {
            let _ = tx.send(HealthChange { id, generation, health: Health::critical(e) }).await;
            return;
        }
    };
    let mut threshold = Threshold::new(spec.rise, spec.fall);
    loop {
        let obs = tokio::select! {
            _ = cancel.cancelled() => return,
            obs = probe.next() => obs,
        };
        if let Some(d) = obs.latency {
            latency.observe(d.as_secs_f64());
        }
        if let Some(status) = threshold.observe(obs.ok) {
            match status {
                Status::Passing => tracing::info!(service = %id, output = %obs.output, "health: passing"),
                Status::Critical => tracing::warn!(service = %id, output = %obs.output, "health: critical"),
            }
            let change = HealthChange { id: id.clone(), generation, health: Health { status, output: obs.output } };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.send(change) => {}
            }
        }
    }
}
