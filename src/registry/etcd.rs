//! The etcd backend: one leased key per passing service, in the format gRPC's
//! own etcd resolver reads.
//!
//! Key `<prefix>/<name>/<id>`, value
//! `{"Op":0,"Addr":"host:port","Metadata":"{\"id\":...}"}` (gRPC-Go's
//! `naming/endpoints` update, Op 0 = Add), with tether's fields JSON-encoded
//! into one string in `Metadata`: etcd's resolver copies `Metadata` into
//! `resolver.Address.Metadata`, which grpc-go hashes and compares, so an object
//! or array there panics the client ("hash of unhashable type"). Values an
//! earlier tether wrote with `Metadata` as an object are still read (and
//! rewritten in place by anti-entropy). A key exists only while its service is passing. All keys hang on
//! one lease per agent (TTL = the shortest service ttl), kept alive at ttl/3:
//! one keepalive stream however many services, and if tether dies every key
//! vanishes within the TTL. A restarted tether adopts its previous lease when it
//! is still alive, so a restart rewrites nothing. A lost lease (expired during a
//! partition, "lease not found", data wiped) is replaced and every key put back
//! by the next anti-entropy pass: the lease id is part of each fingerprint.

use super::{AgentInfo, ErrorKind, Registry, RegistryError, RemoteEntry, Result};
use crate::config::agent::{credential_path, read_secret};
use crate::config::{EtcdConfig, ServiceSpec};
use crate::health::{Health, Status};
use backon::{ExponentialBuilder, Retryable};
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The value gRPC-Go's `naming/endpoints` manager writes and its resolver reads.
/// Serialized with `Metadata` as one JSON string; read from that or from the
/// earlier format with `Metadata` as an object (`legacy`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(into = "Wire", try_from = "Wire")]
pub struct EndpointUpdate {
    pub op: u8,
    pub addr: String,
    pub metadata: Metadata,
    /// Read from the earlier format (`Metadata` as a JSON object).
    pub legacy: bool,
}

/// tether's fields inside the endpoint's `Metadata`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub node: String,
    pub managed_by: String,
    #[serde(default)]
    pub health: String,
}

/// The stored JSON.
#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(rename = "Op")]
    op: u8,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata")]
    metadata: WireMetadata,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum WireMetadata {
    /// `Metadata` as a JSON-encoded string: hashable in grpc-go.
    Encoded(String),
    /// `Metadata` as an object, as an earlier tether wrote it.
    Legacy(Metadata),
}

impl From<EndpointUpdate> for Wire {
    fn from(v: EndpointUpdate) -> Wire {
        let metadata = WireMetadata::Encoded(serde_json::to_string(&v.metadata).expect("serializable"));
        Wire { op: v.op, addr: v.addr, metadata }
    }
}

impl TryFrom<Wire> for EndpointUpdate {
    type Error = serde_json::Error;

    fn try_from(w: Wire) -> std::result::Result<Self, Self::Error> {
        let (metadata, legacy) = match w.metadata {
            WireMetadata::Encoded(s) => (serde_json::from_str(&s)?, false),
            WireMetadata::Legacy(m) => (m, true),
        };
        Ok(EndpointUpdate { op: w.op, addr: w.addr, metadata, legacy })
    }
}

impl EndpointUpdate {
    /// The value's format, part of every fingerprint: a key in the earlier
    /// format never looks "in sync", so anti-entropy rewrites it in place.
    fn format(&self) -> &'static str {
        if self.legacy {
            "metadata-object"
        } else {
            "metadata-string"
        }
    }
}

pub struct Etcd {
    config: EtcdConfig,
    node: String,
    client: Option<Client>,
    lease: Option<Lease>,
    /// The key each known id was last written under.
    keys: HashMap<String, String>,
    /// Modification times of the TLS files the client was built from.
    tls_stamp: Vec<Option<std::time::SystemTime>>,
}

struct Lease {
    id: i64,
    ttl: i64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

fn err(e: etcd_client::Error) -> RegistryError {
    use etcd_client::Error as E;
    let kind = match &e {
        E::GRpcStatus(s) if s.code() == tonic::Code::NotFound || s.message().contains("lease not found") => ErrorKind::Missing,
        E::LeaseKeepAliveError(m) if m.contains("not found") => ErrorKind::Missing,
        E::GRpcStatus(s)
            if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition) =>
        {
            ErrorKind::Rejected
        }
        _ => ErrorKind::Unavailable,
    };
    RegistryError::new(kind, format!("etcd: {e}"))
}

