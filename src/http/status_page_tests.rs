use super::*;

#[test]
fn every_job_state_has_its_badge_and_a_word_no_state_has_is_neutral() {
    use crate::jobs::JobState::*;
    for (state, class) in [
        (Completed, "ok"),
        (Failed, "bad"),
        (RolledBack, "bad"),
        (Queued, "warn"),
        (Running, "warn"),
        (Skipped, "neutral"),
    ] {
        assert_eq!(outcome_class(state.as_str()), class, "{state:?}");
    }
    assert_eq!(outcome_class("updated"), "neutral");
}
use crate::status::TargetStatus;
use serde_json::json;

const NOW: u64 = 1_714_564_800; // 2024-05-01 12:00:00 UTC

fn summary() -> Summary {
    Summary {
        version: "0.1.0",
        role: Some(crate::role::Role::Leader),
        node: "pine64-1".into(),
        engine: "unix:///var/run/docker.sock (29.0.1)".into(),
        ready: true,
        peers: vec!["rock64 (manager)".into(), "pine64-2 (worker)".into()],
        targets: vec![TargetStatus {
            name: "nginx".into(),
            output: "/etc/nginx/conf.d/drover.conf".into(),
            last_render: Some(NOW - 5),
            last_apply: Some(NOW - 125),
            hash: Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into()),
            check: CheckResult::Passed,
            error: None,
            skipped: vec![SkippedService {
                service: "blog".into(),
                label: "routing-max-body".into(),
                value: "10 GB".into(),
                reason: "not a size".into(),
            }],
            left_out: vec![LeftOutHost {
                host: "shop.example.com".into(),
                reason: "nginx: [emerg] cannot load certificate <x>".into(),
            }],
            without_certificate: vec!["new.example.com".into()],
            nodes: vec![],
        }],
        stacks: Vec::new(),
        certificates: Vec::new(),
        polls: Vec::new(),
    }
}

fn jobs() -> Value {
    json!([{
        "id": "j-42",
        "hook": "dockerhub",
        "state": "rolled_back",
        "created": NOW - 60,
        "services": [{
            "service": "web_api",
            "from": "owner/api:latest@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "to": "owner/api:latest@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            "outcome": "rolled_back",
            "message": "task failed: exit 1"
        }]
    }])
}

#[test]
fn contacts_show_the_controller_then_each_peer_with_its_last_contact() {
    use crate::cluster::contacts::{PeerView, View};
    let peer = |host: &str, ms: Option<u64>| PeerView {
        node: format!("id-{host}"),
        hostname: host.into(),
        address: "10.0.0.1:9092".into(),
        last_contact_ms_ago: ms,
    };
    let lines = contact_lines(&View {
        controller: Some(peer("rock64", Some(0))),
        peers: vec![peer("pine64", Some(2500)), peer("", None)],
    });
    assert_eq!(
        lines,
        vec![
            "rock64 (controller, 10.0.0.1:9092, last contact just now)",
            "pine64 (10.0.0.1:9092, last contact 2 s ago)",
            "id- (10.0.0.1:9092, never reached)",
        ]
    );
}

#[test]
fn renders_summary_targets_skipped_services_and_jobs() {
    let html = render_at(&summary(), &jobs(), NOW);
    assert!(html.contains("<meta name=\"viewport\""), "{html}");
    assert!(html.contains("id=\"targets\""));
    assert!(html.contains(
        "class=\"target card\" id=\"target-nginx\" data-name=\"nginx\" data-check=\"ok\""
    ));
    assert!(html.contains("/etc/nginx/conf.d/drover.conf"));
    assert!(html.contains(">0123456789ab<"), "short hash shown");
    assert!(html.contains("2024-05-01 11:59:55 UTC (5s ago)"), "{html}");
    assert!(html.contains("2024-05-01 11:57:55 UTC (2m ago)"), "{html}");
    assert!(html.contains("data-service=\"blog\" data-label=\"routing-max-body\""));
    assert!(html.contains("10 GB") && html.contains("not a size"));
    assert!(html.contains("data-host=\"shop.example.com\""), "{html}");
    assert!(html.contains("cannot load certificate &lt;x&gt;"), "{html}");
    assert!(html.contains("data-waiting=\"new.example.com\""), "{html}");
    assert!(html.contains("id=\"jobs\""));
    assert!(html.contains(
        "class=\"job card\" id=\"job-j-42\" data-id=\"j-42\" data-state=\"rolled_back\""
    ));
    assert!(html.contains("data-service=\"web_api\" data-outcome=\"rolled_back\""));
    assert!(
        html.contains("owner/api:latest@sha256:bbbbbbbbbbbb<"),
        "{html}"
    );
    assert!(html.contains("task failed: exit 1"));
    assert!(html.contains("data-role=\"leader\"") && html.contains("rock64 (manager)"));
    assert!(html.contains("data-ready=\"true\""));
    assert!(!html.contains("<script"), "no javascript");
}

