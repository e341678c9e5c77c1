//! One service file (`services_dir/*.toml`) → a validated [`ServiceSpec`].

use super::agent::{BackendKind, Defaults};
use super::damping::{Damping, RawDamping};
use super::duration::GoDuration;
use super::error::{from_toml, ConfigError};
use super::file::read_file;
use super::tls::{RawTls, TlsConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

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
    pub check: CheckSpec,
    /// Flap damping: the agent's `[damping]` with this file's own over it.
    pub damping: Damping,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    id: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    port: Spanned<i64>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    meta: BTreeMap<Spanned<String>, Spanned<String>>,
    ttl: Option<Spanned<GoDuration>>,
    deregister_critical_after: Option<Spanned<GoDuration>>,
    #[serde(default)]
    check: RawCheck,
    damping: Option<RawDamping>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    target: Option<Spanned<String>>,
    service: Option<String>,
    mode: Option<Spanned<String>>,
    interval: Option<GoDuration>,
    timeout: Option<GoDuration>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    tls: Option<bool>,
    ca_file: Option<Spanned<PathBuf>>,
    server_name: Option<Spanned<String>>,
    cert_file: Option<Spanned<PathBuf>>,
    key_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    metadata: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    metadata_files: BTreeMap<Spanned<String>, Spanned<PathBuf>>,
    authority: Option<Spanned<String>>,
}

/// Meta keys tether writes itself; a service file may not set them.
pub const RESERVED_META: [&str; 3] = ["managed-by", "tether-node", "tether-instance"];

/// Read and validate one service file.
pub fn load(path: &Path, defaults: &Defaults) -> Result<ServiceSpec, ConfigError> {
    let text = read_file(path)?;
    parse(path, &text, defaults)
}

