//! The agent's own configuration file (`/etc/tether/tether.toml` by default).

use super::error::doc::{self, Section};
use super::error::suggest::Schema;
use super::error::{ConfigError, ConfigErrors, Errors};
use super::file::read_file;
use super::tls::{RawTls, TlsConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/tether/tether.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Consul,
    Etcd,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Consul => "Consul",
            BackendKind::Etcd => "etcd",
        }
    }
}

/// What a service file does not say but the agent knows.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub node: String,
    /// The host's primary non-loopback IP.
    pub address: String,
    pub backend: BackendKind,
    /// `[damping]` of tether.toml: what a service file's own `[damping]` overrides.
    pub damping: super::damping::Damping,
}

#[derive(Debug, Clone)]
pub struct ConsulConfig {
    /// Base URL of the local Consul agent's HTTP API.
    pub address: String,
    /// File holding the ACL token (sent as X-Consul-Token).
    pub token_file: Option<PathBuf>,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Keys are `<prefix>/<name>/<id>`; no leading or trailing '/'.
    pub prefix: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone)]
pub enum BackendConfig {
    Consul(ConsulConfig),
    Etcd(EtcdConfig),
}

impl BackendConfig {
    pub fn kind(&self) -> BackendKind {
        match self {
            BackendConfig::Consul(_) => BackendKind::Consul,
            BackendConfig::Etcd(_) => BackendKind::Etcd,
        }
    }
}

/// Who owns the registrations an agent makes: its node, and its instance on
/// that node when several agents share a host (one per pod). Anti-entropy
/// touches only records of its own owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub node: String,
    pub instance: Option<String>,
}

impl Owner {
    pub fn new(node: &str, instance: Option<&str>) -> Self {
        Owner { node: node.to_string(), instance: instance.map(str::to_string) }
    }

    /// `node`, or `node@instance`: in ids, logs and errors.
    pub fn label(&self) -> String {
        match &self.instance {
            None => self.node.clone(),
            Some(i) => format!("{}@{i}", self.node),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// Default period of anti-entropy.
pub const ANTI_ENTROPY_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub path: PathBuf,
    pub services_dir: PathBuf,
    /// Owner recorded on every registration (with `instance`).
    pub node: String,
    /// This agent's name among several on one host; `None` = the host-wide agent.
    pub instance: Option<String>,
    /// Where the identity lock and the control socket live; `None` = the default
    /// (`/run/tether`, or `/run/tether/<instance>`).
    pub runtime_dir: Option<PathBuf>,
    /// Period of anti-entropy (±20 %).
    pub anti_entropy_every: std::time::Duration,
    /// Local HTTP listener for status and metrics; `None` = off.
    pub listen: Option<SocketAddr>,
    pub deregister_on_shutdown: bool,
    pub backend: BackendConfig,
    /// Flap damping defaults for every service.
    pub damping: super::damping::Damping,
}

impl AgentConfig {
    /// What service files inherit from the agent. With an instance, default
    /// ids carry it too, so two pods' agents on one host never share an id.
    pub fn defaults(&self) -> Defaults {
        let node = match &self.instance {
            None => self.node.clone(),
            Some(i) => format!("{}-{i}", self.node),
        };
        Defaults { node, address: primary_ip(), backend: self.backend.kind(), damping: self.damping }
    }

    pub fn owner(&self) -> Owner {
        Owner::new(&self.node, self.instance.as_deref())
    }

    /// Set the instance (`run --instance` wins over the file).
    pub fn set_instance(&mut self, instance: &str) -> Result<(), ConfigError> {
        check_instance(instance).map_err(|(msg, hint)| ConfigError::new(&self.path, format!("--instance: {msg}"), hint))?;
        self.instance = Some(instance.to_string());
        Ok(())
    }

    /// `runtime_dir`, else systemd's `$RUNTIME_DIRECTORY` (the unit's
    /// `RuntimeDirectory=`), else `/run/tether` (`/run/tether/<instance>`),
    /// which is what the units ask systemd for.
    pub fn runtime_dir(&self) -> PathBuf {
        if let Some(d) = &self.runtime_dir {
            return d.clone();
        }
        if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY").and_then(|v| v.to_str()?.split(':').next().map(PathBuf::from)) {
            if !d.as_os_str().is_empty() {
                return d;
            }
        }
        match &self.instance {
            None => PathBuf::from("/run/tether"),
            Some(i) => Path::new("/run/tether").join(i),
        }
    }

    /// The control socket of the running agent (drain, undrain).
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir().join(match &self.instance {
            None => "tether.sock".to_string(),
            Some(i) => format!("tether@{i}.sock"),
        })
    }

