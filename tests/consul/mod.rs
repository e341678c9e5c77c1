//! tether on Consul, end to end.

use crate::support::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn service(name: &str, port: u16, extra: &str) -> String {
    format!("name = \"{name}\"\nport = {port}\nttl = \"3s\"\n{extra}\n")
}

#[test]
fn registers_fields_and_follows_health_in_watch_mode() {
    let consul = Consul::start();
    let mut server = HealthServer::start(0, &["orders.v1.Orders"]);
    let setup = Setup::consul(&consul, "");
    setup.write_service(
        "orders.toml",
        &format!(
            "name = \"orders\"\nid = \"orders-1\"\naddress = \"10.0.0.5\"\nport = {}\ntags = [\"grpc\", \"v1\"]\nmeta = {{ version = \"1.2.3\" }}\n[check]\ntarget = \"{}\"\nservice = \"orders.v1.Orders\"\n",
            server.port,
            server.addr()
        ),
    );
    let tether = setup.start();
    consul.wait_health("orders-1", "passing", T);

    let svc = consul.services()["orders-1"].clone();
    assert_eq!(svc["Service"], "orders");
    assert_eq!(svc["Address"], "10.0.0.5");
    assert_eq!(svc["Port"], server.port);
    assert_eq!(svc["Tags"], serde_json::json!(["grpc", "v1"]));
    assert_eq!(svc["Meta"], serde_json::json!({"version": "1.2.3", "managed-by": "tether", "tether-node": "node-a"}));
    // One write per new service, and while it passes one check: the alias of
    // tether's liveness, whose notes describe the gRPC check.
    let checks = consul.checks();
    let mine: Vec<&str> = checks.values().filter(|c| c["ServiceID"] == "orders-1").filter_map(|c| c["CheckID"].as_str()).collect();
    assert_eq!(mine, ["tether-alive:orders-1"], "only the alias check while passing");
    let notes = checks["tether-alive:orders-1"]["Notes"].as_str().unwrap();
    assert!(notes.contains("orders.v1.Orders") && notes.contains("watch"), "{notes}");
    assert_eq!(consul.service_status("orders-1").as_deref(), Some("passing"));
    assert!(consul.services().contains_key("tether-node-a"), "tether's own liveness service");
    // The Consul of the tests (1.8.7) leaks deregistered alias checks: one warning says so.
    let log = tether.log();
    assert_eq!(log.matches("hashicorp/consul#14935").count(), 1, "one warning about the alias-check leak:\n{log}");
    assert!(log.contains("version=1.8.7"), "{log}");

    for _ in 0..3 {
        server.set("not_serving");
        let took = consul.wait_health("orders-1", "critical", T);
        eprintln!("watch: NOT_SERVING -> critical in {took:?}");
        assert_eq!(consul.health("orders-1").unwrap().1, "NOT_SERVING");
        server.set("serving");
        let took = consul.wait_health("orders-1", "passing", T);
        eprintln!("watch: SERVING -> passing in {took:?}");
    }
    assert!(!tether.log().contains("ERROR"), "{}", tether.log());

    // SIGTERM deregisters what it owns (deregister_on_shutdown defaults to true).
    let mut tether = tether;
    tether.stop();
    assert!(consul.services().is_empty(), "{:?}", consul.services().keys());
}

#[test]
fn poll_mode_follows_health() {
    let consul = Consul::start();
    let mut server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    setup.write_service(
        "a.toml",
        &service("alpha", server.port, "id = \"alpha\"\n[check]\nmode = \"poll\"\ninterval = \"300ms\"\ntimeout = \"1s\""),
    );
    let _tether = setup.start();
    consul.wait_health("alpha", "passing", T);
    server.set("not_serving");
    let took = consul.wait_health("alpha", "critical", T);
    eprintln!("poll: NOT_SERVING -> critical in {took:?}");
    server.set("serving");
    consul.wait_health("alpha", "passing", T);
}

