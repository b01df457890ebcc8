//! The HTTP surface: webhooks in, jobs, metrics, health and the status page out.
//!
//! Invariants: every request is bounded in time (`http.request_timeout` → 408) and a
//! webhook body in size (`http.max_body` → 413, read by the intake so it is counted);
//! answers carry fixed messages and job data only, never request text; the status page
//! escapes everything it shows; on shutdown the server stops accepting, lets requests in
//! flight finish, and gives up after [`drain_limit`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tracing::{Instrument, info, info_span, warn};

use crate::config;
use crate::hooks::{self, Accepted};
use crate::jobs::JobId;
use crate::metrics;
use crate::status::Board;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Serve(#[source] std::io::Error),
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub hooks: Arc<hooks::Service>,
    pub board: Arc<Board>,
    pub http: config::Http,
}

impl AppState {
    pub fn new(hooks: Arc<hooks::Service>, board: Arc<Board>, http: config::Http) -> AppState {
        AppState { hooks, board, http }
    }
}

/// How long shutdown waits for requests in flight.
pub fn drain_limit(http: &config::Http) -> Duration {
    http.request_timeout + Duration::from_secs(1)
}

pub fn router(state: AppState) -> Router {
    let timeout = state.http.request_timeout;
    Router::new()
        .route("/hooks/{name}", post(hook))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(get_job))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/", get(index))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(state)
}

/// Binds `listen` and serves until `shutdown`, then drains.
pub async fn serve(
    listen: SocketAddr,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Bind {
            addr: listen,
            source,
        })?;
    serve_listener(listener, state, shutdown).await
}

/// Serves liveness and metrics while drover waits for the engine; `/readyz` answers 503.
/// Returns, closing the listener, when `done` is cancelled.
pub async fn serve_waiting(listener: TcpListener, done: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the docker engine",
                )
            }),
        )
        .route("/metrics", get(metrics_text));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(done.cancelled_owned())
        .await
    {
        warn!(error = %e, "http server stopped");
    }
}

/// Serves on a bound listener (tests bind port 0 and read the address first).
pub async fn serve_listener(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    use axum::serve::ListenerExt;
    let drain = drain_limit(&state.http);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "http listening");
    }
    let listener = listener.tap_io(|tcp| {
        // Small answers: don't let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
    });
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let server = std::future::IntoFuture::into_future(
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned()),
    );
    tokio::select! {
        r = server => r.map_err(Error::Serve),
        () = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
            warn!(limit = ?drain, "http drain limit reached, closing remaining connections");
            Ok(())
        }
    }
}

fn error_json(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

async fn hook(State(state): State<AppState>, Path(name): Path<String>, req: Request) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (parts, body) = req.into_parts();
    let span = info_span!("webhook", hook = ?name, peer = ?peer);
    let result = state
        .hooks
        .handle(&name, peer, &parts.headers, parts.uri.query(), body)
        .instrument(span)
        .await;
    match result {
        Ok(Accepted::Job(s)) => (
            StatusCode::ACCEPTED,
            [(header::LOCATION, format!("/jobs/{}", s.id))],
            axum::Json(json!({ "job": s.id, "coalesced": s.coalesced })),
        )
            .into_response(),
        Ok(Accepted::Ping) => axum::Json(json!({ "status": "pong" })).into_response(),
        Ok(Accepted::Ignored) => axum::Json(json!({ "status": "ignored" })).into_response(),
        Ok(Accepted::Duplicate) => axum::Json(json!({ "status": "duplicate" })).into_response(),
        Err(r) => error_json(r.status(), r.to_string()),
    }
}

async fn list_jobs(State(state): State<AppState>) -> Response {
    axum::Json(json!({ "jobs": state.hooks.jobs().list() })).into_response()
}

async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let job = JobId::is_valid(&id)
        .then(|| state.hooks.jobs().get(&id))
        .flatten();
    match job {
        Some(j) => axum::Json(j).into_response(),
        None => error_json(StatusCode::NOT_FOUND, "no such job".into()),
    }
}