    /// Where the registry is, for messages and the identity lock.
    pub fn registry_endpoint(&self) -> String {
        match &self.backend {
            BackendConfig::Consul(c) => c.address.clone(),
            BackendConfig::Etcd(e) => e.endpoints.join(","),
        }
    }
}

/// An instance name: letters, digits, `-`, `_`, `.`, up to 64.
fn check_instance(s: &str) -> Result<(), (String, &'static str)> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err((format!("instance {s:?} is not a valid name"), "use letters, digits, '-', '_' and '.', up to 64 characters"));
    }
    Ok(())
}

/// The keys of the agent file, by table (`""`: the top level).
pub(crate) const SCHEMA: &Schema = &[
    (
        "",
        &[
            "services_dir",
            "node",
            "instance",
            "runtime_dir",
            "anti_entropy_interval",
            "listen",
            "deregister_on_shutdown",
            "allow_remote_listen",
            "consul",
            "etcd",
            "damping",
        ],
    ),
    ("consul", &["address", "token_file", "ca_file", "cert_file", "key_file", "tls_server_name"]),
    ("etcd", &["endpoints", "prefix", "username", "password_file", "ca_file", "cert_file", "key_file", "tls_server_name"]),
    ("damping", super::damping::KEYS),
];

/// Read and validate the agent configuration file.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigErrors> {
    let text = read_file(path)?;
    parse(path, &text)
}

/// [`load`], with `--instance` (when given) winning over the file's.
pub fn load_as(path: &Path, instance: Option<&str>) -> Result<AgentConfig, ConfigErrors> {
    let mut config = load(path)?;
    if let Some(i) = instance {
        config.set_instance(i)?;
    }
    Ok(config)
}

