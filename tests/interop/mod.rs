//! tether against real grpc-go peers (tests/go, built from Debian's grpc-go
//! 1.33 and etcd 3.4 sources): a grpc-go client that finds its backends with
//! etcd's own resolver and round_robin, and grpc-go servers with grpc-go's own
//! health service and default keepalive enforcement.

use crate::support::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn service(name: &str, id: &str, port: u16, mode: &str) -> String {
    format!(
        "name = \"{name}\"\nid = \"{id}\"\naddress = \"127.0.0.1\"\nport = {port}\nttl = \"3s\"\ntags = [\"grpc\"]\nmeta = {{ version = \"1.2.3\" }}\n\n[check]\nmode = \"{mode}\"\ninterval = \"1s\"\n"
    )
}

fn key_present(etcd: &Etcd, key: &str) -> bool {
    etcd.get_prefix(key).iter().any(|(k, ..)| k == key)
}

fn wait_key(etcd: &Etcd, key: &str, present: bool) {
    wait_for(T, &format!("key {key} to be {}", if present { "present" } else { "gone" }), || {
        (key_present(etcd, key) == present).then_some(())
    });
}

/// (create_revision, mod_revision, version) of a key.
fn revisions(etcd: &Etcd, key: &str) -> Option<(i64, i64, i64)> {
    let out: Value = serde_json::from_str(&etcd.ctl(&["get", key, "-w", "json"])).unwrap();
    let kv = out["kvs"].as_array()?.first()?.clone();
    Some((kv["create_revision"].as_i64()?, kv["mod_revision"].as_i64()?, kv["version"].as_i64()?))
}

/// Status and ModifyIndex of every check tether writes in Consul's catalog
/// (alias checks, and health checks while not passing): any write moves one.
fn consul_check_indexes(consul: &Consul) -> BTreeMap<String, (String, u64)> {
    let checks = consul.get("/v1/health/state/any");
    checks
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["CheckID"].as_str().is_some_and(|id| id.starts_with("tether:") || id.starts_with("tether-alive:")))
        .map(|c| {
            (c["CheckID"].as_str().unwrap().to_string(), (c["Status"].as_str().unwrap().to_string(), c["ModifyIndex"].as_u64().unwrap()))
        })
        .collect()
}

#[test]
fn go_client_round_robin_follows_tether() {
    let etcd = Etcd::start(1);
    // Three grpc-go backends and a tonic one (orders-3): the client must also
    // reach a server that checks HTTP/2's :authority.
    let mut servers: Vec<GoHealthServer> = (0..3).map(|_| GoHealthServer::start()).collect();
    let tonic = HealthServer::start(0, &[]);
    let mut addrs: Vec<String> = servers.iter().map(GoHealthServer::addr).collect();
    addrs.push(tonic.addr());
    let setup = Setup::etcd(&etcd, "deregister_on_shutdown = false");
    let ports: Vec<u16> = servers.iter().map(|s| s.port).chain([tonic.port]).collect();
    for (i, port) in ports.iter().enumerate() {
        setup.write_service(&format!("orders-{i}.toml"), &service("orders", &format!("orders-{i}"), *port, "watch"));
    }
    let mut tether = setup.start();
    let mut client = GoClient::start(&etcd, "services/orders/");

    // Every passing instance is in rotation, and the Go client reads tether's metadata.
    client.wait_rotation(&addrs, T);
    let resolved = client.resolved().expect("a resolver update");
    assert_eq!(resolved.len(), 4, "{resolved:?}");
    for (i, addr) in addrs.iter().enumerate() {
        let (_, md) = resolved.iter().find(|(a, _)| a == addr).unwrap_or_else(|| panic!("{addr} not resolved: {resolved:?}"));
        let want = json!({"id": format!("orders-{i}"), "name": "orders", "tags": ["grpc"], "meta": {"version": "1.2.3"},
                          "node": "node-a", "managed_by": "tether", "health": "SERVING"});
        assert_eq!(*md, want, "metadata of {addr} as the Go client decodes it");
    }

    // NOT_SERVING: out of the client's rotation; SERVING: back.
    for _ in 0..2 {
        servers[1].set("not_serving");
        client.wait_rotation(&[addrs[0].clone(), addrs[2].clone(), addrs[3].clone()], T);
        servers[1].set("serving");
        client.wait_rotation(&addrs, T);
    }

    // Service file removed: out; back: in.
    std::fs::remove_file(setup.services_dir().join("orders-2.toml")).unwrap();
    client.wait_rotation(&[addrs[0].clone(), addrs[1].clone(), addrs[3].clone()], T);
    setup.write_service("orders-2.toml", &service("orders", "orders-2", servers[2].port, "watch"));
    client.wait_rotation(&addrs, T);

    // tether SIGKILLed: every instance leaves the rotation once the lease (ttl 3s) expires.
    tether.signal(Signal::SIGKILL);
    let start = Instant::now();
    client.wait_rotation(&[], T);
    eprintln!("interop: tether SIGKILL -> Go client's rotation empty after {:?} (ttl 3s)", start.elapsed());
    tether.restart();
    client.wait_rotation(&addrs, T);
    client.assert_alive();
}

