use super::*;

/// Counts runs and answers with a fixed outcome after an optional delay.
pub(crate) struct FakeRunner {
    pub runs: Mutex<Vec<RunContext>>,
    pub outcome: Outcome,
    pub delay: Duration,
}

impl FakeRunner {
    pub(crate) fn new(state: JobState) -> Arc<FakeRunner> {
        Arc::new(FakeRunner {
            runs: Mutex::default(),
            outcome: Outcome {
                state,
                message: None,
                services: Vec::new(),
                exit_code: None,
                log_tail: None,
            },
            delay: Duration::ZERO,
        })
    }
    pub(crate) fn count(&self) -> usize {
        self.runs.lock().map(|r| r.len()).unwrap_or(0)
    }
}

impl Runner for FakeRunner {
    fn run(&self, job: RunContext) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            if let Ok(mut r) = self.runs.lock() {
                r.push(job);
            }
            tokio::time::sleep(self.delay).await;
            self.outcome.clone()
        })
    }
}

fn update(image: &str) -> Request {
    Request {
        hook: "hub".into(),
        work: Work::UpdateServices {
            image: image.into(),
            digest: None,
            only: Vec::new(),
        },
        facts: Facts {
            hook: "hub".into(),
            image: Some(image.into()),
            ..Facts::default()
        },
        quiet: Duration::from_secs(10),
    }
}

/// The config these tests run with: one hook, `hub`, updating the image its facts name.
pub(crate) fn resolve() -> Resolve {
    Arc::new(|hook: &str, facts: &Facts| match (hook, &facts.image) {
        ("hub", Some(image)) => Ok(Work::UpdateServices {
            image: image.clone(),
            digest: None,
            only: Vec::new(),
        }),
        _ => Err("the hook is no longer configured".into()),
    })
}

async fn jobs(runner: Arc<FakeRunner>, queue: usize) -> Arc<Jobs> {
    let limits = config::Jobs {
        queue,
        history: 3,
        ..config::Jobs::default()
    };
    start(limits, runner, Journal::Memory, CancellationToken::new()).await
}

async fn start(
    limits: config::Jobs,
    runner: Arc<FakeRunner>,
    journal: Journal,
    stop: CancellationToken,
) -> Arc<Jobs> {
    Jobs::start(limits, runner, resolve(), journal, stop)
        .await
        .expect("start")
}

async fn submit(jobs: &Arc<Jobs>, image: &str) -> Submitted {
    jobs.submit(update(image)).await.expect("submit")
}

