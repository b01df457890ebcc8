//! `POST /hooks/{name}`: the HTTP side of the webhook intake.
//!
//! Invariants: the order is fixed and cheap checks come first — known hook and source
//! network, the per-source budget of failed verifications, a declared `Content-Length`
//! over `max_body` (refused before a byte is read, so no `100 Continue` is sent), then the
//! body into one buffer that never grows past `max_body` however it is chunked, then the
//! signature or token. Only a verified request spends the hook's `rate`, so a forged flood
//! cannot starve real deliveries; a failed verification spends its source's budget
//! instead. Every request is counted in `webhook_requests{hook,outcome}`.
//!
//! In cluster mode an instance that is not the controller stops after verification and
//! hands the request to the controller (`cluster::forward`), which runs [`forwarded`] —
//! this same intake from the verification on, with the sender's address — and whose
//! answer is relayed unchanged; no controller reachable is 503 with `Retry-After`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::Error;
use crate::budget::{self, Budget, Full, Held, Short};
use crate::cluster::forward::{Envelope, Forwarder, Relay};
use crate::hooks::{self, Accepted, Reject};
use crate::metrics;

/// Sources tracked for failed verifications; beyond this, full buckets are forgotten.
const FAILURE_SOURCES: usize = 4096;

/// The intake's own state: the hooks, their rate buckets, and failures per source.
pub struct Intake {
    service: Arc<hooks::Service>,
    /// Per hook name, made at the first verified request; a reload that changes a hook's
    /// rate gives it a fresh bucket.
    buckets: Mutex<HashMap<String, Bucket>>,
    failures: Mutex<HashMap<IpAddr, Bucket>>,
    failures_per_minute: u32,
    max_body: usize,
    /// Bytes of bodies held at once, in all and per source.
    budget: Arc<Budget>,
    min_body_rate: usize,
    /// Configured trusted proxies; `None`: those in `steps`.
    trusted: Option<Vec<crate::config::Cidr>>,
    steps: crate::state::StepAddresses,
    /// Cluster mode: where verified requests go while this instance is not the controller.
    forward: Option<Arc<Forwarder>>,
}

impl Intake {
    pub fn new(
        service: Arc<hooks::Service>,
        http: &crate::config::Http,
        steps: crate::state::StepAddresses,
    ) -> Intake {
        Intake {
            service,
            buckets: Mutex::default(),
            failures: Mutex::default(),
            failures_per_minute: http.auth_failures_per_minute,
            max_body: http.max_body,
            budget: Budget::new(http.body_budget, http.max_body),
            min_body_rate: http.min_body_rate,
            trusted: http.trusted_proxies.clone(),
            steps,
            forward: None,
        }
    }

    pub fn with_forward(mut self, forward: Option<Arc<Forwarder>>) -> Intake {
        self.forward = forward;
        self
    }

    pub fn service(&self) -> &Arc<hooks::Service> {
        &self.service
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        match &self.trusted {
            Some(cidrs) => cidrs.iter().any(|c| c.contains(ip)),
            None => self
                .steps
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&ip),
        }
    }

    fn source(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        source_of(peer, headers, |ip| self.trusts(ip))
    }

    fn failure_budget_left(&self, ip: IpAddr) -> bool {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.get_mut(&ip).is_none_or(|b| b.peek() >= 1.0)
    }

    fn spend_failure(&self, ip: IpAddr) {
        let per_minute = f64::from(self.failures_per_minute);
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() >= FAILURE_SOURCES && !f.contains_key(&ip) {
            // Sources whose budget has refilled carry no information: forget them first.
            f.retain(|_, b| b.peek() < b.burst);
            if f.len() >= FAILURE_SOURCES {
                return;
            }
        }
        f.entry(ip)
            .or_insert_with(|| Bucket::new(per_minute / 60.0, per_minute))
            .take();
    }

    fn take_rate(&self, hook: &hooks::Hook) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        let rate = f64::from(hook.rate());
        let bucket = buckets
            .entry(hook.name().to_owned())
            .or_insert_with(|| Bucket::new(rate, rate));
        if bucket.rate != rate {
            *bucket = Bucket::new(rate, rate);
        }
        bucket.take()
    }
}

pub fn router(intake: Arc<Intake>) -> Router {
    Router::new()
        .route("/hooks/{name}", post(hook))
        .with_state(intake)
}

async fn hook(
    State(intake): State<Arc<Intake>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    let span =
        info_span!("webhook", hook = ?name, peer = %peer.ip(), source = tracing::field::Empty);
    let result = intake_one(&intake, &name, peer.ip(), req)
        .instrument(span.clone())
        .await;
    match result {
        Ok(Step::Forward(forward, envelope)) => {
            let relay = forward
                .send(crate::cluster::wire::HOOKS_PATH, &envelope)
                .instrument(span.clone())
                .await;
            span.in_scope(|| relayed(&name, relay))
        }
        Ok(Step::Done(accepted)) => span.in_scope(|| answer(&name, Ok(accepted))),
        Err(r) => span.in_scope(|| answer(&name, Err(r))),
    }
}