/// Transient failures worth retrying: a member down, no leader, a lost connection.
fn retryable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown),
        E::TransportError(_) | E::IoError(_) => true,
        _ => false,
    }
}

/// Retry policy for idempotent calls: a dead member fails a share of calls.
fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(4)
        .with_jitter()
}

fn ttl_secs(d: Duration) -> i64 {
    (d.as_secs_f64().ceil() as i64).max(2)
}

impl Etcd {
    pub fn new(config: EtcdConfig, node: &str) -> Self {
        Etcd { config, node: node.to_string(), client: None, lease: None, keys: HashMap::new(), tls_stamp: vec![] }
    }

    pub fn key(&self, name: &str, id: &str) -> String {
        format!("{}/{}/{}", self.config.prefix, name, id)
    }

    async fn client(&mut self) -> Result<Client> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_tcp_keepalive(Duration::from_secs(10))
            .with_require_leader(true);
        if let Some(user) = &self.config.username {
            let file = self.config.password_file.clone().or_else(|| credential_path("etcd.password")).ok_or_else(|| {
                RegistryError::new(
                    ErrorKind::Rejected,
                    "etcd username is set but there is no password_file and no etcd.password credential",
                )
            })?;
            let password = read_secret(&file).map_err(|e| RegistryError::new(ErrorKind::Rejected, e.to_string()))?;
            opts = opts.with_user(user.clone(), password).with_auto_token_refresh(true);
        }
        let tls = &self.config.tls;
        if tls.is_set() || self.config.endpoints.iter().any(|e| e.starts_with("https://")) {
            let pem = tls.load().map_err(|e| RegistryError::new(ErrorKind::Rejected, format!("etcd TLS: {e}")))?;
            let mut t = TlsOptions::new();
            t = match pem.ca {
                Some(ca) => t.ca_certificate(Certificate::from_pem(ca)),
                None => t.with_webpki_roots(),
            };
            if let Some((cert, key)) = pem.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            opts = opts.with_tls(t);
        }
        self.tls_stamp = tls.stamp();
        let client = Client::connect(&self.config.endpoints, Some(opts)).await.map_err(err)?;
        self.client = Some(client.clone());
        Ok(client)
    }

    fn value(&self, spec: &ServiceSpec, health: &str) -> EndpointUpdate {
        EndpointUpdate {
            op: 0,
            addr: format!("{}:{}", spec.address, spec.port),
            metadata: Metadata {
                id: spec.id.clone(),
                name: spec.name.clone(),
                tags: spec.tags.clone(),
                meta: spec.meta.clone(),
                node: self.node.clone(),
                managed_by: "tether".into(),
                health: health.into(),
            },
            legacy: false,
        }
    }

    fn lease_id(&self) -> i64 {
        self.lease.as_ref().map_or(0, |l| l.id)
    }

    /// Everything under `<prefix>/` that names this node, with its lease.
    async fn owned(&mut self) -> Result<Vec<(String, EndpointUpdate, i64)>> {
        let client = self.client().await?;
        let prefix = format!("{}/", self.config.prefix);
        let resp = (|| {
            let mut c = client.clone();
            let p = prefix.clone();
            async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
        })
        .retry(backoff())
        .when(retryable)
        .await
        .map_err(err)?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let v: EndpointUpdate = serde_json::from_slice(kv.value()).ok()?;
                let key = kv.key_str().ok()?.to_string();
                (v.metadata.managed_by == "tether" && v.metadata.node == self.node).then_some((key, v, kv.lease()))
            })
            .collect())
    }

    async fn put(&mut self, key: String, value: &EndpointUpdate) -> Result<()> {
        let client = self.client().await?;
        let lease = self.lease_id();
        if lease == 0 {
            return Err(RegistryError::new(ErrorKind::Missing, "etcd: no lease yet"));
        }
        let body = serde_json::to_string(value).expect("serializable");
        (|| {
            let mut c = client.clone();
            let (k, v) = (key.clone(), body.clone());
            async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
        })
        .retry(backoff())
        .when(retryable)
        .await
        .map_err(err)?;
        Ok(())
    }

    async fn delete(&mut self, key: String) -> Result<()> {
        let client = self.client().await?;
        (|| {
            let mut c = client.clone();
            let k = key.clone();
            async move { c.delete(k, None).await }
        })
        .retry(backoff())
        .when(retryable)
        .await
        .map_err(err)?;
        Ok(())
    }
}

impl Registry for Etcd {
    fn keeps_critical(&self) -> bool {
        false
    }

