//! tether on etcd, end to end: the gRPC resolver's format, leases, failover.

use crate::support::*;
use nix::sys::signal::Signal;
use serde_json::json;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn service(name: &str, id: &str, port: u16, extra: &str) -> String {
    format!("name = \"{name}\"\nid = \"{id}\"\naddress = \"127.0.0.1\"\nport = {port}\nttl = \"3s\"\n{extra}\n")
}

fn key_present(etcd: &Etcd, key: &str) -> bool {
    etcd.get_prefix(key).iter().any(|(k, ..)| k == key)
}

fn wait_key(etcd: &Etcd, key: &str, present: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_for(limit, &format!("key {key} to be {}", if present { "present" } else { "gone" }), || {
        (key_present(etcd, key) == present).then_some(())
    });
    start.elapsed()
}

#[test]
fn key_format_lease_and_health() {
    let etcd = Etcd::start(1);
    let mut server = HealthServer::start(0, &[]);
    let setup = Setup::etcd(&etcd, "");
    let path =
        setup.write_service("o.toml", &service("orders", "orders-1", server.port, "tags = [\"grpc\"]\nmeta = { version = \"1.2.3\" }"));
    let _tether = setup.start();
    let key = "services/orders/orders-1";
    wait_key(&etcd, key, true, T);

    // The value gRPC-Go's naming/endpoints manager writes and its resolver reads.
    let kvs = etcd.get_prefix("services/orders");
    assert_eq!(kvs.len(), 1, "{kvs:?}");
    let (_, value, lease, _) = &kvs[0];
    assert_eq!(value["Op"], 0);
    assert_eq!(value["Addr"], format!("127.0.0.1:{}", server.port));
    // Metadata is one JSON string (grpc-go hashes resolver.Address.Metadata:
    // an object there panics its clients).
    let metadata: serde_json::Value = serde_json::from_str(value["Metadata"].as_str().expect("Metadata is a string")).unwrap();
    assert_eq!(
        metadata,
        json!({"id": "orders-1", "name": "orders", "tags": ["grpc"], "meta": {"version": "1.2.3"}, "node": "node-a", "managed_by": "tether", "health": "SERVING"})
    );
    assert_ne!(*lease, 0, "attached to a lease");
    let (left, granted) = etcd.lease_ttl(*lease);
    assert_eq!(granted, 3, "lease TTL = the service's ttl");
    assert!(left > 0 && left <= 3);

    for _ in 0..2 {
        server.set("not_serving");
        let took = wait_key(&etcd, key, false, T);
        eprintln!("etcd: NOT_SERVING -> key gone in {took:?}");
        server.set("serving");
        let took = wait_key(&etcd, key, true, T);
        eprintln!("etcd: SERVING -> key back in {took:?}");
    }
    std::fs::remove_file(path).unwrap();
    wait_key(&etcd, key, false, T);
}

#[test]
fn tether_killed_keys_expire_and_restart_rewrites_nothing() {
    let etcd = Etcd::start(1);
    let server = HealthServer::start(0, &[]);
    let setup = Setup::etcd(&etcd, "deregister_on_shutdown = false");
    setup.write_service("o.toml", &service("orders", "orders-1", server.port, ""));
    setup.write_service("p.toml", &service("payments", "payments-1", server.port, ""));
    let mut tether = setup.start();
    let key = "services/orders/orders-1";
    wait_key(&etcd, key, true, T);
    wait_key(&etcd, "services/payments/payments-1", true, T);

    // Restart (SIGTERM, deregister_on_shutdown = false): the lease is adopted,
    // nothing is rewritten.
    let revisions = |etcd: &Etcd| etcd.get_prefix("services/").into_iter().map(|(k, _, _, rev)| (k, rev)).collect::<Vec<_>>();
    let before = revisions(&etcd);
    tether.stop();
    assert!(key_present(&etcd, key), "left in place");
    tether.restart();
    tether.wait_log("adopted tether's existing etcd lease", T);
    tether.wait_log("anti-entropy: registry in sync", T);
    holds_for(Duration::from_secs(2), Duration::from_millis(50), || assert!(key_present(&etcd, key), "no blip on restart"));
    // Only tether's own agent record (_tether/agents/...) is rewritten: stopped, then alive.
    assert_eq!(revisions(&etcd), before, "a restart rewrote no service key");

    // SIGKILL: keys vanish by lease expiry within the TTL (3s).
    let start = Instant::now();
    tether.signal(Signal::SIGKILL);
    wait_key(&etcd, key, false, Duration::from_secs(10));
    eprintln!("etcd: tether SIGKILL -> keys gone in {:?} (ttl 3s)", start.elapsed());
    assert!(etcd.get_prefix("services/").is_empty());
}

