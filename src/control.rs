//! The control socket: `tether drain` and `tether undrain` → the running
//! agent's reconciler.
//!
//! A Unix socket in the runtime directory (`tether.sock`, or
//! `tether@<instance>.sock`), mode 0660: only the agent's user and group may
//! change what the registry says. Read-only status stays on the loopback HTTP
//! listener. One JSON request line, one JSON response line per connection.
//!
//! Drains are kept in a file beside the identity lock ([`DrainFile`]), so a
//! drained service stays drained across a restart of tether (a crash, an
//! upgrade), though not across a reboot: the runtime directory is a tmpfs.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Take services out of the healthy set (all current ones with `all`).
    Drain { ids: Vec<String>, all: bool },
    /// Put them back.
    Undrain { ids: Vec<String>, all: bool },
    /// Where draining stands, for `--wait`.
    State { ids: Vec<String>, all: bool },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// Set when nothing was changed.
    pub error: Option<String>,
    pub services: Vec<DrainState>,
    /// Done, but with a caveat (the drains could not be kept on disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrainState {
    pub id: String,
    pub drained: bool,
    /// The registry shows it (as far as tether knows: its last write succeeded).
    pub applied: bool,
}

/// A request on its way to the reconciler, with where to answer.
pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Serve the socket until `shutdown`; the caller holds the identity lock, so
/// a socket file already there is a dead agent's and is replaced.
pub async fn serve(path: PathBuf, commands: mpsc::Sender<Command>, shutdown: CancellationToken) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        anyhow::bail!(
            "{} belongs to another running agent (another identity or registry in the same runtime directory); give each agent its own runtime_dir or instance",
            path.display()
        );
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    }
    tracing::info!(socket = %path.display(), "control socket up (drain, undrain)");
    let done = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = done.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => { tracing::warn!(error = %e, "control socket accept failed"); continue }
                },
            };
            let commands = commands.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read).take(64 * 1024);
                let response = match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await {
                    Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                        Ok(request) => ask(&commands, request).await,
                        Err(e) => Response { error: Some(format!("bad request: {e}")), ..Response::default() },
                    },
                    _ => return,
                };
                let mut out = serde_json::to_string(&response).expect("serializable");
                out.push('\n');
                let _ = write.write_all(out.as_bytes()).await;
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn ask(commands: &mpsc::Sender<Command>, request: Request) -> Response {
    let (reply, answer) = oneshot::channel();
    let gone = || Response { error: Some("the agent is shutting down".into()), ..Response::default() };
    if commands.send(Command { request, reply }).await.is_err() {
        return gone();
    }
    answer.await.unwrap_or_else(|_| gone())
}

/// Send one request to the agent at `socket` (blocking; for the CLI).
pub fn request(socket: &Path, request: &Request) -> Result<Response, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!("cannot reach the running agent at {}: {e} (is it running, with this --config/--instance?)", socket.display())
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut line = serde_json::to_string(request).expect("serializable");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(|e| format!("{}: {e}", socket.display()))?;
    serde_json::from_str(&answer).map_err(|e| format!("{}: bad answer {answer:?}: {e}", socket.display()))
}

/// The drained service ids of one identity, in
/// `<runtime_dir>/<identity>-<registry hash>.drained`, beside the identity
/// lock and named like it ([`crate::identity::lock_path`]; a JSON array).
/// The reconciler is its only user: it reads it once at start and, after a
/// request or a new set of services changed it, rewrites it once
/// ([`DrainFile::save`]: a few bytes on a tmpfs, written to a temporary file
/// and renamed).
#[derive(Debug)]
pub struct DrainFile {
    path: PathBuf,
    ids: BTreeSet<String>,
    /// Changed since the last save.
    dirty: bool,
}

