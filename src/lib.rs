//! drover keeps a Docker Swarm cluster configured by itself.
//!
//! Start reading at [`daemon`]: it wires every module below and owns the one shutdown
//! token. Modules are listed in the order data flows through them (DESIGN.md): the
//! Engine's events become hints (`watch`), hints become one cached snapshot (`state`),
//! the snapshot becomes bytes (`render`), `reconcile` decides what to do with them and
//! `apply` does it. Webhooks enter through `http`, are verified into facts by `hooks`,
//! queued and journalled by `jobs`, and `update` rolls services to new digests. `cluster`
//! says which role this instance plays. `docker` is the only code that talks to the
//! engine; `metrics` and `status` are what operators see.

// composition root: wires everything below
pub mod daemon;

// command line, zero-config default, one-shot commands
pub mod cli;

// typed config, validated once
pub mod config;

// SIGHUP: the config file again, swapped in whole or refused
pub mod reload;

// the only code that talks to the engine
pub mod docker;

// retry delays shared by every loop that waits for the engine
pub mod backoff;

// engine events -> change hints
pub mod watch;

// one cached Snapshot of the cluster
pub mod state;

// pure: Snapshot + template -> bytes
pub mod render;

// min/max batching window per target
pub mod debounce;

// the loop: hints -> snapshot -> render -> apply
pub mod reconcile;

// stage, check, commit or restore, notify
pub mod apply;

// axum routers: hooks, jobs, operator endpoints, the status page
pub mod http;

// verify webhooks into facts
pub mod hooks;

// queue, coalesce and journal webhook work
pub mod jobs;

// digest -> pinned service update -> followed rollout
pub mod update;

// roles, peers, the agent API and delivery to other nodes
pub mod cluster;

// the `container` action: one-off containers for a hook's job
pub mod container;

// the one Prometheus registry
pub mod metrics;

// the one atomic file write
pub mod fsutil;

// the one local command runner
pub mod process;

// bounded, secret-free job messages
pub mod redact;

// the status board operators read
pub mod status;
