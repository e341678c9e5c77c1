//! The etcd backend: one leased key per passing service, in the format gRPC's
//! own etcd resolver reads.
//!
//! Key `<prefix>/<name>/<id>`, value a gRPC-Go `naming/endpoints` update with
//! tether's fields JSON-encoded into one string in `Metadata` ([`wire`]). A key
//! exists only while its service is passing. All keys hang on
//! one lease per agent (TTL = the shortest service ttl), kept alive at ttl/3:
//! one keepalive stream however many services, and if tether dies every key
//! vanishes within the TTL. A restarted tether adopts its previous lease when it
//! is still alive, so a restart rewrites nothing. A lost lease (expired during a
//! partition, "lease not found", data wiped) is replaced and every key put back
//! by the next anti-entropy pass: the lease id is part of each fingerprint.

mod client;
pub mod wire;

use super::{AgentInfo, ErrorClass, ErrorKind, Heartbeat, Outcome, Registry, RegistryError, RemoteEntry, Result, View, Write};
use crate::config::tls::Rotation;
use crate::config::{EtcdConfig, Owner, ServiceSpec};
use crate::health::{Health, Status};
use backon::Retryable;
use client::{backoff, client_of, err, retryable};
use etcd_client::{Client, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wire::{fingerprint, AgentRecord, EndpointUpdate, Metadata};

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

/// The outcomes of a batch whose first write failed with `e` and whose
/// others were not tried.
fn failed_batch(n: usize, e: RegistryError) -> Vec<Outcome> {
    let mut outcomes = vec![Outcome::NotTried; n];
    if let Some(first) = outcomes.first_mut() {
        *first = Outcome::Failed(e);
    }
    outcomes
}

fn ttl_secs(d: Duration) -> i64 {
    (d.as_secs_f64().ceil() as i64).max(2)
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
                weight: spec.weights.map(|w| w.passing),
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

    /// Everything under `<prefix>/` that names this node and instance, with
    /// its lease. Read in pages of [`LIST_PAGE`] keys at one revision: the
    /// prefix is shared by every agent, and one answer for all of it would
    /// outgrow gRPC's 4 MiB message limit at about 10,000 keys.
    async fn owned(&mut self) -> Result<Vec<(String, EndpointUpdate, i64)>> {
        let client = self.client().await?;
        let prefix = format!("{}/", self.config.prefix);
        let end = prefix_end(prefix.as_bytes());
        let (mut from, mut revision) = (prefix.into_bytes(), 0);
        let mut owned = Vec::new();
        loop {
            let resp = (|| {
                let mut c = client.clone();
                let (from, end) = (from.clone(), end.clone());
                async move { c.get(from, Some(GetOptions::new().with_range(end).with_limit(LIST_PAGE).with_revision(revision))).await }
            })
            .retry(backoff())
            .when(retryable)
            .await
            .map_err(err)?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            owned.extend(resp.kvs().iter().filter_map(|kv| {
                let v: EndpointUpdate = serde_json::from_slice(kv.value()).ok()?;
                let key = kv.key_str().ok()?.to_string();
                (v.metadata.managed_by == "tether"
                    && v.metadata.node == self.view.owner.node
                    && v.metadata.instance == self.view.owner.instance)
                    .then_some((key, v, kv.lease()))
            }));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0); // the next key after it
                }
                _ => return Ok(owned),
            }
        }
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
            Write::Register { spec, health, .. } | Write::Health { spec, health, .. } => {
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
        let window = crate::identity::watch_window(Duration::from_secs(period as u64));
        tracing::info!(window = ?window, "tether's agent key is still on a live lease (an earlier run that crashed, or another agent with this identity): watching it before starting");
        let until = tokio::time::Instant::now() + window;
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

/// Keys per request of a listing ([`Etcd::owned`]): a few hundred KiB.
const LIST_PAGE: i64 = 500;

/// The end of the key range of everything that starts with `prefix` (as
/// etcd's own `WithPrefix`): its last byte below 0xff incremented, what
/// follows dropped; everything from `prefix` on when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|b| *b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

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
        let defaults = crate::config::Defaults {
            node: "web-1".into(),
            address: "10.0.0.5".into(),
            backend: crate::config::BackendKind::Etcd,
            damping: Default::default(),
        };
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
    fn a_prefix_range_ends_where_etcd_ends_it() {
        assert_eq!(prefix_end(b"services/"), b"services0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