/// The controller's answer to a forwarded request; 503 when none could be asked, 504 when
/// it was asked and did not answer in time.
fn relayed(name: &str, relay: Result<Relay, crate::cluster::forward::Error>) -> Response {
    match relay {
        Ok(relay) => {
            metrics::get()
                .webhook_requests
                .with_label_values(&[name, "forwarded"])
                .inc();
            info!(status = relay.status, "webhook forwarded to the controller");
            relay.into_response()
        }
        // Sent, but no answer in time: the controller may have accepted it.
        Err(
            e @ crate::cluster::forward::Error::Agent(crate::cluster::wire::Error::Timeout {
                ..
            }),
        ) => {
            warn!(error = %e, "webhook forwarded; the controller's answer did not come in time");
            answer(name, Err(Reject::OutcomeUnknown))
        }
        Err(e) => {
            warn!(error = %e, "webhook not forwarded: no controller answered");
            answer(name, Err(Reject::NoController))
        }
    }
}

/// A request another instance verified and forwarded ([`Envelope`]): the intake from the
/// verification on, as if it had arrived here from `envelope.source`. The caller has
/// authenticated the envelope and checked that this instance is the controller.
pub async fn forwarded(intake: &Intake, envelope: Envelope) -> Response {
    let span =
        info_span!("webhook", hook = ?envelope.hook, peer = %envelope.source, forwarded = true);
    let name = envelope.hook.clone();
    let result = async {
        let body = envelope
            .body()
            .ok_or(Reject::BadRequest("forwarded body is not base64"))?;
        if body.len() > intake.max_body {
            return Err(Reject::TooLarge);
        }
        let headers = envelope.header_map();
        let hook = intake.service.admit(&name, Some(envelope.source))?;
        if !intake.failure_budget_left(envelope.source) {
            return Err(Reject::RateLimited);
        }
        let headers = RequestHeaders {
            headers: &headers,
            token: envelope.query_token.clone(),
        };
        verified(intake, &hook, envelope.source, &headers, &body).await
    }
    .instrument(span.clone())
    .await;
    span.in_scope(|| answer(&name, result))
}

fn answer(name: &str, result: Result<Accepted, Reject>) -> Response {
    // Only a configured name becomes a label value (bounded); request data never does.
    let known = !matches!(result, Err(Reject::UnknownHook));
    let outcome = match &result {
        Ok(a) => a.outcome(),
        Err(r) => r.outcome(),
    };
    metrics::get()
        .webhook_requests
        .with_label_values(&[if known { name } else { "-" }, outcome])
        .inc();
    match result {
        Ok(Accepted::Job(s)) => {
            info!(job = %s.id, outcome, "webhook accepted");
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, format!("/jobs/{}", s.id))],
                axum::Json(json!({ "job": s.id, "coalesced": s.coalesced })),
            )
                .into_response()
        }
        Ok(a) => {
            if a == Accepted::Duplicate {
                // Shown to operators: a sender repeating a body by design (a CI without a
                // build id in it) loses updates here.
                info!(
                    outcome,
                    "webhook already accepted before (replay or retry): no job"
                );
            } else {
                debug!(outcome, "webhook answered");
            }
            let status = match a {
                Accepted::Ping => "pong",
                Accepted::Ignored => "ignored",
                _ => "duplicate",
            };
            axum::Json(Answered { status }).into_response()
        }
        Err(r) => {
            match r {
                Reject::Unauthorized | Reject::Stale | Reject::Forbidden => {
                    warn!(outcome, "webhook refused")
                }
                _ => debug!(outcome, "webhook refused"),
            }
            Error::Rejected(r).into_response()
        }
    }
}

/// The body of a 200: what became of a verified request that made no job.
#[derive(serde::Serialize)]
struct Answered {
    status: &'static str,
}

/// Where a request that passed this instance's checks goes.
enum Step {
    Done(Accepted),
    /// Verified here, to be carried out by the controller.
    Forward(Arc<Forwarder>, Envelope),
}

