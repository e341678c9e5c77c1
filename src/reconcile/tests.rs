//! Ordering and timing of the reconciler, its writer and its heartbeat lane,
//! against an in-memory registry with tokio's paused clock. These are about
//! what tether sends when, not about any registry's behaviour: the real
//! registries are exercised by the integration tests.

use super::core::{REFUSED_CAP, WAITING};
use super::*;
use crate::backoff::lock;
use crate::config::scan::ServiceSet;
use crate::config::CheckSpec;
use crate::config::ServiceSpec;
use crate::health::{Health, Status};
use crate::registry::{AgentInfo, RemoteEntry};
use crate::registry::{ErrorKind, Heartbeat, Outcome, Result as RegResult};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
struct State {
    /// id → (name, fingerprint, health)
    records: BTreeMap<String, (String, String, Health)>,
    /// (when, op, id) of every write.
    writes: Vec<(Instant, &'static str, String)>,
    /// When each heartbeat went out.
    beats: Vec<Instant>,
    syncs: usize,
    write_delay: Duration,
    /// Write a new critical status and its reason apart, as Consul does.
    split_reason: bool,
    /// Services whose writes are refused (as an ACL denial is).
    refuse: std::collections::BTreeSet<String>,
    /// Refused writes: (when, id).
    refused: Vec<(Instant, String)>,
    /// Fail the next write of any service as unreachable (then clear).
    unreachable_once: bool,
}

#[derive(Clone, Default)]
struct Memory(Arc<Mutex<State>>);

#[derive(Clone)]
struct MemView {
    split_reason: bool,
}

struct MemLane(Memory);

fn fp(spec: &ServiceSpec) -> String {
    format!("{}:{}", spec.name, spec.port)
}

impl View for MemView {
    fn keeps_critical(&self) -> bool {
        true
    }
    fn fingerprint(&self, spec: &ServiceSpec) -> String {
        fp(spec)
    }
    fn written(&self, was: Option<Status>, to: &Health) -> Health {
        if self.split_reason {
            crate::registry::status_then_reason(was, to)
        } else {
            to.clone()
        }
    }
}

impl Heartbeat for MemLane {
    async fn beat(&mut self) -> RegResult<()> {
        lock(&self.0 .0).beats.push(Instant::now());
        Ok(())
    }
}

impl Memory {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.0)
    }
    fn delay(&self) -> Duration {
        self.state().write_delay
    }
    fn writes_of(&self, id: &str) -> Vec<&'static str> {
        self.state().writes.iter().filter(|(_, _, i)| i == id).map(|(_, op, _)| *op).collect()
    }
}

impl Registry for Memory {
    type View = MemView;
    type Lane = MemLane;

