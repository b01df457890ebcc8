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
use std::time::Duration;

use base64::Engine as _;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::backoff::Backoff;
use crate::config;
use crate::docker::Engine;
use crate::metrics;
use crate::redact::{self, Redactor};
use crate::role::Role;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("job queue is full")]
    QueueFull,
    #[error("cannot record job: {0}")]
    Journal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Jobs run at the same time (updates of different services proceed in parallel; one
/// service is still updated by one job at a time, see `runner::Slots`).
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
        let nanos = crate::clock::unix_nanos();
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

pub mod container;
mod facts;
pub mod runner;
pub use facts::Facts;

/// The work a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Work {
    /// Roll every service running this (normalised) `registry/repo:tag`.
    UpdateServices {
        image: String,
        /// The digest to pin, when the requester read it from the registry (a poll);
        /// otherwise the job resolves the tag through the engine.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
        /// Only these services (by name), when not empty: a poll rolls the services it
        /// polls, never one that opted out of polling or belongs to a stack from git.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        only: Vec<String>,
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
    /// Sync the stacks that name `hook` and deploy `repository` (`owner/name`) at
    /// `branch`, each to its branch head (`stacks`).
    SyncStacks {
        repository: String,
        branch: String,
    },
    /// Sync one stack to its branch head (a poll that saw it move, or a manual sync).
    SyncStack {
        stack: String,
    },
}

impl Work {
    fn coalesce_key(&self) -> Option<String> {
        match self {
            // A poll's job names its services: it joins only a poll's job for the same
            // services, so a webhook's job never loses services to it (or it to one).
            Work::UpdateServices { image, only, .. } if only.is_empty() => {
                Some(format!("image {image}"))
            }
            Work::UpdateServices { image, only, .. } => {
                Some(format!("image {image} only {}", only.join(",")))
            }
            Work::RestartService { service } => Some(format!("service {service}")),
            // A sync looks the branch head up when it runs: requests in one quiet window
            // are the same request.
            Work::SyncStacks { repository, branch } => {
                Some(format!("stacks {repository} {branch}"))
            }
            Work::SyncStack { stack } => Some(format!("stack {stack}")),
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

impl JobView {
    /// A job waiting in the queue: accepted now, or resumed from the journal.
    fn queued(id: JobId, hook: String, work: Work, facts: Facts) -> JobView {
        JobView {
            id,
            hook,
            state: JobState::Queued,
            work,
            facts,
            requests: 1,
            created_at: 0,
            started_at: None,
            finished_at: None,
            message: None,
            services: Vec::new(),
            exit_code: None,
            log_tail: None,
        }
    }
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

/// Carries out jobs; `runner::Executor` against the engine, fakes in unit tests.
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

mod journal;
mod table;

pub use journal::{Journal, Journalled, Resolve};
pub use table::Jobs;

#[cfg(test)]
pub(crate) mod tests;
