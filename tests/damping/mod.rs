//! Flap damping against real Consul and real etcd, with a grpc-go server
//! toggled between SERVING and NOT_SERVING every 25 ms for 20 s beside a
//! steady one: what consumers see (blocking-query wakes on Consul, watch
//! events on etcd), that the flapping service stays out of the passing set,
//! that it comes back after the hold, and that its neighbour still flips at
//! once. And an ordinary restart is not damped.

use crate::support::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);
/// The default hold of a first episode.
const HOLD: Duration = Duration::from_secs(10);
const FLAP_FOR: Duration = Duration::from_secs(20);
const EVERY: Duration = Duration::from_millis(25);
/// What consumers may see of 800 transitions.
const MAX_CHANGES: usize = 20;
/// Transitions that reach the registry before the threshold (8) is crossed, with room.
const FIRST_FEW: Duration = Duration::from_secs(2);

fn service(name: &str, port: u16) -> String {
    format!("name = \"{name}\"\nid = \"{name}-1\"\naddress = \"127.0.0.1\"\nport = {port}\nttl = \"5s\"\n[check]\ntarget = \"127.0.0.1:{port}\"\n")
}

/// Toggle `server` every 25 ms for 20 s from a thread, ending SERVING; gives the server back.
fn toggle(mut server: GoHealthServer) -> JoinHandle<GoHealthServer> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut serving = true;
        while start.elapsed() < FLAP_FOR {
            serving = !serving;
            server.set(if serving { "serving" } else { "not_serving" });
            std::thread::sleep(EVERY);
        }
        server.set("serving");
        server
    })
}

/// A consumer of one Consul service: a blocking query on
/// /v1/health/service/NAME, as clients and consul-template run it. Records
/// each wake-up (a new index) with whether the service was in the passing set.
struct ConsulConsumer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Instant, bool)>>>,
    thread: Option<JoinHandle<()>>,
}

impl ConsulConsumer {
    fn start(url: &str, name: &str) -> ConsulConsumer {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (url, name, s, v) = (url.to_string(), name.to_string(), stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
            let mut index = 0u64;
            while !s.load(Ordering::Relaxed) {
                let r = client
                    .get(format!("{url}/v1/health/service/{name}?index={index}&wait=1s"))
                    .header("X-Consul-Token", ACL_MASTER)
                    .send()
                    .and_then(|r| r.error_for_status());
                let Ok(r) = r else { continue };
                let new = r.headers().get("X-Consul-Index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
                let body: serde_json::Value = r.json().unwrap_or_default();
                let passing = body.as_array().is_some_and(|entries| {
                    entries.iter().any(|e| e["Checks"].as_array().is_some_and(|cs| cs.iter().all(|c| c["Status"] == "passing")))
                });
                if new != index {
                    if index != 0 {
                        v.lock().unwrap().push((Instant::now(), passing));
                    }
                    index = new;
                }
            }
        });
        ConsulConsumer { stop, seen, thread: Some(thread) }
    }

    fn seen(&self) -> Vec<(Instant, bool)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ConsulConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A consumer of one etcd key: `etcdctl watch`, as grpc-go's resolver
/// watches. Records each event with whether it put the key (passing) or
/// deleted it.
struct EtcdConsumer {
    child: std::process::Child,
    seen: Arc<Mutex<Vec<(Instant, bool)>>>,
}

impl EtcdConsumer {
    fn start(etcd: &Etcd, key: &str) -> EtcdConsumer {
        let mut child = Command::new(tool("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
            .args(["watch", key])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let v = seen.clone();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                match line.as_str() {
                    "PUT" => v.lock().unwrap().push((Instant::now(), true)),
                    "DELETE" => v.lock().unwrap().push((Instant::now(), false)),
                    _ => {}
                }
            }
        });
        EtcdConsumer { child, seen }
    }

