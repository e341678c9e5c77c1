//! Shared test helpers: real Consul dev agents, real gRPC health servers and
//! the real tether binary, each on free loopback ports, each stopped on drop.

#![allow(dead_code)]

pub mod cluster;
pub use cluster::ConsulCluster;

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

mod python;
pub use python::*;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tool(name: &str) -> PathBuf {
    let p = root().join(".tools/bin").join(name);
    assert!(p.exists(), "{} is missing: run scripts/install-deps.sh", p.display());
    p
}

pub fn tether_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tether"))
}

/// The example health server, built by cargo alongside the tests.
pub fn health_server_bin() -> PathBuf {
    let dir = tether_bin().parent().unwrap().to_path_buf();
    let p = dir.join("examples/health_server");
    assert!(p.exists(), "{} is missing: run `cargo build --examples` (scripts/test.sh does)", p.display());
    p
}

/// Poll `f` every 20 ms until it returns Some, or panic after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_every(limit, Duration::from_millis(20), what, f)
}

/// Poll `f` every `period` until it returns Some, or panic after `limit`.
pub fn wait_every<T>(limit: Duration, period: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(period);
    }
}

/// Run `f`, which asserts what must keep holding, every `period` for
/// `window`: the first look that fails fails the test with `f`'s own message.
pub fn holds_for(window: Duration, period: Duration, mut f: impl FnMut()) {
    let until = Instant::now() + window;
    while Instant::now() < until {
        f();
        std::thread::sleep(period);
    }
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap()
}

/// The master token of test Consul agents started with ACLs (ignored otherwise).
pub const ACL_MASTER: &str = "11111111-2222-3333-4444-555555555555";

/// `-hcl` that turns on ACLs with default deny and [`ACL_MASTER`].
pub fn acl_hcl() -> String {
    format!("acl {{ enabled = true, default_policy = \"deny\", tokens {{ master = \"{ACL_MASTER}\", agent = \"{ACL_MASTER}\" }} }}")
}

