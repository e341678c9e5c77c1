//! 1,000 services on one agent: 10 gRPC servers with 100 service names each,
//! watch mode, interval 1 s, ttl 15 s, against real Consul and real etcd, and
//! again behind a registry slowed by ~50 ms per request. Every service must
//! end up passing while tether's own liveness never lapses (Consul: its TTL
//! check never misses; etcd: its lease never changes) and nothing is ever
//! removed and re-registered. These tests run one at a time (nextest group
//! `heavy`); their timings are printed, never asserted (see scripts/bench.sh).

use crate::support::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

const SERVERS: usize = 10;
const PER_SERVER: usize = 100;
/// Generous: Consul 1.8 itself needs ~20 s for 1,000 registrations with alias
/// checks on this 2-core machine, and ~75 s behind the slow proxy.
const CONVERGE: Duration = Duration::from_secs(300);
/// How long the steady state is watched after convergence: longer than ttl.
const HOLD: Duration = Duration::from_secs(20);
const TTL_LIVENESS: &str = "tether-liveness:node-a";

fn names(server: usize) -> Vec<String> {
    (0..PER_SERVER).map(|i| format!("svc-{server}-{i}")).collect()
}

/// Ten servers with 100 names each, and the 1,000 service files.
fn thousand(setup: &Setup) -> Vec<HealthServer> {
    let servers: Vec<HealthServer> = (0..SERVERS)
        .map(|s| {
            let n = names(s);
            HealthServer::start(0, &n.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .collect();
    for (s, server) in servers.iter().enumerate() {
        for n in names(s) {
            std::fs::write(
                setup.services_dir().join(format!("{n}.toml")),
                format!(
                    "name = \"{n}\"\nid = \"{n}\"\nport = {}\nttl = \"15s\"\n[check]\nservice = \"{n}\"\ninterval = \"1s\"\n",
                    server.port
                ),
            )
            .unwrap();
        }
    }
    servers
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

fn consul_thousand(delay: Option<Duration>) {
    let consul = Consul::start();
    let proxy = delay.map(|d| SlowProxy::start(consul.http_port, d));
    let url = proxy.as_ref().map_or_else(|| consul.url(), |p| format!("http://127.0.0.1:{}", p.port));
    let setup = Setup::consul_at(&url, "");
    let _servers = thousand(&setup);
    let start = Instant::now();
    let tether = setup.start();
    let all: Vec<String> = (0..SERVERS).flat_map(names).collect();
    // Liveness must be passing at every look, from its registration on.
    let look = |consul: &Consul| -> usize {
        let checks = consul.checks();
        if let Some(l) = checks.get(TTL_LIVENESS) {
            assert_eq!(l["Status"], "passing", "tether's liveness lapsed {:?} after start: {}", start.elapsed(), l["Output"]);
        }
        all.iter().filter(|n| Consul::passing_in(&checks, n)).count()
    };
    wait_every(CONVERGE, Duration::from_millis(500), "1,000 services passing in Consul", || (look(&consul) == all.len()).then_some(()));
    eprintln!("scale: consul (delay {delay:?}): 1,000 passing {:?} after start", start.elapsed());
    holds_for(HOLD, Duration::from_millis(500), || assert_eq!(look(&consul), all.len(), "every service stays passing"));
    assert!(!consul.log_text().contains("missed TTL"), "no TTL check ever expired:\n{}", consul.log_text());
    let log = tether.log();
    assert_eq!(count(&log, "registered service="), all.len(), "each service registered once: nothing reaped and re-registered");
    assert_eq!(consul.services().len(), all.len() + 1, "no duplicates, nothing missing");
}

fn etcd_thousand(delay: Option<Duration>) {
    let etcd = Etcd::start(1);
    let endpoint = etcd.endpoints()[0].clone();
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = delay.map(|d| SlowProxy::start(port, d));
    let endpoints = vec![proxy.as_ref().map_or(endpoint, |p| format!("http://127.0.0.1:{}", p.port))];
    let setup = Setup::etcd_at(&endpoints, "");
    let _servers = thousand(&setup);
    let start = Instant::now();
    let tether = setup.start();
    let n = SERVERS * PER_SERVER;
    let keys = wait_every(CONVERGE, Duration::from_secs(1), "1,000 keys in etcd", || {
        let kvs = etcd.get_prefix("services/");
        (kvs.len() == n).then_some(kvs)
    });
    eprintln!("scale: etcd (delay {delay:?}): 1,000 keys {:?} after start", start.elapsed());
    let lease = keys[0].2;
    assert!(keys.iter().all(|k| k.2 == lease && lease != 0), "all keys on one lease");
    holds_for(HOLD, Duration::from_secs(1), || {
        let kvs = etcd.get_prefix("services/");
        assert_eq!(kvs.len(), n, "every key stays");
        assert!(kvs.iter().all(|k| k.2 == lease), "the lease never lapsed or changed");
    });
    let (remaining, granted) = etcd.lease_ttl(lease);
    assert!(remaining > 0 && granted == 15, "lease alive: {remaining}/{granted}");
    let log = tether.log();
    assert_eq!(count(&log, "granted a new etcd lease"), 1, "one lease from start to end:\n{log}");
    assert!(!log.contains("not found"), "the lease was never lost:\n{log}");
    if delay.is_none() {
        // A restart lists all 1,000 keys (in pages) and rewrites none of them.
        let before = etcd.get_prefix("services/");
        let mut tether = tether;
        tether.signal(Signal::SIGKILL);
        tether.restart();
        tether.wait_log("anti-entropy: registry in sync", CONVERGE);
        let log = tether.log();
        assert!(log.contains("anti-entropy: registry in sync fixes=0"), "nothing to fix after a restart:\n{log}");
        assert_eq!(etcd.get_prefix("services/"), before, "no key rewritten");
    }
}

#[test]
fn thousand_services_on_ten_servers_consul() {
    consul_thousand(None);
}

#[test]
fn thousand_services_behind_a_slow_consul() {
    consul_thousand(Some(Duration::from_millis(50)));
}

#[test]
fn thousand_services_on_ten_servers_etcd() {
    etcd_thousand(None);
}

#[test]
fn thousand_services_behind_a_slow_etcd() {
    etcd_thousand(Some(Duration::from_millis(50)));
}
