//! Configuration: the agent's own file and the per-service drop-in files.
//!
//! Files are read into a span-keeping TOML tree (`error/doc.rs`) and validated
//! into [`AgentConfig`] and [`ServiceSpec`] with every problem collected
//! (unknown keys with a did-you-mean, wrong types, bad values), each with its
//! `file:line:col`; `tether validate` and `tether run` share this one parser. [`scan`] turns a directory into the desired set of services,
//! keeping the last good version of a file that stops parsing; [`watch`] turns
//! file-system events into "rescan now" signals.

pub mod agent;
pub mod damping;
pub mod duration;
pub mod error;
pub mod file;
pub mod scan;
pub mod service;
pub mod tls;
pub mod watch;

pub use agent::{AgentConfig, BackendConfig, BackendKind, Defaults, EtcdConfig, Owner};
pub use error::ConfigError;
pub use service::{CheckMode, CheckSpec, MetadataSource, NotServing, ServiceSpec};