/// A Consul dev agent on free loopback ports.
pub struct Consul {
    child: Option<Child>,
    pub http_port: u16,
    ports: [u16; 3],
    log: PathBuf,
    hcl: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Consul {
    pub fn start() -> Consul {
        Self::start_with(free_port(), &[])
    }

    /// Start on a given HTTP port with extra `-hcl` snippets.
    pub fn start_with(http_port: u16, hcl: &[&str]) -> Consul {
        let mut c = Self::unstarted(http_port, hcl);
        c.spawn();
        c
    }

    /// Reserve ports without starting (see `start_now`).
    pub fn unstarted(http_port: u16, hcl: &[&str]) -> Consul {
        let dir = tempfile::tempdir().unwrap();
        Consul {
            child: None,
            http_port,
            ports: [free_port(), free_port(), free_port()],
            log: dir.path().join("consul.log"),
            hcl: hcl.iter().map(|s| s.to_string()).collect(),
            _dir: dir,
        }
    }

    pub fn start_now(&mut self) {
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(tool("consul"))
            .args(["agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-dns-port=-1", "-grpc-port=-1", "-log-level=warn"])
            .arg(format!("-node=test-{}", self.http_port))
            .arg(format!("-http-port={}", self.http_port))
            .arg(format!("-serf-lan-port={}", self.ports[0]))
            .arg(format!("-serf-wan-port={}", self.ports[1]))
            .arg(format!("-server-port={}", self.ports[2]))
            .args(self.hcl.iter().flat_map(|h| ["-hcl".to_string(), h.clone()]))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start consul");
        self.child = Some(child);
        let url = format!("{}/v1/status/leader", self.url());
        wait_for(Duration::from_secs(60), "Consul to elect itself leader", || {
            let r = http().get(&url).header("X-Consul-Token", ACL_MASTER).send().ok()?;
            let body = r.text().ok()?;
            (body.len() > 2).then_some(())
        });
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Stop Consul (dev mode: all state is lost).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restart on the same ports, with empty state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn get(&self, path: &str) -> Value {
        http()
            .get(format!("{}{}", self.url(), path))
            .header("X-Consul-Token", ACL_MASTER)
            .send()
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn get_with_index(&self, path: &str) -> (Value, u64) {
        let r =
            http().get(format!("{}{}", self.url(), path)).header("X-Consul-Token", ACL_MASTER).send().unwrap().error_for_status().unwrap();
        let index = r.headers().get("X-Consul-Index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
        (r.json().unwrap(), index)
    }

    pub fn put(&self, path: &str, body: &Value) -> Value {
        let r = http().put(format!("{}{}", self.url(), path)).header("X-Consul-Token", ACL_MASTER).json(body).send().unwrap();
        r.error_for_status().unwrap().json().unwrap_or(Value::Null)
    }

    /// PUT, `None` on an error status (e.g. while Consul's ACL system starts).
    pub fn try_put(&self, path: &str, body: &Value) -> Option<Value> {
        let r = http().put(format!("{}{}", self.url(), path)).header("X-Consul-Token", ACL_MASTER).json(body).send().ok()?;
        r.error_for_status().ok()?.json().ok()
    }

    pub fn delete(&self, path: &str) {
        http().delete(format!("{}{}", self.url(), path)).header("X-Consul-Token", ACL_MASTER).send().unwrap().error_for_status().unwrap();
    }

    pub fn services(&self) -> HashMap<String, Value> {
        serde_json::from_value(self.get("/v1/agent/services")).unwrap()
    }

    pub fn checks(&self) -> HashMap<String, Value> {
        serde_json::from_value(self.get("/v1/agent/checks")).unwrap()
    }

    /// (status, output) of a check on the local agent.
    pub fn check(&self, check_id: &str) -> Option<(String, String)> {
        let checks = self.checks();
        let c = checks.get(check_id)?;
        Some((c["Status"].as_str()?.to_string(), c["Output"].as_str().unwrap_or("").to_string()))
    }

    /// (status, output) of a service's gRPC health as tether writes it: its
    /// `tether:<id>` check, there only while it is not passing; else the
    /// status of its alias check (passing while tether is alive), with no
    /// output.
    pub fn health(&self, id: &str) -> Option<(String, String)> {
        let checks = self.checks();
        if let Some(c) = checks.get(&format!("tether:{id}")) {
            return Some((c["Status"].as_str()?.to_string(), c["Output"].as_str().unwrap_or("").to_string()));
        }
        Some((checks.get(&format!("tether-alive:{id}"))?["Status"].as_str()?.to_string(), String::new()))
    }

    /// Whether service `id` is passing in `checks` (from [`Consul::checks`]):
    /// its alias check there and passing, no health check (added only while
    /// it is not passing). For counting many services with one read.
    pub fn passing_in(checks: &HashMap<String, Value>, id: &str) -> bool {
        checks.get(&format!("tether-alive:{id}")).is_some_and(|c| c["Status"] == "passing") && !checks.contains_key(&format!("tether:{id}"))
    }

    /// The aggregated status of a service: critical if any of its checks is.
    pub fn service_status(&self, id: &str) -> Option<String> {
        let checks = self.checks();
        let mine: Vec<&Value> = checks.values().filter(|c| c["ServiceID"] == id).collect();
        if mine.is_empty() {
            return None;
        }
        let worst = if mine.iter().any(|c| c["Status"] == "critical") {
            "critical"
        } else if mine.iter().all(|c| c["Status"] == "passing") {
            "passing"
        } else {
            "warning"
        };
        Some(worst.to_string())
    }

    /// Wait until `id`'s health (see [`Consul::health`]) is `status`; a
    /// critical one also with its reason, which tether writes right after
    /// the status (Consul takes no output at check registration).
    pub fn wait_health(&self, id: &str, status: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        wait_for(limit, &format!("{id}'s gRPC health check to be {status}"), || {
            let (s, output) = self.health(id)?;
            (s == status && (status != "critical" || !output.is_empty())).then_some(())
        });
        start.elapsed()
    }

    pub fn wait_gone(&self, id: &str, limit: Duration) {
        wait_for(limit, &format!("{id} to be deregistered"), || (!self.services().contains_key(id)).then_some(()));
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The example gRPC server (tonic-health) as a child process, driven on stdin.
/// Start a server driven on stdin that prints `listening on ADDR` first (the
/// example health server and the Go one): the child, its pipes and its port.
fn spawn_driven(cmd: &mut Command, what: &str) -> (Child, ChildStdin, BufReader<ChildStdout>, u16) {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{what} said {line:?}"));
    (child, stdin, stdout, port)
}

/// Send a status line to a driven server; returns once it answered "ok".
fn set_driven(stdin: &mut ChildStdin, stdout: &mut BufReader<ChildStdout>, status: &str) {
    writeln!(stdin, "{status}").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ok");
}

pub struct HealthServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub port: u16,
}

impl HealthServer {
    /// Serve grpc.health.v1 for "" and `services`, all SERVING, on `port` (0 = any).
    pub fn start(port: u16, services: &[&str]) -> HealthServer {
        Self::start_with(port, services, false)
    }

    /// A gRPC server without any health service.
    pub fn start_without_health(port: u16) -> HealthServer {
        Self::start_with(port, &[], true)
    }

    fn start_with(port: u16, services: &[&str], no_health: bool) -> HealthServer {
        let mut cmd = Command::new(health_server_bin());
        cmd.arg(format!("127.0.0.1:{port}")).args(services);
        if no_health {
            cmd.arg("--no-health");
        }
        let (child, stdin, stdout, port) = spawn_driven(cmd.stderr(Stdio::null()), "health server");
        HealthServer { child, stdin, stdout, port }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// "serving", "not_serving" or "unknown"; returns once the server applied it.
    pub fn set(&mut self, status: &str) {
        set_driven(&mut self.stdin, &mut self.stdout, status);
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Graceful stop: NOT_SERVING, then shutdown; waits for the process to exit.
    pub fn stop_gracefully(&mut self, limit: Duration) -> bool {
        let _ = writeln!(self.stdin, "stop");
        let _ = self.stdin.flush();
        wait_for(limit, "health server to exit", || self.child.try_wait().ok().flatten().map(|_| true))
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGCONT);
        self.kill();
    }
}

/// A tether config directory: tether.toml plus services.d/.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn consul(consul: &Consul, extra: &str) -> Setup {
        Self::consul_at(&consul.url(), extra)
    }

    /// A setup for the Consul agent at `url` (e.g. behind a [`SlowProxy`]).
    pub fn consul_at(url: &str, extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("services.d")).unwrap();
        let text = format!("services_dir = \"services.d\"\nnode = \"node-a\"\nlisten = \"\"\n{extra}\n[consul]\naddress = \"{url}\"\n");
        std::fs::write(dir.path().join("tether.toml"), text).unwrap();
        Setup { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("tether.toml")
    }

    /// With its status and metrics listener on `port` (setups start with it off).
    pub fn listening(self, port: u16) -> Setup {
        let config = std::fs::read_to_string(self.config()).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
        std::fs::write(self.config(), config).unwrap();
        self
    }

    pub fn services_dir(&self) -> PathBuf {
        self.dir.path().join("services.d")
    }

    /// Write a service file atomically (write + rename, as editors do).
    pub fn write_service(&self, file: &str, text: &str) -> PathBuf {
        let path = self.services_dir().join(file);
        let tmp = self.services_dir().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    pub fn start(&self) -> Tether {
        Tether::start(&self.config(), self.dir.path())
    }

    /// Start with extra environment variables.
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Tether {
        let mut t =
            Tether { child: None, log: self.dir.path().join(format!("tether-{}.log", free_port())), config: self.config(), env: vec![] };
        t.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        t.spawn();
        t
    }
}

/// A running `tether run`.
pub struct Tether {
    child: Option<Child>,
    pub log: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Tether {
    pub fn start(config: &Path, dir: &Path) -> Tether {
        let log = dir.join(format!("tether-{}.log", free_port()));
        let mut t = Tether { child: None, log, config: config.to_path_buf(), env: vec![] };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let f = std::fs::File::create(&self.log).unwrap();
        let child = Command::new(tether_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,tether=debug")
            // The identity lock and the control socket: per test, as systemd's RuntimeDirectory= would.
            .env("RUNTIME_DIRECTORY", self.config.parent().unwrap().join("run"))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start tether");
        self.child = Some(child);
    }

    /// Wait up to `limit` for the process to exit by itself; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut().expect("started");
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The runtime directory it was given (identity lock, control socket).
    pub fn runtime_dir(&self) -> PathBuf {
        self.env
            .iter()
            .find(|(k, _)| k == "RUNTIME_DIRECTORY")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| self.config.parent().unwrap().join("run"))
    }

    /// Run a `tether` CLI command against this agent (same config and runtime directory).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(tether_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUNTIME_DIRECTORY", self.runtime_dir())
            .output()
            .expect("run tether")
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().unwrap();
        let status = wait_for(Duration::from_secs(20), "tether to exit after SIGTERM", || child.try_wait().unwrap());
        assert!(status.success(), "tether exited with {status}; log:\n{}", self.log());
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again with the same config (after stop or kill).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, limit: Duration) {
        wait_for(limit, &format!("tether to log {needle:?}"), || self.log().contains(needle).then_some(()));
    }
}

impl Drop for Tether {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One etcd member (or a single-node cluster) on free loopback ports.
pub struct EtcdMember {
    child: Option<Child>,
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data: PathBuf,
    cluster: String,
    token: String,
    log: PathBuf,
    tls: Option<(String, String, String)>,
}

/// An etcd cluster of one or more members.
pub struct Etcd {
    pub members: Vec<EtcdMember>,
    /// (ca, cert, key) when clients must use mTLS.
    tls: Option<(String, String, String)>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start(n: usize) -> Etcd {
        Self::start_with(n, None)
    }

    /// A single member whose client port requires mTLS with the PKI's certificates.
    pub fn start_mtls(pki: &Pki) -> Etcd {
        Self::start_with(1, Some((pki.path("ca.pem"), pki.path("server.pem"), pki.path("server-key.pem"))))
    }

    fn start_with(n: usize, tls: Option<(String, String, String)>) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let token = format!("t{}", free_port());
        let mut members: Vec<EtcdMember> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| EtcdMember {
                child: None,
                name: format!("m{i}"),
                client_port: *c,
                peer_port: *p,
                data: dir.path().join(format!("m{i}")),
                cluster: cluster.clone(),
                token: token.clone(),
                log: dir.path().join(format!("m{i}.log")),
                tls: tls.clone(),
            })
            .collect();
        for m in members.iter_mut() {
            m.spawn();
        }
        let etcd = Etcd { members, tls, _dir: dir };
        wait_for(Duration::from_secs(60), "etcd to become healthy", || etcd.ctl_ok(&["endpoint", "health"]).then_some(()));
        etcd
    }

    fn scheme(&self) -> &str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port)).collect()
    }

    /// Endpoints of running members only, for etcdctl.
    fn live_endpoints(&self) -> String {
        let live = self.members.iter().filter(|m| m.child.is_some());
        live.map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port)).collect::<Vec<_>>().join(",")
    }

    fn tls_args(&self) -> Vec<String> {
        match &self.tls {
            Some((ca, cert, key)) => vec![format!("--cacert={ca}"), format!("--cert={cert}"), format!("--key={key}")],
            None => vec![],
        }
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(tool("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.live_endpoints()))
            .args(["--command-timeout=5s", "--dial-timeout=2s"])
            .args(self.tls_args())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn ctl_ok(&self, args: &[&str]) -> bool {
        Command::new(tool("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.live_endpoints()))
            .args(["--command-timeout=2s", "--dial-timeout=1s"])
            .args(self.tls_args())
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Every key under `prefix` with its value (parsed as JSON), lease and mod revision.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, Value, i64, i64)> {
        let out: Value = serde_json::from_str(&self.ctl(&["get", "--prefix", prefix, "-w", "json"])).unwrap();
        out["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        let key = String::from_utf8(b64(kv["key"].as_str().unwrap())).unwrap();
                        let value = serde_json::from_slice(&b64(kv["value"].as_str().unwrap())).unwrap_or(Value::Null);
                        (key, value, kv["lease"].as_i64().unwrap_or(0), kv["mod_revision"].as_i64().unwrap_or(0))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn revision(&self) -> i64 {
        let out: Value = serde_json::from_str(&self.ctl(&["get", "nothing-here", "-w", "json"])).unwrap();
        out["header"]["revision"].as_i64().unwrap()
    }

    /// (TTL left, granted TTL) of a lease.
    pub fn lease_ttl(&self, lease: i64) -> (i64, i64) {
        let out: Value = serde_json::from_str(&self.ctl(&["lease", "timetolive", &format!("{lease:x}"), "-w", "json"])).unwrap();
        (out["ttl"].as_i64().unwrap(), out["granted-ttl"].as_i64().unwrap())
    }

    /// Index of the current leader.
    pub fn leader(&self) -> usize {
        wait_for(Duration::from_secs(30), "an etcd leader", || {
            let out: Value = serde_json::from_str(&self.ctl(&["endpoint", "status", "-w", "json"])).ok()?;
            let first = out.as_array()?.first()?;
            let leader = first["Status"]["leader"].as_u64()?;
            let ep = out.as_array()?.iter().find(|s| s["Status"]["header"]["member_id"].as_u64() == Some(leader))?;
            let port: u16 = ep["Endpoint"].as_str()?.rsplit(':').next()?.parse().ok()?;
            self.members.iter().position(|m| m.client_port == port)
        })
    }

    pub fn stop_member(&mut self, i: usize) {
        self.members[i].stop();
    }

    pub fn start_member(&mut self, i: usize) {
        self.members[i].spawn();
    }

    /// Stop a single-node cluster, wipe its data and start it empty.
    pub fn restart_wiped(&mut self) {
        for m in self.members.iter_mut() {
            m.stop();
            let _ = std::fs::remove_dir_all(&m.data);
            m.token = format!("t{}", free_port());
        }
        for m in self.members.iter_mut() {
            m.spawn();
        }
        wait_for(Duration::from_secs(60), "etcd to become healthy", || self.ctl_ok(&["endpoint", "health"]).then_some(()));
    }
}

fn b64(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        buf = (buf << 6) | A.iter().position(|&a| a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}

impl EtcdMember {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let state = if self.data.exists() { "existing" } else { "new" };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let tls: Vec<String> = match &self.tls {
            Some((ca, cert, key)) => vec![
                format!("--trusted-ca-file={ca}"),
                format!("--cert-file={cert}"),
                format!("--key-file={key}"),
                "--client-cert-auth".into(),
            ],
            None => vec![],
        };
        let child = Command::new(tool("etcd"))
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.data.display()))
            .arg(format!("--listen-client-urls={scheme}://127.0.0.1:{}", self.client_port))
            .arg(format!("--advertise-client-urls={scheme}://127.0.0.1:{}", self.client_port))
            .args(tls)
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", self.peer_port))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", self.peer_port))
            .arg(format!("--initial-cluster={}", self.cluster))
            .arg(format!("--initial-cluster-state={state}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            .args(["--heartbeat-interval=50", "--election-timeout=500", "--log-level=warn"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Setup {
    pub fn etcd(etcd: &Etcd, extra: &str) -> Setup {
        Self::etcd_at(&etcd.endpoints(), extra)
    }

    /// A setup for etcd at `endpoints` (e.g. behind a [`SlowProxy`]).
    pub fn etcd_at(endpoints: &[String], extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("services.d")).unwrap();
        let eps = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
        let text = format!("services_dir = \"services.d\"\nnode = \"node-a\"\nlisten = \"\"\n{extra}\n[etcd]\nendpoints = [{eps}]\nprefix = \"services\"\n");
        std::fs::write(dir.path().join("tether.toml"), text).unwrap();
        Setup { dir }
    }
}

/// A throw-away PKI made with rcgen: a CA, a server certificate for
/// localhost/127.0.0.1, a client certificate, and an unrelated CA.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let make_ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            let cert = p.self_signed(&key).unwrap();
            (cert, Issuer::new(p, key))
        };
        let (ca, issuer) = make_ca("tether test CA");
        let (other, _) = make_ca("some other CA");
        write("ca.pem", ca.pem());
        write("other-ca.pem", other.pem());
        for (name, sans) in
            [("server", vec!["localhost".to_string(), "127.0.0.1".to_string()]), ("client", vec!["tether-client".to_string()])]
        {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let cert = p.signed_by(&key, &issuer).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

impl HealthServer {
    /// A TLS server (server.pem); with `mtls`, client certificates from the CA are required.
    pub fn start_tls(pki: &Pki, mtls: bool) -> HealthServer {
        let mut cmd = Command::new(health_server_bin());
        cmd.arg("127.0.0.1:0").args(["--tls-cert", &pki.path("server.pem"), "--tls-key", &pki.path("server-key.pem")]);
        if mtls {
            cmd.args(["--tls-client-ca", &pki.path("ca.pem")]);
        }
        let (child, stdin, stdout, port) = spawn_driven(cmd.stderr(Stdio::null()), "health server");
        HealthServer { child, stdin, stdout, port }
    }
}

// ---------------------------------------------------------------- Go peers

/// A Go program under tests/go/NAME, built offline in GOPATH mode against
/// Debian's grpc-go 1.33 and etcd 3.4 sources (/usr/share/gocode) into
/// `<target>/<profile>/go/NAME`, once, and again when its source is newer.
pub fn go_bin(name: &str) -> PathBuf {
    let src = root().join("tests/go").join(name);
    let out_dir = tether_bin().parent().unwrap().join("go");
    std::fs::create_dir_all(&out_dir).unwrap();
    let bin = out_dir.join(name);
    // One build at a time across the test processes (nextest runs each test in its own).
    let lock = std::fs::File::create(out_dir.join(format!(".{name}.lock"))).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).unwrap();
    let newest_src = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("{}: {e}", src.display()))
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
        .unwrap();
    if std::fs::metadata(&bin).and_then(|m| m.modified()).is_ok_and(|built| built >= newest_src) {
        return bin;
    }
    let go = ["/usr/bin/go", "/usr/lib/go/bin/go"].into_iter().map(PathBuf::from).find(|p| p.exists()).unwrap_or_else(|| {
        panic!("go is missing: run scripts/install-deps.sh (installs golang-go, golang-google-grpc-dev, golang-etcd-server-dev)")
    });
    assert!(
        Path::new("/usr/share/gocode/src/go.etcd.io/etcd/clientv3/naming/resolver").exists()
            && Path::new("/usr/share/gocode/src/google.golang.org/grpc/health").exists(),
        "grpc-go / etcd Go sources are missing under /usr/share/gocode: run scripts/install-deps.sh"
    );
    let tmp = out_dir.join(format!(".{name}.tmp"));
    let started = Instant::now();
    let result = Command::new(go)
        .args(["build", "-o"])
        .arg(&tmp)
        .arg(".")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", out_dir.join("cache"))
        .env("GOFLAGS", "")
        .output()
        .expect("run go build");
    assert!(result.status.success(), "go build of tests/go/{name} failed:\n{}", String::from_utf8_lossy(&result.stderr));
    std::fs::rename(&tmp, &bin).unwrap();
    eprintln!("built {} in {:?}", bin.display(), started.elapsed());
    bin
}

/// Reads a child's stdout lines (JSON objects) on a thread.
struct Lines {
    lines: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Lines {
    fn spawn(out: ChildStdout) -> Lines {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str(&line) {
                    l.lock().unwrap().push(v);
                }
            }
        });
        Lines { lines }
    }
}

