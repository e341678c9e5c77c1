//! The decision core on its own: every path, with explicit time, against an
//! in-memory registry that can fail (an error of either class, a lost view)
//! and that is shaped like Consul (keeps critical records) or like etcd (a
//! record only while passing). A property test drives random sequences of
//! file, health and registry events.

use super::core::{Core, ProbeChange, REFUSED_CAP, WAITING};
use super::writer::{Done, Work};
use crate::config::scan::ServiceSet;
use crate::config::ServiceSpec;
use crate::control::Request;
use crate::health::supervisor::HealthChange;
use crate::health::{Health, Status};
use crate::registry::{ErrorKind, Outcome, RegistryError, RemoteEntry, View, Write};
use crate::telemetry::Telemetry;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone)]
struct Shape {
    keeps_critical: bool,
}

impl View for Shape {
    fn keeps_critical(&self) -> bool {
        self.keeps_critical
    }
    fn fingerprint(&self, spec: &ServiceSpec) -> String {
        format!("{}:{}", spec.name, spec.port)
    }
}

/// A record in the in-memory registry.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    name: String,
    fingerprint: String,
    health: Health,
    maintenance: bool,
    /// Owned by this node (listed by anti-entropy) or by someone else.
    ours: bool,
}

/// The core, a registry, and the clock.
struct Sim {
    core: Core<Shape>,
    shape: Shape,
    registry: BTreeMap<String, Record>,
    now: Instant,
    /// Probe generation per service, as the core numbers them.
    generations: HashMap<String, u64>,
    probe_starts: Vec<String>,
    /// The next write or listing fails with this kind.
    fail_next: Option<ErrorKind>,
    /// Services whose writes are refused.
    refuse: BTreeSet<String>,
    /// Every write the registry was sent.
    writes: Vec<Write>,
    syncs: usize,
}

/// The reconciler tests' service, on `port`, critical for an hour before
/// it is deregistered (longer than any test runs).
fn spec(id: &str, port: u16) -> ServiceSpec {
    ServiceSpec { port, deregister_critical_after: Duration::from_secs(3600), ..super::tests::spec(id, Duration::from_secs(15)) }
}

impl Sim {
    fn new(keeps_critical: bool) -> Sim {
        let shape = Shape { keeps_critical };
        let telemetry = Arc::new(Telemetry::new("node-a", "memory", "memory"));
        let now = Instant::now();
        Sim {
            core: Core::new(shape.clone(), "node-a", BTreeSet::new(), telemetry, now),
            shape,
            registry: BTreeMap::new(),
            now,
            generations: HashMap::new(),
            probe_starts: Vec::new(),
            fail_next: None,
            refuse: BTreeSet::new(),
            writes: Vec::new(),
            syncs: 0,
        }
    }

    /// Read the outbox: probe generations.
    fn outbox(&mut self) {
        for change in std::mem::take(&mut self.core.out.probes) {
            if let ProbeChange::Start { id, generation, .. } = change {
                self.probe_starts.push(id.clone());
                self.generations.insert(id, generation);
            }
        }
        self.core.out = Default::default();
    }

    fn set(&mut self, services: &[(&str, u16)]) {
        let set = services.iter().map(|(id, port)| (id.to_string(), spec(id, *port))).collect();
        self.core.service_set(ServiceSet::complete(set), self.now);
        self.outbox();
    }

    fn health(&mut self, id: &str, passing: bool) {
        let health = if passing { Health::passing("SERVING") } else { Health::critical("NOT_SERVING") };
        self.health_of(id, health);
    }

    fn health_of(&mut self, id: &str, health: Health) {
        let generation = self.generations[id];
        self.core.health(HealthChange { id: id.into(), generation, health }, self.now);
        self.outbox();
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.core.fire(self.now);
        self.outbox();
    }

    fn listing(&self) -> Vec<RemoteEntry> {
        self.registry
            .iter()
            .filter(|(_, r)| r.ours)
            .map(|(id, r)| RemoteEntry {
                id: id.clone(),
                name: r.name.clone(),
                fingerprint: r.fingerprint.clone(),
                health: Some(r.health.clone()),
                maintenance: r.maintenance,
            })
            .collect()
    }

