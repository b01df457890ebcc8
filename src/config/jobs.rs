//! `jobs:` (the queue, history and journal of webhook jobs) and `registries:` (the
//! credentials those jobs pull images with).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::{Problem, at_field, bounds};

/// The queue of webhook jobs: how much it holds, how long it follows an update, and
/// where pending jobs are journalled so a restart resumes them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Jobs {
    /// Pending jobs beyond this answer 503.
    pub queue: usize,
    /// Finished jobs kept for `GET /jobs`.
    pub history: usize,
    /// Journal outside Swarm (inside Swarm, pending jobs live in Swarm config objects).
    pub state_file: Option<PathBuf>,
    /// Give up following an update after this long.
    #[serde(with = "humantime_serde")]
    pub update_timeout: Duration,
    /// Name of this deployment's job journal in Swarm (the `drover.job` label value):
    /// deployments sharing one Swarm need different names, or each resumes the other's
    /// pending jobs.
    pub journal: String,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs {
            queue: 64,
            history: 100,
            state_file: None,
            update_timeout: Duration::from_secs(600),
            journal: "drover".into(),
        }
    }
}

impl Jobs {
    /// Every size and duration within its bounds, and a journal name that can be a label.
    /// (A queue of at least 1 is one of the bounds: nothing else is left to check.)
    pub(super) fn check_bounds(&self) -> Result<(), Problem> {
        use bounds::*;
        size("jobs.queue", self.queue, 1, QUEUE).map_err(at_field("queue"))?;
        size("jobs.history", self.history, 0, HISTORY).map_err(at_field("history"))?;
        check_journal(&self.journal).map_err(at_field("journal"))?;
        duration(
            "jobs.update_timeout",
            self.update_timeout,
            UPDATE_TIMEOUT.0,
            UPDATE_TIMEOUT.1,
        )
        .map_err(at_field("update_timeout"))
    }
}

/// A journal name becomes a label value and part of log lines: short and plain.
pub fn check_journal(name: &str) -> Result<(), String> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if (1..=32).contains(&name.len()) && plain {
        Ok(())
    } else {
        Err(format!(
            "jobs.journal {name:?} must be 1-32 characters of [a-z0-9-]"
        ))
    }
}

/// Credentials for one registry, used when an update or a `container` action pulls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Registry host as it appears in image names (`127.0.0.1:5000`, `docker.io`).
    pub address: String,
    /// The user the password belongs to.
    pub username: String,
    /// The password or token, read from this file (a Swarm secret).
    pub password_file: PathBuf,
}
