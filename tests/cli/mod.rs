//! `tether validate` and `tether check`: messages and exit codes; the man pages as the README installs them.

use crate::support::*;
use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(tether_bin()).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_exit_codes_match_grpc_health_probe() {
    let mut server = HealthServer::start(0, &["orders"]);
    let addr = server.addr();
    let (code, out) = run(&["check", &addr]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("status: SERVING"), "{out}");
    let (code, out) = run(&["check", &addr, "--service", "orders"]);
    assert_eq!(code, 0, "{out}");
    server.set("not_serving");
    let (code, out) = run(&["check", &addr, "--service", "orders"]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("NOT_SERVING"), "{out}");
    let (code, out) = run(&["check", &addr, "--service", "missing"]);
    assert_eq!(code, 3, "{out}");
    let (code, out) = run(&["check", &format!("127.0.0.1:{}", free_port())]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("Connection refused"), "{out}");
    let (code, _) = run(&["check"]);
    assert_eq!(code, 1);
    let (code, _) = run(&["check", &addr, "--timeout", "soon"]);
    assert_eq!(code, 1);

    let bare = HealthServer::start_without_health(0);
    let (code, out) = run(&["check", &bare.addr()]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("UNIMPLEMENTED"), "{out}");
}

#[test]
fn validate_reports_every_error_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("services.d");
    std::fs::create_dir(&sd).unwrap();
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "services_dir = \"services.d\"\nnode = \"n\"\n[consul]\naddress = \"http://127.0.0.1:8500\"\n").unwrap();
    std::fs::write(sd.join("good.toml"), "name = \"good\"\nport = 50051\n").unwrap();
    let cfg = config.to_str().unwrap();
    let (code, out) = run(&["validate", "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 service(s) valid"), "{out}");

    std::fs::write(sd.join("bad.toml"), "name = \"bad\"\nport = 70000\n").unwrap();
    std::fs::write(sd.join("typo.toml"), "name = \"typo\"\nport = 1\n[check]\nintervall = \"1s\"\n").unwrap();
    std::fs::write(sd.join("zero.toml"), "name = \"zero\"\nport = 2\nttl = \"0s\"\n").unwrap();
    std::fs::write(sd.join("binary.toml"), [0xff, 0xfe, 0x00, 0x01]).unwrap();
    std::fs::create_dir(sd.join("dir.toml")).unwrap();
    std::os::unix::fs::symlink("nowhere.toml", sd.join("dangling.toml")).unwrap();
    std::fs::write(sd.join("dup.toml"), "name = \"good\"\nport = 50051\n").unwrap();
    std::fs::write(sd.join("ignored.txt"), "garbage").unwrap();
    std::fs::write(sd.join(".hidden.toml"), "garbage").unwrap();
    let (code, out) = run(&["validate", "--config", cfg]);
    assert_eq!(code, 1, "{out}");
    let sd = sd.display();
    for needle in [
        format!("{sd}/bad.toml:2:8: port 70000 is out of range; use a port from 1 to 65535"),
        format!("{sd}/typo.toml:4:1: unknown field `intervall`"),
        format!("{sd}/zero.toml:3:7: duration \"0s\" must be greater than zero; write a positive Go-style duration"),
        format!("{sd}/binary.toml: not UTF-8"),
        format!("{sd}/dir.toml: is a directory"),
        format!("{sd}/dangling.toml: cannot read file"),
        format!("{sd}/good.toml: duplicate service id \"good-n-50051\": {sd}/dup.toml already defines it"),
        "7 error(s)".to_string(),
    ] {
        assert!(out.contains(&needle), "missing {needle:?} in:\n{out}");
    }
    assert!(!out.contains("ignored.txt") && !out.contains("hidden"), "{out}");

    // --agent-only (the unit's ExecStartPre) ignores the service files.
    let (code, out) = run(&["validate", "--agent-only", "--config", cfg]);
    assert_eq!(code, 0, "{out}");

    // Single files can be validated too.
    let (code, out) = run(&["validate", "--config", cfg, &format!("{sd}/good.toml")]);
    assert_eq!(code, 0, "{out}");

    // A bad agent config is an error too.
    std::fs::write(&config, "[consul]\n[etcd]\nendpoints = [\"http://x:1\"]\n").unwrap();
    let (code, out) = run(&["validate", "--config", cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tether.toml:2:1: both [consul] and [etcd] are set"), "{out}");
}

/// Every mistake in a file is its own error with its place (an unknown key with
/// a did-you-mean), not just the first; any error is exit status 1.
#[test]
fn validate_reports_every_mistake_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("services.d");
    std::fs::create_dir(&sd).unwrap();
    let config = dir.path().join("tether.toml");
    std::fs::write(&config, "services_dir = \"services.d\"\nnode = \"n\"\n[consul]\n").unwrap();
    let orders = sd.join("orders.toml");
    std::fs::write(&orders, "name = \"orders\"\nport = 70000\n[check]\nintervall = \"1s\"\nmode = \"pull\"\n").unwrap();
    let cfg = config.to_str().unwrap();
    let (code, out) = run(&["validate", "--config", cfg]);
    assert_eq!(code, 1, "{out}");
    let f = orders.display();
    let expected = [
        format!("error: {f}:2:8: port 70000 is out of range; use a port from 1 to 65535"),
        format!("error: {f}:4:1: unknown field `intervall` in [check]; did you mean `interval`?"),
        format!("error: {f}:5:8: check mode \"pull\" is not known; use \"watch\" or \"poll\""),
        "3 error(s)".to_string(),
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "{out}");

    // The agent file too, and a key in the wrong table is pointed to its table.
    std::fs::write(&orders, "name = \"orders\"\nport = 50051\n").unwrap();
    std::fs::write(
        &config,
        "services_dir = \"services.d\"\nnode = \"n\"\naddress = \"http://127.0.0.1:8500\"\n[consul]\ntoken_flie = \"t\"\n",
    )
    .unwrap();
    for args in [&["validate", "--config", cfg][..], &["validate", "--agent-only", "--config", cfg]] {
        let (code, out) = run(args);
        assert_eq!(code, 1, "{out}");
        let expected = [
            format!("error: {cfg}:3:1: unknown field `address`; did you mean `address` in [consul]?"),
            format!("error: {cfg}:5:1: unknown field `token_flie` in [consul]; did you mean `token_file`?"),
            "2 error(s)".to_string(),
        ];
        assert_eq!(out.lines().collect::<Vec<_>>(), expected, "{args:?}: {out}");
    }
    // Every command that reads the agent's file says each of them the same way.
    let both = &[
        format!("error: {cfg}:3:1: unknown field `address`; did you mean `address` in [consul]?"),
        format!("error: {cfg}:5:1: unknown field `token_flie` in [consul]; did you mean `token_file`?"),
    ];
    for args in [&["status", "--config", cfg][..], &["drain", "--all", "--config", cfg]] {
        let (code, out) = run(args);
        assert_eq!(code, 1, "{out}");
        assert_eq!(out.lines().collect::<Vec<_>>(), both, "{args:?}: {out}");
    }
    let (code, out) = run(&["run", "--config", cfg]);
    assert_eq!(code, 1, "{out}");
    let said: Vec<&str> = out.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(said, both, "run: {out}");
}

