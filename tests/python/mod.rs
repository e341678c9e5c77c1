//! tether against the reference Python health servicer (grpcio-health-checking's
//! sync `HealthServicer` on a sync `grpc.server`, tests/python/health_server.py),
//! on a real Consul.
//!
//! grpc/grpc#43403: that servicer's `set()` holds its lock while it sends to
//! the watchers, and a just-cancelled Watch's close callback needs the same
//! lock, so a client that cancels Watch streams while the service flips can
//! deadlock the server: `set()` never returns and no `Check` is answered
//! again. Whatever tether does with its Watch streams, a Python service that
//! stays NOT_SERVING for a while and comes back must keep answering, and must
//! be passing in Consul within 2 s of coming back.

use crate::support::*;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Registration of every service at the start.
const T: Duration = Duration::from_secs(30);
/// NOT_SERVING -> every service critical in Consul.
const TO_CRITICAL: Duration = Duration::from_secs(10);
/// How long the service stays NOT_SERVING in each trial (the scenario, not a wait).
const HOLD: Duration = Duration::from_secs(3);
/// SERVING -> every service passing in Consul again (the requirement).
const BACK: Duration = Duration::from_secs(2);
/// A fresh Check from another client must answer within this.
const ANSWER: Duration = Duration::from_secs(2);
/// How often the background client sends a fresh Check.
const CHECK_EVERY: Duration = Duration::from_millis(250);

#[test]
fn python_servicer_five_services_flip_and_keep_answering() {
    flips(5, 3);
}

#[test]
fn python_servicer_hundred_services_flip_and_keep_answering() {
    flips(100, 3);
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("py-{i:03}")).collect()
}

/// Whether service `id` is critical in `checks`: its health check there,
/// critical (tether adds it only while the service is not passing).
fn critical_in(checks: &HashMap<String, Value>, id: &str) -> bool {
    checks.get(&format!("tether:{id}")).is_some_and(|c| c["Status"] == "critical")
}

fn flips(n: usize, trials: usize) {
    let test_start = Instant::now();
    let consul = Consul::start();
    let names: Vec<String> = (0..n).map(|i| format!("py.v1.Svc{i:03}")).collect();
    let mut server = PyHealthServer::start(&names);
    let setup = Setup::consul(&consul, "");
    let ids = ids(n);
    for (id, name) in ids.iter().zip(&names) {
        setup.write_service(
            &format!("{id}.toml"),
            &format!(
                "name = \"py\"\nid = \"{id}\"\naddress = \"127.0.0.1\"\nport = {}\n[check]\ntarget = \"{}\"\nservice = \"{name}\"\nmode = \"watch\"\ninterval = \"500ms\"\n",
                server.port,
                server.addr()
            ),
        );
    }
    let tether = setup.start();
    let mut checker = Checker::start(server.addr());
    let w = Waiter { consul: &consul, ids: &ids, checker: &checker, tether: &tether };
    let took = w.all(&server, "passing", T, "every service passing after tether started");
    eprintln!("python/{n}: all {n} passing {took:?} after tether started ({:?} into the test)", test_start.elapsed());

    for trial in 1..=trials {
        let flipped = Instant::now();
        let set = server.set("not_serving").unwrap_or_else(|e| w.wedged(&server, &format!("trial {trial}: set(NOT_SERVING): {e}")));
        let critical = w.all(&server, "critical", TO_CRITICAL, &format!("trial {trial}: every service critical after NOT_SERVING"));
        // The scenario: the service stays NOT_SERVING for HOLD in all (a
        // sleep, not a wait), while fresh Checks must still be answered.
        while let Some(left) = HOLD.checked_sub(flipped.elapsed()) {
            checker.assert_answering(&server, &tether);
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        let set_back = server
            .set("serving")
            .unwrap_or_else(|e| w.wedged(&server, &format!("trial {trial}: set(SERVING) after {HOLD:?} NOT_SERVING did not return: {e}")));
        let passing = w.all(&server, "passing", BACK, &format!("trial {trial}: every service passing again within {BACK:?} of SERVING"));
        eprintln!(
            "python/{n}: trial {trial}: set(NOT_SERVING) {set:?}, all critical {critical:?} after it; \
             set(SERVING) {set_back:?}, all passing {passing:?} after it; fresh Checks so far: {}",
            checker.summary()
        );
    }
    let summary = checker.stop();
    checker.assert_answering(&server, &tether);
    eprintln!("python/{n}: {trials} trials done in {:?}; fresh Checks: {summary}", test_start.elapsed());
}

/// Waits on Consul for every service at once, failing at once if the Python
/// server stopped answering.
struct Waiter<'a> {
    consul: &'a Consul,
    ids: &'a [String],
    checker: &'a Checker,
    tether: &'a Tether,
}

