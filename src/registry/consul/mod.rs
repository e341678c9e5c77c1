//! The Consul backend: services on the local agent, health as TTL checks.
//!
//! Each service carries two checks:
//! - `tether:<id>`: its gRPC health, a TTL check with a long TTL
//!   ([`HEALTH_TTL`]) whose status tether sets on every change and refreshes
//!   rarely;
//! - `tether-alive:<id>`: an alias of tether's own service `tether-<node>`,
//!   whose single TTL check (`tether-liveness:<node>`) tether heartbeats at
//!   ttl/3. If tether dies, that one check expires and every alias turns
//!   critical, by Consul's own doing; DeregisterCriticalServiceAfter on both
//!   checks then removes the services. One heartbeat per agent instead of one
//!   per service (see ARCHITECTURE.md for the numbers).

pub mod client;

use super::{AgentInfo, ErrorKind, Registry, RegistryError, RemoteEntry, Result};
use crate::config::agent::read_secret;
use crate::config::duration::go;
use crate::config::tls::TlsConfig;
use crate::config::ServiceSpec;
use crate::health::{Health, Status};
use client::{AgentCheck, AgentService, CheckDefinition, ConsulClient, ConsulError, ServiceRegistration};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// TTL of each service's health check. tether re-sends it after a third of this.
/// It only needs to outlive tether's refreshes: tether dying is caught by the
/// alias of its liveness check, not by this TTL.
pub const HEALTH_TTL: Duration = Duration::from_secs(24 * 3600);
pub const AGENT_SERVICE_NAME: &str = "tether";
pub const META_MANAGED_BY: &str = "managed-by";
pub const META_NODE: &str = "tether-node";

pub fn health_check_id(id: &str) -> String {
    format!("tether:{id}")
}
pub fn alias_check_id(id: &str) -> String {
    format!("tether-alive:{id}")
}
pub fn agent_service_id(node: &str) -> String {
    format!("tether-{node}")
}
pub fn liveness_check_id(node: &str) -> String {
    format!("tether-liveness:{node}")
}

pub struct Consul {
    client: ConsulClient,
    node: String,
    agent: Option<AgentInfo>,
    /// Where the ACL token comes from; re-read when the file changes.
    token_file: Option<PathBuf>,
    token_stamp: Option<(SystemTime, u64)>,
    /// Where the client came from, to rebuild it when TLS files rotate.
    address: String,
    tls: TlsConfig,
    tls_stamp: Vec<Option<SystemTime>>,
}

impl Consul {
    pub fn new(address: &str, tls: TlsConfig, node: &str) -> std::result::Result<Self, String> {
        let client = ConsulClient::new(address, None, &tls)?;
        let tls_stamp = tls.stamp();
        Ok(Consul {
            client,
            node: node.to_string(),
            agent: None,
            token_file: None,
            token_stamp: None,
            address: address.to_string(),
            tls,
            tls_stamp,
        })
    }

    /// Rebuild the HTTP client when the TLS files changed (rotation).
    fn refresh_tls(&mut self) -> Result<()> {
        let stamp = self.tls.stamp();
        if stamp == self.tls_stamp {
            return Ok(());
        }
        let client =
            ConsulClient::new(&self.address, self.client.token(), &self.tls).map_err(|e| RegistryError::new(ErrorKind::Rejected, e))?;
        tracing::info!("Consul TLS files changed; reconnecting with them");
        self.client = client;
        self.tls_stamp = stamp;
        Ok(())
    }

    /// Read the ACL token from `path` now and again whenever the file changes
    /// (checked at every heartbeat), so a rotated token needs no restart.
    pub fn with_token_file(mut self, path: PathBuf) -> Result<Self> {
        self.token_file = Some(path);
        self.refresh_token()?;
        Ok(self)
    }

