//! A production-shaped Consul on loopback: three servers (`bootstrap_expect =
//! 3`) and two client agents, A and B, each with its own ports, data
//! directory, fixed node id and config file, ACLs on with default deny. tether
//! talks to client agent A; consumers read through client agent B, so what
//! they see has gone through A's anti-entropy, the servers' Raft log and B's
//! RPCs, as in production.
//!
//! Gossip is encrypted with a key of the cluster's own, so that two clusters
//! of parallel tests can never join each other, whatever ports they reuse.

use super::{free_port, tool, ACL_MASTER};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long starting (or restarting) any part of the cluster may take.
const START: Duration = Duration::from_secs(45);

/// One Consul agent process of the cluster.
pub struct ClusterAgent {
    pub name: String,
    pub node_id: String,
    pub http_port: u16,
    serf_lan: u16,
    server_port: u16,
    dir: PathBuf,
    /// In a RefCell so that waits on `&ConsulCluster` can see an agent exit.
    child: RefCell<Option<Child>>,
}

impl ClusterAgent {
    fn new(root: &std::path::Path, name: &str, index: usize) -> ClusterAgent {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        ClusterAgent {
            name: name.to_string(),
            // Fixed per agent, so a restart (with or without its data) is the same node.
            node_id: format!("7e7e7e7e-0000-4000-8000-{index:012}"),
            http_port: free_port(),
            serf_lan: free_port(),
            server_port: free_port(),
            dir,
            child: RefCell::new(None),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("agent.hcl")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("consul.log")
    }

    /// Consul's own log so far (all runs of this agent).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn write_config(&self, server: bool, join: &[String], key: &str) {
        let join = join.iter().map(|j| format!("\"{j}\"")).collect::<Vec<_>>().join(", ");
        let role = if server {
            format!(
                "server = true\nbootstrap_expect = 3\n\
                 acl {{\n  enabled = true\n  default_policy = \"deny\"\n  enable_token_persistence = true\n  \
                 tokens {{\n    master = \"{ACL_MASTER}\"\n    agent = \"{ACL_MASTER}\"\n  }}\n}}\n"
            )
        } else {
            format!(
                "server = false\n\
                 acl {{\n  enabled = true\n  default_policy = \"deny\"\n  enable_token_persistence = true\n  \
                 tokens {{\n    agent = \"{ACL_MASTER}\"\n  }}\n}}\n"
            )
        };
        let text = format!(
            "datacenter = \"dc1\"\nprimary_datacenter = \"dc1\"\n\
             node_name = \"{name}\"\nnode_id = \"{id}\"\ndata_dir = \"{data}\"\n\
             bind_addr = \"127.0.0.1\"\nclient_addr = \"127.0.0.1\"\n\
             encrypt = \"{key}\"\nretry_join = [{join}]\nretry_interval = \"1s\"\n\
             disable_update_check = true\nlog_level = \"info\"\n\
             ports {{\n  http = {http}\n  serf_lan = {lan}\n  serf_wan = {wan}\n  server = {server_port}\n  dns = -1\n  grpc = -1\n}}\n\
             performance {{\n  raft_multiplier = 1\n}}\n{role}",
            name = self.name,
            id = self.node_id,
            data = self.data_dir().display(),
            http = self.http_port,
            lan = self.serf_lan,
            wan = free_port(),
            server_port = self.server_port,
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    fn spawn(&mut self) {
        assert!(!self.running(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(tool("consul"))
            .arg("agent")
            .arg(format!("-config-file={}", self.config_path().display()))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start consul");
        *self.child.get_mut() = Some(child);
    }

    /// Started and not stopped by the test (it may have exited by itself: see [`Self::exited`]).
    fn running(&self) -> bool {
        self.child.borrow().is_some()
    }

    /// Its exit status if it was started and has exited by itself (e.g. a
    /// port of its was taken between `free_port` and its bind).
    fn exited(&self) -> Option<ExitStatus> {
        self.child.borrow_mut().as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL: a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.get_mut().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as `systemctl stop` does (a client agent leaves the cluster
    /// gracefully), then SIGKILL if it is still there after 20 s.
    fn stop(&mut self) {
        let Some(mut c) = self.child.get_mut().take() else { return };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for ClusterAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three Consul servers and client agents A and B on loopback, ACLs on
/// (default deny, the master token [`ACL_MASTER`] for setup and observation).
pub struct ConsulCluster {
    pub servers: Vec<ClusterAgent>,
    /// `[A, B]`.
    pub clients: Vec<ClusterAgent>,
    http: reqwest::blocking::Client,
    policies: std::cell::Cell<usize>,
    _dir: tempfile::TempDir,
}

impl ConsulCluster {
    /// Start all five agents and return once there is a leader, both client
    /// agents see the three servers alive and are nodes of the catalog, and
    /// a write with the master token through each client agent succeeds. If
    /// an agent exits while starting (one of its free ports was taken
    /// meanwhile by another test), the whole cluster starts again on new
    /// ports, up to three times.
    pub fn start() -> ConsulCluster {
        let started = Instant::now();
        for attempt in 1.. {
            let cluster = Self::spawn_all();
            let ready = cluster.wait_until(START, "a leader and both client agents in the cluster", |c| {
                c.leader_now()?;
                c.client_ready(0)?;
                c.client_ready(1)
            });
            match ready {
                Ok(()) => {
                    eprintln!("Consul cluster (3 servers, 2 clients) ready in {:?}", started.elapsed());
                    return cluster;
                }
                Err(e) if attempt < 3 && cluster.all().any(|a| a.exited().is_some()) => {
                    eprintln!("Consul cluster, attempt {attempt}: {e}\nstarting it again on other ports");
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    fn spawn_all() -> ConsulCluster {
        let dir = tempfile::tempdir().unwrap();
        let servers: Vec<ClusterAgent> = (0..3).map(|i| ClusterAgent::new(dir.path(), &format!("server-{i}"), i)).collect();
        let clients = vec![ClusterAgent::new(dir.path(), "client-a", 10), ClusterAgent::new(dir.path(), "client-b", 11)];
        let join: Vec<String> = servers.iter().map(|s| format!("127.0.0.1:{}", s.serf_lan)).collect();
        let key = gossip_key();
        for s in &servers {
            s.write_config(true, &join, &key);
        }
        for c in &clients {
            c.write_config(false, &join, &key);
        }
        let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let mut cluster = ConsulCluster { servers, clients, http, policies: std::cell::Cell::new(0), _dir: dir };
        for a in cluster.servers.iter_mut().chain(cluster.clients.iter_mut()) {
            a.spawn();
        }
        cluster
    }

    fn all(&self) -> impl Iterator<Item = &ClusterAgent> {
        self.servers.iter().chain(&self.clients)
    }

    /// Poll `f` every 50 ms until it returns Some, for at most `limit`; an
    /// agent that exits by itself meanwhile ends the wait at once. The error
    /// says what was awaited, with the end of every agent's log.
    fn wait_until<T>(&self, limit: Duration, what: &str, mut f: impl FnMut(&Self) -> Option<T>) -> Result<T, String> {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            let dead: Vec<String> = self.all().filter_map(|a| a.exited().map(|s| format!("{} ({s})", a.name))).collect();
            if !dead.is_empty() {
                return Err(format!("waiting for {what}: Consul agent exited: {}\n{}", dead.join(", "), self.log_tails()));
            }
            if start.elapsed() > limit {
                return Err(format!("timed out after {limit:?} waiting for {what}\n{}", self.log_tails()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Self::wait_until`], panicking on failure.
    fn wait<T>(&self, limit: Duration, what: &str, f: impl FnMut(&Self) -> Option<T>) -> T {
        self.wait_until(limit, what, f).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn url_a(&self) -> String {
        self.clients[0].url()
    }

    pub fn url_b(&self) -> String {
        self.clients[1].url()
    }

    /// Client agent A's node name in the catalog.
    pub fn node_a(&self) -> &str {
        &self.clients[0].name
    }

    pub fn node_b(&self) -> &str {
        &self.clients[1].name
    }

    fn request(&self, method: reqwest::Method, url: &str, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http.request(method, format!("{url}{path}")).header("X-Consul-Token", ACL_MASTER)
    }

    /// GET with the master token from the agent at `url`; `Err` on any failure
    /// (e.g. "No cluster leader" during an election).
    pub fn try_get(&self, url: &str, path: &str) -> Result<Value, String> {
        self.get_with_index(url, path).map(|(v, _)| v)
    }

    /// GET with the master token; panics on failure.
    pub fn get(&self, url: &str, path: &str) -> Value {
        self.try_get(url, path).unwrap_or_else(|e| panic!("GET {url}{path}: {e}"))
    }

    /// GET with the master token, with Consul's `X-Consul-Index`: for
    /// blocking queries (`?index=N&wait=5s`, wait at most 20 s).
    pub fn get_with_index(&self, url: &str, path: &str) -> Result<(Value, u64), String> {
        let r = self.request(reqwest::Method::GET, url, path).send().map_err(|e| e.to_string())?;
        let status = r.status();
        let index = r.headers().get("X-Consul-Index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
        let text = r.text().map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {}", text.trim()));
        }
        Ok((serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?, index))
    }

    /// PUT with the master token; `Err` on any failure.
    pub fn try_put(&self, url: &str, path: &str, body: &Value) -> Result<Value, String> {
        let r = self.request(reqwest::Method::PUT, url, path).json(body).send().map_err(|e| e.to_string())?;
        let status = r.status();
        let text = r.text().map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {}", text.trim()));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// PUT with the master token; panics on failure.
    pub fn put(&self, url: &str, path: &str, body: &Value) -> Value {
        self.try_put(url, path, body).unwrap_or_else(|e| panic!("PUT {url}{path}: {e}"))
    }

    /// A new ACL policy with `rules` (HCL) and a token with only that
    /// policy; returns the token's SecretID.
    pub fn create_token(&self, rules: &str) -> String {
        let n = self.policies.get() + 1;
        self.policies.set(n);
        let url = self.url_a();
        let name = format!("test-policy-{n}");
        let policy = self.wait(START, "Consul to create an ACL policy", |c| {
            match c.try_put(&url, "/v1/acl/policy", &serde_json::json!({"Name": name, "Rules": rules})) {
                Ok(p) => Some(p),
                // Rules Consul does not accept are the caller's mistake: say so at once.
                Err(e) if e.starts_with("400") => panic!("Consul refused the policy: {e}\n{rules}"),
                Err(_) => None,
            }
        });
        let id = policy["ID"].as_str().unwrap().to_string();
        let token = self.wait(START, "Consul to create an ACL token", |c| {
            c.try_put(&url, "/v1/acl/token", &serde_json::json!({"Description": name, "Policies": [{"ID": id}]})).ok()
        });
        // Client agents resolve a token with a stale read on any server, and
        // cache "ACL not found" for the token TTL (30 s): a token used before
        // every server has it may be refused for that long. Wait for all.
        let accessor = token["AccessorID"].as_str().unwrap();
        for s in self.servers.iter().filter(|s| s.running()) {
            self.wait(START, &format!("{} to know the new ACL token", s.name), |c| {
                c.try_get(&s.url(), &format!("/v1/acl/token/{accessor}?stale")).ok()
            });
        }
        token["SecretID"].as_str().unwrap().to_string()
    }

    /// The index of the current leader among `servers`: waits until every
    /// running server names the same leader, and that leader is running.
    pub fn leader(&self) -> usize {
        self.wait(START, "one Consul leader that every running server agrees on", |c| c.leader_now())
    }

    fn leader_now(&self) -> Option<usize> {
        let mut seen = None;
        for s in self.servers.iter().filter(|s| s.running()) {
            let v = self.try_get(&s.url(), "/v1/status/leader").ok()?;
            let port: u16 = v.as_str()?.rsplit(':').next()?.parse().ok()?;
            let i = self.servers.iter().position(|s| s.server_port == port)?;
            if seen.is_some_and(|l| l != i) {
                return None;
            }
            seen = Some(i);
        }
        seen.filter(|&i| self.servers[i].running())
    }

    /// SIGKILL server `i` (its data stays).
    pub fn kill_server(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Start server `i` again with its data; returns once it follows the
    /// cluster's leader.
    pub fn start_server(&mut self, i: usize) {
        self.servers[i].spawn();
        let leader = self.leader();
        eprintln!("server-{i} is back; leader server-{leader}");
    }

    /// Stop client agent A (SIGTERM: it leaves the cluster), start it again
    /// with the same node id, keeping its data or with its data directory
    /// removed, and return once it is a member and a node of the catalog.
    pub fn restart_client_a(&mut self, keep_data: bool) {
        self.restart_client_a_with(keep_data, || {});
    }

    /// [`Self::restart_client_a`], running `meanwhile` while A is down.
    pub fn restart_client_a_with(&mut self, keep_data: bool, meanwhile: impl FnOnce()) {
        let started = Instant::now();
        self.clients[0].stop();
        if !keep_data {
            std::fs::remove_dir_all(self.clients[0].data_dir()).unwrap();
            std::fs::create_dir(self.clients[0].data_dir()).unwrap();
        }
        meanwhile();
        self.clients[0].spawn();
        self.wait_client_ready(0);
        eprintln!("client agent A restarted ({}) in {:?}", if keep_data { "with its data" } else { "wiped" }, started.elapsed());
    }

    fn wait_client_ready(&self, i: usize) {
        self.wait(START, &format!("Consul client agent {} to join the cluster", self.clients[i].name), |c| c.client_ready(i));
    }

    /// Client `i` sees the running servers alive, it and they have left
    /// Consul 1.8's legacy ACL mode, it is a node of the catalog, and it
    /// takes a write with the master token (ACLs resolved through the
    /// servers).
    ///
    /// The ACL mode matters: an agent starts in legacy mode and switches a
    /// few seconds later; a token it resolved before has no entry in the new
    /// mode's cache, and if the servers cannot be asked at that moment (a
    /// leader just killed) the agent answers "ACL not found" for it, and
    /// keeps answering so for the token TTL (30 s). A cluster that has run
    /// for a while is past that; the tests' clusters must be too.
    fn client_ready(&self, i: usize) -> Option<()> {
        let c = &self.clients[i];
        let url = c.url();
        let members = self.try_get(&url, "/v1/agent/members").ok()?;
        let members = members.as_array()?;
        // Serf tag "acls": "1" = new ACLs enabled, "2" = legacy mode.
        let new_acls = |m: &&Value| m["Tags"]["acls"] == "1";
        let alive_servers = members.iter().filter(|m| m["Tags"]["role"] == "consul" && m["Status"] == 1).filter(new_acls).count();
        if alive_servers < self.servers.iter().filter(|s| s.running()).count() {
            return None;
        }
        members.iter().find(|m| m["Name"] == c.name.as_str()).filter(new_acls)?;
        let node = self.try_get(&url, &format!("/v1/catalog/node/{}", c.name)).ok()?;
        node["Node"]["ID"].as_str().filter(|id| *id == c.node_id)?;
        self.try_put(&url, &format!("/v1/kv/tether-tests/ready/{}", c.name), &serde_json::json!("ok")).ok().map(drop)
    }

    /// What the catalog holds for `node`, read through the agent at `url`:
    /// per service id (`""` for the node's own checks) its checks and their
    /// statuses. `None` if the node is not in the catalog (or on an error).
    pub fn node_registrations(&self, url: &str, node: &str) -> Option<BTreeMap<String, BTreeMap<String, String>>> {
        let catalog = self.try_get(url, &format!("/v1/catalog/node/{node}")).ok()?;
        let services = catalog.get("Services")?.as_object()?;
        let mut out: BTreeMap<String, BTreeMap<String, String>> = services.keys().map(|id| (id.clone(), BTreeMap::new())).collect();
        for c in self.try_get(url, &format!("/v1/health/node/{node}")).ok()?.as_array()? {
            let service = c["ServiceID"].as_str().unwrap_or("").to_string();
            let check = c["CheckID"].as_str()?.to_string();
            let status = c["Status"].as_str()?.to_string();
            out.entry(service).or_default().insert(check, status);
        }
        Some(out)
    }

    /// The logs of every agent.
    pub fn logs(&self) -> String {
        self.all().map(|a| format!("==== {} ====\n{}\n", a.name, a.log_text())).collect()
    }

    /// The end of every agent's log, for failure messages.
    pub fn log_tails(&self) -> String {
        self.all().map(|a| format!("==== {} (end of its log) ====\n{}\n", a.name, a.log_tail(40))).collect()
    }
}

/// A gossip encryption key of this cluster's own (32 random bytes, base64).
fn gossip_key() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
