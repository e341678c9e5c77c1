//! One service file (`services_dir/*.toml`) → a validated [`ServiceSpec`].

use super::agent::{BackendKind, Defaults};
use super::damping::Damping;
use super::error::doc::{self, At, Section};
use super::error::suggest::Schema;
use super::error::{ConfigErrors, Errors};
use super::file::read_file;
use super::tls::{RawTls, TlsConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_TTL: Duration = Duration::from_secs(15);
const DEFAULT_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// Consul's own minimum for DeregisterCriticalServiceAfter.
pub const CONSUL_MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// etcd's minimum lease TTL at default settings.
pub const ETCD_MIN_TTL: Duration = Duration::from_secs(2);
const MIN_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckMode {
    Watch,
    Poll,
}

impl CheckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckMode::Watch => "watch",
            CheckMode::Poll => "poll",
        }
    }
}

/// How one service is health-checked over grpc.health.v1.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckSpec {
    /// host:port of the gRPC server.
    pub target: String,
    /// `HealthCheckRequest.service`; empty = the whole server.
    pub service: String,
    pub mode: CheckMode,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// TLS to the gRPC server (`tls = true`); never a silent plaintext fallback.
    pub tls: Option<TlsConfig>,
    /// gRPC metadata sent on every Check and Watch (the connection's
    /// liveness Check included), by header name (lower case).
    pub metadata: BTreeMap<String, MetadataSource>,
    /// `:authority` of the calls, instead of the target.
    pub authority: Option<String>,
    /// What an answered NOT_SERVING makes the service (a crash or an
    /// unreachable server is always critical).
    pub not_serving: NotServing,
}

/// `[check] not_serving`: the registry status of an answered NOT_SERVING.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NotServing {
    #[default]
    Critical,
    /// Out of the passing set, but never reaped by DeregisterCriticalServiceAfter.
    Warning,
}

/// Consul's `Weights` (and etcd's `weight` in Metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

/// Where a metadata value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetadataSource {
    /// Written in the service file (not secret).
    Value(String),
    /// The content of a file, trimmed; re-read when it changes. Never logged.
    File(PathBuf),
}

/// A validated service definition: what the registry should say about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The file it came from.
    pub file: PathBuf,
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub ttl: Duration,
    pub deregister_critical_after: Duration,
    /// Its checks (at least one): `[check]`, or several as `[[check]]`;
    /// the service passes only while all of them pass.
    pub checks: Vec<CheckSpec>,
    /// `weight` and `weight_warning`, if `weight` is set.
    pub weights: Option<Weights>,
    /// Flap damping: the agent's `[damping]` with this file's own over it.
    pub damping: Damping,
}

impl CheckSpec {
    /// The defaults of a `[check]` with only `target` and `service` set (for tests).
    #[cfg(test)]
    pub(crate) fn watching(target: &str, service: &str) -> CheckSpec {
        CheckSpec {
            target: target.into(),
            service: service.into(),
            mode: CheckMode::Watch,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 1,
            fall: 1,
            tls: None,
            metadata: BTreeMap::new(),
            authority: None,
            not_serving: NotServing::Critical,
        }
    }
}

impl ServiceSpec {
    /// How long its first health result may take: the longest check timeout.
    pub fn first_result_within(&self) -> Duration {
        self.checks.iter().map(|c| c.timeout).max().unwrap_or_default()
    }
}

/// The keys of a service file, by table (`""`: the top level). `meta`,
/// `[check.metadata]` and `[check.metadata_files]` take any keys.
pub(crate) const SCHEMA: &Schema = &[
    (
        "",
        &[
            "name",
            "id",
            "address",
            "port",
            "tags",
            "meta",
            "ttl",
            "deregister_critical_after",
            "weight",
            "weight_warning",
            "check",
            "damping",
        ],
    ),
    (
        "check",
        &[
            "target",
            "service",
            "mode",
            "interval",
            "timeout",
            "rise",
            "fall",
            "tls",
            "ca_file",
            "server_name",
            "cert_file",
            "key_file",
            "metadata",
            "metadata_files",
            "authority",
            "not_serving",
        ],
    ),
    ("damping", super::damping::KEYS),
];

/// Meta keys tether writes itself; a service file may not set them.
pub const RESERVED_META: [&str; 3] = ["managed-by", "tether-node", "tether-instance"];

/// Read and validate one service file.
pub fn load(path: &Path, defaults: &Defaults) -> Result<ServiceSpec, ConfigErrors> {
    let text = read_file(path)?;
    parse(path, &text, defaults)
}

