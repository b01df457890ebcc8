//! Registry polling end to end: drover as a process on the real Swarm, asking the real
//! registry on 127.0.0.1:5000 (no webhook anywhere). A new image pushed under a polled tag
//! rolls the polled services to its digest through a `registry-poll` job; an unchanged
//! tag costs one manifest `HEAD` per image reference per period (counted in the
//! registry's own access log, by drover's user agent) and queues nothing; a service
//! pinned to a platform manifest of a multi-platform index is not taken for outdated; a
//! service of a stack drover deploys from git is left alone unless its own label opts in.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// The registry's access log (`scripts/test` starts it with its output there).
fn registry_log() -> String {
    let state =
        std::env::var("DROVER_TEST_STATE").unwrap_or_else(|_| "/tmp/drover-test-state".into());
    std::fs::read_to_string(format!("{state}/registry.log")).unwrap_or_default()
}

/// drover's requests in the registry's log for `path` (`/v2/REPO/manifests/REF`), by method.
fn drover_requests(log: &str, method: &str, path: &str) -> usize {
    let request = format!("\"{method} {path} HTTP/1.1\"");
    log.lines()
        .filter(|l| l.contains(&request) && l.contains("\"drover/"))
        .count()
}

/// The digest part of `repo@sha256:…`.
fn digest(pushed: &str) -> String {
    pushed
        .split_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_default()
}

fn spec_image(service: &str) -> String {
    docker(&[
        "service",
        "inspect",
        "--format",
        "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
        service,
    ])
    .unwrap_or_default()
}

