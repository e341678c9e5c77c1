//! Python peers: the reference Python health servicer (grpcio-health-checking's
//! sync `HealthServicer` on a sync `grpc.server`, tests/python/health_server.py)
//! run by the venv scripts/install-deps.sh makes, and a fresh `Check` from
//! another client (`tether check`) with a bounded wait.

use super::{root, tether_bin};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long a status change may take before the Python server counts as wedged.
pub const PY_SET_LIMIT: Duration = Duration::from_secs(10);

/// The venv's Python (grpcio and grpcio-health-checking installed).
pub fn python_bin() -> PathBuf {
    let p = root().join(".tools/venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-deps.sh (it creates the venv with grpcio and grpcio-health-checking)",
        p.display()
    );
    p
}

/// tests/python/health_server.py as a child process, driven on stdin.
pub struct PyHealthServer {
    child: Child,
    stdin: ChildStdin,
    /// Its stdout lines, read on a thread (so every wait can have a deadline).
    lines: Receiver<String>,
    /// Set once a status change timed out: its late `ok` would answer the next one.
    wedged: Option<String>,
    pub port: u16,
    /// Its stderr: Python's tracebacks, and every thread's stack while a set() is stuck.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PyHealthServer {
    /// Serve grpc.health.v1 for "" and `services`, all SERVING, on a free port.
    pub fn start(services: &[String]) -> PyHealthServer {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("health_server.py.log");
        let mut child = Command::new(python_bin())
            .arg(root().join("tests/python/health_server.py"))
            .arg("0")
            .args(services)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start tests/python/health_server.py: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut server = PyHealthServer { child, stdin, lines, wedged: None, port: 0, log, _dir: dir };
        let first = server.lines.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|e| {
            panic!("the Python health server did not say where it listens ({e:?}); its stderr:\n{}", server.log_text())
        });
        server.port = first
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the Python health server said {first:?}; its stderr:\n{}", server.log_text()));
        server
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// "serving" or "not_serving" for every service and "": Ok once every
    /// `HealthServicer.set()` returned, Err if they did not within
    /// [`PY_SET_LIMIT`] (the server is wedged; every later call fails too).
    pub fn set(&mut self, status: &str) -> Result<Duration, String> {
        if let Some(why) = &self.wedged {
            return Err(format!("the Python health server is already wedged: {why}"));
        }
        let start = Instant::now();
        writeln!(self.stdin, "{status}").and_then(|_| self.stdin.flush()).map_err(|e| format!("writing {status:?} to its stdin: {e}"))?;
        let answer = match self.lines.recv_timeout(PY_SET_LIMIT) {
            Ok(line) if line == "ok" => return Ok(start.elapsed()),
            Ok(line) => format!("it answered {line:?} to {status:?}"),
            Err(RecvTimeoutError::Timeout) => format!("set({status}) did not return within {PY_SET_LIMIT:?}"),
            Err(RecvTimeoutError::Disconnected) => format!("it exited ({:?}) before answering {status:?}", self.child.try_wait()),
        };
        self.wedged = Some(answer.clone());
        Err(answer)
    }

    /// Every Python thread's stack, now (faulthandler on SIGUSR1; works even
    /// while the threads are deadlocked): what its stderr gained meanwhile.
    pub fn thread_dump(&self) -> String {
        let old = self.log_text();
        let before = old.matches("Thread 0x").count();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).is_ok() {
            // Wait (up to 5 s) for a new dump, then until it stops growing:
            // faulthandler writes it thread by thread.
            let until = Instant::now() + Duration::from_secs(5);
            let mut last = String::new();
            while Instant::now() < until {
                let now = self.log_text();
                if now.matches("Thread 0x").count() > before && now == last {
                    break;
                }
                last = now;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let now = self.log_text();
        now.get(old.len()..).filter(|_| now.starts_with(&old)).unwrap_or(&now).to_string()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PyHealthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One fresh `grpc.health.v1.Health/Check` from another client (`tether check`,
/// its own process and connection) that must answer within `limit`; the
/// process is killed then. Ok(how long it took) for any answer (SERVING or
/// not: exit 0 or 4); Err(what happened) otherwise.
pub fn fresh_check(addr: &str, service: &str, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut child = Command::new(tether_bin())
        .args(["check", addr, "--service", service, "--timeout"])
        .arg(format!("{}ms", limit.as_millis()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start tether check: {e}"))?;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("tether check: {e}"))? {
            let took = start.elapsed();
            let out = child.wait_with_output().map_err(|e| format!("tether check: {e}"))?;
            let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return match status.code() {
                Some(0 | 4) if took <= limit => Ok(took),
                Some(0 | 4) => Err(format!("answered only after {took:?}: {}", said.trim())),
                _ => Err(format!("no answer after {took:?} ({status}): {}", said.trim())),
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {limit:?} (killed)"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