/// Parse and validate service-file text: every problem in it, or the spec.
pub fn parse(path: &Path, text: &str, defaults: &Defaults) -> Result<ServiceSpec, ConfigErrors> {
    let doc = doc::parse(path, text)?;
    let mut errors = Errors::new(path, text);
    let errs = &mut errors;
    let top = Section::top(&doc, SCHEMA, errs);

    top.require("name", "add it, e.g. name = \"orders\"", errs);
    let name = match top.string("name", errs) {
        Some(n) => {
            let name = n.value.trim().to_string();
            if let Err(why) = check_name(&name) {
                errs.at(n.span, format!("name {:?} {why}", n.value), NAME_HINT);
            }
            name
        }
        None => String::new(),
    };
    top.require("port", "add it: the port the service listens on, e.g. port = 50051", errs);
    let port = match top.integer("port", errs) {
        Some(p) if (1..=65535).contains(&p.value) => p.value as u16,
        Some(p) => {
            errs.at(p.span, format!("port {} is out of range", p.value), "use a port from 1 to 65535");
            0
        }
        None => 0,
    };
    let id = match top.string("id", errs) {
        Some(id) => {
            if let Err(why) = check_name(&id.value) {
                errs.at(id.span, format!("id {:?} {why}", id.value), NAME_HINT);
            }
            id.value
        }
        None => format!("{name}-{}-{port}", sanitize(&defaults.node)),
    };
    let address = match top.string("address", errs) {
        Some(a) => {
            let a_str = a.value.trim();
            if a_str.is_empty() || a_str.contains(char::is_whitespace) || a_str.contains('/') {
                errs.at(
                    a.span.clone(),
                    format!("address {:?} is not a host name or IP", a.value),
                    "give an IP such as \"10.0.0.5\" or a host name, or leave it out to advertise this host's primary IP",
                );
            }
            a_str.to_string()
        }
        None => defaults.address.clone(),
    };
    let mut tags = Vec::new();
    for tag in top.strings("tags", errs).map(|t| t.value).unwrap_or_default() {
        let t = tag.value;
        if t.is_empty() || t.len() > 255 || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
            errs.at(
                tag.span,
                format!("tag {t:?} is empty, too long or has spaces or control characters"),
                "use short tags of printable characters without spaces",
            );
        } else if !tags.contains(&t) {
            tags.push(t);
        }
    }
    let raw_meta = top.string_map("meta", errs);
    if let Some((k, _)) = raw_meta.get(62) {
        errs.at(k.span.clone(), format!("{} meta keys, more than the 62 a service may have", raw_meta.len()), "drop some meta keys");
    }
    let mut meta = BTreeMap::new();
    for (k, v) in raw_meta {
        let key = k.value;
        if RESERVED_META.contains(&key.as_str()) || key.starts_with("consul-") {
            errs.at(
                k.span,
                format!("meta key {key:?} is reserved"),
                "tether sets managed-by and tether-node itself, and Consul reserves consul-*; use another key",
            );
        } else if key.is_empty() || key.len() > 128 || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            errs.at(k.span, format!("meta key {key:?} is not valid"), "use 1-128 ASCII letters, digits, '_' or '-'");
        } else if v.value.len() > 512 {
            errs.at(v.span, format!("meta value for {key:?} is longer than 512 bytes"), "shorten it");
        } else {
            meta.insert(key, v.value);
        }
    }

    let ttl_min = match defaults.backend {
        BackendKind::Etcd => ETCD_MIN_TTL,
        BackendKind::Consul => MIN_TTL,
    };
    let ttl = match top.duration("ttl", errs) {
        None => DEFAULT_TTL,
        Some(d) => {
            let ttl = d.value.0;
            if ttl < ttl_min {
                errs.at(
                    d.span,
                    format!(
                        "ttl {} is below the {} minimum of {}",
                        super::duration::go(ttl),
                        defaults.backend.as_str(),
                        super::duration::go(ttl_min)
                    ),
                    "raise ttl",
                );
            }
            ttl
        }
    };
    let deregister_critical_after = match top.duration("deregister_critical_after", errs) {
        None => DEFAULT_DEREGISTER_AFTER,
        Some(d) => {
            let after = d.value.0;
            if defaults.backend == BackendKind::Consul && after < CONSUL_MIN_DEREGISTER_AFTER {
                errs.at(
                    d.span,
                    format!("deregister_critical_after {} is below Consul's minimum of 1m", super::duration::go(after)),
                    "use \"1m\" or more",
                );
            }
            after
        }
    };

    let weight = |key: &str, min: i64, errs: &mut Errors| {
        top.integer(key, errs).map(|w| {
            if !(min..=65535).contains(&w.value) {
                errs.at(w.span.clone(), format!("{key} = {} is out of range", w.value), format!("use a weight from {min} to 65535"));
            }
            At { value: w.value.clamp(0, 65535) as u32, span: w.span }
        })
    };
    let passing = weight("weight", 1, errs);
    let warning = weight("weight_warning", 1, errs);
    let weights = match (passing, warning) {
        (Some(p), w) => Some(Weights { passing: p.value, warning: w.map_or(1, |w| w.value) }),
        (None, Some(w)) => {
            errs.at(w.span, "weight_warning is set without weight", "set weight too (the weight while passing)");
            None
        }
        (None, None) => None,
    };

    let damping = super::damping::read(top.table("damping", errs), &defaults.damping, errs);
    let mut checks: Vec<CheckSpec> = top.tables("check", errs).into_iter().map(|c| check(c, port, path, errs)).collect();
    if checks.is_empty() {
        checks.push(check(Section::empty("check", SCHEMA), port, path, errs));
    }

    errors.finish(ServiceSpec {
        file: path.to_path_buf(),
        id,
        name,
        address,
        port,
        tags,
        meta,
        ttl,
        deregister_critical_after,
        checks,
        weights,
        damping,
    })
}

