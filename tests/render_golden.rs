//! Golden renders of the built-in templates from hand-built snapshots, and `nginx -t` on
//! the nginx output when the nginx binary is installed.
//!
//! `DROVER_BLESS=1 cargo test --test render_golden` rewrites the files under
//! `tests/fixtures/` from the current output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use drover::config::{Action, ExecSpec, HostPattern, Owner, OwnerList, Owners, Target};
use drover::render::{BUILTIN, Error, Template};
use drover::state::{Network, Node, STACK_LABEL, Service, Snapshot, Task};

const NGINX: &str = "/usr/sbin/nginx";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn task(service: &str, slot: i64, state: &str, desired: &str, ips: &[(&str, String)]) -> Task {
    Task {
        id: format!("{service}-task-{slot}"),
        service_id: format!("{service}-id"),
        slot: Some(slot),
        node_id: "node-a".into(),
        state: state.into(),
        desired_state: desired.into(),
        container_id: Some(format!("{service}-c{slot}")),
        ips: ips
            .iter()
            .map(|(n, ip)| ((*n).to_owned(), ip.clone()))
            .chain([("ingress".to_owned(), format!("10.255.0.{slot}"))])
            .collect(),
        ..Task::default()
    }
}

/// The home lab's web network (`home-web`, external to every stack).
const WEB: &str = "home-web";
const MONITORING: &str = "home-monitoring";

/// A service on `networks` (plus ingress) with one live task per IP; task `i` has address
/// `IP` on the first network and `IP` with its second octet raised by `n` on the `n`-th.
fn service_on(
    name: &str,
    label_pairs: &[(&str, &str)],
    networks: &[&str],
    ips: &[&str],
) -> Service {
    let on_each = |ip: &str| -> Vec<(&str, String)> {
        networks
            .iter()
            .enumerate()
            .map(|(n, net)| {
                let mut octets: Vec<u32> = ip.split('.').filter_map(|o| o.parse().ok()).collect();
                octets[1] += n as u32;
                let addr = octets
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(".");
                (*net, addr)
            })
            .collect()
    };
    // `docker stack deploy` names a service STACK_NAME and labels it with its stack.
    let mut labels = labels(label_pairs);
    if let Some((stack, _)) = name.split_once('_') {
        labels.insert(STACK_LABEL.to_owned(), stack.to_owned());
    }
    Service {
        id: format!("{name}-id"),
        name: name.into(),
        image: format!("127.0.0.1:5000/{name}:latest"),
        labels,
        mode: drover::state::ServiceMode::Replicated,
        replicas: Some(ips.len() as u64),
        networks: std::iter::once("ingress")
            .chain(networks.iter().copied())
            .map(str::to_owned)
            .collect(),
        tasks: ips
            .iter()
            .enumerate()
            .map(|(i, ip)| task(name, i as i64 + 1, "running", "running", &on_each(ip)))
            .collect(),
        ..Service::default()
    }
}

