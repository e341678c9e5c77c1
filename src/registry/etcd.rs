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

use super::{AgentInfo, ErrorClass, ErrorKind, Heartbeat, Outcome, Registry, RegistryError, RemoteEntry, Result, View, Write};
use crate::config::agent::{credential_path, read_secret};
use crate::config::tls::Rotation;
use crate::config::{EtcdConfig, Owner, ServiceSpec};
use crate::health::{Health, Status};
use backon::{ExponentialBuilder, Retryable};
use etcd_client::{Client, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
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
    /// The agent's instance on its node, when several share a host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
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

/// What a key holds, as compared by the reconciler (see [`View`]): the key,
/// the value without its health (the health is compared apart), the lease
/// and the value's format. A listed key and a spec's are built by this one
/// function, so they are equal exactly when the key is in sync.
fn fingerprint(key: &str, mut value: EndpointUpdate, lease: i64) -> String {
    value.metadata.health.clear();
    let format = value.format();
    format!("{key}|{}|lease:{lease}|{format}", serde_json::to_string(&value).expect("serializable"))
}

pub struct Etcd {
    config: EtcdConfig,
    view: EtcdView,
    client: Option<Client>,
    /// The TLS files the client was built from.
    rotation: Option<Rotation>,
    /// TTL of the current lease (the lease id itself is in the view).
    lease_ttl: i64,
    /// The key each known id was last written under.
    keys: HashMap<String, String>,
    /// This run's id, in the agent key.
    run: String,
    /// The lease the agent key was last written with.
    agent_key_lease: i64,
}

/// The agent key's value: who holds this identity, on which lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct AgentRecord {
    run: String,
    lease: i64,
    /// "alive", or "stopped" (a clean shutdown that left the keys to their TTL).
    state: String,
}

/// How etcd records are compared; see [`View`]. Shares the current lease id
/// with the writer and the heartbeat lane (0 = none).
#[derive(Debug, Clone)]
pub struct EtcdView {
    prefix: String,
    owner: Owner,
    lease: Arc<AtomicI64>,
}

/// The lease keepalive on its own connection.
pub struct EtcdLane {
    config: EtcdConfig,
    lease: Arc<AtomicI64>,
    client: Option<Client>,
    rotation: Option<Rotation>,
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
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

/// The outcomes of a batch whose first write failed with `e` and whose
/// others were not tried.
fn failed_batch(n: usize, e: RegistryError) -> Vec<Outcome> {
    let mut outcomes = vec![Outcome::NotTried; n];
    if let Some(first) = outcomes.first_mut() {
        *first = Outcome::Failed(e);
    }
    outcomes
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

/// A new connection to the cluster (connect timeouts, HTTP/2 keepalive,
/// require-leader, auth with token refresh, TLS).
async fn connect(config: &EtcdConfig) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_tcp_keepalive(Duration::from_secs(10))
        .with_require_leader(true);
    if let Some(user) = &config.username {
        let file = config.password_file.clone().or_else(|| credential_path("etcd.password")).ok_or_else(|| {
            RegistryError::new(ErrorKind::Rejected, "etcd username is set but there is no password_file and no etcd.password credential")
        })?;
        let password = read_secret(&file).map_err(|e| RegistryError::new(ErrorKind::Rejected, e.to_string()))?;
        opts = opts.with_user(user.clone(), password).with_auto_token_refresh(true);
    }
    let tls = &config.tls;
    if tls.is_set() || config.endpoints.iter().any(|e| e.starts_with("https://")) {
        let t = tls.grpc_client().map_err(|e| RegistryError::new(ErrorKind::Rejected, format!("etcd TLS: {e}")))?;
        opts = opts.with_tls(t);
    }
    Client::connect(&config.endpoints, Some(opts)).await.map_err(err)
}

/// The cached client, or a new one; a new one also when TLS files rotated.
async fn client_of(config: &EtcdConfig, client: &mut Option<Client>, rotation: &mut Option<Rotation>, who: &str) -> Result<Client> {
    if client.is_some() && config.tls.is_set() && rotation.as_ref().is_some_and(|r| r.changed(&config.tls)) {
        tracing::info!("etcd TLS files changed; {who} reconnects with them");
        *client = None;
    }
    if let Some(c) = client {
        return Ok(c.clone());
    }
    let stamp = Rotation::new(&config.tls);
    let c = connect(config).await?;
    *rotation = Some(stamp);
    *client = Some(c.clone());
    Ok(c)
}

impl EtcdView {
    pub fn key(&self, name: &str, id: &str) -> String {
        format!("{}/{}/{}", self.prefix, name, id)
    }

    fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
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
                node: self.owner.node.clone(),
                instance: self.owner.instance.clone(),
                managed_by: "tether".into(),
                health: health.into(),
            },
            legacy: false,
        }
    }
}

impl Etcd {
    pub fn new(config: EtcdConfig, owner: &Owner) -> Self {
        let view = EtcdView { prefix: config.prefix.clone(), owner: owner.clone(), lease: Arc::new(AtomicI64::new(0)) };
        Etcd {
            config,
            view,
            client: None,
            rotation: None,
            lease_ttl: 0,
            keys: HashMap::new(),
            run: crate::identity::run_id(),
            agent_key_lease: 0,
        }
    }

    pub fn key(&self, name: &str, id: &str) -> String {
        self.view.key(name, id)
    }

    /// `_tether/agents/<prefix>/<owner>`: outside the services prefix, so no
    /// resolver ever reads it as an endpoint.
    pub fn agent_key(&self) -> String {
        format!("_tether/agents/{}/{}", self.config.prefix, self.view.owner.label())
    }

    async fn put_agent_record(&mut self, state: &str) -> Result<()> {
        let lease = self.view.lease_id();
        let record = AgentRecord { run: self.run.clone(), lease, state: state.into() };
        let body = serde_json::to_string(&record).expect("serializable");
        let key = self.agent_key();
        let client = self.client().await?;
        (|| {
            let mut c = client.clone();
            let (k, v) = (key.clone(), body.clone());
            async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
        })
        .retry(backoff())
        .when(retryable)
        .await
        .map_err(err)?;
        self.agent_key_lease = lease;
        Ok(())
    }

    async fn client(&mut self) -> Result<Client> {
        client_of(&self.config, &mut self.client, &mut self.rotation, "the writer").await
    }

