//! The agent's own configuration file (`/etc/tether/tether.toml` by default).

use super::error::{from_toml, ConfigError};
use super::file::read_file;
use super::tls::{RawTls, TlsConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    services_dir: Option<PathBuf>,
    node: Option<Spanned<String>>,
    instance: Option<Spanned<String>>,
    runtime_dir: Option<PathBuf>,
    anti_entropy_interval: Option<Spanned<super::duration::GoDuration>>,
    listen: Option<Spanned<String>>,
    deregister_on_shutdown: Option<bool>,
    allow_remote_listen: Option<bool>,
    consul: Option<Spanned<RawConsul>>,
    etcd: Option<Spanned<RawEtcd>>,
    damping: Option<super::damping::RawDamping>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsul {
    address: Option<Spanned<String>>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    tls_server_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Spanned<Vec<String>>,
    prefix: Option<Spanned<String>>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    tls_server_name: Option<String>,
}

/// Read and validate the agent configuration file.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = read_file(path)?;
    parse(path, &text)
}

/// [`load`], with `--instance` (when given) winning over the file's.
pub fn load_as(path: &Path, instance: Option<&str>) -> Result<AgentConfig, ConfigError> {
    let mut config = load(path)?;
    if let Some(i) = instance {
        config.set_instance(i)?;
    }
    Ok(config)
}

pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
    let raw: RawAgent = toml::from_str(text).map_err(|e| from_toml(path, text, &e))?;
    let err = |span, msg: String, hint: &str| ConfigError::new(path, msg, hint).at(text, Some(span));
    let base = path.parent().unwrap_or(Path::new("."));
    let services_dir = base.join(raw.services_dir.unwrap_or_else(|| PathBuf::from("/etc/tether/services.d")));
    let node = match raw.node {
        Some(n) => {
            let s = n.get_ref().trim();
            if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control() || c.is_whitespace() || c == '/') {
                return Err(err(
                    n.span(),
                    format!("node {:?} is not a valid node name", n.get_ref()),
                    "use a host-name-like string, or leave it out for the host name",
                ));
            }
            s.to_string()
        }
        None => gethostname::gethostname().to_string_lossy().into_owned(),
    };
    let listen = match raw.listen {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9469))),
        Some(l) if l.get_ref().is_empty() => None,
        Some(l) => {
            let addr = l.get_ref().parse::<SocketAddr>().map_err(|_| {
                err(
                    l.span(),
                    format!("listen {:?} is not an address:port", l.get_ref()),
                    "write it as \"127.0.0.1:9469\", or \"\" to turn the listener off",
                )
            })?;
            if !addr.ip().is_loopback() && !raw.allow_remote_listen.unwrap_or(false) {
                return Err(err(
                    l.span(),
                    format!("listen {addr} is not a loopback address; status and metrics would be open to the network"),
                    "use 127.0.0.1, or set allow_remote_listen = true if you mean it",
                ));
            }
            Some(addr)
        }
    };
    let backend = match (raw.consul, raw.etcd) {
        (Some(_), Some(e)) => {
            return Err(err(e.span(), "both [consul] and [etcd] are set".into(), "keep exactly one registry section"));
        }
        (None, None) => {
            return Err(ConfigError::new(path, "no registry configured", "add a [consul] or an [etcd] section"));
        }
        (Some(c), None) => {
            let c = c.into_inner();
            let address = match c.address {
                None => "http://127.0.0.1:8500".to_string(),
                Some(a) => {
                    let s = a.get_ref().trim_end_matches('/');
                    match reqwest::Url::parse(s) {
                        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => s.to_string(),
                        _ => {
                            return Err(err(
                                a.span(),
                                format!("consul address {:?} is not an http(s) URL", a.get_ref()),
                                "write it as \"http://127.0.0.1:8500\"",
                            ))
                        }
                    }
                }
            };
            let raw_tls = RawTls { ca_file: c.ca_file, cert_file: c.cert_file, key_file: c.key_file, tls_server_name: c.tls_server_name };
            let tls = TlsConfig::from_raw(path, raw_tls, base, "consul")?;
            if tls.is_set() && !address.starts_with("https://") {
                return Err(ConfigError::new(path, "[consul] has TLS files but its address is not https://", "use an https:// address"));
            }
            BackendConfig::Consul(ConsulConfig { address, token_file: c.token_file.map(|p| base.join(p)), tls })
        }
        (None, Some(e)) => {
            let span = e.span();
            let e = e.into_inner();
            if e.endpoints.get_ref().is_empty() {
                return Err(err(
                    e.endpoints.span(),
                    "etcd endpoints is empty".into(),
                    "list at least one endpoint, e.g. [\"http://127.0.0.1:2379\"]",
                ));
            }
            for ep in e.endpoints.get_ref() {
                match reqwest::Url::parse(ep) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                    _ => {
                        return Err(err(
                            e.endpoints.span(),
                            format!("etcd endpoint {ep:?} is not an http(s) URL"),
                            "write endpoints as \"http://host:2379\"",
                        ))
                    }
                }
            }
            let prefix = match e.prefix {
                None => "services".to_string(),
                Some(p) => {
                    let s = p.get_ref();
                    if s.is_empty() || s.starts_with('/') || s.ends_with('/') || s.contains("//") {
                        return Err(err(
                            p.span(),
                            format!("etcd prefix {s:?} must be non-empty with no leading or trailing '/'"),
                            "write it as \"services\" (gRPC's resolver trims one leading '/')",
                        ));
                    }
                    s.clone()
                }
            };
            if e.password_file.is_some() && e.username.is_none() {
                return Err(err(span, "etcd password_file is set without username".into(), "set username too"));
            }
            let raw_tls = RawTls { ca_file: e.ca_file, cert_file: e.cert_file, key_file: e.key_file, tls_server_name: e.tls_server_name };
            let tls = TlsConfig::from_raw(path, raw_tls, base, "etcd")?;
            BackendConfig::Etcd(EtcdConfig {
                tls,
                endpoints: e.endpoints.into_inner(),
                prefix,
                username: e.username,
                password_file: e.password_file.map(|p| base.join(p)),
            })
        }
    };
    let instance = match raw.instance {
        None => None,
        Some(i) => {
            check_instance(i.get_ref()).map_err(|(msg, hint)| err(i.span(), msg, hint))?;
            Some(i.into_inner())
        }
    };
    let anti_entropy_every = match raw.anti_entropy_interval {
        None => ANTI_ENTROPY_EVERY,
        Some(d) => {
            let v = d.get_ref().0;
            if v < std::time::Duration::from_secs(1) {
                return Err(err(
                    d.span(),
                    format!("anti_entropy_interval {} is too short", humantime::format_duration(v)),
                    "use 1s or more (default 30s)",
                ));
            }
            v
        }
    };
    let damping = raw.damping.unwrap_or_default().over(&super::damping::Damping::default(), path, text)?;
    Ok(AgentConfig {
        path: path.to_path_buf(),
        services_dir,
        node,
        instance,
        runtime_dir: raw.runtime_dir.map(|d| base.join(d)),
        anti_entropy_every,
        listen,
        deregister_on_shutdown: raw.deregister_on_shutdown.unwrap_or(true),
        backend,
        damping,
    })
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
        assert_eq!(err.place.map(|p| p.0), Some(3), "{err}");
    }
}