/// A service on the home lab's web network only.
fn service(name: &str, label_pairs: &[(&str, &str)], ips: &[&str]) -> Service {
    service_on(name, label_pairs, &[WEB], ips)
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

fn network(name: &str, ingress: bool) -> Network {
    Network {
        id: format!("{name}-id"),
        name: name.into(),
        driver: "overlay".into(),
        scope: "swarm".into(),
        ingress,
        agents: false,
    }
}

/// The home lab's real label sets: the `web` stack of rycus86/home-stack-web (`stack.yml`),
/// the `receiver` of rycus86/home-stack-webhooks, Kibana and Grafana from the blog series
/// ("Monitoring madness"), and the private registry the blog describes with
/// `routing-on-https`. Stack names prefix the services as `docker stack deploy` does. Then
/// what the real stacks do not show: a backend path (`routing-internal-context`), a realm
/// left to default, drover's extensions (`routing-tls=false`, `routing-private-context`),
/// a service scaled to zero, tasks on their way in and out, and labels trying to inject
/// directives.
fn home_lab() -> Snapshot {
    let mut ghost = service(
        "web_ghost",
        &[
            ("routing-host", "blog.viktoradam.net"),
            ("routing-port", "2368"),
            ("routing-max-body", "10m"),
        ],
        &["10.0.1.2", "10.0.1.3"],
    );
    ghost.tasks.push(task(
        "web_ghost",
        3,
        "starting",
        "running",
        &[(WEB, "10.0.1.4".into())],
    ));
    ghost.tasks.push(task(
        "web_ghost",
        4,
        "running",
        "shutdown",
        &[(WEB, "10.0.1.5".into())],
    ));
    let flask = |host: &str, context: Option<&str>, job: &str| {
        let mut l = vec![
            ("routing-host", host.to_owned()),
            ("routing-port", "5000".to_owned()),
            ("prometheus-job", job.to_owned()),
            ("prometheus-port", "5000".to_owned()),
        ];
        if let Some(c) = context {
            l.push(("routing-context", c.to_owned()));
        }
        l
    };
    let pairs = |l: &[(&'static str, String)]| -> Vec<(&'static str, String)> { l.to_vec() };
    let svc = |name: &str, l: Vec<(&'static str, String)>, nets: &[&str], ips: &[&str]| {
        let borrowed: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        service_on(name, &borrowed, nets, ips)
    };
    let mut nginx = service(
        "web_nginx",
        &[("routing-extra-hosts", "viktoradam.net")],
        &["10.0.1.100"],
    );
    nginx.ports = Vec::new();
    let mut snapshot = Snapshot {
        swarm: true,
        node_id: "node-a-id".into(),
        services: vec![
            nginx,
            ghost,
            svc(
                "web_demo-site",
                flask("demo.viktoradam.net", None, "demo-site"),
                &[WEB, MONITORING],
                &["10.0.1.10"],
            ),
            svc(
                "web_github-proxy",
                flask("api.viktoradam.net", Some("/github"), "github-proxy"),
                &[WEB, MONITORING],
                &["10.0.1.11"],
            ),
            svc(
                "web_dockerhub-proxy",
                flask("api.viktoradam.net", Some("/docker"), "dockerhub-proxy"),
                &[WEB, MONITORING],
                &["10.0.1.12"],
            ),
            svc(
                "web_redirect-server",
                flask("r.viktoradam.net", None, "redirect-server"),
                &[WEB, MONITORING],
                &["10.0.1.13"],
            ),
            svc(
                "web_redirect-server-www",
                flask("www.viktoradam.net", None, "redirect-server-www"),
                &[WEB, MONITORING],
                &["10.0.1.14"],
            ),
            // Its networks sort as home-monitoring, home-web, webhooks_default: only the
            // network nginx is on (home-web) reaches it.
            svc(
                "webhooks_receiver",
                pairs(&[
                    ("routing-host", "api.viktoradam.net".into()),
                    ("routing-context", "/webhook".into()),
                    ("routing-port", "6001".into()),
                    ("prometheus-job", "webhook-proxy".into()),
                    ("prometheus-port", "6001".into()),
                ]),
                &[WEB, MONITORING, "webhooks_default"],
                &["10.0.1.20"],
            ),
            service_on(
                "webhooks_updater",
                &[
                    ("prometheus-job", "webhook-updater"),
                    ("prometheus-port", "6002"),
                ],
                &["webhooks_default", MONITORING],
                &["10.0.9.2"],
            ),
            service(
                "logging_kibana",
                &[
                    ("routing-auth-realm", "Kibana Logs"),
                    ("routing-auth", "/etc/auth-config/kibana.auth.conf"),
                    ("routing-host", "logs.viktoradam.net"),
                    ("routing-port", "5601"),
                ],
                &["10.0.1.30"],
            ),
            service(
                "monitoring_grafana",
                &[
                    ("routing-host", "metrics.viktoradam.net"),
                    ("routing-port", "3000"),
                ],
                &["10.0.1.31"],
            ),
            service(
                "registry_registry",
                &[
                    ("routing-host", "registry.viktoradam.net"),
                    ("routing-port", "5000"),
                    ("routing-on-https", "true"),
                    ("routing-max-body", "0"),
                ],
                &["10.0.1.32"],
            ),
            // Not in the real stacks: the rest of the label vocabulary.
            service(
                "lab_backend",
                &[
                    ("routing-host", "api.viktoradam.net"),
                    ("routing-context", "/backend"),
                    ("routing-internal-context", "/api"),
                    ("routing-port", "8080"),
                    ("routing-auth", "team/admins"),
                    ("routing-private-context", "/metrics"),
                ],
                &["10.0.1.40", "10.0.1.41"],
            ),
            service(
                "lab_shop",
                &[
                    ("routing-host", "shop.viktoradam.net"),
                    ("routing-port", "80"),
                    ("routing-extra-hosts", "www.shop.viktoradam.net"),
                    ("routing-hsts", "true"),
                ],
                &["10.0.1.44"],
            ),
            service(
                "lab_plain",
                &[
                    ("routing-host", "plain.local"),
                    ("routing-port", "80"),
                    ("routing-tls", "false"),
                ],
                &["10.0.1.42"],
            ),
            service(
                "lab_no-port",
                &[("routing-host", "no-port.viktoradam.net")],
                &["10.0.1.43"],
            ),
            service(
                "lab_zero",
                &[
                    ("routing-host", "zero.viktoradam.net"),
                    ("routing-port", "80"),
                    ("prometheus-job", "zero"),
                ],
                &[],
            ),
            service(
                "evil-host",
                &[
                    ("routing-host", "example.com; include /etc/passwd"),
                    ("routing-port", "80"),
                ],
                &["10.0.1.50"],
            ),
            service(
                "evil-context",
                &[
                    ("routing-host", "blog.viktoradam.net"),
                    ("routing-port", "80"),
                    ("routing-context", "/a;return 200"),
                ],
                &["10.0.1.51"],
            ),
            service(
                "evil-realm",
                &[
                    ("routing-host", "blog.viktoradam.net"),
                    ("routing-port", "80"),
                    ("routing-auth", "x"),
                    ("routing-auth-realm", "x}\nserver{"),
                ],
                &["10.0.1.52"],
            ),
            service(
                "evil-auth",
                &[
                    ("routing-host", "blog.viktoradam.net"),
                    ("routing-port", "80"),
                    ("routing-auth", "/etc/x;deny all"),
                ],
                &["10.0.1.53"],
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
            network("ingress", true),
            network(WEB, false),
            network(MONITORING, false),
            network("webhooks_default", false),
        ],
        ..Snapshot::default()
    };
    snapshot.sort();
    snapshot
}

/// A target checked in the `nginx` service, as the shipped config has it: its networks are
/// the routing networks. The home lab routes `api.viktoradam.net` from three stacks, which
/// only its `owners` setting allows (the first claim would give it to one).
fn target(template: &str) -> Target {
    let shared = ["web", "webhooks", "lab"].map(|s| Owner::Stack(s.to_owned()));
    Target {
        check: Some(Action::Exec(ExecSpec {
            service: Some("nginx".into()),
            container: None,
            label: None,
            command: vec!["nginx".into(), "-t".into()],
        })),
        owners: Owners(
            [(
                HostPattern::Exact("api.viktoradam.net".into()),
                OwnerList(shared.to_vec()),
            )]
            .into(),
        ),
        ..Target::new("test", template, "/tmp/unused")
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
    assert_eq!(
        names,
        [
            "demo-site",
            "docker",
            "dockerhub-proxy",
            "github-proxy",
            "redirect-server",
            "redirect-server-www",
            "webhook-proxy",
            "webhook-updater",
        ]
    );
    promtool_check(&out.text);
}

/// The lab's `global` section from the target's `vars`, values quoted whatever they hold,
/// and Prometheus' own checker accepts the file.
#[test]
fn prometheus_vars_give_global_and_external_labels_that_promtool_accepts() {
    let mut t = target("builtin:prometheus");
    let vars = r#"{"scrape_interval": "30s", "external_labels": {"monitor": "home-stack", "site": "a \"quoted\": value"}}"#;
    t.vars = serde_json::from_str(vars).expect("vars");
    let out = Template::load(&t)
        .expect("built-in compiles")
        .render(&home_lab())
        .expect("renders");
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.text).expect("valid YAML");
    assert_eq!(yaml["global"]["scrape_interval"].as_str(), Some("30s"));
    assert_eq!(yaml["global"]["evaluation_interval"].as_str(), Some("15s"));
    assert_eq!(
        yaml["global"]["external_labels"]["monitor"].as_str(),
        Some("home-stack")
    );
    assert_eq!(
        yaml["global"]["external_labels"]["site"].as_str(),
        Some("a \"quoted\": value")
    );
    promtool_check(&out.text);
}

#[test]
fn prometheus_authorization_gives_a_job_its_bearer_file_and_leaves_the_others_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("ops-token");
    std::fs::write(&token, "secret").expect("write token");
    let mut t = target("builtin:prometheus");
    t.vars = [(
        "authorization".to_owned(),
        serde_json::json!({ "demo-site": token.display().to_string() }),
    )]
    .into();
    let out = Template::load(&t)
        .expect("built-in compiles")
        .render(&home_lab())
        .expect("renders");
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out.text).expect("valid YAML");
    let jobs = yaml["scrape_configs"].as_sequence().expect("jobs");
    for job in jobs {
        let auth = &job["authorization"];
        if job["job_name"].as_str() == Some("demo-site") {
            assert_eq!(auth["type"].as_str(), Some("Bearer"));
            assert_eq!(
                auth["credentials_file"].as_str(),
                Some(token.to_str().expect("utf-8"))
            );
        } else {
            assert!(auth.is_null(), "{:?}: {auth:?}", job["job_name"]);
        }
    }
    promtool_check(&out.text);
}

const PROMTOOL: &str = "/usr/bin/promtool";

/// `promtool check config` on `text`; skipped only outside the test command and CI.
fn promtool_check(text: &str) {
    if !Path::new(PROMTOOL).exists() {
        assert!(
            std::env::var_os("DROVER_E2E").is_none() && std::env::var_os("CI").is_none(),
            "{PROMTOOL} is not installed (scripts/test installs Debian's prometheus)"
        );
        eprintln!("skipping promtool: {PROMTOOL} not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, text).expect("write");
    let out = Command::new(PROMTOOL)
        .args(["check", "config"])
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check config refused the render: {}{}\n--- render ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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

/// The location block of `path` in the last server block of `host` (the TLS one when the
/// host has TLS).
fn location_block<'t>(conf: &'t str, host: &str, path: &str) -> &'t str {
    let marker = format!("# host {host}\n");
    let start = conf
        .find(&marker)
        .unwrap_or_else(|| panic!("no host {host}"));
    let section = &conf[start + marker.len()..];
    let section = &section[..section.find("# host ").unwrap_or(section.len())];
    let open = format!("location {path} {{");
    let at = section
        .rfind(&open)
        .unwrap_or_else(|| panic!("no location {path} in {host}:\n{section}"));
    let block = &section[at..];
    &block[..block.find("\n    }").map_or(block.len(), |e| e + 6)]
}

#[test]
fn a_routing_context_is_stripped_before_the_backend_as_in_the_home_lab() {
    let out = render_builtin("nginx", &home_lab());
    let webhook = location_block(&out.text, "api.viktoradam.net", "/webhook/");
    assert!(
        webhook.contains("proxy_pass http://api_viktoradam_net_webhook/;"),
        "{webhook}"
    );
    let blog = location_block(&out.text, "blog.viktoradam.net", "/");
    assert!(
        blog.contains("proxy_pass http://blog_viktoradam_net/;"),
        "{blog}"
    );
    assert!(blog.contains("client_max_body_size 10m;"), "{blog}");
}

#[test]
fn a_routing_internal_context_is_the_backend_path() {
    let out = render_builtin("nginx", &home_lab());
    let backend = location_block(&out.text, "api.viktoradam.net", "/backend/");
    assert!(
        backend.contains("proxy_pass http://api_viktoradam_net_backend/api/;"),
        "{backend}"
    );
    assert!(!backend.contains("deny all"), "not private: {backend}");
}

#[test]
fn an_absolute_routing_auth_is_used_as_is_and_the_realm_defaults_to_the_service_name() {
    let out = render_builtin("nginx", &home_lab());
    let kibana = location_block(&out.text, "logs.viktoradam.net", "/");
    assert!(
        kibana.contains("auth_basic_user_file /etc/auth-config/kibana.auth.conf;"),
        "{kibana}"
    );
    assert!(kibana.contains("auth_basic \"Kibana Logs\";"), "{kibana}");
    let backend = location_block(&out.text, "api.viktoradam.net", "/backend/");
    assert!(backend.contains("auth_basic \"lab_backend\";"), "{backend}");
    assert!(
        backend.contains("auth_basic_user_file /etc/nginx/auth/team/admins;"),
        "relative paths stay under /etc/nginx/auth: {backend}"
    );
}

#[test]
fn routing_on_https_is_true_for_any_non_empty_value() {
    for value in ["true", "false", "no", "yes please"] {
        let mut snapshot = home_lab();
        snapshot
            .services
            .iter_mut()
            .find(|s| s.name == "registry_registry")
            .expect("registry")
            .labels
            .insert("routing-on-https".into(), value.into());
        let out = render_builtin("nginx", &snapshot);
        let loc = location_block(&out.text, "registry.viktoradam.net", "/");
        assert!(
            loc.contains("proxy_pass https://registry_viktoradam_net/;"),
            "{value}: {loc}"
        );
    }
}

#[test]
fn a_service_without_routing_port_is_not_routed() {
    let out = render_builtin("nginx", &home_lab());
    assert!(!out.text.contains("no-port"), "{}", out.text);
    assert!(
        out.skipped.iter().all(|s| s.service != "lab_no-port"),
        "not an error, just not routed"
    );
}

#[test]
fn upstreams_use_the_network_the_nginx_service_is_on() {
    let out = render_builtin("nginx", &home_lab());
    // The receiver's addresses: 10.0.1.20 on home-web, 10.1.1.20 on home-monitoring (its
    // first network by name), 10.2.1.20 on webhooks_default.
    assert!(out.text.contains("server 10.0.1.20:6001;"), "{}", out.text);
    assert!(!out.text.contains("10.1.1.20"), "{}", out.text);
    assert!(!out.text.contains("10.2.1.20"), "{}", out.text);
}

#[test]
fn a_private_context_is_drovers_extension_for_private_networks_only() {
    let out = render_builtin("nginx", &home_lab());
    let private = location_block(&out.text, "api.viktoradam.net", "/metrics/");
    assert!(private.contains("deny all;"), "{private}");
    assert!(
        private.contains("proxy_pass http://api_viktoradam_net_backend;"),
        "the path goes through unchanged: {private}"
    );
    let allowed: Vec<&str> = private
        .lines()
        .filter_map(|l| l.trim().strip_prefix("allow "))
        .collect();
    assert_eq!(
        allowed,
        ["192.168.0.0/16;", "172.16.0.0/12;", "127.0.0.1;"],
        "by default a home LAN and loopback, not Swarm's 10.0.0.0/8 pool: {private}"
    );
}

#[test]
fn private_locations_allow_the_configured_networks_and_loopback_only() {
    let mut t = target("builtin:nginx");
    t.private_networks = drover::config::PrivateNetworks(vec![
        "192.168.1.0/24".parse().expect("cidr"),
        "10.20.30.40".parse().expect("cidr"),
    ]);
    let out = Template::load(&t)
        .expect("compiles")
        .render(&home_lab())
        .expect("renders");
    let private = location_block(&out.text, "api.viktoradam.net", "/metrics/");
    let rules: Vec<&str> = private
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("allow ") || l.starts_with("deny "))
        .collect();
    assert_eq!(
        rules,
        [
            "allow 192.168.1.0/24;",
            "allow 10.20.30.40;",
            "allow 127.0.0.1;",
            "deny all;"
        ]
    );
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
            ("evil-auth", "routing-auth"),
            ("evil-context", "routing-context"),
            ("evil-host", "routing-host"),
            ("evil-realm", "routing-auth-realm"),
        ]
    );
    // The template's own `return 200` answers ACME tokens; any other is injected.
    let text = out.text.replace("return 200 $drover_test_acme;", "");
    for needle in ["/etc/passwd", "return 200", "server{", "evil", "/etc/x"] {
        assert!(!text.contains(needle), "{needle:?} leaked into the config");
    }
}

