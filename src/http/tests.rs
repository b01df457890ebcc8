use std::io::Write;
use std::path::Path as FsPath;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::StatusCode;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::jobs::tests::FakeRunner;
use crate::jobs::{JobState, Journal};
use crate::role::Role;

const SECRET: &str = "It's a Secret to Everybody";
const TOKEN: &str = "hub-token-1";

struct Fixture {
    app: Router,
    state: AppState,
    service: Arc<crate::hooks::Service>,
    runner: Arc<FakeRunner>,
    role: tokio::sync::watch::Sender<Role>,
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
    let (role, role_rx) = tokio::sync::watch::channel(Role::Standalone);
    let service = crate::hooks::intake(
        &config,
        runner.clone(),
        Journal::Memory,
        role_rx,
        CancellationToken::new(),
    )
    .await
    .expect("service");
    let state = AppState::new(
        service.clone(),
        Arc::new(Board::new()),
        Arc::default(),
        config.http.clone(),
    );
    let app = router(state.clone())
        .expect("router")
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    Fixture {
        app,
        state,
        service,
        runner,
        role,
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

const HUB_BODY: &str = r#"{"push_data":{"tag":"latest"},"repository":{"repo_name":"owner/app"}}"#;
const PUSH_BODY: &str = r#"{"ref":"refs/heads/main","repository":{"full_name":"owner/app"}}"#;

#[tokio::test]
async fn signed_github_push_is_accepted_with_a_job_id() {
    let f = fixture("").await;
    let sig = crate::hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
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
    let sig = crate::hooks::sign(SECRET.as_bytes(), body.as_bytes());
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
    let wrong = crate::hooks::sign(b"not the secret", PUSH_BODY.as_bytes());
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
    let sig = crate::hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
    let (status, _) = send(
        &f.app,
        github("push", "d-same", PUSH_BODY, Some(sig.clone())),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = send(
        &f.app,
        github("push", "d-same", PUSH_BODY, Some(sig.clone())),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "duplicate");
    // The delivery id is not signed: the same signed body under a new one is a replay too.
    let (status, body) = send(&f.app, github("push", "d-new", PUSH_BODY, Some(sig))).await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &"duplicate".into())
    );
}

#[tokio::test]
async fn events_outside_the_filter_are_ignored() {
    let f = fixture("").await;
    let sig = crate::hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
    let (status, body) = send(&f.app, github("issues", "d-6", PUSH_BODY, Some(sig))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ignored");
}

#[tokio::test]
async fn signed_but_non_matching_ref_is_422() {
    let f = fixture("").await;
    let body = r#"{"ref":"refs/heads/main-old","repository":{"full_name":"owner/app"}}"#;
    let sig = crate::hooks::sign(SECRET.as_bytes(), body.as_bytes());
    let (status, answer) = send(&f.app, github("push", "d-7", body, Some(sig))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["error"], "payload does not match the rule on ref");
}

#[tokio::test]
async fn signed_bad_json_is_400() {
    let f = fixture("").await;
    let sig = crate::hooks::sign(SECRET.as_bytes(), b"{not json");
    let (status, _) = send(&f.app, github("push", "d-8", "{not json", Some(sig))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn docker_hub_token_in_query_or_header_is_accepted() {
    let f = fixture("").await;
    let (status, first) = send(&f.app, hub(&format!("?token={TOKEN}"), HUB_BODY)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Another push of the same tag (Docker Hub's bodies differ by `pushed_at`).
    let pushed = HUB_BODY.replace("\"tag\"", "\"pushed_at\":1417566161,\"tag\"");
    let req = axum::http::Request::post("/hooks/hub")
        .header("x-drover-token", TOKEN)
        .body(Body::from(pushed))
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

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A generic request signed over `TIMESTAMP.BODY`, as a sender makes it.
fn signed_ci(ts: i64, body: &str) -> axum::http::Request<Body> {
    let ts = ts.to_string();
    axum::http::Request::post("/hooks/ci")
        .header("x-drover-timestamp", &ts)
        .header(
            "x-drover-signature",
            crate::hooks::sign_timestamped(SECRET.as_bytes(), &ts, body.as_bytes()),
        )
        .body(Body::from(body.to_owned()))
        .expect("req")
}

fn outcome_count(hook: &str, outcome: &str) -> f64 {
    let text = crate::metrics::get().encode();
    let want = format!("drover_webhook_requests_total{{hook=\"{hook}\",outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(want.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn generic_hook_takes_signature_or_bearer_token() {
    let f = fixture("").await;
    let body = r#"{"image":"127.0.0.1:5000/x/y:latest"}"#;
    assert_eq!(
        send(&f.app, signed_ci(unix_now(), body)).await.0,
        StatusCode::ACCEPTED
    );
    let req = axum::http::Request::post("/hooks/ci")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(r#"{"image":"owner/z"}"#))
        .expect("req");
    assert_eq!(send(&f.app, req).await.0, StatusCode::ACCEPTED);
    let ts = unix_now().to_string();
    let req = axum::http::Request::post("/hooks/ci")
        .header("x-drover-timestamp", &ts)
        .header(
            "x-drover-signature",
            crate::hooks::sign_timestamped(b"wrong", &ts, body.as_bytes()),
        )
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
async fn a_replayed_docker_hub_or_token_body_gets_200_duplicate_and_no_job() {
    let f = fixture("").await;
    let (status, first) = send(&f.app, hub(&format!("?token={TOKEN}"), HUB_BODY)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let before = outcome_count("hub", "duplicate");
    // The same body again, however the token is presented.
    let req = axum::http::Request::post("/hooks/hub")
        .header("x-drover-token", TOKEN)
        .body(Body::from(HUB_BODY))
        .expect("req");
    let (status, body) = send(&f.app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "duplicate");
    assert_eq!(outcome_count("hub", "duplicate"), before + 1.0);
    assert_eq!(f.service.jobs().list().len(), 1, "no second job");

    let token = |body: &'static str| {
        axum::http::Request::post("/hooks/ci")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(body))
            .expect("req")
    };
    let body = r#"{"image":"owner/t:latest","build":"41"}"#;
    assert_eq!(send(&f.app, token(body)).await.0, StatusCode::ACCEPTED);
    let (status, answer) = send(&f.app, token(body)).await;
    assert_eq!(
        (status, &answer["status"]),
        (StatusCode::OK, &"duplicate".into())
    );
    // The next build says so in its body: not a replay.
    let next = r#"{"image":"owner/t:latest","build":"42"}"#;
    assert_eq!(send(&f.app, token(next)).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_token_body_refused_for_a_full_queue_is_not_remembered() {
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
    assert_eq!(
        send(&f.app, req("owner/b")).await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "a refused body is sent again and refused again, not answered as a duplicate"
    );
}

#[tokio::test]
async fn a_signed_generic_request_needs_a_fresh_timestamp_and_is_accepted_once() {
    let f = fixture("").await;
    let body = r#"{"image":"owner/s:latest"}"#;
    let now = unix_now();
    let (status, first) = send(&f.app, signed_ci(now, body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    // The very request again (a replay, or a retry after a lost answer).
    let (status, again) = send(&f.app, signed_ci(now, body)).await;
    assert_eq!(
        (status, &again["status"]),
        (StatusCode::OK, &"duplicate".into())
    );
    assert_eq!(f.service.jobs().list().len(), 1, "no second job");
    // The same body signed again later is a new request (it joins the queued job).
    let (status, later) = send(&f.app, signed_ci(now + 1, body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{later}");

    let stale_before = outcome_count("ci", "stale");
    let skew = crate::hooks::MAX_SKEW.as_secs() as i64;
    for ts in [now - skew - 60, now + skew + 60] {
        let (status, answer) = send(&f.app, signed_ci(ts, r#"{"image":"owner/old"}"#)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{ts}: {answer}");
        let reason = answer["error"].as_str().unwrap_or_default();
        assert!(reason.contains("X-Drover-Timestamp"), "{answer}");
    }
    // Signed over the body alone, as before timestamps: told what is missing.
    let req = axum::http::Request::post("/hooks/ci")
        .header(
            "x-drover-signature",
            crate::hooks::sign(SECRET.as_bytes(), body.as_bytes()),
        )
        .body(Body::from(body))
        .expect("req");
    let (status, answer) = send(&f.app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("X-Drover-Timestamp"),
        "{answer}"
    );
    assert_eq!(outcome_count("ci", "stale"), stale_before + 3.0);
    assert_eq!(
        f.service.jobs().list().len(),
        1,
        "nothing refused made a job"
    );
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
    for i in 0..3 {
        let req = axum::http::Request::post("/hooks/slow")
            .header("x-drover-token", TOKEN)
            .body(Body::from(format!(r#"{{"image":"owner/r","build":{i}}}"#)))
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
async fn a_swarm_worker_answers_verified_webhooks_503_with_the_reason_and_queues_nothing() {
    let f = fixture("").await;
    f.role.send_replace(Role::Worker);
    // Each request a new build: the same body again would be a replay.
    let build = std::sync::atomic::AtomicU32::new(0);
    let req = |token: &str| {
        let n = build.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        axum::http::Request::post("/hooks/ci")
            .header("x-drover-token", token)
            .body(Body::from(format!(
                r#"{{"image":"owner/a:latest","build":{n}}}"#
            )))
            .expect("req")
    };
    assert_eq!(send(&f.app, req("wrong")).await.0, StatusCode::UNAUTHORIZED);
    let (status, body) = send(&f.app, req(TOKEN)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let reason = body["error"].as_str().unwrap_or_default();
    assert!(reason.contains("worker"), "the reason is given: {body}");
    assert!(f.service.jobs().list().is_empty(), "no job was created");
    f.role.send_replace(Role::Manager);
    assert_eq!(send(&f.app, req(TOKEN)).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn while_waiting_for_the_engine_hooks_get_503_and_health_answers() {
    let http = config::Http::default();
    let state =
        OpsState::new(Arc::new(Board::new()), None, Arc::default(), &http.ops).expect("state");
    let app = waiting_public(state);
    let (status, _) = send(&app, hub("?token=t", HUB_BODY)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let get = |p: &str| {
        axum::http::Request::get(p)
            .body(Body::empty())
            .expect("req")
    };
    assert_eq!(send(&app, get("/healthz")).await.0, StatusCode::OK);
    assert_eq!(
        send(&app, get("/readyz")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// One request on a connection of its own; the status code, or why there was none.
async fn ask_once(addr: SocketAddr, head: &str) -> std::result::Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_routes_replace_the_waiting_ones_without_a_refused_or_cut_connection() {
    let f = fixture("").await;
    let mut http = f.state.http.clone();
    http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    http.ops.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let (server, switch) = Server::waiting(&http, Arc::new(Board::new()), Arc::default())
        .await
        .expect("waiting");
    let addr = server.local_addrs().0.expect("public address");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.run(stop.clone()));

    let head = "POST /hooks/hub?token=wrong HTTP/1.1\r\nHost: drover\r\n\
                    Content-Type: application/json\r\nContent-Length: 2\r\n\
                    Connection: close\r\n\r\n{}";
    let client = tokio::spawn(async move {
        let mut answers = Vec::new();
        // Until 20 answers in a row were not the waiting routes' 503.
        let mut past = 0;
        while past < 20 {
            let answer = ask_once(addr, head).await;
            past = if answer == Ok(503) { 0 } else { past + 1 };
            answers.push(answer);
            assert!(answers.len() < 100_000, "the full routes never answered");
        }
        answers
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    switch.install(&f.state).expect("install");
    let answers = client.await.expect("client");
    stop.cancel();
    serving.await.expect("server");

    let failed: Vec<_> = answers.iter().filter(|a| a.is_err()).collect();
    assert!(failed.is_empty(), "refused or cut: {failed:?}");
    assert_eq!(answers[0], Ok(503), "the waiting routes answered first");
    let first_full = answers.iter().position(|a| *a != Ok(503)).expect("full");
    assert!(
        answers[first_full..].iter().all(|a| *a == Ok(401)),
        "once the intake answers, it alone does: {:?}",
        &answers[first_full..]
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
    let (status, health) = send(&f.app, get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["role"], "starting", "{health}");
    f.state.board.update(|s| s.role = Some(Role::Manager));
    let (_, health) = send(&f.app, get("/healthz")).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["role"], "manager", "{health}");
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

/// Serves the fixture on a real socket; the address and the token that stops it.
async fn listen(f: &Fixture) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(serve_listener(listener, f.state.clone(), stop.clone()));
    (addr, stop)
}

/// Whether the server closed the connection within `limit` (EOF or reset).
async fn closed_within(tcp: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(limit, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn a_request_beyond_the_cap_in_flight_is_503_and_one_past_its_time_is_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture("http: { request_timeout: 500ms, max_requests_per_source: 1 }").await;
    let (addr, stop) = listen(&f).await;
    // In flight until its time is up: the body it announces never comes in full.
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"POST /hooks/ci HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"image\":")
        .await
        .expect("write");
    let health = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut busy = None;
    for _ in 0..50 {
        // Until the slow request holds the source's one place.
        busy = Some(ask_once(addr, health).await.expect("health"));
        if busy == Some(503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        busy,
        Some(503),
        "a second request in flight from one source"
    );
    let mut answer = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut answer))
        .await
        .expect("an answer within the request timeout")
        .expect("read");
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(
        head.starts_with("HTTP/1.1 408"),
        "slow request answered {head:?}"
    );
    assert_eq!(
        ask_once(addr, health).await,
        Ok(200),
        "the place is free again"
    );
    stop.cancel();
}

#[tokio::test]
async fn connections_with_unfinished_headers_are_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let f = fixture("http: { header_timeout: 300ms, max_connections_per_source: 100 }").await;
    let (addr, stop) = listen(&f).await;
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"POST /hooks/ci HTTP/1.1\r\nHost: x\r\nX-Drover-")
            .await
            .expect("write");
        slow.push(tcp);
    }
    for tcp in &mut slow {
        assert!(
            closed_within(tcp, Duration::from_secs(10)).await,
            "a connection with unfinished headers stayed open"
        );
    }
    stop.cancel();
}

#[tokio::test]
async fn connections_beyond_the_per_source_cap_are_closed_at_once() {
    use tokio::io::AsyncWriteExt;
    let f = fixture("http: { max_connections_per_source: 2 }").await;
    let (addr, stop) = listen(&f).await;
    let _a = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _b = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert!(closed_within(&mut third, Duration::from_secs(5)).await);
    drop((_a, _b));
    // Once the others are gone the source may connect again.
    let mut again = None;
    for _ in 0..50 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        use tokio::io::AsyncReadExt;
        if let Ok(n) = tcp.read(&mut buf).await {
            if buf[..n].starts_with(b"HTTP/1.1 200") {
                again = Some(());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "the source stayed locked out");
    stop.cancel();
}

/// A connection to `addr` from `source` (any 127.0.0.0/8 address on Linux's loopback).
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((source, 0))).expect("bind");
    sock.connect(addr).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_open_bodies_from_one_address_leave_a_signed_delivery_from_another_its_2xx() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture("").await;
    let (addr, stop) = listen(&f).await;
    // 12 bodies that promise 1 MiB each (12 MiB: more than the whole 8 MiB budget) and
    // send nothing.
    let mut held = Vec::new();
    for _ in 0..12 {
        let mut tcp = connect_from([127, 0, 0, 1], addr).await;
        tcp.write_all(b"POST /hooks/ci HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n{")
            .await
            .expect("write");
        held.push(tcp);
    }
    // Let them all reach the body read before the real delivery comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sig = crate::hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
    let mut real = connect_from([127, 0, 0, 2], addr).await;
    real.write_all(
        format!(
            "POST /hooks/github HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             X-GitHub-Event: push\r\nX-GitHub-Delivery: real-held\r\n\
             X-Hub-Signature-256: {sig}\r\nContent-Length: {}\r\n\r\n{PUSH_BODY}",
            PUSH_BODY.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    real.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 202"), "{text}");
    // And the held bodies end with an answer of their own.
    for tcp in &mut held {
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    stop.cancel();
}

#[tokio::test]
async fn behind_nginx_a_forged_flood_spends_the_forgers_budget_not_the_senders() {
    let f = fixture("http: { auth_failures_per_minute: 10 }").await;
    // nginx's task address, as the render loop learns it from the snapshot (the default
    // trusted proxies).
    let nginx: std::net::IpAddr = [10, 0, 1, 5].into();
    let steps = crate::state::StepAddresses::default();
    steps.write().expect("lock").insert(nginx);
    let app = router(f.state.clone().with_step_addresses(steps)).expect("router");
    let via_nginx = |client: &str, mut req: axum::http::Request<Body>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(SocketAddr::new(nginx, 40000)));
        // nginx appends the address it saw to whatever the client sent.
        let xff = format!("140.82.112.1, {client}");
        req.headers_mut()
            .insert("x-forwarded-for", xff.parse().expect("value"));
        req
    };
    let forged = crate::hooks::sign(b"guessed", PUSH_BODY.as_bytes());
    let mut statuses = Vec::new();
    for i in 0..40 {
        let req = github("push", &format!("n-{i}"), PUSH_BODY, Some(forged.clone()));
        statuses.push(send(&app, via_nginx("192.0.2.66", req)).await.0);
    }
    assert!(
        statuses[10..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "the forger behind nginx was not limited: {statuses:?}"
    );
    let sig = crate::hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
    let req = github("push", "real-nginx", PUSH_BODY, Some(sig));
    let (status, body) = send(&app, via_nginx("140.82.112.1", req)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn a_forged_flood_does_not_starve_a_correctly_signed_delivery() {
    let f = fixture("http: { auth_failures_per_minute: 10 }").await;
    let app = router(f.state.clone()).expect("router");
    let from = |ip: [u8; 4], mut req: axum::http::Request<Body>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(SocketAddr::from((ip, 40000))));
        req
    };
    let forged = crate::hooks::sign(b"guessed", PUSH_BODY.as_bytes());
    let mut statuses = Vec::new();
    // More forged requests than the hook's own rate (50 per second).
    for i in 0..80 {
        let req = github("push", &format!("f-{i}"), PUSH_BODY, Some(forged.clone()));
        statuses.push(send(&app, from([192, 0, 2, 66], req)).await.0);
    }
    assert!(
        statuses[..10]
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED)
    );
    assert!(
        statuses[10..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS),
        "the forging source was not limited: {statuses:?}"
    );
    let sig = crate::hooks::sign(SECRET.as_bytes(), PUSH_BODY.as_bytes());
    let req = github("push", "real-1", PUSH_BODY, Some(sig));
    let (status, body) = send(&app, from([140, 82, 112, 1], req)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn operator_endpoints_need_the_bearer_token_when_one_is_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("ops-token");
    std::fs::write(&token, "ops-secret\n").expect("write");
    let f = fixture(&format!(
        "http: {{ ops: {{ token_file: {} }} }}",
        token.display()
    ))
    .await;
    let public = public_router(&f.state)
        .expect("router")
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    let get = |p: &str, auth: Option<&str>| {
        let mut b = axum::http::Request::get(p);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(Body::empty()).expect("req")
    };
    assert_eq!(
        send(&public, get("/metrics", None)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&public, get("/jobs", Some("Bearer wrong"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&public, get("/jobs", Some("Bearer ops-secret")))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(send(&public, get("/healthz", None)).await.0, StatusCode::OK);
    // The operator listener's health is open, but its cluster view needs the token.
    let ops = operator_router(f.state.ops().expect("ops"));
    let (status, health) = send(&ops, get("/healthz", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(health.get("peers").is_none(), "{health}");
    assert!(health.get("controller").is_none(), "{health}");
    let (_, health) = send(&ops, get("/healthz", Some("Bearer ops-secret"))).await;
    assert!(health.get("peers").is_some(), "{health}");
}

#[tokio::test]
async fn without_a_token_the_public_router_serves_no_operator_endpoint() {
    let f = fixture("").await;
    let public = public_router(&f.state)
        .expect("router")
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    for p in ["/", "/jobs", "/metrics", "/cluster"] {
        let req = axum::http::Request::get(p)
            .body(Body::empty())
            .expect("req");
        assert_eq!(send(&public, req).await.0, StatusCode::NOT_FOUND, "{p}");
    }
}

#[tokio::test]
async fn the_cluster_view_is_on_the_operator_healthz_and_not_the_public_one() {
    let f = fixture("").await;
    let get = || {
        axum::http::Request::get("/healthz")
            .body(Body::empty())
            .expect("req")
    };
    let public = public_router(&f.state)
        .expect("router")
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    let (status, health) = send(&public, get()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok", "{health}");
    assert!(health.get("controller").is_none(), "{health}");
    assert!(health.get("peers").is_none(), "{health}");
    let ops = operator_router(f.state.ops().expect("ops"));
    let (status, health) = send(&ops, get()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(health.get("controller").is_some(), "{health}");
    assert!(health.get("peers").is_some(), "{health}");
}

/// A controller serving the agent API (with the forwarded routes) on a real port, and a
/// worker whose intake forwards to it.
async fn controller_and_worker(known: bool) -> (Fixture, Fixture, Router, CancellationToken) {
    use crate::cluster::{agent, contacts, forward};
    let key = crate::cluster::wire::Key::from_bytes(b"cluster key");
    let controller = fixture("").await;
    // The controller's own node, which the worker's heartbeat names below: requests are
    // signed for it.
    let own = Arc::new(contacts::Contacts::default());
    own.set_peers("m1", Default::default());
    let admits = own.clone();
    let agent = Arc::new(agent::Agent::new(
        crate::cluster::wire::Guard::new(key.clone(), Duration::from_secs(30)),
        None,
        &[],
        own,
    ));
    let app = agent_routes(&controller.state, agent, controller.role.subscribe()).expect("routes");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let http = controller.state.http.clone();
    let serving = stop.clone();
    tokio::spawn(async move { serve_agent(listener, app, &http, admits, serving).await });

    let worker = fixture("").await;
    worker.role.send_replace(Role::Worker);
    let seen = Arc::new(contacts::Contacts::default());
    if known {
        seen.heard(&contacts::Heartbeat {
            node: "m1".into(),
            hostname: "m1".into(),
            address: addr,
        });
    }
    let forwarder =
        forward::Forwarder::new(key, worker.role.subscribe(), seen, Duration::from_secs(5));
    let app = router(worker.state.clone().with_forward(Some(Arc::new(forwarder))))
        .expect("router")
        .layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40001))));
    (controller, worker, app, stop)
}

#[tokio::test]
async fn a_webhook_on_a_worker_is_answered_by_the_controller_with_the_same_job_id() {
    let (controller, worker, app, stop) = controller_and_worker(true).await;
    let body = r#"{"image":"owner/app:latest"}"#;
    let ts = unix_now();
    let res = app
        .clone()
        .oneshot(signed_ci(ts, body))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let location = res.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let id = answer["job"].as_str().expect("job id").to_owned();
    assert_eq!(location, format!("/jobs/{id}"));
    // The job is the controller's; the worker took none of its own.
    assert!(controller.service.jobs().get(&id).is_some());
    assert!(worker.service.jobs().list().is_empty());
    // And the worker shows it, read from the controller.
    let (status, job) = send(
        &app,
        axum::http::Request::get(format!("/jobs/{id}"))
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["id"], id.as_str());
    let (_, jobs) = send(
        &app,
        axum::http::Request::get("/jobs")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(1));

    // The same request again meets the controller's replay memory, relayed.
    let (status, again) = send(&app, signed_ci(ts, body)).await;
    assert_eq!(
        (status, &again["status"]),
        (StatusCode::OK, &"duplicate".into())
    );

    // A forged one stops on the worker: 401, nothing reaches the controller.
    let before = controller.service.jobs().list().len();
    let ts = unix_now().to_string();
    let forged = axum::http::Request::post("/hooks/ci")
        .header("x-drover-timestamp", &ts)
        .header(
            "x-drover-signature",
            crate::hooks::sign_timestamped(b"guess", &ts, body.as_bytes()),
        )
        .body(Body::from(body))
        .expect("req");
    assert_eq!(send(&app, forged).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(controller.service.jobs().list().len(), before);
    stop.cancel();
}

#[tokio::test]
async fn without_a_controller_a_verified_webhook_is_503_with_retry_after_and_nothing_accepted() {
    let (controller, worker, app, stop) = controller_and_worker(false).await;
    let res = app
        .clone()
        .oneshot(signed_ci(unix_now(), r#"{"image":"owner/app:latest"}"#))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "5");
    assert!(controller.service.jobs().list().is_empty());
    assert!(worker.service.jobs().list().is_empty());
    let (status, _) = send(
        &app,
        axum::http::Request::get("/jobs")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    stop.cancel();
}

#[tokio::test]
async fn an_instance_that_is_no_longer_the_controller_refuses_forwarded_webhooks() {
    let (controller, _worker, app, stop) = controller_and_worker(true).await;
    controller.role.send_replace(Role::Manager);
    let (status, _) = send(
        &app,
        signed_ci(unix_now(), r#"{"image":"owner/app:latest"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(controller.service.jobs().list().is_empty());
    stop.cancel();
}
