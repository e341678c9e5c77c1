//! Wires the pipeline: config scanner → reconciler (with its probes) → registry,
//! with telemetry (metrics, status, HTTP listener, systemd) beside it.
//!
//! Shutdown flows one way: SIGTERM/SIGINT → the root token → the scanner and
//! the reconciler, which stops its probes and (when configured) deregisters.
//! SIGHUP, file-system events and a slow periodic resync all trigger the same
//! full rescan of the services directory.

use crate::config::file::FileStamp;
use crate::config::scan::{Loader, ServiceSet};
use crate::config::watch::{DirWatcher, DEBOUNCE};
use crate::config::{agent, AgentConfig, BackendConfig};
use crate::reconcile::Reconciler;
use crate::registry::consul::Consul;
use crate::registry::etcd::Etcd;
use crate::registry::{ErrorClass, Registry};
use crate::telemetry::{http, systemd, Telemetry};
use crate::{control, identity};
use anyhow::Context;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Safety-net rescan of the services directory, whatever the watcher says.
pub const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// Run the agent until SIGTERM/SIGINT (or `shutdown` is cancelled).
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let reload = Arc::new(Notify::new());
    let sighup = Arc::new(AtomicBool::new(false));
    spawn_signals(shutdown.clone(), reload.clone(), sighup.clone())?;
    tracing::info!(config = %config.path.display(), services_dir = %config.services_dir.display(), owner = %config.owner(), backend = config.backend.kind().as_str(), "tether starting");
    // Never two owners of one identity: on this host, a lock; see `identity`.
    let lock = identity::lock(&config)?;
    let endpoint = config.registry_endpoint();
    let telemetry = Arc::new(Telemetry::new(&config.node, config.backend.kind().as_str(), &endpoint));
    telemetry.with_status(|s| s.instance = config.instance.clone());
    if let Some(addr) = config.listen {
        http::serve(addr, telemetry.clone(), shutdown.clone())
            .await
            .with_context(|| format!("{}: cannot listen on {addr} (listen)", config.path.display()))?;
    }
    let drains = lock.path.with_extension("drained");
    // Drains an older tether kept under its name for the file are read too.
    control::DrainFile::adopt_legacy(&lock.legacy_path.with_extension("drained"), &drains);
    let pipeline = Pipeline { config: &config, reload, sighup, shutdown, telemetry, drains };
    match &config.backend {
        BackendConfig::Consul(c) => {
            let token_file = c.token_file.clone().or_else(|| agent::credential_path("consul.token"));
            let mut consul = Consul::new(&c.address, c.tls.clone(), &config.owner())
                .map_err(|e| anyhow::anyhow!("{}: [consul] {e}", config.path.display()))?;
            if let Some(file) = token_file {
                consul = consul.with_token_file(file)?;
            }
            pipeline.run(consul).await
        }
        BackendConfig::Etcd(e) => pipeline.run(Etcd::new(e.clone(), &config.owner())).await,
    }
}

struct Pipeline<'a> {
    config: &'a AgentConfig,
    reload: Arc<Notify>,
    sighup: Arc<AtomicBool>,
    shutdown: CancellationToken,
    telemetry: Arc<Telemetry>,
    /// Where the identity's drains are kept (beside its lock).
    drains: PathBuf,
}

