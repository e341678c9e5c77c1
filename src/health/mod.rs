//! Health: grpc.health.v1 probes → health changes. Never talks to a registry.
//!
//! [`probe`] produces raw observations (one per Watch message, per poll, per
//! failure); [`threshold`] turns them into Passing/Critical with rise/fall;
//! [`supervisor`] runs one task per service and reports only changes.

pub mod conn;
pub mod metadata;
pub mod probe;
pub mod rpc;
pub mod supervisor;
pub mod threshold;

use std::fmt;

/// The registry-facing state of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Passing,
    /// Answered NOT_SERVING, with `not_serving = "warning"`: out of the
    /// passing set, never reaped as critical.
    Warning,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status with the reason, as shown in the registry ("SERVING", "connection refused").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: Status,
    pub output: String,
}

impl Health {
    pub fn passing(output: impl Into<String>) -> Self {
        Health { status: Status::Passing, output: output.into() }
    }
    pub fn critical(output: impl Into<String>) -> Self {
        Health { status: Status::Critical, output: output.into() }
    }
}

/// One result of a probe: healthy or not, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub ok: bool,
    pub output: String,
    /// Round trip of a Check, or the wait from opening Watch to its first message.
    pub latency: Option<std::time::Duration>,
}