#[test]
fn etcd_wiped_keys_come_back_without_duplicates() {
    let mut etcd = Etcd::start(1);
    let server = HealthServer::start(0, &[]);
    let setup = Setup::etcd(&etcd, "");
    setup.write_service("o.toml", &service("orders", "orders-1", server.port, ""));
    let tether = setup.start();
    let key = "services/orders/orders-1";
    wait_key(&etcd, key, true, T);

    let start = Instant::now();
    etcd.restart_wiped();
    wait_key(&etcd, key, true, Duration::from_secs(30));
    eprintln!("etcd: data wiped -> key back in {:?}", start.elapsed());
    let kvs = etcd.get_prefix("services/");
    assert_eq!(kvs.len(), 1, "no duplicate: {kvs:?}");
    let (left, _) = etcd.lease_ttl(kvs[0].2);
    assert!(left > 0, "on a live lease");
    assert!(tether.log().contains("granted a new etcd lease"));

    // A key owned by this node that no file describes is removed; another node's is kept.
    let orphan = json!({"Op": 0, "Addr": "127.0.0.1:1", "Metadata": {"id": "x", "name": "x", "node": "node-a", "managed_by": "tether"}});
    let foreign = json!({"Op": 0, "Addr": "127.0.0.1:1", "Metadata": {"id": "y", "name": "y", "node": "node-b", "managed_by": "tether"}});
    etcd.ctl(&["put", "services/x/x", &orphan.to_string()]);
    etcd.ctl(&["put", "services/y/y", &foreign.to_string()]);
    etcd.restart_wiped(); // forces an anti-entropy pass soon
    etcd.ctl(&["put", "services/x/x", &orphan.to_string()]);
    etcd.ctl(&["put", "services/y/y", &foreign.to_string()]);
    wait_key(&etcd, key, true, Duration::from_secs(30));
    wait_key(&etcd, "services/x/x", false, Duration::from_secs(60));
    assert!(key_present(&etcd, "services/y/y"));
}

#[test]
fn three_node_cluster_survives_leader_loss_and_a_member_stop() {
    let mut etcd = Etcd::start(3);
    let server = HealthServer::start(0, &[]);
    let setup = Setup::etcd(&etcd, "");
    setup.write_service("o.toml", &service("orders", "orders-1", server.port, ""));
    let tether = setup.start();
    let key = "services/orders/orders-1";
    wait_key(&etcd, key, true, T);
    let lease = etcd.get_prefix(key)[0].2;

    let leader = etcd.leader();
    etcd.stop_member(leader);
    eprintln!("etcd: stopped leader m{leader}");
    // Several TTLs pass: the key must stay on its lease the whole time.
    holds_for(Duration::from_secs(8), Duration::from_millis(200), || {
        let kvs = etcd.get_prefix(key);
        assert_eq!(kvs.len(), 1, "key kept while the leader is gone");
    });
    assert!(etcd.lease_ttl(lease).0 > 0, "keepalive continued");

    etcd.start_member(leader);
    wait_for(T, "the old leader to rejoin", || etcd.get_prefix(key).first().map(|_| ()));
    let other = (0..3).find(|i| *i != etcd.leader()).unwrap();
    etcd.stop_member(other);
    eprintln!("etcd: stopped member m{other}");
    holds_for(Duration::from_secs(8), Duration::from_millis(200), || {
        assert_eq!(etcd.get_prefix(key).len(), 1, "key kept with one member down")
    });
    assert!(etcd.lease_ttl(lease).0 > 0, "keepalive continued");
    assert_eq!(etcd.get_prefix("services/").len(), 1, "never a duplicate");
    assert!(!tether.log().contains("lease not found"), "{}", tether.log());
}