#[test]
fn killed_frozen_and_gracefully_stopped_services_go_critical() {
    let consul = Consul::start();
    let setup = Setup::consul(&consul, "");
    let server = HealthServer::start(0, &[]);
    let port = server.port;
    setup.write_service("k.toml", &service("killed", port, "id = \"k\"\n[check]\ninterval = \"1s\"\ntimeout = \"1s\""));
    let _tether = setup.start();
    consul.wait_health("k", "passing", T);

    // SIGKILL: the connection drops, seen at once.
    let mut server = server;
    let start = Instant::now();
    server.kill();
    consul.wait_health("k", "critical", T);
    eprintln!("killed -> critical in {:?}", start.elapsed());
    let output = consul.health("k").unwrap().1;
    assert!(output.contains("connection") || output.contains("stream"), "output says why: {output}");

    // Back on the same port: passing again after reconnect.
    let mut server = HealthServer::start(port, &[]);
    consul.wait_health("k", "passing", T);

    // SIGSTOP: no answer; the periodic Check's deadline sees it.
    let start = Instant::now();
    server.signal(Signal::SIGSTOP);
    consul.wait_health("k", "critical", T);
    eprintln!("frozen -> critical in {:?}", start.elapsed());
    assert!(consul.health("k").unwrap().1.contains("deadline"), "{:?}", consul.health("k"));
    server.signal(Signal::SIGCONT);
    consul.wait_health("k", "passing", T);

    // Graceful stop: NOT_SERVING, then the server must be able to finish
    // shutting down although tether watches it.
    let start = Instant::now();
    assert!(server.stop_gracefully(Duration::from_secs(10)));
    eprintln!("graceful stop finished in {:?}", start.elapsed());
    consul.wait_health("k", "critical", T);
}

#[test]
fn file_removed_deregisters_and_change_updates_without_blip() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    let path = setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\"\ntags = [\"one\"]"));
    setup.write_service("b.toml", &service("beta", server.port, "id = \"beta\""));
    let tether = setup.start();
    consul.wait_health("alpha", "passing", T);
    consul.wait_health("beta", "passing", T);

    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\"\ntags = [\"one\", \"two\"]\nmeta = { v = \"2\" }"));
    wait_for(T, "tags to update", || {
        let s = consul.services().get("alpha").cloned()?;
        assert_eq!(consul.health("alpha").map(|c| c.0).as_deref(), Some("passing"), "no critical blip on change");
        (s["Tags"] == serde_json::json!(["one", "two"]) && s["Meta"]["v"] == "2").then_some(())
    });
    for _ in 0..20 {
        assert_eq!(consul.health("alpha").map(|c| c.0).as_deref(), Some("passing"), "no critical blip on change");
    }

    std::fs::remove_file(&path).unwrap();
    consul.wait_gone("alpha", T);
    assert!(consul.services().contains_key("beta"), "the other service is untouched");
    assert!(tether.log().contains("service file removed"));
}

#[test]
fn bad_file_reports_error_and_keeps_last_good() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    let good = service("alpha", server.port, "id = \"alpha\"\ntags = [\"v1\"]");
    let path = setup.write_service("a.toml", &good);
    let tether = setup.start();
    consul.wait_health("alpha", "passing", T);

    setup.write_service("a.toml", &format!("{good}portt = 5\n"));
    let place = format!("{}:6:1: unknown field `portt`", path.display());
    tether.wait_log(&place, T);
    setup.write_service("new.toml", "name = \"\"\nport = 0\n");
    tether.wait_log("new.toml:1:8: name \"\" is empty", T);
    setup.write_service("dup.toml", &service("alpha", server.port, "id = \"alpha\""));
    tether.wait_log("duplicate service id \"alpha\"", T);
    assert_eq!(consul.health("alpha").unwrap().0, "passing", "last good version keeps running");
    assert_eq!(consul.services()["alpha"]["Tags"], serde_json::json!(["v1"]));
    assert_eq!(consul.services().len(), 2, "alpha and tether's own service only: {:?}", consul.services().keys());

    // Fixing the file applies it.
    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\"\ntags = [\"v2\"]"));
    wait_for(T, "fixed file to apply", || (consul.services()["alpha"]["Tags"] == serde_json::json!(["v2"])).then_some(()));
}