#[test]
fn a_later_stack_claiming_a_host_with_other_settings_is_refused_and_the_owner_keeps_serving() {
    let mut snapshot = home_lab();
    let mut blog = snapshot
        .services
        .iter()
        .find(|s| s.name == "web_ghost")
        .cloned()
        .expect("web_ghost");
    blog.created_at = "2026-01-01T00:00:00Z".into();
    // Created later, in another stack, with a name that sorts first and other settings.
    let thief = service(
        "aaa_thief",
        &[
            ("routing-host", "blog.viktoradam.net"),
            ("routing-port", "80"),
            ("routing-max-body", "1k"),
        ],
        &["10.0.1.99"],
    );
    let mut thief = thief;
    thief.created_at = "2026-06-01T00:00:00Z".into();
    snapshot.services.retain(|s| s.name != "web_ghost");
    snapshot.services.extend([blog, thief]);
    snapshot.sort();

    let out = render_builtin("nginx", &snapshot);
    let refused = out
        .skipped
        .iter()
        .find(|s| s.service == "aaa_thief")
        .expect("the claim is refused");
    assert_eq!(refused.label, "routing-host");
    assert_eq!(
        refused.reason,
        "host blog.viktoradam.net belongs to stack web, which claimed it first"
    );
    assert!(!out.text.contains("10.0.1.99"), "{}", out.text);
    assert!(out.text.contains("10.0.1.2:2368"), "{}", out.text);
    assert_eq!(
        out.text,
        render_builtin("nginx", &home_lab()).text,
        "the render is the one without the claim"
    );
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
        .find(|s| s.name == "web_ghost")
        .expect("ghost");
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
        r#"{% for g in services | group_by_label(name="prometheus-job") %}{{ g.name }}:{% for s in g.items %} {{ s.tasks | running | task_ip(network="home-web") | join(sep=",") }}{% endfor %}
{% endfor %}{% for s in services | with_label(name="routing-tls", value="false") %}{{ s.name }}={{ s | label(name="routing-port", default="80") }}{% endfor %}"#,
    )
    .expect("write");
    let template = Template::load(&target(path.to_str().expect("utf-8 path"))).expect("compiles");
    let out = template.render(&home_lab()).expect("renders");
    assert_eq!(
        out.text,
        "demo-site: 10.0.1.10\ndockerhub-proxy: 10.0.1.12\ngithub-proxy: 10.0.1.11\nredirect-server: 10.0.1.13\nredirect-server-www: 10.0.1.14\nwebhook-proxy: 10.0.1.20\nwebhook-updater: \nzero: \nlab_plain=80"
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
        // Under the test command (DROVER_E2E=1) or CI a missing nginx fails the test
        // rather than passing without the check.
        assert!(
            std::env::var_os("DROVER_E2E").is_none() && std::env::var_os("CI").is_none(),
            "{NGINX} is not installed (scripts/test installs nginx-light)"
        );
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
    for host in out
        .text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("ssl_certificate_key /etc/letsencrypt/live/")
        })
        .filter_map(|rest| rest.split('/').next())
    {
        let dir = certs.path().join(host);
        std::fs::create_dir_all(&dir).expect("cert dir");
        std::fs::copy(&key, dir.join("privkey.pem")).expect("copy key");
        std::fs::copy(&cert, dir.join("fullchain.pem")).expect("copy cert");
    }
    assert!(out.text.contains("listen 443 ssl http2;"));
    nginx_t(&out.text, Some(certs.path())).expect("nginx -t");
}

