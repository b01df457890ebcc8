//! The Grafana dashboard shipped under deploy/grafana: every query names only series drover
//! registers (src/metrics.rs), and every query is PromQL that Prometheus' own `promtool`
//! accepts (as recording rules). A renamed metric fails here, not on an operator's screen.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const PROMTOOL: &str = "/usr/bin/promtool";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `expr` in the dashboard's panels.
fn queries() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/drover.json")).expect("read");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= panels.len(), "a panel without a query");
    exprs
}

/// The metric names drover registers: the `"drover_..."` literals of src/metrics.rs.
fn registered() -> BTreeSet<String> {
    let source = std::fs::read_to_string(repo().join("src/metrics.rs")).expect("read");
    let re = regex::Regex::new(r#""(drover_[a-z_]+)""#).expect("regex");
    re.captures_iter(&source).map(|c| c[1].to_owned()).collect()
}

#[test]
fn every_series_the_dashboard_queries_is_one_drover_registers() {
    let known = registered();
    assert!(known.len() > 20, "found only {known:?}");
    let name = regex::Regex::new(r"drover_[a-z_]+").expect("regex");
    let mut used = BTreeSet::new();
    for expr in queries() {
        for m in name.find_iter(&expr) {
            let series = m.as_str();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| series.strip_suffix(s))
                .filter(|b| known.contains(*b))
                .unwrap_or(series);
            assert!(
                known.contains(base),
                "the dashboard queries {series}, which drover does not register: {expr}"
            );
            used.insert(base.to_owned());
        }
    }
    assert!(used.len() >= 20, "the dashboard shows only {used:?}");
}

#[test]
fn every_dashboard_query_is_promql_promtool_accepts() {
    if !Path::new(PROMTOOL).exists() {
        assert!(
            std::env::var_os("DROVER_E2E").is_none() && std::env::var_os("CI").is_none(),
            "{PROMTOOL} is not installed (scripts/test installs Debian's prometheus)"
        );
        eprintln!("skipping: {PROMTOOL} not installed");
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in queries().iter().enumerate() {
        let quoted = serde_json::to_string(expr).expect("quote");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.yml");
    std::fs::write(&file, &rules).expect("write");
    let out = Command::new(PROMTOOL)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool refused a dashboard query: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