#[test]
fn new_passing_services_never_show_critical_in_the_catalog() {
    // Consul starts an alias check critical until it has looked at its
    // target, and may sync that to the catalog first. tether registers it
    // passing: a new SERVING service is never critical there, not for a moment.
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    let ids: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    for id in &ids {
        setup.write_service(&format!("{id}.toml"), &service(id, server.port, &format!("id = \"{id}\"")));
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            // Every answer of blocking queries on the catalog's critical checks.
            let (mut seen, mut index) = (Vec::new(), 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (checks, next) = consul.get_with_index(&format!("/v1/health/state/critical?index={index}&wait=1s"));
                seen.extend(checks.as_array().unwrap().iter().filter_map(|c| c["CheckID"].as_str().map(String::from)));
                index = if next > index { next } else { 0 };
            }
            seen
        });
        let _tether = setup.start();
        wait_for(T, "20 services passing in the catalog", || {
            let passing = consul.get("/v1/health/state/passing");
            let n = passing
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["CheckID"].as_str().is_some_and(|id| id.starts_with("tether-alive:")))
                .count();
            (n == ids.len()).then_some(())
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    let mine: Vec<&String> = seen.iter().filter(|id| id.starts_with("tether")).collect();
    assert!(mine.is_empty(), "critical in the catalog at some point: {mine:?}");
}

#[test]
fn tether_killed_consul_marks_critical_by_itself() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\""));
    let mut tether = setup.start();
    consul.wait_health("alpha", "passing", T);
    assert_eq!(consul.service_status("alpha").as_deref(), Some("passing"));

    let start = Instant::now();
    tether.signal(Signal::SIGKILL);
    wait_for(T, "Consul to turn alpha critical", || (consul.service_status("alpha").as_deref() == Some("critical")).then_some(()));
    let took = start.elapsed();
    eprintln!("tether SIGKILL -> critical by TTL in {took:?} (ttl 3s)");
    assert_eq!(consul.check("tether-alive:alpha").unwrap().0, "critical", "Consul's alias of tether's liveness went critical");
    assert_eq!(consul.check("tether-liveness:node-a").unwrap().0, "critical");
    tether.kill();
}

#[test]
fn restart_makes_no_duplicate_and_no_blip() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "deregister_on_shutdown = false");
    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\""));
    let mut tether = setup.start();
    consul.wait_health("alpha", "passing", T);
    // Let Consul's anti-entropy copy the agent state into the catalog, and
    // Consul register its own node's serfHealth check (a new dev agent may
    // do that after tether's service is in; it moves this entry's index).
    let (before, index) = wait_for(T, "alpha passing in the catalog, with the node's serfHealth", || {
        let (v, i) = consul.get_with_index("/v1/health/service/alpha?passing=true");
        let checks = v.as_array().filter(|a| a.len() == 1)?[0]["Checks"].as_array()?.clone();
        checks.iter().any(|c| c["CheckID"] == "serfHealth").then_some((v, i))
    });

    tether.stop();
    assert!(consul.services().contains_key("alpha"), "left registered (deregister_on_shutdown = false)");
    tether.restart();
    tether.wait_log("anti-entropy", T);
    // Watch for a while: never critical, never twice.
    holds_for(Duration::from_secs(2), Duration::from_millis(50), || {
        assert_eq!(consul.health("alpha").unwrap().0, "passing", "no critical blip on restart");
        let n = consul.services().values().filter(|s| s["Service"] == "alpha").count();
        assert_eq!(n, 1, "no duplicate");
    });
    let (v, index_after) = consul.get_with_index("/v1/health/service/alpha");
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(
        index,
        index_after,
        "the restart wrote nothing that changed the catalog entry:\nbefore {before:#}\nafter {v:#}\n{}",
        tether.log()
    );
    assert!(!tether.log().contains("registered service="), "no re-register:\n{}", tether.log());
}

