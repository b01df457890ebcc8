//! Who the controller is, and when each instance was last heard from.
//!
//! The controller sends every peer a signed heartbeat ([`HEARTBEAT`] apart, and at once
//! when it becomes controller) carrying its own agent address; that is how an instance
//! that has no Swarm API (a worker) learns where to forward webhooks and job reads. The
//! controller records each peer's last successful contact, by heartbeat or delivery.
//!
//! Invariants: a heartbeat is an agent API request (same [`super::wire::Guard`]: key,
//! clock skew, nonce), so only a holder of the cluster key can name the controller; the
//! state is a few entries per node of the cluster, replaced, never appended to; a beat to
//! all peers is concurrent and bounded by [`BEAT_TIMEOUT`], so a lost node costs one
//! timeout per beat and holds nothing else up.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::peers::Peer;
use super::wire::{self, Key};
use crate::role::Role;

/// How often the controller says it is there. Cheap: one small signed POST per peer.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// One beat's bound, connection included: a lost peer does not delay the next beat.
pub const BEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// What the controller sends in a heartbeat: where its agent API answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    /// Swarm node id of the controller.
    pub node: String,
    pub hostname: String,
    /// The controller's agent API (`ip:port` on the cluster network).
    pub address: SocketAddr,
}

/// The controller as an instance last heard of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Controller {
    node: String,
    hostname: String,
    addr: SocketAddr,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    /// This instance's Swarm node id (empty until a snapshot was seen, or outside Swarm).
    own_node: String,
    /// The agents of drover's service, from the last snapshot (only a manager sees them).
    peers: BTreeMap<String, Peer>,
    /// Node id → last successful contact (heartbeat answered or file delivered).
    last: HashMap<String, Instant>,
    controller: Option<Controller>,
}

/// Shared by the agent API (heartbeats in), the heartbeat loop and delivery (contacts out),
/// the webhook intake (where to forward) and health and status (what is shown).
#[derive(Default)]
pub struct Contacts {
    inner: Mutex<Inner>,
}

/// One peer as `/healthz` and the status page show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerView {
    pub node: String,
    pub hostname: String,
    pub address: String,
    /// Milliseconds since the last successful contact; none: never reached.
    pub last_contact_ms_ago: Option<u64>,
}

/// What this instance knows of its cluster.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct View {
    /// The controller (this instance itself when it is the controller).
    pub controller: Option<PeerView>,
    /// On the controller: every other peer with its last contact.
    pub peers: Vec<PeerView>,
}

fn ms_since(at: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(u64::MAX)
}

use crate::clock::unix_secs;

