//! The rules: what the registry should hold for a service, the write that
//! would make it so, and what it holds after a write. Pure functions of the
//! entry, the backend's [`View`] and `now`.

use super::{Core, Desired, Entry, Remote, FIRST_RESULT_GRACE, WAITING};
use crate::health::{Health, Status};
use crate::registry::{View, Write};
use tokio::time::Instant;

impl<V: View> Core<V> {
    /// What the registry should hold for an entry.
    pub(super) fn desired(&self, entry: &Entry, now: Instant) -> Desired {
        // A registry that drops critical records drops drained ones too.
        if entry.drained && !self.view.keeps_critical() {
            return Desired::Absent;
        }
        let known = super::health::effective(entry, now).or_else(|| entry.remote.as_ref().and_then(|r| r.health.clone()));
        let health = match known {
            Some(h) => h,
            None if now >= entry.added + entry.spec.first_result_within() + FIRST_RESULT_GRACE => Health::critical(WAITING),
            None => return Desired::Undecided,
        };
        // A registry that drops critical records drops warning ones too.
        if health.status != Status::Passing && !self.view.keeps_critical() {
            return Desired::Absent;
        }
        // Only critical counts towards deregistration, never warning.
        if health.status == Status::Critical && entry.critical_since.is_some_and(|t| now >= t + entry.spec.deregister_critical_after) {
            return Desired::Absent;
        }
        // Computed afresh: it may depend on backend state (etcd's lease).
        Desired::Present { fingerprint: self.view.fingerprint(&entry.spec), health, maintenance: entry.drained }
    }

    /// The write that would make the registry hold the desired view of one
    /// service, if any.
    pub(super) fn needed_write(&self, entry: &Entry, now: Instant) -> Option<Write> {
        let spec = entry.spec.clone();
        let id = spec.id.clone();
        match (self.desired(entry, now), &entry.remote) {
            (Desired::Undecided, _) | (Desired::Absent, None) => None,
            (Desired::Absent, Some(_)) => Some(Write::Deregister { id, name: spec.name.clone() }),
            (Desired::Present { health, maintenance, .. }, None) => Some(Write::Register { spec, health, maintenance }),
            (Desired::Present { fingerprint, health, maintenance }, Some(r)) if fingerprint != r.fingerprint => {
                Some(Write::Register { spec, health, maintenance })
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
}

/// What the registry holds after `w` succeeded on `remote`, as the backend's
/// [`View::written`] says (Consul writes a new critical status and its
/// reason apart: the reason is then the next write of that service).
pub(super) fn after_write<V: View>(view: &V, w: &Write, remote: Option<Remote>) -> Option<Remote> {
    match w {
        Write::Deregister { .. } => None,
        // A registration replaces every check, maintenance included.
        Write::Register { spec, health, maintenance } => {
            Some(Remote { fingerprint: view.fingerprint(spec), health: Some(view.written(None, health)), maintenance: *maintenance })
        }
        Write::Maintenance { on, .. } => remote.map(|r| Remote { maintenance: *on, ..r }),
        Write::Health { health, was, .. } => remote.map(|r| Remote { health: Some(view.written(*was, health)), ..r }),
    }
}

/// Equal for the registry's purposes: a passing record needs no particular
/// output (Consul takes none at registration); a critical one carries its reason.
pub(super) fn same_health(desired: &Health, remote: Option<&Health>) -> bool {
    remote.is_some_and(|r| r.status == desired.status && (desired.status == Status::Passing || r.output == desired.output))
}

/// One line per successful write that changes what consumers see.
pub(super) fn log_written(w: &Write, keeps_critical: bool) {
    let id = w.id();
    match w {
        Write::Deregister { .. } => {
            let why = if keeps_critical { "critical for longer than deregister_critical_after" } else { "not passing" };
            tracing::info!(service = %id, reason = why, "deregistered");
        }
        Write::Register { health, .. } => tracing::info!(service = %id, status = %health.status, "registered"),
        Write::Maintenance { on, .. } => {
            tracing::info!(service = %id, "{}", if *on { "drained (maintenance on)" } else { "undrained (maintenance off)" })
        }
        Write::Health { health, .. } => tracing::debug!(service = %id, status = %health.status, "health written"),
    }
}
