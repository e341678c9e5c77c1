//! One tether beside each pod: named instances on one registry never touch
//! each other's services; a second agent with the same identity is refused
//! and harms nothing; drain and undrain, with --wait, surviving a reload.

use crate::support::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// An agent config line set: its instance, and anti-entropy every second so
/// that "several passes" take seconds.
fn agent(instance: Option<&str>) -> String {
    let mut s = "anti_entropy_interval = \"1s\"\n".to_string();
    if let Some(i) = instance {
        s.push_str(&format!("instance = \"{i}\"\n"));
    }
    s
}

/// A service file with the default id (`<name>-<node>[-<instance>]-<port>`).
fn service(name: &str, port: u16) -> String {
    format!("name = \"{name}\"\naddress = \"127.0.0.1\"\nport = {port}\nttl = \"3s\"\n")
}

fn consul_ids(consul: &Consul, name: &str) -> Vec<String> {
    let mut ids: Vec<String> = consul.services().into_iter().filter(|(_, v)| v["Service"] == name).map(|(k, _)| k).collect();
    ids.sort();
    ids
}

fn passing(consul: &Consul, id: &str) -> bool {
    consul.health(id).is_some_and(|c| c.0 == "passing") && consul.service_status(id).as_deref() == Some("passing")
}

/// How often a `holds_for` window (several anti-entropy passes at 1 s) looks.
const LOOK: Duration = Duration::from_millis(100);

#[test]
fn two_instances_on_one_consul_coexist_and_stop_alone() {
    let consul = Consul::start();
    let (sa, sb) = (HealthServer::start(0, &[]), HealthServer::start(0, &[]));
    let a = Setup::consul(&consul, &agent(Some("pod-a")));
    let b = Setup::consul(&consul, &agent(Some("pod-b")));
    a.write_service("orders.toml", &service("orders", sa.port));
    b.write_service("orders.toml", &service("orders", sb.port));
    let mut ta = a.start();
    let mut tb = b.start();
    let (ida, idb) = (format!("orders-node-a-pod-a-{}", sa.port), format!("orders-node-a-pod-b-{}", sb.port));
    wait_for(T, "both pods' orders passing", || (passing(&consul, &ida) && passing(&consul, &idb)).then_some(()));
    let services = consul.services();
    assert_eq!(services[&ida]["Meta"]["tether-instance"], "pod-a");
    assert!(services.contains_key("tether-node-a@pod-a") && services.contains_key("tether-node-a@pod-b"), "one liveness service each");
    holds_for(Duration::from_secs(5), LOOK, || {
        assert!(passing(&consul, &ida) && passing(&consul, &idb), "both stay registered and passing across anti-entropy passes")
    });

    // SIGKILL pod-a's agent: only its service turns critical (its liveness TTL).
    ta.signal(Signal::SIGKILL);
    wait_for(T, "pod-a's orders critical by its own TTL", || (consul.service_status(&ida).as_deref() == Some("critical")).then_some(()));
    assert!(passing(&consul, &idb), "pod-b untouched");
    // Restarted after the crash: not refused, and no churn for what is still there.
    ta.restart();
    wait_for(T, "pod-a's orders passing again", || passing(&consul, &ida).then_some(()));

    // SIGTERM pod-b's agent: only its service is deregistered.
    tb.stop();
    consul.wait_gone(&idb, T);
    holds_for(Duration::from_secs(3), LOOK, || assert!(passing(&consul, &ida), "pod-a's service stays"));
    assert_eq!(consul_ids(&consul, "orders"), std::slice::from_ref(&ida));
    assert!(!ta.log().contains("removing a registration"), "pod-a never removed anything:\n{}", ta.log());
}

