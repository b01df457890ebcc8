//! Task endpoints: `GET /tasks`, read as raw JSON because bollard's task model drops
//! `NetworksAttachments`, which hold the task IPs drover routes to.

use serde::de::DeserializeOwned;

use super::{Engine, Error, query_value};

impl Engine {
    /// `GET /tasks?filters=...`; `filters` is the engine's JSON filter map (e.g.
    /// `{"desired-state":["running"]}`), decoded into the caller's own task type.
    pub async fn list_tasks<T: DeserializeOwned>(&self, filters: &str) -> Result<Vec<T>, Error> {
        self.get_json(
            "list tasks",
            &format!("/tasks?filters={}", query_value(filters)),
        )
        .await
    }
}
