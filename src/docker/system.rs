//! System and Swarm endpoints: `GET /info`, `GET /swarm`, nodes, and the event stream.
//!
//! The event stream is the one call without a deadline: it lives until the engine ends
//! it, and `watch` reconnects with backoff.

use std::collections::HashMap;

use bollard::models::{EventMessage, Node, Swarm, SystemInfo};
use bollard::query_parameters::{EventsOptions, ListNodesOptions};
use futures_util::{Stream, StreamExt};

use super::{Engine, Error};

impl Engine {
    /// `GET /info`: the node's Swarm membership, node id, engine version.
    pub async fn info(&self) -> Result<SystemInfo, Error> {
        self.call(|| "read engine info".into(), self.api.info())
            .await
    }

    /// `GET /swarm`: succeeds only on a Swarm manager.
    pub async fn inspect_swarm(&self) -> Result<Swarm, Error> {
        self.call(|| "inspect swarm".into(), self.api.inspect_swarm())
            .await
    }

    /// `GET /nodes/{id}`.
    pub async fn inspect_node(&self, id: &str) -> Result<Node, Error> {
        self.call(|| format!("inspect node {id}"), self.api.inspect_node(id))
            .await
    }

    /// `GET /nodes`.
    pub async fn list_nodes(&self) -> Result<Vec<Node>, Error> {
        self.call(
            || "list nodes".into(),
            self.api.list_nodes(None::<ListNodesOptions>),
        )
        .await
    }

    /// `GET /events` of the given `types`, from `since` (unix seconds) on. Long-lived: no
    /// deadline; an error item or the end of the stream means "reconnect".
    pub fn events(
        &self,
        since: Option<i64>,
        types: &[&str],
    ) -> impl Stream<Item = Result<EventMessage, Error>> + use<> {
        let filters: HashMap<String, Vec<String>> = HashMap::from([(
            "type".to_owned(),
            types.iter().map(|t| (*t).to_owned()).collect(),
        )]);
        let options = EventsOptions {
            since: since.map(|s| s.to_string()),
            until: None,
            filters: Some(filters),
        };
        self.api
            .events(Some(options))
            .map(|item| item.map_err(|e| Error::from_bollard("read the event stream", e)))
    }
}
