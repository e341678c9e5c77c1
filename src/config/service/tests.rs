//! Service files: parsing, every error with its place, defaults.

use super::*;

fn defaults() -> Defaults {
    Defaults { node: "web-1".into(), address: "10.1.1.1".into(), backend: BackendKind::Consul, damping: Default::default() }
}

fn parse_str(text: &str) -> Result<ServiceSpec, ConfigErrors> {
    parse(Path::new("/etc/tether/services.d/orders.toml"), text, &defaults())
}

#[test]
fn full_file() {
    let s = parse_str(
        r#"
name = "orders"
id = "orders-1"
address = "10.0.0.5"
port = 50051
tags = ["grpc", "v1"]
meta = { version = "1.2.3" }
ttl = "10s"
deregister_critical_after = "2m"
[check]
target = "127.0.0.1:6000"
service = "orders.v1.Orders"
mode = "poll"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 3
"#,
    )
    .unwrap();
    assert_eq!(s.id, "orders-1");
    assert_eq!(s.address, "10.0.0.5");
    assert_eq!(s.tags, vec!["grpc", "v1"]);
    assert_eq!(s.meta["version"], "1.2.3");
    assert_eq!(s.ttl, Duration::from_secs(10));
    assert_eq!(s.deregister_critical_after, Duration::from_secs(120));
    assert_eq!(s.checks[0].mode, CheckMode::Poll);
    assert_eq!(s.checks[0].timeout, Duration::from_millis(500));
    assert_eq!((s.checks[0].rise, s.checks[0].fall), (2, 3));
}

#[test]
fn defaults_fill_in() {
    let s = parse_str("name = \"orders\"\nport = 50051\n").unwrap();
    assert_eq!(s.id, "orders-web-1-50051");
    assert_eq!(s.address, "10.1.1.1");
    assert_eq!(s.checks[0].target, "127.0.0.1:50051");
    assert_eq!(s.checks[0].mode, CheckMode::Watch);
    assert_eq!(s.ttl, Duration::from_secs(15));
    assert_eq!(s.deregister_critical_after, Duration::from_secs(60));
}

#[test]
fn tls_keys_without_tls_and_too_many_meta_keys_name_the_place() {
    let e = parse_str("name = \"orders\"\nport = 1\n[check]\nmode = \"poll\"\nca_file = \"ca.pem\"\n").unwrap_err();
    assert_eq!(e[0].place.map(|p| p.0), Some(5), "{e}");
    assert!(e.to_string().contains("tls is not true"), "{e}");
    let meta: String = (0..63).map(|i| format!("k{i:02} = \"v\"\n")).collect();
    let e = parse_str(&format!("name = \"orders\"\nport = 1\n[meta]\n{meta}")).unwrap_err();
    assert!(e[0].place.is_some_and(|p| p.0 > 3), "{e}");
    assert!(e.to_string().contains("63 meta keys"), "{e}");
    let e = parse_str("name = \"orders\"\nport = 1\n[check]\ntls = true\ncert_file = \"c.pem\"\n").unwrap_err();
    assert_eq!(e[0].place, Some((5, 13)), "{e}");
    assert!(e.to_string().contains("cert_file and key_file go together"), "{e}");
}

#[test]
fn errors_name_the_place() {
    let one = |text: &str| {
        let e = parse_str(text).unwrap_err();
        assert_eq!(e.len(), 1, "{e}");
        e[0].clone()
    };
    let e = one("name = \"orders\"\nport = 70000\n");
    assert_eq!(e.place, Some((2, 8)), "{e}");
    assert!(e.to_string().contains("port 70000 is out of range"), "{e}");
    let e = one("name = \"orders\"\nport = 1\nprot = 2\n");
    assert_eq!(e.place, Some((3, 1)), "{e}");
    assert!(e.to_string().contains("unknown field `prot`"), "{e}");
    let e = one("name = \"\"\nport = 1\n");
    assert!(e.to_string().contains("is empty"), "{e}");
    let e = one("name = \"a\"\nport = 1\nttl = \"0s\"\n");
    assert_eq!(e.place, Some((3, 7)), "{e}");
    assert!(e.to_string().contains("duration \"0s\" must be greater than zero; write a positive Go-style duration"), "{e}");
    let e = one("name = \"a\"\nport = \"x\"\n");
    assert_eq!(e.place, Some((2, 8)), "{e}");
    assert!(e.to_string().contains("invalid type"), "{e}");
    let e = one("name = \"a/b\"\nport = 1\n");
    assert!(e.to_string().contains("characters"), "{e}");
    let e = one("name = \"a\"\nport = 1\nmeta = { managed-by = \"me\" }\n");
    assert!(e.to_string().contains("reserved"), "{e}");
    let e = one("name = \"a\"\nport = 1\nderegister_critical_after = \"30s\"\n");
    assert!(e.to_string().contains("minimum of 1m"), "{e}");
    let e = one("name = \"a\"\n");
    assert_eq!(
        e.to_string(),
        "/etc/tether/services.d/orders.toml: missing field `port`; add it: the port the service listens on, e.g. port = 50051"
    );
    let e = one("name = \"a\"\nport = 1\n[check]\nmode = \"pull\"\n");
    assert_eq!(e.place, Some((4, 8)), "{e}");
    let e = one("name = \"a\"\nport = 1\n[check.metadata]\ngrpc-x = \"1\"\n");
    assert!(e.to_string().contains("orders.toml:4:1: metadata key \"grpc-x\" is reserved"), "{e}");
}