/// A plain-http snapshot with one routed service per host name.
fn hosts_snapshot(hosts: &[String]) -> Snapshot {
    let services = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            service(
                &format!("svc{i}"),
                &[
                    ("routing-host", h.as_str()),
                    ("routing-port", "80"),
                    ("routing-tls", "false"),
                ],
                &["10.0.3.1"],
            )
        })
        .collect();
    let mut snapshot = Snapshot {
        swarm: true,
        services,
        networks: vec![network("ingress", true), network(WEB, false)],
        ..Snapshot::default()
    };
    snapshot.sort();
    snapshot
}

/// A host name of exactly `len` characters: 50-character labels joined by dots.
fn host_of_len(len: usize) -> String {
    let mut name = String::new();
    while name.len() < len {
        if !name.is_empty() {
            name.push('.');
        }
        let room = (len - name.len()).min(50);
        name.push_str(&"a".repeat(room));
    }
    // A trailing one-letter label would be fine, a trailing dot would not.
    assert!(!name.ends_with('.'));
    name
}

#[test]
fn long_host_names_size_the_server_names_hash_and_pass_nginx_t() {
    if !have_nginx() {
        return;
    }
    for len in [46, 47, 54, 60, 100, 200, 253] {
        let host = host_of_len(len);
        assert_eq!(host.len(), len);
        let out = render_builtin("nginx", &hosts_snapshot(&[host.clone(), "a.test".into()]));
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        nginx_t(&out.text, None).unwrap_or_else(|e| panic!("{len} characters: {e}"));
        if len >= 47 {
            assert!(
                out.text.contains("server_names_hash_bucket_size"),
                "{len} characters"
            );
            // Without the directive nginx refuses the file: the directive is what fixes it.
            let stripped: String = out
                .text
                .lines()
                .filter(|l| !l.starts_with("server_names_hash_bucket_size"))
                .map(|l| format!("{l}\n"))
                .collect();
            let err = nginx_t(&stripped, None).expect_err("default bucket too small");
            assert!(err.contains("server_names_hash_bucket_size"), "{err}");
        } else {
            assert!(
                !out.text.contains("server_names_hash_bucket_size"),
                "{len} characters fit the default"
            );
        }
    }
}

