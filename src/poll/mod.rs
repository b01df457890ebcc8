//! Registry polling: for networks no webhook reaches, drover asks the registries whether
//! the tags its polled services run have moved, and rolls them through the job path a
//! webhook takes (a digest-pinned `update-services` job, coalesced, followed to its end,
//! in `/jobs` under the hook name [`POLL_HOOK`]).
//!
//! Invariants: only the instance that runs jobs (the Swarm leader's, or a standalone one)
//! polls; one manifest `HEAD` per distinct image reference per period, however many
//! services run it (`policy` groups them), within the registry's budget (`schedule`); a
//! `GET` only when the `HEAD` is refused, or once per new index to list its platform
//! manifests when a service is pinned to one (`compare`); an unchanged tag queues no job;
//! a digest is asked for once: when its rollout fails or rolls back, drover waits for the
//! next digest instead of rolling the service again every period.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{self, Config, Poll};
use crate::docker::Engine;
use crate::jobs::{Facts, Jobs, Request, Work};
use crate::registry::{Client, Error as RegistryError, Login, Manifest};
use crate::role::Role;
use crate::status::{Board, PollStatus};
use crate::update::normalise_registry;

mod compare;
mod policy;
mod schedule;

pub use compare::{Remote, Verdict, verdict};
use policy::{Image, Service};
pub use policy::{POLL_LABEL, STACK_LABEL};
use schedule::Schedule;

/// The hook name jobs of registry polls are recorded under.
pub const POLL_HOOK: &str = "registry-poll";

/// What polling remembers of one image reference between checks.
#[derive(Debug, Default)]
struct Memory {
    /// The first digest seen: what a service without a digest in its spec is taken to run.
    baseline: Option<String>,
    /// The last index fetched and its platform manifests (an unchanged index is not
    /// fetched again).
    index: Option<(String, Vec<String>)>,
    /// The digest a job was queued for.
    asked: Option<String>,
    status: PollStatus,
}

pub struct Poller {
    engine: Engine,
    client: Client,
    jobs: Arc<Jobs>,
    board: Arc<Board>,
    config: Poll,
    /// Stacks drover deploys from git: their services are polled only by their own label.
    git_stacks: BTreeSet<String>,
    /// How often the list of services is read when nothing is due.
    resync: Duration,
}

impl Poller {
    /// Reads the `registries:` passwords (a file that cannot be read is a start-up error,
    /// as for the job runner).
    pub fn new(
        engine: Engine,
        config: &Config,
        jobs: Arc<Jobs>,
        board: Arc<Board>,
    ) -> Result<Poller, crate::update::Error> {
        let mut logins = HashMap::new();
        for r in &config.registries {
            let password = config::read_secret(&r.password_file).map_err(|source| {
                crate::update::Error::Secret {
                    address: r.address.clone(),
                    source,
                }
            })?;
            logins.insert(
                normalise_registry(&r.address),
                Login {
                    username: r.username.clone(),
                    password: String::from_utf8_lossy(&password).into_owned(),
                },
            );
        }
        Ok(Poller {
            engine,
            client: Client::new(logins, config.poll.plain_http.clone(), config.poll.timeout),
            jobs,
            board,
            config: config.poll.clone(),
            git_stacks: config.stacks.iter().map(|s| s.name.clone()).collect(),
            resync: config.resync,
        })
    }

