//! The writer: the one task that does the reconciler's registry I/O, so the
//! reconciler's loop never waits for the registry.
//!
//! It takes one piece of work at a time from the reconciler (a batch of
//! writes, or an anti-entropy read), does it, and reports the outcome. Work
//! and outcomes travel in order, so the reconciler always knows which writes
//! a listing already reflects.

use crate::registry::{AgentInfo, Outcome, Registry, RegistryError, RemoteEntry, Write};
use crate::telemetry::Telemetry;
use std::sync::Arc;
use tokio::sync::mpsc;

pub enum Work {
    Writes(Vec<Write>),
    /// Make sure tether's own presence matches, and list what the registry holds.
    Sync(AgentInfo),
}

pub enum Done {
    /// What became of each write, in order (see [`Registry::apply`]).
    Writes {
        writes: Vec<Write>,
        outcomes: Vec<Outcome>,
    },
    Sync(AgentInfo, Result<Vec<RemoteEntry>, RegistryError>),
}

/// Run until `work` closes; hands the registry back for shutdown.
pub async fn run<R: Registry>(mut registry: R, mut work: mpsc::Receiver<Work>, done: mpsc::Sender<Done>, telemetry: Arc<Telemetry>) -> R {
    let m = &telemetry.metrics;
    while let Some(w) = work.recv().await {
        let outcome = match w {
            Work::Writes(writes) => {
                let mut outcomes = registry.apply(&writes).await;
                outcomes.resize(writes.len(), Outcome::NotTried);
                for (w, o) in writes.iter().zip(&outcomes) {
                    match o {
                        Outcome::Done => m.op(w.op()),
                        Outcome::Failed(e) => {
                            m.op(w.op());
                            m.error(w.op(), e.kind.as_str(), e.kind.class().as_str());
                        }
                        Outcome::NotTried => {}
                    }
                }
                Done::Writes { writes, outcomes }
            }
            Work::Sync(agent) => {
                let result = registry.sync_agent(&agent).await;
                m.op("list");
                if let Err(e) = &result {
                    m.error("list", e.kind.as_str(), e.kind.class().as_str());
                }
                Done::Sync(agent, result)
            }
        };
        if done.send(outcome).await.is_err() {
            break;
        }
    }
    registry
}
