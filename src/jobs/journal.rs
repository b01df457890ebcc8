//! Where pending jobs survive a restart: the journal and what it keeps of a job.

use super::*;

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
    pub(super) fn of(view: &JobView) -> Journalled {
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
    pub(super) fn is_shared(&self) -> bool {
        match self {
            Journal::Swarm { .. } => true,
            #[cfg(test)]
            Journal::Shared(_) => true,
            _ => false,
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Journal::Memory => "memory",
            Journal::File { .. } => "file",
            Journal::Swarm { .. } => "swarm",
            #[cfg(test)]
            Journal::Shared(_) => "shared",
        }
    }

    pub(super) async fn load(&self) -> Result<Vec<Journalled>> {
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

    pub(super) async fn put(&self, job: &Journalled) -> Result<()> {
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

    pub(super) async fn remove(&self, id: &JobId) -> Result<()> {
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