#[test]
fn short_host_names_leave_nginx_s_bucket_size_alone() {
    let out = render_builtin("nginx", &home_lab());
    assert!(!out.text.contains("server_names_hash_bucket_size"));
}

#[test]
fn a_tls_host_without_its_certificate_is_served_on_port_80_until_it_appears() {
    let snapshot = Snapshot {
        services: vec![
            service(
                "shop",
                &[("routing-host", "shop.test"), ("routing-port", "80")],
                &["10.0.1.5"],
            ),
            service(
                "blog",
                &[("routing-host", "blog.test"), ("routing-port", "80")],
                &["10.0.1.6"],
            ),
        ],
        ..Snapshot::default()
    };
    let template = Template::load(&target("builtin:nginx")).expect("built-in compiles");
    let render = |present: &[&str]| {
        let options = drover::render::Options {
            certificates: Some(present.iter().map(|h| (*h).to_owned()).collect()),
            ..Default::default()
        };
        template.render_with(&snapshot, &options).expect("renders")
    };
    let host_block = |text: &str, host: &str| {
        let start = text.find(&format!("# host {host}\n")).expect("host marker");
        let rest = &text[start + 1..];
        let end = rest
            .find("\n# host ")
            .or_else(|| rest.find("# end of hosts"))
            .unwrap_or(rest.len());
        rest[..end].to_owned()
    };

    let waiting = render(&["blog.test"]);
    assert_eq!(waiting.tls_hosts, ["blog.test", "shop.test"]);
    let shop = host_block(&waiting.text, "shop.test");
    assert!(
        !shop.contains("443") && !shop.contains("ssl_certificate"),
        "{shop}"
    );
    assert!(
        shop.contains("location /.well-known/acme-challenge/"),
        "{shop}"
    );
    assert!(
        shop.contains("proxy_pass http://shop_test/;"),
        "plain proxy: {shop}"
    );
    assert!(
        !shop.contains("return 301"),
        "no redirect to a TLS port that is not there: {shop}"
    );
    let blog = host_block(&waiting.text, "blog.test");
    assert!(
        blog.contains("listen 443 ssl http2;") && blog.contains("return 301"),
        "{blog}"
    );

    let both = render(&["blog.test", "shop.test"]);
    let shop = host_block(&both.text, "shop.test");
    assert!(
        shop.contains("listen 443 ssl http2;"),
        "switches to TLS once the files are there: {shop}"
    );
    assert!(
        shop.contains("ssl_certificate /etc/letsencrypt/live/shop.test/fullchain.pem;"),
        "{shop}"
    );
    // Nobody looked: every TLS host keeps its certificate, as before drover could look.
    assert_eq!(template.render(&snapshot).expect("renders").text, both.text);
    assert!(drover::render::CERT_DIR.ends_with("/live"));
}

