//! TLS and mTLS to the gRPC target, Consul and etcd, with certificates made
//! by the test (rcgen). A certificate that does not verify is an error, never
//! a fallback to plaintext.

use crate::support::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[test]
fn grpc_target_over_tls_and_mtls() {
    let pki = Pki::new();
    let consul = Consul::start();
    let server = HealthServer::start_tls(&pki, true);
    let setup = Setup::consul(&consul, "");
    let svc = |id: &str, check: &str| {
        format!("name = \"{id}\"\nid = \"{id}\"\nport = {}\n[check]\ninterval = \"500ms\"\ntls = true\n{check}\n", server.port)
    };
    let (ca, other) = (pki.path("ca.pem"), pki.path("other-ca.pem"));
    let (cert, key) = (pki.path("client.pem"), pki.path("client-key.pem"));
    setup.write_service(
        "good.toml",
        &svc("good", &format!("ca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nserver_name = \"localhost\"")),
    );
    setup.write_service("nocert.toml", &svc("nocert", &format!("ca_file = \"{ca}\"")));
    setup.write_service("wrongca.toml", &svc("wrongca", &format!("ca_file = \"{other}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"")));
    let _tether = setup.start();
    consul.wait_health("good", "passing", T);
    wait_for(T, "nocert and wrongca to be critical with a reason", || {
        let a = consul.health("nocert")?;
        let b = consul.health("wrongca")?;
        (a.0 == "critical" && b.0 == "critical" && !a.1.is_empty() && !b.1.is_empty() && !b.1.contains(crate::consul_waiting()))
            .then_some(())
    });
    eprintln!("security: no client cert -> {:?}", consul.health("nocert").unwrap().1);
    eprintln!("security: wrong CA -> {:?}", consul.health("wrongca").unwrap().1);

    // tether check speaks TLS too; a plaintext probe of a TLS server fails.
    let run = |args: &[&str]| Command::new(tether_bin()).arg("check").args(args).output().unwrap().status.code();
    let addr = server.addr();
    assert_eq!(run(&[&addr, "--ca-file", &ca, "--cert-file", &cert, "--key-file", &key]), Some(0));
    assert_ne!(run(&[&addr, "--ca-file", &other, "--cert-file", &cert, "--key-file", &key]), Some(0));
    assert_ne!(run(&[&addr]), Some(0), "plaintext against a TLS server must fail");
}

#[test]
fn consul_over_mtls_and_a_bad_ca_is_refused() {
    let pki = Pki::new();
    let https = free_port();
    let hcl = [
        format!("ports {{ https = {https} }}"),
        format!("ca_file = \"{}\"", pki.path("ca.pem")),
        format!("cert_file = \"{}\"", pki.path("server.pem")),
        format!("key_file = \"{}\"", pki.path("server-key.pem")),
        "verify_incoming_https = true".to_string(),
    ];
    let consul = Consul::start_with(free_port(), &hcl.iter().map(String::as_str).collect::<Vec<_>>());
    let server = HealthServer::start(0, &[]);
    let config = |ca: &str| {
        format!(
            "services_dir = \"services.d\"\nnode = \"node-a\"\nlisten = \"\"\n[consul]\naddress = \"https://127.0.0.1:{https}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\ntls_server_name = \"localhost\"\n",
            pki.path(ca),
            pki.path("client.pem"),
            pki.path("client-key.pem")
        )
    };
    let setup = Setup::consul(&consul, "");
    std::fs::write(setup.config(), config("other-ca.pem")).unwrap();
    setup.write_service("a.toml", &format!("name = \"alpha\"\nid = \"alpha\"\nport = {}\n", server.port));
    let mut tether = setup.start();
    tether.wait_log("certificate", T);
    assert!(!consul.services().contains_key("alpha"), "nothing registered over an unverified connection");

    std::fs::write(setup.config(), config("ca.pem")).unwrap();
    tether.restart();
    consul.wait_health("alpha", "passing", T);
}

#[test]
fn etcd_over_mtls() {
    let pki = Pki::new();
    let etcd = Etcd::start_mtls(&pki);
    let server = HealthServer::start(0, &[]);
    let setup = Setup::etcd(&etcd, "");
    let cfg = std::fs::read_to_string(setup.config()).unwrap();
    let tls = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem")
    );
    std::fs::write(setup.config(), format!("{cfg}{tls}")).unwrap();
    setup.write_service("a.toml", &format!("name = \"alpha\"\nid = \"alpha\"\naddress = \"127.0.0.1\"\nport = {}\n", server.port));
    let _tether = setup.start();
    wait_for(T, "the key over mTLS", || etcd.get_prefix("services/alpha/").first().map(|_| ()));
}

/// A probe that cannot be built at start (its CA file is not there yet) is
/// critical with the reason, and is built again with backoff: when the file
/// appears the service turns passing without its file being touched.
#[test]
fn a_ca_file_that_appears_later_is_picked_up() {
    let pki = Pki::new();
    let consul = Consul::start();
    let server = HealthServer::start_tls(&pki, false);
    let setup = Setup::consul(&consul, "");
    let ca = setup.dir.path().join("later-ca.pem");
    setup.write_service(
        "late.toml",
        &format!(
            "name = \"late\"\nid = \"late\"\nport = {}\n[check]\ninterval = \"500ms\"\ntls = true\nca_file = \"{}\"\nserver_name = \"localhost\"\n",
            server.port,
            ca.display()
        ),
    );
    let _tether = setup.start();
    wait_for(T, "late to be critical because its CA file is missing", || {
        let (status, output) = consul.health("late")?;
        (status == "critical" && output.contains("later-ca.pem")).then_some(())
    });
    std::fs::copy(pki.path("ca.pem"), &ca).unwrap();
    consul.wait_health("late", "passing", T);
}