    fn view(&self) -> MemView {
        MemView { split_reason: self.state().split_reason }
    }
    fn lane(&self) -> RegResult<MemLane> {
        Ok(MemLane(self.clone()))
    }
    fn max_batch(&self) -> usize {
        16
    }
    async fn sync_agent(&mut self, _agent: &AgentInfo) -> RegResult<Vec<RemoteEntry>> {
        tokio::time::sleep(self.delay()).await;
        self.state().syncs += 1;
        self.list().await
    }
    async fn list(&mut self) -> RegResult<Vec<RemoteEntry>> {
        Ok(self
            .state()
            .records
            .iter()
            .map(|(id, (name, fp, h))| RemoteEntry {
                id: id.clone(),
                name: name.clone(),
                fingerprint: fp.clone(),
                health: Some(h.clone()),
                maintenance: false,
            })
            .collect())
    }
    async fn apply(&mut self, writes: &[Write]) -> Vec<Outcome> {
        let view = self.view();
        let mut outcomes = vec![Outcome::NotTried; writes.len()];
        for (i, w) in writes.iter().enumerate() {
            tokio::time::sleep(self.delay()).await;
            let mut s = self.state();
            if std::mem::take(&mut s.unreachable_once) {
                outcomes[i] = Outcome::Failed(RegistryError::new(ErrorKind::Unavailable, "connection refused"));
                return outcomes;
            }
            if s.refuse.contains(w.id()) {
                s.refused.push((Instant::now(), w.id().to_string()));
                outcomes[i] = Outcome::Failed(RegistryError::new(ErrorKind::Rejected, "403 Permission denied"));
                continue;
            }
            outcomes[i] = Outcome::Done;
            let op = match w {
                Write::Health { health, was: Some(Status::Critical), .. } if view.split_reason && health.status == Status::Critical => {
                    "set_reason"
                }
                _ => w.op(),
            };
            s.writes.push((Instant::now(), op, w.id().to_string()));
            match w {
                Write::Register { spec, health, .. } => {
                    s.records.insert(spec.id.clone(), (spec.name.clone(), fp(spec), view.written(None, health)));
                }
                Write::Health { spec, health, was } => {
                    if let Some(r) = s.records.get_mut(&spec.id) {
                        r.2 = view.written(*was, health);
                    }
                }
                Write::Deregister { id, .. } => {
                    s.records.remove(id);
                }
                Write::Maintenance { .. } => {}
            }
        }
        outcomes
    }
    async fn claim(&mut self) -> RegResult<Option<String>> {
        Ok(None)
    }
    async fn shutdown(&mut self, _deregister: bool) -> RegResult<()> {
        Ok(())
    }
}

pub(super) fn spec(id: &str, ttl: Duration) -> ServiceSpec {
    ServiceSpec {
        file: format!("/etc/tether/services.d/{id}.toml").into(),
        id: id.into(),
        name: id.into(),
        address: "10.0.0.1".into(),
        port: 50051,
        tags: vec![],
        meta: BTreeMap::new(),
        ttl,
        deregister_critical_after: Duration::from_secs(60),
        checks: vec![CheckSpec::watching("127.0.0.1:50051", "")],
        weights: None,
        damping: Default::default(),
    }
}

struct Harness {
    mem: Memory,
    health: mpsc::Sender<HealthChange>,
    desired: mpsc::Sender<ServiceSet>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    /// Probe generation per id, as the reconciler numbers them.
    gens: HashMap<String, u64>,
}

