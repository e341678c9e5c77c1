//! The Consul backend: services on the local agent, health as checks.
//!
//! Each service carries one check while it passes, two while it does not:
//! - `tether-alive:<id>`, always: an alias of tether's own service
//!   `tether-<node>`, whose single TTL check (`tether-liveness:<node>`) tether
//!   heartbeats at ttl/3. If tether dies, that one check expires and every
//!   alias turns critical, by Consul's own doing; DeregisterCriticalServiceAfter
//!   then removes the services. One heartbeat per agent instead of one per
//!   service. Its notes describe the gRPC check (and are compared, so that a
//!   change of check settings re-registers).
//! - `tether:<id>`, only while the gRPC health is not SERVING: a critical TTL
//!   check with the reason as its output, added when the service turns
//!   critical and deregistered when it passes again.
//!
//! Why not a health check that is always there: each alias check re-reads
//! every check on the agent once a minute, so Consul's idle CPU grows with
//! services × checks; a second check per service doubled it (ARCHITECTURE.md,
//! "What the alias checks cost Consul").

pub mod client;

use super::{AgentInfo, ErrorClass, ErrorKind, Heartbeat, Outcome, Registry, RegistryError, RemoteEntry, Result, View, Write};
use crate::config::agent::read_secret;
use crate::config::duration::go;
use crate::config::file::FileStamp;
use crate::config::tls::{Rotation, TlsConfig};
use crate::config::{Owner, ServiceSpec};
use crate::health::{Health, Status};
use client::{AgentCheck, AgentService, CheckDefinition, ConsulClient, ConsulError, ServiceRegistration};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// TTL of a service's critical health check: it is critical anyway, and
/// tether dying is caught by the alias of its liveness check, so this TTL
/// never decides anything. If it runs out, the output turns "TTL expired" and
/// anti-entropy writes the reason again.
pub const HEALTH_TTL: Duration = Duration::from_secs(24 * 3600);
pub const AGENT_SERVICE_NAME: &str = "tether";
pub const META_MANAGED_BY: &str = "managed-by";
pub const META_NODE: &str = "tether-node";
pub const META_INSTANCE: &str = "tether-instance";
/// Liveness output of an agent that stopped cleanly without deregistering.
const STOPPED: &str = "tether stopped";

pub fn health_check_id(id: &str) -> String {
    format!("tether:{id}")
}
pub fn alias_check_id(id: &str) -> String {
    format!("tether-alive:{id}")
}
/// Why a drained service is in maintenance.
const DRAIN_REASON: &str = "draining (tether drain)";
/// The TTL of the maintenance check a drained service is registered with:
/// ten years (it is critical from the start; the TTL only makes it a check
/// Consul accepts in a registration).
const MAINTENANCE_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The check Consul adds to a service in maintenance mode.
pub fn maintenance_check_id(id: &str) -> String {
    format!("_service_maintenance:{id}")
}

/// tether's own service: `tether-<node>` (`tether-<node>@<instance>`).
pub fn agent_service_id(owner: &Owner) -> String {
    format!("tether-{}", owner.label())
}
pub fn liveness_check_id(owner: &Owner) -> String {
    format!("tether-liveness:{}", owner.label())
}

/// A session with the Consul agent: the HTTP client and its credentials: the ACL token is
/// re-read when its file changes, the HTTP client rebuilt when TLS files
/// rotate. The writer and the heartbeat lane each have their own.
struct Session {
    client: ConsulClient,
    address: String,
    tls: TlsConfig,
    rotation: Rotation,
    token_file: Option<PathBuf>,
    token_stamp: Option<FileStamp>,
}

impl Session {
    /// The agent's services and checks: one read of its state.
    async fn read(&self) -> Result<(HashMap<String, AgentService>, HashMap<String, AgentCheck>)> {
        tokio::try_join!(self.client.services(), self.client.checks()).map_err(err)
    }

    fn new(address: &str, tls: TlsConfig, token_file: Option<PathBuf>) -> std::result::Result<Self, String> {
        let client = ConsulClient::new(address, None, &tls)?;
        let rotation = Rotation::new(&tls);
        Ok(Session { client, address: address.to_string(), tls, rotation, token_file, token_stamp: None })
    }