#[test]
fn sighup_reloads_and_anti_entropy_restores_after_consul_restart() {
    let mut consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\""));
    let tether = setup.start();
    consul.wait_health("alpha", "passing", T);

    // SIGHUP triggers the same reload.
    setup.write_service("b.toml", &service("beta", server.port, "id = \"beta\""));
    tether.signal(Signal::SIGHUP);
    tether.wait_log("SIGHUP", T);
    consul.wait_health("beta", "passing", T);

    // Consul loses all its state: tether's heartbeat fails and anti-entropy
    // puts everything back.
    let start = Instant::now();
    consul.restart();
    consul.wait_health("alpha", "passing", Duration::from_secs(30));
    consul.wait_health("beta", "passing", Duration::from_secs(30));
    eprintln!("Consul restart -> all re-registered in {:?}", start.elapsed());
    assert_eq!(consul.service_status("alpha").as_deref(), Some("passing"));

    // A registration owned by this node that no file describes is removed;
    // one owned by someone else is left alone.
    let orphan =
        serde_json::json!({"ID": "orphan", "Name": "orphan", "Port": 1, "Meta": {"managed-by": "tether", "tether-node": "node-a"}});
    let foreign =
        serde_json::json!({"ID": "foreign", "Name": "foreign", "Port": 1, "Meta": {"managed-by": "tether", "tether-node": "node-b"}});
    consul.put("/v1/agent/service/register", &orphan);
    consul.put("/v1/agent/service/register", &foreign);
    // Deregistering tether's own service makes its next heartbeat fail, which
    // runs anti-entropy at once rather than at the next period.
    consul.put("/v1/agent/service/deregister/tether-node-a", &serde_json::json!({}));
    consul.wait_gone("orphan", T);
    assert!(consul.services().contains_key("foreign"));
    assert!(consul.services().contains_key("tether-node-a"));
}

#[test]
fn a_service_in_the_earlier_two_check_shape_is_re_registered_with_its_alias_only() {
    // Earlier tethers gave every service a passing TTL health check beside
    // the alias; the alias alone is cheaper for Consul (ARCHITECTURE.md).
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let old = serde_json::json!({
        "ID": "alpha", "Name": "alpha", "Port": server.port,
        "Meta": {"managed-by": "tether", "tether-node": "node-a"},
        "Checks": [
            {"CheckID": "tether:alpha", "Name": "gRPC health (tether)", "TTL": "24h", "Status": "passing"},
            {"CheckID": "tether-alive:alpha", "Name": "tether agent alive", "AliasService": "tether-node-a"},
        ],
    });
    consul.put("/v1/agent/service/register", &old);
    let setup = Setup::consul(&consul, "");
    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\""));
    let _tether = setup.start();
    let only_alias = || {
        let checks = consul.checks();
        let mine: Vec<String> =
            checks.values().filter(|c| c["ServiceID"] == "alpha").filter_map(|c| c["CheckID"].as_str().map(String::from)).collect();
        (mine == ["tether-alive:alpha"] && Consul::passing_in(&checks, "alpha")).then_some(())
    };
    wait_for(T, "alpha with its alias check only, passing", only_alias);
    assert_eq!(consul.services().keys().filter(|k| k.as_str() == "alpha").count(), 1);
}

#[test]
fn configmap_symlink_swap_is_followed() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    let dir = setup.services_dir();
    // The layout Kubernetes gives a mounted ConfigMap.
    let v1 = dir.join("..2026_01_01_v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("svc.toml"), service("alpha", server.port, "id = \"alpha\"\ntags = [\"v1\"]")).unwrap();
    std::os::unix::fs::symlink("..2026_01_01_v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/svc.toml", dir.join("svc.toml")).unwrap();
    let _tether = setup.start();
    consul.wait_health("alpha", "passing", T);

    let v2 = dir.join("..2026_01_01_v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("svc.toml"), service("alpha", server.port, "id = \"alpha\"\ntags = [\"v2\"]")).unwrap();
    std::os::unix::fs::symlink("..2026_01_01_v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    wait_for(T, "the swapped ConfigMap to apply", || (consul.services()["alpha"]["Tags"] == serde_json::json!(["v2"])).then_some(()));
}