#[test]
fn tls_hosts_are_served_as_the_lab_served_them_with_http2_redirects_hsts_and_extra_names() {
    let out = render_builtin("nginx", &home_lab());
    let text = &out.text;
    let block = |host: &str| {
        let start = text.find(&format!("# host {host}\n")).expect("host marker");
        let rest = &text[start + 1..];
        let end = rest
            .find("\n# host ")
            .or_else(|| rest.find("# end of hosts"))
            .unwrap_or(rest.len());
        rest[..end].to_owned()
    };
    let shop = block("shop.viktoradam.net");
    assert_eq!(
        shop.matches("server_name shop.viktoradam.net www.shop.viktoradam.net;")
            .count(),
        2,
        "extra names on port 80 and 443: {shop}"
    );
    assert!(shop.contains("listen 443 ssl http2;"), "{shop}");
    assert!(
        shop.contains("add_header Strict-Transport-Security \"max-age=31536000\" always;"),
        "{shop}"
    );
    let port_80 = &shop[..shop.find("listen 443").expect("a TLS server")];
    let challenge = port_80
        .find("location /.well-known/acme-challenge/")
        .expect("challenge on port 80");
    let redirect = port_80
        .find("return 301 https://$host$request_uri;")
        .expect("redirect");
    assert!(challenge < redirect, "{port_80}");
    assert!(!block("blog.viktoradam.net").contains("Strict-Transport-Security"));
    // The challenge path is answered for every host, TLS or not, and for names nobody routes.
    assert!(block("plain.local").contains("location /.well-known/acme-challenge/"));
    let default = &text[..text.find("# host ").expect("hosts")];
    assert!(
        default.contains("location /.well-known/acme-challenge/"),
        "{default}"
    );
    assert!(
        default.contains("listen 443 ssl http2 default_server;"),
        "{default}"
    );
    assert!(default.contains("ssl_reject_handshake on;"), "{default}");
    // The extra names on the certificate tool's list, with the names of the nginx service.
    let certbot = render_builtin("certbot", &home_lab()).text;
    assert!(
        certbot.contains("\nshop.viktoradam.net,www.shop.viktoradam.net\n"),
        "{certbot}"
    );
    assert!(certbot.ends_with("\nviktoradam.net\n"), "{certbot}");
}

