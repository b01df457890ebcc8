// apply: staging, steps and queries
mod stage_and_steps {
    use super::super::stage::*;
    use super::super::*;
    use crate::config::Selector;
    use crate::state::{
        STACK_LABEL, names_service, own_stack, resolve_services, select_containers,
    };
    use std::path::Path;

    #[test]
    fn write_file_replaces_atomically_and_keeps_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("a.conf");
        write_file(&out, b"1").expect("write");
        write_file(&out, b"2").expect("write");
        assert_eq!(std::fs::read(&out).expect("read"), b"2");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    }

    #[test]
    fn selectors_pick_running_containers_by_service_name_and_label() {
        use crate::state::Container;
        let c = |id: &str, name: &str, svc: Option<&str>, label: Option<(&str, &str)>| Container {
            id: id.into(),
            name: name.into(),
            state: "running".into(),
            service: svc.map(str::to_owned),
            labels: label
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Container::default()
        };
        let snap = Snapshot {
            containers: vec![
                c("a1", "nginx.1.x", Some("nginx"), None),
                c("b2", "other", None, Some(("pygen.target", "proxy"))),
            ],
            ..Snapshot::default()
        };
        let sel = |s: Option<&str>, n: Option<&str>, l: Option<&str>| Selector {
            service: s.map(str::to_owned),
            container: n.map(str::to_owned),
            label: l.map(str::to_owned),
        };
        assert_eq!(
            select_containers(&sel(Some("nginx"), None, None), &snap),
            vec!["a1"]
        );
        assert_eq!(
            select_containers(&sel(None, Some("other"), None), &snap),
            vec!["b2"]
        );
        assert_eq!(
            select_containers(&sel(None, None, Some("pygen.target=proxy")), &snap),
            vec!["b2"]
        );
        assert_eq!(
            select_containers(&sel(None, None, Some("pygen.target")), &snap),
            vec!["b2"]
        );
        assert!(select_containers(&sel(None, None, Some("pygen.target=x")), &snap).is_empty());
    }

    #[test]
    fn a_service_reference_names_the_service_itself_or_the_same_name_in_the_own_stack() {
        let cases = [
            ("nginx", "nginx", None, true),
            ("nginx", "nginx", Some("home"), true),
            ("nginx", "home_nginx", Some("home"), true),
            ("home_nginx", "home_nginx", Some("home"), true),
            ("nginx", "home_nginx", None, false),
            ("nginx", "other_nginx", Some("home"), false),
            ("nginx", "homenginx", Some("home"), false),
            ("nginx", "home_nginx2", Some("home"), false),
            ("nginx", "home_web_nginx", Some("home"), false),
            ("ngin", "home_nginx", Some("home"), false),
        ];
        for (reference, service, stack, expected) in cases {
            assert_eq!(
                names_service(reference, service, stack),
                expected,
                "{reference:?} names {service:?} in stack {stack:?}"
            );
        }
    }

    fn stack_snapshot() -> Snapshot {
        use crate::state::{Container, Own, Service};
        let c = |id: &str, service: &str, stack: &str| Container {
            id: id.into(),
            name: format!("{service}.1.x"),
            state: "running".into(),
            service: Some(service.into()),
            labels: [(STACK_LABEL.to_owned(), stack.to_owned())].into(),
            ..Container::default()
        };
        let svc = |name: &str| Service {
            name: name.into(),
            ..Service::default()
        };
        Snapshot {
            swarm: true,
            containers: vec![
                c("d1", "home_drover", "home"),
                c("n1", "home_nginx", "home"),
                c("n2", "other_nginx", "other"),
            ],
            services: vec![svc("home_drover"), svc("home_nginx"), svc("other_nginx")],
            own: Some(Own {
                container_id: "d1".into(),
                service: Some("home_drover".into()),
            }),
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_shipped_service_name_reaches_nginx_of_drovers_own_stack_only() {
        let snap = stack_snapshot();
        assert_eq!(own_stack(&snap), Some("home"));
        let on = Selector {
            service: Some("nginx".into()),
            container: None,
            label: None,
        };
        assert_eq!(select_containers(&on, &snap), vec!["n1"]);
        assert_eq!(resolve_services("nginx", &snap), vec!["home_nginx"]);
        assert_eq!(resolve_services("other_nginx", &snap), vec!["other_nginx"]);
        assert_eq!(resolve_services("missing", &snap), vec!["missing"]);
    }

    #[test]
    fn a_tenants_container_or_bare_service_named_nginx_never_answers_for_the_stacks_nginx() {
        use crate::state::Container;
        let mut snap = stack_snapshot();
        // A tenant's container claiming to be Compose service `nginx`, and a bare Swarm
        // service called `nginx` outside any stack.
        snap.containers.push(Container {
            id: "t1".into(),
            name: "tenant".into(),
            state: "running".into(),
            labels: [("com.docker.compose.service".to_owned(), "nginx".to_owned())].into(),
            ..Container::default()
        });
        snap.containers.push(Container {
            id: "t2".into(),
            name: "nginx.1.y".into(),
            state: "running".into(),
            service: Some("nginx".into()),
            ..Container::default()
        });
        let on = Selector {
            service: Some("nginx".into()),
            container: None,
            label: None,
        };
        assert_eq!(select_containers(&on, &snap), vec!["n1"]);
        // Outside Swarm a Compose service label still names its containers.
        snap.swarm = false;
        snap.containers.retain(|c| c.id == "t1");
        assert_eq!(select_containers(&on, &snap), vec!["t1"]);
    }

    #[test]
    fn the_own_stack_comes_from_the_own_service_when_the_container_has_no_stack_label() {
        let mut snap = stack_snapshot();
        snap.containers[0].labels.clear();
        assert_eq!(own_stack(&snap), None);
        snap.services[0]
            .labels
            .insert(STACK_LABEL.into(), "home".into());
        assert_eq!(own_stack(&snap), Some("home"));
    }

    #[test]
    fn outside_a_container_a_bare_name_matches_only_itself() {
        let mut snap = stack_snapshot();
        snap.own = None;
        let on = Selector {
            service: Some("nginx".into()),
            container: None,
            label: None,
        };
        assert!(select_containers(&on, &snap).is_empty());
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn nginx_config_tests_are_recognised_with_the_main_config_they_name() {
        /// (argv, expected (main config, argv without `-c`))
        type Case<'a> = (&'a [&'a str], Option<(&'a str, &'a [&'a str])>);
        let cases: [Case; 8] = [
            (&["nginx", "-t"], Some(("", &["nginx", "-t"]))),
            (
                &["/usr/sbin/nginx", "-tq"],
                Some(("", &["/usr/sbin/nginx", "-tq"])),
            ),
            (
                &["nginx", "-t", "-c", "/etc/n.conf"],
                Some(("/etc/n.conf", &["nginx", "-t"])),
            ),
            (
                &["nginx", "-c/etc/n.conf", "-T"],
                Some(("/etc/n.conf", &["nginx", "-T"])),
            ),
            (
                &["nginx", "-g", "pid /t;", "-t"],
                Some(("", &["nginx", "-g", "pid /t;", "-t"])),
            ),
            (&["nginx", "-s", "reload"], None),
            (&["nginx", "-g", "-t"], None),
            (&["sh", "-c", "nginx -t"], None),
        ];
        for (argv, expected) in cases {
            let got = nginx_test(&strings(argv));
            let expected = expected.map(|(m, a)| (m.to_owned(), strings(a)));
            assert_eq!(got, expected, "{argv:?}");
        }
    }

    #[test]
    fn checks_that_can_read_a_candidate_beside_the_live_file_are_told_where_it_is() {
        let out = Path::new("/etc/nginx/conf.d/drover.conf");
        let cand = Path::new("/etc/nginx/conf.d/.drover.conf.drover-candidate");
        let grep = strings(&["grep", "-q", "x", "{file}"]);
        assert!(checks_candidate(&Action::Command(grep.clone())));
        assert_eq!(
            staged_argv(&grep, out, cand),
            strings(&[
                "grep",
                "-q",
                "x",
                "/etc/nginx/conf.d/.drover.conf.drover-candidate"
            ])
        );
        let wrapped = staged_argv(&strings(&["nginx", "-t"]), out, cand);
        assert_eq!(wrapped[..2], strings(&["sh", "-c"]));
        assert_eq!(
            wrapped[3..],
            strings(&[
                "sh",
                "drover.conf",
                ".drover.conf.drover-candidate",
                "",
                "/etc/nginx/conf.d",
                "nginx",
                "-t"
            ])
        );
        let live = strings(&["test", "-s", "/etc/nginx/conf.d/drover.conf"]);
        assert!(!checks_candidate(&Action::Command(live.clone())));
        assert_eq!(staged_argv(&live, out, cand), live);
    }

    fn local_target(dir: &Path, check: Vec<String>) -> Target {
        Target {
            name: "t".into(),
            template: "builtin:nginx".into(),
            output: dir.join("out.conf"),
            network: None,
            debounce: Default::default(),
            check: Some(Action::Command(check)),
            notify: vec![],
            delivery: Default::default(),
            private_networks: Default::default(),
            vars: Default::default(),
            owners: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_staged_candidate_is_checked_beside_the_live_file_and_a_failed_one_never_reaches_it()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        // Passes only for content saying "good", and fails if the live file ever holds
        // the bad candidate.
        let script = format!("grep -q good \"$0\" && ! grep -q bad {}", out.display());
        let t = local_target(dir.path(), strings(&["sh", "-c", &script, "{file}"]));
        let mut a = Applier::new(&t);
        let snapshot = Snapshot::default();
        let check = t.check.clone().expect("check");
        for (content, passes) in [(&b"good 1"[..], true), (b"bad", false), (b"good 2", true)] {
            let before = std::fs::read(&out).ok();
            a.stage(content).expect("stage");
            assert_eq!(
                std::fs::read(&out).ok(),
                before,
                "the live file is untouched"
            );
            let checked = a.check(&check, None, &snapshot).await;
            assert_eq!(checked.is_ok(), passes, "{checked:?}");
            if passes {
                a.commit(content).expect("commit");
                assert_eq!(std::fs::read(&out).expect("read"), content);
            } else {
                a.restore().expect("restore");
                assert_eq!(std::fs::read(&out).ok(), before);
            }
            assert!(!dir.path().join(".out.conf.drover-candidate").exists());
        }
        assert_eq!(a.current_hash(), Some(sha256_hex(b"good 2").as_str()));
    }

    #[tokio::test]
    async fn a_crash_during_a_staged_check_leaves_the_last_good_file_live_and_nothing_current_to_skip()
     {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        let t = local_target(dir.path(), strings(&["test", "-s", "{file}"]));
        let mut a = Applier::new(&t);
        a.stage(b"good").expect("stage");
        a.commit(b"good").expect("commit");
        a.stage(b"next").expect("stage");
        // Killed here: the candidate is staged, its check never finished.
        drop(a);
        assert_eq!(std::fs::read(&out).expect("read"), b"good");
        let restarted = Applier::new(&t);
        assert!(!dir.path().join(".out.conf.drover-candidate").exists());
        assert_eq!(restarted.current_hash(), Some(sha256_hex(b"good").as_str()));
    }

    #[tokio::test]
    async fn a_live_file_left_unchecked_is_replaced_by_the_last_good_when_the_next_candidate_fails()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        let passes = local_target(dir.path(), strings(&["test", "-s", "{file}"]));
        let mut a = Applier::new(&passes);
        a.stage(b"good").expect("stage");
        a.commit(b"good").expect("commit");
        // What a crash under a check that reads the live path leaves behind.
        std::fs::write(&out, b"unchecked").expect("write");
        let fails = local_target(dir.path(), strings(&["sh", "-c", "false", "{file}"]));
        let mut a = Applier::new(&fails);
        assert_eq!(a.current_hash(), None);
        a.stage(b"unchecked").expect("stage");
        assert!(
            a.check(
                fails.check.as_ref().expect("check"),
                None,
                &Snapshot::default()
            )
            .await
            .is_err()
        );
        a.restore().expect("restore");
        assert_eq!(std::fs::read(&out).expect("read"), b"good");
        assert_eq!(a.current_hash(), Some(sha256_hex(b"good").as_str()));
    }

    #[tokio::test]
    async fn a_check_that_cannot_see_the_candidate_falls_back_to_checking_the_live_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        // Says what the staged nginx check says when only the live file is mounted into
        // its container, and otherwise checks the live path.
        let script = format!(
            "case \"$0\" in *candidate) echo 'drover: the candidate is not here' >&2; exit 3;; esac; grep -q good {}",
            out.display()
        );
        let t = local_target(dir.path(), strings(&["sh", "-c", &script, "{file}"]));
        let check = t.check.clone().expect("check");
        let mut a = Applier::new(&t);
        a.stage(b"good 1").expect("stage");
        a.check(&check, None, &Snapshot::default())
            .await
            .expect("checked at the live path");
        a.commit(b"good 1").expect("commit");
        assert_eq!(std::fs::read(&out).expect("read"), b"good 1");
        assert!(!dir.path().join(".out.conf.drover-candidate").exists());
        a.stage(b"bad").expect("stage");
        assert!(a.check(&check, None, &Snapshot::default()).await.is_err());
        a.restore().expect("restore");
        assert_eq!(std::fs::read(&out).expect("read"), b"good 1");
    }

    /// Runs [`NGINX_STAGED_CHECK`] with a stand-in for nginx that prints every file the
    /// staged main config includes (relative includes from the main config's directory,
    /// as nginx resolves them).
    async fn staged_includes(main_text: &str, conf_d_under_main: bool, name_main: bool) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let top = root.join("etc");
        let conf_d = if conf_d_under_main {
            top.join("conf.d")
        } else {
            root.join("srv")
        };
        std::fs::create_dir_all(&conf_d).expect("mkdir");
        std::fs::create_dir_all(&top).expect("mkdir");
        let fake = root.join("nginx");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\n[ \"$1\" = -V ] && {{ echo \"configure arguments: --prefix=/x --conf-path={} --with-y\"; exit 0; }}\n\
             while [ $# -gt 0 ]; do case \"$1\" in -c) conf=\"$2\"; shift 2;; *) shift;; esac; done\n\
             cd \"$(dirname \"$conf\")\" || exit 9\n\
             for pat in $(sed -n 's/^ *include \\(.*\\);/\\1/p' \"$conf\"); do for f in $pat; do echo \"$f: $(cat \"$f\")\"; done; done\n",
             top.join("nginx.conf").display()),
        )
        .expect("write");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let main_text = main_text
            .replace("TOP", &top.display().to_string())
            .replace("CONFD", &conf_d.display().to_string());
        std::fs::write(top.join("nginx.conf"), main_text).expect("write");
        std::fs::write(top.join("mime.types"), "types").expect("write");
        std::fs::write(conf_d.join("other.conf"), "other").expect("write");
        std::fs::write(conf_d.join("drover.conf"), "live").expect("write");
        let output = conf_d.join("drover.conf");
        let candidate = conf_d.join(".drover.conf.drover-candidate");
        std::fs::write(&candidate, "candidate").expect("write");
        let main = top.join("nginx.conf").display().to_string();
        let fake = fake.display().to_string();
        let nginx = if name_main {
            strings(&[&fake, "-t", "-c", &main])
        } else {
            strings(&[&fake, "-t"])
        };
        let argv = staged_argv(&nginx, &output, &candidate);
        let out = crate::process::run(&argv, &[], std::time::Duration::from_secs(30), 10_000)
            .await
            .expect("run");
        assert!(out.success(), "{}", out.summary());
        assert_eq!(std::fs::read(&output).expect("read"), b"live");
        out.stdout
    }

    #[tokio::test]
    async fn the_staged_nginx_check_includes_the_candidate_in_place_of_the_live_file() {
        for (main, under, named) in [
            (
                "include TOP/mime.types;\ninclude CONFD/*.conf;\n",
                false,
                true,
            ),
            (
                "include TOP/mime.types;\ninclude TOP/conf.d/*.conf;\n",
                true,
                true,
            ),
            ("include mime.types;\ninclude conf.d/*.conf;\n", true, true),
            // No `-c`: the main config nginx was built with (`nginx -V`).
            ("include mime.types;\ninclude conf.d/*.conf;\n", true, false),
        ] {
            let seen = staged_includes(main, under, named).await;
            assert!(seen.contains("/drover.conf: candidate"), "{main}: {seen}");
            assert!(seen.contains("/other.conf: other"), "{main}: {seen}");
            assert!(seen.contains("mime.types: types"), "{main}: {seen}");
            assert!(!seen.contains("live"), "{main}: {seen}");
        }
    }
}

