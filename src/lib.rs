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
//!
//! Modules are listed bottom to top: each imports only from modules above it in this
//! list (the shared nouns — `role`, `hash`, `clock`, `apply::Outcome`, `status`'s rows —
//! sit below everything that uses them). A test in the test command fails on any import
//! cycle between source files.

// typed config, validated once
pub mod config;

// the only code that talks to the engine
pub mod docker;

// the one Prometheus registry
pub mod metrics;

// the one atomic file write
pub mod fsutil;

// the one local command runner
pub mod process;

// retry delays shared by every loop that waits for the engine
pub mod backoff;

// bounded, secret-free job messages
pub mod redact;

// the one wall clock
pub mod clock;

// the one content hash and the one body signature
pub mod hash;

pub mod tls;

// the one HTTP client for requests drover makes (sinks, registries)
pub mod outbound;

// the registry API polling asks: manifest HEADs, tokens, rate-limit headers
pub mod registry;

// events that need a person, sent to the configured sinks without waiting
pub mod notifications;

// bytes of request bodies held at once, in all and per source
pub mod budget;

// one cached Snapshot of the cluster, and the questions asked of it
pub mod state;

// engine events -> change hints
pub mod watch;

// min/max batching window per target
pub mod debounce;

// the rollout library: digest -> pinned service update -> followed rollout
pub mod update;

// what this instance is in its Swarm (a leaf noun)
pub mod role;

// the one executor: stage, check, isolate, probe certificates, commit or restore, notify
pub mod apply;

// the status board operators read, and its row types
pub mod status;

// queue, coalesce, journal and run webhook work (the runner and the container action)
pub mod jobs;

// stacks from git: the deploy container, content-named configs, one deploy per stack
pub mod stacks;

// registry polling: images of polled services checked in budget, changes queued as jobs
pub mod poll;
// certificates drover obtains (ACME): renewal schedule, backoff per name, the CA's limits
pub mod certs;

// pure: Snapshot + template -> bytes
pub mod render;

// verify webhooks into facts
pub mod hooks;

// roles (live), the agent wire protocol, agents, peers and delivery to other nodes
pub mod cluster;

// the loop: hints -> snapshot -> render -> apply or deliver
pub mod reconcile;

// axum routers: hooks, jobs, operator endpoints, the status page
pub mod http;

// SIGHUP: the config file again, swapped in whole or refused
pub mod reload;

// command line, zero-config default, one-shot commands
pub mod cli;

// composition root: wires everything below
pub mod daemon;