fn poll_jobs(drover: &DroverProcess) -> Vec<Value> {
    let body = drover.get("/jobs").map(|r| r.body).unwrap_or_default();
    let jobs: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    jobs["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["hook"] == "registry-poll")
        .cloned()
        .collect()
}

/// Checks of `image` (`registry/repo:tag`) that found its tag unchanged, from drover's log.
fn unchanged(drover: &DroverProcess, image: &str) -> usize {
    let field = format!("image={image} ");
    drover
        .logs()
        .lines()
        .filter(|l| l.contains("image unchanged") && l.contains(&field))
        .count()
}

/// `drover_registry_checks_total` of the test registry for `outcome` (each test's drover
/// polls only its own repository: `poll.images`).
fn checks(drover: &DroverProcess, outcome: &str) -> f64 {
    Metrics::parse(&drover.metrics())
        .map(|m| {
            m.get(
                "drover_registry_checks_total",
                &[("registry", "127.0.0.1:5000"), ("outcome", outcome)],
            )
            .unwrap_or(0.0)
        })
        .unwrap_or(0.0)
}

fn start_drover(poll: &str, stacks: &str) -> Result<DroverProcess> {
    let http = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "http: {{ listen: {http} }}\nresync: 5s\njobs: {{ update_timeout: 120s }}\npoll: {poll}\n{stacks}"
    );
    let mut drover = DroverProcess::start(&config, Some(&http))?;
    drover.wait_http_ok("/healthz", Duration::from_secs(15))?;
    Ok(drover)
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_push_to_a_polled_tag_rolls_its_labelled_service_and_an_unchanged_tag_costs_one_head_per_period()
-> Result<()> {
    require_e2e!();
    let name = unique("poll");
    let repo = format!("drover-e2e/{name}");
    let image = format!("127.0.0.1:5000/{repo}:latest");
    let v1 = digest(&build_push(&image, "v1", "")?);
    let polled = ServiceBuilder::new(&format!("{name}-polled"), &image)
        .args(["sleep", "3600"])
        .label("drover.poll", "10s")
        .update_config(1, "0s", "pause", "1s")
        .create()?;
    // Same image, no label: polling never rolls it (only a webhook would).
    let unlabelled = ServiceBuilder::new(&format!("{name}-plain"), &image)
        .args(["sleep", "3600"])
        .create()?;
    wait_running(polled.name(), 1, Duration::from_secs(60))?;
    assert!(
        spec_image(polled.name()).ends_with(&v1),
        "the CLI pins the digest"
    );

    // Read before drover starts: its first check follows at once.
    let manifests = format!("/v2/{repo}/manifests/latest");
    let heads_before = drover_requests(&registry_log(), "HEAD", &manifests);
    // Tests share the Swarm: this drover polls this test's repository only.
    let drover = start_drover(
        &format!(
            r"{{ budget: {{ requests: 100, per: 100s }}, images: '127\.0\.0\.1:5000/{repo}:.*' }}"
        ),
        "",
    )?;
    // Three checks of an unchanged tag: one HEAD each, no GET, no job.
    wait_for("three unchanged checks", Duration::from_secs(60), || {
        unchanged(&drover, &image) >= 3
    })?;
    // The registry writes its access log line after its answer: a HEAD may be read back
    // late, never early. Between two checks (10 s apart) the counts agree.
    let (mut checked, mut heads) = (0, 0);
    let agreed = wait_until(Duration::from_secs(8), Duration::from_millis(200), || {
        checked = unchanged(&drover, &image);
        heads = drover_requests(&registry_log(), "HEAD", &manifests) - heads_before;
        heads == checked
    });
    assert!(agreed, "{heads} HEADs for {checked} checks");
    let log = registry_log();
    assert_eq!(drover_requests(&log, "GET", &manifests), 0, "no GET");
    assert!(
        poll_jobs(&drover).is_empty(),
        "an unchanged tag queues nothing"
    );

    // A new image under the same tag: no webhook, the poll finds it.
    let v2 = digest(&build_push(&image, "v2", "")?);
    assert_ne!(v1, v2);
    wait_for(
        "the polled service pinned to the new digest",
        Duration::from_secs(60),
        || spec_image(polled.name()).ends_with(&v2),
    )?;
    let mut job = Value::Null;
    wait_for("the poll's job completed", Duration::from_secs(120), || {
        job = poll_jobs(&drover).into_iter().next().unwrap_or(Value::Null);
        job["state"] == "completed"
    })?;
    assert_eq!(job["action"], "update-services");
    assert_eq!(job["digest"], v2.as_str());
    assert_eq!(job["only"], serde_json::json!([polled.name()]));
    assert_eq!(job["facts"]["event"], "poll");
    assert_eq!(job["services"][0]["outcome"], "completed", "{job}");
    assert!(
        spec_image(unlabelled.name()).ends_with(&v1),
        "the unlabelled service is not polled"
    );

    // Once on the new digest, further checks find nothing to do.
    let changed = checks(&drover, "changed");
    assert_eq!(changed, 1.0);
    let before = unchanged(&drover, &image);
    wait_for("two more unchanged checks", Duration::from_secs(60), || {
        unchanged(&drover, &image) >= before + 2
    })?;
    assert_eq!(poll_jobs(&drover).len(), 1, "one job for one push");
    let page = drover.get("/").map(|r| r.body).unwrap_or_default();
    assert!(
        page.contains(&format!(r#"data-image="{image}""#)),
        "the status page lists the polled image"
    );
    Ok(())
}

/// Pushes an OCI index listing `platform` (a manifest already in `repo`) under `tag`;
/// returns the index's digest.
fn push_index(repo: &str, platform: &str, tag: &str) -> Result<String> {
    let base = format!("http://127.0.0.1:5000/v2/{repo}/manifests");
    let get = std::process::Command::new("curl")
        .args(["-fsS", "-H"])
        .arg("Accept: application/vnd.docker.distribution.manifest.v2+json")
        .arg(format!("{base}/{platform}"))
        .output()?;
    ensure!(get.status.success(), "curl GET manifest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "digest": platform,
            "size": get.stdout.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    })
    .to_string();
    let put = std::process::Command::new("curl")
        .args(["-fsS", "-D", "-", "-o", "/dev/null", "-X", "PUT", "-H"])
        .arg("Content-Type: application/vnd.oci.image.index.v1+json")
        .arg("--data-binary")
        .arg(&index)
        .arg(format!("{base}/{tag}"))
        .output()?;
    ensure!(
        put.status.success(),
        "curl PUT index: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let headers = String::from_utf8_lossy(&put.stdout).to_lowercase();
    headers
        .lines()
        .find_map(|l| l.strip_prefix("docker-content-digest:"))
        .map(|d| d.trim().to_owned())
        .context("no digest for the pushed index")
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn poll_all_spares_git_stacks_unless_labelled_and_a_platform_manifest_of_the_index_is_current()
-> Result<()> {
    require_e2e!();
    let name = unique("pollall");
    let repo = format!("drover-e2e/{name}");
    let image = format!("127.0.0.1:5000/{repo}:latest");
    let v1 = digest(&build_push(&image, "v1", "")?);
    let stack = unique("gitstack").replace('-', "_");
    let create = |suffix: &str, labels: &[(&str, &str)], image: &str| {
        let mut b = ServiceBuilder::new(&format!("{name}-{suffix}"), image)
            .args(["sleep", "3600"])
            .update_config(1, "0s", "pause", "1s");
        for (k, v) in labels {
            b = b.label(k, v);
        }
        b.create()
    };
    let plain = create("plain", &[], &image)?;
    let in_git = create(
        "git",
        &[("com.docker.stack.namespace", stack.as_str())],
        &image,
    )?;
    let git_opted_in = create(
        "gitpoll",
        &[
            ("com.docker.stack.namespace", stack.as_str()),
            ("drover.poll", "true"),
        ],
        &image,
    )?;
    let opted_out = create("off", &[("drover.poll", "false")], &image)?;
    // A multi-platform index whose one platform manifest is v1; a service pinned to that
    // platform manifest under the index's tag.
    let index_tag = "multi";
    let index = push_index(&repo, &v1, index_tag)?;
    let on_platform = ServiceBuilder::new(
        &format!("{name}-platform"),
        &format!("127.0.0.1:5000/{repo}:{index_tag}@{v1}"),
    )
    .args(["sleep", "3600"])
    .switch("--no-resolve-image")
    .create()?;
    for s in [&plain, &in_git, &git_opted_in, &opted_out, &on_platform] {
        wait_running(s.name(), 1, Duration::from_secs(60))?;
    }

    // Read before drover starts: its first check follows at once.
    let before = registry_log();
    let stacks =
        format!("stacks:\n  - name: {stack}\n    repository: http://127.0.0.1:1/nowhere.git\n");
    let drover = start_drover(
        &format!(
            r"{{ all: true, every: 10s, budget: {{ requests: 100, per: 100s }}, images: '127\.0\.0\.1:5000/{repo}:.*' }}"
        ),
        &stacks,
    )?;
    let index_image = format!("127.0.0.1:5000/{repo}:{index_tag}");
    let index_path = format!("/v2/{repo}/manifests/{index_tag}");
    let by_digest = format!("/v2/{repo}/manifests/{index}");
    let heads_before = drover_requests(&before, "HEAD", &index_path);
    // Two checks of each image: the index is fetched once (its platform list is
    // remembered while its digest stays), and the platform-pinned service is current.
    wait_for("two checks of each image", Duration::from_secs(60), || {
        unchanged(&drover, &image) >= 2 && unchanged(&drover, &index_image) >= 2
    })?;
    let log = registry_log();
    assert_eq!(
        drover_requests(&log, "GET", &by_digest) - drover_requests(&before, "GET", &by_digest),
        1,
        "the index is listed once"
    );
    assert!(drover_requests(&log, "HEAD", &index_path) - heads_before >= 2);
    assert!(poll_jobs(&drover).is_empty(), "{:?}", poll_jobs(&drover));

    let v2 = digest(&build_push(&image, "v2", "")?);
    wait_for(
        "the polled services pinned to the new digest",
        Duration::from_secs(60),
        || {
            spec_image(plain.name()).ends_with(&v2)
                && spec_image(git_opted_in.name()).ends_with(&v2)
        },
    )?;
    wait_for("the poll's job finished", Duration::from_secs(120), || {
        poll_jobs(&drover)
            .first()
            .is_some_and(|j| j["state"] == "completed")
    })?;
    let job = &poll_jobs(&drover)[0];
    let mut only: Vec<String> = serde_json::from_value(job["only"].clone())?;
    only.sort();
    assert_eq!(only, [git_opted_in.name(), plain.name()]);
    assert!(
        spec_image(in_git.name()).ends_with(&v1),
        "a git stack's service is its repository's"
    );
    assert!(
        spec_image(opted_out.name()).ends_with(&v1),
        "drover.poll=false"
    );
    assert!(
        spec_image(on_platform.name()).ends_with(&v1),
        "the platform service's tag did not move"
    );
    Ok(())
}
