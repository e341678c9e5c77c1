//! A small typed client for the Consul agent HTTP API (the parts tether uses).
//!
//! Written on reqwest 0.12 + rustls instead of consulrs 0.1: that crate has no
//! `replace-existing-checks`, no timeouts, no way to pass a client in, and
//! brings a second HTTP/TLS stack (see README).

use crate::config::tls::TlsConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("cannot reach Consul at {url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("Consul answered {status} to {what}: {body}")]
    Status { what: String, status: u16, body: String },
    #[error("cannot decode Consul's answer to {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ConsulError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ConsulError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<Weights>,
    pub checks: Vec<CheckDefinition>,
}

/// A service's `Weights` (used by Consul's DNS SRV answers and weighted clients).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

/// A check as sent inside a service registration. Only fields Consul 1.8 knows.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct CheckDefinition {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deregister_critical_service_after: Option<String>,
}

/// An entry of `GET /v1/agent/services`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub weights: Option<Weights>,
}

/// An entry of `GET /v1/agent/checks`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentCheck {
    pub status: String,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub notes: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckUpdate<'a> {
    status: &'a str,
    output: &'a str,
}

/// Resolves `tls_server_name` (the host in the client's URLs) to the addresses
/// of the configured host, when a connection is made, as reqwest resolves any
/// other host: with tokio's `lookup_host` (an IP address at once, a name on
/// tokio's blocking pool), never blocking the runtime's thread. Other names
/// resolve as themselves.
struct ServerName {
    /// `tls_server_name` (compared ignoring ASCII case, as DNS names are).
    name: String,
    /// The configured host: a name, an IPv4 address or a bracketed IPv6 one.
    host: String,
}

