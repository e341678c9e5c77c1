//! The command line: `run`, `validate`, `status`, `check`, `drain`,
//! `undrain`. The man pages and shell completions are generated from this very
//! definition ([`command`]) by `src/bin/tether-generate.rs`, a separate binary,
//! so the daemon carries no generator code.

use crate::config::tls::TlsConfig;
use crate::config::{agent, scan, Defaults};
use crate::health::rpc::{code_name, describe, observe_status};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
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
        target: DrainTarget,
    },
    /// Put drained services back (each then shows its real health).
    Undrain {
        #[command(flatten)]
        target: DrainTarget,
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
        #[arg(long, default_value = agent::DEFAULT_PATH)]
        config: PathBuf,
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
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
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

#[derive(clap::Args, Debug)]
struct DrainTarget {
    /// Service ids (as in `tether status`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    ids: Vec<String>,
    /// Every service the agent runs now.
    #[arg(long)]
    all: bool,
    /// Return only once the registry shows it (exit 1 after --timeout).
    #[arg(long)]
    wait: bool,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// The agent's config (default /etc/tether/tether.toml, or
    /// /etc/tether/INSTANCE/tether.toml with --instance).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The agent's instance (as given to `run --instance`).
    #[arg(long)]
    instance: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::duration::parse(s)
}

/// Parse arguments and run; the process's exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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
        Command::Run { config, log_format, instance } => {
            init_logging(log_format);
            let config = match agent::load_as(&config, instance.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("tether: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(crate::app::run(config, CancellationToken::new())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("tether: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Validate { config, paths, agent_only } => validate(&config, &paths, agent_only),
        Command::Status { config, json } => runtime.block_on(status(&config, json)),
        Command::Check { addr, service, timeout, tls, ca_file, cert_file, key_file, server_name } => {
            let cfg = TlsConfig { ca_file, cert_file, key_file, server_name };
            let tls = (tls || cfg.is_set()).then_some(cfg);
            runtime.block_on(check(&addr, &service, timeout, tls.as_ref()))
        }
        Command::Drain { target } => drain(target, true),
        Command::Undrain { target } => drain(target, false),
    }
}

/// `tether drain` / `tether undrain`: ask the running agent, then (with
/// --wait) poll until its registry shows it.
fn drain(t: DrainTarget, on: bool) -> ExitCode {
    use crate::control::{request, Request};
    let path = t.config.clone().unwrap_or_else(|| match &t.instance {
        Some(i) => std::path::Path::new("/etc/tether").join(i).join("tether.toml"),
        None => PathBuf::from(agent::DEFAULT_PATH),
    });
    let config = match agent::load_as(&path, t.instance.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(1);
        }
    };
    let socket = config.control_socket();
    let ids = t.ids.clone();
    let req = if on { Request::Drain { ids: ids.clone(), all: t.all } } else { Request::Undrain { ids: ids.clone(), all: t.all } };
    let verb = if on { "drained" } else { "undrained" };
    let answer = match request(&socket, &req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(e) = answer.error {
        eprintln!("tether: {e}");
        return ExitCode::from(1);
    }
    let ids: Vec<String> = answer.services.iter().map(|s| s.id.clone()).collect();
    if !t.wait {
        for s in &answer.services {
            println!("{verb} {}{}", s.id, if s.applied { "" } else { " (registry update queued)" });
        }
        return ExitCode::SUCCESS;
    }
    let deadline = std::time::Instant::now() + t.timeout;
    loop {
        match request(&socket, &Request::State { ids: ids.clone(), all: false }) {
            Ok(r) if r.error.is_none() && r.services.iter().all(|s| s.applied && s.drained == on) => {
                for s in &r.services {
                    println!("{verb} {} (the registry shows it)", s.id);
                }
                return ExitCode::SUCCESS;
            }
            Ok(r) if r.error.is_some() => {
                eprintln!("tether: {}", r.error.unwrap_or_default());
                return ExitCode::from(1);
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("tether: {e}");
                return ExitCode::from(1);
            }
        }
        if std::time::Instant::now() >= deadline {
            eprintln!("tether: the registry does not show it yet after {}; see `tether status`", humantime::format_duration(t.timeout));
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The whole command-line definition (for the man pages and completions).
pub fn command() -> clap::Command {
    Cli::command()
}

/// `RUST_LOG` as a level (`debug`) or a list of `target=level` directives
/// (`info,tether::health=debug,h2=warn`). tracing-subscriber's `Targets`, not
/// `EnvFilter`: no span or field filters, and no regex engine in the binary
/// (about 240 KiB of code, a sidecar's memory).
fn log_filter(value: Option<&str>) -> (tracing_subscriber::filter::Targets, Option<String>) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let default = || Targets::new().with_default(LevelFilter::INFO);
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => (default(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (
                default(),
                Some(format!("RUST_LOG={v:?} ignored ({e}); logging at info. Use a level or target=level directives, e.g. RUST_LOG=info,tether=debug")),
            ),
        },
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, bad) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi);
    // journald stamps every line itself.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().finish().with(filter).init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).finish().with(filter).init(),
        (LogFormat::Text, false) => builder.finish().with(filter).init(),
    }
    if let Some(warning) = bad {
        tracing::warn!("{warning}");
    }
}

fn validate(config: &std::path::Path, paths: &[PathBuf], agent_only: bool) -> ExitCode {
    let mut errors = Vec::new();
    let agent = match agent::load(config) {
        Ok(a) => Some(a),
        Err(e) => {
            // Checking only service files needs no agent config if none is there.
            let missing = !config.exists() && config == std::path::Path::new(agent::DEFAULT_PATH) && !paths.is_empty();
            if !missing {
                errors.push(e.to_string());
            }
            None
        }
    };
    if agent_only {
        return match (agent, errors.first()) {
            (Some(a), None) => {
                println!("ok: agent config {}", a.path.display());
                ExitCode::SUCCESS
            }
            (_, e) => {
                eprintln!("error: {}", e.map(String::as_str).unwrap_or("no agent config"));
                ExitCode::from(1)
            }
        };
    }
    let defaults = agent.as_ref().map(|a| a.defaults()).unwrap_or_else(|| Defaults {
        node: gethostname::gethostname().to_string_lossy().into_owned(),
        address: agent::primary_ip(),
        backend: crate::config::BackendKind::Consul,
    });
    let mut files = Vec::new();
    let dirs: Vec<PathBuf> = if paths.is_empty() { agent.iter().map(|a| a.services_dir.clone()).collect() } else { paths.to_vec() };
    for p in &dirs {
        if p.is_dir() {
            match scan::list_files(p) {
                Ok(f) => files.extend(f),
                Err(e) => errors.push(e.to_string()),
            }
        } else if paths.is_empty() {
            errors.push(
                crate::config::ConfigError::new(p, "services directory does not exist", "create it, or fix services_dir").to_string(),
            );
        } else {
            files.push(p.clone());
        }
    }
    let result = scan::scan_files(&files, &defaults);
    errors.extend(result.errors.iter().map(|e| e.to_string()));
    for e in &errors {
        eprintln!("error: {e}");
    }
    if errors.is_empty() {
        println!(
            "ok: {} service(s) valid{}",
            result.services.len(),
            agent.map(|a| format!(", agent config {}", a.path.display())).unwrap_or_default()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("{} error(s)", errors.len());
        ExitCode::from(1)
    }
}

async fn check(addr: &str, service_name: &str, timeout: Duration, tls: Option<&TlsConfig>) -> ExitCode {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let endpoint = match crate::health::rpc::endpoint(addr, timeout, tls) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}; write the address as host:port");
            return ExitCode::from(1);
        }
    };
    let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            eprintln!("error: failed to connect to {addr}: {}", crate::error::chain(&e));
            return ExitCode::from(2);
        }
        Err(_) => {
            eprintln!("error: timed out connecting to {addr} after {}", humantime::format_duration(timeout));
            return ExitCode::from(2);
        }
    };
    let mut req = tonic::Request::new(HealthCheckRequest { service: service_name.to_string() });
    req.set_timeout(timeout);
    let result = tokio::time::timeout(timeout, HealthClient::new(channel).check(req)).await;
    match result {
        Err(_) => {
            eprintln!("error: health rpc failed: deadline exceeded after {}", humantime::format_duration(timeout));
            ExitCode::from(3)
        }
        Ok(Err(status)) => {
            eprintln!("error: health rpc failed: {} ({})", describe(&status, timeout), code_name(status.code()));
            ExitCode::from(3)
        }
        Ok(Ok(resp)) => {
            let obs = observe_status(resp.into_inner().status);
            println!("status: {}", obs.output);
            if obs.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(4)
            }
        }
    }
}

