//! Carries out `SyncStacks`/`SyncStack` jobs; every other job goes to the runner it wraps
//! (`jobs::runner::Executor`), so the job table, its journal, coalescing, `/jobs` and the
//! redaction of secrets are the same for a stack deploy as for any other job.
//!
//! Invariants: one deploy per stack at a time, and a newer job for a stack supersedes an
//! older one still waiting (`Slots`); a deploy resolves the branch head when it starts
//! (http and https repositories: one `info/refs` lookup here; otherwise the deploy container
//! fetches the head), and a head already deployed starts no container. Credentials go to
//! the container as files in an uploaded archive, never in argv or its environment.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use futures_util::future::BoxFuture;
use serde_json::Value;
use tracing::{info, warn};

use super::archive::{self, File};
use super::compose::{KEY_LABEL, STACK_LABEL};
use super::deployer::{self, Deployed};
use crate::config::{self, Stack, Transport};
use crate::docker::Engine;
use crate::jobs::container::tail;
use crate::jobs::runner::Slots;
use crate::jobs::{JobState, Outcome, RunContext, Runner, ServiceResult, Work};
use crate::update::{End, follow_started};

/// The label `docker stack deploy` puts on everything of a stack.
const NAMESPACE_LABEL: &str = "com.docker.stack.namespace";
/// Lines of the deploy container's output kept on the job.
const LOG_LINES: usize = 40;
/// Label on every deploy container.
pub const STACK_CONTAINER_LABEL: &str = "drover.stack.deploy";
/// Label on a deploy container: the stack's services before the deploy (id → spec
/// version and rollout start), so that an instance that comes back after the deploy
/// restarted it (a deploy of drover's own stack) knows which rollouts are the deploy's.
pub const BEFORE_LABEL: &str = "drover.stack.before";

/// What drover knows of one stack (shown on the status page later).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackState {
    pub deployed: Option<String>,
    pub outcome: Option<JobState>,
}

/// The stacks runner.
pub struct StackRunner {
    inner: Arc<dyn Runner>,
    engine: Engine,
    stacks: Vec<Stack>,
    /// `docker/config.json` for `--with-registry-auth`, built from `registries`.
    docker_config: Vec<u8>,
    follow_limit: Duration,
    slots: Slots,
    state: Mutex<HashMap<String, StackState>>,
    board: Arc<crate::status::Board>,
}

impl StackRunner {
    pub fn new(
        inner: Arc<dyn Runner>,
        engine: Engine,
        config: &config::Config,
        board: Arc<crate::status::Board>,
    ) -> StackRunner {
        for s in &config.stacks {
            board.update_stack(&s.name, |row| row.branch.clone_from(&s.branch));
        }
        let mut auths = serde_json::Map::new();
        for r in &config.registries {
            if let Ok(password) = config::read_secret(&r.password_file) {
                use base64::Engine as _;
                let pair = format!("{}:{}", r.username, String::from_utf8_lossy(&password));
                let auth = base64::engine::general_purpose::STANDARD.encode(pair);
                auths.insert(r.address.clone(), serde_json::json!({ "auth": auth }));
            }
        }
        let docker_config = serde_json::to_vec(&serde_json::json!({ "auths": auths }))
            .unwrap_or_else(|_| b"{}".to_vec());
        StackRunner {
            inner,
            engine,
            stacks: config.stacks.clone(),
            docker_config,
            follow_limit: config.jobs.update_timeout,
            slots: Slots::default(),
            state: Mutex::default(),
            board,
        }
    }

    /// Each stack's deployed commit and last outcome.
    pub fn states(&self) -> BTreeMap<String, StackState> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.stacks
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    state.get(&s.name).cloned().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Whether the stack's branch may have moved past what was deployed: false only when
    /// a lookup (http or https) found the deployed commit.
    pub async fn moved(&self, stack: &Stack) -> bool {
        let Some(head) = self.head(stack).await else {
            return true;
        };
        match head {
            Ok(head) => self.known(&stack.name).await.as_deref() != Some(head.as_str()),
            Err(e) => {
                warn!(stack = %stack.name, error = %e, "cannot look up the branch head");
                false
            }
        }
    }

    /// The branch head, looked up here (shown on the status page), or `None` for a
    /// repository only the deploy container's fetch can look at (ssh).
    async fn head(&self, stack: &Stack) -> Option<Result<String, super::refs::Error>> {
        if !matches!(stack.transport(), Some(Transport::Http))
            || !super::refs::can_look_up(&stack.repository)
        {
            return None;
        }
        let head = super::refs::head(stack, &stack.branch).await;
        if let Ok(h) = &head {
            self.board
                .update_stack(&stack.name, |row| row.head = Some(h.clone()));
        }
        Some(head)
    }

