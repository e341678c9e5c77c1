//! File-system events on the services directory → "rescan now".
//!
//! Events are not interpreted beyond where they happened: any event on the
//! services directory or in it, rescan flag or watcher error only wakes the
//! scanner, which reads the whole directory (see [`super::scan`]). The parent
//! directory is watched as well, so a removed and re-created services
//! directory is noticed; [`DirWatcher::refresh`] re-attaches the watch when
//! the directory's identity changes. Events on the parent's other entries (a
//! log file written beside the services directory, say) are ignored.
//!
//! notify's own watcher is used, not a debouncer: the scanner already lets a
//! burst settle ([`DEBOUNCE`]) before it rescans, and notify's debouncers wake
//! up every few milliseconds even when nothing happens (an idle agent must
//! cost nothing).

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long events are gathered before a rescan (by the scanner).
pub const DEBOUNCE: Duration = Duration::from_millis(50);

pub struct DirWatcher {
    watcher: RecommendedWatcher,
    dir: PathBuf,
    /// (device, inode) of the directory currently watched.
    watched: Option<(u64, u64)>,
}

impl DirWatcher {
    /// Start watching `dir` (and its parent); `trigger` is notified on any event.
    pub fn new(dir: &Path, trigger: Arc<Notify>) -> notify::Result<Self> {
        // inotify reports absolute paths: compare (and watch) absolute ones.
        let dir = &std::path::absolute(dir)?;
        let services = dir.to_path_buf();
        let mut watcher = notify::recommended_watcher(move |result: notify::Result<Event>| {
            match &result {
                Err(error) => tracing::warn!(%error, "config directory watcher error; rescanning"),
                // Opening and reading files (our own scans among them) changes
                // nothing; reacting to it would rescan forever.
                Ok(event) if is_read_only(&event.kind) => return,
                Ok(event) if !concerns(event, &services) => return,
                Ok(_) => {}
            }
            trigger.notify_one();
        })?;
        if let Some(parent) = dir.parent().filter(|p| p.exists()) {
            watcher.watch(parent, RecursiveMode::NonRecursive)?;
        }
        let mut w = DirWatcher { watcher, dir: dir.to_path_buf(), watched: None };
        w.refresh();
        Ok(w)
    }

    /// Re-attach the watch if the directory was removed, re-created or replaced.
    pub fn refresh(&mut self) {
        let now = std::fs::metadata(&self.dir).ok().map(|m| (m.dev(), m.ino()));
        if now == self.watched {
            return;
        }
        if self.watched.is_some() {
            let _ = self.watcher.unwatch(&self.dir);
        }
        self.watched = None;
        if now.is_some() {
            match self.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                Ok(()) => self.watched = now,
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch services directory; relying on periodic rescans")
                }
            }
        }
    }
}

/// Access events that cannot change a file's content (open, read, close
/// without write).
fn is_read_only(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(a) if !matches!(a, AccessKind::Close(AccessMode::Write)))
}

/// Whether an event can change what the services directory holds: it names
/// the directory itself or something in it, or names nothing (a rescan flag).
/// The parent's watch also reports its other entries; those are not ours.
fn concerns(event: &Event, dir: &Path) -> bool {
    event.paths.is_empty() || event.need_rescan() || event.paths.iter().any(|p| p.starts_with(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    #[test]
    fn reads_are_ignored_writes_are_not() {
        assert!(is_read_only(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(is_read_only(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(!is_read_only(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(!is_read_only(&EventKind::Modify(ModifyKind::Any)));
        assert!(!is_read_only(&EventKind::Create(CreateKind::File)));
    }

    #[test]
    fn only_events_on_the_services_directory_concern_it() {
        let dir = Path::new("/etc/tether/services.d");
        let event = |path: &str| Event::new(EventKind::Modify(ModifyKind::Any)).add_path(PathBuf::from(path));
        assert!(concerns(&event("/etc/tether/services.d"), dir), "the directory replaced or removed");
        assert!(concerns(&event("/etc/tether/services.d/orders.toml"), dir));
        assert!(!concerns(&event("/etc/tether/tether.toml"), dir), "a sibling in the parent");
        assert!(!concerns(&event("/etc/tether/services.d.bak"), dir), "a sibling sharing the name's prefix");
        assert!(concerns(&Event::new(EventKind::Other), dir), "no path: rescan to be safe");
    }

    /// A relative services directory (`--config tether.toml` with
    /// `services_dir = "services.d"`) is watched as well as an absolute one.
    #[tokio::test]
    async fn a_relative_directory_is_watched() {
        let cwd = std::env::current_dir().unwrap();
        let tmp = tempfile::tempdir_in(&cwd).unwrap();
        let relative = tmp.path().strip_prefix(&cwd).unwrap().join("services.d");
        std::fs::create_dir(&relative).unwrap();
        let trigger = Arc::new(Notify::new());
        let _w = DirWatcher::new(&relative, trigger.clone()).unwrap();
        std::fs::write(relative.join("a.toml"), "name = \"a\"\n").unwrap();
        tokio::time::timeout(Duration::from_secs(10), trigger.notified()).await.expect("the new file is noticed");
    }
}