    fn apply(&mut self, w: &Write) -> Outcome {
        self.writes.push(w.clone());
        if let Some(kind) = self.fail_next.take() {
            return Outcome::Failed(RegistryError::new(kind, "injected"));
        }
        if self.refuse.contains(w.id()) {
            return Outcome::Failed(RegistryError::new(ErrorKind::Rejected, "403 Permission denied"));
        }
        match w {
            Write::Register { spec, health, maintenance } => {
                let fingerprint = self.shape.fingerprint(spec);
                let record = Record { name: spec.name.clone(), fingerprint, health: health.clone(), maintenance: *maintenance, ours: true };
                self.registry.insert(spec.id.clone(), record);
            }
            Write::Health { spec, health, .. } => {
                if let Some(r) = self.registry.get_mut(&spec.id) {
                    r.health = health.clone();
                }
            }
            Write::Deregister { id, .. } => {
                self.registry.remove(id);
            }
            Write::Maintenance { id, on } => {
                if let Some(r) = self.registry.get_mut(id) {
                    r.maintenance = *on;
                }
            }
        }
        Outcome::Done
    }

    /// One piece of the writer's work, done and reported back; false when there was none.
    fn step(&mut self) -> bool {
        let Some(work) = self.core.take_work(16, self.now) else {
            self.outbox();
            return false;
        };
        self.finish(work);
        true
    }

    /// The registry does `work`, and the core hears back.
    fn finish(&mut self, work: Work) {
        let done = match work {
            Work::Sync(agent) => {
                self.syncs += 1;
                match self.fail_next.take() {
                    Some(kind) => Done::Sync(agent, Err(RegistryError::new(kind, "injected"))),
                    None => Done::Sync(agent, Ok(self.listing())),
                }
            }
            Work::Writes(writes) => {
                let ids: BTreeSet<&str> = writes.iter().map(Write::id).collect();
                assert_eq!(ids.len(), writes.len(), "at most one write per service in a batch: {writes:?}");
                let mut outcomes = Vec::new();
                for w in &writes {
                    let o = self.apply(w);
                    let stop = matches!(&o, Outcome::Failed(e) if e.kind != ErrorKind::Rejected);
                    outcomes.push(o);
                    if stop {
                        break;
                    }
                }
                outcomes.resize(writes.len(), Outcome::NotTried);
                Done::Writes { writes, outcomes }
            }
        };
        self.core.done(done, self.now);
        self.outbox();
    }

    /// Run the writer until there is nothing left to do (bounded).
    fn settle(&mut self) {
        for _ in 0..1000 {
            if !self.step() {
                return;
            }
        }
        panic!("the core never settles");
    }

    fn writes_of(&self, id: &str) -> usize {
        self.writes.iter().filter(|w| w.id() == id).count()
    }
}

fn passing() -> Health {
    Health::passing("SERVING")
}

#[test]
fn a_stale_view_queues_nothing_until_anti_entropy_re_reads() {
    let mut sim = Sim::new(true);
    sim.set(&[("a", 1), ("b", 1)]);
    sim.health("a", true);
    sim.health("b", true);
    sim.settle();
    assert_eq!(sim.registry["a"].health, passing());
    // A transient failure of a write: the view is stale.
    sim.fail_next = Some(ErrorKind::Unavailable);
    sim.health("a", false);
    assert!(sim.step());
    let (writes, syncs) = (sim.writes.len(), sim.syncs);
    sim.health("b", false);
    assert!(!sim.step(), "nothing is queued while stale");
    assert_eq!(sim.writes.len(), writes);
    // Anti-entropy after the backoff re-reads, then both flips are written.
    sim.advance(Duration::from_secs(1));
    sim.settle();
    assert_eq!(sim.syncs, syncs + 1);
    assert_eq!(sim.registry["a"].health.status, Status::Critical);
    assert_eq!(sim.registry["b"].health.status, Status::Critical);
}

#[test]
fn a_failed_anti_entropy_read_is_retried_with_growing_backoff() {
    let mut sim = Sim::new(true);
    sim.set(&[("a", 1)]);
    sim.health("a", true);
    sim.fail_next = Some(ErrorKind::Unavailable);
    assert!(sim.step(), "the first read fails");
    assert!(!sim.step(), "not retried at once");
    sim.advance(Duration::from_millis(250)); // 200 ms ± 20 %
    sim.fail_next = Some(ErrorKind::Unavailable);
    assert!(sim.step(), "retried after 200 ms, and fails again");
    sim.advance(Duration::from_millis(300));
    assert!(!sim.step(), "the next wait is longer: 400 ms ± 20 %");
    sim.advance(Duration::from_millis(200));
    sim.settle();
    assert_eq!(sim.syncs, 3);
    assert_eq!(sim.registry["a"].health, passing());
}

