//! The status snapshot served as JSON at `GET /v1/status` and printed by `tether status`.

use serde::{Deserialize, Serialize};
use std::time::SystemTime;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub version: String,
    pub ready: bool,
    pub backend: BackendStatus,
    pub services: Vec<ServiceStatus>,
    /// Configuration problems found by the last scan.
    pub config_errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub kind: String,
    pub endpoint: String,
    /// Whether the last registry operation succeeded.
    pub connected: bool,
    pub last_error: Option<String>,
    pub last_heartbeat: Option<String>,
    pub last_anti_entropy: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub id: String,
    pub name: String,
    pub file: String,
    /// "passing", "critical" or "unknown".
    pub health: String,
    pub output: String,
    /// When the health last changed (RFC 3339).
    pub since: Option<String>,
    /// Whether the registry holds it (as far as tether knows).
    pub registered: bool,
    pub last_write: Option<String>,
    pub last_heartbeat: Option<String>,
    /// The last registry error of this service's writes, if the last write failed.
    pub last_error: Option<String>,
    /// "transient" (heals by itself: retried in seconds) or "permanent" (a
    /// refusal that needs a person: retried with backoff of minutes).
    #[serde(default)]
    pub error_class: Option<String>,
    /// When its write is tried next (RFC 3339), while it waits after an error.
    #[serde(default)]
    pub next_attempt: Option<String>,
    /// Taken out of the healthy set by `tether drain`.
    #[serde(default)]
    pub drained: bool,
    /// Set while the service is held out of the healthy set for flapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flapping: Option<Flapping>,
    /// Round trip of the last answered probe, in milliseconds (a Watch: the
    /// wait for its first message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_ms: Option<f64>,
}

/// A flapping episode: the service is critical in the registry until it has
/// been SERVING without a break for `hold`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Flapping {
    /// When the episode started (RFC 3339).
    pub since: String,
    /// Health transitions in the detection window when it started.
    pub transitions: u32,
    /// Transitions since then that did not reach the registry.
    pub suppressed: u64,
    /// How long SERVING must last to end it ("10s"; doubled for a repeat episode).
    pub hold: String,
    /// When it ends if the service stays SERVING (RFC 3339); `None` while not SERVING.
    pub until: Option<String>,
}

impl ServiceStatus {
    /// A service `id` (of the service named by the part before its first
    /// `-`) with this health and output, as a fresh status shows it; for tests.
    #[cfg(test)]
    pub(crate) fn example(id: &str, health: &str, output: &str) -> Self {
        ServiceStatus {
            id: id.to_string(),
            name: id.split('-').next().unwrap_or(id).to_string(),
            file: format!("/etc/tether/services.d/{id}.toml"),
            health: health.to_string(),
            output: output.to_string(),
            since: None,
            registered: health == "passing",
            last_write: None,
            last_heartbeat: None,
            last_error: None,
            error_class: None,
            next_attempt: None,
            drained: false,
            flapping: None,
            last_check_ms: None,
        }
    }
}

impl Snapshot {
    pub fn new(node: &str, backend: &str, endpoint: &str) -> Self {
        Snapshot {
            node: node.to_string(),
            instance: None,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: false,
            backend: BackendStatus {
                kind: backend.to_string(),
                endpoint: endpoint.to_string(),
                connected: false,
                last_error: None,
                last_heartbeat: None,
                last_anti_entropy: None,
            },
            services: vec![],
            config_errors: vec![],
        }
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
