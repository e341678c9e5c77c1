//! What operators set on a service's check, against real Consul and a grpc-go
//! server with a unary auth interceptor (tests/go/healthserver with
//! AUTH_TOKEN, as kratos and go-zero services have): credentials sent as
//! gRPC metadata from a file, rotated without a restart, and never shown.

use crate::support::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
const TOKEN: &str = "s3cr3t-token-4f9a";
const ROTATED: &str = "r0tated-token-77c1";

fn service(name: &str, port: u16, check: &str) -> String {
    format!("name = \"{name}\"\nid = \"{name}-1\"\naddress = \"127.0.0.1\"\nport = {port}\nttl = \"5s\"\n[check]\ntarget = \"127.0.0.1:{port}\"\n{check}\n")
}

fn write_secret(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn poll_mode_behind_an_auth_interceptor_needs_and_gets_its_token() {
    let consul = Consul::start();
    let mut server = GoHealthServer::start_with_auth(TOKEN);
    let port = free_port();
    let setup = Setup::consul(&consul, "").listening(port);
    // Without credentials: critical for ever, and the reason says why.
    setup.write_service("bare.toml", &service("bare", server.port, "mode = \"poll\"\ninterval = \"1s\""));
    // With the token from a file, as `Bearer <token>`.
    let token = setup.dir.path().join("orders.token");
    write_secret(&token, &format!("Bearer {TOKEN}\n"));
    let check = format!(
        "mode = \"poll\"\ninterval = \"1s\"\n[check.metadata]\nx-client = \"tether\"\n[check.metadata_files]\nauthorization = \"{}\"",
        token.display()
    );
    setup.write_service("orders.toml", &service("orders", server.port, &check));
    let tether = setup.start();

    consul.wait_health("bare-1", "critical", T);
    let (_, reason) = consul.health("bare-1").unwrap();
    assert!(reason.contains("UNAUTHENTICATED") && reason.contains("missing token"), "{reason}");
    consul.wait_health("orders-1", "passing", T);

    // Flips follow.
    server.set("not_serving");
    consul.wait_health("orders-1", "critical", T);
    server.set("serving");
    consul.wait_health("orders-1", "passing", T);

    // The server's token rotates: critical until the file has the new one,
    // then passing again, with no restart and no edit of the service file.
    server.set(&format!("token {ROTATED}"));
    consul.wait_health("orders-1", "critical", T);
    let (_, reason) = consul.health("orders-1").unwrap();
    assert!(reason.contains("invalid token"), "{reason}");
    write_secret(&token, &format!("Bearer {ROTATED}"));
    consul.wait_health("orders-1", "passing", T);
    assert!(tether.log().contains("metadata file changed"), "{}", tether.log());

    // The server saw the token and the plain value...
    let seen = server.auth_log();
    assert!(seen.contains(&format!("Bearer {ROTATED}")), "{seen}");
    // ... and nothing of tether's shows either token.
    let status = reqwest::blocking::get(format!("http://127.0.0.1:{port}/v1/status")).unwrap().text().unwrap();
    let metrics = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics")).unwrap().text().unwrap();
    let registry =
        format!("{}\n{}\n{}", consul.get("/v1/agent/services"), consul.get("/v1/agent/checks"), consul.get("/v1/health/service/orders"));
    let status_cli = tether.cli(&["status", "--json"]);
    for (what, text) in [
        ("log", tether.log()),
        ("status", status),
        ("status cli", String::from_utf8_lossy(&status_cli.stdout).into_owned()),
        ("metrics", metrics),
        ("registry", registry),
    ] {
        for secret in [TOKEN, ROTATED] {
            assert!(!text.contains(secret), "the token shows in tether's {what}:\n{text}");
        }
    }
}

#[test]
fn watch_mode_sends_the_token_on_its_liveness_check_too() {
    let consul = Consul::start();
    let mut server = GoHealthServer::start_with_auth(TOKEN);
    let setup = Setup::consul(&consul, "");
    let token = setup.dir.path().join("orders.token");
    write_secret(&token, &format!("Bearer {TOKEN}"));
    let check = format!("interval = \"1s\"\n[check.metadata_files]\nauthorization = \"{}\"", token.display());
    setup.write_service("orders.toml", &service("orders", server.port, &check));
    let tether = setup.start();
    consul.wait_health("orders-1", "passing", T);
    server.set("not_serving");
    consul.wait_health("orders-1", "critical", T);
    server.set("serving");
    consul.wait_health("orders-1", "passing", T);
    // The connection's liveness Check (a unary call, every interval) carries it.
    wait_for(T, "a liveness Check with the token", || {
        server.auth_log().lines().any(|l| l.starts_with("/grpc.health.v1.Health/Check") && l.contains(TOKEN)).then_some(())
    });
    assert!(!server.auth_log().contains("[]"), "a unary call without the token:\n{}", server.auth_log());
    assert!(!tether.log().contains(TOKEN));
}

#[test]
fn not_serving_as_warning_is_out_of_rotation_but_never_reaped() {
    let consul = Consul::start();
    let mut server = GoHealthServer::start();
    let setup = Setup::consul(&consul, "");
    let check = "not_serving = \"warning\"";
    setup.write_service(
        "orders.toml",
        &service("orders", server.port, check).replace("ttl = \"5s\"", "ttl = \"5s\"\nderegister_critical_after = \"1m\""),
    );
    let _tether = setup.start();
    consul.wait_health("orders-1", "passing", T);
    server.set("not_serving");
    wait_for(T, "orders-1 warning with its reason", || {
        consul.health("orders-1").filter(|(s, o)| s == "warning" && o == "NOT_SERVING").map(|_| ())
    });
    // Out of ?passing answers.
    let passing = consul.get("/v1/health/service/orders?passing");
    assert_eq!(passing.as_array().map(Vec::len), Some(0), "{passing}");
    // Past deregister_critical_after (1m, Consul's minimum; its reaper runs
    // every 30 s): still registered, still warning.
    holds_for(Duration::from_secs(95), Duration::from_secs(1), || {
        assert_eq!(consul.health("orders-1").map(|h| h.0).as_deref(), Some("warning"));
    });
    server.set("serving");
    consul.wait_health("orders-1", "passing", T);
    // A crash is always critical.
    drop(server);
    consul.wait_health("orders-1", "critical", T);
}

#[test]
fn weights_reach_consul_and_etcd_and_grpc_go_still_resolves() {
    let consul = Consul::start();
    let etcd = Etcd::start(1);
    let server = GoHealthServer::start();
    let text = service("orders", server.port, "").replace("ttl = \"5s\"", "ttl = \"5s\"\nweight = 10\nweight_warning = 2");
    let on_consul = Setup::consul(&consul, "");
    on_consul.write_service("orders.toml", &text);
    let _c = on_consul.start();
    let on_etcd = Setup::etcd(&etcd, "");
    on_etcd.write_service("orders.toml", &text);
    let _e = on_etcd.start();

    consul.wait_health("orders-1", "passing", T);
    let catalog = consul.get("/v1/catalog/service/orders");
    assert_eq!(catalog[0]["ServiceWeights"], serde_json::json!({"Passing": 10, "Warning": 2}), "{catalog}");

    let key = "services/orders/orders-1";
    let value = wait_for(T, "the etcd key", || etcd.get_prefix(key).into_iter().next().map(|(_, v, ..)| v));
    let metadata: serde_json::Value = serde_json::from_str(value["Metadata"].as_str().expect("Metadata stays a string")).unwrap();
    assert_eq!(metadata["weight"], 10, "{metadata}");
    let mut client = GoClient::start(&etcd, "services/orders/");
    client.wait_rotation(&[server.addr()], T);
    assert_eq!(client.resolved().unwrap()[0].1["weight"], 10);
}

#[test]
fn a_unix_socket_target_is_probed_while_the_registered_address_stays() {
    let consul = Consul::start();
    let mut server = GoHealthServer::start_unix();
    let setup = Setup::consul(&consul, "");
    let text =
        service("orders", 50051, "").replace("target = \"127.0.0.1:50051\"", &format!("target = \"unix://{}\"", server.socket().display()));
    setup.write_service("orders.toml", &text);
    let _tether = setup.start();
    consul.wait_health("orders-1", "passing", T);
    let services = consul.services();
    assert_eq!((services["orders-1"]["Address"].as_str(), services["orders-1"]["Port"].as_u64()), (Some("127.0.0.1"), Some(50051)));
    server.set("not_serving");
    consul.wait_health("orders-1", "critical", T);
    server.set("serving");
    consul.wait_health("orders-1", "passing", T);
    drop(server);
    consul.wait_health("orders-1", "critical", T);
}

#[test]
fn two_checks_pass_together_and_the_reason_names_the_failing_one() {
    let consul = Consul::start();
    let mut api = GoHealthServer::start();
    let mut admin = GoHealthServer::start();
    let setup = Setup::consul(&consul, "");
    let text = format!(
        "name = \"orders\"\nid = \"orders-1\"\naddress = \"127.0.0.1\"\nport = {}\nttl = \"5s\"\n[[check]]\ntarget = \"{}\"\n[[check]]\ntarget = \"{}\"\nmode = \"poll\"\ninterval = \"1s\"\n",
        api.port,
        api.addr(),
        admin.addr()
    );
    setup.write_service("orders.toml", &text);
    let _tether = setup.start();
    consul.wait_health("orders-1", "passing", T);
    admin.set("not_serving");
    consul.wait_health("orders-1", "critical", T);
    let (_, reason) = consul.health("orders-1").unwrap();
    assert_eq!(reason, format!("check 2 ({}): NOT_SERVING", admin.addr()));
    api.set("not_serving");
    wait_for(T, "both checks named", || {
        let (_, reason) = consul.health("orders-1")?;
        (reason == format!("check 1 ({}): NOT_SERVING; check 2 ({}): NOT_SERVING", api.addr(), admin.addr())).then_some(())
    });
    admin.set("serving");
    api.set("serving");
    consul.wait_health("orders-1", "passing", T);
}