async fn intake_one(
    intake: &Intake,
    name: &str,
    peer: IpAddr,
    req: Request,
) -> Result<Step, Reject> {
    let service = &intake.service;
    let (parts, body) = req.into_parts();
    let peer = intake.source(peer, &parts.headers);
    tracing::Span::current().record("source", tracing::field::display(peer));
    let hook = service.admit(name, Some(peer))?;
    if !intake.failure_budget_left(peer) {
        return Err(Reject::RateLimited);
    }
    let (body, _held) = read_body(
        &parts.headers,
        body,
        intake.max_body,
        intake.budget.hold(peer),
        intake.min_body_rate,
    )
    .await?;
    let token = query_token(parts.uri.query());
    let headers = RequestHeaders {
        headers: &parts.headers,
        token: token.clone(),
    };
    if let Some(forward) = intake.forward.as_ref().filter(|f| f.active()) {
        // A forged request stops here, spending its source's budget on this instance;
        // the controller verifies again and applies its rate and replay memory.
        if let Err(r) = service.verify(&hook, &headers, &body) {
            intake.spend_failure(peer);
            return Err(r);
        }
        let envelope = Envelope::new(name, peer, &parts.headers, token, &body);
        return Ok(Step::Forward(forward.clone(), envelope));
    }
    verified(intake, &hook, peer, &headers, &body)
        .await
        .map(Step::Done)
}

/// Who sent a request: the TCP peer, or, when the peer is a trusted proxy, the right-most
/// address in `X-Forwarded-For` that is not one. Entries left of that are whatever the
/// client wrote, so they are never believed; an entry that is not an address ends the walk
/// at the last one that was.
fn source_of(peer: IpAddr, headers: &HeaderMap, trusts: impl Fn(IpAddr) -> bool) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusts(peer) {
        return peer;
    }
    let values: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    let mut source = peer;
    for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                source = ip.to_canonical();
                if !trusts(source) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    source
}

/// Verification, the hook's rate and acceptance: the steps after the body is read.
async fn verified(
    intake: &Intake,
    hook: &hooks::Hook,
    peer: IpAddr,
    headers: &RequestHeaders<'_>,
    body: &[u8],
) -> Result<Accepted, Reject> {
    let service = &intake.service;
    if let Err(r) = service.verify(hook, headers, body) {
        intake.spend_failure(peer);
        return Err(r);
    }
    if !intake.take_rate(hook) {
        return Err(Reject::RateLimited);
    }
    service.accept(hook, headers, body).await
}

/// [`budget::read`] in the intake's words: beyond the source's share 429, beyond the
/// whole budget 503, too slow 408.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    held: Held,
    min_rate: usize,
) -> Result<(Vec<u8>, Held), Reject> {
    budget::read(headers, body, limit, held, min_rate)
        .await
        .map_err(|short| match short {
            Short::TooLarge => Reject::TooLarge,
            Short::TooSlow => Reject::TooSlow,
            Short::Read => Reject::BodyRead,
            Short::Full(Full::Source) => Reject::RateLimited,
            Short::Full(Full::All) => Reject::Busy,
        })
}

struct RequestHeaders<'a> {
    headers: &'a HeaderMap,
    token: Option<String>,
}

impl hooks::Headers for RequestHeaders<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        // The first value, as `HeaderMap::get` gives, but found by a scan: a request has a
        // dozen headers, and comparing their (lowercase) names costs less than parsing and
        // hashing `name` for the lookup on every webhook.
        debug_assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "header names are asked for in lowercase: {name}"
        );
        self.headers
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok())
    }
    fn query_token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

fn query_token(query: Option<&str>) -> Option<String> {
    let q = query?;
    let uri: axum::http::Uri = format!("/?{q}").parse().ok()?;
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri).ok()?;
    pairs
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
}