/// Parse and validate agent-file text: every problem in it, or the config.
pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigErrors> {
    let doc = doc::parse(path, text)?;
    let mut errors = Errors::new(path, text);
    let errs = &mut errors;
    let top = Section::top(&doc, SCHEMA, errs);
    // Paths in the file are relative to its directory, made absolute: the
    // services directory's watch sees absolute paths (and a bare
    // `--config tether.toml` has an empty parent).
    let base = std::path::absolute(path).ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from("."));
    let services_dir = base.join(top.path("services_dir", errs).map_or_else(|| PathBuf::from("/etc/tether/services.d"), |d| d.value));
    let node = match top.string("node", errs) {
        Some(n) => {
            let s = n.value.trim();
            if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control() || c.is_whitespace() || c == '/') {
                errs.at(
                    n.span.clone(),
                    format!("node {:?} is not a valid node name", n.value),
                    "use a host-name-like string, or leave it out for the host name",
                );
            }
            s.to_string()
        }
        None => gethostname::gethostname().to_string_lossy().into_owned(),
    };
    let allow_remote_listen = top.boolean("allow_remote_listen", errs).is_some_and(|b| b.value);
    let listen = match top.string("listen", errs) {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9469))),
        Some(l) if l.value.is_empty() => None,
        Some(l) => match l.value.parse::<SocketAddr>() {
            Err(_) => {
                errs.at(
                    l.span,
                    format!("listen {:?} is not an address:port", l.value),
                    "write it as \"127.0.0.1:9469\", or \"\" to turn the listener off",
                );
                None
            }
            Ok(addr) => {
                if !addr.ip().is_loopback() && !allow_remote_listen {
                    errs.at(
                        l.span,
                        format!("listen {addr} is not a loopback address; status and metrics would be open to the network"),
                        "use 127.0.0.1, or set allow_remote_listen = true if you mean it",
                    );
                }
                Some(addr)
            }
        },
    };
    let consul = top.table("consul", errs).map(|c| consul(c, path, &base, errs));
    let etcd_section = top.table("etcd", errs);
    let etcd = etcd_section.map(|e| etcd(e, path, &base, errs));
    let backend = match (consul, etcd) {
        (Some(c), Some(_)) => {
            errs.at(etcd_section.and_then(|e| e.span()), "both [consul] and [etcd] are set", "keep exactly one registry section");
            BackendConfig::Consul(c)
        }
        (None, None) => {
            // Unless the section is there but is not a table (reported already).
            if !top.has("consul") && !top.has("etcd") {
                errs.at(None, "no registry configured", "add a [consul] or an [etcd] section");
            }
            BackendConfig::Consul(ConsulConfig { address: String::new(), token_file: None, tls: TlsConfig::default() })
        }
        (Some(c), None) => BackendConfig::Consul(c),
        (None, Some(e)) => BackendConfig::Etcd(e),
    };
    let instance = top.string("instance", errs).map(|i| {
        if let Err((msg, hint)) = check_instance(&i.value) {
            errs.at(i.span, msg, hint);
        }
        i.value
    });
    let anti_entropy_every = match top.duration("anti_entropy_interval", errs) {
        None => ANTI_ENTROPY_EVERY,
        Some(d) => {
            let every = d.value.0;
            if every < std::time::Duration::from_secs(1) {
                errs.at(
                    d.span,
                    format!("anti_entropy_interval {} is too short", humantime::format_duration(every)),
                    "use 1s or more (default 30s)",
                );
            }
            every
        }
    };
    let damping = super::damping::read(top.table("damping", errs), &super::damping::Damping::default(), errs);
    let runtime_dir = top.path("runtime_dir", errs).map(|d| base.join(d.value));
    let deregister_on_shutdown = top.boolean("deregister_on_shutdown", errs).is_none_or(|b| b.value);
    errors.finish(AgentConfig {
        path: path.to_path_buf(),
        services_dir,
        node,
        instance,
        runtime_dir,
        anti_entropy_every,
        listen,
        deregister_on_shutdown,
        backend,
        damping,
    })
}

/// TLS settings of a registry section; a problem goes to `errs` (at the
/// section) and leaves no TLS.
fn section_tls(s: &Section, file: &Path, base: &Path, name: &str, errs: &mut Errors) -> TlsConfig {
    let raw = RawTls {
        ca_file: s.path("ca_file", errs).map(|f| f.value),
        cert_file: s.path("cert_file", errs).map(|f| f.value),
        key_file: s.path("key_file", errs).map(|f| f.value),
        tls_server_name: s.string("tls_server_name", errs).map(|n| n.value),
    };
    TlsConfig::from_raw(file, raw, base, name).unwrap_or_else(|e| {
        let text = errs.text();
        errs.push(e.at(text, s.span()));
        TlsConfig::default()
    })
}

/// `[consul]`, validated.
fn consul(c: Section, file: &Path, base: &Path, errs: &mut Errors) -> ConsulConfig {
    let address = match c.string("address", errs) {
        None => "http://127.0.0.1:8500".to_string(),
        Some(a) => {
            let s = a.value.trim_end_matches('/');
            if !matches!(reqwest::Url::parse(s), Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
                errs.at(
                    a.span.clone(),
                    format!("consul address {:?} is not an http(s) URL", a.value),
                    "write it as \"http://127.0.0.1:8500\"",
                );
            }
            s.to_string()
        }
    };
    let token_file = c.path("token_file", errs).map(|p| base.join(p.value));
    let tls = section_tls(&c, file, base, "consul", errs);
    if tls.is_set() && !address.starts_with("https://") {
        errs.at(c.span(), "[consul] has TLS files but its address is not https://", "use an https:// address");
    }
    ConsulConfig { address, token_file, tls }
}