    fn fingerprint(&self, spec: &ServiceSpec) -> String {
        let v = self.value(spec, "");
        let key = self.key(&spec.name, &spec.id);
        format!("{key}|{}|lease:{}|{}", serde_json::to_string(&v).expect("serializable"), self.lease_id(), v.format())
    }

    fn refresh_after(&self) -> Option<Duration> {
        None
    }

    async fn ensure_agent(&mut self, agent: &AgentInfo) -> Result<()> {
        if self.client.is_some() && self.config.tls.is_set() && self.config.tls.stamp() != self.tls_stamp {
            tracing::info!("etcd TLS files changed; reconnecting with them");
            self.client = None;
            if let Some(lease) = self.lease.as_mut() {
                lease.keeper = None;
            }
        }
        let ttl = ttl_secs(agent.ttl);
        if self.lease.as_ref().is_some_and(|l| l.ttl == ttl) {
            return self.heartbeat().await;
        }
        let mut client = self.client().await?;
        if self.lease.is_none() {
            // A restarted tether adopts its previous lease while it lives.
            let owned = self.owned().await?;
            for lease_id in owned.iter().map(|(_, _, l)| *l).filter(|l| *l != 0) {
                let ttl_resp = client.lease_time_to_live(lease_id, None).await.map_err(err)?;
                if ttl_resp.ttl() > 0 && ttl_resp.granted_ttl() == ttl {
                    tracing::info!(lease = lease_id, ttl, "adopted tether's existing etcd lease");
                    self.lease = Some(Lease { id: lease_id, ttl, keeper: None });
                    return self.heartbeat().await;
                }
            }
        }
        let granted = client.lease_grant(ttl, None).await.map_err(err)?;
        tracing::info!(lease = granted.id(), ttl, "granted a new etcd lease");
        // Keys still on an old lease are moved by anti-entropy (the lease id is
        // part of every fingerprint); the old lease then expires unused.
        self.lease = Some(Lease { id: granted.id(), ttl, keeper: None });
        self.heartbeat().await
    }

    async fn heartbeat(&mut self) -> Result<()> {
        let mut client = self.client().await?;
        let Some(lease) = self.lease.as_mut() else {
            return Err(RegistryError::new(ErrorKind::Missing, "etcd: no lease yet"));
        };
        for attempt in 0..2 {
            if lease.keeper.is_none() {
                match client.lease_keep_alive(lease.id).await.map_err(err) {
                    Ok(k) => lease.keeper = Some(k),
                    Err(e) => {
                        if e.kind == ErrorKind::Missing {
                            self.lease = None;
                        }
                        return Err(e);
                    }
                }
            }
            let (keeper, stream) = lease.keeper.as_mut().expect("keeper");
            let sent = keeper.keep_alive().await;
            let answer = match sent {
                Ok(()) => tokio::time::timeout(Duration::from_secs(3), stream.message()).await,
                Err(e) => Ok(Err(e)),
            };
            match answer {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => return Ok(()),
                Ok(Ok(Some(_))) => {
                    let id = lease.id;
                    self.lease = None;
                    return Err(RegistryError::new(ErrorKind::Missing, format!("etcd: lease {id:x} not found (expired or data lost)")));
                }
                // The stream closed or failed (e.g. its member died): re-open it once.
                other => {
                    lease.keeper = None;
                    if attempt == 1 {
                        let why = match other {
                            Ok(Err(e)) => e.to_string(),
                            Ok(Ok(None)) => "keepalive stream closed".into(),
                            Err(_) => "no keepalive answer within 3s".into(),
                            Ok(Ok(Some(_))) => unreachable!(),
                        };
                        return Err(RegistryError::new(ErrorKind::Unavailable, format!("etcd: keepalive failed: {why}")));
                    }
                }
            }
        }
        unreachable!()
    }

    async fn list(&mut self) -> Result<Vec<RemoteEntry>> {
        let owned = self.owned().await?;
        self.keys.clear();
        Ok(owned
            .into_iter()
            .map(|(key, v, lease)| {
                let health = Health::passing(v.metadata.health.clone());
                let mut bare = v.clone();
                bare.metadata.health = String::new();
                let fingerprint = format!("{key}|{}|lease:{lease}|{}", serde_json::to_string(&bare).expect("serializable"), v.format());
                self.keys.insert(v.metadata.id.clone(), key);
                RemoteEntry { id: v.metadata.id, name: v.metadata.name, fingerprint, health: Some(health) }
            })
            .collect())
    }

    async fn register(&mut self, spec: &ServiceSpec, health: &Health) -> Result<()> {
        self.set_health(spec, health).await
    }