    /// Polls until shutdown.
    pub async fn run(self, mut role: watch::Receiver<Role>, shutdown: CancellationToken) {
        let mut schedule = Schedule::new(self.config.budget);
        let mut memory: HashMap<String, Memory> = HashMap::new();
        let mut warned: BTreeSet<(String, String)> = BTreeSet::new();
        let mut listed: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let relist = listed.map_or(now, |at| at + self.resync);
            let wake = schedule.wake_at().map_or(relist, |w| w.min(relist));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {}
                changed = role.changed() => if changed.is_err() { return },
            }
            if !matches!(*role.borrow_and_update(), Role::Leader | Role::Standalone) {
                // Another instance polls; its successor starts from a fresh schedule.
                schedule = Schedule::new(self.config.budget);
                memory.clear();
                listed = None;
                self.board.update(|s| s.polls.clear());
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = role.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let listing = tokio::select! {
                () = shutdown.cancelled() => return,
                l = self.engine.list_services() => l,
            };
            let images = match listing {
                Ok(services) => {
                    let services: Vec<Service> = services.into_iter().filter_map(service).collect();
                    let (images, problems) =
                        policy::polled(&services, &self.config, &self.git_stacks);
                    for (service, reason) in problems {
                        // Once per service and value: the list is read every period.
                        if warned.insert((service.clone(), reason.clone())) {
                            warn!(%service, %reason, "service not polled");
                        }
                    }
                    images
                }
                Err(e) => {
                    warn!(error = %e, "cannot list services to poll");
                    listed = Some(Instant::now());
                    continue;
                }
            };
            let now = Instant::now();
            listed = Some(now);
            schedule.retarget(
                images
                    .iter()
                    .map(|(k, i)| (k.as_str(), i.image.registry.as_str(), i.every)),
                now,
            );
            memory.retain(|k, _| images.contains_key(k));
            while let Some(key) = schedule.next_due(Instant::now()) {
                let Some(image) = images.get(&key) else {
                    continue;
                };
                let m = memory.entry(key.clone()).or_default();
                // A check is bounded (`poll.timeout` per request), but shutdown waits for none.
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = self.check(&key, image, m, &mut schedule) => {}
                }
            }
            self.show(&images, &mut memory, &schedule);
        }
    }

    /// One check of one image reference: ask, compare, queue a job when behind.
    async fn check(&self, key: &str, image: &Image, m: &mut Memory, schedule: &mut Schedule) {
        let r = &image.image;
        let count = |outcome: &str| {
            crate::metrics::get()
                .registry_checks
                .with_label_values(&[r.registry.as_str(), outcome])
                .inc()
        };
        m.status.last_at = Some(crate::clock::unix_secs().max(0) as u64);
        let manifest = match self.client.head(&r.registry, &r.repo, &r.tag).await {
            Ok(manifest) => manifest,
            Err(e) => return self.failed(key, &e, m, schedule),
        };
        let now = Instant::now();
        if manifest.requests > 1 {
            schedule.spend(&r.registry, manifest.requests - 1, now);
        }
        if let Some(rate) = manifest.rate {
            schedule.observe(&r.registry, rate, now);
            crate::metrics::get()
                .registry_remaining
                .with_label_values(&[r.registry.as_str()])
                .set(i64::try_from(rate.remaining).unwrap_or(i64::MAX));
        }
        m.status.digest = Some(manifest.digest.clone());
        let baseline = m
            .baseline
            .get_or_insert_with(|| manifest.digest.clone())
            .clone();
        let outdated = match self
            .outdated(image, &manifest, &baseline, m, schedule)
            .await
        {
            Ok(o) => o,
            Err(e) => return self.failed(key, &e, m, schedule),
        };
        if outdated.is_empty() {
            debug!(image = %key, digest = %manifest.digest, "image unchanged");
            count("unchanged");
            m.status.outcome = Some("unchanged".into());
            m.status.message = None;
            return;
        }
        if m.asked.as_deref() == Some(manifest.digest.as_str()) {
            debug!(image = %key, digest = %manifest.digest, "digest already asked for");
            count("held");
            m.status.outcome = Some("held".into());
            m.status.message = Some(format!(
                "{} not on this digest after its job; waiting for a newer one",
                outdated.join(", ")
            ));
            return;
        }
        let request = Request {
            hook: POLL_HOOK.into(),
            work: Work::UpdateServices {
                image: key.to_owned(),
                digest: Some(manifest.digest.clone()),
                only: outdated.clone(),
            },
            facts: Facts {
                hook: POLL_HOOK.into(),
                event: Some("poll".into()),
                repository: Some(r.repo.clone()),
                tag: Some(r.tag.clone()),
                image: Some(key.to_owned()),
                ..Facts::default()
            },
            quiet: Duration::ZERO,
        };
        match self.jobs.submit(request).await {
            Ok(submitted) => {
                info!(image = %key, digest = %manifest.digest, services = %outdated.join(","), job = %submitted.id, "new digest in the registry: update queued");
                count("changed");
                m.asked = Some(manifest.digest.clone());
                m.status.outcome = Some("changed".into());
                m.status.message = Some(format!("update of {} queued", outdated.join(", ")));
                m.status.job = Some(submitted.id.to_string());
            }
            Err(e) => {
                // Not remembered as asked: the next check queues it again.
                warn!(image = %key, error = %e, "cannot queue an update");
                count("failed");
                m.status.outcome = Some("failed".into());
                m.status.message = Some(e.to_string());
            }
        }
    }

    /// The polled services of `image` that are behind `manifest`, fetching the index's
    /// platform manifests when a service's digest may be one of them.
    async fn outdated(
        &self,
        image: &Image,
        manifest: &Manifest,
        baseline: &str,
        m: &mut Memory,
        schedule: &mut Schedule,
    ) -> Result<Vec<String>, RegistryError> {
        let mut platforms = manifest.platforms.clone().or_else(|| {
            m.index
                .as_ref()
                .filter(|(d, _)| *d == manifest.digest)
                .map(|(_, p)| p.clone())
        });
        loop {
            let remote = Remote {
                digest: &manifest.digest,
                index: manifest.index,
                platforms: platforms.as_deref(),
            };
            let verdicts: Vec<(&str, Verdict)> = image
                .services
                .iter()
                .map(|s| {
                    (
                        s.name.as_str(),
                        verdict(s.digest.as_deref(), remote, Some(baseline)),
                    )
                })
                .collect();
            if platforms.is_none() && verdicts.iter().any(|(_, v)| *v == Verdict::NeedPlatforms) {
                let r = &image.image;
                schedule.spend(&r.registry, 1, Instant::now());
                let listed = self
                    .client
                    .platforms(&r.registry, &r.repo, &manifest.digest)
                    .await?;
                m.index = Some((manifest.digest.clone(), listed.clone()));
                platforms = Some(listed);
                continue;
            }
            return Ok(verdicts
                .into_iter()
                .filter(|(_, v)| *v != Verdict::Current)
                .map(|(n, _)| n.to_owned())
                .collect());
        }
    }

    fn failed(&self, key: &str, e: &RegistryError, m: &mut Memory, schedule: &mut Schedule) {
        if let RegistryError::RateLimited(registry) = e {
            schedule.hold(registry, Instant::now());
        }
        let registry = key.split('/').next().unwrap_or_default();
        crate::metrics::get()
            .registry_checks
            .with_label_values(&[registry, e.outcome()])
            .inc();
        warn!(image = %key, error = %e, "registry check failed");
        m.status.outcome = Some(e.outcome().into());
        m.status.message = Some(e.to_string());
    }

    /// The status page's rows: one per polled image.
    fn show(
        &self,
        images: &BTreeMap<String, Image>,
        memory: &mut HashMap<String, Memory>,
        schedule: &Schedule,
    ) {
        let (now, unix_now) = (Instant::now(), crate::clock::unix_secs().max(0) as u64);
        let rows = images
            .iter()
            .map(|(key, image)| {
                let m = memory.entry(key.clone()).or_default();
                PollStatus {
                    image: key.clone(),
                    services: image.services.iter().map(|s| s.name.clone()).collect(),
                    every: image.every.as_secs(),
                    next_at: schedule
                        .next_check(key)
                        .map(|at| unix_now + at.saturating_duration_since(now).as_secs()),
                    ..m.status.clone()
                }
            })
            .collect();
        self.board.update(|s| s.polls = rows);
    }
}

/// A service as the policy sees it; `None` without a name or an image.
fn service(s: bollard::models::Service) -> Option<Service> {
    let spec = s.spec?;
    let image = spec.task_template?.container_spec?.image?;
    Some(Service {
        name: spec.name?,
        image,
        labels: spec.labels.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_names_drover_records_its_own_jobs_under_are_refused_as_hook_names() {
        let reserved = crate::config::RESERVED_HOOK_NAMES;
        for name in [
            super::POLL_HOOK,
            crate::stacks::poll::POLL_HOOK,
            crate::stacks::poll::SYNC_HOOK,
        ] {
            assert!(reserved.contains(&name), "{name}");
        }
    }
}
