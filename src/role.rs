//! What this instance is in its Swarm: a leaf noun that the render loop, the job runner,
//! the webhook intake and the status board all speak. How it is found and kept live is
//! `cluster::role`'s.

use serde::Serialize;

use crate::state::Snapshot;

/// What this instance is in its Swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// On the Raft leader: the controller (renders, runs journalled jobs).
    Leader,
    /// Another manager: stands by, takes over when leadership moves here.
    Manager,
    /// A Swarm worker: no Swarm API here.
    Worker,
    /// No Swarm: one instance plays every part.
    Standalone,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Leader, Role::Manager, Role::Worker, Role::Standalone];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Manager => "manager",
            Role::Worker => "worker",
            Role::Standalone => "standalone",
        }
    }

    /// The one rule: `manager` is an active Swarm manager (its API answers here),
    /// `node_id` the local node's Swarm id (empty outside Swarm), `leader` whether that
    /// node holds Raft leadership.
    pub fn of(manager: bool, node_id: &str, leader: bool) -> Role {
        match (manager, leader) {
            (true, true) => Role::Leader,
            (true, false) => Role::Manager,
            (false, _) if node_id.is_empty() => Role::Standalone,
            (false, _) => Role::Worker,
        }
    }

    /// The role a snapshot shows (the same rule as [`probe`]).
    pub fn of_snapshot(snapshot: &Snapshot) -> Role {
        let leader = snapshot
            .nodes
            .iter()
            .any(|n| n.id == snapshot.node_id && n.leader);
        Role::of(snapshot.swarm, &snapshot.node_id, leader)
    }

    /// Whether this instance renders and runs the journalled jobs: the leader's, or the
    /// only one there is.
    pub fn is_controller(self) -> bool {
        matches!(self, Role::Leader | Role::Standalone)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
