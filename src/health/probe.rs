//! grpc.health.v1 probes: a pull-based stream of [`Observation`]s for one target.
//!
//! Watch mode opens `Health/Watch` and yields one observation per message.
//! While the stream is quiet it sends a unary `Check` every `interval` on the
//! same connection: that re-confirms the state for rise/fall counting and
//! catches a frozen (SIGSTOPped) server by its deadline. HTTP/2 keepalive pings
//! are deliberately not used: grpc-go servers answer pings more frequent than
//! their enforcement policy (5 minutes by default) with GOAWAY "too_many_pings".
//! Any non-SERVING message, stream end or error is a failure. A stream end or
//! error is re-opened with capped, jittered exponential backoff. A stream that
//! says "not serving" is kept for a short grace (a quick return to SERVING is
//! seen at once) and then dropped and re-opened at once: a tonic or grpc-go
//! server's graceful shutdown waits for open Watch streams, so holding one
//! would stall the service's own shutdown (a server shutting down refuses the
//! new stream). No pause before the re-open: a return to SERVING meanwhile
//! would go unseen until it. UNIMPLEMENTED on Watch falls back to polling
//! `Check`.
//!
//! Poll mode calls `Check` every `interval` with `timeout` as the deadline.

use super::conn::{Beat, Connections, Lease};
use super::rpc;
use super::Observation;
use crate::backoff::{jitter, Backoff};
use crate::config::tls::TlsConfig;
use crate::config::{CheckMode, CheckSpec};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};
use tonic::transport::Endpoint;
use tonic::{Code, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// First reconnect delay; doubles up to the check interval.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// How long a Watch stream is kept open after a non-SERVING message, so that a
/// quick return to SERVING is seen at once, before it is dropped and re-opened.
const NOT_SERVING_GRACE: Duration = Duration::from_secs(1);

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400)
}

pub struct Probe {
    spec: CheckSpec,
    connections: Connections,
    lease: Lease,
    /// The connection's liveness results (watch mode).
    beats: watch::Receiver<Beat>,
    /// Watch mode, until the server says Watch is UNIMPLEMENTED.
    watching: bool,
    stream: Option<Streaming<HealthCheckResponse>>,
    /// The last message of the open Watch stream, re-confirmed by each
    /// successful liveness check of the connection while the stream is quiet.
    last: Option<Observation>,
    /// Delay before the next reconnect after failures.
    backoff: Backoff,
    /// When to drop a stream that keeps saying the service is not serving.
    drop_at: Option<Instant>,
    /// When the current Watch was opened, until its first message.
    opened: Option<Instant>,
    /// When the next poll is due (poll mode).
    next_tick: Instant,
    logged_fallback: bool,
}

impl Probe {
    pub fn new(spec: CheckSpec, connections: &Connections) -> Result<Self, String> {
        let lease = connections.get(&spec)?;
        let beats = lease.beats();
        let watching = spec.mode == CheckMode::Watch;
        Ok(Probe {
            connections: connections.clone(),
            lease,
            beats,
            watching,
            stream: None,
            last: None,
            backoff: Backoff::new(BACKOFF_START, spec.interval.max(BACKOFF_START)),
            drop_at: None,
            opened: None,
            next_tick: Instant::now(),
            logged_fallback: false,
            spec,
        })
    }

    /// Wait for and return the next observation.
    pub async fn next(&mut self) -> Observation {
        if self.watching {
            self.next_watch().await
        } else {
            self.next_poll().await
        }
    }

    /// Move to a fresh connection when rotated TLS files are noticed.
    fn refresh_tls(&mut self) {
        if !self.lease.rotated() {
            return;
        }
        match self.connections.get(&self.spec) {
            Ok(lease) => {
                tracing::info!(target = %self.spec.target, "TLS files changed; reconnecting with them");
                self.beats = lease.beats();
                self.lease = lease;
                self.stream = None;
            }
            Err(e) => tracing::warn!(target = %self.spec.target, error = %e, "TLS files changed but cannot be used; keeping the old ones"),
        }
    }

    async fn next_poll(&mut self) -> Observation {
        tokio::time::sleep_until(self.next_tick).await;
        self.refresh_tls();
        self.next_tick = crate::timer::after(self.spec.interval);
        self.check().await
    }

