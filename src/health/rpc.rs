//! The two grpc.health.v1 calls, with buffers sized for health messages, and
//! what their answers mean: the endpoint of a target, SERVING or not, a short
//! reason for a failed call, and whether the server itself answered it.
//!
//! tonic-health's generated client uses tonic's default codec, which
//! allocates 8 KiB per call for messages of a few bytes: 8 MB for 1,000 open
//! Watch streams. These calls are the generated ones with a small buffer.

use super::Observation;
use crate::config::tls::TlsConfig;
use std::time::Duration;
use tonic::client::Grpc;
use tonic::codec::{BufferSettings, Codec, Streaming};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, GrpcMethod, Request, Response, Status as RpcStatus};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_prost::ProstCodec;

type Prost = ProstCodec<HealthCheckRequest, HealthCheckResponse>;

/// Initial buffer per call (it grows if a message needs more).
fn buffer() -> BufferSettings {
    BufferSettings::new(128, 4 * 1024)
}

#[derive(Debug, Clone, Copy, Default)]
struct SmallCodec;

impl Codec for SmallCodec {
    type Encode = HealthCheckRequest;
    type Decode = HealthCheckResponse;
    type Encoder = <Prost as Codec>::Encoder;
    type Decoder = <Prost as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        Prost::raw_encoder(buffer())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Prost::raw_decoder(buffer())
    }
}

async fn ready(grpc: &mut Grpc<Channel>) -> Result<(), RpcStatus> {
    grpc.ready().await.map_err(|e| RpcStatus::unknown(format!("Service was not ready: {e}")))
}

/// `grpc.health.v1.Health/Check`.
pub async fn check(channel: Channel, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, RpcStatus> {
    let mut grpc = Grpc::new(channel);
    ready(&mut grpc).await?;
    let mut request = request;
    request.extensions_mut().insert(GrpcMethod::new("grpc.health.v1.Health", "Check"));
    grpc.unary(request, PathAndQuery::from_static("/grpc.health.v1.Health/Check"), SmallCodec).await
}

/// `grpc.health.v1.Health/Watch`.
pub async fn watch(channel: Channel, request: Request<HealthCheckRequest>) -> Result<Response<Streaming<HealthCheckResponse>>, RpcStatus> {
    let mut grpc = Grpc::new(channel);
    ready(&mut grpc).await?;
    let mut request = request;
    request.extensions_mut().insert(GrpcMethod::new("grpc.health.v1.Health", "Watch"));
    grpc.server_streaming(request, PathAndQuery::from_static("/grpc.health.v1.Health/Watch"), SmallCodec).await
}

/// The endpoint of `host:port`, over TLS when `tls` is set. A certificate that
/// does not verify fails the connection: there is no fallback to plaintext.
/// `authority`, when set, is sent as `:authority` instead of the target.
pub fn endpoint(target: &str, connect_timeout: Duration, tls: Option<&TlsConfig>, authority: Option<&str>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{target}"))
        .map_err(|e| format!("bad target {target:?}: {e}; write the address as host:port"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(10)));
    if let Some(a) = authority {
        let origin = format!("{scheme}://{a}").parse().map_err(|e| format!("bad authority {a:?}: {e}"))?;
        endpoint = endpoint.origin(origin);
    }
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

/// Whether the server answered NOT_SERVING (as opposed to another status, or no answer).
pub fn is_not_serving(obs: &Observation) -> bool {
    !obs.ok && obs.output == ServingStatus::NotServing.as_str_name()
}

/// A short human reason for a failed RPC: "connection refused", "UNIMPLEMENTED: …".
pub fn describe(status: &RpcStatus, deadline: Duration) -> String {
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

fn io_cause(status: &RpcStatus) -> Option<&std::io::Error> {
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

/// Whether an error status came from the server itself (so it is alive),
/// rather than from the transport or a deadline.
pub(super) fn server_answered(status: &RpcStatus) -> bool {
    let transport = io_cause(status).is_some()
        || matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown)
        || (status.code() == Code::Cancelled && status.message().contains("Timeout expired"));
    !transport
}
