//! `tether drain` and `tether undrain`: a request to the running agent over
//! its control socket.

use crate::config::agent;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub(super) struct DrainTarget {
    /// Service ids (as in `tether status`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    ids: Vec<String>,
    /// Every service the agent runs now.
    #[arg(long)]
    all: bool,
    /// Return only once the registry shows it (exit 1 after --timeout).
    #[arg(long)]
    wait: bool,
    #[arg(long, default_value = "30s", value_parser = crate::config::duration::parse)]
    timeout: Duration,
    /// The agent's config (default /etc/tether/tether.toml, or
    /// /etc/tether/INSTANCE/tether.toml with --instance).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The agent's instance (as given to `run --instance`).
    #[arg(long)]
    instance: Option<String>,
}

/// `tether drain` / `tether undrain`: ask the running agent, then (with
/// --wait) poll until its registry shows it.
pub(super) fn drain(t: DrainTarget, on: bool) -> ExitCode {
    use crate::control::{request, Request};
    let path = super::agent_config_path(t.config.clone(), t.instance.as_deref());
    let config = match agent::load_as(&path, t.instance.as_deref()) {
        Ok(c) => c,
        Err(e) => return super::fail(e),
    };
    let socket = config.control_socket();
    let ids = t.ids.clone();
    let req = if on { Request::Drain { ids: ids.clone(), all: t.all } } else { Request::Undrain { ids: ids.clone(), all: t.all } };
    let verb = if on { "drained" } else { "undrained" };
    let answer = match request(&socket, &req) {
        Ok(r) => r,
        Err(e) => return super::fail(e),
    };
    if let Some(e) = answer.error {
        return super::fail(e);
    }
    if let Some(w) = &answer.warning {
        eprintln!("warning: {w}");
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
            Ok(r) if r.error.is_some() => return super::fail(r.error.unwrap_or_default()),
            Ok(_) => {}
            Err(e) => return super::fail(e),
        }
        if std::time::Instant::now() >= deadline {
            return super::fail(format!(
                "the registry does not show it yet after {}; see `tether status`",
                humantime::format_duration(t.timeout)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
