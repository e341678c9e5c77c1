//! `tether status`: the running agent's /v1/status, as a table or as JSON.

use crate::config::agent;
use std::process::ExitCode;
use std::time::Duration;

pub(super) async fn status(config: &std::path::Path, json: bool) -> ExitCode {
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
