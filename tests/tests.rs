//! Integration tests: one binary, a module per topic, shared helpers in `support`.
//! Every test starts its own real Consul (and etcd) on free loopback ports and
//! real gRPC health servers, drives the real `tether` binary, and stops all it
//! started. Waits are conditions with deadlines, never fixed sleeps.

mod cli;
mod cluster;
mod consul;
mod damping;
mod etcd;
mod faults;
mod instances;
mod interop;
mod operator;
mod ops;
mod package;
mod python;
mod scale;
mod security;
mod support;

/// The output tether shows before a service's first health result.
fn consul_waiting() -> &'static str {
    "waiting for the first gRPC health result"
}
