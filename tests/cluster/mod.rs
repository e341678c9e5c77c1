//! tether on a production-shaped Consul: three servers and two client
//! agents on loopback, ACLs on with default deny (`support::cluster`). tether
//! talks to client agent A with a token made from the policy in README.md's
//! "Minimal Consul ACL policy", read out of the README as written; a consumer
//! reads through client agent B. Each test starts its own cluster.

use crate::support::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);
/// tether's node (owner) name; its liveness service is `tether-node-a`.
const NODE: &str = "node-a";

/// The first `hcl` block of README.md's "Minimal Consul ACL policy" section.
fn readme_policy() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("\n## Minimal Consul ACL policy\n").nth(1).expect("README.md has a section \"Minimal Consul ACL policy\"");
    let section = section.split("\n## ").next().unwrap();
    let block = section.split("```hcl\n").nth(1).expect("an ```hcl block in the section");
    block.split("\n```").next().unwrap().to_string()
}

/// A service file: watch mode, short TTL and intervals, so that things converge fast.
fn service_file(name: &str, id: &str, port: u16) -> String {
    format!("name = \"{name}\"\nid = \"{id}\"\nport = {port}\nttl = \"3s\"\n[check]\ninterval = \"1s\"\ntimeout = \"1s\"\n")
}

/// tether on client agent A with `token` (in a token file), its status on a
/// local port, and one service file per (name, id, port).
fn start_tether(cluster: &ConsulCluster, token: &str, services: &[(&str, &str, u16)]) -> (Setup, Tether) {
    use std::os::unix::fs::OpenOptionsExt;
    let setup = Setup::consul_at(&cluster.url_a(), "");
    let text = format!(
        "services_dir = \"services.d\"\nnode = \"{NODE}\"\nlisten = \"127.0.0.1:{}\"\n[consul]\naddress = \"{}\"\ntoken_file = \"consul.token\"\n",
        free_port(),
        cluster.url_a()
    );
    std::fs::write(setup.config(), text).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(setup.dir.path().join("consul.token")).unwrap();
    std::io::Write::write_all(&mut f, token.as_bytes()).unwrap();
    for (name, id, port) in services {
        setup.write_service(&format!("{id}.toml"), &service_file(name, id, *port));
    }
    let tether = setup.start();
    (setup, tether)
}

type Registrations = BTreeMap<String, BTreeMap<String, String>>;

/// What node A should hold in the catalog: the node's serfHealth, tether's
/// liveness service, and per (id, passing) a service with its alias check,
/// plus its health check while it is not passing.
fn expected(services: &[(&str, bool)]) -> Registrations {
    let check = |id: &str, status: &str| (id.to_string(), status.to_string());
    let mut want: Registrations = BTreeMap::new();
    want.insert(String::new(), [check("serfHealth", "passing")].into());
    want.insert(format!("tether-{NODE}"), [check(&format!("tether-liveness:{NODE}"), "passing")].into());
    for (id, passing) in services {
        let mut checks: BTreeMap<String, String> = [check(&format!("tether-alive:{id}"), "passing")].into();
        if !passing {
            checks.insert(format!("tether:{id}"), "critical".into());
        }
        want.insert(id.to_string(), checks);
    }
    want
}

/// Wait until the catalog, read through client agent B, holds exactly `want`
/// for node A: those services with those checks, no orphan, no duplicate.
fn wait_catalog(cluster: &ConsulCluster, want: &Registrations, limit: Duration, tether: &Tether) {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < limit {
        last = cluster.node_registrations(&cluster.url_b(), cluster.node_a());
        if last.as_ref() == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "node A in the catalog (seen from B) after {limit:?}:\n{last:#?}\nwanted:\n{want:#?}\ntether log:\n{}\nclient A log:\n{}",
        tether.log(),
        cluster.clients[0].log_text()
    );
}