/// `[check]`, validated (every key optional).
fn check(c: Section, port: u16, path: &Path, errs: &mut Errors) -> CheckSpec {
    let target = match c.string("target", errs) {
        Some(t) => {
            let s = t.value.trim();
            if !valid_target(s) {
                errs.at(
                    t.span.clone(),
                    format!("check target {:?} is not host:port or unix:///path", t.value),
                    "write it as \"127.0.0.1:50051\", \"localhost:50051\" or \"unix:///run/orders/grpc.sock\"",
                );
            }
            s.to_string()
        }
        None => format!("127.0.0.1:{port}"),
    };
    let mode = match c.string("mode", errs) {
        None => CheckMode::Watch,
        Some(m) => match m.value.as_str() {
            "watch" => CheckMode::Watch,
            "poll" => CheckMode::Poll,
            other => {
                errs.at(m.span.clone(), format!("check mode {other:?} is not known"), "use \"watch\" or \"poll\"");
                CheckMode::Watch
            }
        },
    };
    let interval = c.duration("interval", errs).map_or(Duration::from_secs(5), |d| d.value.0);
    let timeout = c.duration("timeout", errs).map_or(Duration::from_secs(2), |d| d.value.0);
    let mut threshold = |what: &str| match c.integer(what, errs) {
        None => 1,
        Some(v) if (1..=100).contains(&v.value) => v.value as u32,
        Some(v) => {
            errs.at(v.span, format!("check {what} = {} is out of range", v.value), "use a count from 1 to 100");
            1
        }
    };
    let rise = threshold("rise");
    let fall = threshold("fall");
    let service = c.string("service", errs).map(|s| s.value).unwrap_or_default();

    let mut metadata = BTreeMap::new();
    for (k, v) in c.string_map("metadata", errs) {
        let key = match metadata_key(&k.value) {
            Ok(key) => key,
            Err((msg, hint)) => {
                errs.at(k.span, msg, hint);
                continue;
            }
        };
        if !v.value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            errs.at(
                v.span,
                format!("metadata value for {key:?} has characters other than printable ASCII"),
                "gRPC metadata values are printable ASCII",
            );
            continue;
        }
        metadata.insert(key, MetadataSource::Value(v.value));
    }
    for (k, v) in c.string_map("metadata_files", errs) {
        let key = match metadata_key(&k.value) {
            Ok(key) => key,
            Err((msg, hint)) => {
                errs.at(k.span, msg, hint);
                continue;
            }
        };
        if metadata.contains_key(&key) {
            errs.at(k.span, format!("metadata {key:?} is set in both [check.metadata] and [check.metadata_files]"), "keep one");
            continue;
        }
        metadata.insert(key, MetadataSource::File(secret_path(Path::new(&v.value), path)));
    }
    let authority = c.string("authority", errs).map(|a| {
        let s = a.value.trim();
        if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '@')) {
            errs.at(
                a.span.clone(),
                format!("authority {:?} is not host or host:port", a.value),
                "write it as \"orders.internal\" or \"orders.internal:443\"",
            );
        }
        s.to_string()
    });

    let ca_file = c.path("ca_file", errs);
    let cert_file = c.path("cert_file", errs);
    let key_file = c.path("key_file", errs);
    let server_name = c.string("server_name", errs);
    // The first TLS key, to point at when `tls = true` is missing.
    let tls_key = [ca_file.as_ref().map(|f| &f.span), cert_file.as_ref().map(|f| &f.span), key_file.as_ref().map(|f| &f.span)]
        .into_iter()
        .chain([server_name.as_ref().map(|n| &n.span)])
        .flatten()
        .flatten()
        .min_by_key(|r| r.start)
        .cloned();
    let tls = match c.boolean("tls", errs).map(|b| b.value) {
        Some(true) => {
            let pair_span = cert_file.as_ref().or(key_file.as_ref()).and_then(|f| f.span.clone());
            let raw = RawTls {
                ca_file: ca_file.map(|f| f.value),
                cert_file: cert_file.map(|f| f.value),
                key_file: key_file.map(|f| f.value),
                tls_server_name: server_name.map(|n| n.value),
            };
            match TlsConfig::from_raw(path, raw, path.parent().unwrap_or(Path::new(".")), "check") {
                Ok(tls) => Some(tls),
                Err(e) => {
                    let text = errs.text();
                    errs.push(e.at(text, pair_span));
                    None
                }
            }
        }
        _ if tls_key.is_some() => {
            errs.at(tls_key, "[check] has TLS files but tls is not true", "add `tls = true` to [check]");
            None
        }
        _ => None,
    };
    let not_serving = match c.string("not_serving", errs) {
        None => NotServing::Critical,
        Some(n) => match n.value.as_str() {
            "critical" => NotServing::Critical,
            "warning" => NotServing::Warning,
            other => {
                errs.at(n.span, format!("check not_serving {other:?} is not known"), "use \"critical\" or \"warning\"");
                NotServing::Critical
            }
        },
    };
    CheckSpec { target, service, mode, interval, timeout, rise, fall, tls, metadata, authority, not_serving }
}