#[test]
fn every_mistake_in_a_file_is_reported_with_its_place() {
    let text = "name = \"orders\"\nport = 70000\ntags = [\"a b\"]\n[check]\nintervall = \"1s\"\nmode = \"pull\"\nrise = 0\n";
    let e = parse_str(text).unwrap_err();
    let lines: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    let f = "/etc/tether/services.d/orders.toml";
    assert_eq!(
        lines,
        [
            format!("{f}:2:8: port 70000 is out of range; use a port from 1 to 65535"),
            format!("{f}:3:9: tag \"a b\" is empty, too long or has spaces or control characters; use short tags of printable characters without spaces"),
            format!("{f}:5:1: unknown field `intervall` in [check]; did you mean `interval`?"),
            format!("{f}:6:8: check mode \"pull\" is not known; use \"watch\" or \"poll\""),
            format!("{f}:7:8: check rise = 0 is out of range; use a count from 1 to 100"),
        ],
        "{e}"
    );
    assert_eq!(e.to_string(), lines.join("\n"));
}

#[test]
fn three_mistakes_three_errors() {
    let e = parse_str("name = \"orders\"\nprot = 50051\n[check]\nintervall = \"1s\"\ntimeout = \"soon\"\n").unwrap_err();
    let places: Vec<_> = e.iter().map(|e| e.place).collect();
    // The missing port has no place: it is last.
    assert_eq!(places, [Some((2, 1)), Some((4, 1)), Some((5, 11)), None], "{e}");
    assert!(e[0].to_string().ends_with("unknown field `prot`; did you mean `port`?"), "{e}");
    assert!(e[1].to_string().ends_with("unknown field `intervall` in [check]; did you mean `interval`?"), "{e}");
    assert!(e[2].to_string().contains("\"soon\" is not a duration"), "{e}");
    assert!(e[3].to_string().contains("missing field `port`"), "{e}");
}

#[test]
fn unknown_keys_suggest_the_key_or_its_table() {
    let hint = |text: &str| parse_str(&format!("name = \"a\"\nport = 1\n{text}")).unwrap_err()[0].hint.clone();
    assert_eq!(hint("[check]\ntiemout = \"1s\"\n"), "did you mean `timeout`?");
    assert_eq!(hint("adress = \"10.0.0.1\"\n"), "did you mean `address`?");
    assert_eq!(hint("deregister-critical-after = \"2m\"\n"), "did you mean `deregister_critical_after`?");
    assert_eq!(hint("interval = \"1s\"\n"), "did you mean `interval` in [check]?");
    assert_eq!(hint("[chekc]\ninterval = \"1s\"\n"), "did you mean `check`?");
    assert_eq!(hint("[check]\nttl = \"20s\"\n"), "did you mean `ttl` at the top level (before any [table])?");
    assert_eq!(hint("[check]\nhold = \"20s\"\n"), "did you mean `hold` in [damping]?");
    assert_eq!(hint("[damping]\nwindw = \"20s\"\n"), "did you mean `window`?");
    // Far from every key: no guess, the general advice.
    assert_eq!(hint("colour = \"blue\"\n"), "remove it or fix its spelling (see the configuration reference in README.md)");
    assert_eq!(hint("[check]\nbanana = 1\n"), "remove it or fix its spelling (see the configuration reference in README.md)");
    // meta and [check.metadata] take any key.
    assert!(parse_str("name = \"a\"\nport = 1\nmeta = { intervall = \"x\" }\n[check.metadata]\nx-api-key = \"k\"\n").is_ok());
}

#[test]
fn wrong_types_are_reported_and_reading_goes_on() {
    let e = parse_str("name = 5\nport = 1\ntags = \"a\"\nmeta = { v = 1 }\n[check]\ntls = \"yes\"\nrise = \"2\"\n").unwrap_err();
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{e}");
    assert!(lines[0].contains(":1:8: invalid type for name: integer `5`, expected a string"), "{e}");
    assert!(lines[1].contains(":3:8: invalid type for tags: string \"a\", expected an array of strings"), "{e}");
    assert!(lines[2].contains(":4:14: invalid type for meta.v: integer `1`, expected a string"), "{e}");
    assert!(lines[3].contains(":6:7: invalid type for check.tls: string \"yes\", expected a boolean"), "{e}");
    assert!(lines[4].contains(":7:8: invalid type for check.rise: string \"2\", expected an integer"), "{e}");
}