impl Waiter<'_> {
    /// Wait until every service is `status` ("passing" or "critical") in
    /// Consul, polling every 50 ms; how long it took.
    fn all(&self, server: &PyHealthServer, status: &str, limit: Duration, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            self.checker.assert_answering(server, self.tether);
            let checks = self.consul.checks();
            let not_yet: Vec<&String> = self
                .ids
                .iter()
                .filter(|id| if status == "passing" { !Consul::passing_in(&checks, id) } else { !critical_in(&checks, id) })
                .collect();
            if not_yet.is_empty() {
                return start.elapsed();
            }
            if start.elapsed() > limit {
                let shown: Vec<String> = not_yet
                    .iter()
                    .take(5)
                    .map(|id| format!("{id}: {:?}", self.consul.health(id).unwrap_or(("not registered".into(), String::new()))))
                    .collect();
                panic!(
                    "{what}: {} of {} services not yet {status} after {limit:?}, e.g. {shown:?}; fresh Checks: {}\n{}",
                    not_yet.len(),
                    self.ids.len(),
                    self.checker.summary(),
                    tail(&self.tether.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wedged(&self, server: &PyHealthServer, what: &str) -> ! {
        panic!(
            "the Python server is wedged (grpc/grpc#43403?): {what}; fresh Checks: {}\n\
             == the Python server's threads:\n{}\n== tether's log (tail):\n{}",
            self.checker.summary(),
            server.thread_dump(),
            tail(&self.tether.log(), 40)
        );
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Default)]
struct Tally {
    answered: u32,
    slowest: Duration,
    failures: Vec<String>,
}

/// Another client: every [`CHECK_EVERY`], a fresh `Check` of the whole
/// server ("") on its own connection, which must answer within [`ANSWER`].
struct Checker {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checker {
    fn start(addr: String) -> Checker {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tally.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let result = fresh_check(&addr, "", ANSWER);
                let mut t = t.lock().unwrap();
                match result {
                    Ok(took) => {
                        t.answered += 1;
                        t.slowest = t.slowest.max(took);
                    }
                    Err(e) => t.failures.push(e),
                }
                drop(t);
                std::thread::sleep(CHECK_EVERY.saturating_sub(sent.elapsed()));
            }
        });
        Checker { tally, stop, thread: Some(thread) }
    }

    fn summary(&self) -> String {
        let t = self.tally.lock().unwrap();
        let first = t.failures.first().map(|f| format!(", the first: {f}")).unwrap_or_default();
        format!("{} answered (slowest {:?}), {} not answered{first}", t.answered, t.slowest, t.failures.len())
    }

    fn assert_answering(&self, server: &PyHealthServer, tether: &Tether) {
        let first = self.tally.lock().unwrap().failures.first().cloned();
        if let Some(why) = first {
            panic!(
                "the Python server stopped answering: wedged (grpc/grpc#43403?): a fresh Check from another client got {why}; \
                 fresh Checks: {}\n== the Python server's threads:\n{}\n== tether's log (tail):\n{}",
                self.summary(),
                server.thread_dump(),
                tail(&tether.log(), 40)
            );
        }
    }

    /// Stop sending (waits for the Check in flight, at most [`ANSWER`]); the summary.
    fn stop(&mut self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.summary()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
