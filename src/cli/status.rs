//! `tether status`: the running agent's /v1/status, as lines to scan or as JSON.
//!
//! The human output is a summary line, then one aligned line per service:
//!
//! ```text
//! tether 0.1.0 on node n1 — consul http://127.0.0.1:8500 connected, ready — 2 services: 1 passing, 1 critical, 0 flapping, 0 unknown
//! ID         HEALTH    SINCE  CHECK  REGISTRY    LAST ERROR
//! billing-1  critical  12s    -      registered  NOT_SERVING
//! orders-1   passing   3m12s  1.2ms  registered  -
//! ```
//!
//! Colours only on a terminal and without `NO_COLOR`; `--json` prints the
//! agent's JSON as it came (full errors, exact times).

use crate::config::agent;
use crate::telemetry::status::{ServiceStatus, Snapshot};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

/// The line width aimed at when the terminal's is unknown (`COLUMNS` unset).
const DEFAULT_WIDTH: usize = 100;
/// The LAST ERROR column is never cut shorter than this.
const MIN_ERROR_WIDTH: usize = 30;

pub(super) async fn status(config: &std::path::Path, instance: Option<&str>, json: bool) -> ExitCode {
    let cfg = match agent::load_as(config, instance) {
        Ok(c) => c,
        Err(e) => return super::fail(e),
    };
    let Some(mut addr) = cfg.listen else {
        eprintln!("error: {}: listen is \"\", so the agent serves no status; set listen = \"127.0.0.1:9469\"", config.display());
        return ExitCode::from(1);
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/v1/status");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().expect("http client");
    let body = match client.get(&url).send().await.and_then(|r| r.error_for_status()) {
        Ok(r) => match r.text().await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: reading {url}: {e}");
                return ExitCode::from(1);
            }
        },
        Err(e) => {
            eprintln!(
                "error: no tether agent answers at {url} ({}); is `tether run --config {}` running?",
                crate::error::chain(&e),
                config.display()
            );
            return ExitCode::from(1);
        }
    };
    if json {
        print!("{body}");
        return ExitCode::SUCCESS;
    }
    let st: Snapshot = match serde_json::from_str(&body) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {url} did not return tether's status: {e}");
            return ExitCode::from(1);
        }
    };
    let style = Style {
        colour: colour_wanted(std::io::stdout().is_terminal(), std::env::var_os("NO_COLOR"), std::env::var_os("TERM")),
        width: std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse().ok()).filter(|w| *w > 0).unwrap_or(DEFAULT_WIDTH),
    };
    for line in render(&st, SystemTime::now(), style) {
        println!("{line}");
    }
    ExitCode::SUCCESS
}

/// Colours only on a terminal, without `NO_COLOR` (set and not empty, as
/// no-color.org says) and not on `TERM=dumb`.
fn colour_wanted(terminal: bool, no_color: Option<std::ffi::OsString>, term: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty()) && term.is_none_or(|t| t != "dumb")
}

#[derive(Debug, Clone, Copy)]
struct Style {
    colour: bool,
    /// The line width to fit the LAST ERROR column into.
    width: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Colour {
    Plain,
    Green,
    Red,
    Yellow,
    Bold,
}

/// One cell: its text and its colour, padded before it is coloured so that
/// escape codes never count towards the width.
struct Cell {
    text: String,
    colour: Colour,
}

impl Cell {
    fn new(text: impl Into<String>, colour: Colour) -> Self {
        Cell { text: text.into(), colour }
    }

    fn plain(text: impl Into<String>) -> Self {
        Cell::new(text, Colour::Plain)
    }

    fn width(&self) -> usize {
        self.text.chars().count()
    }

