//! The file as an operator writes it: every refusal names the line, every default holds.

use super::*;

fn parse(text: &str) -> Result<Config> {
    Config::parse(Path::new("drover.yml"), text)
}

#[test]
fn the_issue_example_parses() {
    let c = parse(
        r#"
http: { listen: 0.0.0.0:9090 }
targets:
  - name: nginx
    template: builtin:nginx
    output: /etc/nginx/conf.d/drover.conf
    network: web
    debounce: { min: 250ms, max: 2s }
    check:
      exec: { service: nginx, command: ["nginx", "-t"] }
    notify:
      - signal: { service: nginx, signal: HUP }
      - restart: { service: ddclient }
      - command: ["true"]
hooks:
  - name: dockerhub
    kind: dockerhub
    token_file: /run/secrets/hub-token
    allow: { repository: "^owner/.+$", tag: "^(latest|stable)$" }
    quiet: 10s
    action: update-services
  - name: github
    kind: github
    secret_file: /run/secrets/github
    events: [push]
    allow: { ref: "^refs/heads/main$" }
    action: { command: ["/usr/local/bin/deploy-stack.sh"] }
  - name: ci
    kind: generic
    secret_file: /run/secrets/ci
    action: update-services
  - name: dd
    kind: generic
    token_file: /x
    action: { restart-service: ddclient }
"#,
    )
    .expect("valid");
    let t = &c.targets[0];
    assert_eq!(t.debounce.min, Duration::from_millis(250));
    assert!(matches!(t.check, Some(Action::Exec(ref e)) if e.service.as_deref() == Some("nginx")));
    assert_eq!(t.notify.len(), 3);
    assert_eq!(c.hooks[0].action, HookAction::UpdateServices);
    assert_eq!(
        c.hooks[1].action,
        HookAction::Command(vec!["/usr/local/bin/deploy-stack.sh".into()])
    );
    assert_eq!(
        c.hooks[3].action,
        HookAction::RestartService("ddclient".into())
    );
    assert!(c.hooks[0].allow["tag"].is_match("latest"));
    assert!(!c.hooks[0].allow["tag"].is_match("latest-foo"));
}

