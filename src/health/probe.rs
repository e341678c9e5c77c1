//! grpc.health.v1 probes: a pull-based stream of [`Observation`]s for one target.
//!
//! Watch mode opens `Health/Watch` and yields one observation per message.
//! While the stream is quiet the connection's liveness `Check` (one per
//! connection per interval, see `conn`) re-confirms the state for rise/fall
//! counting and catches a frozen (SIGSTOPped) server by its deadline. HTTP/2
//! keepalive pings are deliberately not used: grpc-go servers answer pings
//! more frequent than their enforcement policy (5 minutes by default) with
//! GOAWAY "too_many_pings".
//!
//! **A guest in the service's house: a Watch stream is cancelled as rarely
//! as the protocol allows.** Cancelling a stream is not free for the server:
//! grpcio's sync `HealthServicer` (Python) deadlocks when a Watch stream
//! cancelled a moment before meets the servicer's next send (grpc/grpc#43403:
//! the servicer sends under its lock and waits for the send, while the
//! cancelled stream's close callback, on the thread that would complete it,
//! waits for that lock). So:
//!
//! - A stream that says "not serving" is kept, so that a return to SERVING
//!   is seen at once, however long the episode. But a tonic or grpc-go
//!   server's graceful shutdown waits for open Watch streams, and must not
//!   wait for tether: so while the stream says "not serving" the probe sends
//!   a unary `Check` after [`NOT_SERVING_GRACE`] and then every interval, at
//!   least every [`FOLLOW_EVERY_AT_MOST`]. A server that answers is alive and
//!   keeps its stream; one that does not (it sent GOAWAY and closed its
//!   listener, or froze) has its stream dropped: one cancellation at most per
//!   episode, and none in an ordinary one.
//! - Without a stream the probe *follows* the service with unary `Check`s
//!   and opens a new Watch only once one says SERVING. No re-open storms.
//! - A stream that ends or fails is followed the same way, its Checks paced
//!   by capped, jittered exponential backoff until a Watch message says
//!   SERVING again.
//!
//! Every wait is bounded: opening a Watch and its first message within
//! `timeout` (else it is a failure), each Check by `timeout`, and any failed
//! liveness result of the connection fails the open stream.
//! UNIMPLEMENTED on Watch falls back to polling `Check`.
//!
//! Poll mode calls `Check` every `interval` with `timeout` as the deadline.

use super::conn::{Beat, Connections, Lease};
use super::rpc::{self, describe, observe_status, server_answered};
use super::Observation;
use crate::backoff::{jitter, Backoff};
use crate::config::{CheckMode, CheckSpec};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tonic::{Code, Streaming};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// First delay after a failure; doubles up to the check interval.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// When a Watch stream says "not serving", how long until a unary `Check`
/// asks whether the server is still there (a server in graceful shutdown
/// waits for open streams: it must not wait for tether longer than this).
pub const NOT_SERVING_GRACE: Duration = Duration::from_secs(1);
/// While a service is not serving, it is checked with a unary `Check` every
/// interval, but at least this often.
pub const FOLLOW_EVERY_AT_MOST: Duration = Duration::from_secs(1);