impl Pipeline<'_> {
    async fn run<R: Registry>(self, mut registry: R) -> anyhow::Result<()> {
        let config = self.config;
        // Across hosts, the registry: another live agent with this identity
        // refuses this one before it writes anything.
        match registry.claim().await {
            Ok(None) => {}
            Ok(Some(why)) => return Err(identity::refusal(config, &why)),
            Err(e) => {
                let why = match e.kind.class() {
                    ErrorClass::Transient => "it is unreachable",
                    ErrorClass::Permanent => "it refused the read: the token may not read this agent's services and checks",
                };
                tracing::warn!(error = %e, "cannot look for another agent with this identity in the registry ({why}); starting anyway")
            }
        }
        let (control_tx, control_rx) = mpsc::channel(16);
        control::serve(config.control_socket(), control_tx, self.shutdown.clone()).await.map_err(|e| {
            anyhow::anyhow!("{}: control socket: {e}; set runtime_dir to a directory tether may write", config.path.display())
        })?;
        let reconciler = Reconciler::new(registry, &config.node, config.deregister_on_shutdown, self.telemetry.clone())
            .map_err(|e| anyhow::anyhow!("{}: cannot set up the registry connection: {e}", config.path.display()))?
            .with_control(control_rx, control::DrainFile::load(self.drains))
            .with_anti_entropy_every(config.anti_entropy_every);
        let (desired_tx, desired_rx) = mpsc::channel(4);
        let reconcile_token = self.shutdown.child_token();
        let reconcile = tokio::spawn(reconciler.run(desired_rx, reconcile_token.clone()));

        let mut watcher = match DirWatcher::new(&config.services_dir, self.reload.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %config.services_dir.display(), error = %e, "cannot watch the services directory; relying on rescans every {:?} and SIGHUP", RESYNC_EVERY);
                None
            }
        };
        let mut loader = Loader::new(config.services_dir.clone(), config.defaults());
        let mut scanner = Scanner { last: None, errors: BTreeSet::new(), telemetry: self.telemetry.clone() };
        // The agent file is read once: a reload that finds it changed says so.
        let (agent_file, mut agent_file_warned) = (FileStamp::of(&config.path), false);
        loop {
            let reloading = self.sighup.swap(false, Ordering::Relaxed);
            if reloading {
                systemd::reloading();
                let changed = FileStamp::of(&config.path) != agent_file;
                if changed && !agent_file_warned {
                    tracing::warn!(file = %config.path.display(), "the agent file changed since tether started; a reload reads only the services directory, so its changes take effect at the next restart (systemctl restart)");
                }
                agent_file_warned = changed;
            }
            if let Some(set) = scanner.scan(&mut loader) {
                if desired_tx.send(set).await.is_err() {
                    break;
                }
            }
            if reloading && self.telemetry.is_ready() {
                systemd::ready();
            }
            if let Some(w) = watcher.as_mut() {
                w.refresh();
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.reload.notified() => {}
                _ = tokio::time::sleep_until(crate::timer::after(RESYNC_EVERY)) => {}
            }
            // Let a burst of events (an editor's save, a ConfigMap swap) settle.
            tokio::time::sleep(DEBOUNCE).await;
        }
        reconcile_token.cancel();
        reconcile.await.context("reconciler task")?;
        tracing::info!("tether stopped");
        Ok(())
    }
}

/// Turns scans into desired sets, logging each configuration error once.
struct Scanner {
    last: Option<ServiceSet>,
    errors: BTreeSet<String>,
    telemetry: Arc<Telemetry>,
}

impl Scanner {
    /// Scan; return the desired set if it differs from the last one sent.
    fn scan(&mut self, loader: &mut Loader) -> Option<ServiceSet> {
        let scan = loader.scan();
        let errors: BTreeSet<String> = scan.errors.iter().map(|e| e.to_string()).collect();
        for e in errors.difference(&self.errors) {
            tracing::error!("{e} (the last good version of this file, if any, keeps running)");
        }
        for e in self.errors.difference(&errors) {
            tracing::info!("resolved: {e}");
        }
        // Files failing to load (a file may have several errors).
        let files: BTreeSet<&std::path::Path> = scan.errors.iter().map(|e| e.file.as_path()).collect();
        self.telemetry.metrics.config_errors.set(files.len() as i64);
        self.telemetry.with_status(|s| s.config_errors = errors.iter().cloned().collect());
        self.errors = errors;
        let desired = ServiceSet { services: scan.services, complete: !scan.incomplete };
        if self.last.as_ref() == Some(&desired) {
            return None;
        }
        self.telemetry.metrics.config_reloads.inc();
        self.last = Some(desired.clone());
        Some(desired)
    }
}

fn spawn_signals(shutdown: CancellationToken, reload: Arc<Notify>, sighup: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading services");
                    sighup.store(true, Ordering::Relaxed);
                    reload.notify_one();
                }
            }
        }
        shutdown.cancel();
    });
    Ok(())
}
