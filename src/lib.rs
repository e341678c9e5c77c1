//! tether: a sidecar agent that keeps Consul or etcd truthful about gRPC services.
//!
//! # Layout (the data flow)
//!
//! ```text
//! config/     files → desired ServiceSpecs   (agent.rs, service.rs, scan.rs, watch.rs)
//! health/     grpc.health.v1 probes → health changes   (rpc.rs, conn.rs, probe.rs, threshold.rs, supervisor.rs)
//! reconcile/  desired specs + health → registry writes: core/ decides (no I/O), mod.rs moves
//!             messages, writer.rs is the one writer, heartbeat.rs the liveness lane
//! registry/   the Registry trait and its backends (consul/, etcd/)
//! app.rs      wires the pipeline, signals and shutdown
//! cli/        run | validate | check | drain | undrain | status, one file each
//! ```
//!
//! Health code never talks to a registry; backends never decide health; only
//! the reconciler writes to the registry. See ARCHITECTURE.md.

pub(crate) mod app;
pub(crate) mod backoff;
pub mod cli;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod error;
pub(crate) mod health;
pub(crate) mod identity;
pub(crate) mod reconcile;
pub(crate) mod registry;
pub(crate) mod telemetry;
pub(crate) mod timer;
