//! Never two owners of one identity.
//!
//! An identity is node + instance against one registry. Two live agents with
//! the same identity would each take the other's registrations for orphans and
//! delete them, so a second one refuses to start, before it writes anything:
//!
//! 1. **On one host**: an exclusive `flock` on
//!    `<runtime_dir>/<identity>-<registry hash>.lock` ([`lock_path`]). The
//!    kernel drops it when its holder dies, even by SIGKILL, so a restart
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
use std::path::{Path, PathBuf};
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

/// FNV-1a, 64-bit (offset basis `0xcbf29ce484222325`, prime
/// `0x100000001b3`), over `bytes`. Fixed by its definition, unlike std's
/// `DefaultHasher`, whose output may change between Rust releases: it names
/// files that must outlive an upgrade of tether.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The registry part of the identity's file names: [`fnv1a64`] of the UTF-8
/// bytes of `<endpoint>\n<backend>`, where `<endpoint>` is the Consul
/// `address` (without a trailing `/`) or the etcd `endpoints` joined with `,`,
/// and `<backend>` is `Consul` or `etcd`. E.g. `http://127.0.0.1:8500\nConsul`
/// → `ea05b11a00d198d5`.
pub fn registry_hash(config: &AgentConfig) -> u64 {
    fnv1a64(format!("{}\n{}", config.registry_endpoint(), config.backend.kind().as_str()).as_bytes())
}

/// The identity lock: `<runtime_dir>/<identity>-<registry hash>.lock`, the
/// hash ([`registry_hash`]) as 16 lowercase hex digits. The drains are kept
/// beside it, in the same name with `.drained` ([`crate::control::DrainFile`]).
pub fn lock_path(config: &AgentConfig) -> PathBuf {
    config.runtime_dir().join(format!("{}-{:016x}.lock", config.owner().label(), registry_hash(config)))
}

/// LEGACY, for upgrades only: the registry hash that tether used before
/// [`registry_hash`]: std's `DefaultHasher` fed the endpoint and then the
/// backend, exactly as the old code did (so far SipHash-1-3 with zero keys of
/// `<endpoint>\xff<backend>\xff`). Its output is not promised to stay the same, so it
/// only finds the files an older tether left ([`legacy_lock_path`]); nothing
/// is written under it.
fn legacy_registry_hash(config: &AgentConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    config.registry_endpoint().hash(&mut h);
    config.backend.kind().as_str().hash(&mut h);
    h.finish()
}

/// LEGACY: where an older tether kept the identity lock (and, with
/// `.drained`, the drains). See `legacy_registry_hash`.
pub fn legacy_lock_path(config: &AgentConfig) -> PathBuf {
    config.runtime_dir().join(format!("{}-{:016x}.lock", config.owner().label(), legacy_registry_hash(config)))
}

/// The held identity lock; released on drop (or by the kernel on death).
pub struct Lock {
    _file: File,
    pub path: PathBuf,
    /// The lock's name before [`registry_hash`] ([`legacy_lock_path`]): the
    /// drains an older tether kept are beside it.
    pub legacy_path: PathBuf,
}

/// Take the identity lock, or say who holds it. An older tether's lock
/// (under [`legacy_lock_path`]) counts too: if a process holds it this agent
/// refuses; if none does, the stale file is removed.
pub fn lock(config: &AgentConfig) -> anyhow::Result<Lock> {
    let dir = config.runtime_dir();
    std::fs::create_dir_all(&dir).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot create the runtime directory {}: {e}; set runtime_dir to a directory tether may write",
            config.path.display(),
            dir.display()
        )
    })?;
    let path = lock_path(config);
    let legacy_path = legacy_lock_path(config);
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
        }
        Err(std::fs::TryLockError::WouldBlock) => return Err(held(config, &path, "")),
        Err(std::fs::TryLockError::Error(e)) => return Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
    if legacy_path != path {
        if let Ok(legacy) = std::fs::OpenOptions::new().write(true).read(true).open(&legacy_path) {
            match legacy.try_lock() {
                Ok(()) => {
                    let _ = std::fs::remove_file(&legacy_path);
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(held(config, &legacy_path, " (the name an older tether gave it)")),
                Err(std::fs::TryLockError::Error(e)) => {
                    tracing::warn!(file = %legacy_path.display(), error = %e, "cannot check an older tether's identity lock; going on");
                }
            }
        }
    }
    Ok(Lock { _file: file, path, legacy_path })
}

/// The refusal when a live process holds the lock file at `path`.
fn held(config: &AgentConfig, path: &Path, whose: &str) -> anyhow::Error {
    let holder = std::fs::read_to_string(path).unwrap_or_default();
    refusal(config, &format!("process {} holds the identity lock {}{whose}", holder.trim(), path.display()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::agent::parse;

    fn config(dir: &Path, backend: &str) -> AgentConfig {
        let text = format!("node = \"web-1\"\nlisten = \"\"\nruntime_dir = \"{}\"\n{backend}", dir.display());
        parse(&dir.join("tether.toml"), &text).unwrap()
    }

    /// The names must outlive upgrades: a change of these values loses every
    /// kept drain (and the lock's exclusion across the upgrade).
    #[test]
    fn file_names_use_a_fixed_hash() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let dir = Path::new("/run/t");
        let consul = config(dir, "[consul]\naddress = \"http://127.0.0.1:8500/\"\n");
        assert_eq!(fnv1a64(b"http://127.0.0.1:8500\nConsul"), 0xea05_b11a_00d1_98d5);
        assert_eq!(registry_hash(&consul), 0xea05_b11a_00d1_98d5, "the documented input");
        assert_eq!(lock_path(&consul), dir.join("web-1-ea05b11a00d198d5.lock"));
        let etcd = config(dir, "instance = \"blue\"\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\", \"http://127.0.0.1:22379\"]\n");
        assert_eq!(lock_path(&etcd), dir.join("web-1@blue-a79dcec1b2ff4af7.lock"));
    }

    /// The legacy name is std's DefaultHasher as the old code fed it; if a
    /// Rust release changes that hasher, drains an older tether kept are no
    /// longer found, and this test says so.
    /// SipHash-1-3, zero keys, of `http://127.0.0.1:8500\xffConsul\xff`.
    const LEGACY_CONSUL: u64 = 0x292b_0a86_b95d_622f;

    #[test]
    fn legacy_name_is_the_old_default_hasher() {
        let consul = config(Path::new("/run/t"), "[consul]\naddress = \"http://127.0.0.1:8500\"\n");
        assert_eq!(legacy_lock_path(&consul), Path::new("/run/t").join(format!("web-1-{:016x}.lock", LEGACY_CONSUL)));
        assert_ne!(legacy_lock_path(&consul), lock_path(&consul));
    }

    #[test]
    fn an_older_tethers_lock_is_removed_when_free_and_refuses_when_held() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), "[consul]\naddress = \"http://127.0.0.1:8500\"\n");
        std::fs::write(legacy_lock_path(&c), "1\n").unwrap();
        let first = lock(&c).unwrap();
        assert!(first.path.exists() && !first.legacy_path.exists(), "a free legacy lock file is removed");
        drop(first);

        let old = File::create(legacy_lock_path(&c)).unwrap();
        old.try_lock().unwrap();
        let e = lock(&c).err().expect("an older tether holding its lock refuses this one").to_string();
        assert!(e.contains("an older tether") && e.contains("refusing to start"), "{e}");
        drop(old);
        let _lock = lock(&c).unwrap();
        let e = lock(&c).err().expect("two agents under the new name").to_string();
        assert!(e.contains("holds the identity lock"), "{e}");
    }
}