    async fn next_watch(&mut self) -> Observation {
        loop {
            if self.stream.is_none() {
                if let Some(delay) = self.backoff.current() {
                    sleep(jitter(delay)).await;
                }
                self.refresh_tls();
                let req = HealthCheckRequest { service: self.spec.service.clone() };
                self.opened = Some(Instant::now());
                // Liveness results from before this stream do not concern it.
                self.beats.borrow_and_update();
                self.last = None;
                match timeout(self.spec.timeout, rpc::watch(self.lease.channel(), tonic::Request::new(req))).await {
                    Err(_) => {
                        return self
                            .fail(format!("deadline exceeded after {} opening Watch", humantime::format_duration(self.spec.timeout)))
                    }
                    Ok(Err(status)) if status.code() == Code::Unimplemented => {
                        if !self.logged_fallback {
                            tracing::warn!(target = %self.spec.target, "server does not implement grpc.health.v1 Watch; polling Check instead");
                            self.logged_fallback = true;
                        }
                        self.watching = false;
                        self.backoff.reset();
                        return self.next_poll().await;
                    }
                    Ok(Err(status)) => return self.fail(describe(&status, self.spec.timeout)),
                    Ok(Ok(resp)) => {
                        self.stream = Some(resp.into_inner());
                        self.drop_at = None;
                    }
                }
            }
            let stream = self.stream.as_mut().expect("stream is open");
            let drop_at = self.drop_at;
            tokio::select! {
                msg = stream.message() => return match msg {
                    Ok(Some(resp)) => {
                        let mut obs = observe_status(resp.status);
                        self.last = Some(obs.clone());
                        obs.latency = self.opened.take().map(|t| t.elapsed());
                        if obs.ok {
                            self.backoff.reset();
                            self.drop_at = None;
                        } else if self.drop_at.is_none() {
                            self.drop_at = Some(Instant::now() + NOT_SERVING_GRACE);
                        }
                        obs
                    }
                    Ok(None) => self.fail("Watch stream ended by the server".to_string()),
                    Err(status) => self.fail(describe(&status, self.spec.timeout)),
                },
                _ = tokio::time::sleep_until(drop_at.unwrap_or_else(far_future)), if drop_at.is_some() => {
                    // Still not serving: let go of the stream (a server in graceful
                    // shutdown waits for it) and look again at once.
                    self.stream = None;
                    self.drop_at = None;
                    continue;
                }
                changed = self.beats.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let beat = self.beats.borrow_and_update().clone();
                    match (beat.error, &self.last) {
                        // The server stopped answering: this stream is as good as dead.
                        (Some(e), _) if self.drop_at.is_none() => return self.fail(e),
                        (Some(e), _) => return Observation { ok: false, output: e, latency: None },
                        // Alive and the stream is quiet: its last word still holds.
                        (None, Some(last)) => return last.clone(),
                        (None, None) => continue,
                    }
                }
            }
        }
    }

    /// A failure in watch mode: drop the stream and back off before re-opening it.
    fn fail(&mut self, output: String) -> Observation {
        self.stream = None;
        self.last = None;
        self.backoff.next_delay();
        Observation { ok: false, output, latency: None }
    }

    async fn check(&mut self) -> Observation {
        let mut req = tonic::Request::new(HealthCheckRequest { service: self.spec.service.clone() });
        req.set_timeout(self.spec.timeout);
        let started = Instant::now();
        let mut obs = match timeout(self.spec.timeout, rpc::check(self.lease.channel(), req)).await {
            Err(_) => Observation {
                ok: false,
                output: format!("deadline exceeded after {}", humantime::format_duration(self.spec.timeout)),
                latency: None,
            },
            Ok(Err(status)) => Observation { ok: false, output: describe(&status, self.spec.timeout), latency: None },
            Ok(Ok(resp)) => observe_status(resp.into_inner().status),
        };
        obs.latency = Some(started.elapsed());
        obs
    }
}

/// The endpoint of `host:port`, over TLS when `tls` is set. A certificate that
/// does not verify fails the connection: there is no fallback to plaintext.
pub fn endpoint(target: &str, connect_timeout: Duration, tls: Option<&TlsConfig>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{target}"))
        .map_err(|e| format!("bad target {target:?}: {e}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(10)));
    if let Some(t) = tls {
        endpoint = endpoint.tls_config(t.grpc_client()?).map_err(|e| format!("TLS settings for {target}: {e}"))?;
    }
    Ok(endpoint)
}

/// SERVING passes; NOT_SERVING, SERVICE_UNKNOWN and UNKNOWN fail.
pub fn observe_status(status: i32) -> Observation {
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Observation { ok: true, output: "SERVING".into(), latency: None },
        Ok(s) => Observation { ok: false, output: s.as_str_name().to_string(), latency: None },
        Err(_) => Observation { ok: false, output: format!("unknown serving status {status}"), latency: None },
    }
}

/// A short human reason for a failed RPC: "connection refused", "UNIMPLEMENTED: …".
pub fn describe(status: &Status, deadline: Duration) -> String {
    if let Some(io) = io_cause(status) {
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            std::io::ErrorKind::ConnectionReset => "connection reset".into(),
            std::io::ErrorKind::TimedOut => "connect timed out".into(),
            _ => format!("connection error: {io}"),
        };
    }
    match status.code() {
        // tonic's client-side timeout reports CANCELLED "Timeout expired".
        Code::Cancelled if status.message().contains("Timeout expired") => {
            format!("deadline exceeded after {}", humantime::format_duration(deadline))
        }
        Code::DeadlineExceeded => format!("deadline exceeded after {}", humantime::format_duration(deadline)),
        Code::NotFound => format!("SERVICE_UNKNOWN (NOT_FOUND: {})", status.message()),
        code => {
            let msg = status.message();
            if msg.is_empty() {
                code_name(code).to_string()
            } else {
                format!("{}: {msg}", code_name(code))
            }
        }
    }
}

pub(super) fn io_cause(status: &Status) -> Option<&std::io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

/// gRPC's canonical upper-case code name.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
