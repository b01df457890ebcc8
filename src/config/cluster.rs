//! `cluster:`: the agent API every instance serves so the controller can put files in
//! place on other nodes (see `cluster::agent`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Cluster mode: the agent API every instance serves so the controller can put files in
/// place on other nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// Where the agent API listens; peers reach it on a network they share.
    pub listen: SocketAddr,
    /// The key shared by all instances (mount a Swarm secret here). Without this file the
    /// agent API is off and every target is delivered locally.
    pub key_file: PathBuf,
    /// How far an agent request's timestamp may be from the agent's clock.
    #[serde(with = "humantime_serde")]
    pub max_skew: Duration,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            listen: SocketAddr::from(([0, 0, 0, 0], 9092)),
            key_file: PathBuf::from("/run/secrets/drover-cluster-key"),
            max_skew: Duration::from_secs(30),
        }
    }
}
