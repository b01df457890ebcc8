//! Jobs: what a verified webhook asked for, from acceptance to its outcome.
//!
//! Invariants: a job is recorded in the journal (a Swarm config object per pending job
//! inside Swarm, a JSON state file outside) before its id is handed out, and removed from
//! it once finished, so a restart re-queues what was accepted but not done. The number of
//! jobs queued or running is bounded (`jobs.queue`); beyond it submission fails and the
//! caller answers 503. Requests with the same coalescing key (the normalised `repo:tag`
//! of an update, the service of a restart) that arrive while a job for that key is still
//! in its quiet window join that job and get *its* id back, so every coalesced request
//! reports the one outcome. The window slides with each request but never past three
//! times `quiet` after the first. Finished jobs stay in memory for `jobs.history` entries.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::backoff::Backoff;
use crate::cluster::role::Role;
use crate::config;
use crate::docker::Engine;
use crate::metrics;
use crate::redact::{self, Redactor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("job queue is full")]
    QueueFull,
    #[error("cannot record job: {0}")]
    Journal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Jobs run at the same time (updates of different services proceed in parallel; one
/// service is still updated by one job at a time, see `update::Slots`).
const WORKERS: usize = 4;
/// Label and name prefix of the Swarm config objects that journal pending jobs.
pub const JOB_LABEL: &str = "drover.job";
pub const JOB_CONFIG_PREFIX: &str = "drover-job-";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub String);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl JobId {
    fn generate() -> JobId {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        JobId(format!("{nanos:x}-{n:x}"))
    }

    /// Ids travel in URLs and Swarm object names: only `[0-9a-z-]`.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    RolledBack,
    Skipped,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::RolledBack => "rolled_back",
            JobState::Skipped => "skipped",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

pub use crate::hooks::Facts;

/// The work a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Work {
    /// Roll every service running this (normalised) `registry/repo:tag`.
    UpdateServices {
        image: String,
    },
    RestartService {
        service: String,
    },
    Command {
        argv: Vec<String>,
    },
    /// A one-off container run through the Engine API (the spec is the hook's current
    /// one: a job re-queued after a restart runs what is configured then).
    Container {
        spec: config::ContainerSpec,
    },
}

impl Work {
    fn coalesce_key(&self) -> Option<String> {
        match self {
            Work::UpdateServices { image } => Some(format!("image {image}")),
            Work::RestartService { service } => Some(format!("service {service}")),
            Work::Command { .. } | Work::Container { .. } => None,
        }
    }
}

/// What happened to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceResult {
    pub service: String,
    pub from_image: Option<String>,
    pub to_image: Option<String>,
    pub outcome: JobState,
    pub message: String,
}

/// A job as `GET /jobs/{id}` shows it and the journal stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub id: JobId,
    pub hook: String,
    pub state: JobState,
    #[serde(flatten)]
    pub work: Work,
    pub facts: Facts,
    /// Webhook requests coalesced into this job (1 when alone).
    pub requests: u32,
    /// Unix milliseconds.
    pub created_at: u64,
    #[serde(default)]
    pub started_at: Option<u64>,
    #[serde(default)]
    pub finished_at: Option<u64>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub services: Vec<ServiceResult>,
    /// Exit code of a command or container action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// The end of a command's or container's output (bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

/// A job's result, from the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: JobState,
    pub message: Option<String>,
    pub services: Vec<ServiceResult>,
    pub exit_code: Option<i64>,
    pub log_tail: Option<String>,
}

impl Outcome {
    pub fn failed(message: String) -> Outcome {
        Outcome {
            state: JobState::Failed,
            message: Some(message),
            services: Vec::new(),
            exit_code: None,
            log_tail: None,
        }
    }

    /// `rolled_back` if any service rolled back, `failed` if any failed, `skipped` if
    /// nothing was done, else `completed`.
    pub fn combine(services: Vec<ServiceResult>) -> Outcome {
        let any = |s: JobState| services.iter().any(|r| r.outcome == s);
        let state = if any(JobState::RolledBack) {
            JobState::RolledBack
        } else if any(JobState::Failed) || services.iter().any(|r| !r.outcome.is_final()) {
            JobState::Failed
        } else if services.iter().all(|r| r.outcome == JobState::Skipped) {
            JobState::Skipped
        } else {
            JobState::Completed
        };
        Outcome {
            state,
            message: None,
            services,
            exit_code: None,
            log_tail: None,
        }
    }
}