#[test]
fn two_instances_on_one_etcd_coexist_and_stop_alone() {
    let etcd = Etcd::start(1);
    let (sa, sb) = (HealthServer::start(0, &[]), HealthServer::start(0, &[]));
    let a = Setup::etcd(&etcd, &agent(Some("pod-a")));
    let b = Setup::etcd(&etcd, &agent(Some("pod-b")));
    a.write_service("orders.toml", &service("orders", sa.port));
    b.write_service("orders.toml", &service("orders", sb.port));
    let mut ta = a.start();
    let tb = b.start();
    let ka = format!("services/orders/orders-node-a-pod-a-{}", sa.port);
    let kb = format!("services/orders/orders-node-a-pod-b-{}", sb.port);
    let keys = |etcd: &Etcd| etcd.get_prefix("services/").into_iter().map(|k| k.0).collect::<Vec<_>>();
    wait_for(T, "both pods' keys", || {
        let k = keys(&etcd);
        (k.contains(&ka) && k.contains(&kb)).then_some(())
    });
    let leases: Vec<i64> = etcd.get_prefix("services/").iter().map(|k| k.2).collect();
    assert_ne!(leases[0], leases[1], "one lease per agent");
    holds_for(Duration::from_secs(5), LOOK, || assert!(keys(&etcd).len() == 2, "both keys stay across anti-entropy passes"));

    // SIGTERM pod-a: only its key goes (its lease is revoked).
    ta.stop();
    wait_for(T, "pod-a's key gone", || (!keys(&etcd).contains(&ka)).then_some(()));
    holds_for(Duration::from_secs(3), LOOK, || assert!(keys(&etcd) == [kb.clone()], "pod-b's key stays"));
    // SIGKILL pod-b: its key expires with its lease; restarting pod-a brings back only pod-a's.
    tb.signal(Signal::SIGKILL);
    wait_for(T, "pod-b's key expired", || keys(&etcd).is_empty().then_some(()));
    ta.restart();
    wait_for(T, "pod-a's key back", || (keys(&etcd) == [ka.clone()]).then_some(()));
}

/// A second agent with the same identity, with other service files (it would
/// delete the first one's services as orphans if it ran).
fn second_agent_is_refused(first: &Setup, second: &Setup, runtime: Option<&std::path::Path>, check: impl Fn() -> bool) {
    second.write_service("intruder.toml", &service("intruder", free_port()));
    let mut t2 = match runtime {
        Some(dir) => second.start_with_env(&[("RUNTIME_DIRECTORY", dir.to_str().unwrap())]),
        None => second.start(),
    };
    let started = Instant::now();
    let Some(status) = t2.wait_exit(Duration::from_secs(15)) else {
        panic!("the second agent did not exit within 15 s; its log:\n{}", t2.log());
    };
    eprintln!("instances: second agent refused after {:?}", started.elapsed());
    assert!(!status.success(), "the second agent must exit non-zero");
    let log = t2.log();
    assert!(log.contains("another tether is already running as node \"node-a\" (no instance)"), "{log}");
    assert!(log.contains("set `instance`"), "says what to do:\n{log}");
    assert!(!log.contains("registered"), "wrote nothing:\n{log}");
    assert!(check(), "the first agent's services are untouched");
    let _ = first;
}

#[test]
fn same_identity_is_refused_on_consul_and_a_crash_restart_is_not() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let a = Setup::consul(&consul, "");
    a.write_service("orders.toml", &service("orders", server.port));
    let mut ta = a.start();
    let id = format!("orders-node-a-{}", server.port);
    wait_for(T, "orders passing", || passing(&consul, &id).then_some(()));
    let untouched = || passing(&consul, &id) && consul_ids(&consul, "intruder").is_empty();
    // Same host, same runtime directory: the identity lock.
    second_agent_is_refused(&a, &Setup::consul(&consul, ""), Some(&ta.runtime_dir()), untouched);
    // Another runtime directory (as from another host): the registry.
    second_agent_is_refused(&a, &Setup::consul(&consul, ""), None, untouched);
    holds_for(Duration::from_secs(2), LOOK, || assert!(untouched(), "the first agent carries on"));

    // A restart after SIGKILL is not refused, and re-registers nothing.
    ta.signal(Signal::SIGKILL);
    ta.restart();
    ta.wait_log("anti-entropy: registry in sync", T);
    wait_for(T, "orders passing (its alias follows the new run's first beat)", || passing(&consul, &id).then_some(()));
    assert!(!ta.log().contains("registered service="), "adopted without churn:\n{}", ta.log());
    assert!(ta.log().contains("watching it before starting"), "the wait is explained:\n{}", ta.log());
}