impl Contacts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peers of the last snapshot; contacts of nodes that left are forgotten.
    pub fn set_peers(&self, own_node: &str, peers: BTreeMap<String, Peer>) {
        let mut i = self.lock();
        i.own_node = own_node.to_owned();
        i.last.retain(|n, _| peers.contains_key(n));
        i.peers = peers;
    }

    /// A successful exchange with the agent on `node`.
    pub fn touch(&self, node: &str) {
        let mut i = self.lock();
        i.last.insert(node.to_owned(), Instant::now());
        let name = i
            .peers
            .get(node)
            .map_or(node, |p| p.hostname.as_str())
            .to_owned();
        drop(i);
        crate::metrics::get()
            .peer_contact
            .with_label_values(&[name.as_str()])
            .set(unix_secs());
    }

    /// A verified heartbeat: `beat`'s sender is the controller as of now.
    pub fn heard(&self, beat: &Heartbeat) {
        let mut i = self.lock();
        let changed = i
            .controller
            .as_ref()
            .is_none_or(|c| c.node != beat.node || c.addr != beat.address);
        i.controller = Some(Controller {
            node: beat.node.clone(),
            hostname: beat.hostname.clone(),
            addr: beat.address,
            at: Instant::now(),
        });
        drop(i);
        if changed {
            info!(controller = %beat.hostname, address = %beat.address, "controller is");
        }
        let name = if beat.hostname.is_empty() {
            &beat.node
        } else {
            &beat.hostname
        };
        crate::metrics::get()
            .peer_contact
            .with_label_values(&[name.as_str()])
            .set(unix_secs());
    }

    /// Where the controller's agent API answers, as last heard (none: never heard).
    pub fn controller(&self) -> Option<SocketAddr> {
        self.lock().controller.as_ref().map(|c| c.addr)
    }

    /// The controller's agent API and Swarm node id, as last heard.
    pub fn controller_at(&self) -> Option<(SocketAddr, String)> {
        self.lock()
            .controller
            .as_ref()
            .map(|c| (c.addr, c.node.clone()))
    }

    pub fn own_node(&self) -> String {
        self.lock().own_node.clone()
    }

    /// Whether a connection that arrived at local address `ip` may reach the agent API:
    /// once this instance's agent is known to sit on the agents network, only connections
    /// that arrived there (a tenant on `web` reaches drover's address on `web`, never
    /// the one on the agents network); any, before that or without such a network.
    pub fn admits_local(&self, ip: std::net::IpAddr) -> bool {
        let i = self.lock();
        match i.peers.get(&i.own_node) {
            Some(me) if me.private => me.addr.ip() == ip,
            _ => true,
        }
    }

    /// This instance's heartbeat (when it knows its own agent address) and the other
    /// peers to send it to.
    fn beat_plan(&self) -> Option<(Heartbeat, Vec<Peer>)> {
        let i = self.lock();
        let me = i.peers.get(&i.own_node)?;
        let beat = Heartbeat {
            node: me.node_id.clone(),
            hostname: me.hostname.clone(),
            address: me.addr,
        };
        let others = i
            .peers
            .values()
            .filter(|p| p.node_id != i.own_node)
            .cloned()
            .collect();
        Some((beat, others))
    }

    /// What health and status show, for an instance in `role`.
    pub fn view(&self, role: Option<Role>) -> View {
        let now = Instant::now();
        let i = self.lock();
        let view_of = |p: &Peer| PeerView {
            node: p.node_id.clone(),
            hostname: p.hostname.clone(),
            address: p.addr.to_string(),
            last_contact_ms_ago: i.last.get(&p.node_id).map(|at| ms_since(*at, now)),
        };
        if role.is_some_and(Role::is_controller) {
            return View {
                controller: i.peers.get(&i.own_node).map(|p| PeerView {
                    last_contact_ms_ago: Some(0),
                    ..view_of(p)
                }),
                peers: i
                    .peers
                    .values()
                    .filter(|p| p.node_id != i.own_node)
                    .map(view_of)
                    .collect(),
            };
        }
        View {
            controller: i.controller.as_ref().map(|c| PeerView {
                node: c.node.clone(),
                hostname: c.hostname.clone(),
                address: c.addr.to_string(),
                last_contact_ms_ago: Some(ms_since(c.at, now)),
            }),
            peers: Vec::new(),
        }
    }
}

/// Sends one heartbeat to every other peer, concurrently; records who answered.
async fn beat(contacts: &Contacts, key: &Key) {
    let Some((beat, peers)) = contacts.beat_plan() else {
        return;
    };
    let body = match serde_json::to_vec(&beat) {
        Ok(b) => b,
        Err(_) => return,
    };
    let sends = peers.into_iter().map(|p| {
        let body = body.clone();
        async move {
            let to = wire::To {
                path: wire::HEARTBEAT_PATH,
                node: &p.node_id,
            };
            let r = wire::call(
                p.addr,
                key,
                to,
                body,
                BEAT_TIMEOUT,
                wire::HEARTBEAT_ANSWER_MAX,
            )
            .await;
            (p, r)
        }
    });
    for (peer, result) in futures_util::future::join_all(sends).await {
        match result {
            Ok(_) => contacts.touch(&peer.node_id),
            Err(e) => debug!(peer = %peer.hostname, error = %e, "heartbeat not answered"),
        }
    }
}

