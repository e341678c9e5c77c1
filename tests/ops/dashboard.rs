//! The pictures for the people who run tether (issue 23): the Grafana
//! dashboard (contrib/grafana/tether.json) and the Prometheus alert rules
//! (contrib/prometheus/tether.rules.yml) query only metrics a running tether
//! exports, the dashboard is keyed by `instance` and picks its data source
//! from a variable, and promtool accepts the rules and every dashboard query.

use crate::support::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Series Prometheus makes itself for every scrape target, not tether.
const PROMETHEUS_OWN: [&str; 1] = ["up"];

fn repo_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&repo_file("contrib/grafana/tether.json")).expect("contrib/grafana/tether.json is JSON")
}

/// Skips `s` from an opening bracket at `i` to after its match, honouring
/// quoted strings inside; returns the index after the closer.
fn skip_group(s: &[u8], mut i: usize) -> usize {
    let mut depth = 0;
    while i < s.len() {
        match s[i] {
            b'"' | b'\'' | b'`' => i = skip_string(s, i) - 1,
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// From an opening quote at `i` to after the closing one.
fn skip_string(s: &[u8], i: usize) -> usize {
    let quote = s[i];
    let mut j = i + 1;
    while j < s.len() && s[j] != quote {
        j += if s[j] == b'\\' && quote != b'`' { 2 } else { 1 };
    }
    j + 1
}

fn next_non_space(s: &[u8], mut i: usize) -> Option<u8> {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    s.get(i).copied()
}

/// The metric names a PromQL expression (possibly with Grafana's `$variables`)
/// selects: identifiers outside strings, label matchers `{…}`, ranges `[…]`
/// and grouping lists (`by (…)`, `on (…)`, …) that are neither functions (an
/// identifier before `(`), aggregation operators nor keywords.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
    ];
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let s = expr.as_bytes();
    let ident_start = |c: u8| c.is_ascii_alphabetic() || c == b'_' || c == b':';
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(s, i);
        } else if c == b'{' || c == b'[' {
            i = skip_group(s, i);
        } else if c == b'$' {
            // A Grafana variable: `$name` or `${name}`.
            i += 1;
            if s.get(i) == Some(&b'{') {
                i = skip_group(s, i);
            } else {
                while i < s.len() && ident(s[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == b'.' && s.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            // A number or a duration (0.99, 1e-3, 5m, 1h30m, 0x1f).
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'.' || s[i] == b'_') {
                i += 1;
            }
        } else if ident_start(c) {
            let start = i;
            while i < s.len() && ident(s[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let next = next_non_space(s, i);
            if LABEL_LISTS.contains(&word) {
                if next == Some(b'(') {
                    while s[i] != b'(' {
                        i += 1;
                    }
                    i = skip_group(s, i);
                }
            } else if next != Some(b'(') && !NOT_METRICS.contains(&word) {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression of the dashboard, with where it is: the panels'
/// targets (rows' nested panels too) and the query variables (for Grafana's
/// `label_values(selector, label)`, the selector).
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {t}"));
                out.push((format!("panel {title:?} target {}", t["refId"]), expr.to_string()));
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = vec![];
    panels(&d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_else(|| panic!("variable {}: no query", v["name"]));
        let selector = match q.trim().strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
            // The last comma separates the label; the selector may hold commas of its own.
            Some(args) => args.rsplit_once(',').map_or(args, |(sel, _)| sel).to_string(),
            None => q.to_string(),
        };
        out.push((format!("variable {}", v["name"]), selector));
    }
    out
}

/// The `expr` of every rule in a Prometheus rules file, with its rule's name.
/// YAML is read for what this file uses: `expr:` as a plain or quoted scalar
/// on its line, or a block (`>-`, `|`) or plain scalar continued on more
/// indented lines. Each rule must yield exactly one expression (checked here,
/// and the number of rules against promtool's count).
fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out: Vec<(String, String)> = vec![];
    let mut rule: Option<String> = None;
    for (n, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:").or_else(|| t.strip_prefix("- record:")) {
            if let Some(prev) = rule.replace(name.trim().to_string()) {
                panic!("rule {prev} has no expr");
            }
            continue;
        }
        let Some(rest) = t.strip_prefix("expr:") else { continue };
        let name = rule.take().unwrap_or_else(|| panic!("line {}: an expr outside a rule", n + 1));
        let rest = rest.trim();
        let more: Vec<&str> = lines[n + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect();
        let expr = if rest.starts_with('>') || rest.starts_with('|') {
            more.join(" ")
        } else if let Some(q) = rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            q.replace("\\\"", "\"").replace("\\\\", "\\")
        } else if let Some(q) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
            q.replace("''", "'")
        } else {
            std::iter::once(rest).chain(more).collect::<Vec<_>>().join(" ")
        };
        assert!(!expr.trim().is_empty(), "rule {name}: empty expr");
        out.push((format!("rule {name}"), expr));
    }
    if let Some(name) = rule {
        panic!("rule {name} has no expr");
    }
    out
}

/// The sample names a /metrics page exports: every `# TYPE` declared family
/// (a counter as `_total`, a histogram as `_bucket`, `_sum`, `_count`) and
/// every sample line.
fn exported(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let (name, kind) = decl.split_once(' ').unwrap_or_else(|| panic!("a TYPE line without a type: {line}"));
            let suffixes: &[&str] = match kind.trim() {
                "counter" => &["_total", "_created"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

fn promtool() -> Option<PathBuf> {
    let private = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/promtool");
    if private.exists() {
        return Some(private);
    }
    Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()).then(|| PathBuf::from("promtool"))
}

/// The sum of the samples whose line starts with `prefix` (a name, or a name
/// and the start of its labels).
fn sum(page: &str, prefix: &str) -> f64 {
    page.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

fn http_get(url: &str) -> String {
    let r = reqwest::blocking::Client::new().get(url).timeout(Duration::from_secs(5)).send().unwrap();
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.text().unwrap()
}

#[test]
fn promql_metric_names_are_extracted() {
    let names = |e: &str| promql_metrics(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (instance, le) (rate(tether_check_duration_seconds_bucket{instance=~"$instance", service=~"a{b}"}[$__rate_interval])))"#
        ),
        ["tether_check_duration_seconds_bucket"]
    );
    assert_eq!(
        names("sum(rate(a_total[5m] offset 1h)) by (job) / on (job) group_left (version) b * 1e-3 > bool 0.5 unless c"),
        ["a_total", "b", "c"]
    );
    assert_eq!(names("time() - x{job='t\\'x'} > 60 and x > 0"), ["x"]);
    assert_eq!(names("absent(up{job=\"tether\"}) or vector(0)"), ["up"]);
    assert_eq!(names("topk(3, count_values(\"v\", m)) * ${factor} + $factor"), ["m"]);
    assert_eq!(
        rule_exprs("groups:\n  - rules:\n      - alert: A\n        expr: up == 0\n        for: 1m\n      - alert: B\n        expr: >-\n          a\n\n          + b\n        labels: {}\n      - record: c\n        expr: \"d{x=\\\"y\\\"}\"\n"),
        [("rule A".to_string(), "up == 0".to_string()), ("rule B".into(), "a + b".into()), ("rule c".into(), "d{x=\"y\"}".into())]
    );
}

#[test]
fn dashboard_picks_data_source_and_instance() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().expect("templating variables");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    let ds = var("datasource");
    assert_eq!((ds["type"].as_str(), ds["query"].as_str()), (Some("datasource"), Some("prometheus")), "{ds}");
    let instance = var("instance");
    assert_eq!(instance["type"], "query", "{instance}");
    assert_eq!(instance["multi"], true, "several agents at once: {instance}");
    assert!(d["id"].is_null(), "an importable dashboard has no id");

    let uses_variable = |v: &Value| v["uid"] == "${datasource}" && v["type"] == "prometheus";
    let mut panels = 0;
    let mut stack: Vec<&Value> = d["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        if p["type"] == "row" {
            continue;
        }
        panels += 1;
        let title = p["title"].as_str().unwrap_or("?");
        assert!(uses_variable(&p["datasource"]), "panel {title:?} must use the $datasource variable: {}", p["datasource"]);
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        for t in targets {
            assert!(uses_variable(&t["datasource"]), "panel {title:?}: a target must use $datasource: {t}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains(r#"instance=~"$instance""#), "panel {title:?}: every query is keyed by $instance: {expr}");
        }
    }
    assert!(panels >= 10, "only {panels} panels");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert!(uses_variable(&v["datasource"]), "variable {} must use $datasource", v["name"]);
    }
}

#[test]
fn dashboard_and_alerts_query_only_exported_metrics() {
    let mut consul = Consul::start();
    let mut server = HealthServer::start(0, &[]);
    let port = free_port();
    // Damping that a few flips set off (and a hold that outlasts the test), and
    // a write budget of one write a second.
    let damping = "[damping]\ntransitions = 3\nwindow = \"1m\"\nhold = \"1m\"\nwrites_per_minute = 60\nwrite_burst = 1\n";
    let setup = Setup::consul(&consul, damping);
    let config = std::fs::read_to_string(setup.config()).unwrap().replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::write(setup.config(), config).unwrap();
    setup.write_service("a.toml", &format!("name = \"alpha\"\nid = \"alpha\"\nport = {}\nttl = \"3s\"\n", server.port));
    let tether = setup.start();
    consul.wait_health("alpha", "passing", T);
    let url = format!("http://127.0.0.1:{port}/metrics");

    // prometheus-client leaves a labelled family out of /metrics until its
    // first series, so first make happen what the panels and alerts show.
    // A drain and an undrain: tether_service_drained.
    for cmd in ["drain", "undrain"] {
        let out = tether.cli(&[cmd, "alpha", "--wait"]);
        assert!(out.status.success(), "tether {cmd}: {out:?}");
    }
    // Flips, each seen by tether before the next: the third transition starts
    // a flap episode, later ones are suppressed, and writes wait for the budget.
    for (n, status) in ["not_serving", "serving", "not_serving", "serving", "not_serving", "serving"].into_iter().enumerate() {
        server.set(status);
        // The first result counted one transition (to passing).
        let want = n as f64 + 2.0;
        wait_for(T, &format!("transition {want} of alpha in /metrics"), || {
            (sum(&http_get(&url), "tether_service_transitions_total{service=\"alpha\"") >= want).then_some(())
        });
    }
    // The registry gone: heartbeats fail, tether_registry_errors_total.
    consul.stop();
    let page = wait_for(T, "registry errors, flapping and budget waits in /metrics", || {
        let page = http_get(&url);
        let all = [
            "tether_registry_errors_total{",
            "tether_flap_suppressed_total{",
            "tether_write_budget_waits_total{",
            "tether_service_drained{",
        ]
        .iter()
        .all(|family| page.contains(family));
        all.then_some(page)
    });
    assert!(page.lines().any(|l| l.starts_with("tether_heartbeat_last_timestamp_seconds ") && !l.ends_with(" 0.0")), "{page}");
    let exported = exported(&page);
    for process in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds"] {
        assert!(page.lines().any(|l| l.starts_with(&format!("{process} "))), "no {process} sample in /metrics:\n{page}");
    }

    let d = dashboard();
    let mut queries = dashboard_exprs(&d);
    queries.extend(rule_exprs(&repo_file("contrib/prometheus/tether.rules.yml")));
    assert!(queries.iter().any(|(w, _)| w.starts_with("rule ")) && queries.iter().any(|(w, _)| w.starts_with("panel ")));

    let mut missing = vec![];
    let mut queried = BTreeSet::new();
    for (place, expr) in &queries {
        let names = promql_metrics(expr);
        assert!(!names.is_empty(), "{place}: no metric found in {expr:?}");
        for name in names {
            queried.insert(name.clone());
            if exported.contains(&name) || PROMETHEUS_OWN.contains(&name.as_str()) {
                continue;
            }
            missing.push(format!("{name} (in {place}: {expr})"));
        }
    }
    assert!(missing.is_empty(), "queried but not exported by tether:\n  {}\n/metrics was:\n{page}", missing.join("\n  "));
    eprintln!("{} queries use {} metrics, all exported: {queried:?}", queries.len(), queried.len());
}