#[test]
fn object_metadata_from_an_earlier_tether_is_rewritten_in_place() {
    let etcd = Etcd::start(1);
    let server = GoHealthServer::start();
    let key = "services/orders/orders-1";
    // What an earlier tether left: Metadata as an object (which panics grpc-go
    // clients), on its still-live lease with the service's ttl.
    let lease_out = etcd.ctl(&["lease", "grant", "30"]);
    let lease = lease_out.split_whitespace().nth(1).expect("lease id").to_string();
    let old = json!({"Op": 0, "Addr": server.addr(), "Metadata": {"id": "orders-1", "name": "orders", "tags": [], "meta": {},
                     "node": "node-a", "managed_by": "tether", "health": "SERVING"}});
    etcd.ctl(&["put", key, &old.to_string(), &format!("--lease={lease}")]);
    let (created, _, version) = revisions(&etcd, key).unwrap();

    let setup = Setup::etcd(&etcd, "");
    setup.write_service(
        "o.toml",
        &format!("name = \"orders\"\nid = \"orders-1\"\naddress = \"127.0.0.1\"\nport = {}\nttl = \"30s\"\n", server.port),
    );
    let tether = setup.start();
    // The old key is recognised as this node's: its lease is adopted...
    tether.wait_log("adopted tether's existing etcd lease", T);
    // ...and the value rewritten by a put over the same key.
    wait_for(T, "the key to be rewritten with Metadata as a string", || {
        let kvs = etcd.get_prefix(key);
        kvs.first().is_some_and(|(_, v, ..)| v["Metadata"].is_string()).then_some(())
    });
    let (created_now, _, version_now) = revisions(&etcd, key).unwrap();
    assert_eq!(created_now, created, "never deleted and re-created: the key was there all along");
    assert_eq!(version_now, version + 1, "exactly one put");
    assert_eq!(etcd.get_prefix("services/").len(), 1, "no duplicate");
    let lease_now = etcd.get_prefix(key)[0].2;
    // etcdctl prints the id zero-padded to 16 hex digits: compare numbers.
    assert_eq!(Some(lease_now), i64::from_str_radix(&lease, 16).ok(), "still on the adopted lease");

    // A grpc-go client now resolves it.
    let mut client = GoClient::start(&etcd, "services/orders/");
    client.wait_rotation(&[server.addr()], T);
    let resolved = client.resolved().unwrap();
    assert_eq!(resolved[0].1["id"], "orders-1");
}

/// tether on etcd and on Consul, each with a watch-mode and a poll-mode service
/// checking the same grpc-go server.
struct Both {
    etcd: Etcd,
    consul: Consul,
    _setups: (Setup, Setup),
    tethers: (Tether, Tether),
}

