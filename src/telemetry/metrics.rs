//! Prometheus metrics (prometheus-client), exposed at `GET /metrics`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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
    /// The standard, unprefixed `process_*` metrics (see [`ProcessCollector`]).
    process: Registry,
    backend: String,
    /// 1 passing, 0 critical, 2 warning, -1 unknown.
    pub service_health: Family<Labels, Gauge>,
    pub service_transitions: Family<Labels, Counter>,
    pub check_duration: Family<Labels, Histogram, LatencyBuckets>,
    pub service_last_write: Family<Labels, Gauge<f64, AtomicU64>>,
    pub service_drained: Family<Labels, Gauge>,
    pub service_flapping: Family<Labels, Gauge>,
    pub flap_episodes: Family<Labels, Counter>,
    pub flap_suppressed: Family<Labels, Counter>,
    pub budget_waits: Family<Labels, Counter>,
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
            process: Registry::default(),
            backend: backend.to_string(),
            service_health: Family::default(),
            service_transitions: Family::default(),
            check_duration: Family::new_with_constructor(LatencyBuckets),
            service_last_write: Family::default(),
            service_drained: Family::default(),
            service_flapping: Family::default(),
            flap_episodes: Family::default(),
            flap_suppressed: Family::default(),
            budget_waits: Family::default(),
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
        registry.register(
            "service_health",
            "Health per service: 1 passing, 0 critical, 2 warning (not_serving = \"warning\"), -1 not yet known",
            m.service_health.clone(),
        );
        registry.register("service_transitions", "Health state changes per service", m.service_transitions.clone());
        registry.register("check_duration_seconds", "grpc.health.v1 Check round trips and Watch message waits", m.check_duration.clone());
        registry.register(
            "service_last_write_timestamp_seconds",
            "Unix time of the last registry write for a service",
            m.service_last_write.clone(),
        );
        registry.register("service_drained", "1 while a service is drained (tether drain), else 0", m.service_drained.clone());
        registry.register(
            "service_flapping",
            "1 while a service is held critical for flapping (see [damping]), else 0",
            m.service_flapping.clone(),
        );
        registry.register("flap_episodes", "Flapping episodes started per service", m.flap_episodes.clone());
        registry.register(
            "flap_suppressed",
            "Health transitions of flapping services that were not written to the registry",
            m.flap_suppressed.clone(),
        );
        registry.register(
            "write_budget_waits",
            "Times a service's registry write waited for its write budget (a token bucket) to refill",
            m.budget_waits.clone(),
        );
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
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector));
        Metrics { registry, process, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode_registry(&mut out, &self.registry).expect("writing to a String");
        encode_registry(&mut out, &self.process).expect("writing to a String");
        encode_eof(&mut out).expect("writing to a String");
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
        self.service_flapping.remove(&s);
        self.flap_episodes.remove(&s);
        self.flap_suppressed.remove(&s);
        self.budget_waits.remove(&s);
        for to in ["passing", "warning", "critical"] {
            self.service_transitions.remove(&labels(&[("service", id), ("to", to)]));
        }
    }
}

/// The agent's own CPU time, resident memory and start time under the standard
/// names dashboards expect (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_start_time_seconds`), without
/// tether's prefix. Read from /proc at each scrape; a value /proc does not
/// give (another OS, no /proc) is left out.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = ProcessStats::read();
        if let Some(v) = p.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        if let Some(v) = p.resident_bytes {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(v) = p.start_time_seconds {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Linux exports CPU times in USER_HZ ticks, 100 a second on every architecture.
    const USER_HZ: f64 = 100.0;

    fn read() -> Self {
        let file = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Self::parse(&file("/proc/self/stat"), &file("/proc/self/status"), &file("/proc/stat"))
    }

    /// `stat`: /proc/self/stat; `status`: /proc/self/status; `system`: /proc/stat.
    fn parse(stat: &str, status: &str, system: &str) -> Self {
        // Fields after the command name (which may hold spaces and parentheses):
        // state is field 3, utime 14, stime 15, starttime 22 (proc(5)).
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let ticks = |field: usize| fields.get(field - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_seconds = ticks(14).zip(ticks(15)).map(|(u, s)| (u + s) as f64 / Self::USER_HZ);
        let boot = system.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<u64>().ok());
        let start_time_seconds = ticks(22).zip(boot).map(|(t, boot)| boot as f64 + t as f64 / Self::USER_HZ);
        let resident_bytes = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024);
        ProcessStats { cpu_seconds, resident_bytes, start_time_seconds }
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_from_proc_text() {
        let stat = "4242 (tether (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 125 0 0 20 0 3 0 1234500 123 456\n";
        let status = "Name:\ttether\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        let system = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let p = ProcessStats::parse(stat, status, system);
        assert_eq!(
            p,
            ProcessStats { cpu_seconds: Some(3.75), resident_bytes: Some(10 * 1024 * 1024), start_time_seconds: Some(1_700_012_345.0) }
        );
        assert_eq!(ProcessStats::parse("", "", ""), ProcessStats::default());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_exported_unprefixed() {
        let text = Metrics::new("Consul").encode();
        for name in ["process_cpu_seconds_total ", "process_resident_memory_bytes ", "process_start_time_seconds "] {
            assert!(text.lines().any(|l| l.starts_with(name)), "no {name}in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n") && text.matches("# EOF").count() == 1, "{text}");
    }
}