async fn settle(jobs: &Jobs, id: &JobId) -> JobView {
    for _ in 0..1000 {
        if let Some(j) = jobs.get(&id.0) {
            if j.state.is_final() {
                return j;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} never finished");
}

#[tokio::test(start_paused = true)]
async fn a_burst_within_the_quiet_window_becomes_one_run() {
    let runner = FakeRunner::new(JobState::Completed);
    let jobs = jobs(runner.clone(), 8).await;
    let first = submit(&jobs, "docker.io/o/r:latest").await;
    assert!(!first.coalesced);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let s = submit(&jobs, "docker.io/o/r:latest").await;
        assert_eq!(s.id, first.id);
        assert!(s.coalesced);
    }
    assert_eq!(jobs.get(&first.id.0).expect("job").state, JobState::Queued);
    let done = settle(&jobs, &first.id).await;
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.requests, 6);
    assert_eq!(runner.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn different_tags_are_not_coalesced() {
    let runner = FakeRunner::new(JobState::Completed);
    let jobs = jobs(runner.clone(), 8).await;
    let a = submit(&jobs, "docker.io/o/r:latest").await;
    let b = submit(&jobs, "docker.io/o/r:stable").await;
    assert_ne!(a.id, b.id);
    settle(&jobs, &a.id).await;
    settle(&jobs, &b.id).await;
    assert_eq!(runner.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_steady_stream_cannot_postpone_the_run_forever() {
    let runner = FakeRunner::new(JobState::Completed);
    let jobs = jobs(runner.clone(), 8).await;
    let first = submit(&jobs, "docker.io/o/r:latest").await;
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if jobs.get(&first.id.0).expect("job").state != JobState::Queued {
            break;
        }
        submit(&jobs, "docker.io/o/r:latest").await;
    }
    assert!(
        started.elapsed() <= Duration::from_secs(35),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_after_the_run_started_gets_a_new_job() {
    let runner = FakeRunner::new(JobState::Completed);
    let jobs = jobs(runner.clone(), 8).await;
    let a = submit(&jobs, "docker.io/o/r:latest").await;
    settle(&jobs, &a.id).await;
    let b = submit(&jobs, "docker.io/o/r:latest").await;
    assert_ne!(a.id, b.id);
    settle(&jobs, &b.id).await;
    assert_eq!(runner.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_new_jobs_but_still_coalesces() {
    let runner = FakeRunner::new(JobState::Completed);
    let jobs = jobs(runner, 1).await;
    let a = submit(&jobs, "docker.io/o/a:latest").await;
    assert!(matches!(
        jobs.submit(update("docker.io/o/b:latest")).await,
        Err(Error::QueueFull)
    ));
    let again = jobs
        .submit(update("docker.io/o/a:latest"))
        .await
        .expect("coalesces");
    assert_eq!(again.id, a.id);
    settle(&jobs, &a.id).await;
    jobs.submit(update("docker.io/o/b:latest"))
        .await
        .expect("room again");
}

#[tokio::test(start_paused = true)]
async fn job_moves_from_queued_through_running_to_its_outcome() {
    let runner = Arc::new(FakeRunner {
        runs: Mutex::default(),
        outcome: Outcome {
            state: JobState::RolledBack,
            message: Some("rolled back".into()),
            services: Vec::new(),
            exit_code: None,
            log_tail: None,
        },
        delay: Duration::from_secs(30),
    });
    let jobs = jobs(runner, 8).await;
    let a = submit(&jobs, "docker.io/o/r:latest").await;
    assert_eq!(jobs.get(&a.id.0).expect("job").state, JobState::Queued);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let running = jobs.get(&a.id.0).expect("job");
    assert_eq!(running.state, JobState::Running);
    assert!(running.started_at.is_some());
    assert_eq!(jobs.active(), 1);
    let done = settle(&jobs, &a.id).await;
    assert_eq!(done.state, JobState::RolledBack);
    assert_eq!(done.message.as_deref(), Some("rolled back"));
    assert_eq!(jobs.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn history_keeps_only_the_newest_finished_jobs() {
    let runner = FakeRunner::new(JobState::Completed);
    let jobs = jobs(runner, 8).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let s = jobs
            .submit(update(&format!("docker.io/o/r{i}:latest")))
            .await
            .expect("submit");
        settle(&jobs, &s.id).await;
        ids.push(s.id);
    }
    let listed: Vec<JobId> = jobs.list().into_iter().map(|j| j.id).collect();
    assert_eq!(listed, vec![ids[4].clone(), ids[3].clone(), ids[2].clone()]);
}

fn journalled(hook: &str, image: &str) -> Journalled {
    Journalled {
        id: JobId::generate(),
        hook: hook.into(),
        facts: Facts {
            hook: hook.into(),
            image: Some(image.into()),
            ..Facts::default()
        },
        requests: 2,
        created_at: 1,
    }
}

#[tokio::test]
async fn file_journal_requeues_pending_jobs_on_start_and_drops_unknown_hooks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jobs.json");
    let pending = journalled("hub", "docker.io/o/r:latest");
    let gone = journalled("removed-hook", "docker.io/o/r:latest");
    let journal = Journal::file(path.clone());
    journal.put(&pending).await.expect("put");
    journal.put(&gone).await.expect("put");
    let runner = FakeRunner::new(JobState::Skipped);
    let jobs = start(
        config::Jobs::default(),
        runner.clone(),
        Journal::file(path.clone()),
        CancellationToken::new(),
    )
    .await;
    let done = settle(&jobs, &pending.id).await;
    assert_eq!(done.state, JobState::Skipped);
    assert_eq!(done.requests, 2);
    assert_eq!(
        done.work,
        Work::UpdateServices {
            image: "docker.io/o/r:latest".into(),
            digest: None,
            only: Vec::new(),
        },
        "the work is derived from the current config"
    );
    assert_eq!(runner.count(), 1, "the unknown hook's job did not run");
    assert!(jobs.get(&gone.id.0).is_none());
    let left: Vec<Journalled> =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    assert!(
        left.is_empty(),
        "finished or dropped job still journalled: {left:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_journal_keeps_the_hook_and_its_facts_not_the_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jobs.json");
    let runner = FakeRunner::new(JobState::Completed);
    let jobs = start(
        config::Jobs::default(),
        runner,
        Journal::file(path.clone()),
        CancellationToken::new(),
    )
    .await;
    let mut req = update("docker.io/o/r:latest");
    req.work = Work::Command {
        argv: vec!["secret-argv".into()],
    };
    let s = jobs.submit(req).await.expect("submit");
    let text = std::fs::read_to_string(&path).expect("read");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text).expect("json");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["id"], s.id.0.as_str());
    assert_eq!(entries[0]["hook"], "hub");
    assert_eq!(entries[0]["facts"]["image"], "docker.io/o/r:latest");
    assert!(
        !text.contains("secret-argv") && !text.contains("action"),
        "{text}"
    );
}

#[test]
fn an_entry_journalled_with_its_work_by_an_older_version_still_reads() {
    let old = r#"{"id":"abc-1","hook":"hub","state":"queued","action":"command",
        "argv":["rm","-rf"],"facts":{"hook":"hub"},"requests":1,"created_at":5}"#;
    let entry: Journalled = serde_json::from_str(old).expect("reads");
    assert_eq!(entry.hook, "hub");
    assert_eq!(entry.created_at, 5);
}

#[tokio::test]
async fn a_submission_dropped_mid_write_leaves_a_journalled_job_or_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jobs.json");
    let runner = FakeRunner::new(JobState::Completed);
    let jobs = start(
        config::Jobs::default(),
        runner.clone(),
        Journal::file(path.clone()),
        CancellationToken::new(),
    )
    .await;
    let mut req = update("docker.io/o/r:latest");
    req.quiet = Duration::ZERO;
    // Polled once (the write is spawned), then dropped like a request whose client left.
    // The blocking write may already be done by then, so the submission may also have
    // finished: either way the job must be journalled and run exactly once.
    let _ = tokio::time::timeout(Duration::ZERO, jobs.submit(req)).await;
    for _ in 0..100 {
        if runner.count() == 1 && jobs.active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(runner.count(), 1, "the journalled job did not run");
    assert_eq!(jobs.active(), 0, "a slot stayed taken");
    let all = jobs.list();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, JobState::Completed);
}

#[tokio::test]
async fn a_failed_journal_write_creates_no_job_and_frees_its_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing-dir").join("jobs.json");
    let runner = FakeRunner::new(JobState::Completed);
    let limits = config::Jobs {
        queue: 1,
        ..config::Jobs::default()
    };
    let jobs = start(
        limits,
        runner.clone(),
        Journal::file(path),
        CancellationToken::new(),
    )
    .await;
    for _ in 0..2 {
        let r = jobs.submit(update("docker.io/o/r:latest")).await;
        assert!(matches!(r, Err(Error::Journal(_))), "{r:?}");
    }
    assert!(jobs.list().is_empty());
    assert_eq!(jobs.active(), 0);
    assert_eq!(runner.count(), 0);
}

/// Two instances on one shared journal, as two managers on Swarm's: A leads and is
/// lost while its job waits; B stands by with a job of its own running, then becomes
/// leader.
#[tokio::test(start_paused = true)]
async fn leadership_that_moves_runs_the_pending_journalled_jobs_once_on_the_new_leader() {
    let shared = Arc::new(Mutex::new(BTreeMap::new()));
    let instance = |runner: Arc<FakeRunner>, role: Role| {
        let shared = shared.clone();
        async move {
            let stop = CancellationToken::new();
            let jobs = start(
                config::Jobs::default(),
                runner,
                Journal::Shared(shared),
                stop.clone(),
            )
            .await;
            let (tx, rx) = watch::channel(role);
            tokio::spawn(jobs.clone().follow_role(rx));
            (jobs, tx, stop)
        }
    };
    let a_runner = FakeRunner::new(JobState::Completed);
    let (a, _a_role, a_stop) = instance(a_runner.clone(), Role::Leader).await;
    let b_runner = Arc::new(FakeRunner {
        runs: Mutex::default(),
        outcome: FakeRunner::new(JobState::Completed).outcome.clone(),
        delay: Duration::from_secs(30),
    });
    let (b, b_role, _b_stop) = instance(b_runner.clone(), Role::Manager).await;

    let lost = a
        .submit(update("docker.io/o/lost:latest"))
        .await
        .expect("submit");
    let mut req = update("docker.io/o/own:latest");
    req.quiet = Duration::ZERO;
    let own = b.submit(req).await.expect("submit");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.get(&own.id.0).expect("job").state, JobState::Running);
    assert!(
        b.get(&lost.id.0).is_none(),
        "a standby runs no journalled job"
    );

    a_stop.cancel();
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(a_runner.count(), 0, "the lost leader never ran its job");
    assert!(shared.lock().expect("lock").contains_key(&lost.id));

    b_role.send_replace(Role::Leader);
    assert_eq!(settle(&b, &lost.id).await.state, JobState::Completed);
    assert_eq!(settle(&b, &own.id).await.state, JobState::Completed);
    let ran: Vec<JobId> = b_runner
        .runs
        .lock()
        .expect("lock")
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(ran, vec![own.id.clone(), lost.id.clone()], "each ran once");

    // Leadership that flaps back and forth finds nothing left to run.
    for role in [Role::Manager, Role::Leader, Role::Manager, Role::Leader] {
        b_role.send_replace(role);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(b_runner.count(), 2);
    assert!(shared.lock().expect("lock").is_empty(), "journal emptied");
}

#[tokio::test(start_paused = true)]
async fn a_shared_journal_is_not_resumed_at_start_but_when_this_instance_leads() {
    let shared = Arc::new(Mutex::new(BTreeMap::new()));
    let pending = journalled("hub", "docker.io/o/r:latest");
    Journal::Shared(shared.clone())
        .put(&pending)
        .await
        .expect("put");
    let runner = FakeRunner::new(JobState::Skipped);
    let jobs = start(
        config::Jobs::default(),
        runner.clone(),
        Journal::Shared(shared.clone()),
        CancellationToken::new(),
    )
    .await;
    let (role, rx) = watch::channel(Role::Worker);
    tokio::spawn(jobs.clone().follow_role(rx));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(runner.count(), 0);
    role.send_replace(Role::Leader);
    assert_eq!(settle(&jobs, &pending.id).await.state, JobState::Skipped);
    assert_eq!(runner.count(), 1);
}

#[test]
fn job_json_has_the_documented_shape() {
    let view = JobView {
        id: JobId("abc-1".into()),
        hook: "hub".into(),
        state: JobState::RolledBack,
        work: Work::UpdateServices {
            image: "docker.io/o/r:latest".into(),
            digest: None,
            only: Vec::new(),
        },
        facts: Facts {
            hook: "hub".into(),
            tag: Some("latest".into()),
            ..Facts::default()
        },
        requests: 5,
        created_at: 1,
        started_at: Some(2),
        finished_at: Some(3),
        message: None,
        services: vec![ServiceResult {
            service: "web".into(),
            from_image: Some("o/r:latest@sha256:1".into()),
            to_image: Some("o/r:latest@sha256:2".into()),
            outcome: JobState::RolledBack,
            message: "update rolled back".into(),
        }],
        exit_code: None,
        log_tail: None,
    };
    let v = serde_json::to_value(&view).expect("json");
    assert_eq!(v["state"], "rolled_back");
    assert_eq!(v["action"], "update-services");
    assert_eq!(v["image"], "docker.io/o/r:latest");
    assert_eq!(v["services"][0]["outcome"], "rolled_back");
    let back: JobView = serde_json::from_value(v).expect("round trip");
    assert_eq!(back, view);
}

#[test]
fn overall_state_follows_the_services() {
    let r = |o| ServiceResult {
        service: "s".into(),
        from_image: None,
        to_image: None,
        outcome: o,
        message: String::new(),
    };
    use JobState::*;
    assert_eq!(
        Outcome::combine(vec![r(Completed), r(Skipped)]).state,
        Completed
    );
    assert_eq!(
        Outcome::combine(vec![r(Skipped), r(Skipped)]).state,
        Skipped
    );
    assert_eq!(
        Outcome::combine(vec![r(Completed), r(Failed)]).state,
        Failed
    );
    assert_eq!(
        Outcome::combine(vec![r(Failed), r(RolledBack)]).state,
        RolledBack
    );
    assert_eq!(Outcome::combine(vec![]).state, Skipped);
}

/// A leader demoted while its job waits out the quiet window does not start it: the job
/// stays journalled, and the instance that leads next runs it, once.
#[tokio::test(start_paused = true)]
async fn a_demoted_leader_leaves_its_queued_job_to_the_next_one() {
    let shared = Arc::new(Mutex::new(BTreeMap::new()));
    let a_runner = FakeRunner::new(JobState::Completed);
    let a = start(
        config::Jobs::default(),
        a_runner.clone(),
        Journal::Shared(shared.clone()),
        CancellationToken::new(),
    )
    .await;
    let (a_role, rx) = watch::channel(Role::Leader);
    tokio::spawn(a.clone().follow_role(rx));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let job = a
        .submit(update("docker.io/o/fenced:latest"))
        .await
        .expect("submit");
    a_role.send_replace(Role::Manager);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(a_runner.count(), 0, "the demoted leader did not run it");
    assert!(a.get(&job.id.0).is_none(), "nor keeps it queued");
    assert!(shared.lock().expect("lock").contains_key(&job.id));

    let b_runner = FakeRunner::new(JobState::Completed);
    let b = start(
        config::Jobs::default(),
        b_runner.clone(),
        Journal::Shared(shared.clone()),
        CancellationToken::new(),
    )
    .await;
    let (_b_role, rx) = watch::channel(Role::Leader);
    tokio::spawn(b.clone().follow_role(rx));
    assert_eq!(settle(&b, &job.id).await.state, JobState::Completed);
    assert_eq!((a_runner.count(), b_runner.count()), (0, 1));
    assert!(shared.lock().expect("lock").is_empty());
}
