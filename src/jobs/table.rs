//! The job table, queue and scheduler: submission, coalescing, running, history.

use super::*;

struct Entry {
    view: JobView,
    seq: u64,
    first: Instant,
    deadline: Instant,
    key: Option<String>,
    /// [`Inner::term`] when the job was queued here.
    term: u64,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<JobId, Entry>,
    finished: VecDeque<JobId>,
    /// Coalescing key → the job still in its quiet window.
    waiting: HashMap<String, JobId>,
    active: usize,
    /// How many times this instance stopped being the controller. A job of a shared
    /// journal queued in an earlier term is not started here: the new controller resumes
    /// it from the journal, so it runs once, there.
    term: u64,
}

/// The job table, queue and scheduler.
pub struct Jobs {
    inner: Mutex<Inner>,
    limits: config::Jobs,
    runner: Arc<dyn Runner>,
    resolve: Resolve,
    journal: Journal,
    workers: Semaphore,
    seq: AtomicU64,
    shutdown: CancellationToken,
    /// Cuts loaded secrets out of, and bounds, what a finished job shows.
    redactor: Redactor,
    /// Told of a job that failed or rolled back.
    notifier: std::sync::OnceLock<crate::notifications::Notifier>,
}

use crate::clock::unix_millis as unix_ms;

impl Jobs {
    /// The job table. A journal of this instance's own (a file) is loaded and its pending
    /// jobs queued to run at once; Swarm's journal, shared by every manager, is loaded by
    /// the leader's instance only, whenever it becomes leader ([`Jobs::follow_role`]).
    pub async fn start(
        limits: config::Jobs,
        runner: Arc<dyn Runner>,
        resolve: Resolve,
        journal: Journal,
        shutdown: CancellationToken,
    ) -> Result<Arc<Jobs>> {
        Jobs::start_redacting(
            limits,
            runner,
            resolve,
            journal,
            shutdown,
            Redactor::default(),
        )
        .await
    }

    /// [`Jobs::start`], with the secrets to cut out of job messages and output tails.
    pub async fn start_redacting(
        limits: config::Jobs,
        runner: Arc<dyn Runner>,
        resolve: Resolve,
        journal: Journal,
        shutdown: CancellationToken,
        redactor: Redactor,
    ) -> Result<Arc<Jobs>> {
        let jobs = Arc::new(Jobs {
            inner: Mutex::default(),
            limits,
            runner,
            resolve,
            journal,
            workers: Semaphore::new(WORKERS),
            seq: AtomicU64::new(1),
            shutdown,
            redactor,
            notifier: std::sync::OnceLock::new(),
        });
        if !jobs.journal.is_shared() {
            jobs.resume().await?;
        }
        Ok(jobs)
    }

    /// Loads the journal and queues, to run at once, every pending job not already known
    /// here (queued, running or finished on this instance): a job is never run twice by
    /// one instance. Returns how many were queued.
    pub async fn resume(self: &Arc<Self>) -> Result<usize> {
        let mut pending = self.journal.load().await?;
        pending.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut queued = Vec::new();
        for entry in pending {
            if self.lock().jobs.contains_key(&entry.id) {
                continue;
            }
            let work = match (self.resolve)(&entry.hook, &entry.facts) {
                Ok(work) => work,
                Err(reason) => {
                    warn!(job = %entry.id, hook = %entry.hook, %reason, "dropping journalled job");
                    if let Err(e) = self.journal.remove(&entry.id).await {
                        warn!(job = %entry.id, error = %e, "cannot remove dropped job from the journal");
                    }
                    continue;
                }
            };
            let view = JobView {
                requests: entry.requests,
                created_at: entry.created_at,
                ..JobView::queued(entry.id, entry.hook, work, entry.facts)
            };
            let id = view.id.clone();
            let key = view.work.coalesce_key();
            let now = Instant::now();
            let mut inner = self.lock();
            if inner.jobs.contains_key(&id) {
                continue;
            }
            if let Some(k) = &key {
                inner.waiting.insert(k.clone(), id.clone());
            }
            let entry = self.entry(view, now, key, inner.term);
            inner.jobs.insert(id.clone(), entry);
            inner.active += 1;
            metrics::get().queue_depth.set(inner.active as i64);
            queued.push(id);
        }
        if !queued.is_empty() {
            info!(
                jobs = queued.len(),
                journal = self.journal.name(),
                "re-queueing pending jobs"
            );
        }
        let n = queued.len();
        for id in queued {
            self.spawn(id);
        }
        Ok(n)
    }