#[test]
fn orphans_of_this_owner_are_removed_and_others_never_touched() {
    let mut sim = Sim::new(true);
    let record = |ours| Record { name: "x".into(), fingerprint: "x:1".into(), health: passing(), maintenance: false, ours };
    sim.registry.insert("gone".into(), record(true));
    sim.registry.insert("theirs".into(), record(false));
    sim.set(&[("a", 1)]);
    sim.health("a", true);
    sim.settle();
    assert!(!sim.registry.contains_key("gone"), "an orphan of this node is removed");
    assert!(sim.registry.contains_key("theirs"), "another owner's record stays");
    assert_eq!(sim.writes_of("theirs"), 0);
}

/// A service file that cannot be read (at start: no good version to keep)
/// must not cost its service its registration, nor the drains kept from
/// before: both wait until every file is read.
#[test]
fn an_unreadable_file_keeps_what_no_file_describes_until_every_file_is_read() {
    for keeps_critical in [true, false] {
        let mut sim = Sim::new(keeps_critical);
        sim.core.keep_drains(BTreeSet::from(["b".to_string()]));
        let record = Record { name: "b".into(), fingerprint: "b:1".into(), health: passing(), maintenance: false, ours: true };
        sim.registry.insert("b".into(), record);
        // b's file fails to parse: the set lacks it and says so.
        let set = BTreeMap::from([("a".to_string(), spec("a", 1))]);
        sim.core.service_set(ServiceSet { services: set.clone(), complete: false }, sim.now);
        assert_eq!(sim.core.out.drains, None, "b's drain is kept");
        sim.outbox();
        sim.health("a", true);
        sim.settle();
        assert!(sim.registry.contains_key("b"), "b's registration is kept");
        assert_eq!(sim.writes_of("b"), 0);
        sim.advance(Duration::from_secs(40)); // the next anti-entropy
        sim.settle();
        assert!(sim.registry.contains_key("b"), "and kept by every pass while a file cannot be read");
        // b's file fixed: b is adopted, still drained.
        sim.set(&[("a", 1), ("b", 1)]);
        sim.health("b", true);
        sim.settle();
        let state = sim.core.control(&Request::State { ids: vec!["b".into()], all: false }, sim.now);
        assert!(state.services[0].drained, "the drain kept from before holds");
        // With every file read, a registration no file describes is removed.
        sim.registry.insert("gone".into(), Record { name: "gone".into(), ..sim.registry["a"].clone() });
        sim.advance(Duration::from_secs(40));
        sim.settle();
        assert!(!sim.registry.contains_key("gone"));
    }
}

/// A drained service registered again (its file changed, or Consul lost the
/// record) is in maintenance from the registration on: never a moment in
/// the healthy set. So is a drained service registered for the first time.
#[test]
fn a_drained_service_is_registered_in_maintenance() {
    let mut sim = Sim::new(true);
    sim.core.keep_drains(BTreeSet::from(["b".to_string()]));
    sim.set(&[("a", 1), ("b", 1)]);
    sim.health("a", true);
    sim.health("b", true);
    sim.core.control(&Request::Drain { ids: vec!["a".into()], all: false }, sim.now);
    while sim.step() {
        for id in ["a", "b"] {
            assert!(sim.registry.get(id).is_none_or(|r| r.maintenance), "{id} is never registered out of maintenance");
        }
    }
    sim.set(&[("a", 2), ("b", 2)]);
    let writes = sim.writes.len();
    while sim.step() {
        assert!(sim.registry["a"].maintenance && sim.registry["b"].maintenance, "re-registered in maintenance");
    }
    assert!(sim.writes[writes..].iter().all(|w| matches!(w, Write::Register { maintenance: true, .. })), "{:?}", &sim.writes[writes..]);
    assert_eq!(sim.writes.len(), writes + 2, "one write each: no maintenance write after the registration");
}

