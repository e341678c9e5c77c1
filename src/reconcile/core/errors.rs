//! Registry errors by class: a transient one makes the view stale until
//! anti-entropy re-reads it; a permanent one of a write holds only its
//! service (see `written`), and is tried again when credentials change.

use super::{Cause, Core, REMIND_EVERY};
use crate::backoff::jitter;
use crate::registry::{ErrorClass, ErrorKind, RegistryError, View};
use tokio::time::Instant;

impl<V: View> Core<V> {
    /// A credential file of the backend changed (a new ACL token, say): every
    /// refused service is tried again at once.
    pub fn credentials_changed(&mut self, now: Instant) {
        tracing::info!(services = self.refused, "registry credentials changed; trying refused writes again");
        let ids: Vec<String> = self.entries.iter().filter(|(_, e)| e.refused.is_some()).map(|(id, _)| id.clone()).collect();
        for id in ids {
            if let Some(r) = self.entries.get_mut(&id).and_then(|e| e.refused.as_mut()) {
                r.until = now;
            }
            self.reconcile(&id, Cause::Change, now);
        }
    }

    /// The heartbeat lane failed.
    pub fn heartbeat_failed(&mut self, e: RegistryError, now: Instant) {
        if self.stale {
            tracing::debug!(error = %e, "heartbeat failed while re-reading the registry");
            return;
        }
        self.registry_error("heartbeat", e, now);
    }

    /// The view is stale: nothing is queued until anti-entropy, after a
    /// backoff by the error's class, has re-read the registry.
    pub(super) fn registry_error(&mut self, what: &str, e: RegistryError, now: Instant) {
        let class = e.kind.class();
        let delay = match class {
            ErrorClass::Transient => self.retry.next_delay(),
            ErrorClass::Permanent => self.retry_refused.next_delay(),
        };
        self.stale = true;
        self.sync_due = false;
        self.queue.clear();
        self.in_sync_report = None;
        self.next_anti_entropy = now + jitter(delay);
        let retry_in = humantime::format_duration(delay).to_string();
        match (e.kind, class) {
            (ErrorKind::Missing, _) => tracing::warn!(error = %e, "{what}: registry lost tether's records; re-registering"),
            (_, ErrorClass::Transient) => tracing::warn!(error = %e, retry_in = %retry_in, "{what} failed"),
            (_, ErrorClass::Permanent) => {
                // Said once, then reminded at most every few minutes.
                if self.refused_warned.is_none_or(|t| now >= t + REMIND_EVERY) {
                    self.refused_warned = Some(now);
                    tracing::warn!(error = %e, retry_in = %retry_in, "{what} refused by the registry; retrying with backoff");
                } else {
                    tracing::debug!(error = %e, retry_in = %retry_in, "{what} refused by the registry");
                }
            }
        }
        self.out.backend = Some(Some(format!("{what}: {e} ({})", class.as_str())));
    }
}