// the one executor
mod executor {
    use super::super::*;
    use std::path::Path;

    use tokio::time::Instant;

    use crate::config::{Action, Target};

    fn target(dir: &Path, check: Option<Action>) -> Target {
        Target {
            check,
            ..Target::new("t", "builtin:nginx", dir.join("out.conf"))
        }
    }

    /// One target on one node, applied as the loop and the agents do.
    struct Harness {
        local: Local,
    }

    impl Harness {
        fn new(target: Target) -> Harness {
            Harness {
                local: Local::new(&target),
            }
        }

        async fn apply(&mut self, content: &[u8]) -> Outcome {
            let none = std::collections::BTreeSet::new();
            let candidate = Candidate {
                pairs: &[],
                pair_dir: None,
                content,
                tls: &[],
                with_certificates: &none,
                resync: false,
            };
            self.local
                .apply(candidate, None, &Snapshot::default(), Instant::now())
                .await
                .expect("apply")
                .outcome
        }
    }

    #[tokio::test]
    async fn unchanged_content_is_not_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::new(target(dir.path(), None));
        assert_eq!(h.apply(b"one").await, Outcome::Applied);
        assert_eq!(h.apply(b"one").await, Outcome::Unchanged);
        assert_eq!(
            std::fs::read(dir.path().join("out.conf")).expect("read"),
            b"one"
        );
    }

    #[tokio::test]
    async fn failed_check_restores_the_last_good_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        // The check passes only while the file says "good".
        let check = Action::Command(vec![
            "grep".into(),
            "-q".into(),
            "good".into(),
            out.display().to_string(),
        ]);
        let mut h = Harness::new(target(dir.path(), Some(check)));
        assert_eq!(h.apply(b"good 1").await, Outcome::Applied);
        let outcome = h.apply(b"bad").await;
        assert!(matches!(outcome, Outcome::CheckFailed(_)), "{outcome:?}");
        assert_eq!(std::fs::read(&out).expect("read"), b"good 1");
        assert_eq!(h.apply(b"bad").await, Outcome::KnownBad);
        assert_eq!(h.apply(b"good 2").await, Outcome::Applied);
    }

    #[tokio::test]
    async fn failed_first_check_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness::new(target(
            dir.path(),
            Some(Action::Command(vec!["false".into()])),
        ));
        let outcome = h.apply(b"x").await;
        assert!(matches!(outcome, Outcome::CheckFailed(_)), "{outcome:?}");
        assert!(!dir.path().join("out.conf").exists());
    }

    #[tokio::test]
    async fn a_restart_starts_from_the_checked_file_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = target(dir.path(), Some(Action::Command(vec!["true".into()])));
        assert_eq!(
            Harness::new(t.clone()).apply(b"same").await,
            Outcome::Applied
        );
        let mut fails = t;
        fails.check = Some(Action::Command(vec!["false".into()]));
        assert_eq!(Harness::new(fails).apply(b"same").await, Outcome::Unchanged);
    }

    #[tokio::test]
    async fn a_restart_checks_a_file_left_unchecked_by_a_crash_and_restores_the_last_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.conf");
        let t = target(dir.path(), Some(Action::Command(vec!["true".into()])));
        assert_eq!(
            Harness::new(t.clone()).apply(b"good").await,
            Outcome::Applied
        );
        // A crash between staging a candidate and its check leaves the candidate live.
        std::fs::write(&out, b"unchecked").expect("write");
        let mut fails = t;
        fails.check = Some(Action::Command(vec!["false".into()]));
        let outcome = Harness::new(fails).apply(b"unchecked").await;
        assert!(matches!(outcome, Outcome::CheckFailed(_)), "{outcome:?}");
        assert_eq!(std::fs::read(&out).expect("read"), b"good");
    }

    #[tokio::test]
    async fn a_file_from_before_records_existed_counts_as_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("out.conf"), b"old").expect("write");
        let t = target(dir.path(), Some(Action::Command(vec!["false".into()])));
        assert_eq!(Harness::new(t).apply(b"old").await, Outcome::Unchanged);
    }

    #[tokio::test]
    async fn a_failed_notify_keeps_the_checked_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = target(dir.path(), Some(Action::Command(vec!["true".into()])));
        t.notify = vec![Action::Command(vec!["false".into()])];
        let mut h = Harness::new(t);
        let outcome = h.apply(b"kept").await;
        assert!(matches!(outcome, Outcome::NotifyFailed(_)), "{outcome:?}");
        assert_eq!(
            std::fs::read(dir.path().join("out.conf")).expect("read"),
            b"kept"
        );
        assert_eq!(h.apply(b"kept").await, Outcome::Unchanged);
    }
}

// the report as it crosses the agent API
mod wire {
    use std::collections::BTreeSet;

    use crate::apply::{LeftOutHost, Outcome, Report};

    #[test]
    fn every_outcome_crosses_the_wire_as_itself_with_the_rest_of_the_report() {
        let outcomes = [
            Outcome::Unchanged,
            Outcome::Applied,
            Outcome::NotifyFailed("hup".into()),
            Outcome::CheckFailed("[emerg] x".into()),
            Outcome::CheckUnavailable("no nginx".into()),
            Outcome::KnownBad,
            Outcome::Waiting,
            Outcome::Rerender,
        ];
        for outcome in outcomes {
            let report = Report {
                outcome,
                hash: Some("ab".into()),
                left_out: vec![LeftOutHost {
                    host: "bad.test".into(),
                    reason: "key mismatch".into(),
                }],
                certificates: Some(BTreeSet::from(["good.test".to_owned()])),
            };
            let json = serde_json::to_string(&report).expect("serialise");
            assert!(
                json.contains(&format!("\"outcome\":\"{}\"", report.outcome.label())),
                "{json}"
            );
            let back: Report = serde_json::from_str(&json).expect("deserialise");
            assert_eq!(back, report, "{json}");
        }
    }
}
