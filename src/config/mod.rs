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

/// Every key of both files, table by table, from the schemas the parser
/// checks against: for `tether validate --help` and its man page.
pub fn keys_help() -> String {
    let list = |title: &str, schema: &error::suggest::Schema| {
        let mut out = format!("{title}\n");
        for (table, keys) in schema {
            // Tables are listed under their own heading, not among the keys.
            let keys: Vec<&str> = keys.iter().copied().filter(|k| !schema.iter().any(|(t, _)| t == k)).collect();
            let heading = match *table {
                "" => "top level".to_string(),
                "check" => "[check] (or [[check]], once per check)".to_string(),
                t => format!("[{t}]"),
            };
            out.push_str(&format!("  {heading}: {}\n", keys.join(", ")));
        }
        out
    };
    format!(
        "{}\n{}  [check.metadata]: header = \"value\"; [check.metadata_files]: header = \"file\"\n\nREADME.md's configuration reference \
         (/usr/share/doc/tether/README.md) says what each key means.",
        list("Agent file (tether.toml) keys:", agent::SCHEMA),
        list("Service file (services_dir/*.toml) keys:", service::SCHEMA),
    )
}
pub use service::{CheckMode, CheckSpec, MetadataSource, NotServing, ServiceSpec};
