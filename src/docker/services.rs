//! Service endpoints: list, and the one way drover changes a service,
//! [`Engine::edit_service`].
//!
//! Invariants: a spec is read and written back as the engine's raw JSON, so every field
//! survives an edit, including those bollard's typed model lacks or misspells (its
//! `HealthCheck` is the engine's `Healthcheck`: a typed round trip silently deletes the
//! health check); each write carries the version index it was read at and is retried
//! from a fresh read when the engine answers "update out of sequence"; edits of one
//! service are serialised by a per-service lock shared by every clone of the [`Engine`]
//! (webhook rollouts and `notify: restart`), held by the returned [`Edited`] until the
//! caller has followed the rollout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bollard::models::Service;
use bollard::query_parameters::ListServicesOptions;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::OwnedMutexGuard;

use super::{Credentials, Engine, Error, path_segment};

/// Writes refused as out of sequence before the edit gives up.
const SEQUENCE_ATTEMPTS: usize = 5;

/// What an edit decided after looking at the current spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Post the edited spec.
    Apply,
    /// Leave the service alone (e.g. it already runs the wanted image).
    Skip,
}

/// The result of [`Engine::edit_service`]. While it lives, no other edit of the same
/// service can start: keep it until the rollout has been followed.
#[derive(Debug)]
pub struct Edited {
    pub id: String,
    pub name: String,
    /// A new spec was posted (`false`: the edit said [`Edit::Skip`]).
    pub changed: bool,
    /// `UpdateStatus.StartedAt` as read before the change; the rollout our change starts
    /// is the one with a different start time.
    pub previous_update: Option<String>,
    /// The spec as posted (or as read, when skipped).
    pub spec: Value,
    _lock: OwnedMutexGuard<()>,
}

/// The state of a service's latest rollout, as the engine reports it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct UpdateStatus {
    /// `updating`, `paused`, `completed`, `rollback_started`, `rollback_paused`,
    /// `rollback_completed`.
    #[serde(rename = "State", default)]
    pub state: String,
    #[serde(rename = "StartedAt")]
    pub started_at: Option<String>,
    #[serde(rename = "Message", default)]
    pub message: String,
}