    /// Pick up rotated TLS files and a changed token file (checked before
    /// every heartbeat, anti-entropy pass and batch of writes), so neither
    /// needs a restart.
    fn refresh(&mut self) -> Result<()> {
        if self.rotation.changed(&self.tls) {
            let rotation = Rotation::new(&self.tls);
            let client =
                ConsulClient::new(&self.address, self.client.token(), &self.tls).map_err(|e| RegistryError::new(ErrorKind::Rejected, e))?;
            tracing::info!("Consul TLS files changed; reconnecting with them");
            self.client = client;
            self.rotation = rotation;
        }
        let Some(path) = &self.token_file else { return Ok(()) };
        let stamp = FileStamp::of(path);
        if stamp.is_none() || stamp == self.token_stamp {
            return Ok(());
        }
        let token = read_secret(path).map_err(|e| RegistryError::new(ErrorKind::Rejected, e.to_string()))?;
        if self.token_stamp.is_some() {
            tracing::info!(file = %path.display(), "Consul ACL token file changed; using the new token");
        }
        self.client.set_token(Some(token));
        self.token_stamp = stamp;
        Ok(())
    }
}

pub struct Consul {
    session: Session,
    view: ConsulView,
    /// This run's id, in the liveness check's output.
    run: String,
    /// The agent's version has been read (once per run, for [`alias_leak`]).
    version_read: bool,
}

/// Whether a Consul agent of `version` leaks the alias check of every service
/// deregistered from it: before hashicorp/consul#14935 (fixed in 1.11.11,
/// 1.12.6, 1.13.3 and 1.14.0) the check's goroutine is never stopped and goes
/// on re-reading all the agent's checks once a minute until the agent
/// restarts. Every service tether removes (or Consul reaps) leaves one.
pub fn alias_leak(version: &str) -> bool {
    let core = version.trim_start_matches('v').split(['-', '+', ' ']).next().unwrap_or("");
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor)), patch) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let patch = patch.flatten().unwrap_or(0);
    match (major, minor) {
        (0, _) => true,
        (1, m) if m <= 10 => true,
        (1, 11) => patch < 11,
        (1, 12) => patch < 6,
        (1, 13) => patch < 3,
        _ => false,
    }
}

/// How Consul records are compared; see [`View`].
#[derive(Debug, Clone)]
pub struct ConsulView {
    owner: Owner,
    /// The ACL token file and TLS files (see [`View::credential_files`]).
    credentials: Vec<PathBuf>,
}

/// tether's liveness heartbeat on its own connection.
pub struct ConsulLane {
    session: Session,
    check_id: String,
    run: String,
    beats: u64,
}

impl Consul {
    pub fn new(address: &str, tls: TlsConfig, owner: &Owner) -> std::result::Result<Self, String> {
        Ok(Consul {
            session: Session::new(address, tls.clone(), None)?,
            view: ConsulView { owner: owner.clone(), credentials: tls_files(&tls) },
            run: crate::identity::run_id(),
            version_read: false,
        })
    }

    /// Read the ACL token from `path` now and again whenever the file changes,
    /// so a rotated token needs no restart.
    pub fn with_token_file(mut self, path: PathBuf) -> Result<Self> {
        self.view.credentials.push(path.clone());
        self.session.token_file = Some(path);
        self.session.refresh()?;
        Ok(self)
    }

    fn owner(&self) -> &Owner {
        &self.view.owner
    }