impl reqwest::dns::Resolve for ServerName {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let asked = name.as_str();
        let host = if asked.eq_ignore_ascii_case(&self.name) { self.host.clone() } else { asked.to_string() };
        Box::pin(async move {
            // The port is the URL's (reqwest sets it on every address).
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let addrs: Vec<_> = tokio::net::lookup_host((bare, 0)).await.map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to nothing").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The Consul agent's HTTP API.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Output longer than this is cut (Consul keeps 4 KiB by default).
const MAX_OUTPUT: usize = 4096;

impl ConsulClient {
    /// A client for the agent at `base` (http or https). With TLS files, the
    /// server must verify against `ca_file` and `cert_file`/`key_file` are
    /// presented for mTLS; `server_name` overrides the name verified.
    pub fn new(base: &str, token: Option<String>, tls: &TlsConfig) -> Result<Self, String> {
        let mut base = base.trim_end_matches('/').to_string();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        let pem = tls.load()?;
        if let Some(ca) = pem.ca {
            let cert = reqwest::Certificate::from_pem(&ca).map_err(|e| format!("ca_file: {e}"))?;
            builder = builder.add_root_certificate(cert);
        }
        if let Some((cert, key)) = pem.identity {
            let id = reqwest::Identity::from_pem(&[cert, b"\n".to_vec(), key].concat()).map_err(|e| format!("cert_file/key_file: {e}"))?;
            builder = builder.identity(id);
        }
        if let Some(name) = &tls.server_name {
            // Connect to the configured host, but verify (and send SNI for) `name`.
            let url = reqwest::Url::parse(&base).map_err(|e| format!("address: {e}"))?;
            let host = url.host_str().ok_or("address has no host")?;
            builder = builder.dns_resolver(Arc::new(ServerName { name: name.clone(), host: host.to_string() }));
            let mut renamed = url.clone();
            renamed.set_host(Some(name)).map_err(|e| format!("tls_server_name: {e}"))?;
            base = renamed.as_str().trim_end_matches('/').to_string();
        }
        let http = builder.build().map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(ConsulClient { http, base, token })
    }

    pub fn token(&self) -> Option<String> {
        self.token.clone()
    }

    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            rb = rb.header("X-Consul-Token", t);
        }
        rb
    }

    async fn send(&self, what: &str, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, ConsulError> {
        let resp = rb.send().await.map_err(|e| ConsulError::Transport { url: self.base.clone(), detail: crate::error::chain(&e) })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default().trim().chars().take(500).collect();
        Err(ConsulError::Status { what: what.to_string(), status, body })
    }

    /// A removal: what is already gone (404) counts as done.
    async fn remove(&self, what: &str, path: &str) -> Result<(), ConsulError> {
        match self.send(what, self.request(reqwest::Method::PUT, path)).await {
            Err(e) if e.status() == Some(404) => Ok(()),
            r => r.map(drop),
        }
    }

    /// `PUT /v1/agent/service/register?replace-existing-checks=true`.
    pub async fn register_service(&self, reg: &ServiceRegistration) -> Result<(), ConsulError> {
        let rb = self.request(reqwest::Method::PUT, "/v1/agent/service/register?replace-existing-checks=true").json(reg);
        self.send(&format!("registering service {}", reg.id), rb).await.map(drop)
    }

    /// `PUT /v1/agent/service/deregister/<id>`; an unknown id is not an error.
    pub async fn deregister_service(&self, id: &str) -> Result<(), ConsulError> {
        self.remove(&format!("deregistering service {id}"), &format!("/v1/agent/service/deregister/{}", encode(id))).await
    }

    /// `PUT /v1/agent/check/register`: add (or replace) one check of a service.
    pub async fn register_check(&self, service_id: &str, check: &CheckDefinition) -> Result<(), ConsulError> {
        // The same fields as inside a service registration, but its id is
        // "ID" here (Consul 1.8 rejects "CheckID" on this endpoint), and the
        // service it belongs to is named.
        let mut body = serde_json::to_value(check).expect("a check definition is plain data");
        if let Some(fields) = body.as_object_mut() {
            if let Some(id) = fields.remove("CheckID") {
                fields.insert("ID".into(), id);
            }
            fields.insert("ServiceID".into(), service_id.into());
        }
        let rb = self.request(reqwest::Method::PUT, "/v1/agent/check/register").json(&body);
        self.send(&format!("registering check {}", check.check_id), rb).await.map(drop)
    }

    /// `PUT /v1/agent/check/deregister/<check-id>`; an unknown check is not an
    /// error (Consul 1.8 answers 200, later versions 404).
    pub async fn deregister_check(&self, check_id: &str) -> Result<(), ConsulError> {
        self.remove(&format!("deregistering check {check_id}"), &format!("/v1/agent/check/deregister/{}", encode(check_id))).await
    }

    /// `PUT /v1/agent/check/update/<check-id>`: set a TTL check's status and output.
    pub async fn update_check(&self, check_id: &str, status: &str, output: &str) -> Result<(), ConsulError> {
        let output: String = output.chars().take(MAX_OUTPUT).collect();
        let rb = self
            .request(reqwest::Method::PUT, &format!("/v1/agent/check/update/{}", encode(check_id)))
            .json(&CheckUpdate { status, output: &output });
        self.send(&format!("updating check {check_id}"), rb).await.map(drop)
    }

    /// `PUT /v1/agent/service/maintenance/<id>?enable=…&reason=…`.
    pub async fn maintenance(&self, id: &str, enable: bool, reason: &str) -> Result<(), ConsulError> {
        let path = format!("/v1/agent/service/maintenance/{}?enable={enable}&reason={}", encode(id), encode(reason));
        let rb = self.request(reqwest::Method::PUT, &path);
        self.send(&format!("setting maintenance of service {id}"), rb).await.map(drop)
    }

    /// `GET /v1/agent/services`.
    pub async fn services(&self) -> Result<HashMap<String, AgentService>, ConsulError> {
        self.get_json("/v1/agent/services", "listing services").await
    }

    /// `GET /v1/agent/checks`.
    pub async fn checks(&self) -> Result<HashMap<String, AgentCheck>, ConsulError> {
        self.get_json("/v1/agent/checks", "listing checks").await
    }

    /// The agent's version, from `GET /v1/agent/self` (`Config.Version`).
    pub async fn version(&self) -> Result<String, ConsulError> {
        #[derive(serde::Deserialize)]
        struct SelfInfo {
            #[serde(rename = "Config")]
            config: SelfConfig,
        }
        #[derive(serde::Deserialize)]
        struct SelfConfig {
            #[serde(rename = "Version")]
            version: String,
        }
        let info: SelfInfo = self.get_json("/v1/agent/self", "reading the agent's version").await?;
        Ok(info.config.version)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str, what: &str) -> Result<T, ConsulError> {
        let resp = self.send(what, self.request(reqwest::Method::GET, path)).await?;
        resp.json().await.map_err(|source| ConsulError::Decode { what: what.to_string(), source })
    }
}

/// Percent-encode a path segment (ids are plain already; ':' is kept).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn named(server_name: &str) -> TlsConfig {
        TlsConfig { server_name: Some(server_name.to_string()), ..TlsConfig::default() }
    }

    /// With `tls_server_name`, the client is built without a DNS look-up (it
    /// used to block the runtime's only thread on one) and its connections go
    /// to the configured host, resolved when connecting, under the name.
    #[tokio::test]
    async fn server_name_connects_to_the_configured_host() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "request cut short");
                request.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"Config":{"Version":"1.21.0"}}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        // "localhost": a name, so the look-up goes to tokio's blocking pool.
        let client = ConsulClient::new(&format!("http://localhost:{port}/"), None, &named("Consul.Example")).unwrap();
        assert_eq!(client.base, format!("http://consul.example:{port}"));
        assert_eq!(client.version().await.unwrap(), "1.21.0");
        let request = server.await.unwrap().to_ascii_lowercase();
        assert!(request.contains(&format!("host: consul.example:{port}")), "sent under the server name: {request}");
    }

    #[tokio::test]
    async fn an_unresolvable_host_is_a_transport_error_naming_it() {
        let client = ConsulClient::new("http://nonexistent.invalid:8500", None, &named("consul.example")).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(30), client.version()).await.expect("the look-up ends").unwrap_err();
        assert!(matches!(e, ConsulError::Transport { .. }), "{e}");
        assert!(e.to_string().contains("cannot resolve nonexistent.invalid"), "{e}");
    }
}
