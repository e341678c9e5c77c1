//! `tether validate`: the agent config and service files checked offline,
//! with the parser `run` uses.

use crate::config::{agent, scan, Defaults};
use std::path::PathBuf;
use std::process::ExitCode;

pub(super) fn validate(config: &std::path::Path, paths: &[PathBuf], agent_only: bool) -> ExitCode {
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
        damping: Default::default(),
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