    /// This node's services among the agent's, with their checks.
    ///
    /// An alias check that is not passing while tether's liveness check, in
    /// the same read, is: Consul 1.8 restoring an agent's state may start a
    /// service's alias check before tether's own service is back, and an
    /// alias check is looked at again only when that service's checks
    /// change, so it would stay critical for good. Such a record differs
    /// from what tether wants (its fingerprint is marked), so it is
    /// registered again, which starts the alias check afresh.
    fn owned_entries(&self, services: HashMap<String, AgentService>, checks: &HashMap<String, AgentCheck>) -> Vec<RemoteEntry> {
        let agent_id = agent_service_id(self.owner());
        let alive = checks.get(&liveness_check_id(self.owner())).is_some_and(|c| c.status == "passing");
        services
            .into_values()
            .filter(|s| s.id != agent_id && self.view.owned(&s.meta))
            .map(|s| {
                // No health check = passing (it exists only while not).
                let health = checks.get(&health_check_id(&s.id)).map_or_else(|| Health::passing(""), health_of);
                let alias = checks.get(&alias_check_id(&s.id));
                let fingerprint = fingerprint_of(
                    &s.service,
                    &s.address,
                    s.port,
                    s.tags.as_deref().unwrap_or(&[]),
                    s.meta.as_ref().unwrap_or(&BTreeMap::new()),
                    alias.map(|c| c.notes.as_str()),
                    s.weights.map(|w| (w.passing, w.warning)),
                );
                let fingerprint = match alias {
                    Some(a) if alive && a.status != "passing" => {
                        tracing::info!(service = %s.id, status = %a.status, "its alias check is not passing while tether's liveness is (a Consul agent restored it stale); registering it again");
                        format!("{fingerprint}|alias {}", a.status)
                    }
                    _ => fingerprint,
                };
                let maintenance = checks.contains_key(&maintenance_check_id(&s.id));
                RemoteEntry { id: s.id, name: s.service, fingerprint, health: Some(health), maintenance }
            })
            .collect()
    }