#[test]
fn same_identity_is_refused_on_etcd() {
    let etcd = Etcd::start(1);
    let server = HealthServer::start(0, &[]);
    let a = Setup::etcd(&etcd, "");
    a.write_service("orders.toml", &service("orders", server.port));
    let ta = a.start();
    let key = format!("services/orders/orders-node-a-{}", server.port);
    let keys = |etcd: &Etcd| etcd.get_prefix("services/").into_iter().map(|k| k.0).collect::<Vec<_>>();
    wait_for(T, "orders key", || (keys(&etcd) == [key.clone()]).then_some(()));
    let untouched = || keys(&etcd) == [key.clone()];
    second_agent_is_refused(&a, &Setup::etcd(&etcd, ""), Some(&ta.runtime_dir()), untouched);
    second_agent_is_refused(&a, &Setup::etcd(&etcd, ""), None, untouched);
    holds_for(Duration::from_secs(2), LOOK, || assert!(untouched(), "the first agent carries on"));
}

fn cli_ok(t: &Tether, args: &[&str]) -> String {
    let out = t.cli(args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tether {args:?} failed: {text}");
    text
}

#[test]
fn drain_and_undrain_on_consul_survive_a_reload() {
    let consul = Consul::start();
    let mut server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, &agent(None));
    setup.write_service(
        "a.toml",
        "name = \"alpha\"\nid = \"alpha\"\nport = PORT\nttl = \"3s\"\n".replace("PORT", &server.port.to_string()).as_str(),
    );
    setup.write_service(
        "b.toml",
        "name = \"beta\"\nid = \"beta\"\nport = PORT\nttl = \"3s\"\n".replace("PORT", &server.port.to_string()).as_str(),
    );
    let tether = setup.start();
    wait_for(T, "alpha and beta passing", || (passing(&consul, "alpha") && passing(&consul, "beta")).then_some(()));

    // Only the agent's user and group may use the control socket.
    let socket = tether.runtime_dir().join("tether.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660, "control socket mode");

    let out = cli_ok(&tether, &["drain", "alpha", "--wait"]);
    assert!(out.contains("drained alpha (the registry shows it)"), "{out}");
    // --wait returned: the registry shows it already.
    assert_eq!(consul.service_status("alpha").as_deref(), Some("critical"), "in maintenance");
    assert!(consul.checks().contains_key("_service_maintenance:alpha"));
    assert!(passing(&consul, "beta"), "beta untouched");

    // Kept out whatever its health, across a reload and anti-entropy passes.
    server.set("not_serving");
    consul.wait_health("alpha", "critical", T);
    server.set("serving");
    consul.wait_health("alpha", "passing", T);
    // An edited agent file is not read by a reload, and the reload says so.
    let edited = std::fs::read_to_string(setup.config()).unwrap() + "# edited\n";
    std::fs::write(setup.config(), edited).unwrap();
    tether.signal(Signal::SIGHUP);
    tether.wait_log("SIGHUP", T);
    tether.wait_log("the agent file changed since tether started", T);
    holds_for(Duration::from_secs(3), LOOK, || assert!(consul.checks().contains_key("_service_maintenance:alpha"), "alpha stays drained"));
    let state = cli_ok(&tether, &["drain", "alpha"]);
    assert!(state.contains("drained alpha"), "{state}");

    // A changed file registers alpha again: in maintenance from that write
    // on (no maintenance write after it, so never a moment passing).
    setup.write_service(
        "a.toml",
        "name = \"alpha\"\nid = \"alpha\"\nport = PORT\nttl = \"3s\"\ntags = [\"v2\"]\n".replace("PORT", &server.port.to_string()).as_str(),
    );
    wait_for(T, "alpha re-registered with its new tag", || (consul.services()["alpha"]["Tags"] == serde_json::json!(["v2"])).then_some(()));
    assert!(consul.checks().contains_key("_service_maintenance:alpha"), "registered in maintenance");
    assert_eq!(tether.log().matches("drained (maintenance on)").count(), 1, "no second maintenance write:\n{}", tether.log());

    let out = cli_ok(&tether, &["undrain", "alpha", "--wait"]);
    assert!(out.contains("undrained alpha (the registry shows it)"), "{out}");
    assert!(passing(&consul, "alpha"), "back in the healthy set");
    assert!(!consul.checks().contains_key("_service_maintenance:alpha"));

    // --all, and an unknown id is an error that changes nothing.
    cli_ok(&tether, &["drain", "--all", "--wait"]);
    assert!(["alpha", "beta"].iter().all(|id| consul.service_status(id).as_deref() == Some("critical")));
    let out = tether.cli(&["undrain", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service with id nope"), "{out:?}");
    cli_ok(&tether, &["undrain", "--all", "--wait"]);
    assert!(passing(&consul, "alpha") && passing(&consul, "beta"));
}

#[test]
fn a_drain_survives_a_restart_of_tether_until_undrained() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, &agent(None));
    for (file, id) in [("a.toml", "alpha"), ("b.toml", "beta")] {
        setup.write_service(file, &format!("name = \"{id}\"\nid = \"{id}\"\nport = {}\nttl = \"3s\"\n", server.port));
    }
    let mut tether = setup.start();
    wait_for(T, "alpha and beta passing", || (passing(&consul, "alpha") && passing(&consul, "beta")).then_some(()));
    cli_ok(&tether, &["drain", "alpha", "--wait"]);
    let maintenance = |consul: &Consul| consul.checks().contains_key("_service_maintenance:alpha");

    // A crash: Consul keeps alpha in maintenance, and the next run keeps the
    // drain instead of lifting it (the log is the new run's).
    tether.signal(Signal::SIGKILL);
    tether.restart();
    tether.wait_log("anti-entropy: registry in sync", T);
    assert!(tether.log().contains("kept from before tether restarted"), "{}", tether.log());
    holds_for(Duration::from_secs(3), LOOK, || assert!(maintenance(&consul), "alpha stays drained after a crash and restart"));
    assert!(passing(&consul, "beta"), "beta untouched");

    // A clean stop deregisters both; the next run registers alpha drained.
    tether.stop();
    wait_for(T, "both deregistered", || {
        (consul.service_status("alpha").is_none() && consul.service_status("beta").is_none()).then_some(())
    });
    tether.restart();
    wait_for(T, "alpha back, in maintenance", || maintenance(&consul).then_some(()));
    wait_for(T, "beta passing again", || passing(&consul, "beta").then_some(()));
    holds_for(Duration::from_secs(2), LOOK, || assert!(maintenance(&consul), "alpha stays drained"));

    // An undrain ends it for good: the next restart does not bring it back.
    cli_ok(&tether, &["undrain", "alpha", "--wait"]);
    tether.signal(Signal::SIGKILL);
    tether.restart();
    tether.wait_log("anti-entropy: registry in sync", T);
    assert!(!tether.log().contains("kept from before"), "{}", tether.log());
    holds_for(Duration::from_secs(2), LOOK, || {
        assert!(passing(&consul, "alpha") && !maintenance(&consul), "alpha stays in the healthy set")
    });
}

/// A restart with a service file that no longer parses (a typo, or a newer
/// tether that checks more) keeps that service's registration and its drain
/// until the file is fixed: tether cannot tell which registration was the
/// file's, so it removes none while a file cannot be read.
#[test]
fn a_file_broken_across_a_restart_keeps_its_registration_and_drain() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, &agent(None));
    let file = |id: &str, extra: &str| format!("name = \"{id}\"\nid = \"{id}\"\nport = {}\nttl = \"3s\"\n{extra}", server.port);
    setup.write_service("a.toml", &file("alpha", ""));
    setup.write_service("b.toml", &file("beta", ""));
    let mut tether = setup.start();
    wait_for(T, "alpha and beta passing", || (passing(&consul, "alpha") && passing(&consul, "beta")).then_some(()));
    cli_ok(&tether, &["drain", "beta", "--wait"]);
    let maintenance = |consul: &Consul| consul.checks().contains_key("_service_maintenance:beta");

    tether.signal(Signal::SIGKILL);
    setup.write_service("b.toml", &file("beta", "prot = 1\n"));
    tether.restart();
    tether.wait_log("anti-entropy: registry in sync", T);
    let log = tether.log();
    assert!(log.contains("unknown field `prot`"), "{log}");
    assert!(log.contains("keeping registrations of this node that no file describes"), "{log}");
    // Several anti-entropy passes (every second): beta stays, drained.
    holds_for(Duration::from_secs(3), LOOK, || assert!(maintenance(&consul), "beta's registration and drain are kept"));
    assert!(passing(&consul, "alpha"), "alpha carries on");

    // Fixed: beta is probed again, and still drained.
    setup.write_service("b.toml", &file("beta", ""));
    tether.wait_log("drained (kept from before tether restarted", T);
    holds_for(Duration::from_secs(2), LOOK, || assert!(maintenance(&consul), "beta stays drained"));
    cli_ok(&tether, &["undrain", "beta", "--wait"]);
    assert!(passing(&consul, "beta"));
}