async fn status(config: &std::path::Path, json: bool) -> ExitCode {
    let cfg = match agent::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let Some(mut addr) = cfg.listen else {
        eprintln!("error: {}: listen is \"\", so the agent serves no status; set listen = \"127.0.0.1:9469\"", config.display());
        return ExitCode::from(1);
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/v1/status");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().expect("http client");
    let body = match client.get(&url).send().await.and_then(|r| r.error_for_status()) {
        Ok(r) => match r.text().await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: reading {url}: {e}");
                return ExitCode::from(1);
            }
        },
        Err(e) => {
            eprintln!(
                "error: no tether agent answers at {url} ({}); is `tether run --config {}` running?",
                crate::error::chain(&e),
                config.display()
            );
            return ExitCode::from(1);
        }
    };
    if json {
        print!("{body}");
        return ExitCode::SUCCESS;
    }
    let st: crate::telemetry::status::Status = match serde_json::from_str(&body) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {url} did not return tether's status: {e}");
            return ExitCode::from(1);
        }
    };
    let b = &st.backend;
    println!(
        "tether {} on node {}{}: {} at {} ({}), {}",
        st.version,
        st.node,
        st.instance.as_deref().map(|i| format!(" (instance {i})")).unwrap_or_default(),
        b.kind,
        b.endpoint,
        if b.connected { "connected" } else { "NOT connected" },
        if st.ready { "ready" } else { "not ready yet" }
    );
    if let Some(hb) = &b.last_heartbeat {
        println!("last heartbeat {hb}");
    }
    if let Some(e) = &b.last_error {
        println!("last registry error: {e}");
    }
    println!();
    println!("{:<28} {:<16} {:<9} {:<10} {:<24} OUTPUT", "ID", "NAME", "HEALTH", "REGISTERED", "SINCE");
    for s in &st.services {
        println!(
            "{:<28} {:<16} {:<9} {:<10} {:<24} {}",
            s.id,
            s.name,
            s.health,
            match (s.registered, s.drained) {
                (_, true) => "drained",
                (true, false) => "yes",
                (false, false) => "no",
            },
            s.since.as_deref().unwrap_or("-"),
            s.output
        );
        if let Some(e) = &s.last_error {
            let class = s.error_class.as_deref().unwrap_or("unknown");
            let next = s.next_attempt.as_deref().map(|t| format!("; next attempt {t}")).unwrap_or_default();
            println!("{:<28} registry error ({class}): {e}{next}", "");
        }
    }
    for e in &st.config_errors {
        println!("config error: {e}");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn rust_log_levels_and_targets() {
        let (f, bad) = log_filter(None);
        assert!(bad.is_none() && f.would_enable("tether", &Level::INFO) && !f.would_enable("tether", &Level::DEBUG));
        let (f, bad) = log_filter(Some("warn,tether::health=debug"));
        assert!(bad.is_none());
        assert!(f.would_enable("tether::health::probe", &Level::DEBUG));
        assert!(!f.would_enable("tether::reconcile", &Level::INFO) && f.would_enable("h2", &Level::WARN));
    }

    #[test]
    fn a_filter_tether_cannot_read_falls_back_to_info_and_says_so() {
        let (f, bad) = log_filter(Some("tether[span{x=1}]=debug"));
        assert!(f.would_enable("tether", &Level::INFO) && !f.would_enable("tether", &Level::DEBUG));
        let bad = bad.expect("a warning");
        assert!(bad.contains("RUST_LOG") && bad.contains("target=level"), "{bad}");
    }
}