/// The README's from-source step for the man pages (the units say
/// `Documentation=man:tether(1)`), run as written but into a temporary prefix
/// and with the binary this test build made.
#[test]
fn man_pages_install_as_the_readme_says() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let step = readme
        .lines()
        .map(|l| l.trim().trim_matches('`'))
        .find(|l| l.starts_with("target/release/tether-generate man"))
        .expect("README: the man pages' install step");
    assert!(step.contains("/usr/local/share/man/man1"), "{step}");
    let dir = tempfile::tempdir().unwrap();
    let (out, prefix) = (dir.path().join("target/man"), dir.path().join("usr/local"));
    let script = step
        .replace("target/release/tether-generate", env!("CARGO_BIN_EXE_tether-generate"))
        .replace("target/man", out.to_str().unwrap())
        .replace("sudo ", "")
        .replace("/usr/local", prefix.to_str().unwrap());
    let done = Command::new("sh").args(["-ec", &script]).output().unwrap();
    assert!(done.status.success(), "{script}: {done:?}");
    let man1 = prefix.join("share/man/man1");
    for page in ["tether.1", "tether-run.1", "tether-drain.1"] {
        assert!(man1.join(page).is_file(), "{page} installed in {}", man1.display());
    }
    let source = std::fs::read_to_string(man1.join("tether.1")).unwrap();
    assert!(source.contains(".SH NAME") && source.contains("tether"), "{source}");
    // tether-validate(1) lists every key of both files, from the parser's own schemas.
    let validate = std::fs::read_to_string(man1.join("tether-validate.1")).unwrap();
    for key in
        ["deregister_critical_after", "weight_warning", "not_serving", "metadata_files", "authority", "writes_per_minute", "token_file"]
    {
        assert!(validate.contains(key), "{key} missing from tether-validate.1:\n{validate}");
    }
    assert!(validate.contains("[[check]]"), "{validate}");
    // And man finds and renders it there.
    if Command::new("man").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let shown = Command::new("man")
            .arg("-M")
            .arg(prefix.join("share/man"))
            .arg("tether")
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        // Without a terminal, bold and underline may still come as overstrikes ("N\bN", "_\bt").
        let text = String::from_utf8_lossy(&shown.stdout).chars().fold(String::new(), |mut t, c| {
            if c == '\u{8}' {
                t.pop();
            } else {
                t.push(c);
            }
            t
        });
        assert!(shown.status.success() && text.contains("NAME") && text.contains("tether"), "{shown:?}");
    }
}

/// `RUST_LOG=tether=debug` shows tether's debug lines (the subscriber's own
/// maximum level once stopped them at INFO, whatever RUST_LOG said).
#[test]
fn rust_log_debug_shows_debug_lines() {
    let consul = Consul::start();
    let mut server = HealthServer::start(0, &[]);
    let setup = Setup::consul(&consul, "");
    setup.write_service("a.toml", &format!("name = \"alpha\"\nid = \"alpha\"\nport = {}\n[check]\ninterval = \"500ms\"\n", server.port));
    let tether = setup.start_with_env(&[("RUST_LOG", "info,tether=debug")]);
    consul.wait_health("alpha", "passing", std::time::Duration::from_secs(20));
    server.set("not_serving");
    consul.wait_health("alpha", "critical", std::time::Duration::from_secs(20));
    tether.wait_log("health written", std::time::Duration::from_secs(20));
    assert!(tether.log().lines().any(|l| l.contains("DEBUG") && l.contains("health written")), "{}", tether.log());
}