    /// The text padded to `width` (none if `None`), then coloured.
    fn show(&self, width: Option<usize>, style: Style) -> String {
        let pad = width.map_or(0, |w| w.saturating_sub(self.width()));
        paint(&format!("{}{:pad$}", self.text, ""), self.colour, style)
    }
}

fn paint(text: &str, colour: Colour, style: Style) -> String {
    let code = match colour {
        _ if !style.colour => return text.to_string(),
        Colour::Plain => return text.to_string(),
        Colour::Green => "32",
        Colour::Red => "31",
        Colour::Yellow => "33",
        Colour::Bold => "1",
    };
    // Trailing padding stays outside the colour (an underline or background
    // would otherwise run past the word).
    let trimmed = text.trim_end_matches(' ');
    format!("\x1b[{code}m{trimmed}\x1b[0m{}", &text[trimmed.len()..])
}

/// The human output: a summary line, then one line per service, then the
/// registry's and the configuration's errors.
fn render(st: &Snapshot, now: SystemTime, style: Style) -> Vec<String> {
    let mut lines = vec![summary(st, style)];
    if !st.services.is_empty() {
        let header = ["ID", "HEALTH", "SINCE", "CHECK", "REGISTRY", "LAST ERROR"].map(|h| Cell::new(h, Colour::Bold));
        let rows: Vec<[Cell; 6]> = st.services.iter().map(|s| row(s, now)).collect();
        let mut widths = [0; 5];
        for r in std::iter::once(&header).chain(&rows) {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.width());
            }
        }
        let used: usize = widths.iter().map(|w| w + 2).sum();
        let error_width = style.width.saturating_sub(used).max(MIN_ERROR_WIDTH);
        for r in std::iter::once(header).chain(rows) {
            let [a, b, c, d, e, last] = r;
            let mut line = String::new();
            for (cell, w) in [a, b, c, d, e].iter().zip(widths) {
                line.push_str(&cell.show(Some(w), style));
                line.push_str("  ");
            }
            let last = Cell::new(shorten(&last.text, error_width), last.colour);
            line.push_str(&last.show(None, style));
            lines.push(line);
        }
    }
    if let Some(e) = &st.backend.last_error {
        lines.push(format!("{} {e}", paint("registry error:", Colour::Red, style)));
    }
    for e in &st.config_errors {
        lines.push(format!("{} {e}", paint("config error:", Colour::Red, style)));
    }
    lines
}

fn summary(st: &Snapshot, style: Style) -> String {
    let b = &st.backend;
    let (mut passing, mut warning, mut critical, mut flapping, mut unknown) = (0, 0, 0, 0, 0);
    for s in &st.services {
        match s.health.as_str() {
            _ if s.flapping.is_some() => flapping += 1,
            "passing" => passing += 1,
            "warning" => warning += 1,
            "critical" => critical += 1,
            _ => unknown += 1,
        }
    }
    let count = |n: usize, what: &str, colour: Colour| {
        let text = format!("{n} {what}");
        if n > 0 {
            paint(&text, colour, style)
        } else {
            text
        }
    };
    format!(
        "tether {} on node {}{} — {} {} {}, {} — {} service{}: {}, {}{}, {}, {}",
        st.version,
        st.node,
        st.instance.as_deref().map(|i| format!(" (instance {i})")).unwrap_or_default(),
        b.kind.to_lowercase(),
        b.endpoint,
        if b.connected { paint("connected", Colour::Green, style) } else { paint("NOT connected", Colour::Red, style) },
        if st.ready { "ready".to_string() } else { paint("not ready yet", Colour::Yellow, style) },
        st.services.len(),
        if st.services.len() == 1 { "" } else { "s" },
        count(passing, "passing", Colour::Green),
        // Shown only where some service is a warning (not_serving = "warning").
        if warning > 0 { format!("{}, ", count(warning, "warning", Colour::Yellow)) } else { String::new() },
        count(critical, "critical", Colour::Red),
        count(flapping, "flapping", Colour::Yellow),
        count(unknown, "unknown", Colour::Plain),
    )
}

fn row(s: &ServiceStatus, now: SystemTime) -> [Cell; 6] {
    let health = match &s.flapping {
        Some(f) => match f.until.as_deref().and_then(|t| until(t, now)) {
            Some(left) => Cell::new(format!("flapping {}", age(left)), Colour::Yellow),
            None if f.until.is_none() => Cell::new("flapping (not SERVING)", Colour::Yellow),
            None => Cell::new("flapping", Colour::Yellow),
        },
        None => match s.health.as_str() {
            "passing" => Cell::new("passing", Colour::Green),
            "critical" => Cell::new("critical", Colour::Red),
            "warning" => Cell::new("warning", Colour::Yellow),
            other => Cell::plain(other),
        },
    };
    let since = s
        .since
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .map_or("-".to_string(), |t| age(now.duration_since(t).unwrap_or_default()));
    let check = s.last_check_ms.map_or("-".to_string(), latency);
    let next = s.next_attempt.as_deref().and_then(|t| until(t, now)).map(age);
    let registry = if s.drained {
        Cell::new("drained", Colour::Yellow)
    } else if s.last_error.is_some() {
        match s.error_class.as_deref() {
            Some("permanent") => Cell::new(next.map_or("refused".to_string(), |n| format!("refused (retry in {n})")), Colour::Red),
            _ => Cell::new(next.map_or("retrying".to_string(), |n| format!("retrying in {n}")), Colour::Yellow),
        }
    } else if s.registered {
        Cell::plain("registered")
    } else {
        Cell::plain("not registered")
    };
    // The registry's error if its last write failed, else why it is not passing.
    let error = match &s.last_error {
        Some(e) => e.clone(),
        None if s.health != "passing" && !s.output.is_empty() => s.output.clone(),
        None => "-".to_string(),
    };
    [Cell::plain(s.id.clone()), health, Cell::plain(since), Cell::plain(check), registry, Cell::plain(error)]
}