    async fn set_health(&mut self, spec: &ServiceSpec, health: &Health) -> Result<()> {
        let key = self.key(&spec.name, &spec.id);
        if let Some(old) = self.keys.get(&spec.id).filter(|k| **k != key).cloned() {
            self.delete(old).await?;
        }
        match health.status {
            Status::Passing => {
                let value = self.value(spec, &health.output);
                self.put(key.clone(), &value).await?;
                self.keys.insert(spec.id.clone(), key);
            }
            Status::Critical => {
                self.delete(key).await?;
                self.keys.remove(&spec.id);
            }
        }
        Ok(())
    }

    async fn deregister(&mut self, id: &str, name: &str) -> Result<()> {
        let key = self.keys.remove(id).unwrap_or_else(|| self.key(name, id));
        self.delete(key).await
    }

    async fn shutdown(&mut self, deregister: bool) -> Result<()> {
        if deregister {
            if let (Some(lease), Ok(mut client)) = (self.lease.take(), self.client().await) {
                client.lease_revoke(lease.id).await.map_err(err)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn metadata() -> Metadata {
        Metadata {
            id: "orders-1".into(),
            name: "orders".into(),
            tags: vec!["grpc".into()],
            meta: BTreeMap::from([("version".into(), "1.2.3".into())]),
            node: "web-1".into(),
            managed_by: "tether".into(),
            health: "SERVING".into(),
        }
    }

    fn metadata_json() -> Value {
        json!({"id": "orders-1", "name": "orders", "tags": ["grpc"], "meta": {"version": "1.2.3"}, "node": "web-1", "managed_by": "tether", "health": "SERVING"})
    }

    #[test]
    fn writes_metadata_as_one_json_string() {
        let v = EndpointUpdate { op: 0, addr: "10.0.0.5:50051".into(), metadata: metadata(), legacy: false };
        let written: Value = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        let encoded = written["Metadata"].as_str().expect("Metadata is a string, never an object or array");
        assert_eq!(serde_json::from_str::<Value>(encoded).unwrap(), metadata_json());
        assert_eq!(written["Op"], 0);
        assert_eq!(written["Addr"], "10.0.0.5:50051");
        assert_eq!(written.as_object().unwrap().len(), 3);
    }

    #[test]
    fn parses_the_string_format() {
        let raw = json!({"Op": 0, "Addr": "10.0.0.5:50051", "Metadata": metadata_json().to_string()});
        let v: EndpointUpdate = serde_json::from_value(raw).unwrap();
        assert_eq!(v, EndpointUpdate { op: 0, addr: "10.0.0.5:50051".into(), metadata: metadata(), legacy: false });
        assert_eq!(v.format(), "metadata-string");
        // Round trip.
        assert_eq!(serde_json::from_str::<EndpointUpdate>(&serde_json::to_string(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn parses_the_earlier_object_format_as_legacy() {
        let raw = json!({"Op": 0, "Addr": "10.0.0.5:50051", "Metadata": metadata_json()});
        let v: EndpointUpdate = serde_json::from_value(raw).unwrap();
        assert_eq!(v.metadata, metadata());
        assert!(v.legacy);
        assert_eq!(v.format(), "metadata-object");
        // Re-serialized, it is in the new format.
        let written: Value = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert!(written["Metadata"].is_string());
    }

    #[test]
    fn same_service_in_both_formats_differs_only_by_the_format_marker() {
        let new = EndpointUpdate { op: 0, addr: "10.0.0.5:50051".into(), metadata: metadata(), legacy: false };
        let old: EndpointUpdate = serde_json::from_value(json!({"Op": 0, "Addr": "10.0.0.5:50051", "Metadata": metadata_json()})).unwrap();
        // Serialized alike, so without the marker an old key would look in sync.
        assert_eq!(serde_json::to_string(&old).unwrap(), serde_json::to_string(&new).unwrap());
        assert_ne!(old.format(), new.format());
    }

    #[test]
    fn rejects_values_that_are_not_tethers() {
        for raw in [
            json!({"Op": 0, "Addr": "a:1", "Metadata": null}),
            json!({"Op": 0, "Addr": "a:1", "Metadata": "not json"}),
            json!({"Op": 0, "Addr": "a:1", "Metadata": "{\"zone\":\"b\"}"}),
            json!({"Op": 0, "Addr": "a:1", "Metadata": ["x"]}),
            json!({"Op": 0, "Addr": "a:1"}),
        ] {
            assert!(serde_json::from_value::<EndpointUpdate>(raw.clone()).is_err(), "{raw}");
        }
    }
}
