//! `tether validate`: the agent config and service files checked offline,
//! with the parser `run` uses. Every error of every file is shown, each with
//! its file:line:col, and the exit status is 1 if there is any.

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
                errors.extend(e.iter().map(|e| e.to_string()));
            }
            None
        }
    };
    if agent_only {
        return match agent {
            Some(a) => {
                println!("ok: agent config {}", a.path.display());
                ExitCode::SUCCESS
            }
            None if errors.is_empty() => fail(&["no agent config".to_string()]),
            None => fail(&errors),
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
    if errors.is_empty() {
        println!(
            "ok: {} service(s) valid{}",
            result.services.len(),
            agent.map(|a| format!(", agent config {}", a.path.display())).unwrap_or_default()
        );
        ExitCode::SUCCESS
    } else {
        fail(&errors)
    }
}

/// Every error, one per line, then how many; exit status 1.
fn fail(errors: &[String]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    eprintln!("{} error(s)", errors.len());
    ExitCode::from(1)
}