/// `[etcd]`, validated.
fn etcd(e: Section, file: &Path, base: &Path, errs: &mut Errors) -> EtcdConfig {
    e.require("endpoints", "list at least one endpoint, e.g. endpoints = [\"http://127.0.0.1:2379\"]", errs);
    let mut endpoints = Vec::new();
    if let Some(list) = e.strings("endpoints", errs) {
        if list.value.is_empty() {
            errs.at(list.span.clone(), "etcd endpoints is empty", "list at least one endpoint, e.g. [\"http://127.0.0.1:2379\"]");
        }
        for ep in list.value {
            if !matches!(reqwest::Url::parse(&ep.value), Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
                errs.at(ep.span, format!("etcd endpoint {:?} is not an http(s) URL", ep.value), "write endpoints as \"http://host:2379\"");
            }
            endpoints.push(ep.value);
        }
    }
    let prefix = match e.string("prefix", errs) {
        None => "services".to_string(),
        Some(p) => {
            let s = &p.value;
            if s.is_empty() || s.starts_with('/') || s.ends_with('/') || s.contains("//") {
                errs.at(
                    p.span.clone(),
                    format!("etcd prefix {s:?} must be non-empty with no leading or trailing '/'"),
                    "write it as \"services\" (gRPC's resolver trims one leading '/')",
                );
            }
            p.value
        }
    };
    let username = e.string("username", errs).map(|u| u.value);
    let password_file = e.path("password_file", errs);
    if let (Some(p), None) = (&password_file, &username) {
        errs.at(p.span.clone(), "etcd password_file is set without username", "set username too");
    }
    let tls = section_tls(&e, file, base, "etcd", errs);
    EtcdConfig { tls, endpoints, prefix, username, password_file: password_file.map(|p| base.join(p.value)) }
}

/// Read a secret (token, password) from a file; surrounding white space is dropped.
pub fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, format!("cannot read secret file: {e}"), "check the path and that tether may read it"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "secret file is readable by group or others; chmod 600 it");
            }
        }
    }
    Ok(text.trim().to_string())
}

/// A secret handed over by systemd's `LoadCredential=` (in
/// `$CREDENTIALS_DIRECTORY`), if there is one by that name.
pub fn credential_path(name: &str) -> Option<PathBuf> {
    let path = Path::new(&std::env::var_os("CREDENTIALS_DIRECTORY")?).join(name);
    path.exists().then_some(path)
}