/// What a runner gets: the job's work plus its sequence number (higher is newer).
#[derive(Debug, Clone)]
pub struct RunContext {
    pub id: JobId,
    pub hook: String,
    pub seq: u64,
    pub work: Work,
    pub facts: Facts,
}

/// Carries out jobs; `update::Executor` against the engine, fakes in unit tests.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, job: RunContext) -> BoxFuture<'_, Outcome>;
}

/// A verified request, ready to become a job.
#[derive(Debug, Clone)]
pub struct Request {
    pub hook: String,
    pub work: Work,
    pub facts: Facts,
    pub quiet: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub id: JobId,
    /// Joined a job already waiting in its quiet window.
    pub coalesced: bool,
}

/// What the journal keeps of a pending job: the hook and the facts it verified, never
/// the work. The work (argv, container spec, image) is derived again from the *current*
/// config when the job is resumed, so a hook changed or removed since does not run what
/// it used to. Older entries that also hold the work read as this (extra fields ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journalled {
    pub id: JobId,
    pub hook: String,
    pub facts: Facts,
    pub requests: u32,
    /// Unix milliseconds.
    pub created_at: u64,
}

impl Journalled {
    fn of(view: &JobView) -> Journalled {
        Journalled {
            id: view.id.clone(),
            hook: view.hook.clone(),
            facts: view.facts.clone(),
            requests: view.requests,
            created_at: view.created_at,
        }
    }
}

/// Derives a resumed job's work from the current config: the hook's action applied to
/// the journalled facts, or why the job cannot run any more (unknown hook, facts its
/// rules no longer allow). Given by `hooks`, which owns the hooks' config.
pub type Resolve = Arc<dyn Fn(&str, &Facts) -> std::result::Result<Work, String> + Send + Sync>;

/// Where pending jobs survive a restart.
pub enum Journal {
    /// Tests, or no place configured: nothing survives.
    Memory,
    /// Outside Swarm: one JSON file holding every pending job, rewritten atomically.
    File {
        path: PathBuf,
        pending: tokio::sync::Mutex<BTreeMap<JobId, Journalled>>,
    },
    /// Inside Swarm: one config object per pending job, replicated by Raft, labelled
    /// `drover.job=SCOPE` so that two drover deployments on one Swarm (`jobs.journal`)
    /// never run each other's jobs. Shared by every manager: only the Raft leader's
    /// instance re-runs pending jobs (when it becomes leader), so a job journalled once
    /// runs once however many managers there are.
    Swarm { engine: Engine, scope: String },
    /// Unit tests: a journal in memory that several job tables share, like Swarm's.
    #[cfg(test)]
    Shared(Arc<Mutex<BTreeMap<JobId, Journalled>>>),
}

impl Journal {
    pub fn file(path: PathBuf) -> Journal {
        Journal::File {
            path,
            pending: tokio::sync::Mutex::default(),
        }
    }

    /// Whether other instances write to the same journal (Swarm's).
    fn is_shared(&self) -> bool {
        match self {
            Journal::Swarm { .. } => true,
            #[cfg(test)]
            Journal::Shared(_) => true,
            _ => false,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Journal::Memory => "memory",
            Journal::File { .. } => "file",
            Journal::Swarm { .. } => "swarm",
            #[cfg(test)]
            Journal::Shared(_) => "shared",
        }
    }

    async fn load(&self) -> Result<Vec<Journalled>> {
        let journal = |e: &dyn std::fmt::Display| Error::Journal(e.to_string());
        match self {
            Journal::Memory => Ok(Vec::new()),
            Journal::File { path, pending } => {
                let text = match tokio::fs::read(path).await {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(journal(&format!("{}: {e}", path.display()))),
                };
                let jobs: Vec<Journalled> = serde_json::from_slice(&text)
                    .map_err(|e| journal(&format!("{}: {e}", path.display())))?;
                let mut p = pending.lock().await;
                for j in &jobs {
                    p.insert(j.id.clone(), j.clone());
                }
                Ok(jobs)
            }
            Journal::Swarm { engine: api, scope } => {
                let configs = api
                    .list_configs(&format!("{JOB_LABEL}={scope}"))
                    .await
                    .map_err(|e| journal(&e))?;
                let mut jobs = Vec::new();
                for c in configs {
                    let Some(data) = c.spec.and_then(|s| s.data) else {
                        continue;
                    };
                    let decoded = base64::engine::general_purpose::STANDARD.decode(data.trim());
                    match decoded
                        .ok()
                        .and_then(|d| serde_json::from_slice::<Journalled>(&d).ok())
                    {
                        Some(job) => jobs.push(job),
                        None => warn!(config = ?c.id, "ignoring unreadable job journal entry"),
                    }
                }
                Ok(jobs)
            }
            #[cfg(test)]
            Journal::Shared(m) => Ok(m
                .lock()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default()),
        }
    }

