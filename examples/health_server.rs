//! An example gRPC service with grpc.health.v1 (tonic-health), driven from stdin.
//!
//! ```text
//! cargo run --example health_server -- 127.0.0.1:50051 [SERVICE ...]
//! ```
//! Prints `listening on ADDR` once bound (port 0 picks a free port). Each stdin
//! line sets the status of every named service (and of the whole server, ""):
//! `serving`, `not_serving`, `unknown` (clears the statuses), or `stop` (graceful:
//! NOT_SERVING, then shut down). Used by `scripts/demo.sh`, the benchmarks and
//! the tests. With `--no-health` it serves no health service at all (every
//! health RPC answers UNIMPLEMENTED). `--tls-cert F --tls-key F` serve TLS;
//! `--tls-client-ca F` also requires client certificates (mTLS).

use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::health_reporter;
use tonic_health::ServingStatus;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let no_health = args.iter().any(|a| a == "--no-health");
    args.retain(|a| a != "--no-health");
    // --tls-cert F --tls-key F [--tls-client-ca F]: serve TLS (mTLS with a client CA).
    let mut take = |flag: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        let v = args.get(i + 1).cloned();
        args.drain(i..(i + 2).min(args.len()));
        v
    };
    let tls_cert = take("--tls-cert");
    let tls_key = take("--tls-key");
    let client_ca = take("--tls-client-ca");
    let addr = args.first().cloned().unwrap_or_else(|| "127.0.0.1:50051".into());
    let mut services: Vec<String> = args.into_iter().skip(1).collect();
    services.push(String::new());

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let (mut reporter, health_service) = health_reporter();
    for s in &services {
        reporter.set_service_status(s, ServingStatus::Serving).await;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // TCP_NODELAY, as grpc-go and `Server::serve` set it: without it a Watch
    // update written while an earlier answer's segment is still unacknowledged
    // waits for the peer's delayed ACK (Nagle's algorithm), up to 40 ms.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let health: Option<HealthServer<_>> = (!no_health).then_some(health_service);
    let mut builder = Server::builder();
    if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?));
        if let Some(ca) = client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(std::fs::read(ca)?));
        }
        builder = builder.tls_config(tls)?;
    }
    let server = tokio::spawn(builder.add_optional_service(health).serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let status = match line.trim() {
            "serving" => ServingStatus::Serving,
            "not_serving" => ServingStatus::NotServing,
            "unknown" => {
                for s in &services {
                    reporter.clear_service_status(s).await;
                }
                println!("ok");
                continue;
            }
            "stop" => break,
            "" => continue,
            other => {
                eprintln!("unknown command {other:?}: use serving, not_serving, unknown or stop");
                continue;
            }
        };
        for s in &services {
            reporter.set_service_status(s, status).await;
        }
        println!("ok");
    }
    // stdin closed or "stop": graceful shutdown, NOT_SERVING first.
    for s in &services {
        reporter.set_service_status(s, ServingStatus::NotServing).await;
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    Ok(())
}