    fn agent_meta(&self, agent: &AgentInfo) -> BTreeMap<String, String> {
        let mut meta = self.view.owner_meta();
        meta.extend([
            ("tether-ttl".to_string(), go(agent.ttl)),
            ("tether-deregister-after".to_string(), go(agent.deregister_after)),
            ("tether-version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        meta
    }

    fn registration(&self, spec: &ServiceSpec, health: &Health, maintenance: bool) -> ServiceRegistration {
        let mut checks = vec![CheckDefinition {
            check_id: alias_check_id(&spec.id),
            name: "tether agent alive".into(),
            notes: Some(ConsulView::notes(spec)),
            // Consul would start it critical until it has looked at its
            // target, and may sync that to the catalog first: a new service
            // would blip critical. tether is alive as it writes this.
            status: Some(Status::Passing.as_str().into()),
            alias_service: Some(agent_service_id(self.owner())),
            deregister_critical_service_after: Some(go(spec.deregister_critical_after)),
            ..Default::default()
        }];
        if health.status != Status::Passing {
            checks.push(Self::health_check(spec, health.status));
        }
        // Drained: in maintenance from the first moment, as Consul's own
        // maintenance mode makes it (its check id, critical; a TTL check, the
        // one kind a registration may carry without a target, that never
        // lapses into anything else), so a re-registration never shows a
        // drained service passing. `maintenance?enable=false` removes it.
        if maintenance {
            checks.push(CheckDefinition {
                check_id: maintenance_check_id(&spec.id),
                name: "Service Maintenance Mode".into(),
                notes: Some(DRAIN_REASON.into()),
                ttl: Some(go(MAINTENANCE_TTL)),
                status: Some("critical".into()),
                ..Default::default()
            });
        }
        ServiceRegistration {
            id: spec.id.clone(),
            name: spec.name.clone(),
            address: spec.address.clone(),
            port: spec.port,
            tags: spec.tags.clone(),
            meta: self.view.meta(spec),
            weights: spec.weights.map(|w| client::Weights { passing: w.passing, warning: w.warning }),
            checks,
        }
    }

    /// The check a service carries while it is not passing.
    fn health_check(spec: &ServiceSpec, status: Status) -> CheckDefinition {
        CheckDefinition {
            check_id: health_check_id(&spec.id),
            name: "gRPC health (tether)".into(),
            notes: Some(ConsulView::notes(spec)),
            ttl: Some(go(HEALTH_TTL)),
            status: Some(status.as_str().into()),
            deregister_critical_service_after: Some(go(spec.deregister_critical_after)),
            ..Default::default()
        }
    }

    async fn write(&self, w: &Write) -> std::result::Result<(), ConsulError> {
        let client = &self.session.client;
        match w {
            // Consul 1.8 takes no output at registration: a critical
            // service's reason follows as a write of its own (see `written`).
            Write::Register { spec, health, maintenance } => client.register_service(&self.registration(spec, health, *maintenance)).await,
            // Not passing already: the check is there, set its status and reason.
            Write::Health { spec, health, was: Some(Status::Critical | Status::Warning) } if health.status != Status::Passing => {
                client.update_check(&health_check_id(&spec.id), health.status.as_str(), &health.output).await
            }
            // The service turns critical (or warning) the moment the check is added.
            Write::Health { spec, health, .. } if health.status != Status::Passing => {
                client.register_check(&spec.id, &Self::health_check(spec, health.status)).await
            }
            Write::Health { spec, .. } => client.deregister_check(&health_check_id(&spec.id)).await,
            Write::Deregister { id, .. } => client.deregister_service(id).await,
            Write::Maintenance { id, on } => client.maintenance(id, *on, DRAIN_REASON).await,
        }
    }
}

impl ConsulView {
    /// Owned = managed by tether, this node, and this instance (none = none).
    fn owned(&self, meta: &Option<BTreeMap<String, String>>) -> bool {
        meta.as_ref().is_some_and(|m| {
            m.get(META_MANAGED_BY).map(String::as_str) == Some("tether")
                && m.get(META_NODE) == Some(&self.owner.node)
                && m.get(META_INSTANCE) == self.owner.instance.as_ref()
        })
    }

    fn owner_meta(&self) -> BTreeMap<String, String> {
        let mut meta =
            BTreeMap::from([(META_MANAGED_BY.to_string(), "tether".to_string()), (META_NODE.to_string(), self.owner.node.clone())]);
        if let Some(i) = &self.owner.instance {
            meta.insert(META_INSTANCE.into(), i.clone());
        }
        meta
    }

    fn meta(&self, spec: &ServiceSpec) -> BTreeMap<String, String> {
        let mut meta = spec.meta.clone();
        meta.extend(self.owner_meta());
        meta
    }

    /// Human-readable notes on the service's checks; also part of the fingerprint,
    /// so that a change of check settings re-registers.
    fn notes(spec: &ServiceSpec) -> String {
        let checks: Vec<String> =
            spec.checks.iter().map(|c| format!("{} of {} service {:?}", c.mode.as_str(), c.target, c.service)).collect();
        format!("grpc.health.v1 {} by tether; deregistered after critical for {}", checks.join(" and "), go(spec.deregister_critical_after))
    }
}

/// The fields tether compares, from either side.
/// Weights are in it only when not Consul's default (1, 1), so that records
/// written before weights existed keep their fingerprint.
fn fingerprint_of(
    name: &str,
    address: &str,
    port: u16,
    tags: &[String],
    meta: &BTreeMap<String, String>,
    notes: Option<&str>,
    weights: Option<(u32, u32)>,
) -> String {
    let mut v = serde_json::json!({"name": name, "address": address, "port": port, "tags": tags, "meta": meta, "notes": notes});
    if let Some(w) = weights.filter(|w| *w != (1, 1)) {
        v["weights"] = serde_json::json!([w.0, w.1]);
    }
    v.to_string()
}

fn health_of(check: &AgentCheck) -> Health {
    let status = match check.status.as_str() {
        "passing" => Status::Passing,
        "warning" => Status::Warning,
        _ => Status::Critical,
    };
    Health { status, output: check.output.clone() }
}

fn err(e: ConsulError) -> RegistryError {
    let kind = match &e {
        ConsulError::Transport { .. } => ErrorKind::Unavailable,
        // An ACL refusal can come back as a 500 from a forwarded RPC.
        ConsulError::Status { body, .. } if body.contains("Permission denied") => ErrorKind::Rejected,
        // A token this agent does not know (yet): it heals by itself when the
        // token reaches every server, or when a client agent leaves Consul
        // 1.8's legacy ACL mode, each within the 30 s the agent caches the
        // answer; a token that is wrong for good is said in every retry.
        ConsulError::Status { body, .. } if body.contains("ACL not found") => ErrorKind::Unavailable,
        ConsulError::Status { status, body, .. }
            if body.contains("does not have associated TTL")
                || body.contains("Unknown check")
                || body.contains("Unknown service")
                || body.contains("does not exist") =>
        {
            ErrorKind::Missing
        }
        // Overloaded or failing servers, rate limits: these heal.
        ConsulError::Status { status, .. } if *status >= 500 || *status == 429 => ErrorKind::Unavailable,
        // 400, 403, 404 (an unknown path): nothing changes until a person acts.
        _ => ErrorKind::Rejected,
    };
    RegistryError::new(kind, e.to_string())
}

/// The files of a TLS configuration.
fn tls_files(tls: &TlsConfig) -> Vec<PathBuf> {
    [&tls.ca_file, &tls.cert_file, &tls.key_file].into_iter().flatten().cloned().collect()
}

impl View for ConsulView {
    fn credential_files(&self) -> Vec<PathBuf> {
        self.credentials.clone()
    }

    fn keeps_critical(&self) -> bool {
        true
    }

    fn fingerprint(&self, spec: &ServiceSpec) -> String {
        let weights = spec.weights.map(|w| (w.passing, w.warning));
        fingerprint_of(&spec.name, &spec.address, spec.port, &spec.tags, &self.meta(spec), Some(&Self::notes(spec)), weights)
    }

    /// Turning critical adds the health check with no output (Consul 1.8
    /// takes none at check registration); the reason is a second write,
    /// queued behind the status writes waiting, so that a flip of many
    /// services reaches the catalog at the pace of one write each.
    fn written(&self, was: Option<Status>, to: &Health) -> Health {
        super::status_then_reason(was, to)
    }
}

impl Heartbeat for ConsulLane {
    async fn beat(&mut self) -> Result<()> {
        self.session.refresh()?;
        // The output changes with every beat: a starting agent with the same
        // identity sees it move and refuses (see `identity`). Consul's agent
        // syncs output-only changes to its servers rarely, so this costs no
        // Raft writes.
        self.beats += 1;
        let output = format!("tether is alive (run {}, beat {})", self.run, self.beats);
        self.session.client.update_check(&self.check_id, "passing", &output).await.map_err(err)
    }
}

/// Writes per batch: the agent serialises writes, so a batch only saves
/// round trips between the reconciler and its writer.
const MAX_BATCH: usize = 16;
type WriteFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<(), ConsulError>> + Send + 'a>>;

/// Writes in flight at once within a batch.
const IN_FLIGHT: usize = 4;

impl Registry for Consul {
    type View = ConsulView;
    type Lane = ConsulLane;

    fn view(&self) -> ConsulView {
        self.view.clone()
    }

    fn lane(&self) -> Result<ConsulLane> {
        let mut session = Session::new(&self.session.address, self.session.tls.clone(), self.session.token_file.clone())
            .map_err(|e| RegistryError::new(ErrorKind::Rejected, e))?;
        session.refresh()?;
        Ok(ConsulLane { session, check_id: liveness_check_id(self.owner()), run: self.run.clone(), beats: 0 })
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    async fn sync_agent(&mut self, agent: &AgentInfo) -> Result<Vec<RemoteEntry>> {
        self.session.refresh()?;
        let id = agent_service_id(self.owner());
        let check_id = liveness_check_id(self.owner());
        let meta = self.agent_meta(agent);
        let (services, checks) = self.session.read().await?;
        if !self.version_read {
            self.version_read = true;
            match self.session.client.version().await {
                Ok(v) if alias_leak(&v) => tracing::warn!(
                    consul = %self.session.address,
                    version = %v,
                    "this Consul agent never stops the alias check of a deregistered service (hashicorp/consul#14935): \
                     each service tether removes, or Consul reaps, keeps costing the agent CPU once a minute until it \
                     restarts; upgrade it to 1.11.11, 1.12.6, 1.13.3, 1.14.0 or later, or restart it after many removals"
                ),
                Ok(v) => tracing::debug!(version = %v, "Consul agent version"),
                Err(e) => tracing::debug!(error = %e, "could not read the Consul agent's version"),
            }
        }
        let client = &self.session.client;
        let present = services.get(&id).is_some_and(|s| s.meta.as_ref() == Some(&meta)) && checks.contains_key(&check_id);
        if !present {
            let reg = ServiceRegistration {
                id: id.clone(),
                name: AGENT_SERVICE_NAME.into(),
                address: String::new(),
                port: 0,
                tags: vec![],
                meta,
                weights: None,
                checks: vec![CheckDefinition {
                    check_id: check_id.clone(),
                    name: "tether agent liveness".into(),
                    notes: Some(format!(
                        "heartbeated by tether every {}; every service tether registers aliases it",
                        go(agent.heartbeat_every())
                    )),
                    ttl: Some(go(agent.ttl)),
                    status: Some("passing".into()),
                    deregister_critical_service_after: Some(go(agent.deregister_after)),
                    ..Default::default()
                }],
            };
            client.register_service(&reg).await.map_err(err)?;
            tracing::info!(service = %id, ttl = %go(agent.ttl), "registered tether's own liveness service");
        }
        Ok(self.owned_entries(services, &checks))
    }

    async fn list(&mut self) -> Result<Vec<RemoteEntry>> {
        let (services, checks) = self.session.read().await?;
        Ok(self.owned_entries(services, &checks))
    }

    async fn apply(&mut self, writes: &[Write]) -> Vec<Outcome> {
        // A few writes in flight at once: the agent serialises them, so this
        // gains nothing on loopback, but it hides the round trip to an agent
        // that is far or slow (measured: the slow-Consul scale test). Each
        // write is its own call, so a refused one concerns only itself; a
        // failure that can heal stops the chunks not yet sent.
        // A rotated token (or TLS files) is used from the next batch on: a
        // stat per batch.
        if let Err(e) = self.session.refresh() {
            let mut outcomes = vec![Outcome::NotTried; writes.len()];
            outcomes.fill(Outcome::Failed(e));
            return outcomes;
        }
        let this = &*self;
        let mut outcomes = Vec::with_capacity(writes.len());
        for chunk in writes.chunks(IN_FLIGHT) {
            let inflight: Vec<WriteFuture<'_>> = chunk.iter().map(|w| Box::pin(this.write(w)) as WriteFuture<'_>).collect();
            let mut stop = false;
            for r in futures::future::join_all(inflight).await {
                outcomes.push(match r {
                    Ok(()) => Outcome::Done,
                    Err(e) => {
                        let e = err(e);
                        stop |= e.kind.class() == ErrorClass::Transient;
                        Outcome::Failed(e)
                    }
                });
            }
            if stop {
                break;
            }
        }
        outcomes.resize(writes.len(), Outcome::NotTried);
        outcomes
    }

    async fn claim(&mut self) -> Result<Option<String>> {
        self.session.refresh()?;
        let check_id = liveness_check_id(self.owner());
        let (services, checks) = self.session.read().await?;
        let client = &self.session.client;
        let Some(first) = checks.get(&check_id) else { return Ok(None) };
        if first.status != "passing" || first.output.starts_with(STOPPED) {
            return Ok(None);
        }
        // The previous run's heartbeat period, from its registration.
        let period = services
            .get(&agent_service_id(self.owner()))
            .and_then(|s| s.meta.as_ref()?.get("tether-ttl").cloned())
            .and_then(|t| crate::config::duration::parse(&t).ok())
            .map_or(Duration::from_secs(5), |ttl| ttl / 3);
        let window = crate::identity::watch_window(period);
        tracing::info!(check = %check_id, window = ?window, "tether's liveness check is still passing (an earlier run that crashed, or another agent with this identity): watching it before starting");
        let until = tokio::time::Instant::now() + window;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(crate::identity::SAMPLE_EVERY).await;
            let checks = client.checks().await.map_err(err)?;
            match checks.get(&check_id) {
                Some(c) if c.status == "passing" && c.output != first.output && !c.output.starts_with(STOPPED) => {
                    return Ok(Some(format!("its liveness check {check_id} is being heartbeated: {:?}", c.output)));
                }
                Some(c) if c.status == "passing" => {}
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    async fn shutdown(&mut self, deregister: bool) -> Result<()> {
        if deregister {
            self.session.client.deregister_service(&agent_service_id(self.owner())).await.map_err(err)?;
        } else {
            // Services stay until the liveness TTL runs out; a restart adopts them at once.
            let output = format!("{STOPPED} (run {}); services left to expire by TTL", self.run);
            self.session.client.update_check(&liveness_check_id(self.owner()), "passing", &output).await.map_err(err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
