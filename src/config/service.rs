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

    // One name space: header names are case-insensitive, and a name is set
    // in [check.metadata] or [check.metadata_files], once.
    let mut metadata = BTreeMap::new();
    for (table, from_file) in [("metadata", false), ("metadata_files", true)] {
        for (k, v) in c.string_map(table, errs) {
            let key = match metadata_key(&k.value) {
                Ok(key) => key,
                Err((msg, hint)) => {
                    errs.at(k.span, msg, hint);
                    continue;
                }
            };
            if metadata.contains_key(&key) {
                errs.at(
                    k.span,
                    format!("metadata {key:?} is set more than once in [check.metadata] and [check.metadata_files]"),
                    "keep one (header names are case-insensitive)",
                );
                continue;
            }
            let source = if from_file {
                MetadataSource::File(secret_path(Path::new(&v.value), path))
            } else if v.value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                MetadataSource::Value(v.value)
            } else {
                errs.at(
                    v.span,
                    format!("metadata value for {key:?} has characters other than printable ASCII"),
                    "gRPC metadata values are printable ASCII",
                );
                continue;
            };
            metadata.insert(key, source);
        }
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
mod tests;

#[cfg(test)]
mod fuzz;
