//! The command line: `run`, `validate`, `status`, `check`, `drain`,
//! `undrain`. The man pages and shell completions are generated from this very
//! definition ([`command`]) by `src/bin/tether-generate.rs`, a separate binary,
//! so the daemon carries no generator code.

mod check;
mod drain;
mod run;
mod status;
mod validate;

use crate::config::agent;
use crate::config::tls::TlsConfig;
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The version and the git commit it was built from (see build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TETHER_GIT_COMMIT"), ")");

#[derive(Parser, Debug)]
#[command(
    name = "tether",
    version = VERSION,
    about = "Keeps Consul or etcd truthful about gRPC services (grpc.health.v1)",
    long_about = "Keeps Consul or etcd truthful about gRPC services (grpc.health.v1).\n\n\
        tether health-checks every service described by a *.toml file in services_dir \
        (default /etc/tether/services.d) and registers it in Consul or etcd, passing only while it \
        is SERVING. The agent configuration is /etc/tether/tether.toml. Under systemd it runs as \
        tether.service, or as tether@NAME.service with /etc/tether/NAME/tether.toml."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (the daemon).
    Run {
        #[arg(long, default_value = agent::DEFAULT_PATH)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = run::LogFormat::Text)]
        log_format: run::LogFormat,
        /// This agent's name among several on one host (one per pod); wins
        /// over `instance` in the config. Ownership becomes node + instance.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Take services out of the registry's healthy set (Consul: maintenance
    /// mode; etcd: key deleted) and keep them out, whatever their health,
    /// until `undrain`. Talks to the running agent over its control socket.
    Drain {
        #[command(flatten)]
        target: drain::DrainTarget,
    },
    /// Put drained services back (each then shows its real health).
    Undrain {
        #[command(flatten)]
        target: drain::DrainTarget,
    },
    /// Check the agent config and service files offline; exit 1 on any error.
    Validate {
        #[arg(long, default_value = agent::DEFAULT_PATH)]
        config: PathBuf,
        /// Check only the agent config, not the service files (what the
        /// systemd unit runs before start: one bad service file must not keep
        /// the agent, and every other service, from starting).
        #[arg(long, conflicts_with = "paths")]
        agent_only: bool,
        /// Service files or directories to check instead of the configured services_dir.
        paths: Vec<PathBuf>,
    },
    /// Show what the running agent is doing (reads its /v1/status).
    Status {
        /// The agent's config (default /etc/tether/tether.toml, or
        /// /etc/tether/INSTANCE/tether.toml with --instance).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The agent's instance (as given to `run --instance`).
        #[arg(long)]
        instance: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Probe one gRPC server once. Exit codes as grpc_health_probe: 0 SERVING,
    /// 1 bad arguments, 2 connection failure, 3 RPC failure, 4 not SERVING.
    Check {
        /// host:port of the gRPC server.
        addr: String,
        /// HealthCheckRequest.service ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
        #[arg(long, default_value = "2s", value_parser = crate::config::duration::parse)]
        timeout: Duration,
        /// Use TLS (verifying the server; never falls back to plaintext).
        #[arg(long)]
        tls: bool,
        /// CA bundle to verify the server with (implies --tls).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Client certificate and key for mTLS (imply --tls).
        #[arg(long, requires = "key_file")]
        cert_file: Option<PathBuf>,
        #[arg(long, requires = "cert_file")]
        key_file: Option<PathBuf>,
        /// Name to verify the server's certificate against.
        #[arg(long)]
        server_name: Option<String>,
    },
}

/// Parse arguments and run; the process's exit code.
pub fn main() -> ExitCode {
    let parsed = command().try_get_matches().and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(1) } else { ExitCode::SUCCESS };
        }
    };
    // One thread. tether's work is waiting on sockets and timers; a second
    // worker only adds cross-thread wake-ups (futex, IPI) to every event, and
    // at 1,000 services the registry, not tether, is the bottleneck
    // (ARCHITECTURE.md, "One thread"). Nothing in tether blocks the thread:
    // registry and health I/O is async, DNS goes to tokio's blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    crate::timer::runtime_built();
    match cli.command {
        Command::Run { config, log_format, instance } => run::run(&config, log_format, instance.as_deref(), &runtime),
        Command::Validate { config, paths, agent_only } => validate::validate(&config, &paths, agent_only),
        Command::Status { config, instance, json } => {
            let path = agent_config_path(config, instance.as_deref());
            runtime.block_on(status::status(&path, instance.as_deref(), json))
        }
        Command::Check { addr, service, timeout, tls, ca_file, cert_file, key_file, server_name } => {
            let cfg = TlsConfig { ca_file, cert_file, key_file, server_name };
            let tls = (tls || cfg.is_set()).then_some(cfg);
            runtime.block_on(check::check(&addr, &service, timeout, tls.as_ref()))
        }
        Command::Drain { target } => drain::drain(target, true),
        Command::Undrain { target } => drain::drain(target, false),
    }
}

/// The whole command-line definition (for the man pages and completions).
/// The agent config a command talks about: `--config`, else the default
/// for `--instance` (as `tether@INSTANCE.service` runs it), else the default.
fn agent_config_path(config: Option<PathBuf>, instance: Option<&str>) -> PathBuf {
    config.unwrap_or_else(|| match instance {
        Some(i) => std::path::Path::new("/etc/tether").join(i).join("tether.toml"),
        None => PathBuf::from(agent::DEFAULT_PATH),
    })
}

/// Tell the user what went wrong: each line of `e` (one error per line, as
/// configuration errors come) under `error: `, as `tether validate` prints
/// them; the caller exits 1.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    for line in e.to_string().lines() {
        eprintln!("error: {line}");
    }
    ExitCode::from(1)
}

pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("validate", |c| c.after_long_help(crate::config::keys_help()))
}