    /// The commit `stack` was last deployed at: as Swarm keeps it ([`super::record`], so
    /// it survives a restart and a leader change), else as this instance remembers it.
    async fn known(&self, stack: &str) -> Option<String> {
        match super::record::read(&self.engine, stack).await {
            Ok(Some(commit)) => {
                self.record(stack, |s| s.deployed = Some(commit.clone()));
                self.board
                    .update_stack(stack, |row| row.deployed = Some(commit.clone()));
                Some(commit)
            }
            Ok(None) => self.deployed(stack),
            Err(e) => {
                warn!(stack, error = %e, "cannot read the deployed commit from Swarm");
                self.deployed(stack)
            }
        }
    }

    /// The commit this instance last deployed for `stack`.
    fn deployed(&self, stack: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(stack)
            .and_then(|s| s.deployed.clone())
    }

    fn record(&self, stack: &str, f: impl FnOnce(&mut StackState)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(state.entry(stack.to_owned()).or_default());
    }

    /// The stacks a push through `hook` of `repository` at `branch` syncs.
    fn pushed(&self, hook: &str, repository: &str, branch: &str) -> Vec<&Stack> {
        matching(&self.stacks, hook, repository, branch)
    }

    async fn sync(&self, job: &RunContext, stacks: Vec<&Stack>) -> Outcome {
        if stacks.is_empty() {
            return Outcome {
                state: JobState::Skipped,
                message: Some("no stack deploys this repository and branch".into()),
                services: Vec::new(),
                exit_code: None,
                log_tail: None,
            };
        }
        let runs = stacks.iter().map(|s| self.sync_one(job, s));
        let outcomes = futures_util::future::join_all(runs).await;
        combine(outcomes)
    }

    async fn sync_one(&self, job: &RunContext, stack: &Stack) -> Outcome {
        self.board.update_stack(&stack.name, |row| {
            row.last_trigger = Some(job.hook.clone());
        });
        let out = self.sync_locked(job, stack).await;
        let deployed = self.deployed(&stack.name);
        self.board.update_stack(&stack.name, |row| {
            row.deployed = deployed;
            row.outcome = Some(out.state.as_str().to_owned());
            row.message.clone_from(&out.message);
            row.last_at = u64::try_from(crate::clock::unix_secs()).ok();
        });
        if out.state == crate::jobs::JobState::Completed {
            let commit = self.deployed(&stack.name).unwrap_or_default();
            self.board.notify(crate::notifications::Event {
                kind: crate::config::EventKind::StackDeployed,
                subject: format!("{}@{commit}", stack.name),
                summary: format!("stack {} deployed at {}", stack.name, commit.get(..12).unwrap_or(&commit)),
                details: serde_json::json!({"stack": stack.name, "commit": commit, "trigger": job.hook}),
            });
        }
        // Stack names come from the config: a bounded label.
        crate::metrics::get()
            .stack_deploys
            .with_label_values(&[stack.name.as_str(), out.state.as_str()])
            .inc();
        out
    }

    async fn sync_locked(&self, job: &RunContext, stack: &Stack) -> Outcome {
        let Some(_guard) = self.slots.acquire(&slot(&stack.name), job.seq).await else {
            return skipped(format!(
                "stack {}: superseded by a newer sync (it deploys the newer head)",
                stack.name
            ));
        };
        let out = self.sync_held(job, stack).await;
        self.record(&stack.name, |s| s.outcome = Some(out.state));
        info!(stack = %stack.name, outcome = out.state.as_str(), "stack deploy finished");
        out
    }

    /// [`Self::sync_locked`] once the stack's slot is held.
    async fn sync_held(&self, job: &RunContext, stack: &Stack) -> Outcome {
        // A deploy container of this very job means an instance before this one started
        // the deploy and went away meanwhile (the deploy restarted drover itself): its
        // result is this job's, whatever the branch head or the deployed commit say now.
        match self.left_behind(job, stack).await {
            Ok(Some(found)) => {
                info!(stack = %stack.name, container = %found.id, "resuming the deploy a previous instance started");
                return self.conclude(job, stack, found).await;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(stack = %stack.name, error = %e, "cannot look for a deploy container left behind")
            }
        }
        let head = match self.head(stack).await {
            Some(Ok(h)) => Some(h),
            Some(Err(e)) => return Outcome::failed(format!("stack {}: {e}", stack.name)),
            None => None,
        };
        if let Some(head) = &head {
            if self.known(&stack.name).await.as_ref() == Some(head) {
                return skipped(format!("stack {}: already at {head}", stack.name));
            }
        }
        self.deploy(job, stack, head).await
    }

