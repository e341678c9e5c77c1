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

/// Probe a service's checks until `cancel` fires, sending every change of
/// their combined health to `tx`: passing while every check passes, else the
/// worst status among them, with a reason naming each check that fails.
pub async fn supervise(
    id: String,
    generation: u64,
    checks: Vec<CheckSpec>,
    connections: Connections,
    tx: mpsc::Sender<HealthChange>,
    cancel: CancellationToken,
    telemetry: Arc<Telemetry>,
) {
    let (check_tx, mut changes) = mpsc::channel(checks.len().max(1));
    let runs = futures::future::join_all(
        checks
            .iter()
            .enumerate()
            .map(|(index, spec)| run_check(&id, index, spec.clone(), &connections, check_tx.clone(), &cancel, &telemetry)),
    );
    tokio::pin!(runs);
    let mut states: Vec<Option<Health>> = vec![None; checks.len()];
    let mut sent: Option<Health> = None;
    loop {
        let (index, health) = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = &mut runs => return,
            Some(change) = changes.recv() => change,
        };
        states[index] = Some(health);
        let Some(health) = combine(&checks, &states) else { continue };
        if sent.as_ref() == Some(&health) {
            continue;
        }
        sent = Some(health.clone());
        // Logged by the reconciler's core, which knows whether the service is flapping.
        let change = HealthChange { id: id.clone(), generation, health };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tx.send(change) => {}
        }
    }
}

/// The service's health from its checks' (`None` = no result yet): known
/// once one fails or all have passed. With one check, that check's health.
fn combine(checks: &[CheckSpec], states: &[Option<Health>]) -> Option<Health> {
    if let [only] = states {
        return only.clone();
    }
    let failing: Vec<(usize, &Health)> =
        states.iter().enumerate().filter_map(|(i, h)| h.as_ref().filter(|h| h.status != Status::Passing).map(|h| (i, h))).collect();
    let worst = failing.iter().map(|(_, h)| h.status).max_by_key(|s| match s {
        Status::Passing => 0,
        Status::Warning => 1,
        Status::Critical => 2,
    });
    match worst {
        Some(status) => {
            let output = failing.iter().map(|(i, h)| format!("{}: {}", name(i + 1, &checks[*i]), h.output)).collect::<Vec<_>>().join("; ");
            Some(Health { status, output })
        }
        None if states.iter().all(Option::is_some) => Some(Health::passing("SERVING")),
        None => None,
    }
}

/// How a reason names one of several checks: "check 2 (127.0.0.1:50052 service \"billing\")".
fn name(n: usize, spec: &CheckSpec) -> String {
    match spec.service.as_str() {
        "" => format!("check {n} ({})", spec.target),
        s => format!("check {n} ({} service {s:?})", spec.target),
    }
}

/// Probe one check until `cancel` fires, sending each change of its status
/// (after rise/fall) to the service's supervisor.
async fn run_check(
    id: &str,
    index: usize,
    spec: CheckSpec,
    connections: &Connections,
    tx: mpsc::Sender<(usize, Health)>,
    cancel: &CancellationToken,
    telemetry: &Telemetry,
) {
    let latency = telemetry.metrics.check_duration.get_or_create_owned(&Metrics::service(id));
    // A probe that cannot be built yet (a CA, certificate or key file not
    // there yet) is critical meanwhile, and built again with backoff: the
    // files are read anew each time, so they are picked up when they appear.
    let mut retry = Backoff::new(BUILD_RETRY_FIRST, BUILD_RETRY_CAP);
    let mut reported: Option<String> = None;
    let mut probe = loop {
        match Probe::new(spec.clone(), connections) {
            Ok(p) => break p,
            Err(e) => {
                if reported.as_deref() != Some(e.as_str()) {
                    tracing::warn!(service = %id, error = %e, "cannot build the health probe; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tx.send((index, Health::critical(e.clone()))) => {}
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
            telemetry.check_latency(id, d, cancel);
        }
        threshold.observe(obs.ok);
        // An answered NOT_SERVING is a warning if the check says so; a crash
        // or an unreachable server is always critical.
        let status = match threshold.state() {
            Some(Status::Critical) if spec.not_serving == NotServing::Warning && super::rpc::is_not_serving(&obs) => Some(Status::Warning),
            s => s,
        };
        if let Some(status) = status.filter(|s| sent != Some(*s)) {
            sent = Some(status);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.send((index, Health { status, output: obs.output })) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(target: &str, service: &str) -> CheckSpec {
        CheckSpec::watching(target, service)
    }

    #[test]
    fn several_checks_pass_only_together_and_the_reason_names_the_failing_ones() {
        let checks = [check("127.0.0.1:1", ""), check("127.0.0.1:2", "billing")];
        let ok = || Some(Health::passing("SERVING"));
        assert_eq!(combine(&checks, &[ok(), None]), None, "not known until both answered");
        assert_eq!(combine(&checks, &[ok(), ok()]), Some(Health::passing("SERVING")));
        let down = Some(Health::critical("NOT_SERVING"));
        assert_eq!(
            combine(&checks, &[None, down.clone()]),
            Some(Health::critical("check 2 (127.0.0.1:2 service \"billing\"): NOT_SERVING")),
            "known critical as soon as one fails"
        );
        let warn = Some(Health { status: Status::Warning, output: "NOT_SERVING".into() });
        assert_eq!(
            combine(&checks, &[warn, down]),
            Some(Health::critical("check 1 (127.0.0.1:1): NOT_SERVING; check 2 (127.0.0.1:2 service \"billing\"): NOT_SERVING")),
            "the worst status wins"
        );
        let one = [check("127.0.0.1:1", "")];
        assert_eq!(combine(&one, &[Some(Health::critical("connection refused"))]), Some(Health::critical("connection refused")));
    }
}
