//! The local HTTP listener (hyper): `/metrics`, `/healthz`, `/readyz`, `/v1/status`.

use super::Telemetry;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bind `addr` and serve until `shutdown`.
pub async fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "status and metrics listener up");
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                },
            };
            let t = telemetry.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let t = t.clone();
                    async move { Ok::<_, Infallible>(route(&t, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(local)
}

fn route(t: &Telemetry, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", t.metrics.encode()),
        "/healthz" if t.loop_alive() => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/healthz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "reconciler loop stuck\n".into()),
        "/readyz" if t.is_ready() => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "first reconcile not done\n".into()),
        "/v1/status" => {
            let status = t.snapshot();
            reply(StatusCode::OK, "application/json", serde_json::to_string_pretty(&status).expect("serializable") + "\n")
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz, /readyz, /v1/status\n".into()),
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder().status(code).header("content-type", content_type).body(Full::new(Bytes::from(body))).expect("valid response")
}