#[test]
fn label_values_and_job_messages_are_escaped() {
    let mut s = summary();
    s.targets[0].skipped[0].value = "<script>alert(1)</script>".into();
    s.targets[0].error = Some("nginx: [emerg] \"<b>\" & co".into());
    let jobs = json!([{"id": "x", "state": "failed",
            "services": [{"service": "a", "message": "<script>alert(2)</script>"}]}]);
    let html = render_at(&s, &jobs, NOW);
    assert!(!html.contains("<script>"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(html.contains("&lt;script&gt;alert(2)"), "{html}");
    assert!(html.contains("&lt;b&gt;"), "{html}");
}

#[test]
fn jobs_with_missing_or_odd_fields_still_render() {
    let jobs = json!([{}, {"id": 7, "state": null, "services": "nope"}, "junk",
            {"id": "w", "state": "queued", "created": 1.5e9, "facts": {"repository": "owner/app", "tag": "latest"}}]);
    let html = render_at(&Summary::default(), &jobs, NOW);
    assert!(html.contains("data-state=\"unknown\""), "{html}");
    assert!(html.contains("data-id=\"7\""), "{html}");
    assert!(html.contains("data-state=\"queued\""), "{html}");
    assert!(html.contains("owner/app:latest"), "{html}");
    assert!(html.contains("No targets yet."));
}

#[test]
fn the_jobs_module_shape_renders_too() {
    let jobs = json!([{"id": "0007", "hook": "hub", "state": "completed", "action": "update-services",
            "image": "docker.io/owner/app:latest", "facts": {"hook": "hub", "repository": "owner/app", "tag": "latest"},
            "requests": 5, "created_at": (NOW - 30) * 1000,
            "services": [{"service": "home_app", "from_image": "owner/app:latest@sha256:aaaa",
                "to_image": "owner/app:latest@sha256:bbbb", "outcome": "completed", "message": "updated"}]}]);
    let html = render_at(&summary(), &jobs, NOW);
    assert!(
        html.contains("docker.io/owner/app:latest (5 requests coalesced)"),
        "{html}"
    );
    assert!(html.contains("(30s ago)"), "{html}");
    assert!(
        html.contains("title=\"owner/app:latest@sha256:bbbb\""),
        "{html}"
    );
    assert!(html.contains("data-outcome=\"completed\""), "{html}");
}

#[test]
fn a_completed_job_message_is_not_shown_as_an_error() {
    let jobs = json!([
        {"id": "1", "hook": "ci", "state": "completed", "message": "exit code 0"},
        {"id": "2", "hook": "ci", "state": "failed", "message": "exit code 3"}
    ]);
    let html = render_at(&summary(), &jobs, NOW);
    assert!(!html.contains("exit code 0"), "{html}");
    assert!(html.contains("exit code 3"), "{html}");
}

#[test]
fn a_non_array_job_list_shows_no_jobs() {
    let html = render_at(&summary(), &json!({"error": "unavailable"}), NOW);
    assert!(html.contains("No jobs yet."));
    let html = render_at(
        &summary(),
        &json!({"jobs": [{"id": "a", "state": "completed"}]}),
        NOW,
    );
    assert!(html.contains("data-state=\"completed\""));
}

#[test]
fn failed_check_is_marked_bad() {
    let mut s = summary();
    s.targets[0].check = CheckResult::Failed("nginx: [emerg] unknown directive".into());
    let html = render_at(&s, &Value::Null, NOW);
    assert!(html.contains("data-check=\"bad\""), "{html}");
    assert!(html.contains("class=\"badge bad\">failed<"), "{html}");
}

#[test]
fn dates_convert_to_utc_calendar_days() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(19_844), (2024, 5, 1));
    assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    assert_eq!(format_time(None, NOW), "never");
    assert_eq!(format_time(Some(NOW + 10), NOW), "2024-05-01 12:00:10 UTC");
    assert_eq!(human_duration(90_000), "1d1h");
}

