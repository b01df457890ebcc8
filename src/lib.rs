//! drover keeps a Docker Swarm cluster configured by itself.
//!
//! Data flows one way (see DESIGN.md): `watch` turns Engine events into change signals,
//! `state` fetches one [`state::Snapshot`], `render` turns it into bytes through Tera,
//! `apply` stages, checks, commits and notifies. Webhooks enter through `http`/`hooks`,
//! become `jobs`, and `update` rolls services to new digests. `metrics` holds the one
//! Prometheus registry.

pub mod apply;
pub mod cli;
pub mod config;
pub mod debounce;
pub mod docker;
pub mod hooks;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod state;
pub mod status;
pub mod status_page;
pub mod update;
pub mod watch;