#[test]
fn check_metadata_and_authority() {
    let s = parse_str(
        "name = \"a\"\nport = 1\n[check]\nauthority = \"orders.internal\"\n[check.metadata]\nAuthorization = \"Bearer x\"\n[check.metadata_files]\nx-key = \"/run/key\"\n",
    )
    .unwrap();
    assert_eq!(s.checks[0].authority.as_deref(), Some("orders.internal"));
    assert_eq!(s.checks[0].metadata["authorization"], MetadataSource::Value("Bearer x".into()));
    assert_eq!(s.checks[0].metadata["x-key"], MetadataSource::File("/run/key".into()));
}

#[test]
fn a_metadata_name_is_set_once_whatever_its_case_and_table() {
    let e = parse_str(
        "name = \"a\"\nport = 1\n[check.metadata]\nAuthorization = \"x\"\nauthorization = \"y\"\n[check.metadata_files]\nAUTHORIZATION = \"/run/t\"\n",
    )
    .unwrap_err()
    .to_string();
    let lines: Vec<&str> = e.lines().filter(|l| l.contains("is set more than once")).collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert!(lines[0].contains(":5:1: metadata \"authorization\""), "{e}");
    assert!(lines[1].contains(":7:1: metadata \"authorization\""), "{e}");
}

#[test]
fn metadata_files_are_found_in_the_credentials_directory_first() {
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("orders.token"), "Bearer x").unwrap();
    // nextest runs each test in its own process: the variable is this test's.
    std::env::set_var("CREDENTIALS_DIRECTORY", creds.path());
    let file = Path::new("/etc/tether/services.d/orders.toml");
    assert_eq!(secret_path(Path::new("orders.token"), file), creds.path().join("orders.token"));
    assert_eq!(secret_path(Path::new("other.token"), file), Path::new("/etc/tether/services.d/other.token"));
    assert_eq!(secret_path(Path::new("/run/a.token"), file), Path::new("/run/a.token"));
}

#[test]
fn several_checks_and_unix_targets() {
    let s = parse_str(
        "name = \"a\"\nport = 1\n[[check]]\ntarget = \"unix:///run/a.sock\"\n[[check]]\nservice = \"billing\"\nmode = \"poll\"\ntimeout = \"3s\"\n",
    )
    .unwrap();
    assert_eq!(s.checks.len(), 2);
    assert_eq!(s.checks[0].target, "unix:///run/a.sock");
    assert_eq!((s.checks[1].target.as_str(), s.checks[1].service.as_str()), ("127.0.0.1:1", "billing"));
    assert_eq!(s.first_result_within(), Duration::from_secs(3));
    let e = parse_str("name = \"a\"\nport = 1\n[[check]]\nmode = \"poll\"\n[[check]]\nintervall = \"1s\"\ntarget = \"unix://relative\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains(":6:1: unknown field `intervall` in [check]") && e.contains(":7:10: check target"), "{e}");
}

#[test]
fn not_serving_and_weights() {
    let s = parse_str("name = \"a\"\nport = 1\n").unwrap();
    assert_eq!((s.checks[0].not_serving, s.weights), (NotServing::Critical, None));
    let s = parse_str("name = \"a\"\nport = 1\nweight = 10\nweight_warning = 2\n[check]\nnot_serving = \"warning\"\n").unwrap();
    assert_eq!((s.checks[0].not_serving, s.weights), (NotServing::Warning, Some(Weights { passing: 10, warning: 2 })));
    let s = parse_str("name = \"a\"\nport = 1\nweight = 10\n").unwrap();
    assert_eq!(s.weights, Some(Weights { passing: 10, warning: 1 }), "Consul's default warning weight");
    let e = parse_str("name = \"a\"\nport = 1\nweight = 0\n[check]\nnot_serving = \"ok\"\n").unwrap_err();
    let places: Vec<_> = e.iter().map(|e| e.place).collect();
    assert_eq!(places, [Some((3, 10)), Some((5, 15))], "{e}");
    let e = parse_str("name = \"a\"\nport = 1\nweight = 5\nweight_warning = 0\n").unwrap_err();
    assert!(e.to_string().contains(":4:18: weight_warning = 0 is out of range; use a weight from 1 to 65535"), "{e}");
    let e = parse_str("name = \"a\"\nport = 1\nweight_warning = 1\n").unwrap_err();
    assert!(e.to_string().contains(":3:18: weight_warning is set without weight"), "{e}");
}

#[test]
fn etcd_rejects_short_ttl() {
    let d = Defaults { backend: BackendKind::Etcd, ..defaults() };
    let e = parse(Path::new("x.toml"), "name = \"a\"\nport = 1\nttl = \"1s\"\n", &d).unwrap_err();
    assert!(e.to_string().contains("etcd minimum of 2s"), "{e}");
}