/// A token bucket holding up to `burst` tokens, refilled at `rate` per second.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Tokens now, after the refill since the last look.
    fn peek(&mut self) -> f64 {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        self.tokens
    }

    fn take(&mut self) -> bool {
        if self.peek() >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn forwarded_for_names_the_source_only_behind_a_trusted_proxy() {
        let nginx: IpAddr = [10, 0, 1, 5].into();
        let trusts = |ip: IpAddr| ip == nginx;
        let xff = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", v.parse().expect("value"));
            }
            h
        };
        let client: IpAddr = [198, 51, 100, 7].into();
        let other: IpAddr = [203, 0, 113, 9].into();
        assert_eq!(
            source_of(other, &xff(&["198.51.100.7"]), trusts),
            other,
            "an untrusted peer's header is ignored"
        );
        assert_eq!(source_of(nginx, &xff(&["198.51.100.7"]), trusts), client);
        assert_eq!(
            source_of(nginx, &xff(&["140.82.112.1, 198.51.100.7"]), trusts),
            client,
            "what the client wrote left of nginx's entry is not believed"
        );
        assert_eq!(
            source_of(
                nginx,
                &xff(&["140.82.112.1", "198.51.100.7, 10.0.1.5"]),
                trusts
            ),
            client,
            "trusted hops are skipped, over several header lines"
        );
        assert_eq!(
            source_of(nginx, &xff(&["junk, 198.51.100.7"]), trusts),
            client
        );
        assert_eq!(source_of(nginx, &xff(&["junk"]), trusts), nginx);
        assert_eq!(source_of(nginx, &HeaderMap::new(), trusts), nginx);
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().expect("ip");
        assert_eq!(source_of(mapped, &HeaderMap::new(), trusts), client);
    }

    #[test]
    fn query_token_is_found_and_decoded() {
        assert_eq!(query_token(Some("a=1&token=s%2Fx")), Some("s/x".into()));
        assert_eq!(query_token(Some("a=1")), None);
        assert_eq!(query_token(None), None);
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_a_burst_then_refills_at_its_rate() {
        let mut b = Bucket::new(3.0, 3.0);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(b.take());
        assert!(!b.take());
    }

    const SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    async fn read(
        headers: &HeaderMap,
        body: Body,
        limit: usize,
        budget: &Arc<Budget>,
    ) -> Result<(Vec<u8>, Held), Reject> {
        read_body(headers, body, limit, budget.hold(SOURCE), 1024).await
    }

    #[tokio::test]
    async fn a_body_of_a_million_one_byte_chunks_is_refused_at_the_cap() {
        let chunks = futures_util::stream::iter(
            (0..1_000_000).map(|_| Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"x"))),
        );
        let body = Body::from_stream(chunks);
        assert_eq!(
            read(&HeaderMap::new(), body, 1024, &Budget::new(4096, 1024))
                .await
                .map(|b| b.0),
            Err(Reject::TooLarge)
        );
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_refused_without_reading() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "2048".parse().expect("value"));
        // A body that fails when polled proves it was never read.
        let body = Body::from_stream(futures_util::stream::once(async {
            Err::<axum::body::Bytes, _>(std::io::Error::other("read"))
        }));
        assert_eq!(
            read(&headers, body, 1024, &Budget::new(4096, 1024))
                .await
                .map(|b| b.0),
            Err(Reject::TooLarge)
        );
    }

    #[tokio::test]
    async fn a_chunked_body_under_the_cap_arrives_whole() {
        let chunks = futures_util::stream::iter(
            ["ab", "c", "de"].map(|c| Ok::<_, std::io::Error>(axum::body::Bytes::from(c))),
        );
        let budget = Budget::new(64, 5);
        let got = read(&HeaderMap::new(), Body::from_stream(chunks), 5, &budget).await;
        assert_eq!(got.as_ref().map(|b| b.0.as_slice()), Ok(&b"abcde"[..]));
        assert!(budget.held(SOURCE).0 > 0, "the body holds its bytes");
        drop(got);
        assert_eq!(budget.held(SOURCE), (0, 0), "and gives them back");
    }

    #[tokio::test]
    async fn a_declared_length_reserves_nothing_before_its_bytes_arrive() {
        let budget = Budget::new(1000, 1000);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "1000".parse().expect("value"));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
        let stalled = Body::from_stream(tokio_stream_of(rx));
        let reading = tokio::spawn({
            let budget = budget.clone();
            async move { read(&headers, stalled, 1000, &budget).await.map(|b| b.0) }
        });
        tokio::task::yield_now().await;
        assert_eq!(budget.held(SOURCE), (0, 0), "nothing arrived, nothing held");
        tx.send(Ok(axum::body::Bytes::from(vec![b'x'; 10])))
            .await
            .expect("send");
        drop(tx);
        assert_eq!(reading.await.expect("join").map(|b| b.len()), Ok(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_slower_than_the_minimum_rate_is_cut_off() {
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
        let stalled = Body::from_stream(tokio_stream_of(rx));
        let got = read(&HeaderMap::new(), stalled, 1000, &Budget::new(1000, 1000)).await;
        assert_eq!(got.map(|b| b.0), Err(Reject::TooSlow));
    }

    #[tokio::test]
    async fn bodies_beyond_a_share_or_the_budget_are_refused() {
        let budget = Budget::new(1000, 600);
        let body = || Body::from(vec![b'x'; 600]);
        let first = read(&HeaderMap::new(), body(), 1000, &budget).await;
        assert!(first.is_ok());
        let second = read(&HeaderMap::new(), body(), 1000, &budget).await;
        assert_eq!(second.map(|b| b.0), Err(Reject::RateLimited), "one source");
        let other = read_body(
            &HeaderMap::new(),
            body(),
            1000,
            budget.hold([192, 0, 2, 9].into()),
            1024,
        )
        .await;
        assert_eq!(other.map(|b| b.0), Err(Reject::Busy), "all sources");
        drop(first);
        let third = read(&HeaderMap::new(), body(), 1000, &budget).await;
        assert!(third.is_ok());
    }

    /// A body stream fed by hand.
    fn tokio_stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Result<axum::body::Bytes, std::io::Error>>,
    ) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