#[test]
fn a_service_cannot_take_the_challenge_path() {
    let snapshot = Snapshot {
        services: vec![service(
            "thief",
            &[
                ("routing-host", "a.test"),
                ("routing-port", "80"),
                ("routing-context", "/.well-known/acme-challenge"),
            ],
            &["10.0.1.5"],
        )],
        ..Snapshot::default()
    };
    let out = render_builtin("nginx", &snapshot);
    assert_eq!(out.skipped.len(), 1, "{:?}", out.skipped);
    assert!(out.skipped[0].reason.contains("reserved for ACME"));
}

#[test]
fn nginx_gives_up_on_a_vanished_task_after_the_connect_timeout_and_never_repeats_a_post() {
    let mut lab = home_lab();
    let out = render_builtin("nginx", &lab);
    let blog = location_block(&out.text, "blog.viktoradam.net", "/");
    for line in [
        "proxy_connect_timeout 1s;",
        "proxy_next_upstream error timeout;",
        "proxy_next_upstream_tries 3;",
        "proxy_next_upstream_timeout 5s;",
    ] {
        assert!(blog.contains(line), "{line}: {blog}");
    }
    assert!(
        !out.text.contains("non_idempotent"),
        "a POST is never sent twice"
    );

    let ghost = lab
        .services
        .iter_mut()
        .find(|s| s.name == "web_ghost")
        .expect("ghost");
    ghost
        .labels
        .insert("routing-connect-timeout".into(), "250ms".into());
    let out = render_builtin("nginx", &lab);
    let blog = location_block(&out.text, "blog.viktoradam.net", "/");
    assert!(blog.contains("proxy_connect_timeout 250ms;"), "{blog}");
}