    async fn deploy(&self, job: &RunContext, stack: &Stack, commit: Option<String>) -> Outcome {
        let name = &stack.name;
        let before = match self.services(name).await {
            Ok(s) => s,
            Err(e) => return Outcome::failed(format!("stack {name}: {e}")),
        };
        let id = match self.start_container(job, stack, commit, &before).await {
            Ok(id) => id,
            Err(e) => return Outcome::failed(format!("stack {name}: {e}")),
        };
        self.conclude(job, stack, Started { id, before }).await
    }

    /// The deploy container of this job on this node, left by an instance that went away
    /// before it finished the job.
    async fn left_behind(
        &self,
        job: &RunContext,
        stack: &Stack,
    ) -> Result<Option<Started>, crate::docker::Error> {
        let labels = [
            format!("{STACK_CONTAINER_LABEL}={}", stack.name),
            format!("{}={}", crate::jobs::container::JOB_LABEL, job.id),
        ];
        let found = self.engine.list_containers_labelled(&labels).await?;
        Ok(found.into_iter().find_map(|c| {
            let before = c
                .labels
                .as_ref()
                .and_then(|l| l.get(BEFORE_LABEL))
                .map(|v| decode_before(v))
                .unwrap_or_default();
            Some(Started { id: c.id?, before })
        }))
    }

    /// Waits for the deploy container's result, follows the rollouts it started, prunes,
    /// and removes the container: only now, so that an instance the deploy restarted
    /// leaves it to its successor, which concludes the job from it.
    async fn conclude(&self, job: &RunContext, stack: &Stack, started: Started) -> Outcome {
        let out = self.conclude_inner(job, stack, &started).await;
        if let Err(e) = self.engine.remove_container(&started.id).await {
            warn!(container = %started.id, error = %e, "cannot remove the deploy container");
        }
        out
    }