async fn metrics_text() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::get().encode(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.board.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn index(State(state): State<AppState>) -> Html<String> {
    let jobs = serde_json::to_value(state.hooks.jobs().list()).unwrap_or_default();
    Html(crate::status_page::render(&state.board.summary(), &jobs))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path as FsPath;

    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::jobs::tests::FakeRunner;
    use crate::jobs::{JobState, Journal};

    const SECRET: &str = "It's a Secret to Everybody";
    const TOKEN: &str = "hub-token-1";

    struct Fixture {
        app: Router,
        runner: Arc<FakeRunner>,
        _dir: tempfile::TempDir,
    }

    async fn fixture(extra: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            let mut f = std::fs::File::create(&p).expect("create");
            writeln!(f, "{text}").expect("write");
            p
        };
        let secret = write("secret", SECRET);
        let token = write("token", TOKEN);
        let yaml = format!(
            r#"
hooks:
  - name: github
    kind: github
    secret_file: {secret}
    events: [push]
    allow: {{ ref: "refs/heads/main" }}
    action: {{ command: ["true"] }}
  - name: hub
    kind: dockerhub
    token_file: {token}
    allow: {{ repository: "owner/.+", tag: "latest|stable" }}
    action: update-services
  - name: ci
    kind: generic
    secret_file: {secret}
    token_file: {token}
    action: update-services
  - name: slow
    kind: generic
    token_file: {token}
    rate: 2
    action: update-services
  - name: lan
    kind: generic
    token_file: {token}
    cidrs: ["10.0.0.0/8"]
    action: update-services
{extra}
"#,
            secret = secret.display(),
            token = token.display(),
        );
        let config = config::Config::parse(FsPath::new("test.yml"), &yaml).expect("config");
        let runner = FakeRunner::new(JobState::Completed);
        let service = hooks::Service::new(
            &config,
            runner.clone(),
            Journal::Memory,
            CancellationToken::new(),
        )
        .await
        .expect("service");
        let state = AppState::new(service, Arc::new(Board::new()), config.http.clone());
        let app = router(state).layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        Fixture {
            app,
            runner,
            _dir: dir,
        }
    }

    async fn send(app: &Router, req: axum::http::Request<Body>) -> (StatusCode, serde_json::Value) {
        let res = app.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    fn github(
        event: &str,
        delivery: &str,
        body: &str,
        signature: Option<String>,
    ) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::post("/hooks/github")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("content-type", "application/json");
        if let Some(s) = signature {
            b = b.header("x-hub-signature-256", s);
        }
        b.body(Body::from(body.to_owned())).expect("request")
    }

    fn hub(query: &str, body: &str) -> axum::http::Request<Body> {
        axum::http::Request::post(format!("/hooks/hub{query}"))
            .body(Body::from(body.to_owned()))
            .expect("request")
    }

    const HUB_BODY: &str =
        r#"{"push_data":{"tag":"latest"},"repository":{"repo_name":"owner/app"}}"#;
    const PUSH_BODY: &str = r#"{"ref":"refs/heads/main","repository":{"full_name":"owner/app"}}"#;

    #[tokio::test]
    async fn signed_github_push_is_accepted_with_a_job_id() {
        let f = fixture("").await;
        let sig = hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
        let (status, body) = send(&f.app, github("push", "d-1", PUSH_BODY, Some(sig))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["job"].as_str().expect("job id").to_owned();
        let (status, job) = send(
            &f.app,
            axum::http::Request::get(format!("/jobs/{id}"))
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(job["id"], id.as_str());
        assert_eq!(job["action"], "command");
        assert_eq!(job["facts"]["ref"], "refs/heads/main");
    }

    #[tokio::test]
    async fn github_ping_is_answered_and_creates_no_job() {
        let f = fixture("").await;
        let body = r#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
        let sig = hooks::sign(SECRET.as_bytes(), body.as_bytes());
        let (status, answer) = send(&f.app, github("ping", "d-ping", body, Some(sig))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["status"], "pong");
        assert_eq!(f.runner.count(), 0);
        let (_, jobs) = send(
            &f.app,
            axum::http::Request::get("/jobs")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0));
    }

    #[tokio::test]
    async fn unsigned_or_badly_signed_github_request_is_401() {
        let f = fixture("").await;
        let (status, _) = send(&f.app, github("push", "d-2", PUSH_BODY, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let wrong = hooks::sign(b"not the secret", PUSH_BODY.as_bytes());
        let (status, _) = send(&f.app, github("push", "d-3", PUSH_BODY, Some(wrong))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // Unverified ping is refused too: verification comes first.
        let (status, _) = send(
            &f.app,
            github("ping", "d-4", "{}", Some("sha256=00".into())),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // An unsigned body that is not even JSON is 401, not 400.
        let (status, _) = send(&f.app, github("push", "d-5", "not json", None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn replayed_github_delivery_creates_no_second_job() {
        let f = fixture("").await;
        let sig = hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
        let (status, _) = send(
            &f.app,
            github("push", "d-same", PUSH_BODY, Some(sig.clone())),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (status, body) = send(&f.app, github("push", "d-same", PUSH_BODY, Some(sig))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "duplicate");
    }

    #[tokio::test]
    async fn events_outside_the_filter_are_ignored() {
        let f = fixture("").await;
        let sig = hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
        let (status, body) = send(&f.app, github("issues", "d-6", PUSH_BODY, Some(sig))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ignored");
    }

    #[tokio::test]
    async fn signed_but_non_matching_ref_is_422() {
        let f = fixture("").await;
        let body = r#"{"ref":"refs/heads/main-old","repository":{"full_name":"owner/app"}}"#;
        let sig = hooks::sign(SECRET.as_bytes(), body.as_bytes());
        let (status, answer) = send(&f.app, github("push", "d-7", body, Some(sig))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(answer["error"], "payload does not match the rule on ref");
    }

    #[tokio::test]
    async fn signed_bad_json_is_400() {
        let f = fixture("").await;
        let sig = hooks::sign(SECRET.as_bytes(), b"{not json");
        let (status, _) = send(&f.app, github("push", "d-8", "{not json", Some(sig))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn docker_hub_token_in_query_or_header_is_accepted() {
        let f = fixture("").await;
        let (status, first) = send(&f.app, hub(&format!("?token={TOKEN}"), HUB_BODY)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let req = axum::http::Request::post("/hooks/hub")
            .header("x-drover-token", TOKEN)
            .body(Body::from(HUB_BODY))
            .expect("req");
        let (status, second) = send(&f.app, req).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        // The same repo:tag within the quiet window joins the first job.
        assert_eq!(first["job"], second["job"]);
        assert_eq!(second["coalesced"], true);
    }

    #[tokio::test]
    async fn docker_hub_without_or_with_wrong_token_is_401() {
        let f = fixture("").await;
        for q in ["", "?token=", "?token=hub-token-2", "?token=hub-token-1x"] {
            let (status, _) = send(&f.app, hub(q, HUB_BODY)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{q}");
        }
        assert_eq!(f.runner.count(), 0);
    }

    #[tokio::test]
    async fn docker_hub_rule_mismatch_is_422() {
        let f = fixture("").await;
        let body = r#"{"push_data":{"tag":"latest-foo"},"repository":{"repo_name":"owner/app"}}"#;
        let (status, _) = send(&f.app, hub(&format!("?token={TOKEN}"), body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let body = r#"{"push_data":{"tag":"latest"},"repository":{"repo_name":"evil/app"}}"#;
        let (status, _) = send(&f.app, hub(&format!("?token={TOKEN}"), body)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[tokio::test]
    async fn generic_hook_takes_signature_or_bearer_token() {
        let f = fixture("").await;
        let body = r#"{"image":"127.0.0.1:5000/x/y:latest"}"#;
        let req = axum::http::Request::post("/hooks/ci")
            .header(
                "x-drover-signature",
                hooks::sign(SECRET.as_bytes(), body.as_bytes()),
            )
            .body(Body::from(body))
            .expect("req");
        assert_eq!(send(&f.app, req).await.0, StatusCode::ACCEPTED);
        let req = axum::http::Request::post("/hooks/ci")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(r#"{"image":"owner/z"}"#))
            .expect("req");
        assert_eq!(send(&f.app, req).await.0, StatusCode::ACCEPTED);
        let req = axum::http::Request::post("/hooks/ci")
            .header("x-drover-signature", hooks::sign(b"wrong", body.as_bytes()))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(body))
            .expect("req");
        assert_eq!(
            send(&f.app, req).await.0,
            StatusCode::UNAUTHORIZED,
            "a bad signature is not rescued by a token"
        );
        let req = axum::http::Request::post("/hooks/ci")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(r#"{"image":"{{ config }}"}"#))
            .expect("req");
        assert_eq!(send(&f.app, req).await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn unknown_hook_is_404() {
        let f = fixture("").await;
        let req = axum::http::Request::post("/hooks/nope")
            .body(Body::from("{}"))
            .expect("req");
        assert_eq!(send(&f.app, req).await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn requests_beyond_the_rate_are_429() {
        let f = fixture("").await;
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let req = axum::http::Request::post("/hooks/slow")
                .header("x-drover-token", TOKEN)
                .body(Body::from(r#"{"image":"owner/r"}"#))
                .expect("req");
            statuses.push(send(&f.app, req).await.0);
        }
        assert_eq!(
            statuses,
            [
                StatusCode::ACCEPTED,
                StatusCode::ACCEPTED,
                StatusCode::TOO_MANY_REQUESTS
            ]
        );
    }

    #[tokio::test]
    async fn peer_outside_the_cidrs_is_403() {
        let f = fixture("").await;
        let req = axum::http::Request::post("/hooks/lan")
            .header("x-drover-token", TOKEN)
            .body(Body::from(r#"{"image":"owner/r"}"#))
            .expect("req");
        assert_eq!(send(&f.app, req).await.0, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn oversized_body_is_413() {
        let f = fixture("http: { max_body: 64 }").await;
        let big = format!(r#"{{"image":"owner/r","pad":"{}"}}"#, "x".repeat(100));
        let req = axum::http::Request::post("/hooks/ci")
            .header("x-drover-token", TOKEN)
            .body(Body::from(big))
            .expect("req");
        assert_eq!(send(&f.app, req).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn full_queue_is_503() {
        let f = fixture("jobs: { queue: 1 }").await;
        let req = |image: &str| {
            axum::http::Request::post("/hooks/ci")
                .header("x-drover-token", TOKEN)
                .body(Body::from(format!(r#"{{"image":"{image}"}}"#)))
                .expect("req")
        };
        assert_eq!(send(&f.app, req("owner/a")).await.0, StatusCode::ACCEPTED);
        assert_eq!(
            send(&f.app, req("owner/b")).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn health_ready_metrics_and_status_page_answer() {
        let f = fixture("").await;
        let get = |p: &str| {
            axum::http::Request::get(p)
                .body(Body::empty())
                .expect("req")
        };
        let res = f.app.clone().oneshot(get("/healthz")).await.expect("res");
        assert_eq!(res.status(), StatusCode::OK);
        let res = f.app.clone().oneshot(get("/readyz")).await.expect("res");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let _ = send(&f.app, hub("?token=bad", HUB_BODY)).await;
        let res = f.app.clone().oneshot(get("/metrics")).await.expect("res");
        let text = String::from_utf8(
            res.into_body()
                .collect()
                .await
                .expect("b")
                .to_bytes()
                .to_vec(),
        )
        .expect("utf8");
        assert!(
            text.contains("drover_webhook_signature_failures_total{hook=\"hub\"}"),
            "{text}"
        );
        let res = f.app.clone().oneshot(get("/")).await.expect("res");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(send(&f.app, get("/jobs/zz")).await.0, StatusCode::NOT_FOUND);
    }
}
