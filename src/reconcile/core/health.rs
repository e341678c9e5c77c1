//! Health changes from probes, through flap damping (`damping.rs`): what the
//! registry is told is the probe's health, unless the service is flapping.

use super::{Cause, Core, Entry};
use crate::health::supervisor::HealthChange;
use crate::health::{Health, Status};
use crate::registry::View;
use crate::telemetry::metrics::Metrics;
use std::cmp::Reverse;
use tokio::time::Instant;

impl<V: View> Core<V> {
    /// A health change from a probe.
    pub fn health(&mut self, change: HealthChange, now: Instant) {
        let id = change.id;
        let Some(entry) = self.entries.get(&id) else { return };
        if entry.generation != change.generation {
            return;
        }
        self.settle_flap(&id, now);
        let entry = self.entries.get_mut(&id).expect("present");
        let status = change.health.status;
        let was = entry.health.as_ref().map(|h| h.status);
        let m = &self.metrics.metrics;
        m.transition(&id, status.as_str());
        if was.is_some_and(|w| w != status) {
            let damping = entry.spec.damping;
            if entry.flap.transition(status, &damping, now) {
                let ep = entry.flap.episode.as_ref().expect("started");
                tracing::warn!(service = %id, transitions = ep.transitions, within = %super::damping::round(ep.over),
                    hold = %humantime::format_duration(ep.hold),
                    "flapping: held critical in the registry until SERVING without a break for the hold; transitions until then are not written");
                m.service_flapping.get_or_create(&Metrics::service(&id)).set(1);
                m.flap_episodes.get_or_create(&Metrics::service(&id)).inc();
            } else if entry.flap.episode.is_some() {
                m.flap_suppressed.get_or_create(&Metrics::service(&id)).inc();
            }
            if let Some(t) = entry.flap.episode.as_ref().and_then(|ep| ep.ends_at()) {
                self.timers.push(Reverse((t, id.clone())));
            }
        }
        // One line per change, except while flapping: the episode's two lines say it.
        match (status, entry.flap.episode.is_some()) {
            (_, true) => tracing::debug!(service = %id, output = %change.health.output, "health: {status} (flapping)"),
            (Status::Passing, false) => tracing::info!(service = %id, output = %change.health.output, "health: passing"),
            (Status::Critical, false) => tracing::warn!(service = %id, output = %change.health.output, "health: critical"),
            (Status::Warning, false) => tracing::warn!(service = %id, output = %change.health.output, "health: warning"),
        }
        if was.is_none() {
            self.undecided -= 1;
        }
        entry.since = Some(now);
        entry.health = Some(change.health);
        self.track_critical(&id, now);
        self.reconcile(&id, Cause::Change, now);
    }

    /// End a service's flapping episode once its hold has passed.
    pub(super) fn settle_flap(&mut self, id: &str, now: Instant) {
        let Some(entry) = self.entries.get_mut(id) else { return };
        let Some(ep) = entry.flap.settle(&entry.spec.damping, now) else { return };
        // SERVING for the whole hold, unless damping was turned off first.
        let served = ep.serving_since.map(|_| humantime::format_duration(ep.hold).to_string());
        tracing::info!(service = %id, lasted = %super::damping::round(now.duration_since(ep.started)), suppressed = ep.suppressed,
            serving_for = served.as_deref().unwrap_or("-"), "flapping ended");
        self.metrics.metrics.service_flapping.get_or_create(&Metrics::service(id)).set(0);
        self.track_critical(id, now);
    }

    /// Keep `critical_since` (and the deregistration deadline) on what the
    /// registry is told: a flapping service counts as critical throughout.
    fn track_critical(&mut self, id: &str, now: Instant) {
        let Some(entry) = self.entries.get_mut(id) else { return };
        let status = effective(entry, now).map(|h| h.status);
        match (status == Some(Status::Critical), entry.critical_since) {
            (true, None) => {
                entry.critical_since = Some(now);
                self.timers.push(Reverse((now + entry.spec.deregister_critical_after, id.to_string())));
            }
            (false, Some(_)) => entry.critical_since = None,
            _ => {}
        }
        let value = match status {
            None => -1,
            Some(Status::Critical) => 0,
            Some(Status::Passing) => 1,
            Some(Status::Warning) => 2,
        };
        self.metrics.metrics.service_health.get_or_create(&Metrics::service(id)).set(value);
    }
}

/// The health the registry should be told: the probe's, or critical with
/// the episode's reason while the service is flapping.
pub(super) fn effective(entry: &Entry, now: Instant) -> Option<Health> {
    match entry.flap.held(now) {
        Some(ep) => Some(Health::critical(ep.reason())),
        None => entry.health.clone(),
    }
}