    async fn put(&self, job: &Journalled) -> Result<()> {
        let journal = |e: &dyn std::fmt::Display| Error::Journal(e.to_string());
        match self {
            Journal::Memory => Ok(()),
            Journal::File { path, pending } => {
                let mut p = pending.lock().await;
                p.insert(job.id.clone(), job.clone());
                write_file(path, &p).await.map_err(|e| journal(&e))
            }
            Journal::Swarm { engine: api, scope } => {
                let data = serde_json::to_vec(job).map_err(|e| journal(&e))?;
                let name = format!("{JOB_CONFIG_PREFIX}{}", job.id);
                let labels = HashMap::from([(JOB_LABEL.to_owned(), scope.clone())]);
                match api.create_config(&name, labels, &data).await {
                    Ok(()) => Ok(()),
                    // Already journalled (a job re-queued at start).
                    Err(e) if e.is_conflict() => Ok(()),
                    Err(e) => Err(journal(&e)),
                }
            }
            #[cfg(test)]
            Journal::Shared(m) => {
                if let Ok(mut m) = m.lock() {
                    m.insert(job.id.clone(), job.clone());
                }
                Ok(())
            }
        }
    }

    async fn remove(&self, id: &JobId) -> Result<()> {
        let journal = |e: &dyn std::fmt::Display| Error::Journal(e.to_string());
        match self {
            Journal::Memory => Ok(()),
            Journal::File { path, pending } => {
                let mut p = pending.lock().await;
                p.remove(id);
                write_file(path, &p).await.map_err(|e| journal(&e))
            }
            Journal::Swarm { engine: api, .. } => {
                match api.delete_config(&format!("{JOB_CONFIG_PREFIX}{id}")).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_not_found() => Ok(()),
                    Err(e) => Err(journal(&e)),
                }
            }
            #[cfg(test)]
            Journal::Shared(m) => {
                if let Ok(mut m) = m.lock() {
                    m.remove(id);
                }
                Ok(())
            }
        }
    }
}

async fn write_file(
    path: &std::path::Path,
    pending: &BTreeMap<JobId, Journalled>,
) -> std::io::Result<()> {
    let jobs: Vec<&Journalled> = pending.values().collect();
    let bytes = serde_json::to_vec_pretty(&jobs).map_err(std::io::Error::other)?;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || crate::fsutil::write_atomic(&path, &bytes))
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)
}

struct Entry {
    view: JobView,
    seq: u64,
    first: Instant,
    deadline: Instant,
    key: Option<String>,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<JobId, Entry>,
    finished: VecDeque<JobId>,
    /// Coalescing key → the job still in its quiet window.
    waiting: HashMap<String, JobId>,
    active: usize,
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
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
                id: entry.id,
                hook: entry.hook,
                state: JobState::Queued,
                work,
                facts: entry.facts,
                requests: entry.requests,
                created_at: entry.created_at,
                started_at: None,
                finished_at: None,
                message: None,
                services: Vec::new(),
                exit_code: None,
                log_tail: None,
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
            inner.jobs.insert(
                id.clone(),
                Entry {
                    view,
                    seq: self.seq.fetch_add(1, Ordering::SeqCst),
                    first: now,
                    deadline: now,
                    key,
                },
            );
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
        let mut backoff = Backoff::new();
        loop {
            let now = *role.borrow_and_update();
            let mut retry = None;
            if !now.is_controller() {
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
                id: JobId::generate(),
                hook: req.hook,
                state: JobState::Queued,
                work: req.work,
                facts: req.facts,
                requests: 1,
                created_at: unix_ms(),
                started_at: None,
                finished_at: None,
                message: None,
                services: Vec::new(),
                exit_code: None,
                log_tail: None,
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
            inner.jobs.insert(
                id.clone(),
                Entry {
                    view,
                    seq: self.seq.fetch_add(1, Ordering::SeqCst),
                    first: now,
                    // Only coalescable work waits for company.
                    deadline: if key.is_some() { now + quiet } else { now },
                    key,
                },
            );
        }
        self.spawn(id.clone());
        Ok(Submitted {
            id,
            coalesced: false,
        })
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
        if let Some(e) = self.lock().jobs.get_mut(&id) {
            e.view.state = JobState::Running;
            e.view.started_at = Some(unix_ms());
        }
        info!(action = ?ctx.work, "job started");
        let outcome = self.runner.run(ctx).await;
        self.finish(&id, outcome, true).await;
    }

