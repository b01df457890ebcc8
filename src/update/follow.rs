//! One rollout of one service: change its spec through [`Engine::edit_service`] and
//! follow `UpdateStatus` to the end Swarm reports.
//!
//! Invariants: the service's edit lock is held from the read of its spec to the end of
//! the rollout, so a webhook rollout and a `notify: restart` of the same service never
//! interleave and each reports its own rollout; the rollout followed is ours, told apart
//! from an earlier one by `UpdateStatus.StartedAt` (a job resumed after a restart whose
//! spec change is already posted follows the rollout still under way); drover never asks
//! for a rollback, it reports the one Swarm did.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::pin;
use crate::docker::{self, Credentials, Edited, Engine, UpdateStatus};

/// How often a running update is inspected.
const POLL: Duration = Duration::from_millis(500);
/// A service with no replicas may never get an `UpdateStatus`; after this long it is done.
const ZERO_REPLICA_GRACE: Duration = Duration::from_secs(3);

/// The spec change of a rollout.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// Pin the image to this digest (skipped when the service runs it already).
    Pin(&'a str),
    /// Replace every task (`ForceUpdate` + 1).
    Force,
}

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Nothing to change: the service already runs the digest.
    Unchanged,
    Completed(String),
    /// Swarm paused the update (failure action `pause`).
    Paused(String),
    /// Swarm rolled the service back (failure action `rollback`), or paused the rollback.
    RolledBack(String),
    /// Still updating when the limit ran out.
    TimedOut(Duration),
    /// The service disappeared during the rollout.
    Removed,
}

/// What one rollout did to one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rolled {
    pub service: String,
    pub from_image: Option<String>,
    pub to_image: Option<String>,
    pub end: End,
}

/// Changes `service` (id or name) and follows the rollout for up to `limit`.
pub async fn roll(
    engine: &Engine,
    service: &str,
    change: Change<'_>,
    credentials: Option<&Credentials>,
    limit: Duration,
) -> Result<Rolled, docker::Error> {
    let started = Instant::now();
    let mut from_image = None;
    let edited = engine
        .edit_service(service, credentials, |spec| {
            from_image = pin::image(spec).map(str::to_owned);
            match change {
                Change::Pin(digest) => pin::pin(spec, digest),
                Change::Force => pin::force(spec),
            }
        })
        .await?;
    let to_image = pin::image(&edited.spec).map(str::to_owned);
    if !edited.changed {
        // The spec already says what we want, but its rollout may still be under way: a
        // job resumed after a restart started it before drover stopped, and it is done
        // only when that rollout ends.
        let under_way = match engine.update_status(&edited.id).await {
            Ok(Some(s)) if s.state == "updating" => s.started_at,
            _ => None,
        };
        let end = match under_way {
            Some(at) => {
                info!(service = %edited.name, image = ?to_image, "following the rollout already under way");
                let ours = |s: &UpdateStatus| s.started_at.as_ref() == Some(&at);
                follow(engine, &Watched::of(&edited), ours, started + limit, limit).await
            }
            None => End::Unchanged,
        };
        return Ok(Rolled {
            service: edited.name,
            from_image,
            to_image,
            end,
        });
    }
    info!(service = %edited.name, image = ?to_image, "service update started");
    let ours = |s: &UpdateStatus| s.started_at.is_some() && s.started_at != edited.previous_update;
    let end = follow(engine, &Watched::of(&edited), ours, started + limit, limit).await;
    Ok(Rolled {
        service: edited.name.clone(),
        from_image,
        to_image,
        end,
    })
}

/// Follows a rollout someone else started (`docker stack deploy` changed the spec of
/// service `id`): the one whose `StartedAt` differs from `previous`, the service's
/// `UpdateStatus.StartedAt` before the change.
pub async fn follow_started(
    engine: &Engine,
    id: &str,
    name: &str,
    spec: &serde_json::Value,
    previous: Option<String>,
    limit: Duration,
) -> End {
    let ours = |s: &UpdateStatus| s.started_at.is_some() && s.started_at != previous;
    let watched = Watched {
        id,
        name,
        replicas: pin::replicas(spec),
    };
    follow(engine, &watched, ours, Instant::now() + limit, limit).await
}

/// The service a rollout is followed on.
struct Watched<'a> {
    id: &'a str,
    name: &'a str,
    replicas: Option<u64>,
}

impl<'a> Watched<'a> {
    fn of(edited: &'a Edited) -> Watched<'a> {
        Watched {
            id: &edited.id,
            name: &edited.name,
            replicas: pin::replicas(&edited.spec),
        }
    }
}

/// Polls the service until Swarm reports the end of the rollout `ours` picks.
async fn follow(
    engine: &Engine,
    edited: &Watched<'_>,
    ours: impl Fn(&UpdateStatus) -> bool,
    deadline: Instant,
    limit: Duration,
) -> End {
    let replicas = edited.replicas;
    let posted = Instant::now();
    loop {
        if Instant::now() >= deadline {
            return End::TimedOut(limit);
        }
        tokio::time::sleep(POLL).await;
        let status = match engine.update_status(edited.id).await {
            Ok(s) => s,
            Err(e) if e.is_not_found() => return End::Removed,
            Err(e) => {
                warn!(service = %edited.name, error = %e, "cannot inspect service; retrying");
                continue;
            }
        };
        let Some(status) = status.filter(&ours) else {
            if replicas == Some(0) && posted.elapsed() >= ZERO_REPLICA_GRACE {
                return End::Completed("no tasks to update".into());
            }
            continue;
        };
        let message = status.message;
        match status.state.as_str() {
            "completed" => return End::Completed(message),
            "paused" => return End::Paused(message),
            "rollback_completed" => return End::RolledBack(message),
            "rollback_paused" => return End::RolledBack(format!("rollback paused: {message}")),
            _ => {}
        }
    }
}