/// The grpc-go client (tests/go/etcdclient): dials `etcd:///<target>` with
/// etcd's own resolver and round_robin, calls Health/Check every 2 ms, and
/// reports which backends answered in every 100 ms window.
pub struct GoClient {
    child: Child,
    lines: Lines,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GoClient {
    pub fn start(etcd: &Etcd, target: &str) -> GoClient {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("etcdclient.log");
        let mut child = Command::new(go_bin("etcdclient"))
            .arg(format!("-endpoints={}", etcd.endpoints().join(",")))
            .arg(format!("-target={target}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start etcdclient");
        let lines = Lines::spawn(child.stdout.take().unwrap());
        GoClient { child, lines, log, _dir: dir }
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        self.lines.lines.lock().unwrap().iter().filter(|v| v["event"] == kind).cloned().collect()
    }

    /// Panics (with its stderr) if the client died, e.g. a resolver panic.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("etcdclient exited with {status}:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }

    /// The backends that answered in the latest complete window (its rotation).
    pub fn rotation(&mut self) -> Option<std::collections::BTreeSet<String>> {
        self.assert_alive();
        let w = self.events("window").pop()?;
        Some(w["served"].as_object()?.keys().cloned().collect())
    }

    /// The latest address list from the resolver: (addr, tether's metadata decoded by the Go client).
    pub fn resolved(&mut self) -> Option<Vec<(String, Value)>> {
        self.assert_alive();
        let r = self.events("resolved").pop()?;
        Some(r["addrs"].as_array()?.iter().map(|a| (a["addr"].as_str().unwrap_or("").to_string(), a["metadata"].clone())).collect())
    }

    /// Wait until the client's rotation is exactly `addrs` (two windows in a row).
    pub fn wait_rotation(&mut self, addrs: &[String], limit: Duration) {
        let want: std::collections::BTreeSet<String> = addrs.iter().cloned().collect();
        wait_for(limit, &format!("the Go client's round robin to be exactly {want:?}"), || {
            let windows = self.events("window");
            self.assert_alive();
            let sets: Vec<_> = windows
                .iter()
                .rev()
                .take(2)
                .map(|w| w["served"].as_object().map(|m| m.keys().cloned().collect::<std::collections::BTreeSet<_>>()))
                .collect();
            (sets.len() == 2 && sets.iter().all(|s| s.as_ref() == Some(&want))).then_some(())
        });
    }
}

impl Drop for GoClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A grpc-go server with grpc-go's own health service and default settings
/// (tests/go/healthserver), driven on stdin like [`HealthServer`].
pub struct GoHealthServer {
    child: Child,
    stdin: ChildStdin,
    stdout: Option<BufReader<ChildStdout>>,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GoHealthServer {
    pub fn start() -> GoHealthServer {
        Self::start_with_env(&[])
    }

    /// With a unary auth interceptor accepting `authorization: Bearer <token>`
    /// (see tests/go/healthserver); every authorization value it is sent is
    /// appended to [`GoHealthServer::auth_log`].
    pub fn start_with_auth(token: &str) -> GoHealthServer {
        Self::start_with_env(&[("AUTH_TOKEN", token), ("AUTH_LOG", "auth.log")])
    }

    /// Listening on a Unix socket (`server.sock` in its own directory) instead of TCP.
    pub fn start_unix() -> GoHealthServer {
        Self::start_on(None, &[])
    }

    /// The Unix socket of a server from [`GoHealthServer::start_unix`].
    pub fn socket(&self) -> PathBuf {
        self._dir.path().join("server.sock")
    }

    fn start_with_env(env: &[(&str, &str)]) -> GoHealthServer {
        Self::start_on(Some("127.0.0.1:0"), env)
    }

    fn start_on(addr: Option<&str>, env: &[(&str, &str)]) -> GoHealthServer {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("healthserver.log");
        let mut cmd = Command::new(go_bin("healthserver"));
        for (k, v) in env {
            cmd.env(k, if *k == "AUTH_LOG" { dir.path().join(v).display().to_string() } else { v.to_string() });
        }
        let addr = addr.map_or_else(|| format!("unix://{}", dir.path().join("server.sock").display()), str::to_string);
        cmd.arg(addr).stderr(std::fs::File::create(&log).unwrap());
        let (child, stdin, stdout, port) = spawn_driven(&mut cmd, "Go health server");
        GoHealthServer { child, stdin, stdout: Some(stdout), port, log, _dir: dir }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// "serving" or "not_serving"; returns once the server applied it.
    pub fn set(&mut self, status: &str) {
        set_driven(&mut self.stdin, self.stdout.as_mut().expect("server not stopped"), status);
    }

    /// `health.Shutdown()` then `GracefulStop()`; waits up to `limit` for
    /// GracefulStop to return and gives the time it took, as the server measured it.
    pub fn stop_gracefully(&mut self, limit: Duration) -> Duration {
        writeln!(self.stdin, "stop").unwrap();
        self.stdin.flush().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut stdout = self.stdout.take().expect("server not stopped");
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("GracefulStop did not return within {limit:?}; server log:\n{}", self.server_log()));
        let ms: u64 = line
            .trim()
            .strip_prefix("stopped in ")
            .and_then(|s| s.strip_suffix(" ms"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("Go health server said {line:?}"));
        wait_for(limit, "the Go health server to exit", || self.child.try_wait().ok().flatten());
        Duration::from_millis(ms)
    }

    /// The authorization values unary calls carried, one line each: `METHOD ["VALUE"]`.
    pub fn auth_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("auth.log")).unwrap_or_default()
    }

    /// grpc-go's own log (stderr, verbosity 2).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GoHealthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Consul {
    /// Consul's own log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A loopback TCP proxy that delays every byte by `delay` in both directions
/// (latency without a throughput cap): a slow registry for tests.
pub struct SlowProxy {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowProxy {
    pub fn start(upstream_port: u16, delay: Duration) -> SlowProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream_port)) else { continue };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                            let stopped = stopped.clone();
                            std::thread::spawn(move || pipe_delayed(from, to, delay, stopped));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        SlowProxy { port, stop }
    }
}

/// Copy `from` → `to`, each chunk sent `delay` after it arrived.
fn pipe_delayed(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    delay: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (at, chunk) in rx {
            let due = at + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