#[test]
fn unimplemented_health_is_never_healthy() {
    let consul = Consul::start();
    let server = HealthServer::start_without_health(0);
    let setup = Setup::consul(&consul, "");
    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\"\n[check]\ninterval = \"500ms\""));
    let tether = setup.start();
    tether.wait_log("polling Check instead", T);
    wait_for(T, "an UNIMPLEMENTED output", || consul.health("alpha").filter(|c| c.1.contains("UNIMPLEMENTED")).map(|_| ()));
    assert_eq!(consul.health("alpha").unwrap().0, "critical");
    assert_eq!(tether.log().matches("polling Check instead").count(), 1, "logged once");
}

#[test]
fn critical_services_are_deregistered_after_deregister_critical_after() {
    // Consul's minimum is 1m and its reaper runs every 30s: this test takes
    // up to ~2 minutes, in parallel with the rest.
    let consul = Consul::start();
    let mut server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\"\nderegister_critical_after = \"1m\""));
    setup.write_service(
        "b.toml",
        &service("beta", server.port, "id = \"beta\"\nderegister_critical_after = \"1m\"\n[check]\nservice = \"beta\""),
    );
    let mut tether = setup.start();
    consul.wait_health("alpha", "passing", T);

    // beta's gRPC service is unknown to the server: critical from the start,
    // removed by tether after 1m; alpha stays.
    let start = Instant::now();
    consul.wait_health("beta", "critical", T);
    consul.wait_gone("beta", Duration::from_secs(150));
    eprintln!("critical beta deregistered after {:?} (deregister_critical_after 1m)", start.elapsed());
    assert!(consul.services().contains_key("alpha"));

    // It comes back when it passes again: here, when its file points at the
    // whole server instead.
    setup.write_service("b.toml", &service("beta", server.port, "id = \"beta\"\nderegister_critical_after = \"1m\""));
    consul.wait_health("beta", "passing", T);

    // tether dies: Consul itself marks everything critical, then removes it.
    let start = Instant::now();
    tether.signal(Signal::SIGKILL);
    tether.kill();
    server.set("serving");
    consul.wait_gone("alpha", Duration::from_secs(180));
    eprintln!("tether SIGKILL -> alpha removed by Consul after {:?} (ttl 3s + deregister_critical_after 1m + reaper)", start.elapsed());
    consul.wait_gone("beta", Duration::from_secs(60));
}

/// Consul 1.8 restoring an agent's state may start a service's alias check
/// before tether's own service is back; an alias check is looked at again
/// only when that service's checks change, so it stays critical while
/// tether's liveness passes. Anti-entropy finds such a check and registers
/// the service again. Here the stale alias is made by hand: the same check
/// id, aliasing a service that does not exist.
#[test]
fn a_stale_alias_check_is_registered_again() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "anti_entropy_interval = \"1s\"");
    setup.write_service("a.toml", &service("alpha", server.port, "id = \"alpha\""));
    let tether = setup.start();
    consul.wait_health("alpha", "passing", T);
    // The same notes as tether's (they are part of what it compares): only the status is stale.
    let notes = consul.checks()["tether-alive:alpha"]["Notes"].clone();
    let stale = serde_json::json!({"ID": "tether-alive:alpha", "Name": "stale", "Notes": notes, "ServiceID": "alpha", "AliasService": "no-such-service"});
    consul.put("/v1/agent/check/register", &stale);
    // Not waited for as "critical" first: under load anti-entropy (every
    // second) may mend it before the test looks. Its log line says it saw it.
    tether.wait_log("alias check is not passing while tether's liveness is", T);
    wait_for(T, "the alias check passing again", || (consul.check("tether-alive:alpha")?.0 == "passing").then_some(()));
    assert_eq!(consul.checks()["tether-alive:alpha"]["Name"], "tether agent alive", "tether's own alias check again");
    assert_eq!(consul.services().values().filter(|s| s["Service"] == "alpha").count(), 1, "no duplicate");
}