impl DrainFile {
    /// Read the drains left by an earlier run of this identity. A missing file
    /// means none; an unreadable one is reported and treated as none.
    pub fn load(path: PathBuf) -> Self {
        let ids = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            read => read.map_err(|e| e.to_string()).and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string())),
        };
        let ids = ids.unwrap_or_else(|error| {
            tracing::warn!(file = %path.display(), %error, "cannot read the kept drains; starting with none drained");
            BTreeSet::new()
        });
        DrainFile { path, ids, dirty: false }
    }

    /// Upgrade from an older tether, which named the file with std's
    /// `DefaultHasher` ([`crate::identity::legacy_lock_path`]): if a file is at
    /// `legacy` and none at `path`, move it there (one rename: the drains read,
    /// written under the new name and gone from the old in one step). Should
    /// both exist (a downgrade, then an upgrade again) the newer one is kept.
    /// Either way nothing is left at `legacy`. Called before [`DrainFile::load`],
    /// with the identity lock held.
    pub fn adopt_legacy(legacy: &Path, path: &Path) {
        let Ok(old) = std::fs::metadata(legacy) else { return };
        if legacy == path {
            return;
        }
        let newer = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(_) => false,
            Ok(new) => matches!((old.modified(), new.modified()), (Ok(o), Ok(n)) if o > n),
        };
        let done = if newer { std::fs::rename(legacy, path) } else { std::fs::remove_file(legacy) };
        match done {
            Ok(()) if newer => tracing::info!(from = %legacy.display(), to = %path.display(), "kept drains moved to their new file name"),
            Ok(()) => tracing::info!(file = %legacy.display(), "older kept drains removed (the file under the new name is newer)"),
            Err(e) => {
                tracing::warn!(file = %legacy.display(), error = %e, "cannot move the drains an older tether kept; they are not read")
            }
        }
    }

    #[cfg(test)]
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// The drained ids.
    pub fn ids(&self) -> &BTreeSet<String> {
        &self.ids
    }

    /// Record exactly `ids` as drained (kept by the next [`DrainFile::save`]).
    pub fn replace(&mut self, ids: BTreeSet<String>) {
        self.dirty |= self.ids != ids;
        self.ids = ids;
    }

    /// Record `id` as drained or not (kept by the next [`DrainFile::save`]).
    #[cfg(test)]
    pub fn set(&mut self, id: &str, drained: bool) {
        self.dirty |= if drained { self.ids.insert(id.to_string()) } else { self.ids.remove(id) };
    }

    /// Forget the drains of services that no longer exist (their files went
    /// while tether was not running).
    #[cfg(test)]
    pub fn retain(&mut self, exists: impl Fn(&str) -> bool) {
        let before = self.ids.len();
        self.ids.retain(|id| exists(id));
        self.dirty |= self.ids.len() != before;
    }

    /// Rewrite the file if anything changed since the last save. A failed
    /// write is logged, returned (for the request that made the change) and
    /// tried again by the next save: the drains hold until tether restarts.
    pub fn save(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.dirty) {
            return Ok(());
        }
        let tmp = self.path.with_extension("drained.tmp");
        let json = serde_json::to_vec(&self.ids).expect("a set of strings serializes");
        std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &self.path)).map_err(|e| {
            self.dirty = true;
            tracing::warn!(file = %self.path.display(), error = %e, "cannot keep the drains on disk; they hold until tether restarts");
            format!("cannot keep the drains in {}: {e}; they hold until tether restarts", self.path.display())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DrainFile;

    #[test]
    fn drains_kept_under_the_legacy_name_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let (legacy, path) = (dir.path().join("node-a-292b0a86b95d622f.drained"), dir.path().join("node-a-ea05b11a00d198d5.drained"));
        DrainFile::adopt_legacy(&legacy, &path);
        assert!(!path.exists(), "nothing to adopt: nothing written");

        // An older tether left its drains: they are read under the new name.
        std::fs::write(&legacy, r#"["alpha"]"#).unwrap();
        DrainFile::adopt_legacy(&legacy, &path);
        assert!(!legacy.exists(), "the legacy file is gone");
        let d = DrainFile::load(path.clone());
        assert!(d.contains("alpha") && !d.contains("beta"));

        // Both (an older tether ran again in between): the newer one wins.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::write(&legacy, r#"["beta"]"#).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        DrainFile::adopt_legacy(&legacy, &path);
        assert!(!legacy.exists());
        assert!(DrainFile::load(path.clone()).contains("beta"), "the legacy file was newer");
        std::fs::write(&legacy, r#"["gamma"]"#).unwrap();
        std::fs::File::options().write(true).open(&legacy).unwrap().set_modified(old).unwrap();
        DrainFile::adopt_legacy(&legacy, &path);
        assert!(!legacy.exists(), "an older legacy file is removed");
        let d = DrainFile::load(path);
        assert!(d.contains("beta") && !d.contains("gamma"), "the new file was newer");
    }

    #[test]
    fn drains_survive_a_reload_of_the_file_and_garbage_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.drained");
        let mut d = DrainFile::load(path.clone());
        assert!(!d.contains("a"), "no file: nothing drained");
        d.set("a", true);
        d.set("b", true);
        d.set("b", false);
        d.set("gone", true);
        d.save().unwrap();
        let mut d = DrainFile::load(path.clone());
        assert!(d.contains("a") && !d.contains("b") && d.contains("gone"));
        d.retain(|id| id != "gone");
        d.save().unwrap();
        let d = DrainFile::load(path.clone());
        assert!(d.contains("a") && !d.contains("gone"), "a service gone while tether was down loses its drain");
        std::fs::write(&path, "not json").unwrap();
        assert!(!DrainFile::load(path).contains("a"), "an unreadable file: nothing drained");
    }

    #[test]
    fn a_failed_save_says_why_and_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut d = DrainFile::load(run.join("agent.drained"));
        d.set("a", true);
        let e = d.save().unwrap_err();
        assert!(e.contains("cannot keep the drains") && e.contains("agent.drained"), "{e}");
        std::fs::create_dir(&run).unwrap();
        d.save().unwrap();
        assert!(DrainFile::load(run.join("agent.drained")).contains("a"), "the next save wrote it");
    }
}
