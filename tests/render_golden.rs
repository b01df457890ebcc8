//! Golden renders of the built-in templates from hand-built snapshots, and `nginx -t` on
//! the nginx output when the nginx binary is installed.
//!
//! `DROVER_BLESS=1 cargo test --test render_golden` rewrites the files under
//! `tests/fixtures/` from the current output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use drover::config::Target;
use drover::render::{BUILTIN, Error, Template};
use drover::state::{Network, Node, Service, Snapshot, Task};

const NGINX: &str = "/usr/sbin/nginx";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn task(service: &str, slot: i64, state: &str, desired: &str, ip: &str) -> Task {
    Task {
        id: format!("{service}-task-{slot}"),
        service_id: format!("{service}-id"),
        slot: Some(slot),
        node_id: "node-a".into(),
        state: state.into(),
        desired_state: desired.into(),
        container_id: Some(format!("{service}-c{slot}")),
        ips: [
            ("web".to_owned(), ip.to_owned()),
            ("ingress".to_owned(), format!("10.255.0.{slot}")),
        ]
        .into_iter()
        .collect(),
        ..Task::default()
    }
}

/// A service on the `web` network with one live task per IP.
fn service(name: &str, label_pairs: &[(&str, &str)], ips: &[&str]) -> Service {
    Service {
        id: format!("{name}-id"),
        name: name.into(),
        image: format!("127.0.0.1:5000/{name}:latest"),
        labels: labels(label_pairs),
        mode: "replicated".into(),
        replicas: Some(ips.len() as u64),
        networks: vec!["ingress".into(), "web".into()],
        tasks: ips
            .iter()
            .enumerate()
            .map(|(i, ip)| task(name, i as i64 + 1, "running", "running", ip))
            .collect(),
        ..Service::default()
    }
}

fn node(hostname: &str, address: &str) -> Node {
    Node {
        id: format!("{hostname}-id"),
        hostname: hostname.into(),
        role: "manager".into(),
        address: address.into(),
        availability: "active".into(),
        state: "ready".into(),
        ..Node::default()
    }
}

/// The home lab in miniature: every label, a shared host, a plain-http host, a service
/// scaled to zero, tasks on their way in and out, and labels trying to inject directives.
fn home_lab() -> Snapshot {
    let mut starting = service(
        "blog",
        &[
            ("routing-host", "blog.example.com"),
            ("routing-port", "2368"),
        ],
        &["10.0.1.2", "10.0.1.3"],
    );
    starting
        .tasks
        .push(task("blog", 3, "starting", "running", "10.0.1.4"));
    starting
        .tasks
        .push(task("blog", 4, "running", "shutdown", "10.0.1.5"));
    let mut snapshot = Snapshot {
        swarm: true,
        node_id: "node-a-id".into(),
        services: vec![
            starting,
            service(
                "api",
                &[
                    ("routing-host", "api.example.com"),
                    ("routing-context", "/v1"),
                    ("routing-internal-context", "/internal"),
                    ("routing-port", "8080"),
                    ("routing-auth", "api.htpasswd"),
                    ("routing-auth-realm", "API users"),
                    ("routing-max-body", "10m"),
                    ("routing-on-https", "true"),
                    ("prometheus-job", "api"),
                ],
                &["10.0.1.10", "10.0.1.11"],
            ),
            service(
                "api-v2",
                &[
                    ("routing-host", "api.example.com"),
                    ("routing-context", "v2"),
                    ("routing-port", "8080"),
                    ("prometheus-job", "api"),
                    ("prometheus-port", "9102"),
                ],
                &["10.0.1.20"],
            ),
            service(
                "portal",
                &[("routing-host", "www.example.com, Example.com")],
                &["10.0.1.30"],
            ),
            service(
                "plain",
                &[("routing-host", "plain.local"), ("routing-tls", "false")],
                &["10.0.1.40"],
            ),
            service(
                "zero",
                &[
                    ("routing-host", "zero.example.com"),
                    ("prometheus-job", "zero"),
                ],
                &[],
            ),
            service(
                "evil-host",
                &[("routing-host", "example.com; include /etc/passwd")],
                &["10.0.1.50"],
            ),
            service(
                "evil-context",
                &[
                    ("routing-host", "blog.example.com"),
                    ("routing-context", "/a;return 200"),
                ],
                &["10.0.1.51"],
            ),
            service(
                "evil-realm",
                &[
                    ("routing-host", "blog.example.com"),
                    ("routing-auth", "x"),
                    ("routing-auth-realm", "x}\nserver{"),
                ],
                &["10.0.1.52"],
            ),
            service(
                "database",
                &[("com.example.backup", "nightly")],
                &["10.0.1.60"],
            ),
        ],
        nodes: vec![
            node("pine64", "192.168.1.20"),
            node("rock64", "192.168.1.21"),
        ],
        networks: vec![
            Network {
                id: "ingress-id".into(),
                name: "ingress".into(),
                driver: "overlay".into(),
                scope: "swarm".into(),
                ingress: true,
            },
            Network {
                id: "web-id".into(),
                name: "web".into(),
                driver: "overlay".into(),
                scope: "swarm".into(),
                ingress: false,
            },
        ],
        ..Snapshot::default()
    };
    snapshot.sort();
    snapshot
}