    /// Follows this instance's role until shutdown: each time it becomes the controller
    /// (the Raft leader's instance), the jobs journalled in Swarm and not finished — by a
    /// leader that was lost or demoted, or by a manager that went away — are run here.
    /// A journal that cannot be read is tried again with backoff while the role holds.
    pub async fn follow_role(self: Arc<Self>, mut role: watch::Receiver<Role>) {
        if !self.journal.is_shared() {
            return;
        }
        let mut resumed = false;
        let mut led = false;
        let mut backoff = Backoff::new();
        loop {
            let now = *role.borrow_and_update();
            let mut retry = None;
            let lost = led && !now.is_controller();
            led = now.is_controller();
            if !now.is_controller() {
                if lost {
                    self.lock().term += 1;
                    info!(role = %now, "no longer the controller: queued jobs are left to the next one");
                }
                resumed = false;
            } else if !resumed {
                match self.resume().await {
                    Ok(n) => {
                        info!(role = %now, jobs = n, "controller: journalled jobs resumed");
                        resumed = true;
                        backoff.reset();
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot read the job journal; trying again");
                        retry = Some(backoff.delay());
                    }
                }
            }
            let wait = async {
                match retry {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = role.changed() => if changed.is_err() { return },
                () = wait => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records and queues a job, or joins one waiting for the same key. The job is in
    /// the journal when this returns `Ok`, and exists only once it is: the journal write
    /// runs in a task of its own, so a caller that is dropped half-way (a client that
    /// hangs up, the request timeout) leaves either a journalled, queued job or nothing.
    pub async fn submit(self: &Arc<Self>, req: Request) -> Result<Submitted> {
        let key = req.work.coalesce_key();
        let view = {
            let mut inner = self.lock();
            if let Some(id) = key.as_ref().and_then(|k| inner.waiting.get(k)).cloned() {
                if let Some(e) = inner.jobs.get_mut(&id) {
                    let now = Instant::now();
                    e.view.requests = e.view.requests.saturating_add(1);
                    // A later push of the same branch: the job shows the commit it asked
                    // for (a sync deploys the branch head, at least this commit).
                    if req.facts.after.is_some() {
                        e.view.facts.after.clone_from(&req.facts.after);
                    }
                    e.deadline = (now + req.quiet).min(e.first + req.quiet * 3);
                    return Ok(Submitted {
                        id,
                        coalesced: true,
                    });
                }
            }
            if inner.active >= self.limits.queue {
                return Err(Error::QueueFull);
            }
            // The slot is reserved now, so concurrent submissions cannot overfill the queue.
            inner.active += 1;
            metrics::get().queue_depth.set(inner.active as i64);
            JobView {
                created_at: unix_ms(),
                ..JobView::queued(JobId::generate(), req.hook, req.work, req.facts)
            }
        };
        let jobs = self.clone();
        let quiet = req.quiet;
        tokio::spawn(async move { jobs.commit(view, key, quiet).await })
            .await
            .unwrap_or_else(|e| Err(Error::Journal(format!("journal write aborted: {e}"))))
    }

    /// Journals a job whose slot is reserved, then queues it; releases the slot on failure.
    async fn commit(
        self: Arc<Self>,
        view: JobView,
        key: Option<String>,
        quiet: Duration,
    ) -> Result<Submitted> {
        if let Err(e) = self.journal.put(&Journalled::of(&view)).await {
            error!(job = %view.id, error = %e, "cannot record job");
            let mut inner = self.lock();
            inner.active = inner.active.saturating_sub(1);
            metrics::get().queue_depth.set(inner.active as i64);
            return Err(e);
        }
        let id = view.id.clone();
        {
            let mut inner = self.lock();
            let now = Instant::now();
            if let Some(k) = &key {
                // A job for the same key journalled meanwhile keeps the window: later
                // requests join the older one, this one runs on its own.
                inner.waiting.entry(k.clone()).or_insert_with(|| id.clone());
            }
            // Only coalescable work waits for company.
            let deadline = if key.is_some() { now + quiet } else { now };
            let entry = self.entry(view, deadline, key, inner.term);
            inner.jobs.insert(id.clone(), entry);
        }
        self.spawn(id.clone());
        Ok(Submitted {
            id,
            coalesced: false,
        })
    }

    /// A table entry due at `deadline`, numbered after every earlier one.
    fn entry(&self, view: JobView, deadline: Instant, key: Option<String>, term: u64) -> Entry {
        Entry {
            view,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            first: Instant::now(),
            deadline,
            key,
            term,
        }
    }

    fn spawn(self: &Arc<Self>, id: JobId) {
        let jobs = self.clone();
        let span = info_span!("job", job = %id);
        tokio::spawn(
            async move {
                let shutdown = jobs.shutdown.clone();
                tokio::select! {
                    () = jobs.clone().drive(id) => {}
                    // The job stays in the journal and runs again at the next start.
                    () = shutdown.cancelled() => info!("job interrupted by shutdown"),
                }
            }
            .instrument(span),
        );
    }

    /// Waits out the quiet window, then for a worker, then runs the job.
    async fn drive(self: Arc<Self>, id: JobId) {
        loop {
            let deadline = match self.lock().jobs.get(&id) {
                Some(e) => e.deadline,
                None => return,
            };
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep_until(deadline).await;
        }
        let ctx = {
            let mut inner = self.lock();
            let Some(e) = inner.jobs.get(&id) else { return };
            let key = e.key.clone();
            let ctx = RunContext {
                id: id.clone(),
                hook: e.view.hook.clone(),
                seq: e.seq,
                work: e.view.work.clone(),
                facts: e.view.facts.clone(),
            };
            if let Some(k) = key {
                if inner.waiting.get(&k) == Some(&id) {
                    inner.waiting.remove(&k);
                }
            }
            ctx
        };
        let Ok(_permit) = self.workers.acquire().await else {
            return;
        };
        {
            let mut inner = self.lock();
            let term = inner.term;
            let Some(e) = inner.jobs.get_mut(&id) else {
                return;
            };
            if e.term != term {
                // Fenced: leadership was lost since the job was queued here. It stays in
                // the shared journal for the controller that resumes it.
                inner.jobs.remove(&id);
                inner.active = inner.active.saturating_sub(1);
                metrics::get().queue_depth.set(inner.active as i64);
                info!("job left to the new controller");
                return;
            }
            e.view.state = JobState::Running;
            e.view.started_at = Some(unix_ms());
        }
        // The serialised form: a container's env shows names only.
        let action = serde_json::to_string(&ctx.work).unwrap_or_default();
        info!(%action, "job started");
        let outcome = self.runner.run(ctx).await;
        self.finish(&id, outcome, true).await;
    }

    /// Where failed and rolled-back jobs are told from now on (set once, by the daemon).
    pub fn set_notifier(&self, notifier: crate::notifications::Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// A failed or rolled-back job, told to the sinks with its (redacted) message.
    fn tell_failed(&self, id: &JobId, hook: &str, state: JobState) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        let message = self
            .lock()
            .jobs
            .get(id)
            .and_then(|e| e.view.message.clone())
            .unwrap_or_default();
        notifier.notify(crate::notifications::Event {
            kind: crate::config::EventKind::JobFailed,
            subject: id.to_string(),
            summary: format!("job {id} of hook {hook} {}: {message}", state.as_str()),
            details: serde_json::json!({
                "job": id.to_string(), "hook": hook, "state": state.as_str(), "message": message,
            }),
        });
    }

    async fn finish(&self, id: &JobId, mut outcome: Outcome, journalled: bool) {
        let state = outcome.state;
        let r = &self.redactor;
        outcome.message = outcome.message.map(|m| r.clean(&m, redact::MESSAGE_MAX));
        outcome.log_tail = outcome.log_tail.map(|t| r.clean(&t, redact::LOG_TAIL_MAX));
        for s in &mut outcome.services {
            s.message = r.clean(&s.message, redact::MESSAGE_MAX);
        }
        let hook = {
            let mut inner = self.lock();
            let Some(e) = inner.jobs.get_mut(id) else {
                return;
            };
            if e.view.state.is_final() {
                return;
            }
            let hook = e.view.hook.clone();
            e.view.state = outcome.state;
            e.view.message = outcome.message;
            e.view.services = outcome.services;
            e.view.exit_code = outcome.exit_code;
            e.view.log_tail = outcome.log_tail;
            e.view.finished_at = Some(unix_ms());
            if let Some(k) = e.key.clone() {
                if inner.waiting.get(&k) == Some(id) {
                    inner.waiting.remove(&k);
                }
            }
            inner.active = inner.active.saturating_sub(1);
            inner.finished.push_back(id.clone());
            while inner.finished.len() > self.limits.history {
                if let Some(old) = inner.finished.pop_front() {
                    inner.jobs.remove(&old);
                }
            }
            let m = metrics::get();
            m.queue_depth.set(inner.active as i64);
            m.jobs.with_label_values(&[state.as_str()]).inc();
            hook
        };
        info!(job = %id, outcome = state.as_str(), "job finished");
        if matches!(state, JobState::Failed | JobState::RolledBack) {
            self.tell_failed(id, &hook, state);
        }
        if journalled {
            if let Err(e) = self.journal.remove(id).await {
                warn!(job = %id, error = %e, "cannot remove finished job from the journal");
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<JobView> {
        self.lock()
            .jobs
            .get(&JobId(id.to_owned()))
            .map(|e| e.view.clone())
    }

    /// Every known job, newest first.
    pub fn list(&self) -> Vec<JobView> {
        let inner = self.lock();
        let mut all: Vec<(u64, JobView)> = inner
            .jobs
            .values()
            .map(|e| (e.seq, e.view.clone()))
            .collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.0));
        all.into_iter().map(|(_, v)| v).collect()
    }

    /// Jobs queued or running.
    pub fn active(&self) -> usize {
        self.lock().active
    }
}
