//! Never two owners of one identity.
//!
//! An identity is node + instance against one registry. Two live agents with
//! the same identity would each take the other's registrations for orphans and
//! delete them, so a second one refuses to start, before it writes anything:
//!
//! 1. **On one host**: an exclusive `flock` on `<runtime_dir>/<identity>.lock`.
//!    The kernel drops it when its holder dies, even by SIGKILL, so a restart
//!    after a crash is never refused.
//! 2. **Across hosts** (or runtime directories): the registry. A live agent
//!    heartbeats its liveness record with its run id and a counter (Consul:
//!    the liveness check's output; etcd: the lease of its agent key is kept
//!    alive). A starting agent that finds a record of another run watches it
//!    for one heartbeat period plus a margin: if it moves, another agent is
//!    alive and this one refuses; if it stays still, its owner died, and this
//!    agent adopts what it left (no churn). A record marked stopped (a clean
//!    shutdown that left the services to their TTL) is adopted at once.

use crate::config::AgentConfig;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

/// How long a starting agent watches another run's record at most.
const WATCH_AT_MOST: Duration = Duration::from_secs(60);
/// Margin over one heartbeat period when watching.
const WATCH_MARGIN: Duration = Duration::from_millis(1500);
/// How often the record is read while watching.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// How long to watch another run's record whose heartbeat period is `period`:
/// one period plus a margin (6.5 s at the default ttl of 15 s), at most 60 s.
pub fn watch_window(period: Duration) -> Duration {
    (period + WATCH_MARGIN).min(WATCH_AT_MOST)
}

/// A fresh id for this run of the agent.
pub fn run_id() -> String {
    format!("{:08x}-{}", rand::random::<u32>(), std::process::id())
}

/// The held identity lock; released on drop (or by the kernel on death).
pub struct Lock {
    _file: File,
    pub path: PathBuf,
}

/// Take the identity lock, or say who holds it.
pub fn lock(config: &AgentConfig) -> anyhow::Result<Lock> {
    let dir = config.runtime_dir();
    std::fs::create_dir_all(&dir).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot create the runtime directory {}: {e}; set runtime_dir to a directory tether may write",
            config.path.display(),
            dir.display()
        )
    })?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    config.registry_endpoint().hash(&mut h);
    config.backend.kind().as_str().hash(&mut h);
    let path = dir.join(format!("{}-{:016x}.lock", config.owner().label(), h.finish()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open the identity lock {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            use std::io::Write;
            let _ = file.set_len(0);
            let _ = writeln!(&file, "{}", std::process::id());
            Ok(Lock { _file: file, path })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(refusal(config, &format!("process {} holds the identity lock {}", holder.trim(), path.display())))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}

/// The one error a refused agent reports.
pub fn refusal(config: &AgentConfig, why: &str) -> anyhow::Error {
    let owner = config.owner();
    let instance = match &owner.instance {
        None => "no instance".to_string(),
        Some(i) => format!("instance {i:?}"),
    };
    anyhow::anyhow!(
        "another tether is already running as node {:?} ({instance}) against {} ({why}); refusing to start, nothing was changed. \
         Give each agent its own identity: set `instance` in {} or run with --instance NAME",
        owner.node,
        config.registry_endpoint(),
        config.path.display()
    )
}