fn target(template: &str) -> Target {
    Target {
        name: "test".into(),
        template: template.into(),
        output: PathBuf::from("/tmp/unused"),
        network: None,
        debounce: Default::default(),
        check: None,
        notify: Vec::new(),
        delivery: Default::default(),
    }
}

fn render_builtin(name: &str, snapshot: &Snapshot) -> drover::render::Rendered {
    let template = Template::load(&target(&format!("builtin:{name}"))).expect("built-in compiles");
    template.render(snapshot).expect("built-in renders")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn assert_golden(file: &str, actual: &str) {
    let path = fixtures().join(file);
    if std::env::var_os("DROVER_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(fixtures()).expect("create fixtures dir");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with DROVER_BLESS=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the render (DROVER_BLESS=1 rewrites it):\n--- render ---\n{actual}",
        path.display()
    );
}

#[test]
fn nginx_render_matches_the_golden_file() {
    let out = render_builtin("nginx", &home_lab());
    assert_golden("nginx.golden.conf", &out.text);
}

#[test]
fn prometheus_render_matches_the_golden_file_and_is_valid_yaml() {
    let out = render_builtin("prometheus", &home_lab());
    assert_golden("prometheus.golden.yml", &out.text);
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.text).expect("valid YAML");
    let jobs = yaml["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs list");
    let names: Vec<&str> = jobs.iter().filter_map(|j| j["job_name"].as_str()).collect();
    assert_eq!(names, ["api", "nodes", "zero"]);
}

#[test]
fn certbot_render_matches_the_golden_file() {
    let out = render_builtin("certbot", &home_lab());
    assert_golden("certbot.golden.txt", &out.text);
    assert!(
        !out.text.contains("plain.local"),
        "routing-tls=false hosts get no certificate"
    );
}

#[test]
fn ddclient_render_matches_the_golden_file() {
    let out = render_builtin("ddclient", &home_lab());
    assert_golden("ddclient.golden.conf", &out.text);
}

#[test]
fn services_with_injecting_labels_are_skipped_and_reported() {
    let out = render_builtin("nginx", &home_lab());
    let skipped: Vec<(&str, &str)> = out
        .skipped
        .iter()
        .map(|s| (s.service.as_str(), s.label.as_str()))
        .collect();
    assert_eq!(
        skipped,
        [
            ("evil-context", "routing-context"),
            ("evil-host", "routing-host"),
            ("evil-realm", "routing-auth-realm"),
        ]
    );
    for needle in ["/etc/passwd", "return 200", "server{", "evil"] {
        assert!(
            !out.text.contains(needle),
            "{needle:?} leaked into the config"
        );
    }
}