/// What a Watch-mode probe does next while it has no stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    /// Open a Watch now (at start, and after a Check said SERVING).
    Open,
    /// Send a unary Check at this time; open a Watch once one says SERVING.
    CheckAt(Instant),
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
    /// Without a stream (watch mode): open one, or follow with Checks.
    follow: Follow,
    /// The last message of the open Watch stream, re-confirmed by each
    /// successful liveness check of the connection while the stream is quiet.
    last: Option<Observation>,
    /// Paces the Checks that follow a failed or ended Watch stream; reset
    /// only by a SERVING Watch message, so a stream that keeps failing is
    /// re-opened no faster than the backoff allows.
    backoff: Backoff,
    /// While the stream says "not serving": when to ask with a unary Check
    /// whether the server is still there (else the stream is dropped).
    recheck_at: Option<Instant>,
    /// When the current Watch was opened, until its first message.
    opened: Option<Instant>,
    /// When the next poll is due (poll mode).
    next_tick: Instant,
    /// Streams this probe cancelled (dropped while the server held them open).
    cancels: u64,
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
            follow: Follow::Open,
            last: None,
            backoff: Backoff::new(BACKOFF_START, spec.interval.max(BACKOFF_START)),
            recheck_at: None,
            opened: None,
            next_tick: Instant::now(),
            cancels: 0,
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

    /// How many Watch streams this probe has cancelled so far.
    #[cfg(test)]
    pub fn cancels(&self) -> u64 {
        self.cancels
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
                self.drop_stream();
            }
            Err(e) => tracing::warn!(target = %self.spec.target, error = %e, "TLS files changed but cannot be used; keeping the old ones"),
        }
    }

    async fn next_poll(&mut self) -> Observation {
        sleep_until(self.next_tick).await;
        self.refresh_tls();
        self.next_tick = crate::timer::after(self.spec.interval);
        self.check().await
    }

    /// Let go of the open stream, if any. A stream the server still holds
    /// open is cancelled by this: counted, since cancellations are what a
    /// probe must keep rare.
    fn drop_stream(&mut self) {
        if self.stream.take().is_some() {
            self.cancels += 1;
        }
        self.recheck_at = None;
        self.opened = None;
        self.last = None;
    }

    /// Follow the service with unary Checks from `at` on.
    fn follow_at(&mut self, at: Instant) {
        self.follow = Follow::CheckAt(at);
    }

    async fn next_watch(&mut self) -> Observation {
        loop {
            if self.stream.is_none() {
                if let Follow::CheckAt(at) = self.follow {
                    sleep_until(at).await;
                    self.refresh_tls();
                    let (obs, answered) = self.check_answered().await;
                    let every = self.spec.interval.min(FOLLOW_EVERY_AT_MOST);
                    self.follow = if obs.ok {
                        Follow::Open
                    } else if answered {
                        Follow::CheckAt(crate::timer::after(every))
                    } else {
                        Follow::CheckAt(Instant::now() + jitter(self.backoff.next_delay()))
                    };
                    return obs;
                }
                self.refresh_tls();
                if let Some(obs) = self.open().await {
                    return obs;
                }
                continue;
            }
            let first_deadline = self.opened.map(|t| t + self.spec.timeout);
            let recheck_at = self.recheck_at;
            let stream = self.stream.as_mut().expect("stream is open");
            tokio::select! {
                msg = stream.message() => return match msg {
                    Ok(Some(resp)) => {
                        let mut obs = observe_status(resp.status);
                        self.last = Some(obs.clone());
                        obs.latency = self.opened.take().map(|t| t.elapsed());
                        if obs.ok {
                            self.backoff.reset();
                            self.recheck_at = None;
                        } else if self.recheck_at.is_none() {
                            self.recheck_at = Some(Instant::now() + NOT_SERVING_GRACE);
                        }
                        obs
                    }
                    Ok(None) => {
                        self.stream = None; // ended by the server: nothing to cancel
                        self.fail("Watch stream ended by the server".to_string())
                    }
                    Err(status) => {
                        self.stream = None;
                        self.fail(describe(&status, self.spec.timeout))
                    }
                },
                _ = sleep_until(first_deadline.unwrap_or_else(far_future)), if first_deadline.is_some() => {
                    let why = format!("no Watch status within {} of opening", humantime::format_duration(self.spec.timeout));
                    return self.fail(why);
                }
                _ = sleep_until(recheck_at.unwrap_or_else(far_future)), if recheck_at.is_some() => {
                    // Still not serving: is the server still there? One that
                    // answers keeps its stream (a return to SERVING is seen
                    // on it at once); one that does not, a server in graceful
                    // shutdown among them, has it let go, and is followed
                    // with Checks.
                    let (obs, answered) = self.check_answered().await;
                    if answered {
                        self.recheck_at = Some(crate::timer::after(self.spec.interval.min(FOLLOW_EVERY_AT_MOST)));
                        continue;
                    }
                    return self.fail(obs.output);
                }
                changed = self.beats.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let beat = self.beats.borrow_and_update().clone();
                    match (beat.error, &self.last) {
                        // The server stopped answering: this stream is as good as dead.
                        (Some(e), _) => return self.fail(e),
                        // Alive and the stream is quiet: its last word still holds.
                        (None, Some(last)) => return last.clone(),
                        // No word yet: the first-message deadline bounds the wait.
                        (None, None) => continue,
                    }
                }
            }
        }
    }

    /// Open a Watch stream. `None` when it is open; else the observation
    /// to report (a failure, or the first poll after falling back to it).
    async fn open(&mut self) -> Option<Observation> {
        let mut req = tonic::Request::new(HealthCheckRequest { service: self.spec.service.clone() });
        if let Err(e) = self.lease.metadata().apply(&mut req) {
            return Some(self.fail(e));
        }
        self.opened = Some(Instant::now());
        // Liveness results from before this stream do not concern it.
        self.beats.borrow_and_update();
        self.last = None;
        self.recheck_at = None;
        match timeout(self.spec.timeout, rpc::watch(self.lease.channel(), req)).await {
            Err(_) => Some(self.fail(format!("deadline exceeded after {} opening Watch", humantime::format_duration(self.spec.timeout)))),
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                if !self.logged_fallback {
                    tracing::warn!(target = %self.spec.target, "server does not implement grpc.health.v1 Watch; polling Check instead");
                    self.logged_fallback = true;
                }
                self.watching = false;
                self.opened = None;
                self.backoff.reset();
                Some(self.next_poll().await)
            }
            Ok(Err(status)) => Some(self.fail(describe(&status, self.spec.timeout))),
            Ok(Ok(resp)) => {
                self.stream = Some(resp.into_inner());
                None
            }
        }
    }

    /// A failure in watch mode: let go of the stream, if one is still open,
    /// and follow with Checks after the next backoff delay.
    fn fail(&mut self, output: String) -> Observation {
        self.drop_stream();
        let delay = jitter(self.backoff.next_delay());
        self.follow_at(Instant::now() + delay);
        Observation { ok: false, output, latency: None }
    }

    async fn check(&mut self) -> Observation {
        self.check_answered().await.0
    }

    /// One unary Check, and whether the server itself answered it (a status,
    /// or an error of its own), as opposed to the transport or a deadline.
    async fn check_answered(&mut self) -> (Observation, bool) {
        let mut req = tonic::Request::new(HealthCheckRequest { service: self.spec.service.clone() });
        req.set_timeout(self.spec.timeout);
        if let Err(e) = self.lease.metadata().apply(&mut req) {
            // Not sent: nothing is known of the server, so a stream it may
            // have open is not let go for this.
            return (Observation { ok: false, output: e, latency: None }, true);
        }
        let started = Instant::now();
        let (mut obs, answered) = match timeout(self.spec.timeout, rpc::check(self.lease.channel(), req)).await {
            Err(_) => {
                let output = format!("deadline exceeded after {}", humantime::format_duration(self.spec.timeout));
                (Observation { ok: false, output, latency: None }, false)
            }
            Ok(Err(status)) => {
                (Observation { ok: false, output: describe(&status, self.spec.timeout), latency: None }, server_answered(&status))
            }
            Ok(Ok(resp)) => (observe_status(resp.into_inner().status), true),
        };
        obs.latency = Some(started.elapsed());
        (obs, answered)
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::Server;
    use tonic_health::server::health_reporter;

    fn spec(target: String, interval: Duration) -> CheckSpec {
        CheckSpec { interval, ..CheckSpec::watching(&target, "svc") }
    }

    /// A tonic-health server on a free port with "svc" SERVING.
    async fn serve_health() -> (tonic_health::server::HealthReporter, std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let (reporter, service) = health_reporter();
        reporter.set_service_status("svc", tonic_health::ServingStatus::Serving).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = Server::builder().add_service(service).serve_with_incoming(TcpIncoming::from(listener)).await;
        });
        (reporter, addr, server)
    }

    /// The next observation, within a bound.
    async fn next(probe: &mut Probe) -> Observation {
        timeout(Duration::from_secs(5), probe.next()).await.expect("an observation within 5 s")
    }

    /// A long NOT_SERVING episode of a server that stays up costs it no
    /// cancelled stream: the stream is kept (unary Checks ask whether the
    /// server is still there), and the return to SERVING is seen on it.
    #[tokio::test]
    async fn a_long_not_serving_episode_keeps_the_stream() {
        let (reporter, addr, server) = serve_health().await;
        let connections = Connections::new();
        let mut probe = Probe::new(spec(addr.to_string(), Duration::from_millis(200)), &connections).unwrap();
        assert!(next(&mut probe).await.ok);
        for _ in 0..2 {
            reporter.set_service_status("svc", tonic_health::ServingStatus::NotServing).await;
            let started = Instant::now();
            assert_eq!(next(&mut probe).await.output, "NOT_SERVING");
            while started.elapsed() < NOT_SERVING_GRACE * 3 {
                let obs = next(&mut probe).await;
                assert!(!obs.ok, "{obs:?}");
            }
            assert!(probe.stream.is_some(), "the stream is kept while the server answers");
            reporter.set_service_status("svc", tonic_health::ServingStatus::Serving).await;
            let back = next(&mut probe).await;
            assert!(back.ok, "{back:?}");
            assert!(probe.stream.is_some());
        }
        assert_eq!(probe.cancels(), 0);
        server.abort();
    }

    /// A server that goes NOT_SERVING and shuts down gracefully is not held up
    /// by the stream for longer than about the grace: the Check after it
    /// fails, and the stream is let go (the one cancellation of the episode).
    /// Then Checks follow it, and a new server on the port is watched again.
    #[tokio::test]
    async fn a_graceful_shutdown_is_not_held_up() {
        let (reporter, service) = health_reporter();
        reporter.set_service_status("svc", tonic_health::ServingStatus::Serving).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        let connections = Connections::new();
        let mut probe = Probe::new(spec(addr.to_string(), Duration::from_secs(5)), &connections).unwrap();
        assert!(next(&mut probe).await.ok);
        reporter.set_service_status("svc", tonic_health::ServingStatus::NotServing).await;
        assert_eq!(next(&mut probe).await.output, "NOT_SERVING");
        stop_tx.send(()).unwrap();
        // Drive the probe while the server stops.
        let drive = async {
            loop {
                let obs = probe.next().await;
                assert!(!obs.ok);
            }
        };
        tokio::select! {
            _ = drive => unreachable!(),
            r = timeout(NOT_SERVING_GRACE * 4, server) => r.expect("the server stopped within 4 s").unwrap(),
        }
        assert!(probe.cancels() <= 1, "{}", probe.cancels());
        assert!(probe.stream.is_none());
    }

    /// A quick return to SERVING within the grace is seen on the open stream:
    /// nothing is cancelled.
    #[tokio::test]
    async fn a_short_not_serving_blip_keeps_the_stream() {
        let (reporter, addr, server) = serve_health().await;
        let connections = Connections::new();
        let mut probe = Probe::new(spec(addr.to_string(), Duration::from_secs(5)), &connections).unwrap();
        assert!(next(&mut probe).await.ok);
        reporter.set_service_status("svc", tonic_health::ServingStatus::NotServing).await;
        assert!(!next(&mut probe).await.ok);
        reporter.set_service_status("svc", tonic_health::ServingStatus::Serving).await;
        assert!(next(&mut probe).await.ok);
        assert!(probe.stream.is_some());
        assert_eq!(probe.cancels(), 0);
        server.abort();
    }

    /// A server that is not there: the probe fails and retries with Checks
    /// paced by backoff, never faster.
    #[tokio::test]
    async fn a_refused_connection_is_retried_with_backoff() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let connections = Connections::new();
        let mut probe = Probe::new(spec(format!("127.0.0.1:{port}"), Duration::from_millis(400)), &connections).unwrap();
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            let obs = next(&mut probe).await;
            assert!(!obs.ok);
            n += 1;
        }
        // 50, 100, 200, 400, 400… ms (±20 %): at most about 7 attempts in 1.5 s.
        assert!(n <= 8, "{n} attempts in 1.5 s");
        assert_eq!(probe.cancels(), 0);
    }
}
