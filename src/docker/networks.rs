//! Network endpoints: `GET /networks`.

use bollard::models::Network;
use bollard::query_parameters::ListNetworksOptions;

use super::{Engine, Error};

impl Engine {
    /// `GET /networks`: every network this node knows.
    pub async fn list_networks(&self) -> Result<Vec<Network>, Error> {
        self.call(
            || "list networks".into(),
            self.api.list_networks(None::<ListNetworksOptions>),
        )
        .await
    }
}