/// A service's file goes while a write of it is out, whatever the write
/// (a maintenance write, a refused registration): the record is removed
/// once the write is back.
#[test]
fn a_file_removed_while_a_write_is_out_ends_with_no_record() {
    for refused in [false, true] {
        let mut sim = Sim::new(true);
        sim.set(&[("a", 1), ("b", 1)]);
        sim.health("a", true);
        sim.health("b", true);
        sim.settle();
        if refused {
            sim.refuse.insert("a".into());
            sim.set(&[("a", 2), ("b", 1)]); // a changed file: a registration, refused
        } else {
            sim.core.control(&Request::Drain { ids: vec!["a".into()], all: false }, sim.now);
        }
        let work = sim.core.take_work(16, sim.now).expect("a's write");
        sim.set(&[("b", 1)]); // a's file removed meanwhile
        sim.refuse.clear();
        sim.finish(work);
        sim.settle();
        assert!(!sim.registry.contains_key("a"), "refused={refused}: a's record is gone: {:?}", sim.writes);
        assert!(sim.registry.contains_key("b"));
    }
}

#[test]
fn drain_and_undrain_consul_shaped_and_etcd_shaped() {
    for keeps_critical in [true, false] {
        let mut sim = Sim::new(keeps_critical);
        sim.set(&[("a", 1), ("b", 1)]);
        sim.health("a", true);
        sim.health("b", true);
        sim.settle();
        let response = sim.core.control(&Request::Drain { ids: vec!["a".into()], all: false }, sim.now);
        assert!(response.error.is_none());
        assert_eq!(sim.core.out.drains, Some(BTreeSet::from(["a".to_string()])), "the drained set is to be persisted");
        sim.settle();
        if keeps_critical {
            assert!(sim.registry["a"].maintenance, "Consul: maintenance on");
        } else {
            assert!(!sim.registry.contains_key("a"), "etcd: drained is absent");
        }
        assert_eq!(sim.writes_of("b"), 1, "b untouched");
        let state = sim.core.control(&Request::State { ids: vec!["a".into()], all: false }, sim.now);
        assert!(state.services[0].drained && state.services[0].applied);
        sim.core.control(&Request::Undrain { ids: vec!["a".into()], all: false }, sim.now);
        sim.settle();
        assert!(!sim.registry["a"].maintenance);
        assert_eq!(sim.registry["a"].health, passing());
        let unknown = sim.core.control(&Request::Drain { ids: vec!["nope".into()], all: false }, sim.now);
        assert!(unknown.error.unwrap().contains("nope"));
    }
}

#[test]
fn a_file_change_without_a_check_change_keeps_the_probe_and_rewrites_the_record() {
    let mut sim = Sim::new(true);
    sim.set(&[("a", 1)]);
    sim.health("a", true);
    sim.settle();
    let generation = sim.generations["a"];
    sim.set(&[("a", 2)]);
    assert_eq!(sim.generations["a"], generation, "the same probe goes on");
    assert_eq!(sim.probe_starts.len(), 1);
    sim.settle();
    assert_eq!(sim.registry["a"].fingerprint, "a:2");
    assert_eq!(sim.registry["a"].health, passing(), "no critical blip");
}

#[test]
fn a_check_change_restarts_the_probe_and_ignores_the_old_one() {
    let mut sim = Sim::new(true);
    sim.set(&[("a", 1)]);
    sim.health("a", true);
    sim.settle();
    let old = sim.generations["a"];
    let mut changed = spec("a", 1);
    changed.checks[0].interval = Duration::from_secs(1);
    sim.core.desired_set(BTreeMap::from([("a".to_string(), changed)]), sim.now);
    sim.outbox();
    assert_ne!(sim.generations["a"], old, "a new probe");
    // A late result of the old probe does not count.
    sim.core.health(HealthChange { id: "a".into(), generation: old, health: Health::critical("NOT_SERVING") }, sim.now);
    sim.settle();
    assert_eq!(sim.registry["a"].health, passing());
}

