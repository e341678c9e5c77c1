//! The two grpc.health.v1 calls, with buffers sized for health messages.
//!
//! tonic-health's generated client uses tonic's default codec, which
//! allocates 8 KiB per call for messages of a few bytes: 8 MB for 1,000 open
//! Watch streams. These calls are the generated ones with a small buffer.

use tonic::client::Grpc;
use tonic::codec::{BufferSettings, Codec, Streaming};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{GrpcMethod, Request, Response, Status};
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

async fn ready(grpc: &mut Grpc<Channel>) -> Result<(), Status> {
    grpc.ready().await.map_err(|e| Status::unknown(format!("Service was not ready: {e}")))
}

/// `grpc.health.v1.Health/Check`.
pub async fn check(channel: Channel, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
    let mut grpc = Grpc::new(channel);
    ready(&mut grpc).await?;
    let mut request = request;
    request.extensions_mut().insert(GrpcMethod::new("grpc.health.v1.Health", "Check"));
    grpc.unary(request, PathAndQuery::from_static("/grpc.health.v1.Health/Check"), SmallCodec).await
}

/// `grpc.health.v1.Health/Watch`.
pub async fn watch(channel: Channel, request: Request<HealthCheckRequest>) -> Result<Response<Streaming<HealthCheckResponse>>, Status> {
    let mut grpc = Grpc::new(channel);
    ready(&mut grpc).await?;
    let mut request = request;
    request.extensions_mut().insert(GrpcMethod::new("grpc.health.v1.Health", "Watch"));
    grpc.server_streaming(request, PathAndQuery::from_static("/grpc.health.v1.Health/Watch"), SmallCodec).await
}