const NAME_HINT: &str = "use 1-128 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit";

/// Names and ids end up in URLs (Consul) and key paths (etcd): keep them plain.
pub fn check_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("is empty");
    }
    if s.len() > 128 {
        return Err("is longer than 128 characters");
    }
    if !s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit");
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err("has characters other than letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// A gRPC metadata key as HTTP/2 sends it (lower case), or why it cannot be one.
fn metadata_key(key: &str) -> Result<String, (String, &'static str)> {
    let k = key.to_ascii_lowercase();
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')) {
        return Err((format!("metadata key {key:?} is not a valid gRPC metadata key"), "use letters, digits, '-', '_' and '.'"));
    }
    if k.ends_with("-bin") {
        return Err((
            format!("metadata key {key:?} is a binary header"),
            "tether sends text metadata; use a key that does not end in -bin",
        ));
    }
    if k.starts_with("grpc-") || matches!(k.as_str(), "te" | "content-type" | "user-agent" | "host" | "connection") {
        return Err((format!("metadata key {key:?} is reserved by gRPC or HTTP/2"), "use another key, e.g. authorization or x-api-key"));
    }
    Ok(k)
}

/// A secret file's path: as written if absolute; else a systemd credential
/// of that name (`$CREDENTIALS_DIRECTORY`) if there is one; else relative to
/// the service file.
fn secret_path(p: &Path, file: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    p.to_str().and_then(super::agent::credential_path).unwrap_or_else(|| file.parent().unwrap_or(Path::new(".")).join(p))
}

/// A node name made safe for use inside a default id.
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect()
}

fn valid_target(s: &str) -> bool {
    if let Some(path) = s.strip_prefix("unix://") {
        return path.starts_with('/') && path.len() > 1 && !path.contains(char::is_control);
    }
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    let host_ok = !host.is_empty() && !host.contains(char::is_whitespace) && !host.contains('/');
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

#[cfg(test)]
mod tests {
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
        let e =
            parse_str("name = \"a\"\nport = 1\n[[check]]\nmode = \"poll\"\n[[check]]\nintervall = \"1s\"\ntarget = \"unix://relative\"\n")
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
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn defaults() -> Defaults {
        Defaults { node: "n".into(), address: "10.0.0.1".into(), backend: BackendKind::Etcd, damping: Default::default() }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary text never panics the service-file parser.
        #[test]
        fn service_parser_never_panics(text in "\\PC{0,400}") {
            let _ = parse(Path::new("f.toml"), &text, &defaults());
        }

        /// TOML-shaped input with real keys and random values never panics,
        /// and every error it gives names the file.
        #[test]
        fn service_parser_toml_shaped(
            name in "[a-z/ ]{0,6}", port in any::<i64>(), ttl in "[-0-9a-z]{0,5}",
            mode in "[a-z]{0,6}", rise in any::<i64>(), extra in "[a-z_]{0,8}"
        ) {
            let text = format!("name = \"{name}\"\nport = {port}\nttl = \"{ttl}\"\n{extra} = 1\n[check]\nmode = \"{mode}\"\nrise = {rise}\n");
            if let Err(e) = parse(Path::new("f.toml"), &text, &defaults()) {
                for line in e.to_string().lines() {
                    prop_assert!(line.starts_with("f.toml"), "{}", line);
                }
            }
        }

        /// Arbitrary text never panics the agent-config parser.
        #[test]
        fn agent_parser_never_panics(text in "\\PC{0,400}") {
            let _ = crate::config::agent::parse(Path::new("t.toml"), &text);
        }
    }
}