    /// Everything under `<prefix>/` that names this node and instance, with its lease.
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
                (v.metadata.managed_by == "tether"
                    && v.metadata.node == self.view.owner.node
                    && v.metadata.instance == self.view.owner.instance)
                    .then_some((key, v, kv.lease()))
            })
            .collect())
    }

    /// Adopt a still-live lease of a previous run (one look-up per distinct
    /// lease among the keys, normally one), or grant a new one.
    async fn ensure_lease(&mut self, ttl: i64, owned: &[(String, EndpointUpdate, i64)]) -> Result<()> {
        if self.view.lease_id() != 0 && self.lease_ttl == ttl {
            return Ok(());
        }
        let mut client = self.client().await?;
        if self.view.lease_id() == 0 {
            let leases: BTreeSet<i64> = owned.iter().map(|(_, _, l)| *l).filter(|l| *l != 0).collect();
            for lease_id in leases {
                let ttl_resp = client.lease_time_to_live(lease_id, None).await.map_err(err)?;
                if ttl_resp.ttl() > 0 && ttl_resp.granted_ttl() == ttl {
                    tracing::info!(lease = lease_id, ttl, "adopted tether's existing etcd lease");
                    self.view.lease.store(lease_id, Ordering::Relaxed);
                    self.lease_ttl = ttl;
                    return Ok(());
                }
            }
        }
        let granted = client.lease_grant(ttl, None).await.map_err(err)?;
        tracing::info!(lease = granted.id(), ttl, "granted a new etcd lease");
        // Keys still on an old lease are moved by anti-entropy (the lease id is
        // part of every fingerprint); the old lease then expires unused.
        self.view.lease.store(granted.id(), Ordering::Relaxed);
        self.lease_ttl = ttl;
        Ok(())
    }

    fn entries(&mut self, owned: Vec<(String, EndpointUpdate, i64)>) -> Vec<RemoteEntry> {
        self.keys.clear();
        owned
            .into_iter()
            .map(|(key, v, lease)| {
                let health = Health::passing(v.metadata.health.clone());
                let fingerprint = fingerprint(&key, v.clone(), lease);
                self.keys.insert(v.metadata.id.clone(), key);
                RemoteEntry { id: v.metadata.id, name: v.metadata.name, fingerprint, health: Some(health), maintenance: false }
            })
            .collect()
    }

    /// `writes` in one transaction (retried while the failure is one that
    /// heals quickly); on success the keys they leave are remembered.
    async fn txn(&mut self, client: &Client, writes: &[Write], lease: i64) -> Result<()> {
        let mut ops = Vec::new();
        let mut left = Vec::new();
        for w in writes {
            let (o, key) = self.ops(w, lease);
            ops.extend(o);
            left.push((w.id().to_string(), key));
        }
        // Puts and deletes are idempotent: the whole transaction may be retried.
        let result = (|| {
            let mut c = client.clone();
            let txn = Txn::new().and_then(ops.clone());
            async move { c.txn(txn).await }
        })
        .retry(backoff())
        .when(retryable)
        .await;
        match result {
            Ok(_) => {
                for (id, key) in left {
                    match key {
                        Some(k) => self.keys.insert(id, k),
                        None => self.keys.remove(&id),
                    };
                }
                Ok(())
            }
            Err(e) => {
                let e = err(e);
                if e.kind == ErrorKind::Missing {
                    // The lease is gone (expired, or the data was wiped): the
                    // next anti-entropy pass grants a new one.
                    let _ = self.view.lease.compare_exchange(lease, 0, Ordering::Relaxed, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    /// The transaction operations of one write, and the key it leaves behind.
    fn ops(&self, w: &Write, lease: i64) -> (Vec<TxnOp>, Option<String>) {
        let mut ops = Vec::new();
        let (id, key, put) = match w {
            Write::Register { spec, health } | Write::Health { spec, health, .. } => {
                let key = self.key(&spec.name, &spec.id);
                let put = (health.status == Status::Passing).then(|| self.view.value(spec, &health.output));
                (spec.id.as_str(), key, put)
            }
            Write::Deregister { id, name } => (id.as_str(), self.keys.get(id).cloned().unwrap_or_else(|| self.key(name, id)), None),
            // Drained services are removed on etcd; the reconciler never asks this.
            Write::Maintenance { .. } => return (vec![], self.keys.get(w.id()).cloned()),
        };
        if let Some(old) = self.keys.get(id).filter(|k| **k != key) {
            ops.push(TxnOp::delete(old.clone(), None));
        }
        match put {
            Some(v) => {
                let body = serde_json::to_string(&v).expect("serializable");
                ops.push(TxnOp::put(key.clone(), body, Some(PutOptions::new().with_lease(lease))));
                (ops, Some(key))
            }
            None => {
                ops.push(TxnOp::delete(key, None));
                (ops, None)
            }
        }
    }
}

/// Writes per transaction: at most two operations each, within etcd's
/// default limit of 128 operations per transaction.
const MAX_BATCH: usize = 64;

impl View for EtcdView {
    fn keeps_critical(&self) -> bool {
        false
    }

    fn fingerprint(&self, spec: &ServiceSpec) -> String {
        fingerprint(&self.key(&spec.name, &spec.id), self.value(spec, ""), self.lease_id())
    }
}

impl Heartbeat for EtcdLane {
    async fn beat(&mut self) -> Result<()> {
        let lease = self.lease.load(Ordering::Relaxed);
        if lease == 0 {
            return Err(RegistryError::new(ErrorKind::Missing, "etcd: no lease yet"));
        }
        if self.keeper.as_ref().is_some_and(|(id, _, _)| *id != lease) {
            self.keeper = None;
        }
        let rotated = self.rotation.as_ref().is_some_and(|r| r.changed(&self.config.tls));
        let mut client = client_of(&self.config, &mut self.client, &mut self.rotation, "the heartbeat").await?;
        if rotated {
            self.keeper = None;
        }
        for attempt in 0..2 {
            if self.keeper.is_none() {
                let (keeper, stream) = client.lease_keep_alive(lease).await.map_err(err)?;
                self.keeper = Some((lease, keeper, stream));
            }
            let (_, keeper, stream) = self.keeper.as_mut().expect("keeper");
            let answer = match keeper.keep_alive().await {
                Ok(()) => tokio::time::timeout(Duration::from_secs(3), stream.message()).await,
                Err(e) => Ok(Err(e)),
            };
            match answer {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => return Ok(()),
                Ok(Ok(Some(_))) => {
                    self.keeper = None;
                    // Only forget the lease if the writer has not replaced it meanwhile.
                    let _ = self.lease.compare_exchange(lease, 0, Ordering::Relaxed, Ordering::Relaxed);
                    return Err(RegistryError::new(ErrorKind::Missing, format!("etcd: lease {lease:x} not found (expired or data lost)")));
                }
                // The stream closed or failed (e.g. its member died): re-open it once.
                other => {
                    self.keeper = None;
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
}

impl Registry for Etcd {
    type View = EtcdView;
    type Lane = EtcdLane;

    fn view(&self) -> EtcdView {
        self.view.clone()
    }

    fn lane(&self) -> Result<EtcdLane> {
        Ok(EtcdLane { config: self.config.clone(), lease: self.view.lease.clone(), client: None, rotation: None, keeper: None })
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    async fn sync_agent(&mut self, agent: &AgentInfo) -> Result<Vec<RemoteEntry>> {
        let owned = self.owned().await?;
        self.ensure_lease(ttl_secs(agent.ttl), &owned).await?;
        if self.agent_key_lease != self.view.lease_id() {
            self.put_agent_record("alive").await?;
        }
        Ok(self.entries(owned))
    }

    async fn list(&mut self) -> Result<Vec<RemoteEntry>> {
        let owned = self.owned().await?;
        Ok(self.entries(owned))
    }

    async fn apply(&mut self, writes: &[Write]) -> Vec<Outcome> {
        let lease = self.view.lease_id();
        if lease == 0
            && writes
                .iter()
                .any(|w| matches!(w, Write::Register { health, .. } | Write::Health { health, .. } if health.status == Status::Passing))
        {
            return failed_batch(writes.len(), RegistryError::new(ErrorKind::Missing, "etcd: no lease yet"));
        }
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return failed_batch(writes.len(), e),
        };
        match self.txn(&client, writes, lease).await {
            Ok(()) => vec![Outcome::Done; writes.len()],
            // One refused write fails the whole transaction: try them one by
            // one, so that its neighbours are not held up by it.
            Err(e) if e.kind.class() == ErrorClass::Permanent && writes.len() > 1 => {
                let mut outcomes = Vec::with_capacity(writes.len());
                for w in writes {
                    match self.txn(&client, std::slice::from_ref(w), lease).await {
                        Ok(()) => outcomes.push(Outcome::Done),
                        Err(e) => {
                            let transient = e.kind.class() == ErrorClass::Transient;
                            outcomes.push(Outcome::Failed(e));
                            if transient {
                                break;
                            }
                        }
                    }
                }
                outcomes.resize(writes.len(), Outcome::NotTried);
                outcomes
            }
            Err(e) => failed_batch(writes.len(), e),
        }
    }

    async fn claim(&mut self) -> Result<Option<String>> {
        let key = self.agent_key();
        let mut client = self.client().await?;
        let resp = client.get(key.clone(), None).await.map_err(err)?;
        let Some(record) = resp.kvs().first().and_then(|kv| serde_json::from_slice::<AgentRecord>(kv.value()).ok()) else {
            return Ok(None);
        };
        if record.state == "stopped" || record.lease == 0 {
            return Ok(None);
        }
        let first = client.lease_time_to_live(record.lease, None).await.map_err(err)?;
        if first.ttl() <= 0 {
            return Ok(None);
        }
        // A live agent keeps the lease's remaining TTL above granted − period
        // at all times; an orphaned lease only counts down. etcd reports whole
        // seconds, so watch for longer than one period and compare.
        let granted = first.granted_ttl().max(1);
        let period = (granted as u64).div_ceil(3) as i64;
        let until = tokio::time::Instant::now() + crate::identity::watch_window(Duration::from_secs(period as u64));
        let mut last = first.ttl();
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(crate::identity::SAMPLE_EVERY).await;
            let now = client.lease_time_to_live(record.lease, None).await.map_err(err)?.ttl();
            if now <= 0 {
                return Ok(None);
            }
            let refreshed = now > last;
            last = now;
            if refreshed {
                break;
            }
        }
        if last >= granted - period - 1 {
            return Ok(Some(format!("run {} keeps its lease {:x} alive ({key})", record.run, record.lease)));
        }
        Ok(None)
    }

    async fn shutdown(&mut self, deregister: bool) -> Result<()> {
        let lease = self.view.lease_id();
        if lease == 0 {
            return Ok(());
        }
        if deregister {
            let mut client = self.client().await?;
            client.lease_revoke(lease).await.map_err(err)?;
            self.view.lease.store(0, Ordering::Relaxed);
        } else {
            // The keys stay until the lease runs out; a restart adopts them at once.
            self.put_agent_record("stopped").await?;
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
            instance: None,
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

    /// A key as tether writes it, listed back, has the fingerprint of the
    /// spec it was written from (else every key is rewritten on every pass);
    /// on another lease, or in the earlier format, it does not.
    #[test]
    fn a_written_key_listed_back_is_in_sync() {
        let config = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "services".into(),
            username: None,
            password_file: None,
            tls: Default::default(),
        };
        let mut etcd = Etcd::new(config, &Owner::new("web-1", None));
        let defaults =
            crate::config::Defaults { node: "web-1".into(), address: "10.0.0.5".into(), backend: crate::config::BackendKind::Etcd };
        let text = "name = \"orders\"\nport = 50051\ntags = [\"grpc\"]\n";
        let spec = crate::config::service::parse(std::path::Path::new("orders.toml"), text, &defaults).unwrap();
        etcd.view.lease.store(7, Ordering::Relaxed);
        let key = etcd.key(&spec.name, &spec.id);
        let body = serde_json::to_string(&etcd.view.value(&spec, "SERVING")).unwrap();
        let listed =
            |body: &str, lease| -> Vec<(String, EndpointUpdate, i64)> { vec![(key.clone(), serde_json::from_str(body).unwrap(), lease)] };
        let entry = etcd.entries(listed(&body, 7)).remove(0);
        assert_eq!(entry.fingerprint, etcd.view.fingerprint(&spec));
        assert_eq!(entry.health.unwrap().output, "SERVING");
        assert_ne!(etcd.entries(listed(&body, 8)).remove(0).fingerprint, etcd.view.fingerprint(&spec));
        let mut legacy: Value = serde_json::from_str(&body).unwrap();
        legacy["Metadata"] = serde_json::from_str(legacy["Metadata"].as_str().unwrap()).unwrap();
        assert_ne!(etcd.entries(listed(&legacy.to_string(), 7)).remove(0).fingerprint, etcd.view.fingerprint(&spec));
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