/// The ids in `name`'s passing set, read through client agent B with a
/// blocking query from `index`; returns once the set is exactly `want` (an
/// answer that is not goes round again from its index), with the index of
/// that answer. Errors (no leader during an election) are retried.
fn wait_passing(cluster: &ConsulCluster, tether: &Tether, name: &str, index: u64, want: &[&str], limit: Duration) -> u64 {
    let mut index = index;
    let mut seen = Vec::new();
    let start = Instant::now();
    while start.elapsed() < limit {
        let path = format!("/v1/health/service/{name}?passing&index={index}&wait=5s");
        match cluster.get_with_index(&cluster.url_b(), &path) {
            Ok((v, next)) => {
                let ids: Vec<String> = v.as_array().unwrap().iter().filter_map(|e| e["Service"]["ID"].as_str().map(String::from)).collect();
                seen.push(ids.clone());
                if ids == want {
                    eprintln!("{name}'s passing set on B became {want:?} in {:?} (answers: {seen:?})", start.elapsed());
                    return next;
                }
                // An index that went backwards (a new leader's) starts over.
                index = if next > index { next } else { 0 };
            }
            Err(e) => {
                seen.push(vec![format!("error: {e}")]);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    panic!(
        "timed out after {limit:?} waiting for {name}'s passing set on client agent B to be {want:?}; answers: {seen:?}\n\
         tether log:\n{}\n{}",
        tether.log(),
        cluster.log_tails()
    );
}

/// `tether status --json`.
fn status(tether: &Tether) -> Value {
    let out = tether.cli(&["status", "--json"]);
    assert!(out.status.success(), "tether status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn minimal_policy_flips_reach_a_consumer_on_another_agent_and_sigterm_leaves_nothing() {
    let cluster = ConsulCluster::start();
    let token = cluster.create_token(&readme_policy());
    let mut orders = HealthServer::start(0, &[]);
    let audit = HealthServer::start(0, &[]);
    let (_setup, mut tether) =
        start_tether(&cluster, &token, &[("orders", "orders-1", orders.port), ("orders-audit", "orders-audit-1", audit.port)]);
    wait_catalog(&cluster, &expected(&[("orders-1", true), ("orders-audit-1", true)]), T, &tether);

    // A flip reaches a blocking query on the other client agent, and back.
    let index = wait_passing(&cluster, &tether, "orders", 0, &["orders-1"], T);
    orders.set("not_serving");
    let index = wait_passing(&cluster, &tether, "orders", index, &[], T);
    orders.set("serving");
    wait_passing(&cluster, &tether, "orders", index, &["orders-1"], T);
    wait_catalog(&cluster, &expected(&[("orders-1", true), ("orders-audit-1", true)]), T, &tether);
    // Only the agent's version (read for a warning) needs more, and the
    // README says so: that refusal is a debug line; nothing else is refused.
    let log = tether.log();
    let refused: Vec<&str> =
        log.lines().filter(|l| l.contains("Permission denied") && !l.contains("could not read the Consul agent's version")).collect();
    assert!(refused.is_empty(), "the README's policy lets tether do all it does:\n{log}");

    // SIGTERM: nothing of tether's is left on node A, as seen from B.
    tether.stop();
    let mut only_node: Registrations = BTreeMap::new();
    only_node.insert(String::new(), [("serfHealth".to_string(), "passing".to_string())].into());
    wait_catalog(&cluster, &only_node, T, &tether);
}

#[test]
fn a_flip_during_a_leader_election_arrives() {
    let mut cluster = ConsulCluster::start();
    let token = cluster.create_token(&readme_policy());
    let mut orders = HealthServer::start(0, &[]);
    let audit = HealthServer::start(0, &[]);
    let (_setup, tether) =
        start_tether(&cluster, &token, &[("orders", "orders-1", orders.port), ("orders-audit", "orders-audit-1", audit.port)]);
    wait_catalog(&cluster, &expected(&[("orders-1", true), ("orders-audit-1", true)]), T, &tether);
    let index = wait_passing(&cluster, &tether, "orders", 0, &["orders-1"], T);

    // Kill the leader and flip at once, while the servers elect another.
    // tether writes to agent A, which takes it at once and copies it to
    // the servers when it can (a copy that fails is retried at A's next
    // change or full sync, hence the longer limit).
    let old = cluster.leader();
    let killed = Instant::now();
    cluster.kill_server(old);
    orders.set("not_serving");
    let new = cluster.leader();
    assert_ne!(new, old);
    eprintln!("server-{old} (leader) killed; server-{new} leads after {:?}", killed.elapsed());
    let index = wait_passing(&cluster, &tether, "orders", index, &[], Duration::from_secs(30));
    // And back, still on two servers. Client agent A may have cached an "ACL
    // not found" from the election for its token_ttl (30 s, Consul 1.8's
    // default): tether's writes and beats are refused until it expires, and
    // retried (a transient error), so the flip arrives within that, not at once.
    orders.set("serving");
    let healed = Duration::from_secs(60);
    wait_passing(&cluster, &tether, "orders", index, &["orders-1"], healed);
    wait_catalog(&cluster, &expected(&[("orders-1", true), ("orders-audit-1", true)]), healed, &tether);
    let log = tether.log();
    // Agent A answers throughout the election, or at most with that
    // transient "ACL not found"; never a refusal that holds a service back.
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tether::reconcile") && (l.contains("failed") || l.contains("refused")) && !l.contains("ACL not found"))
        .collect();
    assert!(errors.is_empty(), "agent A answered tether throughout the election:\n{}", errors.join("\n"));
    assert!(!log.contains("the registry refused this service's write"), "{log}");

    cluster.start_server(old);
    wait_catalog(&cluster, &expected(&[("orders-1", true), ("orders-audit-1", true)]), T, &tether);
}

#[test]
fn client_agent_restarts_with_and_without_its_data_end_exactly_right() {
    let mut cluster = ConsulCluster::start();
    let token = cluster.create_token(&readme_policy());
    let mut orders = HealthServer::start(0, &[]);
    let audit = HealthServer::start(0, &[]);
    let (setup, tether) = start_tether(
        &cluster,
        &token,
        &[("orders", "orders-1", orders.port), ("orders-audit", "orders-audit-1", audit.port), ("orders-old", "orders-old-1", audit.port)],
    );
    wait_catalog(&cluster, &expected(&[("orders-1", true), ("orders-audit-1", true), ("orders-old-1", true)]), T, &tether);

    // A restarts with its data (it restores what it held, orders-old-1
    // among it); while it is down, orders turns critical and orders-old's
    // file goes.
    cluster.restart_client_a_with(true, || {
        orders.set("not_serving");
        std::fs::remove_file(setup.services_dir().join("orders-old-1.toml")).unwrap();
    });
    wait_catalog(&cluster, &expected(&[("orders-1", false), ("orders-audit-1", true)]), T, &tether);

    // A restarts with its data directory removed (same node id): it holds
    // nothing, and tether puts everything back; meanwhile a new file comes.
    // Nothing the catalog holds is made obsolete meanwhile (orders stays
    // critical): on Consul 1.8 a wiped agent removes from the catalog what
    // it no longer knows with its default token, not with the token that
    // wrote it, and without one ACLs block that for ever ("Check
    // deregistration blocked by ACLs"; hashicorp/consul#9683, later versions
    // use the agent token).
    cluster.restart_client_a_with(false, || {
        setup.write_service("orders-new-1.toml", &service_file("orders-new", "orders-new-1", audit.port));
    });
    wait_catalog(&cluster, &expected(&[("orders-1", false), ("orders-audit-1", true), ("orders-new-1", true)]), T, &tether);

    // It still follows health.
    orders.set("serving");
    wait_catalog(&cluster, &expected(&[("orders-1", true), ("orders-audit-1", true), ("orders-new-1", true)]), T, &tether);
}

#[test]
fn a_service_the_token_may_not_write_is_reported_and_the_others_carry_on() {
    // A permanent refusal holds only the refused service (52b12b0): before
    // it, tether retried billing every 200 ms for ever, a WARN each time,
    // and every write of orders waited for the next re-read behind it.
    let cluster = ConsulCluster::start();
    let token = cluster.create_token(&readme_policy());
    let mut orders = HealthServer::start(0, &[]);
    let billing = HealthServer::start(0, &[]);
    let (_setup, mut tether) =
        start_tether(&cluster, &token, &[("orders", "orders-1", orders.port), ("billing", "billing-1", billing.port)]);
    let is_refusal = |l: &&str| (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains("billing");
    wait_for(T, "tether to log billing's refusal", || tether.log().lines().any(|l| is_refusal(&l)).then_some(()));
    let refused = Instant::now();
    let index = wait_passing(&cluster, &tether, "orders", 0, &["orders-1"], T);

    // Over the next ~10 s orders keeps following its health while billing
    // stays refused and out of the catalog (watched with blocking queries
    // on B); the refusal is logged a handful of times at most, not at every
    // retry.
    let mut index = index;
    for _ in 0..3 {
        orders.set("not_serving");
        index = wait_passing(&cluster, &tether, "orders", index, &[], T);
        orders.set("serving");
        index = wait_passing(&cluster, &tether, "orders", index, &["orders-1"], T);
    }
    let mut billing_index = 0;
    while refused.elapsed() < Duration::from_secs(10) {
        let wait = (Duration::from_secs(10).saturating_sub(refused.elapsed()).as_millis() + 1).min(5000);
        let path = format!("/v1/catalog/service/billing?index={billing_index}&wait={wait}ms");
        let (v, next) = cluster.get_with_index(&cluster.url_b(), &path).unwrap();
        assert_eq!(v, serde_json::json!([]), "billing never reaches the catalog");
        billing_index = if next > billing_index { next } else { 0 };
    }
    let log = tether.log();
    let refusals: Vec<&str> = log.lines().filter(is_refusal).collect();
    eprintln!(
        "{} refusals of billing logged over {:?}; the first ones:\n{}",
        refusals.len(),
        refused.elapsed(),
        refusals.iter().take(8).copied().collect::<Vec<_>>().join("\n")
    );
    assert!(tether.wait_exit(Duration::from_millis(100)).is_none(), "tether keeps running:\n{log}");

    let st = status(&tether);
    let services = st["services"].as_array().unwrap();
    let b = services.iter().find(|s| s["id"] == "billing-1").unwrap_or_else(|| panic!("status names billing-1: {st:#}"));
    let o = services.iter().find(|s| s["id"] == "orders-1").unwrap_or_else(|| panic!("status names orders-1: {st:#}"));
    assert_eq!(o["health"], "passing", "{st:#}");
    assert!(o["last_error"].is_null(), "orders has no error: {st:#}");
    let reason = b["last_error"].as_str().unwrap_or_else(|| panic!("billing's last_error: {st:#}"));
    assert!(reason.contains("Permission denied") || reason.contains("403"), "the reason: {reason}");
    assert!(
        refusals.len() <= 3,
        "billing's refusal logged {} times in {:?}, once per retry:\n{}",
        refusals.len(),
        refused.elapsed(),
        refusals.join("\n")
    );
    assert_eq!(b["error_class"], "permanent", "{st:#}");
    assert!(b["next_attempt"].is_string(), "when tether tries again: {st:#}");
    // And orders still flips.
    orders.set("not_serving");
    index = wait_passing(&cluster, &tether, "orders", index, &[], T);
    orders.set("serving");
    wait_passing(&cluster, &tether, "orders", index, &["orders-1"], T);
    tether.stop();
}