#[test]
fn each_stack_shows_its_deployed_commit_last_trigger_outcome_and_whether_the_branch_is_ahead() {
    let mut s = summary();
    s.stacks = vec![
        crate::status::StackStatus {
            name: "web".into(),
            branch: "main".into(),
            deployed: Some("a".repeat(40)),
            head: Some("b".repeat(40)),
            last_trigger: Some("github".into()),
            last_at: Some(NOW - 30),
            outcome: Some("failed".into()),
            message: Some("stack web: exit code 1: <script>".into()),
        },
        crate::status::StackStatus {
            name: "mon".into(),
            branch: "main".into(),
            deployed: Some("c".repeat(40)),
            head: Some("c".repeat(40)),
            outcome: Some("completed".into()),
            ..Default::default()
        },
    ];
    let html = render_at(&s, &jobs(), NOW);
    assert!(
        html.contains(r#"data-name="web" data-ahead="true""#),
        "{html}"
    );
    assert!(
        html.contains(r#"data-name="mon" data-ahead="false""#),
        "{html}"
    );
    assert!(
        html.contains(&"a".repeat(12)) && html.contains("github"),
        "{html}"
    );
    assert!(!html.contains("<script>"), "messages are escaped");
}

#[test]
fn each_certificate_shows_its_names_expiry_renewal_and_last_error() {
    let mut s = summary();
    s.certificates = vec![
        crate::status::CertificateStatus {
            host: "shop.example.com".into(),
            names: vec!["shop.example.com".into(), "www.shop.example.com".into()],
            not_after: Some(NOW as i64 + 90 * 86_400),
            renew_at: Some(NOW as i64 + 60 * 86_400),
            error: None,
            retry_at: None,
        },
        crate::status::CertificateStatus {
            host: "bad.example.com".into(),
            names: vec!["bad.example.com".into()],
            error: Some("the order for [bad.example.com] ended invalid: <b>".into()),
            retry_at: Some(NOW as i64 + 60),
            ..Default::default()
        },
    ];
    let html = render_at(&s, &jobs(), NOW);
    assert!(html.contains(r#"data-host="shop.example.com""#), "{html}");
    assert!(
        html.contains("shop.example.com, www.shop.example.com")
            && html.contains("2024-07-30 12:00:00 UTC")
            && html.contains("2024-06-30 12:00:00 UTC"),
        "{html}"
    );
    assert!(
        html.contains("ended invalid") && html.contains("retry 2024-05-01 12:01:00 UTC"),
        "{html}"
    );
    assert!(!html.contains("<b>"), "the CA's words are escaped");
}

#[test]
fn each_polled_image_shows_its_services_digest_next_check_and_the_job_it_queued() {
    let mut s = summary();
    s.polls = vec![
        crate::status::PollStatus {
            image: "docker.io/me/app:main".into(),
            services: vec!["web_app".into(), "web_worker".into()],
            every: 300,
            digest: Some(format!("sha256:{}", "d".repeat(64))),
            last_at: Some(NOW - 10),
            next_at: Some(NOW + 290),
            outcome: Some("changed".into()),
            message: Some("update of web_app queued".into()),
            job: Some("j-7".into()),
        },
        crate::status::PollStatus {
            image: "ghcr.io/me/private:1".into(),
            services: vec!["private".into()],
            every: 60,
            outcome: Some("unauthorized".into()),
            message: Some("registry ghcr.io: not authorized <x>".into()),
            ..Default::default()
        },
    ];
    let html = render_at(&s, &jobs(), NOW);
    assert!(
        html.contains(r#"data-image="docker.io/me/app:main" data-outcome="changed""#),
        "{html}"
    );
    assert!(html.contains("web_app, web_worker"), "{html}");
    assert!(
        html.contains(&"d".repeat(12)) && !html.contains(&"d".repeat(13)),
        "{html}"
    );
    assert!(
        html.contains("in 4m 50s") && html.contains("#job-j-7"),
        "{html}"
    );
    assert!(
        html.contains(r#"data-outcome="unauthorized""#) && !html.contains("<x>"),
        "{html}"
    );
}
