//! Label validation and the built-in nginx template: any label value on any label is either
//! refused (the service is skipped, its value shown quoted and bounded) or renders a file
//! whose structure it cannot change: braces balance, every directive line ends in `;`,
//! `{` or `}`, and the service adds exactly its own server and upstream blocks.
//!
//! Shared by the cargo-fuzz target (fuzz/fuzz_targets/) and the smoke run in
//! tests/fuzz_smoke.rs, so both exercise one body.

use std::sync::LazyLock;

use drover::config::Target;
use drover::render::{INTERPRETED_LABELS, Template};
use drover::state::{Network, Service, Snapshot, Task};

static NGINX: LazyLock<Template> = LazyLock::new(|| {
    Template::load(&Target::new("fuzz", "builtin:nginx", "/dev/null"))
        .expect("the built-in template compiles")
});

pub fn run(data: &[u8]) {
    // Layout: [label index][value]; the rest of the service is valid.
    let Some((&which, value)) = data.split_first() else {
        return;
    };
    let Ok(value) = std::str::from_utf8(value) else {
        return;
    };
    let label = INTERPRETED_LABELS[usize::from(which) % INTERPRETED_LABELS.len()];
    let mut service = Service {
        id: "fuzz-id".into(),
        name: "fuzz".into(),
        labels: [
            ("routing-host".to_owned(), "fuzz.example.com".to_owned()),
            ("routing-tls".to_owned(), "false".to_owned()),
        ]
        .into_iter()
        .collect(),
        networks: vec!["web".into()],
        tasks: vec![Task::running(
            "t1",
            "fuzz-id",
            [("web".to_owned(), "10.0.0.2".to_owned())].into(),
        )],
        ..Service::default()
    };
    service.labels.insert(label.to_owned(), value.to_owned());
    let snapshot = Snapshot {
        swarm: true,
        services: vec![service],
        networks: vec![Network {
            id: "web-id".into(),
            name: "web".into(),
            driver: "overlay".into(),
            scope: "swarm".into(),
            ingress: false,
            agents: false,
        }],
        ..Snapshot::default()
    };
    let rendered = NGINX
        .render(&snapshot)
        .expect("the built-in template renders");
    if let Some(skip) = rendered.skipped.first() {
        assert!(!skip.reason.is_empty());
        // 64 characters are kept, each escaped to at most 10 (`\u{10ffff}`), plus quotes
        // and the `... (N bytes)` suffix. (The smoke run found the first bound of 200 too
        // tight for control characters: corpus entry routing-max-body-controls.)
        assert!(
            skip.value.len() <= 64 * 10 + 32 && !skip.value.contains('\n'),
            "{:?}",
            skip.value
        );
        assert!(
            !rendered.text.contains("fuzz."),
            "a skipped service was rendered"
        );
        return;
    }
    let mut depth: i64 = 0;
    for line in rendered.text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        depth += line.matches('{').count() as i64 - line.matches('}').count() as i64;
        assert!(depth >= 0, "a brace closed too early: {line:?}");
        assert!(
            line.ends_with(';') || line.ends_with('{') || line == "}",
            "a directive line was split or extended: {line:?}"
        );
        assert!(
            !line.contains('#'),
            "a comment inside a directive: {line:?}"
        );
    }
    assert_eq!(depth, 0, "braces do not balance");
}