    fn seen(&self) -> Vec<(Instant, bool)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for EtcdConsumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a consumer saw while the service flapped: at most [`MAX_CHANGES`]
/// changes, and never passing after the first few transitions.
fn check_consumer(what: &str, seen: &[(Instant, bool)], start: Instant, end: Instant, log: impl Fn() -> String) {
    let during: Vec<&(Instant, bool)> = seen.iter().filter(|(t, _)| *t >= start && *t <= end).collect();
    eprintln!("{what}: {} consumer changes in {:?} of flapping", during.len(), end - start);
    assert!(
        during.len() <= MAX_CHANGES,
        "{what}: consumers saw {} changes while flapping (at most {MAX_CHANGES}); log:\n{}",
        during.len(),
        log()
    );
    let late_passing: Vec<Duration> =
        during.iter().filter(|(t, passing)| *passing && *t > start + FIRST_FEW).map(|(t, _)| *t - start).collect();
    assert!(late_passing.is_empty(), "{what}: in the passing set while flapping at {late_passing:?}; log:\n{}", log());
}

#[test]
fn a_flapping_service_on_consul_is_held_out_and_wakes_consumers_rarely() {
    let consul = Consul::start();
    let flappy = GoHealthServer::start();
    let mut steady = GoHealthServer::start();
    let port = free_port();
    let setup = Setup::consul(&consul, "").listening(port);
    setup.write_service("flappy.toml", &service("flappy", flappy.port));
    setup.write_service("steady.toml", &service("steady", steady.port));
    let tether = setup.start();
    consul.wait_health("flappy-1", "passing", T);
    consul.wait_health("steady-1", "passing", T);
    let consumer = ConsulConsumer::start(&consul.url(), "flappy");

    let start = Instant::now();
    let toggler = toggle(flappy);
    // Mid-way, the steady neighbour flips, and is seen at once.
    std::thread::sleep(FLAP_FOR / 2);
    steady.set("not_serving");
    let took = consul.wait_health("steady-1", "critical", T);
    eprintln!("consul: the steady neighbour reached critical in {took:?} while its neighbour flapped");
    steady.set("serving");
    consul.wait_health("steady-1", "passing", T);
    let status = status_json(port);
    let f = service_status(&status, "flappy-1");
    assert!(f["flapping"].is_object(), "tether status shows flapping: {f}");
    assert!(f["output"].as_str().unwrap().starts_with("flapping: 8 transitions in "), "{f}");
    let (_, output) = consul.health("flappy-1").unwrap();
    assert!(output.starts_with("flapping: ") || output.is_empty(), "Consul's reason: {output:?}");

    let _flappy = toggler.join().unwrap();
    let end = Instant::now();
    // Held until SERVING without a break for the hold, then passing.
    holds_for(HOLD - Duration::from_secs(1), Duration::from_millis(100), || {
        assert_eq!(consul.health("flappy-1").unwrap().0, "critical", "passing before the hold ended; log:\n{}", tether.log());
    });
    consul.wait_health("flappy-1", "passing", (end + HOLD + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
    eprintln!("consul: passing {:?} after steady SERVING (hold {HOLD:?})", end.elapsed());
    check_consumer("consul", &consumer.seen(), start, end, || tether.log());

    // One line when it started and one when it ended, not one per transition.
    let log = tether.log();
    assert_eq!(log.matches("flapping: held critical").count(), 1, "{log}");
    assert_eq!(log.matches("flapping ended").count(), 1, "{log}");
    // The tests run tether with RUST_LOG=debug; at the default level (info):
    let lines = log.lines().filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE ")).count();
    assert!(lines < 40, "{lines} log lines at info for 800 transitions:\n{log}");
    let metrics = metrics_text(port);
    assert!(metrics.contains("tether_flap_episodes_total{service=\"flappy-1\"} 1"), "{metrics}");
    assert!(metrics.contains("tether_service_flapping{service=\"flappy-1\"} 0"), "{metrics}");
    assert!(!metrics.contains("tether_flap_episodes_total{service=\"steady-1\"}"), "{metrics}");
}

#[test]
fn a_flapping_service_on_etcd_is_held_out_and_wakes_watchers_rarely() {
    let etcd = Etcd::start(1);
    let flappy = GoHealthServer::start();
    let mut steady = GoHealthServer::start();
    let setup = Setup::etcd(&etcd, "");
    setup.write_service("flappy.toml", &service("flappy", flappy.port));
    setup.write_service("steady.toml", &service("steady", steady.port));
    let tether = setup.start();
    let (key, steady_key) = ("services/flappy/flappy-1", "services/steady/steady-1");
    let present = |k: &str| etcd.get_prefix(k).iter().any(|(key, ..)| key == k);
    wait_for(T, "both keys", || (present(key) && present(steady_key)).then_some(()));
    let consumer = EtcdConsumer::start(&etcd, key);

    let start = Instant::now();
    let toggler = toggle(flappy);
    std::thread::sleep(FLAP_FOR / 2);
    steady.set("not_serving");
    let t = Instant::now();
    wait_for(T, "the steady key to go", || (!present(steady_key)).then_some(()));
    eprintln!("etcd: the steady neighbour's key went in {:?} while its neighbour flapped", t.elapsed());
    steady.set("serving");
    wait_for(T, "the steady key back", || present(steady_key).then_some(()));

    let _flappy = toggler.join().unwrap();
    let end = Instant::now();
    holds_for(HOLD - Duration::from_secs(1), Duration::from_millis(100), || {
        assert!(!present(key), "back before the hold ended; log:\n{}", tether.log());
    });
    let limit = (end + HOLD + Duration::from_secs(1)).saturating_duration_since(Instant::now());
    wait_for(limit, "the flapping service's key back within hold + 1 s", || present(key).then_some(()));
    eprintln!("etcd: key back {:?} after steady SERVING (hold {HOLD:?})", end.elapsed());
    check_consumer("etcd", &consumer.seen(), start, end, || tether.log());
}

#[test]
fn an_ordinary_restart_is_not_damped() {
    let consul = Consul::start();
    let mut server = GoHealthServer::start();
    let port = free_port();
    let setup = Setup::consul(&consul, "").listening(port);
    setup.write_service("orders.toml", &service("orders", server.port));
    let tether = setup.start();
    consul.wait_health("orders-1", "passing", T);
    // Twice: NOT_SERVING (a deploy begins), SERVING a few seconds later.
    for _ in 0..2 {
        server.set("not_serving");
        consul.wait_health("orders-1", "critical", T);
        holds_for(Duration::from_secs(2), Duration::from_millis(100), || {
            assert_eq!(consul.health("orders-1").unwrap().0, "critical");
        });
        server.set("serving");
        // Undamped: back as soon as it is written, long before a hold could end.
        consul.wait_health("orders-1", "passing", HOLD / 2);
    }
    let status = status_json(port);
    let f = service_status(&status, "orders-1");
    assert!(f.get("flapping").is_none_or(|v| v.is_null()), "{f}");
    let metrics = metrics_text(port);
    assert!(!metrics.contains("tether_flap_episodes_total{service=\"orders-1\"}"), "{metrics}");
    assert!(!tether.log().contains("flapping"), "{}", tether.log());
}

fn status_json(port: u16) -> serde_json::Value {
    reqwest::blocking::get(format!("http://127.0.0.1:{port}/v1/status")).unwrap().json().unwrap()
}

fn service_status<'a>(status: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    status["services"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no {id} in {status}"))
}

fn metrics_text(port: u16) -> String {
    reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics")).unwrap().text().unwrap()
}