    fn refresh_token(&mut self) -> Result<()> {
        self.refresh_tls()?;
        let Some(path) = &self.token_file else { return Ok(()) };
        let stamp = std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
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

    fn owned(&self, meta: &Option<BTreeMap<String, String>>) -> bool {
        meta.as_ref().is_some_and(|m| m.get(META_MANAGED_BY).map(String::as_str) == Some("tether") && m.get(META_NODE) == Some(&self.node))
    }

    fn meta(&self, spec: &ServiceSpec) -> BTreeMap<String, String> {
        let mut meta = spec.meta.clone();
        meta.insert(META_MANAGED_BY.into(), "tether".into());
        meta.insert(META_NODE.into(), self.node.clone());
        meta
    }

    /// Human-readable notes on the health check; also part of the fingerprint,
    /// so that a change of check settings re-registers.
    fn notes(spec: &ServiceSpec) -> String {
        format!(
            "grpc.health.v1 {} of {} service {:?} by tether; deregistered after critical for {}",
            spec.check.mode.as_str(),
            spec.check.target,
            spec.check.service,
            go(spec.deregister_critical_after)
        )
    }

    fn agent_meta(&self, agent: &AgentInfo) -> BTreeMap<String, String> {
        BTreeMap::from([
            (META_MANAGED_BY.to_string(), "tether".to_string()),
            (META_NODE.to_string(), self.node.clone()),
            ("tether-ttl".to_string(), go(agent.ttl)),
            ("tether-deregister-after".to_string(), go(agent.deregister_after)),
            ("tether-version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ])
    }

    fn registration(&self, spec: &ServiceSpec, health: &Health) -> ServiceRegistration {
        let dereg = Some(go(spec.deregister_critical_after));
        ServiceRegistration {
            id: spec.id.clone(),
            name: spec.name.clone(),
            address: spec.address.clone(),
            port: spec.port,
            tags: spec.tags.clone(),
            meta: self.meta(spec),
            checks: vec![
                CheckDefinition {
                    check_id: health_check_id(&spec.id),
                    name: "gRPC health (tether)".into(),
                    notes: Some(Self::notes(spec)),
                    ttl: Some(go(HEALTH_TTL)),
                    status: Some(health.status.as_str().into()),
                    deregister_critical_service_after: dereg.clone(),
                    ..Default::default()
                },
                CheckDefinition {
                    check_id: alias_check_id(&spec.id),
                    name: "tether agent alive".into(),
                    alias_service: Some(agent_service_id(&self.node)),
                    deregister_critical_service_after: dereg,
                    ..Default::default()
                },
            ],
        }
    }
}

/// The fields tether compares, from either side.
fn fingerprint_of(
    name: &str,
    address: &str,
    port: u16,
    tags: &[String],
    meta: &BTreeMap<String, String>,
    notes: Option<&str>,
    alias: bool,
) -> String {
    serde_json::json!({"name": name, "address": address, "port": port, "tags": tags, "meta": meta, "notes": notes, "alias": alias})
        .to_string()
}

fn health_of(check: &AgentCheck) -> Health {
    let status = if check.status == "passing" { Status::Passing } else { Status::Critical };
    Health { status, output: check.output.clone() }
}

fn err(e: ConsulError) -> RegistryError {
    let kind = match &e {
        ConsulError::Transport { .. } => ErrorKind::Unavailable,
        ConsulError::Status { status, body, .. }
            if *status == 404
                || body.contains("does not have associated TTL")
                || body.contains("Unknown check")
                || body.contains("Unknown service") =>
        {
            ErrorKind::Missing
        }
        ConsulError::Status { status, .. } if *status >= 500 => ErrorKind::Unavailable,
        _ => ErrorKind::Rejected,
    };
    RegistryError::new(kind, e.to_string())
}

impl Registry for Consul {
    fn keeps_critical(&self) -> bool {
        true
    }

    fn fingerprint(&self, spec: &ServiceSpec) -> String {
        fingerprint_of(&spec.name, &spec.address, spec.port, &spec.tags, &self.meta(spec), Some(&Self::notes(spec)), true)
    }

    fn refresh_after(&self) -> Option<Duration> {
        Some(HEALTH_TTL / 3)
    }

    async fn ensure_agent(&mut self, agent: &AgentInfo) -> Result<()> {
        self.refresh_token()?;
        let id = agent_service_id(&self.node);
        let check_id = liveness_check_id(&self.node);
        let meta = self.agent_meta(agent);
        let (services, checks) = tokio::try_join!(self.client.services(), self.client.checks()).map_err(err)?;
        let present = services.get(&id).is_some_and(|s| s.meta.as_ref() == Some(&meta)) && checks.contains_key(&check_id);
        if !present {
            let reg = ServiceRegistration {
                id: id.clone(),
                name: AGENT_SERVICE_NAME.into(),
                address: String::new(),
                port: 0,
                tags: vec![],
                meta,
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
            self.client.register_service(&reg).await.map_err(err)?;
            tracing::info!(service = %id, ttl = %go(agent.ttl), "registered tether's own liveness service");
        }
        self.agent = Some(agent.clone());
        self.heartbeat().await
    }

    async fn heartbeat(&mut self) -> Result<()> {
        self.refresh_token()?;
        self.client.update_check(&liveness_check_id(&self.node), "passing", "tether is alive").await.map_err(err)
    }

    async fn list(&mut self) -> Result<Vec<RemoteEntry>> {
        let (services, checks): (HashMap<String, AgentService>, HashMap<String, AgentCheck>) =
            tokio::try_join!(self.client.services(), self.client.checks()).map_err(err)?;
        let agent_id = agent_service_id(&self.node);
        Ok(services
            .into_values()
            .filter(|s| s.id != agent_id && self.owned(&s.meta))
            .map(|s| {
                let health = checks.get(&health_check_id(&s.id));
                let alias = checks.contains_key(&alias_check_id(&s.id));
                let fingerprint = fingerprint_of(
                    &s.service,
                    &s.address,
                    s.port,
                    s.tags.as_deref().unwrap_or(&[]),
                    s.meta.as_ref().unwrap_or(&BTreeMap::new()),
                    health.map(|c| c.notes.as_str()),
                    alias,
                );
                RemoteEntry { id: s.id, name: s.service, fingerprint, health: health.map(health_of) }
            })
            .collect())
    }

    async fn register(&mut self, spec: &ServiceSpec, health: &Health) -> Result<()> {
        self.client.register_service(&self.registration(spec, health)).await.map_err(err)?;
        // Registration sets the status; the output needs an update of its own.
        self.set_health(spec, health).await
    }

    async fn set_health(&mut self, spec: &ServiceSpec, health: &Health) -> Result<()> {
        self.client.update_check(&health_check_id(&spec.id), health.status.as_str(), &health.output).await.map_err(err)
    }

    async fn deregister(&mut self, id: &str, _name: &str) -> Result<()> {
        self.client.deregister_service(id).await.map_err(err)
    }

    async fn shutdown(&mut self, deregister: bool) -> Result<()> {
        if deregister {
            self.client.deregister_service(&agent_service_id(&self.node)).await.map_err(err)?;
        }
        Ok(())
    }
}
