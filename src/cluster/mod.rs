//! Cluster mode: how the instances of drover's global service work together.
//!
//! The controller renders; `agent` is the API through which it puts a file in place on
//! the node that runs the consumer (every instance serves it, workers included).
//! Everything an agent does is authenticated with the cluster key.

pub mod agent;
pub mod delivery;
pub mod peers;