const KEYS: [&str; 2] = ["services/orders-w/orders-w", "services/orders-p/orders-p"];
const IDS: [&str; 2] = ["orders-w", "orders-p"];

impl Both {
    fn start(server: &GoHealthServer) -> Both {
        let etcd = Etcd::start(1);
        let consul = Consul::start();
        let e = Setup::etcd(&etcd, "");
        let c = Setup::consul(&consul, "");
        for s in [&e, &c] {
            s.write_service("w.toml", &service("orders-w", "orders-w", server.port, "watch"));
            s.write_service("p.toml", &service("orders-p", "orders-p", server.port, "poll"));
        }
        let tethers = (e.start(), c.start());
        let both = Both { etcd, consul, _setups: (e, c), tethers };
        both.wait(true);
        both
    }

    fn wait(&self, passing: bool) {
        for (key, id) in KEYS.iter().zip(IDS) {
            wait_key(&self.etcd, key, passing);
            self.consul.wait_health(id, if passing { "passing" } else { "critical" }, T);
        }
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.tethers.0.log(), self.tethers.1.log())
    }
}

#[test]
fn go_server_flips_are_seen_in_watch_and_poll_mode() {
    let mut server = GoHealthServer::start();
    let both = Both::start(&server);
    for _ in 0..2 {
        server.set("not_serving");
        both.wait(false);
        server.set("serving");
        both.wait(true);
    }
    let (status, output) = both.consul.health("orders-w").unwrap();
    assert_eq!((status.as_str(), output.as_str()), ("passing", ""), "passing again: the health check is gone");
}

#[test]
fn go_server_quiet_minute_no_blip_no_too_many_pings() {
    let server = GoHealthServer::start();
    let both = Both::start(&server);
    let revs: Vec<_> = KEYS.iter().map(|k| revisions(&both.etcd, k).unwrap()).collect();
    // The catalog follows the agent's own view by a sync.
    let checks = wait_for(T, "both alias checks passing in the catalog", || {
        let c = consul_check_indexes(&both.consul);
        (c.len() == 2 && c.values().all(|(s, _)| s == "passing")).then_some(c)
    });

    // A minute: grpc-go's default enforcement answers pings more often than
    // every 5 min with GOAWAY too_many_pings, which would make the services blip.
    holds_for(Duration::from_secs(60), Duration::from_millis(250), || {
        for (key, id) in KEYS.iter().zip(IDS) {
            assert!(key_present(&both.etcd, key), "{key} blipped; logs:\n{}", both.logs());
            assert_eq!(both.consul.health(id).unwrap().0, "passing", "{id} blipped; logs:\n{}", both.logs());
        }
    });
    let revs_after: Vec<_> = KEYS.iter().map(|k| revisions(&both.etcd, k).unwrap()).collect();
    assert_eq!(revs_after, revs, "etcd keys never rewritten, never deleted");
    assert_eq!(consul_check_indexes(&both.consul), checks, "Consul checks never changed");
    let log = server.server_log();
    assert!(!log.contains("too many pings"), "grpc-go server sent GOAWAY too_many_pings:\n{log}");
    assert!(!both.logs().contains("too_many_pings"), "{}", both.logs());
    assert!(!both.logs().contains("health: critical"), "{}", both.logs());
}

#[test]
fn go_server_graceful_shutdown_is_not_held_by_tether() {
    let mut server = GoHealthServer::start();
    let both = Both::start(&server);
    // health.Shutdown() (NOT_SERVING on the Watch streams), then GracefulStop(),
    // which waits for open streams: tether must let go of its Watch.
    let took = server.stop_gracefully(Duration::from_secs(5));
    eprintln!("interop: grpc-go GracefulStop returned after {took:?} with two tethers watching");
    both.wait(false);
}