#[test]
fn alert_rules_and_dashboard_queries_pass_promtool() {
    let Some(promtool) = promtool() else {
        assert!(std::env::var_os("CI").is_none(), "promtool is missing in CI: scripts/install-deps.sh installs it into .tools/bin");
        eprintln!("SKIPPED: promtool is missing (neither .tools/bin/promtool nor on PATH); run scripts/install-deps.sh");
        return;
    };
    let check = |path: &std::path::Path| {
        let out = Command::new(&promtool).args(["check", "rules"]).arg(path).output().expect("run promtool");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool check rules {}:\n{text}", path.display());
        text
    };

    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus/tether.rules.yml");
    let text = check(&rules);
    let found = rule_exprs(&std::fs::read_to_string(&rules).unwrap()).len();
    assert!(text.contains(&format!("SUCCESS: {found} rules found")), "promtool and this test count the rules alike ({found}):\n{text}");
    let yaml = std::fs::read_to_string(&rules).unwrap();
    let alerts = yaml.matches("- alert:").count();
    assert_eq!(yaml.matches("description:").count(), alerts, "every alert says why it matters in a description");

    // The dashboard's queries, as recording rules: promtool parses each, once
    // Grafana's interval variables are given values (`$instance` sits in strings).
    let dir = tempfile::tempdir().unwrap();
    let mut recording = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let queries: Vec<(String, String)> =
        dashboard_exprs(&dashboard()).into_iter().filter(|(place, _)| place.starts_with("panel ")).collect();
    for (n, (_, expr)) in queries.iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h");
        recording += &format!("      - record: dashboard:query_{n}\n        expr: {}\n", serde_json::to_string(&expr).unwrap());
    }
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, recording).unwrap();
    let out = Command::new(&promtool).args(["check", "rules"]).arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let listed: Vec<String> = queries.iter().enumerate().map(|(n, (place, e))| format!("query_{n}: {place}: {e}")).collect();
        panic!("promtool rejects a dashboard query:\n{text}\n{}", listed.join("\n"));
    }
}