/// Parse and validate service-file text.
pub fn parse(path: &Path, text: &str, defaults: &Defaults) -> Result<ServiceSpec, ConfigError> {
    let raw: RawService = toml::from_str(text).map_err(|e| from_toml(path, text, &e))?;
    let err = |span: std::ops::Range<usize>, msg: String, hint: &str| ConfigError::new(path, msg, hint).at(text, Some(span));

    let name = raw.name.get_ref().trim().to_string();
    if let Err(why) = check_name(&name) {
        return Err(err(raw.name.span(), format!("name {:?} {why}", raw.name.get_ref()), NAME_HINT));
    }
    let port = *raw.port.get_ref();
    if !(1..=65535).contains(&port) {
        return Err(err(raw.port.span(), format!("port {port} is out of range"), "use a port from 1 to 65535"));
    }
    let port = port as u16;
    let id = match &raw.id {
        Some(id) => {
            if let Err(why) = check_name(id.get_ref()) {
                return Err(err(id.span(), format!("id {:?} {why}", id.get_ref()), NAME_HINT));
            }
            id.get_ref().clone()
        }
        None => format!("{name}-{}-{port}", sanitize(&defaults.node)),
    };
    let address = match &raw.address {
        Some(a) => {
            let a_str = a.get_ref().trim();
            if a_str.is_empty() || a_str.contains(char::is_whitespace) || a_str.contains('/') {
                return Err(err(
                    a.span(),
                    format!("address {:?} is not a host name or IP", a.get_ref()),
                    "give an IP such as \"10.0.0.5\" or a host name, or leave it out to advertise this host's primary IP",
                ));
            }
            a_str.to_string()
        }
        None => defaults.address.clone(),
    };
    let mut tags = Vec::new();
    for tag in &raw.tags {
        let t = tag.get_ref();
        if t.is_empty() || t.len() > 255 || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(err(
                tag.span(),
                format!("tag {t:?} is empty, too long or has spaces or control characters"),
                "use short tags of printable characters without spaces",
            ));
        }
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    let mut meta = BTreeMap::new();
    if let Some(k) = raw.meta.keys().nth(62) {
        return Err(err(k.span(), format!("{} meta keys, more than the 62 a service may have", raw.meta.len()), "drop some meta keys"));
    }
    for (k, v) in &raw.meta {
        let key = k.get_ref();
        if RESERVED_META.contains(&key.as_str()) || key.starts_with("consul-") {
            return Err(err(
                k.span(),
                format!("meta key {key:?} is reserved"),
                "tether sets managed-by and tether-node itself, and Consul reserves consul-*; use another key",
            ));
        }
        if key.is_empty() || key.len() > 128 || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(err(k.span(), format!("meta key {key:?} is not valid"), "use 1-128 ASCII letters, digits, '_' or '-'"));
        }
        if v.get_ref().len() > 512 {
            return Err(err(v.span(), format!("meta value for {key:?} is longer than 512 bytes"), "shorten it"));
        }
        meta.insert(key.clone(), v.get_ref().clone());
    }

    let ttl = raw.ttl.as_ref().map_or(DEFAULT_TTL, |d| d.get_ref().0);
    let ttl_min = match defaults.backend {
        BackendKind::Etcd => ETCD_MIN_TTL,
        BackendKind::Consul => MIN_TTL,
    };
    if ttl < ttl_min {
        let span = raw.ttl.as_ref().map(|d| d.span()).unwrap_or(0..0);
        return Err(err(
            span,
            format!(
                "ttl {} is below the {} minimum of {}",
                super::duration::go(ttl),
                defaults.backend.as_str(),
                super::duration::go(ttl_min)
            ),
            "raise ttl",
        ));
    }
    let deregister_critical_after = raw.deregister_critical_after.as_ref().map_or(DEFAULT_DEREGISTER_AFTER, |d| d.get_ref().0);
    if defaults.backend == BackendKind::Consul && deregister_critical_after < CONSUL_MIN_DEREGISTER_AFTER {
        let span = raw.deregister_critical_after.as_ref().map(|d| d.span()).unwrap_or(0..0);
        return Err(err(
            span,
            format!("deregister_critical_after {} is below Consul's minimum of 1m", super::duration::go(deregister_critical_after)),
            "use \"1m\" or more",
        ));
    }

    let damping = raw.damping.unwrap_or_default().over(&defaults.damping, path, text)?;
    let c = raw.check;
    let target = match &c.target {
        Some(t) => {
            let s = t.get_ref().trim();
            if !valid_target(s) {
                return Err(err(
                    t.span(),
                    format!("check target {:?} is not host:port", t.get_ref()),
                    "write it as \"127.0.0.1:50051\" or \"localhost:50051\"",
                ));
            }
            s.to_string()
        }
        None => format!("127.0.0.1:{port}"),
    };
    let mode = match &c.mode {
        None => CheckMode::Watch,
        Some(m) => match m.get_ref().as_str() {
            "watch" => CheckMode::Watch,
            "poll" => CheckMode::Poll,
            other => return Err(err(m.span(), format!("check mode {other:?} is not known"), "use \"watch\" or \"poll\"")),
        },
    };
    let interval = c.interval.map_or(Duration::from_secs(5), |d| d.0);
    let timeout = c.timeout.map_or(Duration::from_secs(2), |d| d.0);
    let threshold = |v: &Option<Spanned<i64>>, what: &str| -> Result<u32, ConfigError> {
        match v {
            None => Ok(1),
            Some(v) if (1..=100).contains(v.get_ref()) => Ok(*v.get_ref() as u32),
            Some(v) => Err(err(v.span(), format!("check {what} = {} is out of range", v.get_ref()), "use a count from 1 to 100")),
        }
    };
    let rise = threshold(&c.rise, "rise")?;
    let fall = threshold(&c.fall, "fall")?;
    // The first TLS key, to point at when `tls = true` is missing.
    let tls_key = [c.ca_file.as_ref().map(Spanned::span), c.cert_file.as_ref().map(Spanned::span), c.key_file.as_ref().map(Spanned::span)]
        .into_iter()
        .chain([c.server_name.as_ref().map(Spanned::span)])
        .flatten()
        .min_by_key(|r| r.start);
    let mut metadata = BTreeMap::new();
    for (k, v) in &c.metadata {
        let key = metadata_key(k.get_ref()).map_err(|(msg, hint)| err(k.span(), msg, hint))?;
        if !v.get_ref().bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(err(
                v.span(),
                format!("metadata value for {key:?} has characters other than printable ASCII"),
                "gRPC metadata values are printable ASCII",
            ));
        }
        metadata.insert(key, MetadataSource::Value(v.get_ref().clone()));
    }
    for (k, v) in &c.metadata_files {
        let key = metadata_key(k.get_ref()).map_err(|(msg, hint)| err(k.span(), msg, hint))?;
        if metadata.contains_key(&key) {
            return Err(err(k.span(), format!("metadata {key:?} is set in both [check.metadata] and [check.metadata_files]"), "keep one"));
        }
        metadata.insert(key, MetadataSource::File(secret_path(v.get_ref(), path)));
    }
    let authority = match &c.authority {
        None => None,
        Some(a) => {
            let s = a.get_ref().trim();
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '@')) {
                return Err(err(
                    a.span(),
                    format!("authority {:?} is not host or host:port", a.get_ref()),
                    "write it as \"orders.internal\" or \"orders.internal:443\"",
                ));
            }
            Some(s.to_string())
        }
    };
    let tls = match c.tls {
        Some(true) => {
            let raw = RawTls {
                ca_file: c.ca_file.map(Spanned::into_inner),
                cert_file: c.cert_file.map(Spanned::into_inner),
                key_file: c.key_file.map(Spanned::into_inner),
                tls_server_name: c.server_name.map(Spanned::into_inner),
            };
            Some(TlsConfig::from_raw(path, raw, path.parent().unwrap_or(Path::new(".")), "check")?)
        }
        _ if tls_key.is_some() => {
            return Err(err(tls_key.expect("some"), "[check] has TLS files but tls is not true".into(), "add `tls = true` to [check]"));
        }
        _ => None,
    };

    Ok(ServiceSpec {
        file: path.to_path_buf(),
        id,
        name,
        address,
        port,
        tags,
        meta,
        ttl,
        deregister_critical_after,
        check: CheckSpec { target, service: c.service.unwrap_or_default(), mode, interval, timeout, rise, fall, tls, metadata, authority },
        damping,
    })
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

    fn parse_str(text: &str) -> Result<ServiceSpec, ConfigError> {
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
        assert_eq!(s.check.mode, CheckMode::Poll);
        assert_eq!(s.check.timeout, Duration::from_millis(500));
        assert_eq!((s.check.rise, s.check.fall), (2, 3));
    }

    #[test]
    fn defaults_fill_in() {
        let s = parse_str("name = \"orders\"\nport = 50051\n").unwrap();
        assert_eq!(s.id, "orders-web-1-50051");
        assert_eq!(s.address, "10.1.1.1");
        assert_eq!(s.check.target, "127.0.0.1:50051");
        assert_eq!(s.check.mode, CheckMode::Watch);
        assert_eq!(s.ttl, Duration::from_secs(15));
        assert_eq!(s.deregister_critical_after, Duration::from_secs(60));
    }

    #[test]
    fn tls_keys_without_tls_and_too_many_meta_keys_name_the_place() {
        let e = parse_str("name = \"orders\"\nport = 1\n[check]\nmode = \"poll\"\nca_file = \"ca.pem\"\n").unwrap_err();
        assert_eq!(e.place.map(|p| p.0), Some(5), "{e}");
        assert!(e.to_string().contains("tls is not true"), "{e}");
        let meta: String = (0..63).map(|i| format!("k{i:02} = \"v\"\n")).collect();
        let e = parse_str(&format!("name = \"orders\"\nport = 1\n[meta]\n{meta}")).unwrap_err();
        assert!(e.place.is_some_and(|p| p.0 > 3), "{e}");
        assert!(e.to_string().contains("63 meta keys"), "{e}");
    }

    #[test]
    fn errors_name_the_place() {
        let e = parse_str("name = \"orders\"\nport = 70000\n").unwrap_err();
        assert_eq!(e.place, Some((2, 8)), "{e}");
        assert!(e.to_string().contains("port 70000 is out of range"), "{e}");
        let e = parse_str("name = \"orders\"\nport = 1\nprot = 2\n").unwrap_err();
        assert_eq!(e.place.map(|p| p.0), Some(3), "{e}");
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = parse_str("name = \"\"\nport = 1\n").unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        let e = parse_str("name = \"a\"\nport = 1\nttl = \"0s\"\n").unwrap_err();
        assert_eq!(e.place.map(|p| p.0), Some(3), "{e}");
        let e = parse_str("name = \"a\"\nport = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = parse_str("name = \"a/b\"\nport = 1\n").unwrap_err();
        assert!(e.to_string().contains("characters"), "{e}");
        let e = parse_str("name = \"a\"\nport = 1\nmeta = { managed-by = \"me\" }\n").unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        let e = parse_str("name = \"a\"\nport = 1\nderegister_critical_after = \"30s\"\n").unwrap_err();
        assert!(e.to_string().contains("minimum of 1m"), "{e}");
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
                prop_assert!(e.to_string().starts_with("f.toml"));
            }
        }

        /// Arbitrary text never panics the agent-config parser.
        #[test]
        fn agent_parser_never_panics(text in "\\PC{0,400}") {
            let _ = crate::config::agent::parse(Path::new("t.toml"), &text);
        }
    }
}