impl Harness {
    fn start(mem: Memory) -> Harness {
        let telemetry = Arc::new(Telemetry::new("node-a", "memory", "memory"));
        let mut r = Reconciler::new(mem.clone(), "node-a", false, telemetry).expect("reconciler");
        r.probing = false;
        let health = r.health_tx.clone();
        let (desired, desired_rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(r.run(desired_rx, shutdown.clone()));
        Harness { mem, health, desired, shutdown, task, gens: HashMap::new() }
    }

    async fn set(&mut self, ids: &[&str], ttl: Duration) {
        let set: BTreeMap<String, ServiceSpec> = ids.iter().map(|id| (id.to_string(), spec(id, ttl))).collect();
        for id in set.keys() {
            let next = self.gens.len() as u64 + 1;
            self.gens.entry(id.clone()).or_insert(next);
        }
        self.desired.send(ServiceSet::complete(set)).await.unwrap();
    }

    /// A health change from a service's probe.
    async fn health(&self, id: &str, passing: bool) {
        let generation = self.gens[id];
        let health = if passing { Health::passing("SERVING") } else { Health::critical("NOT_SERVING") };
        self.health.send(HealthChange { id: id.into(), generation, health }).await.unwrap();
    }

    /// Let the paused clock run until `f` holds (or panic after `limit`).
    async fn until(&self, limit: Duration, what: &str, f: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(&self.mem.state()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }

    /// Start `n` services s0… with their first results (passing) in hand as
    /// tether starts, and wait until all are registered passing.
    async fn all_passing(&mut self, n: usize) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.set(&refs, Duration::from_secs(15)).await;
        // Results arrive while the first anti-entropy read is still out.
        for id in &ids {
            self.health(id, true).await;
        }
        self.until(Duration::from_secs(30), "all passing", |s| ids.iter().all(|id| passing(s, id))).await;
        ids
    }
}

fn passing(s: &State, id: &str) -> bool {
    s.records.get(id).is_some_and(|r| r.2.status == Status::Passing)
}

#[tokio::test(start_paused = true)]
async fn start_with_health_known_writes_once_per_service() {
    let mem = Memory::default();
    mem.state().write_delay = Duration::from_millis(50);
    let mut h = Harness::start(mem.clone());
    let ids = h.all_passing(40).await;
    for id in &ids {
        assert_eq!(mem.writes_of(id), ["register"], "{id}: one write, registered passing");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn queued_writes_coalesce_latest_state_wins() {
    let mem = Memory::default();
    mem.state().write_delay = Duration::from_millis(100);
    let mut h = Harness::start(mem.clone());
    h.set(&["a", "b"], Duration::from_secs(15)).await;
    h.health("a", true).await;
    h.health("b", true).await;
    h.until(Duration::from_secs(10), "a and b passing", |s| passing(s, "a") && passing(s, "b")).await;
    // Keep the writer busy with b, then flip a three times.
    h.health("b", false).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.health("a", false).await;
    h.health("a", true).await;
    h.health("a", false).await;
    h.until(Duration::from_secs(10), "a critical", |s| s.records.get("a").is_some_and(|r| r.2.status == Status::Critical)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mem.writes_of("a"), ["register", "set_health"], "three flips while queued = one write");
    // A flip and a flip back while queued cost nothing.
    h.health("b", true).await; // occupies the writer
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.health("a", true).await;
    h.health("a", false).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mem.writes_of("a"), ["register", "set_health"], "flip and flip back while queued = no write");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_registry_never_delays_the_heartbeat() {
    let mem = Memory::default();
    // Every write takes half a second: 300 services are 150 s of writes.
    mem.state().write_delay = Duration::from_millis(500);
    let mut h = Harness::start(mem.clone());
    let ids: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let ttl = Duration::from_secs(3);
    h.set(&refs, ttl).await;
    for id in &ids {
        h.health(id, true).await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    {
        let s = mem.state();
        assert!(s.writes.len() < 300, "the registry is still busy with the backlog ({} writes)", s.writes.len());
        assert!(s.beats.len() >= 55, "a beat every ttl/3 = 1 s for 60 s: {}", s.beats.len());
        let worst = s.beats.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(worst <= ttl / 3 + Duration::from_millis(10), "largest gap between heartbeats: {worst:?}");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn deregister_deadline_touches_only_its_service() {
    let mem = Memory::default();
    let mut h = Harness::start(mem.clone());
    h.set(&["a", "b", "c"], Duration::from_secs(15)).await;
    for id in ["a", "b", "c"] {
        h.health(id, true).await;
    }
    h.until(Duration::from_secs(10), "all passing", |s| ["a", "b", "c"].iter().all(|id| passing(s, id))).await;
    let critical_at = Instant::now();
    h.health("b", false).await;
    h.until(Duration::from_secs(120), "b deregistered", |s| !s.records.contains_key("b")).await;
    {
        let s = mem.state();
        let (at, op, _) = s.writes.iter().rev().find(|(_, _, id)| id == "b").unwrap().clone();
        assert_eq!(op, "deregister");
        assert!(at - critical_at >= Duration::from_secs(60), "not before deregister_critical_after: {:?}", at - critical_at);
        assert!(at - critical_at < Duration::from_secs(62), "soon after it: {:?}", at - critical_at);
        for id in ["a", "c"] {
            assert_eq!(s.writes.iter().filter(|(_, _, i)| i == id).count(), 1, "{id} untouched after its registration");
        }
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_service_with_no_result_is_registered_critical_after_the_grace() {
    let mem = Memory::default();
    let mut h = Harness::start(mem.clone());
    h.set(&["quiet"], Duration::from_secs(15)).await;
    h.until(Duration::from_secs(10), "quiet registered", |s| s.records.contains_key("quiet")).await;
    let (_, _, health) = mem.state().records["quiet"].clone();
    assert_eq!(health, Health::critical(WAITING));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reason_written_apart_waits_behind_the_status_writes_of_other_services() {
    let mem = Memory::default();
    mem.state().split_reason = true;
    mem.state().write_delay = Duration::from_millis(20);
    let mut h = Harness::start(mem.clone());
    let ids = h.all_passing(40).await;
    // A whole server flips: 40 services turn critical at once.
    for id in &ids {
        h.health(id, false).await;
    }
    let with_reason = |s: &State| ids.iter().all(|id| s.records[id].2 == Health::critical("NOT_SERVING"));
    h.until(Duration::from_secs(30), "all critical with their reason", with_reason).await;
    let ops: Vec<&str> = mem.state().writes.iter().map(|(_, op, _)| *op).filter(|op| *op != "register").collect();
    assert_eq!(ops.len(), 80, "a status and a reason per service: {ops:?}");
    assert!(ops[..40].iter().all(|op| *op == "set_health"), "every status before any reason: {ops:?}");
    assert!(ops[40..].iter().all(|op| *op == "set_reason"), "{ops:?}");
    h.stop().await;
}

/// A refused service waits with backoff of minutes; its neighbours in the
/// same batches are written, and still flip at once.
#[tokio::test(start_paused = true)]
async fn a_refused_service_backs_off_alone() {
    let mem = Memory::default();
    mem.state().refuse.insert("s1".into());
    let mut h = Harness::start(mem.clone());
    h.set(&["s0", "s1", "s2"], Duration::from_secs(15)).await;
    for id in ["s0", "s1", "s2"] {
        h.health(id, true).await;
    }
    h.until(Duration::from_secs(10), "s0 and s2 passing", |s| passing(s, "s0") && passing(s, "s2")).await;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(600)).await;
    let attempts: Vec<Duration> = mem.state().refused.iter().map(|(t, _)| *t - start).collect();
    // 5 s, 10, 20, 40, 80, 160, 300, 300 … (±20 %): about 8 in ten minutes,
    // where a fixed 200 ms retry would have made 3,000.
    assert!((4..=10).contains(&attempts.len()), "refused attempts in 10 min: {attempts:?}");
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] + Duration::from_secs(1) >= g[0].mul_f64(0.6)), "the waits grow: {gaps:?}");
    assert!(gaps.iter().all(|g| *g <= REFUSED_CAP.mul_f64(1.21)), "capped: {gaps:?}");
    // Its neighbours are not held up: a flip is written at once.
    let before = mem.writes_of("s2").len();
    h.health("s2", false).await;
    h.until(Duration::from_secs(1), "s2 critical", |s| s.records["s2"].2.status == Status::Critical).await;
    assert_eq!(mem.writes_of("s2").len(), before + 1);
    assert!(!mem.state().records.contains_key("s1"));
    // Allowed again (a person fixed the policy): its next attempt succeeds.
    mem.state().refuse.clear();
    h.until(REFUSED_CAP * 2, "s1 registered", |s| passing(s, "s1")).await;
    h.stop().await;
}

/// A refused service's file changes: it is tried again at once.
#[tokio::test(start_paused = true)]
async fn a_refused_service_is_tried_again_when_its_file_changes() {
    let mem = Memory::default();
    mem.state().refuse.insert("s1".into());
    let mut h = Harness::start(mem.clone());
    h.set(&["s0", "s1"], Duration::from_secs(15)).await;
    h.health("s0", true).await;
    h.health("s1", true).await;
    h.until(Duration::from_secs(10), "s1 refused once", |s| s.refused.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    mem.state().refuse.clear();
    // The same service with a new port: a changed file.
    let mut set: BTreeMap<String, ServiceSpec> =
        ["s0", "s1"].iter().map(|id| (id.to_string(), spec(id, Duration::from_secs(15)))).collect();
    set.get_mut("s1").unwrap().port = 50052;
    let at = Instant::now();
    h.desired.send(ServiceSet::complete(set)).await.unwrap();
    h.until(Duration::from_secs(1), "s1 registered", |s| passing(s, "s1")).await;
    assert!(Instant::now() - at < Duration::from_secs(1));
    h.stop().await;
}

/// A write lost to an unreachable registry makes the view stale: nothing is
/// queued until anti-entropy has re-read it, and then the write is retried.
#[tokio::test(start_paused = true)]
async fn an_unreachable_registry_is_re_read_then_the_write_retried() {
    let mem = Memory::default();
    let mut h = Harness::start(mem.clone());
    h.all_passing(2).await;
    let syncs = mem.state().syncs;
    mem.state().unreachable_once = true;
    h.health("s0", false).await;
    h.until(Duration::from_secs(30), "s0 critical", |s| s.records["s0"].2.status == Status::Critical).await;
    assert!(mem.state().syncs > syncs, "re-read before the retry");
    assert!(mem.state().refused.is_empty());
    h.stop().await;
}

/// `tether drain` is answered only once the drain is on disk: a crash right
/// after the answer (a SIGKILL, as a test or an OOM kill sends) keeps it.
#[tokio::test]
async fn a_drain_is_on_disk_when_it_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node-a.drained");
    let mem = Memory::default();
    let telemetry = Arc::new(Telemetry::new("node-a", "memory", "memory"));
    let mut r = Reconciler::new(mem.clone(), "node-a", false, telemetry).expect("reconciler");
    r.probing = false;
    let (commands, commands_rx) = mpsc::channel(4);
    let r = r.with_control(commands_rx, DrainFile::load(path.clone()));
    let (desired, desired_rx) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(r.run(desired_rx, shutdown.clone()));
    let set = ["s0", "s1"].iter().map(|id| (id.to_string(), spec(id, Duration::from_secs(15)))).collect();
    desired.send(ServiceSet::complete(set)).await.unwrap();
    for (request, drained) in [
        (control::Request::Drain { ids: vec!["s0".into()], all: false }, vec!["s0"]),
        (control::Request::Drain { ids: vec![], all: true }, vec!["s0", "s1"]),
        (control::Request::Undrain { ids: vec!["s0".into()], all: false }, vec!["s1"]),
    ] {
        let (reply, answer) = oneshot::channel();
        commands.send(control::Command { request: request.clone(), reply }).await.unwrap();
        let response = answer.await.unwrap();
        assert_eq!(response.error, None, "{request:?}");
        let on_disk: BTreeSet<String> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(on_disk, drained.into_iter().map(String::from).collect(), "on disk when {request:?} was answered");
        assert_eq!(response.warning, None);
    }
    // The runtime directory gone: the drain holds, and the answer says it is not kept.
    std::fs::remove_dir_all(dir.path()).unwrap();
    let (reply, answer) = oneshot::channel();
    commands.send(control::Command { request: control::Request::Drain { ids: vec!["s0".into()], all: false }, reply }).await.unwrap();
    let response = answer.await.unwrap();
    assert_eq!(response.error, None);
    assert!(response.warning.as_deref().is_some_and(|w| w.contains("cannot keep the drains")), "{response:?}");
    shutdown.cancel();
    task.await.unwrap();
}

/// Registrations left to TTL at shutdown (this harness's agent does not
/// deregister): a flip queued behind a slow write as SIGTERM comes is still
/// written, not left passing for another TTL.
#[tokio::test(start_paused = true)]
async fn a_flip_queued_at_shutdown_is_written_before_registrations_are_left_to_ttl() {
    let mem = Memory::default();
    let mut h = Harness::start(mem.clone());
    h.all_passing(2).await;
    mem.state().write_delay = Duration::from_millis(500);
    h.health("s0", false).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // s0's write is out (it takes 500 ms)
    h.health("s1", false).await; // queued behind it
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(mem.state().writes.iter().all(|w| w.1 == "register"), "neither flip is written yet");
    h.stop().await;
    let s = mem.state();
    assert_eq!(s.records["s0"].2.status, Status::Critical);
    assert_eq!(s.records["s1"].2.status, Status::Critical, "the queued flip was written at shutdown");
}