/// This host's primary non-loopback IP (IPv4 preferred), or 127.0.0.1.
pub fn primary_ip() -> String {
    let addrs = if_addrs::get_if_addrs().unwrap_or_default();
    let pick = |v4: bool| {
        addrs.iter().find(|i| !i.is_loopback() && i.ip().is_ipv4() == v4 && !i.ip().is_unspecified()).map(|i| i.ip().to_string())
    };
    pick(true).or_else(|| pick(false)).unwrap_or_else(|| "127.0.0.1".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consul_config() {
        let c = parse(Path::new("/etc/tether/tether.toml"), "services_dir = \"services.d\"\nnode = \"web-1\"\nlisten = \"\"\n[consul]\naddress = \"http://127.0.0.1:8500/\"\ntoken_file = \"consul.token\"\n").unwrap();
        assert_eq!(c.services_dir, Path::new("/etc/tether/services.d"));
        // A bare file name: relative to the current directory, made absolute.
        let bare = parse(Path::new("tether.toml"), "services_dir = \"services.d\"\nnode = \"web-1\"\n[consul]\n").unwrap();
        assert_eq!(bare.services_dir, std::env::current_dir().unwrap().join("services.d"));
        assert_eq!(c.node, "web-1");
        assert!(c.listen.is_none());
        assert!(c.deregister_on_shutdown);
        let BackendConfig::Consul(consul) = c.backend else { panic!() };
        assert_eq!(consul.address, "http://127.0.0.1:8500");
        assert_eq!(consul.token_file.unwrap(), Path::new("/etc/tether/consul.token"));
    }

    #[test]
    fn listen_is_loopback_unless_allowed() {
        let e = parse(Path::new("t.toml"), "listen = \"0.0.0.0:9469\"\n[consul]\n").unwrap_err();
        assert!(e.to_string().contains("not a loopback address"), "{e}");
        let c = parse(Path::new("t.toml"), "listen = \"0.0.0.0:9469\"\nallow_remote_listen = true\n[consul]\n").unwrap();
        assert_eq!(c.listen.unwrap().port(), 9469);
    }

    #[test]
    fn exactly_one_backend() {
        let e = parse(Path::new("t.toml"), "node = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("no registry"), "{e}");
        let e = parse(Path::new("t.toml"), "[consul]\n[etcd]\nendpoints = [\"http://x:1\"]\n").unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
    }

    #[test]
    fn etcd_config() {
        let c = parse(Path::new("t.toml"), "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n").unwrap();
        let BackendConfig::Etcd(e) = c.backend else { panic!() };
        assert_eq!(e.prefix, "services");
        let err = parse(Path::new("t.toml"), "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/services\"\n").unwrap_err();
        assert_eq!(err[0].place.map(|p| p.0), Some(3), "{err}");
    }

    #[test]
    fn every_mistake_is_reported_with_its_place() {
        let text = "nodee = \"web-1\"\nlisten = \"nowhere\"\nanti_entropy_interval = \"500ms\"\n[etcd]\nendpoints = [\"ftp://x\"]\nprefix = \"/s\"\npasword_file = \"p\"\n";
        let e = parse(Path::new("t.toml"), text).unwrap_err();
        let lines: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            lines,
            [
                "t.toml:1:1: unknown field `nodee`; did you mean `node`?",
                "t.toml:2:10: listen \"nowhere\" is not an address:port; write it as \"127.0.0.1:9469\", or \"\" to turn the listener off",
                "t.toml:3:25: anti_entropy_interval 500ms is too short; use 1s or more (default 30s)",
                "t.toml:5:14: etcd endpoint \"ftp://x\" is not an http(s) URL; write endpoints as \"http://host:2379\"",
                "t.toml:6:10: etcd prefix \"/s\" must be non-empty with no leading or trailing '/'; write it as \"services\" (gRPC's resolver trims one leading '/')",
                "t.toml:7:1: unknown field `pasword_file` in [etcd]; did you mean `password_file`?",
            ],
            "{e}"
        );
    }

    #[test]
    fn keys_in_the_wrong_table_are_pointed_there() {
        let e = parse(Path::new("t.toml"), "address = \"http://127.0.0.1:8500\"\n[consul]\nendpoints = [\"http://x:1\"]\nhold = \"1s\"\n")
            .unwrap_err();
        let hints: Vec<&str> = e.iter().map(|e| e.hint.as_str()).collect();
        assert_eq!(
            hints,
            ["did you mean `address` in [consul]?", "did you mean `endpoints` in [etcd]?", "did you mean `hold` in [damping]?"],
            "{e}"
        );
        let e = parse(Path::new("t.toml"), "ca_file = \"ca.pem\"\n[consul]\n").unwrap_err();
        assert_eq!(e[0].hint, "did you mean `ca_file` in [consul] or `ca_file` in [etcd]?", "{e}");
        let e = parse(Path::new("t.toml"), "[consul]\nadress = \"x\"\nbanana = 1\n").unwrap_err();
        assert_eq!(e[0].hint, "did you mean `address`?", "{e}");
        assert_eq!(e[1].hint, "remove it or fix its spelling (see the configuration reference in README.md)", "{e}");
    }

    #[test]
    fn wrong_types_and_missing_keys() {
        let e = parse(Path::new("t.toml"), "deregister_on_shutdown = \"no\"\nconsul = \"http://x\"\n").unwrap_err();
        assert_eq!(e.len(), 2, "{e}");
        assert!(
            e[0].to_string().contains("t.toml:1:26: invalid type for deregister_on_shutdown: string \"no\", expected a boolean"),
            "{e}"
        );
        assert!(e[1].to_string().contains("t.toml:2:10: invalid type for consul: string \"http://x\", expected a table"), "{e}");
        let e = parse(Path::new("t.toml"), "[etcd]\nprefix = \"s\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml:1:1: missing field `endpoints` in [etcd]; list at least one endpoint, e.g. endpoints = [\"http://127.0.0.1:2379\"]"
        );
    }

    #[test]
    fn load_as_reports_a_bad_instance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, "[consul]\n").unwrap();
        let e = load_as(&path, Some("a/b")).unwrap_err();
        assert!(e.to_string().contains("--instance: instance \"a/b\" is not a valid name"), "{e}");
    }
}
