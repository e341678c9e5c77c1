//! Operating tether: systemd notify, the unit file, /metrics, /v1/status,
//! `tether status`, and no secret anywhere it shows.

mod dashboard;

use crate::support::*;
use nix::sys::signal::Signal;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn service(name: &str, port: u16) -> String {
    format!("name = \"{name}\"\nid = \"{name}\"\nport = {port}\nttl = \"3s\"\n")
}

fn http_get(url: &str) -> (u16, String) {
    let r = reqwest::blocking::Client::new().get(url).timeout(Duration::from_secs(5)).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

#[test]
fn systemd_notify_sequence() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    setup.write_service("a.toml", &service("alpha", server.port));
    let sock_path = setup.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tether = setup.start_with_env(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")]);

    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification within 20s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let mut seen: Vec<String> = vec![];
    let mut wait_msg = |want: &str, seen: &mut Vec<String>| loop {
        let m = next();
        seen.push(m.clone());
        if m.lines().any(|l| l == want) {
            return;
        }
        assert!(seen.len() < 200, "never saw {want}: {seen:?}");
    };
    wait_msg("READY=1", &mut seen);
    assert!(consul.health("alpha").is_some(), "READY=1 only after the first reconcile");
    wait_msg("WATCHDOG=1", &mut seen);
    tether.signal(Signal::SIGHUP);
    wait_msg("RELOADING=1", &mut seen);
    wait_msg("READY=1", &mut seen);
    tether.signal(Signal::SIGTERM);
    wait_msg("STOPPING=1", &mut seen);
    tether.kill();
}

#[test]
fn metrics_status_and_status_command() {
    let consul = Consul::start();
    let mut server = HealthServer::start(0, &[]);
    let port = free_port();
    let secret = "s3cr3t-token-7d1f0c";
    let setup = Setup::consul(&consul, "");
    let config = std::fs::read_to_string(setup.config()).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    let token = setup.dir.path().join("consul.token");
    std::fs::write(&token, format!("{secret}\n")).unwrap();
    std::fs::write(setup.config(), config.replace("[consul]\n", "[consul]\ntoken_file = \"consul.token\"\n")).unwrap();
    setup.write_service("a.toml", &service("alpha", server.port));
    let tether = setup.start();
    consul.wait_health("alpha", "passing", T);
    let base = format!("http://127.0.0.1:{port}");
    wait_for(T, "readyz", || (http_get(&format!("{base}/readyz")).0 == 200).then_some(()));
    assert_eq!(http_get(&format!("{base}/healthz")).0, 200);

    server.set("not_serving");
    consul.wait_health("alpha", "critical", T);
    let metrics = wait_for(T, "metrics to show the flip", || {
        let (_, m) = http_get(&format!("{base}/metrics"));
        m.contains("tether_service_health{service=\"alpha\"} 0").then_some(m)
    });
    for needle in [
        "tether_service_transitions_total{service=\"alpha\",to=\"critical\"} 1",
        "tether_service_transitions_total{service=\"alpha\",to=\"passing\"} 1",
        "tether_check_duration_seconds_bucket{",
        "tether_service_last_write_timestamp_seconds{service=\"alpha\"}",
        "tether_heartbeat_last_timestamp_seconds",
        "tether_registry_operations_total{backend=\"Consul\",op=\"register\"} 1",
        "tether_registry_operations_total{backend=\"Consul\",op=\"set_health\"}",
        "tether_anti_entropy_runs_total 1",
        "tether_config_reloads_total 1",
        "tether_config_errors 0",
        "tether_services 1",
        "tether_build_info{",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in:\n{metrics}");
    }

    let (code, body) = http_get(&format!("{base}/v1/status"));
    assert_eq!(code, 200);
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["ready"], true);
    assert_eq!(st["backend"]["connected"], true);
    let svc = &st["services"][0];
    assert_eq!(svc["id"], "alpha");
    assert_eq!(svc["health"], "critical");
    assert_eq!(svc["output"], "NOT_SERVING");
    assert_eq!(svc["registered"], true);
    assert!(svc["file"].as_str().unwrap().ends_with("a.toml"));
    assert!(svc["since"].is_string() && svc["last_heartbeat"].is_string());

    let out = Command::new(tether_bin()).args(["status", "--config"]).arg(setup.config()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = text.lines().find(|l| l.starts_with("alpha ")).unwrap_or_else(|| panic!("no alpha row:\n{text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert!(cells[1] == "critical" && cells.contains(&"registered") && cells.last() == Some(&"NOT_SERVING"), "{row}");
    let out = Command::new(tether_bin()).args(["status", "--json", "--config"]).arg(setup.config()).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["services"][0]["health"], "critical");

    // No secret in logs, status or metrics.
    let (_, metrics) = http_get(&format!("{base}/metrics"));
    assert!(!metrics.contains(secret) && !body.contains(secret) && !text.contains(secret));
    assert!(!tether.log().contains(secret), "the token leaked into the log");
    assert!(tether.log().contains("readable by group or others"), "warns about a world-readable token file");
}

/// `tether status` (not on a terminal): the summary line, then one aligned
/// line per service with its health, age, last check, registry state and error.
#[test]
fn status_command_one_line_per_service() {
    let consul = Consul::start();
    let serving = HealthServer::start(0, &[]);
    let mut failing = HealthServer::start(0, &[]);
    failing.set("not_serving");
    let port = free_port();
    let setup = Setup::consul(&consul, "");
    let config = std::fs::read_to_string(setup.config()).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(setup.config(), config).unwrap();
    setup.write_service("a.toml", &service("alpha", serving.port));
    setup.write_service("b.toml", &service("beta", failing.port));
    setup.write_service("g.toml", &service("gamma", serving.port));
    let tether = setup.start();
    consul.wait_health("alpha", "passing", T);
    consul.wait_health("beta", "critical", T);
    let out = tether.cli(&["drain", "gamma", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = tether.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains('\x1b'), "colours on a pipe:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "a summary, a header and three services:\n{text}");
    assert_eq!(
        lines[0],
        format!(
            "tether {} on node node-a — consul {} connected, ready — 3 services: 2 passing, 1 critical, 0 flapping, 0 unknown",
            env!("CARGO_PKG_VERSION"),
            consul.url()
        ),
        "\n{text}"
    );
    // Cells by the header's columns (in characters: µs is one).
    let header: Vec<char> = lines[1].chars().collect();
    let starts: Vec<usize> =
        (0..header.len()).filter(|&i| header[i] != ' ' && (i == 0 || (i >= 2 && header[i - 2..i] == [' ', ' ']))).collect();
    let cells = |line: &str| -> Vec<String> {
        let chars: Vec<char> = line.chars().collect();
        starts
            .iter()
            .enumerate()
            .map(|(n, &s)| {
                let end = starts.get(n + 1).map_or(chars.len(), |&e| e.min(chars.len()));
                let cell: String = chars[s.min(chars.len())..end].iter().collect();
                // Aligned: every cell but the first starts after two spaces.
                assert!(s == 0 || (chars[s - 2..s] == [' ', ' '] && chars[s] != ' '), "column {n} misaligned:\n{text}");
                cell.trim().to_string()
            })
            .collect()
    };
    assert_eq!(cells(lines[1]), ["ID", "HEALTH", "SINCE", "CHECK", "REGISTRY", "LAST ERROR"], "\n{text}");
    let rows: Vec<Vec<String>> = lines[2..].iter().map(|l| cells(l)).collect();
    let age = |s: &str| s.ends_with('s') && s.trim_end_matches('s').chars().all(|c| c.is_ascii_digit() || c == 'm');
    let latency = |s: &str| (s.ends_with("ms") || s.ends_with("µs")) && s.starts_with(|c: char| c.is_ascii_digit());
    let (alpha, beta, gamma) = (&rows[0], &rows[1], &rows[2]);
    assert!(alpha[0] == "alpha" && alpha[1] == "passing" && alpha[4] == "registered" && alpha[5] == "-", "{alpha:?}\n{text}");
    assert!(beta[0] == "beta" && beta[1] == "critical" && beta[4] == "registered" && beta[5] == "NOT_SERVING", "{beta:?}\n{text}");
    assert!(gamma[0] == "gamma" && gamma[1] == "passing" && gamma[4] == "drained" && gamma[5] == "-", "{gamma:?}\n{text}");
    for row in &rows {
        assert!(age(&row[2]) && latency(&row[3]), "SINCE and CHECK of {row:?}\n{text}");
    }
    // The same latency is in the JSON, in milliseconds.
    let out = tether.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["services"].as_array().unwrap().iter().all(|s| s["last_check_ms"].as_f64().is_some_and(|ms| ms > 0.0)), "{json}");
}

#[test]
fn status_without_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, format!("listen = \"127.0.0.1:{}\"\n[consul]\n", free_port())).unwrap();
    let out = Command::new(tether_bin()).args(["status", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no tether agent answers"), "{err}");
    // As drain and undrain, it takes the agent's instance.
    let out = Command::new(tether_bin()).args(["status", "--instance", "pod-a", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no tether agent answers"), "{err}");
}

#[test]
fn unit_file_verifies_and_is_hardened() {
    let v = Command::new("systemd-analyze").arg("--version").output().expect("systemd-analyze is missing: run scripts/install-deps.sh");
    assert!(v.status.success());
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/tether.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart binaries exist: point them at the built one.
    let path = dir.path().join("tether.service");
    std::fs::write(&path, unit.replace("/usr/bin/tether", tether_bin().to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");

    let out = Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let level: f64 = line.split(':').nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(level <= 2.0, "{line}");
    assert!(unit.contains("Type=notify") && unit.contains("ExecStartPre=/usr/bin/tether validate --agent-only"));
}

/// The identity's file names as documented (ARCHITECTURE.md, "Identity"):
/// FNV-1a 64 of `<endpoint>\n<backend>`, computed here on its own.
fn stable_name(endpoint: &str, backend: &str) -> String {
    let h =
        format!("{endpoint}\n{backend}").bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

/// The names tether used before, with std's DefaultHasher, as its code did.
fn legacy_name(endpoint: &str, backend: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    endpoint.to_string().hash(&mut h);
    backend.hash(&mut h);
    format!("{:016x}", h.finish())
}

#[test]
fn a_drain_kept_by_an_older_tether_is_picked_up_after_an_upgrade() {
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    for name in ["alpha", "beta"] {
        setup.write_service(&format!("{name}.toml"), &service(name, server.port));
    }
    // What an older tether left in its runtime directory: alpha drained, and
    // its (free) identity lock.
    let run = setup.dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let legacy = run.join(format!("node-a-{}", legacy_name(&consul.url(), "Consul")));
    std::fs::write(legacy.with_extension("drained"), r#"["alpha"]"#).unwrap();
    std::fs::write(legacy.with_extension("lock"), "1\n").unwrap();

    let mut tether = setup.start();
    wait_for(T, "alpha in maintenance", || consul.checks().contains_key("_service_maintenance:alpha").then_some(()));
    consul.wait_health("beta", "passing", T);
    assert!(tether.log().contains("kept from before tether restarted"), "{}", tether.log());
    let new = run.join(format!("node-a-{}", stable_name(&consul.url(), "Consul")));
    assert!(new.with_extension("lock").exists(), "the lock under the documented name");
    let kept = std::fs::read_to_string(new.with_extension("drained")).unwrap();
    assert_eq!(kept, r#"["alpha"]"#, "the drain moved to the new name");
    assert!(!legacy.with_extension("drained").exists() && !legacy.with_extension("lock").exists(), "nothing left under the old names");

    // It stays drained across a restart under the new name, until undrained.
    tether.signal(Signal::SIGKILL);
    tether.restart();
    tether.wait_log("anti-entropy: registry in sync", T);
    assert!(tether.log().contains("kept from before tether restarted"), "{}", tether.log());
    let out = tether.cli(&["undrain", "alpha", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(T, "the undrain kept on disk", || (std::fs::read_to_string(new.with_extension("drained")).ok()? == "[]").then_some(()));
}

/// `tether run 2>&1 | head -3`, or a log reader that dies: once stderr's
/// reader is gone, log lines are dropped and the agent carries on (a service
/// added later is registered) and stops cleanly on SIGTERM.
#[test]
fn a_closed_stderr_pipe_never_stops_the_agent() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let consul = Consul::start();
    let server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    setup.write_service("a.toml", &service("alpha", server.port));
    /// Killed if the test fails before it exits (a hung agent ignores SIGTERM).
    struct Agent(std::process::Child);
    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut agent = Agent(
        Command::new(tether_bin())
            .args(["run", "--config", setup.config().to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut agent.0;
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("tether starting"), "{line}");
    drop(stderr); // the reader goes: the next log line meets a closed pipe
    consul.wait_health("alpha", "passing", T);
    setup.write_service("b.toml", &service("beta", server.port));
    consul.wait_health("beta", "passing", T);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_for(T, "tether exits on SIGTERM", || child.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
    wait_for(T, "deregistered on the way out", || consul.service_status("alpha").is_none().then_some(()));
}
