//! `tether check`: one grpc.health.v1 `Check` of one server, with
//! grpc_health_probe's exit codes.

use crate::config::tls::TlsConfig;
use crate::health::rpc::{code_name, describe, observe_status};
use std::process::ExitCode;
use std::time::Duration;

pub(super) async fn check(addr: &str, service_name: &str, timeout: Duration, tls: Option<&TlsConfig>) -> ExitCode {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let endpoint = match crate::health::rpc::endpoint(addr, timeout, tls, None) {
        Ok(e) => e,
        Err(e) => return super::fail(e),
    };
    let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            eprintln!("error: failed to connect to {addr}: {}", crate::error::chain(&e));
            return ExitCode::from(2);
        }
        Err(_) => {
            eprintln!("error: timed out connecting to {addr} after {}", humantime::format_duration(timeout));
            return ExitCode::from(2);
        }
    };
    let mut req = tonic::Request::new(HealthCheckRequest { service: service_name.to_string() });
    req.set_timeout(timeout);
    let result = tokio::time::timeout(timeout, HealthClient::new(channel).check(req)).await;
    match result {
        Err(_) => {
            eprintln!("error: health rpc failed: deadline exceeded after {}", humantime::format_duration(timeout));
            ExitCode::from(3)
        }
        Ok(Err(status)) => {
            eprintln!("error: health rpc failed: {} ({})", describe(&status, timeout), code_name(status.code()));
            ExitCode::from(3)
        }
        Ok(Ok(resp)) => {
            let obs = observe_status(resp.into_inner().status);
            println!("status: {}", obs.output);
            if obs.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(4)
            }
        }
    }
}