#[test]
fn unknown_field_is_refused_with_its_line() {
    let err = parse(
        "targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    colour: red\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("drover.yml:5:"), "{err}");
    assert!(err.contains("colour"), "{err}");
}

#[test]
fn bad_regex_is_refused_with_its_line() {
    let err = parse("hooks:\n  - name: a\n    kind: generic\n    token_file: /t\n    allow: { tag: \"(\" }\n    action: update-services\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("drover.yml:5:"), "{err}");
}

#[test]
fn duplicate_target_points_at_the_second_definition_line() {
    let err = parse("targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n  - name: b\n    template: builtin:nope\n    output: /y\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown built-in template"), "{err}");
    assert!(err.starts_with("drover.yml:6:"), "{err}");
}

#[test]
fn selector_must_name_exactly_one_thing() {
    let err = parse("targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    notify:\n      - signal: { service: a, container: b }\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("exactly one"), "{err}");
}

#[test]
fn github_hook_without_secret_is_refused() {
    let err = parse("hooks:\n  - name: gh\n    kind: github\n    action: update-services\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("secret_file or secrets is required"), "{err}");
}

#[test]
fn allow_key_the_kind_does_not_know_is_refused_at_its_line_and_column() {
    let err = parse(
        "hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    action: update-services\n  - name: gh\n    kind: github\n    secret_file: /s\n    allow:\n      ref: refs/heads/master\n      pusher: rycus86\n    action: update-services\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("drover.yml:11:7: "), "{err}");
    assert!(
        err.contains("\"pusher\" is not a fact of a github hook"),
        "{err}"
    );
    let err = parse(
        "hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    allow: { tag: latest, sender: rycus86 }\n    action: update-services\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("drover.yml:5:27: "), "{err}");
    assert!(err.contains("known: repository, tag"), "{err}");
}

#[test]
fn home_lab_rules_of_each_kind_load() {
    let c = parse(
        "hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    allow: { owner: rycus86, namespace: rycus86, repository: 'rycus86/.+', pusher: rycus86, tag: '.+' }\n    action: update-services\n  - name: gh\n    kind: github\n    secrets:\n      rycus86/home-stack-web: /run/secrets/web\n      'rycus86/home-stack-.+': /run/secrets/stacks\n    accept_sha1: false\n    allow: { sender: rycus86, ref: refs/heads/master }\n    action:\n      container:\n        image: 127.0.0.1:5000/stack-deploy\n        command: [/bin/sh, /deploy/run.sh]\n        env: { STACKS: /srv/stacks }\n        mounts: ['/var/run/docker.sock:/var/run/docker.sock', '/srv/stacks:/srv/stacks:ro']\n        networks: [home-web]\n        user: '1000:1000'\n        working_dir: /srv/stacks\n        timeout: 5m\n",
    )
    .expect("valid");
    let gh = &c.hooks[1];
    assert!(!gh.accept_sha1);
    assert!(
        c.hooks[0].accept_sha1,
        "sha1 is accepted unless switched off"
    );
    let keys: Vec<&str> = gh.secrets.0.iter().map(|s| s.repository.as_str()).collect();
    assert_eq!(keys, ["rycus86/home-stack-web", "rycus86/home-stack-.+"]);
    assert!(gh.secrets.0[1].pattern.is_match("rycus86/home-stack-media"));
    let HookAction::Container(spec) = &gh.action else {
        panic!("not a container action: {:?}", gh.action);
    };
    assert_eq!(spec.timeout, Duration::from_secs(300));
    assert_eq!(spec.mounts.len(), 2);
    assert!(!spec.concurrent);
    assert_eq!(spec.log_lines, 50);
}

#[test]
fn container_action_with_a_bad_mount_or_no_image_is_refused() {
    let hook = |action: &str| {
        parse(&format!(
            "hooks:\n  - name: c\n    kind: generic\n    token_file: /t\n    action: {action}\n"
        ))
        .unwrap_err()
        .to_string()
    };
    let err = hook("{ container: { image: x, mounts: [relative] } }");
    assert!(err.contains("is not SOURCE:/TARGET"), "{err}");
    let err = hook("{ container: { image: '' } }");
    assert!(err.contains("image is empty"), "{err}");
    let err = hook("{ container: { image: x, colour: red } }");
    assert!(err.contains("colour"), "{err}");
}

#[test]
fn per_repository_secrets_are_only_for_github_hooks() {
    let err = parse("hooks:\n  - name: c\n    kind: generic\n    token_file: /t\n    secrets: { a/b: /s }\n    action: update-services\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("per-repository secrets are for github, gitea and bitbucket hooks"),
        "{err}"
    );
}

#[test]
fn replay_window_defaults_to_an_hour_is_bounded_and_refused_on_github() {
    let hub = |extra: &str| {
        parse(&format!(
            "hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n{extra}    action: update-services\n"
        ))
    };
    let config = hub("").expect("default");
    assert_eq!(config.hooks[0].replay_window(), DEFAULT_REPLAY_WINDOW);
    let config = hub("    replay_window: 0s\n").expect("off");
    assert_eq!(config.hooks[0].replay_window(), Duration::ZERO);
    let err = hub("    replay_window: 25h\n")
        .expect_err("too long")
        .to_string();
    assert!(
        err.contains("hook hub: replay_window must be between"),
        "{err}"
    );
    let err = parse("hooks:\n  - name: gh\n    kind: github\n    secret_file: /s\n    replay_window: 1h\n    action: update-services\n")
        .expect_err("github")
        .to_string();
    assert!(
        err.contains("replay_window does not apply to github hooks"),
        "{err}"
    );
}

#[test]
fn forge_hooks_need_their_own_proof_and_can_sync_stacks() {
    let ok = parse(
        "hooks:\n  - name: tea\n    kind: forgejo\n    secret_file: /s\n    action: sync-stacks\n\
         \x20 - name: lab\n    kind: gitlab\n    token_file: /t\n    allow: { after: '[0-9a-f]{40}' }\n    action: sync-stacks\n\
         \x20 - name: bb\n    kind: bitbucket\n    secrets: { lab/web: /s }\n    action: sync-stacks\n\
         stacks:\n  - name: web\n    repository: https://git.example.com/lab/web.git\n    hook: tea\n\
         \x20 - name: mon\n    repository: https://gitlab.example.com/lab/mon.git\n    hook: lab\n",
    )
    .expect("valid");
    assert_eq!(
        ok.hooks[0].kind,
        HookKind::Gitea,
        "forgejo is gitea's payload"
    );
    let cases = [
        (
            "hooks:\n  - name: tea\n    kind: gitea\n    token_file: /t\n    action: sync-stacks\n",
            "secret_file or secrets is required",
        ),
        (
            "hooks:\n  - name: lab\n    kind: gitlab\n    secret_file: /s\n    action: sync-stacks\n",
            "token_file is required",
        ),
        (
            "hooks:\n  - name: lab\n    kind: gitlab\n    token_file: /t\n    secrets: { a/b: /s }\n    action: sync-stacks\n",
            "per-repository secrets are for github, gitea and bitbucket hooks",
        ),
        (
            "hooks:\n  - name: bb\n    kind: bitbucket\n    token_file: /t\n    action: sync-stacks\n",
            "secret_file or secrets is required",
        ),
        (
            "hooks:\n  - name: bb\n    kind: bitbucket\n    secret_file: /s\n    token_file: /t\n    action: sync-stacks\n",
            "bitbucket hooks take no token_file",
        ),
        (
            "hooks:\n  - name: lab\n    kind: gitlab\n    token_file: /t\n    replay_window: 1h\n    action: sync-stacks\n",
            "replay_window does not apply to gitlab hooks",
        ),
        (
            "hooks:\n  - name: bb\n    kind: bitbucket\n    secret_file: /s\n    allow: { commits: '1' }\n    action: sync-stacks\n",
            "\"commits\" is not a fact of a bitbucket hook",
        ),
    ];
    for (text, reason) in cases {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(reason), "{text}: {err}");
        assert!(err.starts_with("drover.yml:"), "{err}");
    }
}

#[test]
fn a_quiet_window_of_billions_of_years_is_refused_with_its_line() {
    let err = parse("hooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    quiet: 300000000000years\n    action: update-services\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("drover.yml:2:"), "{err}");
    assert!(err.contains("hook hub: quiet must be between"), "{err}");
}

#[test]
fn a_zero_resync_period_is_refused() {
    let err = parse("resync: 0s\n").unwrap_err().to_string();
    assert!(err.starts_with("drover.yml:1:"), "{err}");
    assert!(err.contains("resync must be between 1s and 1day"), "{err}");
}

#[test]
fn sizes_and_timeouts_out_of_bounds_are_refused() {
    for (text, needle) in [
        ("http: { max_body: 0 }\n", "http.max_body"),
        ("http: { max_body: 1000000000000 }\n", "http.max_body"),
        ("http: { request_timeout: 0s }\n", "http.request_timeout"),
        ("jobs: { queue: 100000000 }\n", "jobs.queue"),
        (
            "jobs: { update_timeout: 100years }\n",
            "jobs.update_timeout",
        ),
        (
            "targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    debounce: { min: 1s, max: 1000years }\n",
            "debounce.max",
        ),
    ] {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}

#[test]
fn an_empty_container_name_is_refused_because_it_would_match_every_container() {
    for step in [
        "signal: { container: \"\" }",
        "restart: { service: \" \" }",
        "exec: { label: \"\", command: [nginx, -t] }",
    ] {
        let text = format!(
            "targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    notify:\n      - {step}\n"
        );
        let err = parse(&text).expect_err(step).to_string();
        assert!(err.contains("must not be empty"), "{step}: {err}");
    }
}

#[test]
fn the_default_values_are_within_their_bounds() {
    parse("{}\n").expect("an empty config is valid");
}

#[test]
fn vars_reach_the_template_and_names_a_template_cannot_read_are_refused() {
    let target = |extra: &str| {
        format!("targets:\n  - name: p\n    template: builtin:prometheus\n    output: /x\n{extra}")
    };
    let c = parse(&target(
        "    vars:\n      scrape_interval: 30s\n      external_labels: { monitor: home-stack }\n",
    ))
    .expect("vars");
    assert_eq!(c.targets[0].vars["scrape_interval"], "30s");
    assert_eq!(
        c.targets[0].vars["external_labels"]["monitor"],
        "home-stack"
    );
    for (bad, says) in [
        (
            "    vars: { scrape-interval: 30s }\n",
            "\"scrape-interval\" is not a name",
        ),
        (
            "    vars: { external_labels: { \"a b\": x } }\n",
            "\"a b\" is not a Prometheus label name",
        ),
    ] {
        let err = parse(&target(bad)).expect_err(bad).to_string();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn private_networks_default_to_a_home_lan_without_the_swarm_pool_and_refuse_bad_cidrs() {
    let target = |extra: &str| {
        format!("targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n{extra}")
    };
    let c = parse(&target("")).expect("default");
    let shown: Vec<String> = c.targets[0]
        .private_networks
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(shown, ["192.168.0.0/16", "172.16.0.0/12"]);
    let swarm: std::net::IpAddr = "10.0.0.2".parse().expect("ip");
    assert!(
        !c.targets[0]
            .private_networks
            .0
            .iter()
            .any(|n| n.contains(swarm))
    );
    let c = parse(&target(
        "    private_networks: [192.168.1.0/24, 10.20.0.0/16, 192.168.5.9, \"fd00::/8\"]\n",
    ))
    .expect("custom");
    let shown: Vec<String> = c.targets[0]
        .private_networks
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        shown,
        ["192.168.1.0/24", "10.20.0.0/16", "192.168.5.9", "fd00::/8"]
    );
    for (bad, says) in [
        (
            "[192.168.1.5/16]",
            "host bits set (the network is 192.168.0.0/16)",
        ),
        ("[192.168.0.0/33]", "invalid CIDR"),
        ("[\"192.168.0.0/16; allow all\"]", "invalid CIDR"),
        ("[lan]", "invalid CIDR"),
        ("192.168.0.0/16", "invalid type"),
    ] {
        let err = parse(&target(&format!("    private_networks: {bad}\n")))
            .expect_err(bad)
            .to_string();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn cidr_matching_respects_the_prefix() {
    let c: Cidr = serde_yaml_ng::from_str("10.1.0.0/16").expect("cidr");
    assert!(c.contains("10.1.200.3".parse().expect("ip")));
    assert!(!c.contains("10.2.0.1".parse().expect("ip")));
    let all: Cidr = serde_yaml_ng::from_str("0.0.0.0/0").expect("cidr");
    assert!(all.contains("192.168.1.1".parse().expect("ip")));
}

#[test]
fn github_events_default_to_push_and_an_empty_list_is_refused() {
    let hook = "hooks:\n  - name: gh\n    kind: github\n    secret_file: /s\n    action: update-services\n";
    let c = parse(hook).expect("config");
    assert_eq!(c.hooks[0].events, ["push"]);
    let empty = hook.replace("kind: github", "kind: github\n    events: []");
    let e = parse(&empty).expect_err("empty events").to_string();
    assert!(e.contains("events must name at least one event"), "{e}");
}

#[test]
fn http_limits_are_refused_when_zero_or_out_of_range() {
    for bad in [
        "http: { max_requests: 0 }",
        "http: { header_timeout: 0s }",
        "http: { max_body: 2048, body_budget: 1024 }",
        "http: { listen: 127.0.0.1:9000, ops: { listen: 127.0.0.1:9000 } }",
    ] {
        assert!(parse(bad).is_err(), "{bad} accepted");
    }
    let c = parse("{}").expect("defaults");
    assert!(
        c.http.ops.listen.ip().is_loopback(),
        "operator endpoints are private by default"
    );
}

#[test]
fn left_out_fields_take_the_documented_defaults() {
    let c = parse(
        "targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n    notify:\n      - signal: { service: nginx }\nhooks:\n  - name: hub\n    kind: dockerhub\n    token_file: /t\n    action: { container: { image: x } }\n",
    )
    .expect("valid");
    let h = &c.http;
    assert_eq!(h.listen, "0.0.0.0:9090".parse().expect("addr"));
    assert_eq!(h.ops.listen, "127.0.0.1:9091".parse().expect("addr"));
    assert_eq!(h.ops.token_file, None);
    assert_eq!((h.max_body, h.body_budget), (1 << 20, 8 << 20));
    assert_eq!(
        (h.request_timeout, h.header_timeout, h.idle_timeout),
        (
            Duration::from_secs(10),
            Duration::from_secs(5),
            Duration::from_secs(60)
        )
    );
    assert_eq!((h.max_connections, h.max_connections_per_source), (256, 32));
    assert_eq!((h.max_requests, h.max_requests_per_source), (64, 16));
    assert_eq!(h.auth_failures_per_minute, 30);
    assert_eq!(h.min_body_rate, 4096);
    assert!(
        h.trusted_proxies.is_none(),
        "default: the steps' containers"
    );
    assert_eq!(c.resync, Duration::from_secs(60));
    let j = &c.jobs;
    assert_eq!(
        (j.queue, j.history, j.journal.as_str()),
        (64, 100, "drover")
    );
    assert_eq!(j.update_timeout, Duration::from_secs(600));
    assert_eq!(j.state_file, None);
    assert_eq!(c.cluster.listen, "0.0.0.0:9092".parse().expect("addr"));
    assert_eq!(
        c.cluster.key_file,
        Path::new("/run/secrets/drover-cluster-key")
    );
    assert_eq!(c.cluster.max_skew, Duration::from_secs(30));
    let t = &c.targets[0];
    assert_eq!(t.debounce, Debounce::default());
    assert_eq!(
        (t.debounce.min, t.debounce.max),
        (Duration::from_millis(250), Duration::from_secs(2))
    );
    assert!(matches!(&t.notify[0], Action::Signal(s) if s.signal == "HUP"));
    let hook = &c.hooks[0];
    assert!(hook.accept_sha1);
    assert_eq!(hook.events, ["push"]);
    assert_eq!(hook.quiet, Duration::from_secs(10));
    assert_eq!(hook.rate, 50);
    let HookAction::Container(spec) = &hook.action else {
        panic!("not a container action: {:?}", hook.action);
    };
    assert_eq!(spec.timeout, Duration::from_secs(600));
    assert_eq!(spec.log_lines, 50);
}

#[test]
fn an_empty_file_is_the_default_config() {
    let parsed = parse("{}\n").expect("valid");
    assert_eq!(
        format!("{parsed:?}"),
        format!("{:?}", Config::default()),
        "Config::default() and the zero-config file agree"
    );
}

#[test]
fn of_several_problems_bounds_are_reported_before_any_area_rule() {
    let err = parse("targets:\n  - { name: 'a b', template: builtin:nginx, output: /x }\nhooks:\n  - { name: hub, kind: dockerhub, token_file: /t, quiet: 2days, action: update-services }\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("hook hub: quiet must be between"), "{err}");
    let err = parse("hooks:\n  - { name: 'h h', kind: dockerhub, action: update-services }\nhttp: { max_body: 2048, body_budget: 1024 }\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("hook name \"h h\""), "{err}");
}

#[test]
fn trusted_proxies_are_networks_or_addresses_and_an_empty_list_trusts_no_one() {
    let c = parse("http: { trusted_proxies: [10.0.9.0/24, 192.0.2.7] }\n").expect("valid");
    let t = c.http.trusted_proxies.expect("set");
    assert!(t[0].contains([10, 0, 9, 200].into()) && t[1].contains([192, 0, 2, 7].into()));
    let c = parse("http: { trusted_proxies: [] }\n").expect("valid");
    assert_eq!(c.http.trusted_proxies.map(|t| t.len()), Some(0));
    let err = parse("http: { trusted_proxies: [nginx] }\n").expect_err("not an address");
    assert!(err.to_string().contains("trusted_proxies"), "{err}");
    let err = parse("http: { min_body_rate: 0 }\n").expect_err("zero");
    assert!(err.to_string().contains("min_body_rate"), "{err}");
}

#[test]
fn a_stack_from_git_parses_with_its_defaults() {
    let c = parse(
        r#"
hooks:
  - name: github
    kind: github
    secret_file: /run/secrets/github
    action: sync-stacks
stacks:
  - name: web
    repository: https://git.example.com/lab/home-stack-web.git
    token_file: /run/secrets/git-token
    environment: { DOMAIN: example.com }
    poll: 1m
    hook: github
  - name: monitoring
    repository: git@git.example.com:lab/monitoring.git
    branch: release/2.x
    compose: deploy/stack.yml
    ssh_key_file: /run/secrets/deploy-key
    known_hosts_file: /etc/drover/known_hosts
    git_crypt_key_file: /run/secrets/git-crypt
    prune: true
"#,
    )
    .expect("valid");
    let web = &c.stacks[0];
    assert_eq!(web.branch, "main");
    assert_eq!(web.compose, "docker-compose.yml");
    assert_eq!(web.poll, Some(Duration::from_secs(60)));
    assert_eq!(web.image, DEFAULT_DEPLOY_IMAGE);
    assert_eq!(web.transport(), Some(Transport::Http));
    assert_eq!(web.full_name().as_deref(), Some("lab/home-stack-web"));
    let mon = &c.stacks[1];
    assert_eq!(mon.transport(), Some(Transport::Ssh));
    assert!(mon.prune && mon.poll.is_none() && mon.hook.is_none());
    assert_eq!(c.hooks[0].action, HookAction::SyncStacks);
}

#[test]
fn a_wrong_stack_is_refused_at_its_line() {
    let cases = [
        (
            "stacks:\n  - name: web\n    repository: https://u:tok@example.com/a/b.git\n",
            "must not carry credentials",
            2,
        ),
        (
            "stacks:\n  - name: web\n    repository: /srv/git/web.git\n",
            "is not an https://",
            2,
        ),
        (
            "stacks:\n  - name: web\n    repository: git@h:a/b.git\n    ssh_key_file: /k\n",
            "go together",
            2,
        ),
        (
            "stacks:\n  - name: web\n    repository: git@h:a/b.git\n    token_file: /t\n",
            "token_file is for https",
            2,
        ),
        (
            "stacks:\n  - name: web\n    repository: https://h/a/b.git\n    compose: ../../etc/x.yml\n",
            "relative path",
            2,
        ),
        (
            "stacks:\n  - name: web\n    repository: https://h/a/b.git\n    branch: --upload-pack=x\n",
            "not a valid branch",
            2,
        ),
        (
            "stacks:\n  - name: Web\n    repository: https://h/a/b.git\n",
            "stack name",
            2,
        ),
        (
            "stacks:\n  - name: web\n    repository: https://h/a/b.git\n    poll: 1s\n",
            "poll must be between",
            2,
        ),
        (
            "stacks:\n  - name: web\n    repository: https://h/a/b.git\n    hook: github\n",
            "not a github, gitea, gitlab or bitbucket hook with action sync-stacks",
            2,
        ),
        (
            "stacks:\n  - name: web\n    repository: https://h/a/b.git\n  - name: web\n    repository: https://h/a/c.git\n",
            "defined twice",
            2,
        ),
        (
            "hooks:\n  - name: ci\n    kind: generic\n    token_file: /t\n    action: sync-stacks\n",
            "sync-stacks is an action of github, gitea, gitlab and bitbucket hooks",
            2,
        ),
    ];
    for (text, reason, line) in cases {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(reason), "{text}: {err}");
        assert!(
            err.starts_with(&format!("drover.yml:{line}:")),
            "{text}: {err}"
        );
    }
    let err = parse("stacks:\n  - name: web\n    repository: https://h/a/b.git\n    colour: red\n")
        .expect_err("unknown field")
        .to_string();
    assert!(err.starts_with("drover.yml:4:"), "{err}");
}

#[test]
fn polling_is_off_by_label_only_by_default_and_a_section_parses() {
    let c = parse("").expect("empty");
    assert!(!c.poll.all);
    assert_eq!(c.poll.every, Duration::from_secs(300));
    let c = parse(
        "poll:\n  every: 2m\n  all: true\n  images: 'ghcr\\.io/me/.*'\n  budget: { requests: 50, per: 1h }\n  plain_http: [lab.internal:5000]\n  timeout: 5s\n",
    )
    .expect("valid");
    assert!(c.poll.all);
    assert_eq!(c.poll.budget.spacing(), Duration::from_secs(72));
    assert!(
        c.poll
            .images
            .as_ref()
            .is_some_and(|m| m.is_match("ghcr.io/me/app:1"))
    );
    assert_eq!(c.poll.plain_http, ["lab.internal:5000"]);
}

#[test]
fn a_wrong_poll_section_is_refused_at_its_line() {
    let cases = [
        ("poll:\n  every: 1s\n", "poll.every must be between", 2),
        // `timeout:` of another section comes first: the poll's own line is named.
        (
            "jobs:\n  update_timeout: 60s\npoll:\n  all: true\n  timeout: 0s\n",
            "poll.timeout must be between",
            5,
        ),
        (
            "poll:\n  budget:\n    requests: 0\n",
            "poll.budget.requests must be between",
            3,
        ),
        (
            "poll:\n  plain_http: [\"http://x\"]\n",
            "is not a registry host",
            2,
        ),
        ("poll:\n  images: '('\n", "invalid regex", 2),
        ("poll:\n  every: often\n", "every", 2),
        ("poll:\n  colour: red\n", "colour", 2),
        (
            "hooks:\n  - name: registry-poll\n    kind: generic\n    token_file: /t\n    action: update-services\n",
            "is drover's own",
            2,
        ),
    ];
    for (text, reason, line) in cases {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(reason), "{text}: {err}");
        assert!(
            err.starts_with(&format!("drover.yml:{line}:")),
            "{text}: {err}"
        );
    }
}

#[test]
fn owners_load_and_a_bad_entry_is_refused_with_file_line_and_column() {
    let target = |extra: &str| {
        format!("targets:\n  - name: a\n    template: builtin:nginx\n    output: /x\n{extra}")
    };
    let c = parse(&target(
        "    owners:\n      \"*.example.com\": [web]\n      shop.example.com: [shop, \"service:old\"]\n",
    ))
    .expect("owners");
    let owners = &c.targets[0].owners;
    assert_eq!(
        owners.of("a.example.com"),
        Some(&[Owner::Stack("web".into())][..])
    );
    assert_eq!(
        owners.of("shop.example.com"),
        Some(&[Owner::Stack("shop".into()), Owner::Service("old".into())][..])
    );
    assert!(
        parse(&target("")).expect("none").targets[0]
            .owners
            .is_empty()
    );

    let err = parse(&target(
        "    owners:\n      \"*.example.com\": [web]\n      \"*example.com\": [web]\n",
    ))
    .expect_err("bad pattern")
    .to_string();
    // A key's error points at the map that holds it.
    assert!(
        err.starts_with("drover.yml:6:7: targets[0].owners"),
        "{err}"
    );
    assert!(err.contains("is not a host name"), "{err}");
    let err = parse(&target("    owners:\n      a.com: []\n"))
        .expect_err("empty list")
        .to_string();
    assert!(err.starts_with("drover.yml:6:"), "{err}");
    assert!(err.contains("at least one stack"), "{err}");
}