/// etcdctl as root, once auth is on.
fn ctl_root(etcd: &Etcd, args: &[&str]) -> String {
    let mut all = vec!["--user=root:rootpw"];
    all.extend_from_slice(args);
    etcd.ctl(&all)
}

fn root_has_key(etcd: &Etcd, key: &str) -> bool {
    ctl_root(etcd, &["get", key, "--keys-only"]).lines().any(|l| l == key)
}

/// With auth on and a role that may write only `services/orders/`, a
/// `billing` service is refused: tether says so once, backs off, shows it in
/// status, and `orders-1`, whose writes travel in the same transactions,
/// still flips in milliseconds.
#[test]
fn a_refused_service_never_holds_up_its_neighbours() {
    let etcd = Etcd::start(1);
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "tether:tetherpw"],
        &["role", "add", "tether"],
        &["role", "grant-permission", "tether", "--prefix=true", "readwrite", "services/orders/"],
        &["role", "grant-permission", "tether", "--prefix=true", "read", "services/"],
        &["role", "grant-permission", "tether", "--prefix=true", "readwrite", "_tether/agents/"],
        &["user", "grant-role", "tether", "tether"],
        &["auth", "enable"],
    ] {
        etcd.ctl(args);
    }
    let mut orders = HealthServer::start(0, &[]);
    let billing = HealthServer::start(0, &[]);
    let port = free_port();
    let setup = Setup::etcd(&etcd, "");
    std::fs::write(setup.dir.path().join("etcd.password"), "tetherpw\n").unwrap();
    let config = std::fs::read_to_string(setup.config())
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace("[etcd]\n", "[etcd]\nusername = \"tether\"\npassword_file = \"etcd.password\"\n");
    std::fs::write(setup.config(), config).unwrap();
    setup.write_service("orders.toml", &service("orders", "orders-1", orders.port, "[check]\ninterval = \"500ms\""));
    setup.write_service("billing.toml", &service("billing", "billing-1", billing.port, "[check]\ninterval = \"500ms\""));
    let tether = setup.start();
    let key = "services/orders/orders-1";
    wait_for(T, "orders-1 registered", || root_has_key(&etcd, key).then_some(()));

    // The refusal is visible in status, with its class and the next attempt.
    let status = wait_for(T, "billing-1's refusal in status", || {
        let out = tether.cli(&["status", "--json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let svc = st["services"].as_array()?.iter().find(|s| s["id"] == "billing-1")?.clone();
        (svc["error_class"] == "permanent").then_some(svc)
    });
    assert!(status["last_error"].as_str().unwrap().contains("permission denied"), "{status}");
    assert!(status["next_attempt"].is_string(), "{status}");
    let text = tether.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    let row = text.lines().find(|l| l.starts_with("billing-1 ")).unwrap_or_else(|| panic!("no billing-1 row:\n{text}"));
    assert!(row.contains(" refused (retry in "), "{text}");

    // Its neighbour flips as fast as ever, three times.
    for _ in 0..3 {
        orders.set("not_serving");
        let took = wait_key_root(&etcd, key, false);
        eprintln!("etcd with a refused neighbour: NOT_SERVING -> key gone in {took:?}");
        orders.set("serving");
        let took = wait_key_root(&etcd, key, true);
        eprintln!("etcd with a refused neighbour: SERVING -> key back in {took:?}");
    }
    assert!(!root_has_key(&etcd, "services/billing/billing-1"));
    // Said once, not five times a second.
    let log = tether.log();
    let warns = log.lines().filter(|l| l.contains("WARN") && l.contains("billing-1")).count();
    assert!((1..=2).contains(&warns), "{warns} WARN lines about billing-1:\n{log}");
}

fn wait_key_root(etcd: &Etcd, key: &str, present: bool) -> Duration {
    let start = Instant::now();
    wait_every(T, Duration::from_millis(5), &format!("{key} present = {present}"), || (root_has_key(etcd, key) == present).then_some(()));
    start.elapsed()
}
