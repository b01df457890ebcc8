//! Cluster mode: how the instances of drover's global service work together.
//!
//! `role` says which part this instance plays, live from Swarm: the controller (the Raft
//! leader's instance, or the only one outside Swarm) renders and runs journalled jobs;
//! `agent` is the API through which it puts a file in place on
//! the node that runs the consumer (every instance serves it, workers included);
//! `contacts` is how the others learn where the controller is (its heartbeats) and how
//! recently each peer answered; `forward` hands webhooks and job reads that land
//! elsewhere to the controller. Everything an agent does is authenticated with the
//! cluster key.

pub mod agent;
pub mod contacts;
pub mod delivery;
pub mod forward;
pub mod peers;
pub mod role;
pub mod wire;
