//! `tether run`: the agent itself, logging to stderr (journald's format
//! under systemd, or JSON).

use crate::config::agent;
use clap::ValueEnum;
use std::path::Path;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum LogFormat {
    Text,
    Json,
}

/// Run the agent with the config at `config` until it is told to stop.
pub(super) fn run(config: &Path, log_format: LogFormat, instance: Option<&str>, runtime: &tokio::runtime::Runtime) -> ExitCode {
    init_logging(log_format);
    let config = match agent::load_as(config, instance) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return super::fail(e);
        }
    };
    match runtime.block_on(crate::app::run(config, CancellationToken::new())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            super::fail(format!("{e:#}"))
        }
    }
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
    // The builder's own maximum level is INFO; `filter` decides, so open it fully.
    // A log line that cannot be written (stderr's reader gone: a closed pipe)
    // is dropped. tracing-subscriber would report it on stderr with
    // `eprintln!`, which panics on that same closed pipe and takes the
    // agent's loop down with it.
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_ansi(ansi)
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE);
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