#[test]
fn the_first_result_grace_then_registered_critical_waiting() {
    for keeps_critical in [true, false] {
        let mut sim = Sim::new(keeps_critical);
        sim.set(&[("quiet", 1)]);
        sim.settle();
        assert!(sim.registry.is_empty(), "undecided: nothing written");
        sim.advance(Duration::from_millis(3100)); // timeout 2 s + grace 1 s
        sim.settle();
        match keeps_critical {
            true => assert_eq!(sim.registry["quiet"].health, Health::critical(WAITING)),
            false => assert!(sim.registry.is_empty(), "etcd-shaped: not passing is absent"),
        }
    }
}

/// In sync (READY, /readyz) is reported only once a grace that ran out has
/// queued its registration, even when the writer asks before the grace's
/// deadline was handled.
#[test]
fn in_sync_waits_for_a_grace_that_ran_out() {
    let mut sim = Sim::new(true);
    sim.set(&[("quiet", 1)]);
    sim.settle();
    assert_eq!(sim.core.out.in_sync, None, "undecided: not in sync yet");
    sim.now += Duration::from_millis(3100); // the grace ended; its deadline not yet handled
    assert!(sim.core.take_work(16, sim.now).is_none());
    assert_eq!(sim.core.out.in_sync, None, "not before the registration is queued");
    sim.core.fire(sim.now);
    sim.outbox();
    let work = sim.core.take_work(16, sim.now).expect("the registration");
    sim.finish(work);
    assert!(sim.core.take_work(16, sim.now).is_none());
    assert!(sim.core.out.in_sync.is_some(), "then in sync");
}

#[test]
fn a_restart_with_health_known_by_the_registry_writes_nothing() {
    let mut sim = Sim::new(true);
    let record = Record { name: "a".into(), fingerprint: "a:1".into(), health: passing(), maintenance: false, ours: true };
    sim.registry.insert("a".into(), record);
    sim.set(&[("a", 1)]);
    sim.settle();
    sim.health("a", true);
    sim.settle();
    assert_eq!(sim.writes.len(), 0, "{:?}", sim.writes);
}

#[test]
fn a_refused_service_waits_alone_and_is_retried_when_credentials_change() {
    let mut sim = Sim::new(false);
    sim.refuse.insert("billing".into());
    sim.set(&[("orders", 1), ("billing", 1)]);
    sim.health("orders", true);
    sim.health("billing", true);
    sim.settle();
    assert_eq!(sim.writes_of("billing"), 1);
    assert_eq!(sim.core.refused(), 1);
    let status = sim.core.status("billing", sim.now, std::time::SystemTime::now()).unwrap();
    assert_eq!(status.error_class.as_deref(), Some("permanent"));
    assert!(status.next_attempt.is_some());
    // Its neighbour flips at once.
    sim.health("orders", false);
    sim.settle();
    assert!(!sim.registry.contains_key("orders"));
    assert_eq!(sim.writes_of("billing"), 1, "billing waits");
    // A new token: tried again at once, and accepted.
    sim.refuse.clear();
    sim.core.credentials_changed(sim.now);
    sim.settle();
    assert!(sim.registry.contains_key("billing"));
    assert_eq!(sim.core.refused(), 0);
}

#[test]
fn refusals_back_off_to_minutes() {
    let mut sim = Sim::new(true);
    sim.refuse.insert("a".into());
    sim.set(&[("a", 1)]);
    sim.health("a", true);
    sim.settle();
    for _ in 0..40 {
        sim.advance(Duration::from_secs(30));
        sim.settle();
    }
    // 20 minutes: 5, 10, 20, 40, 80, 160, 300, 300, 300 s … (±20 %).
    let attempts = sim.writes_of("a");
    assert!((6..=12).contains(&attempts), "{attempts} attempts in 20 min");
    assert!(REFUSED_CAP >= Duration::from_secs(60));
}

mod damping;

/// One event of the property test.
#[derive(Debug, Clone)]
enum Event {
    /// The desired set: which of the ids (bit mask) and their port.
    Files(u8, u16),
    Health(usize, bool),
    /// The writer does up to n pieces of work.
    Work(u8),
    Fail(bool),
    Refuse(usize, bool),
    Drain(usize, bool),
    Wait(u16),
}