#[test]
fn acme_tokens_are_answered_on_every_servers_challenge_path_and_certificate_fingerprints_are_in_the_file()
 {
    let snapshot = Snapshot {
        services: vec![service(
            "shop",
            &[
                ("routing-host", "shop.test"),
                ("routing-port", "80"),
                ("routing-extra-hosts", "www.shop.test"),
                ("routing-acme", "true"),
            ],
            &["10.0.1.5"],
        )],
        ..Snapshot::default()
    };
    let template = Template::load(&target("builtin:nginx")).expect("built-in compiles");
    let options = drover::render::Options {
        certificates: Some(Default::default()),
        challenges: [
            // A real token's length: its path does not fit nginx's default map hash bucket.
            (
                "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0".to_owned(),
                "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI".to_owned(),
            ),
            // Never into the file: it could end the quoted string.
            ("evil\";".to_owned(), "x".to_owned()),
        ]
        .into(),
        fingerprints: [("shop.test".to_owned(), "ab12".to_owned())].into(),
    };
    let out = template.render_with(&snapshot, &options).expect("renders");
    assert!(
        out.text
            .contains("/acme-challenge/LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0$\" \"LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI\";"),
        "{}",
        out.text
    );
    assert!(!out.text.contains("evil"), "{}", out.text);
    assert!(
        out.text.contains("# certificate shop.test ab12"),
        "{}",
        out.text
    );
    // The default server and the host's port-80 server both answer the token first.
    assert_eq!(
        out.text.matches("return 200 $drover_test_acme;").count(),
        2,
        "{}",
        out.text
    );
    assert_eq!(
        out.wanted,
        [drover::certs::Wanted {
            host: "shop.test".into(),
            names: vec!["shop.test".into(), "www.shop.test".into()],
            opted_in: true,
        }]
    );
    nginx_t(&out.text, None).expect("nginx -t");
}
