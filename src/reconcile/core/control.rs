//! Drain requests and what the task around the core publishes of a service.

use super::{Cause, Core, ErrorClass, WAITING};
use crate::control::{DrainState, Request, Response};
use crate::registry::{View, Write};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::status::{Flapping, ServiceStatus};
use std::time::SystemTime;
use tokio::time::Instant;

impl<V: View> Core<V> {
    /// A drain, undrain or drain-state request.
    pub fn control(&mut self, request: &Request, now: Instant) -> Response {
        let (ids, all) = match request {
            Request::Drain { ids, all } | Request::Undrain { ids, all } | Request::State { ids, all } => (ids.clone(), *all),
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
            return Response { error: Some(error), ..Response::default() };
        }
        let set = match request {
            Request::Drain { .. } => Some(true),
            Request::Undrain { .. } => Some(false),
            Request::State { .. } => None,
        };
        if let Some(on) = set {
            let mut changed = false;
            for id in &targets {
                let entry = self.entries.get_mut(id).expect("checked");
                if entry.drained != on {
                    entry.drained = on;
                    changed = true;
                    if on {
                        self.drained.insert(id.clone());
                    } else {
                        self.drained.remove(id);
                    }
                    tracing::info!(service = %id, "{}", if on { "drain requested" } else { "undrain requested" });
                    self.metrics.metrics.service_drained.get_or_create(&Metrics::service(id)).set(i64::from(on));
                }
                self.reconcile(id, Cause::Change, now);
            }
            // One rewrite per request, however many services it drained.
            if changed {
                self.out.drains = Some(self.drained.clone());
            }
        }
        let services = targets
            .iter()
            .map(|id| {
                let entry = &self.entries[id];
                let applied = !self.stale && !entry.in_flight && self.needed_write(entry, now).is_none();
                DrainState { id: id.clone(), drained: entry.drained, applied }
            })
            .collect();
        Response { error: None, services, warning: None }
    }

    /// One service's status; `wall` is the wall clock at `now`.
    pub fn status(&self, id: &str, now: Instant, wall: SystemTime) -> Option<ServiceStatus> {
        let e = self.entries.get(id)?;
        let effective = super::health::effective(e, now);
        let at = |t: Instant| crate::telemetry::status::rfc3339(wall - now.saturating_duration_since(t));
        let ahead = |t: Instant| crate::telemetry::status::rfc3339(wall + t.saturating_duration_since(now));
        Some(ServiceStatus {
            id: e.spec.id.clone(),
            name: e.spec.name.clone(),
            file: e.spec.file.display().to_string(),
            health: effective.as_ref().map_or("unknown", |h| h.status.as_str()).to_string(),
            output: effective.as_ref().map_or(WAITING.to_string(), |h| h.output.clone()),
            since: e.since.map(at),
            registered: e.remote.is_some(),
            last_write: e.last_write_at.map(at),
            last_heartbeat: None,
            last_error: e.last_error.as_ref().map(|(_, m)| m.clone()),
            error_class: e.last_error.as_ref().map(|(c, _)| c.as_str().to_string()),
            next_attempt: match (&e.refused, &e.last_error) {
                (Some(r), _) => Some(ahead(r.until)),
                (None, Some((ErrorClass::Transient, _))) if self.stale => Some(ahead(self.next_anti_entropy)),
                _ => None,
            },
            drained: e.drained,
            flapping: e.flap.episode.as_ref().map(|ep| Flapping {
                since: at(ep.started),
                transitions: ep.transitions,
                suppressed: ep.suppressed,
                hold: humantime::format_duration(ep.hold).to_string(),
                until: ep.ends_at().map(ahead),
            }),
            last_check_ms: None,
        })
    }

    /// Every service the core knows of, as deregistrations (shutdown's
    /// fallback when the registry cannot be listed).
    pub fn deregistrations(&self) -> Vec<Write> {
        self.entries.values().map(|e| Write::Deregister { id: e.spec.id.clone(), name: e.spec.name.clone() }).collect()
    }

    pub fn services(&self) -> usize {
        self.entries.len()
    }
}