/// One async lock per service id.
#[derive(Default)]
pub struct ServiceLocks {
    inner: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ServiceLocks {
    async fn lock(&self, id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            // Forget locks nobody holds or waits for, so the map stays as small as the
            // set of services being edited right now.
            map.retain(|_, l| Arc::strong_count(l) > 1);
            map.entry(id.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[derive(Deserialize)]
struct RawService {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Version")]
    version: RawVersion,
    #[serde(rename = "Spec")]
    spec: Value,
    #[serde(rename = "UpdateStatus")]
    update_status: Option<UpdateStatus>,
}

#[derive(Deserialize)]
struct RawVersion {
    #[serde(rename = "Index")]
    index: u64,
}

impl Engine {
    /// `GET /services`, typed: for reading only (never post these back).
    pub async fn list_services(&self) -> Result<Vec<Service>, Error> {
        self.call(
            || "list services".into(),
            self.api.list_services(None::<ListServicesOptions>),
        )
        .await
    }

    /// `GET /services/{id}` as the engine's raw JSON.
    pub async fn inspect_service_raw(&self, id_or_name: &str) -> Result<Value, Error> {
        self.get_json(
            &format!("inspect service {id_or_name}"),
            &format!("/services/{}", path_segment(id_or_name)),
        )
        .await
    }

    /// The service's latest rollout, `None` before its first update.
    pub async fn update_status(&self, id: &str) -> Result<Option<UpdateStatus>, Error> {
        let raw: RawService = self
            .get_json(
                &format!("inspect service {id}"),
                &format!("/services/{}", path_segment(id)),
            )
            .await?;
        Ok(raw.update_status)
    }

    /// Edits a service's spec: waits for the service's lock, reads its raw JSON, lets
    /// `edit` change `Spec` in place, posts it back at the version read (with
    /// `credentials` as `X-Registry-Auth` when the new image needs them), and starts over
    /// from a fresh read when the engine says the version was stale. `edit` may run more
    /// than once and must decide from the spec it is given.
    pub async fn edit_service<F>(
        &self,
        id_or_name: &str,
        credentials: Option<&Credentials>,
        mut edit: F,
    ) -> Result<Edited, Error>
    where
        F: FnMut(&mut Value) -> Edit + Send,
    {
        // Lock by id: a notify names the service, a webhook knows its id.
        let first: RawService = self
            .get_json(
                &format!("inspect service {id_or_name}"),
                &format!("/services/{}", path_segment(id_or_name)),
            )
            .await?;
        let id = first.id;
        let lock = self.locks.lock(&id).await;
        let auth = match credentials {
            Some(c) => {
                let json = serde_json::to_vec(c).map_err(|e| Error::Decode {
                    op: format!("encode credentials for {id_or_name}"),
                    reason: e.to_string(),
                })?;
                vec![(
                    "X-Registry-Auth",
                    base64::engine::general_purpose::URL_SAFE.encode(json),
                )]
            }
            None => Vec::new(),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current: RawService = self
                .get_json(
                    &format!("inspect service {id_or_name}"),
                    &format!("/services/{}", path_segment(&id)),
                )
                .await?;
            let mut spec = current.spec;
            let name = spec
                .get("Name")
                .and_then(Value::as_str)
                .unwrap_or(id_or_name)
                .to_owned();
            let previous_update = current.update_status.and_then(|s| s.started_at);
            if edit(&mut spec) == Edit::Skip {
                return Ok(Edited {
                    id,
                    name,
                    changed: false,
                    previous_update,
                    spec,
                    _lock: lock,
                });
            }
            let body = serde_json::to_vec(&spec).map_err(|e| Error::Decode {
                op: format!("encode the spec of {name}"),
                reason: e.to_string(),
            })?;
            let posted = self
                .raw(
                    &format!("update service {name}"),
                    hyper::Method::POST,
                    &format!(
                        "/services/{}/update?version={}",
                        path_segment(&id),
                        current.version.index
                    ),
                    &auth,
                    Some(body),
                )
                .await;
            match posted {
                Ok(answer) => {
                    if let Ok(w) = serde_json::from_slice::<Warnings>(&answer) {
                        for warning in w.warnings.unwrap_or_default() {
                            tracing::warn!(service = %name, %warning, "engine warned about the update");
                        }
                    }
                    return Ok(Edited {
                        id,
                        name,
                        changed: true,
                        previous_update,
                        spec,
                        _lock: lock,
                    });
                }
                Err(e) if e.is_out_of_sequence() && attempt < SEQUENCE_ATTEMPTS => {
                    tracing::warn!(service = %name, attempt, "update out of sequence; reading the service again");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[derive(Deserialize)]
struct Warnings {
    #[serde(rename = "Warnings")]
    warnings: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn edits_of_one_service_wait_for_each_other_and_others_do_not() {
        let locks = Arc::new(ServiceLocks::default());
        let held = locks.lock("a").await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("a").await;
        });
        // Another service is not blocked by `a`.
        tokio::time::timeout(std::time::Duration::from_secs(1), locks.lock("b"))
            .await
            .expect("another service's lock is free");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "second edit of `a` ran while the first held it"
        );
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("waiter runs once the lock is released")
            .expect("join");
    }

    #[test]
    fn update_status_reads_the_engines_spelling() {
        let s: UpdateStatus = serde_json::from_str(
            r#"{"State":"rollback_completed","StartedAt":"2026-01-01T00:00:00Z","Message":"rolled back"}"#,
        )
        .expect("parse");
        assert_eq!(s.state, "rollback_completed");
        assert_eq!(s.started_at.as_deref(), Some("2026-01-01T00:00:00Z"));
    }
}