/// While this instance is the controller: a heartbeat to every peer every [`HEARTBEAT`],
/// and one at once when it becomes controller.
pub async fn run(
    contacts: Arc<Contacts>,
    key: Key,
    mut role: watch::Receiver<Role>,
    shutdown: CancellationToken,
) {
    let mut role_open = true;
    loop {
        if role.borrow_and_update().is_controller() {
            beat(&contacts, &key).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = role.changed(), if role_open => {
                if changed.is_err() {
                    role_open = false;
                }
            }
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(node: &str, ip: &str) -> Peer {
        Peer {
            node_id: node.into(),
            hostname: format!("host-{node}"),
            addr: format!("{ip}:9092").parse().unwrap(),
            private: false,
        }
    }

    #[test]
    fn the_agent_admits_only_its_agents_network_address_once_it_knows_it() {
        let c = Contacts::default();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(c.admits_local(ip("10.9.0.1")), "nothing known yet");
        c.set_peers("n1", peers());
        assert!(c.admits_local(ip("10.9.0.1")), "no agents network");
        let mut private = peers();
        private.values_mut().for_each(|p| p.private = true);
        c.set_peers("n1", private);
        assert!(c.admits_local(ip("10.0.0.1")));
        assert!(
            !c.admits_local(ip("10.9.0.1")),
            "arrived on another network"
        );
    }

    fn peers() -> BTreeMap<String, Peer> {
        [peer("n1", "10.0.0.1"), peer("n2", "10.0.0.2")]
            .into_iter()
            .map(|p| (p.node_id.clone(), p))
            .collect()
    }

    #[test]
    fn the_controller_beats_to_the_others_from_its_own_address() {
        let c = Contacts::default();
        assert!(c.beat_plan().is_none(), "no snapshot yet: no own address");
        c.set_peers("n1", peers());
        let (beat, to) = c.beat_plan().unwrap();
        assert_eq!(beat.address, "10.0.0.1:9092".parse().unwrap());
        assert_eq!(beat.hostname, "host-n1");
        assert_eq!(to, vec![peer("n2", "10.0.0.2")]);
    }

    #[test]
    fn the_controller_shows_itself_and_each_peers_last_contact() {
        let c = Contacts::default();
        c.set_peers("n1", peers());
        let v = c.view(Some(Role::Leader));
        assert_eq!(v.controller.unwrap().address, "10.0.0.1:9092");
        assert_eq!(v.peers.len(), 1);
        assert_eq!(v.peers[0].last_contact_ms_ago, None);
        c.touch("n2");
        assert!(
            c.view(Some(Role::Leader)).peers[0]
                .last_contact_ms_ago
                .is_some_and(|ms| ms < 1000)
        );
        // A node that left forgets its contact.
        let mut fewer = peers();
        fewer.remove("n2");
        c.set_peers("n1", fewer);
        assert!(c.view(Some(Role::Leader)).peers.is_empty());
    }

    #[test]
    fn a_heartbeat_names_the_controller_for_the_others() {
        let c = Contacts::default();
        assert_eq!(c.controller(), None);
        assert_eq!(c.view(Some(Role::Worker)), View::default());
        let beat = Heartbeat {
            node: "n1".into(),
            hostname: "host-n1".into(),
            address: "10.0.0.1:9092".parse().unwrap(),
        };
        c.heard(&beat);
        assert_eq!(c.controller(), Some(beat.address));
        let v = c.view(Some(Role::Worker)).controller.unwrap();
        assert_eq!((v.node.as_str(), v.hostname.as_str()), ("n1", "host-n1"));
        assert!(v.last_contact_ms_ago.is_some_and(|ms| ms < 1000));
    }
}