#[test]
fn drain_and_undrain_on_etcd() {
    let etcd = Etcd::start(1);
    let server = HealthServer::start(0, &[]);
    let setup = Setup::etcd(&etcd, &agent(None));
    setup.write_service(
        "a.toml",
        &format!("name = \"alpha\"\nid = \"alpha\"\naddress = \"127.0.0.1\"\nport = {}\nttl = \"3s\"\n", server.port),
    );
    let tether = setup.start();
    let present = |etcd: &Etcd| etcd.get_prefix("services/alpha/alpha").len() == 1;
    wait_for(T, "alpha's key", || present(&etcd).then_some(()));
    cli_ok(&tether, &["drain", "alpha", "--wait"]);
    assert!(!present(&etcd), "--wait returned once the key was gone");
    tether.signal(Signal::SIGHUP);
    tether.wait_log("SIGHUP", T);
    holds_for(Duration::from_secs(3), LOOK, || assert!(!present(&etcd), "stays drained across a reload and anti-entropy"));
    cli_ok(&tether, &["undrain", "alpha", "--wait"]);
    assert!(present(&etcd), "--wait returned once the key was back");
}

#[test]
fn etcd_restart_after_sigkill_is_not_refused_and_rewrites_nothing() {
    let etcd = Etcd::start(1);
    let server = HealthServer::start(0, &[]);
    let setup = Setup::etcd(&etcd, "");
    // ttl 15 s: the lease outlives the restart (which watches it for ttl/3 + 1.5 s).
    setup.write_service("orders.toml", &format!("name = \"orders\"\naddress = \"127.0.0.1\"\nport = {}\nttl = \"15s\"\n", server.port));
    let mut tether = setup.start();
    let key = format!("services/orders/orders-node-a-{}", server.port);
    let revs = |etcd: &Etcd| etcd.get_prefix("services/").into_iter().map(|k| (k.0, k.2, k.3)).collect::<Vec<_>>();
    wait_for(T, "orders key", || (revs(&etcd).len() == 1).then_some(()));
    let before = revs(&etcd);
    assert_eq!(before[0].0, key);
    tether.signal(Signal::SIGKILL);
    tether.restart();
    tether.wait_log("adopted tether's existing etcd lease", T);
    tether.wait_log("anti-entropy: registry in sync", T);
    assert_eq!(revs(&etcd), before, "same key, same lease, not rewritten");
}
