//! Every Prometheus metric drover exports, in one registry.
//!
//! Labels are bounded: target, hook and outcome names come from the config file or from
//! fixed sets, never from request data or task ids. Durations are histograms.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub role: IntGaugeVec,
    pub events: IntCounterVec,
    pub stream_reconnects: IntCounter,
    pub resyncs: IntCounter,
    pub engine_calls: IntCounterVec,
    pub snapshots: IntCounter,
    pub event_apply_lag: Histogram,
    pub render_duration: HistogramVec,
    pub renders: IntCounterVec,
    pub checks: IntCounterVec,
    pub reloads: IntCounterVec,
    pub last_apply: IntGaugeVec,
    pub content_hash: IntGaugeVec,
    pub skipped_services: IntGaugeVec,
    pub hosts_left_out: IntGaugeVec,
    pub hosts_without_certificate: IntGaugeVec,
    pub webhook_requests: IntCounterVec,
    pub signature_failures: IntCounterVec,
    pub http_refused: IntCounterVec,
    pub jobs: IntCounterVec,
    pub queue_depth: IntGauge,
    pub update_duration: HistogramVec,
    pub rollbacks: IntCounter,
    pub agent_requests: IntCounterVec,
    pub agent_refused: IntCounterVec,
    pub peer_contact: IntGaugeVec,
    pub updates: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub notifications: IntCounterVec,
    pub certificate_expiry: IntGaugeVec,
    pub acme_orders: IntCounterVec,
    pub stack_deploys: IntCounterVec,
    pub registry_checks: IntCounterVec,
    pub registry_requests: IntCounterVec,
    pub registry_remaining: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const UPDATE_BUCKETS: &[f64] = &[1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let m = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).expect("static metric definition");
            r.register(Box::new(m.clone()))
                .expect("metric registered once");
            m
        };
        let stream_reconnects = counter(
            "drover_stream_reconnects_total",
            "Times the Engine event stream was reopened after it ended",
        );
        let resyncs = counter(
            "drover_resyncs_total",
            "Full resyncs (periodic, after reconnect or on start)",
        );
        let snapshots = counter(
            "drover_snapshots_total",
            "Snapshots fetched from the engine",
        );
        let rollbacks = counter(
            "drover_rollbacks_total",
            "Service updates that Swarm rolled back",
        );
        let queue_depth = IntGauge::new("drover_job_queue_depth", "Jobs queued or running")
            .expect("static metric definition");
        r.register(Box::new(queue_depth.clone()))
            .expect("metric registered once");
        let event_apply_lag = Histogram::with_opts(
            HistogramOpts::new(
                "drover_event_apply_lag_seconds",
                "Time from the first Engine event of a batch to the config being applied",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric definition");
        r.register(Box::new(event_apply_lag.clone()))
            .expect("metric registered once");
        Metrics {
            build_info: gauge_vec(&r, "drover_build_info", "Build information", &["version"]),
            role: gauge_vec(
                &r,
                "drover_role",
                "1 for this instance's current role",
                &["role"],
            ),
            events: counter_vec(
                &r,
                "drover_events_total",
                "Engine events received by type",
                &["type"],
            ),
            engine_calls: counter_vec(
                &r,
                "drover_engine_calls_total",
                "Engine API calls made to build snapshots, by call",
                &["call"],
            ),
            render_duration: histogram_vec(
                &r,
                "drover_render_duration_seconds",
                "Template render time by target",
                &["target"],
                LATENCY_BUCKETS,
            ),
            renders: counter_vec(
                &r,
                "drover_renders_total",
                "Renders by target and outcome",
                &["target", "outcome"],
            ),
            checks: counter_vec(
                &r,
                "drover_checks_total",
                "Config checks by target and outcome",
                &["target", "outcome"],
            ),
            reloads: counter_vec(
                &r,
                "drover_reloads_total",
                "Notify steps by target and outcome",
                &["target", "outcome"],
            ),
            last_apply: gauge_vec(
                &r,
                "drover_last_apply_timestamp_seconds",
                "Unix time of the last successful apply by target",
                &["target"],
            ),
            content_hash: gauge_vec(
                &r,
                "drover_config_hash",
                "First 48 bits of the SHA-256 of the applied config by target",
                &["target"],
            ),
            skipped_services: gauge_vec(
                &r,
                "drover_skipped_services",
                "Services left out of the last render for bad labels, by target",
                &["target"],
            ),
            hosts_left_out: gauge_vec(
                &r,
                "drover_hosts_left_out",
                "Hosts left out of the applied file because their server blocks failed the check, by target",
                &["target"],
            ),
            hosts_without_certificate: gauge_vec(
                &r,
                "drover_hosts_without_certificate",
                "TLS hosts served on port 80 until their certificate files appear, by target",
                &["target"],
            ),
            webhook_requests: counter_vec(
                &r,
                "drover_webhook_requests_total",
                "Webhook requests by hook and outcome",
                &["hook", "outcome"],
            ),
            signature_failures: counter_vec(
                &r,
                "drover_webhook_signature_failures_total",
                "Webhook requests with a wrong or missing signature or token",
                &["hook"],
            ),
            http_refused: counter_vec(
                &r,
                "drover_http_refused_total",
                "Connections and requests refused at a cap, by which (connections, requests)",
                &["limit"],
            ),
            jobs: counter_vec(
                &r,
                "drover_jobs_total",
                "Finished jobs by outcome",
                &["outcome"],
            ),
            update_duration: histogram_vec(
                &r,
                "drover_update_duration_seconds",
                "Service update time from request to final UpdateStatus, by outcome",
                &["outcome"],
                UPDATE_BUCKETS,
            ),
            agent_requests: counter_vec(
                &r,
                "drover_agent_requests_total",
                "Verified agent API requests by target and outcome on this node",
                &["target", "outcome"],
            ),
            agent_refused: counter_vec(
                &r,
                "drover_agent_refused_total",
                "Agent API requests refused, by reason",
                &["reason"],
            ),
            peer_contact: gauge_vec(
                &r,
                "drover_peer_last_contact_timestamp_seconds",
                "Unix time of the last successful contact with a peer (on the controller) or heartbeat from the controller (elsewhere), by node host name",
                &["peer"],
            ),
            updates: counter_vec(
                &r,
                "drover_updates_total",
                "Service updates by webhooks, by service and outcome",
                &["service", "outcome"],
            ),
            config_reloads: counter_vec(
                &r,
                "drover_config_reloads_total",
                "Reloads of drover's own config file on SIGHUP, by outcome (applied, refused)",
                &["outcome"],
            ),
            notifications: counter_vec(
                &r,
                "drover_notifications_total",
                "Notifications by sink and outcome (sent, failed, suppressed, dropped)",
                &["sink", "outcome"],
            ),
            certificate_expiry: gauge_vec(
                &r,
                "drover_certificate_expiry_timestamp_seconds",
                "When each certificate drover obtained ends (unix seconds), by host",
                &["host"],
            ),
            acme_orders: counter_vec(
                &r,
                "drover_acme_orders_total",
                "ACME orders by outcome (issued, failed, refused: the ledger kept it inside the CA's limits)",
                &["outcome"],
            ),
            stack_deploys: counter_vec(
                &r,
                "drover_stack_deploys_total",
                "Syncs of stacks from git, by stack and outcome (completed, failed, skipped: already at the branch head or superseded)",
                &["stack", "outcome"],
            ),
            registry_checks: counter_vec(
                &r,
                "drover_registry_checks_total",
                "Registry polls of one image reference, by registry and outcome (unchanged, changed, failed, unauthorized, not_found, rate_limited)",
                &["registry", "outcome"],
            ),
            registry_requests: counter_vec(
                &r,
                "drover_registry_requests_total",
                "Manifest requests to registries by polling, by registry and method (HEAD, GET)",
                &["registry", "method"],
            ),
            registry_remaining: gauge_vec(
                &r,
                "drover_registry_ratelimit_remaining",
                "What a registry last said is left of its rate limit (ratelimit-remaining)",
                &["registry"],
            ),
            stream_reconnects,
            resyncs,
            snapshots,
            event_apply_lag,
            queue_depth,
            rollbacks,
            registry: r,
        }
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The process-wide metrics; created on first use.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = Metrics::new();
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    })
}