    async fn finish(&self, id: &JobId, mut outcome: Outcome, journalled: bool) {
        let state = outcome.state;
        let r = &self.redactor;
        outcome.message = outcome.message.map(|m| r.clean(&m, redact::MESSAGE_MAX));
        outcome.log_tail = outcome.log_tail.map(|t| r.clean(&t, redact::LOG_TAIL_MAX));
        for s in &mut outcome.services {
            s.message = r.clean(&s.message, redact::MESSAGE_MAX);
        }
        {
            let mut inner = self.lock();
            let Some(e) = inner.jobs.get_mut(id) else {
                return;
            };
            if e.view.state.is_final() {
                return;
            }
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
        }
        info!(job = %id, outcome = state.as_str(), "job finished");
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

#[cfg(test)]
pub(crate) mod tests {
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
        Jobs::start(
            limits,
            runner,
            resolve(),
            Journal::Memory,
            CancellationToken::new(),
        )
        .await
        .expect("start")
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
        let first = jobs
            .submit(update("docker.io/o/r:latest"))
            .await
            .expect("submit");
        assert!(!first.coalesced);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let s = jobs
                .submit(update("docker.io/o/r:latest"))
                .await
                .expect("submit");
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
        let a = jobs
            .submit(update("docker.io/o/r:latest"))
            .await
            .expect("submit");
        let b = jobs
            .submit(update("docker.io/o/r:stable"))
            .await
            .expect("submit");
        assert_ne!(a.id, b.id);
        settle(&jobs, &a.id).await;
        settle(&jobs, &b.id).await;
        assert_eq!(runner.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_cannot_postpone_the_run_forever() {
        let runner = FakeRunner::new(JobState::Completed);
        let jobs = jobs(runner.clone(), 8).await;
        let first = jobs
            .submit(update("docker.io/o/r:latest"))
            .await
            .expect("submit");
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if jobs.get(&first.id.0).expect("job").state != JobState::Queued {
                break;
            }
            jobs.submit(update("docker.io/o/r:latest"))
                .await
                .expect("submit");
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
        let a = jobs
            .submit(update("docker.io/o/r:latest"))
            .await
            .expect("submit");
        settle(&jobs, &a.id).await;
        let b = jobs
            .submit(update("docker.io/o/r:latest"))
            .await
            .expect("submit");
        assert_ne!(a.id, b.id);
        settle(&jobs, &b.id).await;
        assert_eq!(runner.count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_new_jobs_but_still_coalesces() {
        let runner = FakeRunner::new(JobState::Completed);
        let jobs = jobs(runner, 1).await;
        let a = jobs
            .submit(update("docker.io/o/a:latest"))
            .await
            .expect("submit");
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
        let a = jobs
            .submit(update("docker.io/o/r:latest"))
            .await
            .expect("submit");
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
        let jobs = Jobs::start(
            config::Jobs::default(),
            runner.clone(),
            resolve(),
            Journal::file(path.clone()),
            CancellationToken::new(),
        )
        .await
        .expect("start");
        let done = settle(&jobs, &pending.id).await;
        assert_eq!(done.state, JobState::Skipped);
        assert_eq!(done.requests, 2);
        assert_eq!(
            done.work,
            Work::UpdateServices {
                image: "docker.io/o/r:latest".into()
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
        let jobs = Jobs::start(
            config::Jobs::default(),
            runner,
            resolve(),
            Journal::file(path.clone()),
            CancellationToken::new(),
        )
        .await
        .expect("start");
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
        let jobs = Jobs::start(
            config::Jobs::default(),
            runner.clone(),
            resolve(),
            Journal::file(path.clone()),
            CancellationToken::new(),
        )
        .await
        .expect("start");
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
        let jobs = Jobs::start(
            limits,
            runner.clone(),
            resolve(),
            Journal::file(path),
            CancellationToken::new(),
        )
        .await
        .expect("start");
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
                let jobs = Jobs::start(
                    config::Jobs::default(),
                    runner,
                    resolve(),
                    Journal::Shared(shared),
                    stop.clone(),
                )
                .await
                .expect("start");
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
        let jobs = Jobs::start(
            config::Jobs::default(),
            runner.clone(),
            resolve(),
            Journal::Shared(shared.clone()),
            CancellationToken::new(),
        )
        .await
        .expect("start");
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
}
