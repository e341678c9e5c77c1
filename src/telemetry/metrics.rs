//! Prometheus metrics (prometheus-client), exposed at `GET /metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        // 0.25 ms … ~4 s
        Histogram::new(exponential_buckets(0.00025, 2.0, 15))
    }
}

pub struct Metrics {
    registry: Registry,
    backend: String,
    /// 1 passing, 0 critical, -1 unknown.
    pub service_health: Family<Labels, Gauge>,
    pub service_transitions: Family<Labels, Counter>,
    pub check_duration: Family<Labels, Histogram, LatencyBuckets>,
    pub service_last_write: Family<Labels, Gauge<f64, AtomicU64>>,
    pub service_drained: Family<Labels, Gauge>,
    pub heartbeat_last: Gauge<f64, AtomicU64>,
    pub heartbeat_late: Counter,
    pub heartbeat_seconds: Histogram,
    pub write_queue: Gauge,
    pub registry_ops: Family<Labels, Counter>,
    pub registry_errors: Family<Labels, Counter>,
    pub registry_reconnects: Counter,
    pub anti_entropy_runs: Counter,
    pub anti_entropy_fixes: Counter,
    pub config_reloads: Counter,
    pub config_errors: Gauge,
    pub services: Gauge,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Metrics {
    pub fn new(backend: &str) -> Self {
        let mut registry = Registry::with_prefix("tether");
        let m = Metrics {
            registry: Registry::default(),
            backend: backend.to_string(),
            service_health: Family::default(),
            service_transitions: Family::default(),
            check_duration: Family::new_with_constructor(LatencyBuckets),
            service_last_write: Family::default(),
            service_drained: Family::default(),
            heartbeat_last: Gauge::default(),
            heartbeat_late: Counter::default(),
            heartbeat_seconds: Histogram::new([0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            write_queue: Gauge::default(),
            registry_ops: Family::default(),
            registry_errors: Family::default(),
            registry_reconnects: Counter::default(),
            anti_entropy_runs: Counter::default(),
            anti_entropy_fixes: Counter::default(),
            config_reloads: Counter::default(),
            config_errors: Gauge::default(),
            services: Gauge::default(),
        };
        registry.register("service_health", "Health per service: 1 passing, 0 critical, -1 not yet known", m.service_health.clone());
        registry.register("service_transitions", "Health state changes per service", m.service_transitions.clone());
        registry.register("check_duration_seconds", "grpc.health.v1 Check round trips and Watch message waits", m.check_duration.clone());
        registry.register(
            "service_last_write_timestamp_seconds",
            "Unix time of the last registry write for a service",
            m.service_last_write.clone(),
        );
        registry.register("service_drained", "1 while a service is drained (tether drain), else 0", m.service_drained.clone());
        registry.register(
            "heartbeat_last_timestamp_seconds",
            "Unix time of tether's last successful liveness heartbeat",
            m.heartbeat_last.clone(),
        );
        registry.register(
            "heartbeat_late",
            "Liveness heartbeats that succeeded later than 1.5 heartbeat periods (half the TTL) after the previous success",
            m.heartbeat_late.clone(),
        );
        registry.register("heartbeat_duration_seconds", "Round trips of liveness heartbeats", m.heartbeat_seconds.clone());
        registry.register("write_queue", "Registry writes waiting for the writer", m.write_queue.clone());
        registry.register("registry_operations", "Registry operations by backend and kind", m.registry_ops.clone());
        registry.register("registry_errors", "Failed registry operations by backend, operation, error kind and class (transient: retried in seconds; permanent: needs a person)", m.registry_errors.clone());
        registry.register(
            "registry_reconnects",
            "Recoveries after the registry was unreachable or lost tether's records",
            m.registry_reconnects.clone(),
        );
        registry.register("anti_entropy_runs", "Completed anti-entropy passes", m.anti_entropy_runs.clone());
        registry.register("anti_entropy_fixes", "Registry records fixed by anti-entropy", m.anti_entropy_fixes.clone());
        registry.register("config_reloads", "Scans of the services directory that changed the desired set", m.config_reloads.clone());
        registry.register("config_errors", "Service files currently failing to load", m.config_errors.clone());
        registry.register("services", "Services currently managed", m.services.clone());
        let build: Family<Labels, Gauge> = Family::default();
        build.get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION")), ("backend", backend)])).set(1);
        registry.register("build_info", "tether's version and backend", build);
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    pub fn service(id: &str) -> Labels {
        labels(&[("service", id)])
    }

    pub fn op(&self, op: &str) {
        self.registry_ops.get_or_create(&labels(&[("backend", &self.backend), ("op", op)])).inc();
    }

    /// A failed registry operation: its error's kind and class (transient or permanent).
    pub fn error(&self, op: &str, kind: &str, class: &str) {
        let labels = labels(&[("backend", &self.backend), ("op", op), ("kind", kind), ("class", class)]);
        self.registry_errors.get_or_create(&labels).inc();
    }

    pub fn transition(&self, id: &str, to: &str) {
        self.service_transitions.get_or_create(&labels(&[("service", id), ("to", to)])).inc();
    }

    /// Drop the per-service series of a removed service.
    pub fn forget(&self, id: &str) {
        let s = Self::service(id);
        self.service_health.remove(&s);
        self.check_duration.remove(&s);
        self.service_last_write.remove(&s);
        self.service_drained.remove(&s);
        for to in ["passing", "critical"] {
            self.service_transitions.remove(&labels(&[("service", id), ("to", to)]));
        }
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