    async fn conclude_inner(&self, job: &RunContext, stack: &Stack, started: &Started) -> Outcome {
        let name = &stack.name;
        let before = &started.before;
        let (code, log) = match self.wait_container(stack, &started.id).await {
            Ok(r) => r,
            Err(e) => return Outcome::failed(format!("stack {name}: {e}")),
        };
        let log_tail = Some(tail(&log, LOG_LINES));
        let result = match (code, deployer::parse_result(&log)) {
            (0, Some(r)) => r,
            _ => {
                let reason = log
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("deploy failed: "))
                    .unwrap_or("the deploy container printed no result")
                    .to_owned();
                return Outcome {
                    state: JobState::Failed,
                    message: Some(format!("stack {name}: exit code {code}: {reason}")),
                    services: Vec::new(),
                    exit_code: Some(code),
                    log_tail,
                };
            }
        };
        self.record(name, |s| s.deployed = Some(result.commit.clone()));
        if let Err(e) = super::record::write(&self.engine, name, &result.commit).await {
            // Only costs a redeploy of an unchanged commit after a restart.
            warn!(stack = %name, error = %e, "cannot record the deployed commit in Swarm");
        }
        self.board
            .update_stack(name, |row| row.head = Some(result.commit.clone()));
        let after = match self.services(name).await {
            Ok(s) => s,
            Err(e) => return Outcome::failed(format!("stack {name}: {e}")),
        };
        let changed = changed_services(before, &after);
        let names: Vec<&str> = changed.iter().map(|s| s.name.as_str()).collect();
        info!(stack = %name, services = ?names, "following the rollouts of the deploy");
        let follows = changed.iter().map(|svc| self.follow(svc, before));
        let services: Vec<ServiceResult> = futures_util::future::join_all(follows).await;
        let pruned = if services.iter().all(|s| s.outcome == JobState::Completed) {
            self.prune(name, &result, stack.keep_configs).await
        } else {
            Vec::new()
        };
        let mut out = Outcome::combine(services);
        if out.state == JobState::RolledBack {
            // A rollback fails the deploy: the commit is not what runs.
            out.state = JobState::Failed;
        }
        if out.state == JobState::Skipped {
            out.state = JobState::Completed;
        }
        out.message = Some(summary(name, &result, job.facts.after.as_deref(), &pruned));
        out.exit_code = Some(0);
        out.log_tail = log_tail;
        out
    }

    /// Services of the stack: id → (name, spec version, last rollout start, spec).
    async fn services(&self, stack: &str) -> Result<BTreeMap<String, Svc>, crate::docker::Error> {
        let all = self.engine.list_services().await?;
        let mut out = BTreeMap::new();
        for s in all {
            let Some(id) = s.id.clone() else { continue };
            let Some(spec) = &s.spec else { continue };
            let ours = spec
                .labels
                .as_ref()
                .and_then(|l| l.get(NAMESPACE_LABEL))
                .is_some_and(|v| v == stack);
            if !ours {
                continue;
            }
            out.insert(
                id.clone(),
                Svc {
                    id,
                    name: spec.name.clone().unwrap_or_default(),
                    version: s.version.as_ref().and_then(|v| v.index).unwrap_or(0),
                    template: template_hash(spec.task_template.as_ref()),
                    started: s.update_status.as_ref().and_then(|u| u.started_at.clone()),
                    configs: spec
                        .task_template
                        .as_ref()
                        .and_then(|t| t.container_spec.as_ref())
                        .map(|c| {
                            let configs = c
                                .configs
                                .iter()
                                .flatten()
                                .filter_map(|r| r.config_name.clone());
                            let secrets = c
                                .secrets
                                .iter()
                                .flatten()
                                .filter_map(|r| r.secret_name.clone());
                            configs.chain(secrets).collect()
                        })
                        .unwrap_or_default(),
                },
            );
        }
        Ok(out)
    }

    async fn follow(&self, svc: &Svc, before: &BTreeMap<String, Svc>) -> ServiceResult {
        let previous = before.get(&svc.id);
        let Some(previous) = previous else {
            return ServiceResult {
                service: svc.name.clone(),
                from_image: None,
                to_image: None,
                outcome: JobState::Completed,
                message: "created".into(),
            };
        };
        let spec = match self.engine.inspect_service_raw(&svc.id).await {
            Ok(raw) => raw.get("Spec").cloned().unwrap_or(Value::Null),
            Err(e) => {
                return ServiceResult {
                    service: svc.name.clone(),
                    from_image: None,
                    to_image: None,
                    outcome: JobState::Failed,
                    message: e.to_string(),
                };
            }
        };
        let end = follow_started(
            &self.engine,
            &svc.id,
            &svc.name,
            &spec,
            previous.started.clone(),
            self.follow_limit,
        )
        .await;
        let (outcome, message) = match end {
            End::Completed(m) => (JobState::Completed, m),
            End::Unchanged => (JobState::Skipped, "unchanged".into()),
            End::Paused(m) => (JobState::Failed, format!("update paused: {m}")),
            End::RolledBack(m) => (JobState::RolledBack, format!("rolled back: {m}")),
            End::TimedOut(d) => (
                JobState::Failed,
                format!(
                    "update did not finish within {}",
                    humantime::format_duration(d)
                ),
            ),
            End::Removed => (
                JobState::Failed,
                "service was removed during the update".into(),
            ),
        };
        ServiceResult {
            service: svc.name.clone(),
            from_image: None,
            to_image: None,
            outcome,
            message,
        }
    }

    /// Removes versions of the stack's rotated configs and secrets that no service uses
    /// and the deploy did not just name, keeping the newest `keep` old configs
    /// of each key and no old secret. Returns the names removed.
    async fn prune(&self, stack: &str, result: &Deployed, keep: usize) -> Vec<String> {
        let used: std::collections::HashSet<String> = match self.services(stack).await {
            Ok(s) => s.into_values().flat_map(|s| s.configs).collect(),
            Err(e) => {
                warn!(stack, error = %e, "cannot list services; nothing pruned");
                return Vec::new();
            }
        };
        let current: std::collections::HashSet<&str> =
            result.rotated.iter().map(|r| r.name.as_str()).collect();
        let mut removed = Vec::new();
        let label = format!("{STACK_LABEL}={stack}");
        match self.engine.list_configs(&label).await {
            Ok(configs) => {
                let versions = configs
                    .iter()
                    .filter_map(|c| {
                        let spec = c.spec.as_ref()?;
                        let name = spec.name.clone()?;
                        let key = spec.labels.as_ref()?.get(KEY_LABEL)?.clone();
                        Some(Version {
                            key,
                            name,
                            created: c.created_at.clone().unwrap_or_default(),
                        })
                    })
                    .collect();
                for name in prunable(versions, &current, &used, keep) {
                    match self.engine.delete_config(&name).await {
                        Ok(()) => removed.push(name),
                        Err(e) => warn!(config = %name, error = %e, "cannot remove an old config"),
                    }
                }
            }
            Err(e) => warn!(stack, error = %e, "cannot list configs; none pruned"),
        }
        match self.engine.list_secrets(&label).await {
            Ok(secrets) => {
                for (name, _labels) in secrets {
                    if current.contains(name.as_str()) || used.contains(&name) {
                        continue;
                    }
                    match self.engine.delete_secret(&name).await {
                        Ok(()) => removed.push(name),
                        Err(e) => warn!(secret = %name, error = %e, "cannot remove an old secret"),
                    }
                }
            }
            Err(e) => warn!(stack, error = %e, "cannot list secrets; none pruned"),
        }
        removed
    }

    /// Creates the deploy container (labelled with the stack, the job and the services
    /// before the deploy), uploads the request and credentials and starts it; returns its id.
    async fn start_container(
        &self,
        job: &RunContext,
        stack: &Stack,
        commit: Option<String>,
        before: &BTreeMap<String, Svc>,
    ) -> Result<String, String> {
        let request = deployer::Request {
            stack: stack.name.clone(),
            repository: stack.repository.clone(),
            branch: stack.branch.clone(),
            commit,
            compose: stack.compose.clone(),
            prune: stack.prune,
            environment: stack.environment.clone(),
        };
        let files = self.files(stack, &request)?;
        let name = format!("drover-stack-{}-{}", stack.name, job.id);
        let body = ContainerCreateBody {
            image: Some(stack.image.clone()),
            cmd: Some(vec!["stack-deploy".into()]),
            labels: Some(HashMap::from([
                (STACK_CONTAINER_LABEL.to_owned(), stack.name.clone()),
                (
                    crate::jobs::container::JOB_LABEL.to_owned(),
                    job.id.to_string(),
                ),
                (BEFORE_LABEL.to_owned(), encode_before(before)),
            ])),
            host_config: Some(HostConfig {
                binds: Some(vec!["/var/run/docker.sock:/var/run/docker.sock".into()]),
                // The git server is reached as from the node itself.
                network_mode: Some("host".into()),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let id = match self.engine.create_container(&name, body.clone()).await {
            Ok(id) => id,
            Err(e) if e.is_not_found() => {
                info!(image = %stack.image, "pulling the deploy image");
                self.engine
                    .pull_image(&stack.image, None, stack.timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                self.engine
                    .create_container(&name, body)
                    .await
                    .map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        let started = async {
            self.engine
                .upload_archive(&id, files)
                .await
                .map_err(|e| e.to_string())?;
            self.engine
                .start_container(&id)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = started {
            if let Err(r) = self.engine.remove_container(&id).await {
                warn!(container = %name, error = %r, "cannot remove the deploy container");
            }
            return Err(e);
        }
        Ok(id)
    }

    /// Waits for the deploy container to end, within the stack's timeout, and returns
    /// its exit code and output.
    async fn wait_container(&self, stack: &Stack, id: &str) -> Result<(i64, String), String> {
        let code = match tokio::time::timeout(stack.timeout, self.engine.wait_container(id)).await {
            Ok(Ok(code)) => code,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                let _ = self.engine.kill_container(id, "KILL").await;
                return Err(format!(
                    "the deploy did not finish within {}",
                    humantime::format_duration(stack.timeout)
                ));
            }
        };
        let log = self
            .engine
            .container_logs(id, 400)
            .await
            .map_err(|e| e.to_string())?;
        Ok((code, log))
    }

    /// The archive the container gets: the request, the stack's credential files and the
    /// registries' auths.
    fn files(&self, stack: &Stack, request: &deployer::Request) -> Result<Vec<u8>, String> {
        let dir = deployer::REQUEST_DIR.trim_start_matches('/');
        let at = |f: &str| format!("{dir}/{f}");
        let mut files = vec![
            File {
                path: at(deployer::REQUEST_FILE),
                mode: 0o600,
                data: serde_json::to_vec(request).map_err(|e| e.to_string())?,
            },
            File {
                path: at(&format!("{}/config.json", deployer::DOCKER_CONFIG_DIR)),
                mode: 0o600,
                data: self.docker_config.clone(),
            },
        ];
        let credentials = [
            (&stack.token_file, deployer::TOKEN_FILE),
            (&stack.ssh_key_file, deployer::SSH_KEY_FILE),
            (&stack.known_hosts_file, deployer::KNOWN_HOSTS_FILE),
            (&stack.git_crypt_key_file, deployer::GIT_CRYPT_KEY_FILE),
        ];
        for (source, target) in credentials {
            let Some(source) = source else { continue };
            let data = std::fs::read(source)
                .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
            files.push(File {
                path: at(target),
                mode: 0o600,
                data,
            });
        }
        let docker_dir = at(deployer::DOCKER_CONFIG_DIR);
        Ok(archive::tar(&[dir, &docker_dir], &files))
    }
}

/// A started deploy container and the stack's services before it ran.
struct Started {
    id: String,
    before: BTreeMap<String, Svc>,
}

/// The services before a deploy as a label value:
/// `{"ID": [VERSION, "STARTED", "TEMPLATE HASH"]}`.
fn encode_before(before: &BTreeMap<String, Svc>) -> String {
    let map: BTreeMap<&str, (u64, Option<&str>, &str)> = before
        .values()
        .map(|s| {
            let started = s.started.as_deref();
            (s.id.as_str(), (s.version, started, s.template.as_str()))
        })
        .collect();
    serde_json::to_string(&map).unwrap_or_default()
}

/// [`encode_before`]'s label read back; an unreadable one reads as no services (each
/// service of the stack then counts as created, and no rollout is followed).
fn decode_before(text: &str) -> BTreeMap<String, Svc> {
    let map: BTreeMap<String, (u64, Option<String>, String)> =
        serde_json::from_str(text).unwrap_or_default();
    map.into_iter()
        .map(|(id, (version, started, template))| {
            let svc = Svc {
                id: id.clone(),
                name: String::new(),
                version,
                template,
                started,
                configs: Vec::new(),
            };
            (id, svc)
        })
        .collect()
}

/// One service of a stack, as listed before and after a deploy.
#[derive(Debug, Clone)]
struct Svc {
    id: String,
    name: String,
    version: u64,
    /// Hash of the task template: what a rollout replaces tasks for.
    template: String,
    started: Option<String>,
    configs: Vec<String>,
}

/// The slot of a stack's deploys: one at a time, a newer job supersedes a waiting one.
fn slot(stack: &str) -> String {
    format!("stack {stack}")
}

/// Services created or whose task template the deploy changed. `docker stack deploy`
/// updates every service of the file, so an unchanged one gets a new spec version too;
/// Swarm starts no rollout for it, and there is none to follow.
fn changed_services(before: &BTreeMap<String, Svc>, after: &BTreeMap<String, Svc>) -> Vec<Svc> {
    after
        .values()
        .filter(|a| {
            before
                .get(&a.id)
                .is_none_or(|b| b.version != a.version && b.template != a.template)
        })
        .cloned()
        .collect()
}

/// A task template's hash, the same in every process (the JSON of a `Value` has sorted
/// keys, whatever order the engine's maps came in).
fn template_hash(template: Option<&bollard::models::TaskSpec>) -> String {
    let value = serde_json::to_value(template).unwrap_or(Value::Null);
    crate::hash::sha256_hex(value.to_string().as_bytes())
}

/// The stacks a push of `repository` (`owner/name`, GitLab's `group/sub/name`) at
/// `branch` through `hook` syncs.
pub fn matching<'a>(
    stacks: &'a [Stack],
    hook: &str,
    repository: &str,
    branch: &str,
) -> Vec<&'a Stack> {
    stacks
        .iter()
        .filter(|s| {
            s.hook.as_deref() == Some(hook) && s.branch == branch && s.is_repository(repository)
        })
        .collect()
}

/// One version of a rotated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub key: String,
    pub name: String,
    /// RFC 3339, as the engine reports it (sorts by time).
    pub created: String,
}

/// Versions to remove: not just deployed, not used by a service, and beyond the newest
/// `keep` of their key.
pub fn prunable(
    mut versions: Vec<Version>,
    current: &std::collections::HashSet<&str>,
    used: &std::collections::HashSet<String>,
    keep: usize,
) -> Vec<String> {
    versions.sort_by(|a, b| (&a.key, &b.created).cmp(&(&b.key, &a.created)));
    let mut out = Vec::new();
    let mut kept: HashMap<&str, usize> = HashMap::new();
    for v in &versions {
        if current.contains(v.name.as_str()) || used.contains(&v.name) {
            continue;
        }
        let n = kept.entry(v.key.as_str()).or_default();
        if *n < keep {
            *n += 1;
            continue;
        }
        out.push(v.name.clone());
    }
    out
}

fn skipped(message: String) -> Outcome {
    Outcome {
        state: JobState::Skipped,
        message: Some(message),
        services: Vec::new(),
        exit_code: None,
        log_tail: None,
    }
}

fn summary(stack: &str, result: &Deployed, pushed: Option<&str>, pruned: &[String]) -> String {
    let mut m = format!("stack {stack} deployed at {}", result.commit);
    if let Some(pushed) = pushed.filter(|p| *p != result.commit) {
        // Every deploy takes the branch head as it starts: a push newer than this job's
        // had moved it on (or the push was forced back).
        m.push_str(&format!(
            " (the branch head when the deploy started; the push was {pushed})"
        ));
    }
    if !result.rotated.is_empty() {
        let names: Vec<&str> = result.rotated.iter().map(|r| r.name.as_str()).collect();
        m.push_str(&format!("; objects {}", names.join(", ")));
    }
    if !result.networks_created.is_empty() {
        m.push_str(&format!(
            "; networks created {}",
            result.networks_created.join(", ")
        ));
    }
    if !pruned.is_empty() {
        m.push_str(&format!("; pruned {}", pruned.join(", ")));
    }
    m
}

/// Several stacks' outcomes as one job's: the worst state, every message and service.
fn combine(outcomes: Vec<Outcome>) -> Outcome {
    if outcomes.len() == 1 {
        return outcomes
            .into_iter()
            .next()
            .unwrap_or_else(|| skipped(String::new()));
    }
    let rank = |s: JobState| match s {
        JobState::Failed => 4,
        JobState::RolledBack => 3,
        JobState::Completed => 2,
        _ => 1,
    };
    let state = outcomes
        .iter()
        .map(|o| o.state)
        .max_by_key(|s| rank(*s))
        .unwrap_or(JobState::Skipped);
    let message = outcomes
        .iter()
        .filter_map(|o| o.message.clone())
        .collect::<Vec<_>>()
        .join("\n");
    let log_tail = outcomes
        .iter()
        .filter_map(|o| o.log_tail.clone())
        .collect::<Vec<_>>()
        .join("\n");
    Outcome {
        state,
        message: Some(message),
        services: outcomes.into_iter().flat_map(|o| o.services).collect(),
        exit_code: None,
        log_tail: (!log_tail.is_empty()).then_some(log_tail),
    }
}

impl Runner for StackRunner {
    fn run(&self, job: RunContext) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            match &job.work {
                Work::SyncStacks { repository, branch } => {
                    let stacks = self.pushed(&job.hook, repository, branch);
                    self.sync(&job, stacks).await
                }
                Work::SyncStack { stack } => {
                    let stacks: Vec<&Stack> =
                        self.stacks.iter().filter(|s| &s.name == stack).collect();
                    if stacks.is_empty() {
                        return Outcome::failed(format!("no stack named {stack}"));
                    }
                    self.sync(&job, stacks).await
                }
                _ => self.inner.run(job).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn stack(name: &str, repository: &str, branch: &str, hook: Option<&str>) -> Stack {
        let mut s: Stack =
            serde_yaml_ng::from_str(&format!("{{ name: {name}, repository: {repository} }}"))
                .expect("stack");
        s.branch = branch.into();
        s.hook = hook.map(String::from);
        s
    }

    #[test]
    fn a_push_syncs_the_stacks_of_its_hook_repository_and_branch_only() {
        let stacks = vec![
            stack(
                "web",
                "https://git.example.com/lab/web.git",
                "main",
                Some("gh"),
            ),
            stack(
                "web-next",
                "https://git.example.com/lab/web.git",
                "next",
                Some("gh"),
            ),
            stack(
                "mon",
                "git@git.example.com:lab/monitoring.git",
                "main",
                Some("gh"),
            ),
            stack("quiet", "https://git.example.com/lab/web.git", "main", None),
        ];
        let names = |v: Vec<&Stack>| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(matching(&stacks, "gh", "lab/web", "main")),
            vec!["web"]
        );
        assert_eq!(
            names(matching(&stacks, "gh", "Lab/Web", "next")),
            vec!["web-next"]
        );
        assert_eq!(
            names(matching(&stacks, "gh", "lab/monitoring", "main")),
            vec!["mon"]
        );
        assert!(matching(&stacks, "other", "lab/web", "main").is_empty());
        assert!(matching(&stacks, "gh", "web", "main").is_empty());
        assert!(matching(&stacks, "gh", "b/lab/web", "main").is_empty());
        // GitLab subgroups, and a forge served under a path prefix.
        let deep = vec![
            stack(
                "deep",
                "ssh://git@gitlab.example.com:2222/group/sub/web.git",
                "main",
                Some("gl"),
            ),
            stack(
                "prefixed",
                "https://example.com/gitea/lab/mon.git",
                "main",
                Some("gl"),
            ),
        ];
        assert_eq!(
            names(matching(&deep, "gl", "group/sub/web", "main")),
            vec!["deep"]
        );
        assert!(matching(&deep, "gl", "sub/web2", "main").is_empty());
        assert!(matching(&deep, "gl", "roup/sub/web", "main").is_empty());
        assert_eq!(
            names(matching(&deep, "gl", "lab/mon", "main")),
            vec!["prefixed"]
        );
    }

    fn v(key: &str, name: &str, created: &str) -> Version {
        Version {
            key: key.into(),
            name: name.into(),
            created: created.into(),
        }
    }

    #[test]
    fn pruning_keeps_what_runs_what_was_just_deployed_and_the_newest_few() {
        let versions = vec![
            v("conf", "c1", "2026-01-01T00:00:01Z"),
            v("conf", "c2", "2026-01-01T00:00:02Z"),
            v("conf", "c3", "2026-01-01T00:00:03Z"),
            v("conf", "c4", "2026-01-01T00:00:04Z"),
            v("conf", "c5", "2026-01-01T00:00:05Z"),
            v("other", "o1", "2026-01-01T00:00:01Z"),
        ];
        let current: HashSet<&str> = ["c5", "o1"].into();
        // c1 is still used by a service (a rollback went back to it).
        let used: HashSet<String> = ["c1".to_owned()].into();
        let mut out = prunable(versions.clone(), &current, &used, 2);
        out.sort();
        assert_eq!(out, vec!["c2"]);
        let mut none_kept = prunable(versions, &current, &used, 0);
        none_kept.sort();
        assert_eq!(none_kept, vec!["c2", "c3", "c4"]);
    }

    fn svc(id: &str, version: u64) -> (String, Svc) {
        (
            id.to_owned(),
            Svc {
                id: id.into(),
                name: format!("web_{id}"),
                version,
                template: format!("template of {id} at {version}"),
                started: None,
                configs: Vec::new(),
            },
        )
    }

    #[test]
    fn changed_services_are_the_new_ones_and_those_with_a_new_task_template() {
        let before: BTreeMap<_, _> = [svc("a", 10), svc("b", 11), svc("d", 12)].into();
        // d: updated by the deploy with the same template (a new version, no rollout).
        let mut d = svc("d", 17);
        d.1.template = before["d"].template.clone();
        let after: BTreeMap<_, _> = [svc("a", 10), svc("b", 15), svc("c", 16), d].into();
        let ids: Vec<String> = changed_services(&before, &after)
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, vec!["b", "c"]);
    }

    #[test]
    fn the_services_before_a_deploy_survive_the_container_label() {
        let mut before: BTreeMap<_, _> = [svc("a", 10), svc("b", 11)].into();
        if let Some(b) = before.get_mut("b") {
            b.started = Some("2026-01-01T00:00:01Z".into());
        }
        let back = decode_before(&encode_before(&before));
        let after: BTreeMap<_, _> = [svc("a", 10), svc("b", 12), svc("c", 1)].into();
        let ids: Vec<String> = changed_services(&back, &after)
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, vec!["b", "c"]);
        assert_eq!(back["b"].started.as_deref(), Some("2026-01-01T00:00:01Z"));
        assert!(decode_before("not json").is_empty());
    }

    #[tokio::test]
    async fn a_newer_sync_supersedes_a_waiting_one_of_its_stack_and_never_another_stacks() {
        let slots = Arc::new(Slots::default());
        // Job 1 deploys web; jobs 2 and 3 (web) and 4 (mon) arrive meanwhile.
        let running = slots.acquire(&slot("web"), 1).await.expect("free");
        let wait = |key: &'static str, seq: u64| {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(&slot(key), seq).await.is_some() })
        };
        let older = wait("web", 2);
        tokio::task::yield_now().await;
        let newer = wait("web", 3);
        tokio::task::yield_now().await;
        // Another stack deploys side by side, while web's first deploy still runs.
        assert!(
            wait("mon", 4).await.expect("join"),
            "mon is not blocked by web"
        );
        drop(running);
        assert!(
            !older.await.expect("join"),
            "the older waiting sync is superseded"
        );
        assert!(
            newer.await.expect("join"),
            "the newest sync runs (and looks up the head then)"
        );
    }

    #[test]
    fn several_stacks_report_the_worst_outcome() {
        let ok = Outcome::combine(Vec::new());
        let failed = Outcome::failed("stack b: exit code 1".into());
        let out = combine(vec![ok, failed]);
        assert_eq!(out.state, JobState::Failed);
        assert!(out.message.expect("message").contains("stack b"));
    }
}