#[test]
fn the_same_snapshot_renders_the_same_bytes() {
    let snapshot = home_lab();
    for (name, _) in BUILTIN {
        let a = render_builtin(name, &snapshot);
        let b = render_builtin(name, &snapshot.clone());
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn only_live_tasks_on_the_routing_network_are_upstream_servers() {
    let out = render_builtin("nginx", &home_lab());
    assert!(out.text.contains("server 10.0.1.2:2368;"));
    assert!(out.text.contains("server 10.0.1.3:2368;"));
    assert!(
        !out.text.contains("10.0.1.4:"),
        "starting task is not routed"
    );
    assert!(
        !out.text.contains("10.0.1.5:"),
        "task being shut down is not routed"
    );
    assert!(
        !out.text.contains("10.255.0."),
        "ingress addresses are never used"
    );
}

#[test]
fn the_target_network_overrides_the_service_network() {
    let mut t = target("builtin:nginx");
    t.network = Some("ingress".into());
    let out = Template::load(&t)
        .expect("loads")
        .render(&home_lab())
        .expect("renders");
    assert!(out.text.contains("server 10.255.0.1:2368;"), "{}", out.text);
}

#[test]
fn a_routing_network_label_picks_the_network() {
    let mut snapshot = home_lab();
    let blog = snapshot
        .services
        .iter_mut()
        .find(|s| s.name == "blog")
        .expect("blog");
    blog.labels
        .insert("routing-network".into(), "ingress".into());
    let out = render_builtin("nginx", &snapshot);
    assert!(out.text.contains("server 10.255.0.1:2368;"), "{}", out.text);
}

#[test]
fn a_broken_user_template_names_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.tera");
    std::fs::write(&path, "ok line\nstill ok\n{% if %}\n").expect("write");
    let err = Template::load(&target(path.to_str().expect("utf-8 path"))).expect_err("broken");
    assert!(matches!(err, Error::Syntax { line: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{}:3:", path.display())), "{msg}");
}

#[test]
fn a_missing_user_template_is_a_read_error_naming_the_file() {
    let err = Template::load(&target("/nonexistent/drover.tera")).expect_err("missing");
    assert!(
        err.to_string().contains("/nonexistent/drover.tera"),
        "{err}"
    );
}

#[test]
fn a_runtime_template_error_is_an_err_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("runtime.tera");
    std::fs::write(
        &path,
        "{% for s in services %}{{ s.no_such_field }}{% endfor %}",
    )
    .expect("write");
    let template = Template::load(&target(path.to_str().expect("utf-8 path"))).expect("compiles");
    let err = template.render(&home_lab()).expect_err("undefined field");
    assert!(matches!(err, Error::Render { .. }), "{err:?}");
}

#[test]
fn a_user_template_can_use_the_filters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("user.tera");
    std::fs::write(
        &path,
        r#"{% for g in services | group_by_label(name="prometheus-job") %}{{ g.name }}:{% for s in g.items %} {{ s.tasks | running | task_ip(network="web") | join(sep=",") }}{% endfor %}
{% endfor %}{% for s in services | with_label(name="routing-tls", value="false") %}{{ s.name }}={{ s | label(name="routing-port", default="80") }}{% endfor %}"#,
    )
    .expect("write");
    let template = Template::load(&target(path.to_str().expect("utf-8 path"))).expect("compiles");
    let out = template.render(&home_lab()).expect("renders");
    assert_eq!(
        out.text,
        "api: 10.0.1.10,10.0.1.11 10.0.1.20\nzero: \nplain=80"
    );
}

// ---- nginx -t ----------------------------------------------------------------------------

/// Runs `nginx -t` on a main config that includes `rendered` inside `http {}`.
fn nginx_t(rendered: &str, cert_root: Option<&Path>) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    let mut conf = rendered.to_owned();
    if let Some(root) = cert_root {
        conf = conf.replace("/etc/letsencrypt/live/", &format!("{}/", root.display()));
    }
    let site = p.join("drover.conf");
    std::fs::write(&site, conf).expect("write site");
    let main = p.join("nginx.conf");
    let d = p.display();
    std::fs::write(
        &main,
        format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n    access_log off;\n    \
             client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    \
             fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    \
             scgi_temp_path {d}/scgi;\n    include {};\n}}\n",
            site.display()
        ),
    )
    .expect("write main");
    let out = Command::new(NGINX)
        .arg("-t")
        .arg("-p")
        .arg(p)
        .arg("-e")
        .arg(p.join("error.log"))
        .arg("-c")
        .arg(&main)
        .output()
        .expect("run nginx");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n--- config ---\n{rendered}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn have_nginx() -> bool {
    let found = Path::new(NGINX).exists();
    if !found {
        eprintln!("skipping: {NGINX} not installed");
    }
    found
}

/// Every host plain-http, as in the end-to-end tests where nginx has no certificates.
fn without_tls(mut snapshot: Snapshot) -> Snapshot {
    for s in &mut snapshot.services {
        s.labels.insert("routing-tls".into(), "false".into());
    }
    snapshot
}

#[test]
fn plain_http_config_passes_nginx_t() {
    if !have_nginx() {
        return;
    }
    let out = render_builtin("nginx", &without_tls(home_lab()));
    assert!(!out.text.contains("listen 443"));
    nginx_t(&out.text, None).expect("nginx -t");
}

#[test]
fn scaled_to_zero_service_still_passes_nginx_t() {
    if !have_nginx() {
        return;
    }
    let mut snapshot = without_tls(home_lab());
    for s in &mut snapshot.services {
        s.tasks.clear();
        s.replicas = Some(0);
    }
    let out = render_builtin("nginx", &snapshot);
    assert!(out.text.contains("server 127.0.0.1:1 down;"));
    nginx_t(&out.text, None).expect("nginx -t");
}

#[test]
fn an_empty_cluster_still_passes_nginx_t() {
    if !have_nginx() {
        return;
    }
    let out = render_builtin("nginx", &Snapshot::default());
    nginx_t(&out.text, None).expect("nginx -t");
}

#[test]
fn tls_config_passes_nginx_t_with_certificates_in_place() {
    if !have_nginx() || Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipping: nginx or openssl missing");
        return;
    }
    let certs = tempfile::tempdir().expect("tempdir");
    let key = certs.path().join("privkey.pem");
    let cert = certs.path().join("fullchain.pem");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=drover-test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let out = render_builtin("nginx", &home_lab());
    for host in [
        "api.example.com",
        "blog.example.com",
        "example.com",
        "www.example.com",
        "zero.example.com",
    ] {
        let dir = certs.path().join(host);
        std::fs::create_dir_all(&dir).expect("cert dir");
        std::fs::copy(&key, dir.join("privkey.pem")).expect("copy key");
        std::fs::copy(&cert, dir.join("fullchain.pem")).expect("copy cert");
    }
    assert!(out.text.contains("listen 443 ssl;"));
    nginx_t(&out.text, Some(certs.path())).expect("nginx -t");
}
