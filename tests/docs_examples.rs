//! The configuration examples operators copy must load: the README's example (the first
//! ```yaml block under its `## Configuration` heading) and the shipped `deploy/drover.yml`.
//!
//! Both go through drover's own loader, `Config::load` (what `drover run` and `drover
//! check` read a file with: YAML, unknown fields refused, every value validated), and
//! through `drover check` itself, which also compiles each target's template. So an
//! example that drifts from the code fails here, not at an operator's first start.
//!
//! No secret files are needed: the loader names them, it does not read them (`drover
//! run` reads them at start; `drover check` warns about unreadable ones unless
//! `--strict`, and the examples name Swarm secrets under /run/secrets).

use std::path::{Path, PathBuf};
use std::process::Command;

use drover::config::Config;

fn in_repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The README's config example and the line of README.md it starts on.
fn readme_example() -> (String, usize) {
    let readme = std::fs::read_to_string(in_repo("README.md")).expect("README.md is readable");
    let heading = readme
        .find("\n## Configuration\n")
        .expect("README.md has a `## Configuration` heading");
    let section = &readme[heading + 1..];
    // The example belongs to this section: stop at the next heading of the same level.
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    let fence = "```yaml\n";
    let start = section
        .find(fence)
        .expect("a ```yaml block under README.md's `## Configuration` heading")
        + fence.len();
    let len = section[start..]
        .find("\n```")
        .expect("the README's ```yaml block is closed")
        + 1;
    let offset = heading + 1 + start;
    let line = readme[..offset].lines().count() + 1;
    (section[start..start + len].to_owned(), line)
}

/// Writes the README's example to a temporary file, as an operator would save it.
fn readme_example_file(dir: &Path) -> (PathBuf, usize) {
    let (example, line) = readme_example();
    let path = dir.join("drover.yml");
    std::fs::write(&path, example).expect("write the example");
    (path, line)
}

/// `drover check --config PATH`, with no environment that would change what it reads.
fn drover_check(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["check", "--config"])
        .arg(path)
        .env_remove("DROVER_CONFIG")
        .env_remove("DROVER_LISTEN")
        .env_remove("DROVER_OPS_LISTEN")
        .env_remove("DROVER_JOURNAL")
        .output()
        .expect("run drover check")
}

#[test]
fn the_readme_config_example_loads_with_drovers_own_loader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, line) = readme_example_file(dir.path());
    let config = Config::load(&path).unwrap_or_else(|e| {
        panic!("README.md's config example (from line {line}) is refused: {e}")
    });
    assert!(
        !config.targets.is_empty() && !config.hooks.is_empty(),
        "README.md's config example should show a target and a hook"
    );
}

#[test]
fn the_shipped_deploy_drover_yml_loads_with_drovers_own_loader() {
    let path = in_repo("deploy/drover.yml");
    let config =
        Config::load(&path).unwrap_or_else(|e| panic!("deploy/drover.yml is refused: {e}"));
    // stack.yml and the docs rely on these: nginx checked and signalled as `service: nginx`,
    // the operator endpoints on port 9091 where the stack's Prometheus scrapes them.
    assert!(config.targets.iter().any(|t| t.name == "nginx"));
    assert_eq!(config.http.ops.listen.port(), 9091);
}

#[test]
fn drover_check_accepts_the_readme_example_and_the_shipped_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (readme, line) = readme_example_file(dir.path());
    for (what, path) in [
        (
            format!("README.md's config example (from line {line})"),
            readme,
        ),
        ("deploy/drover.yml".to_owned(), in_repo("deploy/drover.yml")),
    ] {
        let out = drover_check(&path);
        assert!(
            out.status.success(),
            "drover check refuses {what}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