/// How long from `now` until the RFC 3339 time `t`, rounded up to whole
/// seconds (never "0s" while some is left); zero once past.
fn until(t: &str, now: SystemTime) -> Option<Duration> {
    let t = humantime::parse_rfc3339_weak(t).ok()?;
    let left = t.duration_since(now).unwrap_or_default();
    Some(Duration::from_secs(left.as_millis().div_ceil(1000) as u64))
}

/// A compact age: `12s`, `3m12s`, `2h05m`, `3d4h`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// A probe's round trip: `412µs`, `1.2ms`, `35ms`, `1.5s`.
fn latency(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0}µs", ms * 1000.0)
    } else if ms < 9.95 {
        format!("{ms:.1}ms")
    } else if ms < 999.5 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

/// `text` on one line (runs of whitespace made one space) and at most
/// `width` characters, cut with "…".
fn shorten(text: &str, width: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= width {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(width.saturating_sub(1)).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::status::{rfc3339, Flapping};

    const PLAIN: Style = Style { colour: false, width: 100 };

    fn service(id: &str, health: &str, output: &str) -> ServiceStatus {
        ServiceStatus::example(id, health, output)
    }

    /// Seven services, one of each kind of line, seen at `now`.
    fn status(now: SystemTime) -> Snapshot {
        let ago = |s: u64| Some(rfc3339(now - Duration::from_secs(s)));
        let ahead = |ms: u64| Some(rfc3339(now + Duration::from_millis(ms)));
        let mut st = Snapshot::new("n1", "Consul", "http://127.0.0.1:8500");
        st.ready = true;
        st.backend.connected = true;
        let mut orders = service("orders-1", "passing", "SERVING");
        orders.since = ago(192);
        orders.last_check_ms = Some(1.234);
        let mut billing = service("billing-1", "critical", "NOT_SERVING");
        billing.since = ago(12);
        billing.registered = true;
        billing.last_check_ms = Some(0.412);
        let mut cart = service("cart-1", "critical", "SERVING");
        cart.since = ago(2 * 3600 + 5 * 60 + 7);
        cart.registered = true;
        cart.last_check_ms = Some(35.2);
        cart.flapping =
            Some(Flapping { since: ago(40).unwrap(), transitions: 5, suppressed: 2, hold: "10s".to_string(), until: ahead(6_200) });
        let mut search = service("search-1", "critical", "connection refused");
        search.since = ago(3);
        search.flapping = Some(Flapping { since: ago(3).unwrap(), transitions: 6, suppressed: 0, hold: "20s".to_string(), until: None });
        let mut users = service("users-1", "passing", "SERVING");
        users.since = ago(3 * 86400 + 4 * 3600);
        users.last_check_ms = Some(1500.0);
        users.drained = true;
        let mut auth = service("auth-1", "passing", "SERVING");
        auth.since = ago(59);
        auth.registered = false;
        auth.last_error = Some(format!(
            "consul PUT /v1/agent/service/register: 403 Forbidden: Permission denied: token with AccessorID '{}' lacks permission 'service:write' on \"auth\"",
            "0e6a7cf4-8e0a-4d36-9d5b-1f7e0c2a9d11"
        ));
        auth.error_class = Some("permanent".to_string());
        auth.next_attempt = ahead(290_500);
        let mut cache = service("cache-1", "passing", "SERVING");
        cache.since = ago(1);
        cache.last_error = Some("consul: connection refused\n(retrying)".to_string());
        cache.error_class = Some("transient".to_string());
        cache.next_attempt = ahead(2_001);
        let waiting = service("new-1", "unknown", "waiting for the first gRPC health result");
        st.services = vec![orders, billing, cart, search, users, auth, cache, waiting];
        st
    }

    #[test]
    fn one_aligned_line_per_service_after_a_summary() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_000_000);
        let lines = render(&status(now), now, PLAIN);
        let want = [
            "tether 0.1.0 on node n1 — consul http://127.0.0.1:8500 connected, ready — 8 services: 4 passing, 1 critical, 2 flapping, 1 unknown",
            "ID         HEALTH                  SINCE  CHECK  REGISTRY                  LAST ERROR",
            "orders-1   passing                 3m12s  1.2ms  registered                -",
            "billing-1  critical                12s    412µs  registered                NOT_SERVING",
            "cart-1     flapping 7s             2h05m  35ms   registered                SERVING",
            "search-1   flapping (not SERVING)  3s     -      not registered            connection refused",
            "users-1    passing                 3d4h   1.5s   drained                   -",
            "auth-1     passing                 59s    -      refused (retry in 4m51s)  consul PUT /v1/agent/service/…",
            "cache-1    passing                 1s     -      retrying in 3s            consul: connection refused (r…",
            "new-1      unknown                 -      -      not registered            waiting for the first gRPC he…",
        ];
        assert_eq!(lines, want, "\n{}", lines.join("\n"));
    }

    /// A wide terminal shows errors whole; the other lines are unchanged.
    #[test]
    fn errors_are_cut_only_to_fit() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_000_000);
        let st = status(now);
        let narrow = render(&st, now, PLAIN);
        let wide = render(&st, now, Style { colour: false, width: 300 });
        assert!(wide[7].ends_with("lacks permission 'service:write' on \"auth\""), "{}", wide[7]);
        assert!(wide[8].ends_with("consul: connection refused (retrying)"), "{}", wide[8]);
        for (n, w) in narrow.iter().zip(&wide) {
            let cut = n.trim_end_matches('…');
            assert!(w.starts_with(cut), "{n}\n{w}");
        }
    }

    /// Colours wrap the padded words: without the escape codes the lines are
    /// exactly the uncoloured ones, so the columns stay aligned.
    #[test]
    fn colours_keep_the_alignment() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_000_000);
        let st = status(now);
        let coloured = render(&st, now, Style { colour: true, width: 100 });
        let strip = |l: &str| {
            let mut out = String::new();
            let mut rest = l;
            while let Some(i) = rest.find('\x1b') {
                out.push_str(&rest[..i]);
                rest = &rest[i + rest[i..].find('m').unwrap() + 1..];
            }
            out + rest
        };
        assert_eq!(coloured.iter().map(|l| strip(l)).collect::<Vec<_>>(), render(&st, now, PLAIN));
        assert!(coloured[2].contains("\x1b[32mpassing\x1b[0m "), "{:?}", coloured[2]);
        assert!(coloured[3].contains("\x1b[31mcritical\x1b[0m "), "{:?}", coloured[3]);
        assert!(coloured[4].contains("\x1b[33mflapping 7s\x1b[0m "), "{:?}", coloured[4]);
        assert!(coloured[6].contains("\x1b[33mdrained\x1b[0m "), "{:?}", coloured[6]);
        assert!(coloured[0].contains("\x1b[32mconnected\x1b[0m"), "{:?}", coloured[0]);
        assert!(render(&st, now, PLAIN).iter().all(|l| !l.contains('\x1b')));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        assert!(colour_wanted(true, None, os("xterm-256color")));
        assert!(colour_wanted(true, os(""), None));
        assert!(!colour_wanted(false, None, os("xterm")));
        assert!(!colour_wanted(true, os("1"), os("xterm")));
        assert!(!colour_wanted(true, None, os("dumb")));
    }

    #[test]
    fn summary_of_an_agent_in_trouble() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_000_000);
        let mut st = Snapshot::new("n2", "etcd", "http://127.0.0.1:2379");
        st.instance = Some("pod-a".to_string());
        st.backend.last_error = Some("etcd: connection refused".to_string());
        st.config_errors = vec!["/etc/tether/services.d/x.toml:2:8: port 70000 is out of range; use a port from 1 to 65535".to_string()];
        assert_eq!(
            render(&st, now, PLAIN),
            [
                "tether 0.1.0 on node n2 (instance pod-a) — etcd http://127.0.0.1:2379 NOT connected, not ready yet — 0 services: 0 passing, 0 critical, 0 flapping, 0 unknown",
                "registry error: etcd: connection refused",
                "config error: /etc/tether/services.d/x.toml:2:8: port 70000 is out of range; use a port from 1 to 65535",
            ]
        );
        st.services = vec![service("a", "passing", "SERVING")];
        assert!(render(&st, now, PLAIN)[0].ends_with("— 1 service: 1 passing, 0 critical, 0 flapping, 0 unknown"));
    }

    #[test]
    fn ages_latencies_and_cuts() {
        let ages = [0, 59, 60, 192, 3599, 3600, 86399, 86400 + 3600].map(|s| age(Duration::from_secs(s)));
        assert_eq!(ages, ["0s", "59s", "1m00s", "3m12s", "59m59s", "1h00m", "23h59m", "1d1h"]);
        let lat = [0.0004, 0.999, 1.0, 9.94, 9.96, 999.4, 999.6, 12_345.0].map(latency);
        assert_eq!(lat, ["0µs", "999µs", "1.0ms", "9.9ms", "10ms", "999ms", "1.0s", "12.3s"]);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_000_000);
        assert_eq!(until(&rfc3339(now + Duration::from_millis(1)), now), Some(Duration::from_secs(1)));
        assert_eq!(until(&rfc3339(now - Duration::from_secs(5)), now), Some(Duration::ZERO));
        assert_eq!(until("not a time", now), None);
        assert_eq!(shorten("a  b\n c", 10), "a b c");
        assert_eq!(shorten("abcdef ghij", 8), "abcdef…");
        assert_eq!(shorten("ééééé", 3), "éé…");
    }
}