const IDS: [&str; 4] = ["s0", "s1", "s2", "s3"];

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (any::<u8>(), 1u16..3).prop_map(|(m, p)| Event::Files(m, p)),
        (0..IDS.len(), any::<bool>()).prop_map(|(i, b)| Event::Health(i, b)),
        (1u8..5).prop_map(Event::Work),
        any::<bool>().prop_map(Event::Fail),
        (0..IDS.len(), any::<bool>()).prop_map(|(i, b)| Event::Refuse(i, b)),
        (0..IDS.len(), any::<bool>()).prop_map(|(i, b)| Event::Drain(i, b)),
        (0u16..5000).prop_map(Event::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any sequence of file, health and registry events ends, once the
    /// registry answers again, with the registry equal to the desired state;
    /// at most one write per service is ever out at once; and an event that
    /// changes nothing causes no write.
    #[test]
    fn any_events_end_with_the_registry_as_desired(keeps_critical: bool, events in proptest::collection::vec(event(), 1..60)) {
        let mut sim = Sim::new(keeps_critical);
        let mut set: BTreeMap<&str, u16> = BTreeMap::new();
        let mut health: BTreeMap<&str, bool> = BTreeMap::new();
        let mut drained: BTreeSet<&str> = BTreeSet::new();
        for e in events {
            match e {
                Event::Files(mask, port) => {
                    set = IDS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, id)| (*id, port)).collect();
                    // A service whose file goes starts over when it comes back.
                    health.retain(|id, _| set.contains_key(id));
                    drained.retain(|id| set.contains_key(id));
                    let services: Vec<(&str, u16)> = set.iter().map(|(id, p)| (*id, *p)).collect();
                    sim.set(&services);
                }
                Event::Health(i, ok) if set.contains_key(IDS[i]) => {
                    health.insert(IDS[i], ok);
                    sim.health(IDS[i], ok);
                }
                Event::Health(..) => {}
                Event::Work(n) => for _ in 0..n { sim.step(); },
                Event::Fail(permanent) => sim.fail_next = Some(if permanent { ErrorKind::Rejected } else { ErrorKind::Unavailable }),
                Event::Refuse(i, on) => { if on { sim.refuse.insert(IDS[i].to_string()); } else { sim.refuse.remove(IDS[i]); } }
                Event::Drain(i, on) if set.contains_key(IDS[i]) => {
                    if on { drained.insert(IDS[i]); } else { drained.remove(IDS[i]); }
                    let ids = vec![IDS[i].to_string()];
                    let request = if on { Request::Drain { ids, all: false } } else { Request::Undrain { ids, all: false } };
                    sim.core.control(&request, sim.now);
                    sim.outbox();
                }
                Event::Drain(..) => {}
                Event::Wait(ms) => sim.advance(Duration::from_millis(u64::from(ms))),
            }
        }
        // Services still waiting for their first result get one (what an
        // undecided service leaves alone is the unit tests' business).
        let waiting: Vec<&str> = set.keys().filter(|id| !health.contains_key(*id)).copied().collect();
        for id in waiting {
            health.insert(id, true);
            sim.health(id, true);
        }
        // The registry answers again: every refusal's backoff runs out.
        sim.fail_next = None;
        sim.refuse.clear();
        for _ in 0..24 {
            sim.advance(Duration::from_secs(30));
            sim.settle();
        }
        for id in IDS {
            // A service that flapped and is still not SERVING stays held, with the episode's reason.
            let held = sim.core.status(id, sim.now, std::time::SystemTime::now()).and_then(|s| s.flapping.is_some().then_some(s.output));
            let want = set.get(id).and_then(|port| {
                let h = match (health[id], &held) {
                    (true, _) => passing(),
                    (false, Some(reason)) => Health::critical(reason.clone()),
                    (false, None) => Health::critical("NOT_SERVING"),
                };
                let d = drained.contains(id);
                let present = keeps_critical || (h.status == Status::Passing && !d);
                present.then(|| Record { name: id.into(), fingerprint: format!("{id}:{port}"), health: h, maintenance: d && keeps_critical, ours: true })
            });
            prop_assert_eq!(sim.registry.get(id).cloned(), want, "{}", id);
        }
        // Nothing left to do, and an event that changes nothing writes nothing.
        let writes = sim.writes.len();
        for (id, ok) in &health {
            sim.health(id, *ok);
        }
        let services: Vec<(&str, u16)> = set.iter().map(|(id, p)| (*id, *p)).collect();
        sim.set(&services);
        sim.settle();
        prop_assert_eq!(sim.writes.len(), writes);
    }
}
