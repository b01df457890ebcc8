//! The agent: how the controller puts a rendered file in place on another node.
//!
//! Every instance serves it on the cluster network (its own listener, apart from the
//! webhook port). The controller sends a target's content (see [`wire`]); the agent
//! carries it out with [`apply::Local::apply`], the one executor the single-node path
//! uses too: staged, checked in the local proxy container, hosts that fail left out,
//! certificate files looked up in this node's proxy, committed or restored, notified.
//! It answers with the typed [`Report`](crate::apply::Report).
//!
//! Invariants: no byte of a body is read before its signature headers parse and its
//! timestamp is fresh; each route has its own body limit (a heartbeat: [`SMALL_BODY`]) and
//! all share the agent's byte budget; every request is verified by [`wire::Guard`], for
//! its own path and this node, before anything else; answers are signed; a
//! content whose hash does not match, or a target the agent does not know, is refused
//! before anything is written; one request per target at a time, so a check sees the
//! file it was asked about.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tower_http::timeout::TimeoutLayer;
use tracing::info;

use super::contacts::{Contacts, Heartbeat};
use super::wire::{
    APPLY_PATH, Applied, ApplyAnswer, ApplyRequest, BODY_BUDGET, Guard, HEARTBEAT_PATH, MAX_BODY,
    REQUEST_TIMEOUT, Refusal, SMALL_BODY, To, count_refusal, read_body, refused,
};
use crate::apply::{Candidate, Local};
use crate::budget::{Budget, Held};
use crate::clock::unix_secs as unix_now;
use crate::config::Target;
use crate::docker::Engine;
use crate::hash::sha256_hex;

type Targets = HashMap<String, Arc<tokio::sync::Mutex<Local>>>;

/// The agent's side: its own copies of the targets, applied with the local engine.
pub struct Agent {
    guard: Guard,
    /// Bytes of request bodies held at once, by every route of the agent API.
    budget: Arc<Budget>,
    engine: Option<Engine>,
    /// Where heartbeats from the controller are remembered.
    contacts: Arc<Contacts>,
    /// Swapped whole by [`Agent::retarget`] (a config reload); a request in flight keeps
    /// the target it started with.
    targets: std::sync::RwLock<Arc<Targets>>,
    /// Where certificates sent with an apply are written (`certificates.dir`).
    pair_dir: Option<std::path::PathBuf>,
}

fn local(t: &Target) -> Arc<tokio::sync::Mutex<Local>> {
    Arc::new(tokio::sync::Mutex::new(Local::new(t)))
}

impl Agent {
    pub fn new(
        guard: Guard,
        engine: Option<Engine>,
        targets: &[Target],
        contacts: Arc<Contacts>,
    ) -> Agent {
        Agent {
            guard,
            budget: Budget::new(BODY_BUDGET, MAX_BODY),
            engine,
            contacts,
            targets: std::sync::RwLock::new(Arc::new(
                targets.iter().map(|t| (t.name.clone(), local(t))).collect(),
            )),
            pair_dir: None,
        }
    }

    /// Writes certificates sent with an apply under `dir` (drover's ACME client is on).
    pub fn with_pair_dir(mut self, dir: Option<std::path::PathBuf>) -> Agent {
        self.pair_dir = dir;
        self
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Where a request to this instance's `path` is meant to go: this node.
    pub fn to<'a>(&self, path: &'a str, node: &'a str) -> To<'a> {
        To { path, node }
    }

    /// This instance's Swarm node id (empty before the first snapshot, or outside Swarm:
    /// then only requests signed for no node pass).
    pub fn own_node(&self) -> String {
        self.contacts.own_node()
    }

    /// The request's body, at most `limit` bytes, read only once its signature headers
    /// parse and its timestamp is fresh, its bytes held in the agent's budget.
    pub async fn body(
        &self,
        req: Request,
        limit: usize,
    ) -> Result<(HeaderMap, Vec<u8>, Held), Refusal> {
        let source = req
            .extensions()
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        let (parts, body) = req.into_parts();
        let (bytes, held) = read_body(
            &self.guard,
            &parts.headers,
            body,
            limit,
            self.budget.hold(source),
        )
        .await?;
        Ok((parts.headers, bytes, held))
    }

    /// The targets of a reloaded config: an unchanged target keeps its state (the hash of
    /// its file, its last bad content); a changed one starts afresh from its file, under
    /// the same lock, so a request still applying the old settings finishes before the
    /// new ones stage anything at that path; a removed one is refused from now on (its
    /// file stays).
    pub async fn retarget(&self, targets: &[Target]) {
        let old = self.current();
        let mut new = Targets::new();
        for t in targets {
            let mut kept = None;
            if let Some(l) = old.get(&t.name) {
                let mut state = l.lock().await;
                // `Target` has no `PartialEq` (it holds regexes); its `Debug` form holds
                // every field, so equal forms mean equal settings.
                if format!("{:?}", state.config()) != format!("{t:?}") {
                    *state = Local::new(t);
                }
                kept = Some(l.clone());
            }
            new.insert(t.name.clone(), kept.unwrap_or_else(|| local(t)));
        }
        *self.targets.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
    }

    fn current(&self) -> Arc<Targets> {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Verifies and carries out one request.
    pub async fn handle(&self, headers: &HeaderMap, body: &[u8]) -> Result<ApplyAnswer, Refusal> {
        let own = self.own_node();
        self.guard
            .verify(headers, self.to(APPLY_PATH, &own), body, unix_now())?;
        let req: ApplyRequest = serde_json::from_slice(body).map_err(|_| Refusal::BadRequest)?;
        let content = base64::engine::general_purpose::STANDARD
            .decode(&req.content)
            .map_err(|_| Refusal::BadRequest)?;
        if !bool::from(sha256_hex(&content).as_bytes().ct_eq(req.hash.as_bytes())) {
            return Err(Refusal::HashMismatch);
        }
        let applier = self
            .current()
            .get(&req.target)
            .cloned()
            .ok_or(Refusal::UnknownTarget)?;
        // One request per target at a time: a check must see the file it was asked about.
        let mut applier = applier.lock().await;
        let snapshot = match &self.engine {
            Some(engine) => crate::state::fetch(engine).await.ok(),
            None => None,
        };
        let node = snapshot
            .as_ref()
            .map(|s| s.node_id.clone())
            .unwrap_or_default();
        let snapshot = snapshot.unwrap_or_default();
        let pairs = req
            .pairs
            .iter()
            .map(|p| crate::certs::exchange::open_pair(self.guard.key().bytes(), p).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Refusal::BadRequest)?;
        let candidate = Candidate {
            content: &content,
            tls: &req.tls,
            with_certificates: &req.with_certificates,
            resync: req.resync,
            pairs: &pairs,
            pair_dir: self.pair_dir.as_deref(),
        };
        let result = match applier
            .apply(candidate, self.engine.as_ref(), &snapshot, Instant::now())
            .await
        {
            Ok(report) => Applied::Report(report),
            Err(e) => Applied::Error(e.to_string()),
        };
        let outcome = match &result {
            Applied::Report(r) => r.outcome.label(),
            Applied::Error(_) => "error",
        };
        crate::metrics::get()
            .agent_requests
            .with_label_values(&[req.target.as_str(), outcome])
            .inc();
        info!(target = %req.target, %outcome, hash = %req.hash, "agent request applied");
        Ok(ApplyAnswer {
            node,
            target: req.target,
            result,
        })
    }
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(APPLY_PATH, post(apply))
        .route(HEARTBEAT_PATH, post(heartbeat))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(agent)
}

async fn apply(State(agent): State<Arc<Agent>>, req: Request) -> Response {
    let (headers, body, _held) = match agent.body(req, MAX_BODY).await {
        Ok(b) => b,
        Err(refusal) => return refused(refusal),
    };
    match agent.handle(&headers, &body).await {
        Ok(answer) => {
            let own = agent.own_node();
            match serde_json::to_vec(&answer) {
                Ok(bytes) => {
                    agent
                        .guard
                        .answer(&headers, agent.to(APPLY_PATH, &own), StatusCode::OK, bytes)
                }
                Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
        Err(refusal) => {
            count_refusal(refusal);
            refused(refusal)
        }
    }
}

/// A heartbeat from the controller: remembered in `contacts`, answered with this node.
async fn heartbeat(State(agent): State<Arc<Agent>>, req: Request) -> Response {
    let (headers, body, _held) = match agent.body(req, SMALL_BODY).await {
        Ok(b) => b,
        Err(refusal) => return refused(refusal),
    };
    let own = agent.own_node();
    let to = agent.to(HEARTBEAT_PATH, &own);
    if let Err(r) = agent.guard.check(&headers, to, &body) {
        return refused(r);
    }
    let Ok(beat) = serde_json::from_slice::<Heartbeat>(&body) else {
        return refused(Refusal::BadRequest);
    };
    agent.contacts.heard(&beat);
    let answer = serde_json::json!({ "node": agent.contacts.own_node() });
    agent.guard.answer(
        &headers,
        to,
        StatusCode::OK,
        answer.to_string().into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply;
    use crate::cluster::wire::signed;
    use crate::cluster::wire::*;
    use axum::routing::post;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    /// Agents in these tests have seen no snapshot: their node is "".
    const TO_APPLY: To<'static> = To {
        path: APPLY_PATH,
        node: "",
    };
    const TO_BEAT: To<'static> = To {
        path: HEARTBEAT_PATH,
        node: "",
    };

    #[tokio::test]
    async fn a_reload_replaces_changed_targets_and_keeps_unchanged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let t = |name: &str, file: &str| -> Target {
            serde_yaml_ng::from_str(&format!(
                "name: {name}\ntemplate: builtin:nginx\noutput: {}\n",
                dir.path().join(file).display()
            ))
            .unwrap()
        };
        let key = Key::from_bytes(b"k");
        let agent = Agent::new(
            Guard::new(key.clone(), Duration::from_secs(30)),
            None,
            &[t("a", "a")],
            Arc::default(),
        );
        let now = unix_now();
        let body = serde_json::to_vec(&ApplyRequest::new("b", b"x")).unwrap();
        assert_eq!(
            agent
                .handle(&signed(&key, now, "1", TO_APPLY, &body), &body)
                .await,
            Err(Refusal::UnknownTarget)
        );
        let kept = agent.current()["a"].clone();
        agent.retarget(&[t("a", "a"), t("b", "b")]).await;
        assert!(
            Arc::ptr_eq(&kept, &agent.current()["a"]),
            "unchanged: same state"
        );
        let answer = agent
            .handle(&signed(&key, now, "2", TO_APPLY, &body), &body)
            .await
            .unwrap();
        assert!(
            matches!(&answer.result, Applied::Report(r) if r.outcome == apply::Outcome::Applied),
            "{answer:?}"
        );
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"x");
        agent.retarget(&[t("a", "a2")]).await;
        let now_a = agent.current()["a"].clone();
        assert!(
            Arc::ptr_eq(&kept, &now_a),
            "changed: the same lock, so an apply in flight finishes first"
        );
        assert!(
            now_a.lock().await.config().output.ends_with("a2"),
            "changed: fresh state"
        );
        assert!(!agent.current().contains_key("b"));
    }

    #[tokio::test]
    async fn a_verified_request_writes_the_file_and_a_forged_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.conf");
        let target: Target = serde_yaml_ng::from_str(&format!(
            "name: web\ntemplate: builtin:nginx\noutput: {}\n",
            output.display()
        ))
        .unwrap();
        let key = Key::from_bytes(b"cluster key");
        let agent = Agent::new(
            Guard::new(key.clone(), Duration::from_secs(30)),
            None,
            &[target],
            Arc::default(),
        );
        let now = unix_now();

        let body = serde_json::to_vec(&ApplyRequest::new("web", b"one")).unwrap();
        let forged = signed(&Key::from_bytes(b"guess"), now, "f", TO_APPLY, &body);
        assert_eq!(
            agent.handle(&forged, &body).await,
            Err(Refusal::Unauthorized)
        );
        assert!(!output.exists());

        let answer = agent
            .handle(&signed(&key, now, "a", TO_APPLY, &body), &body)
            .await
            .unwrap();
        let Applied::Report(report) = &answer.result else {
            panic!("{answer:?}");
        };
        assert_eq!(report.outcome, apply::Outcome::Applied);
        assert_eq!(report.hash, Some(sha256_hex(b"one")));
        assert_eq!(std::fs::read(&output).unwrap(), b"one");

        let mut lying = ApplyRequest::new("web", b"two");
        lying.hash = sha256_hex(b"three");
        let body = serde_json::to_vec(&lying).unwrap();
        assert_eq!(
            agent
                .handle(&signed(&key, now, "b", TO_APPLY, &body), &body)
                .await,
            Err(Refusal::HashMismatch)
        );
        let body = serde_json::to_vec(&ApplyRequest::new("nope", b"two")).unwrap();
        assert_eq!(
            agent
                .handle(&signed(&key, now, "c", TO_APPLY, &body), &body)
                .await,
            Err(Refusal::UnknownTarget)
        );
        assert_eq!(std::fs::read(&output).unwrap(), b"one");
    }

    #[tokio::test]
    async fn a_call_gets_a_signed_answer_and_refuses_an_unsigned_one() {
        let key = Key::from_bytes(b"cluster key");
        let agent = Arc::new(Agent::new(
            Guard::new(key.clone(), Duration::from_secs(30)),
            None,
            &[],
            Arc::default(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = router(agent).route(
            "/unsigned",
            post(|| async { axum::Json(serde_json::json!({})) }),
        );
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .into_future(),
        );
        let beat = serde_json::to_vec(&super::super::contacts::Heartbeat {
            node: "n1".into(),
            hostname: "h1".into(),
            address: "10.0.0.1:9092".parse().unwrap(),
        })
        .unwrap();
        let secs = Duration::from_secs(5);
        let answer = call(addr, &key, TO_BEAT, beat.clone(), secs, 4096)
            .await
            .unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&answer).is_ok());
        let wrong = call(
            addr,
            &Key::from_bytes(b"x"),
            TO_BEAT,
            beat.clone(),
            secs,
            4096,
        )
        .await;
        assert!(
            matches!(wrong, Err(Error::Status { status: 401, .. })),
            "{wrong:?}"
        );
        // A heartbeat signed for another node is refused.
        let elsewhere = To {
            path: HEARTBEAT_PATH,
            node: "node-b",
        };
        let r = call(addr, &key, elsewhere, beat, secs, 4096).await;
        assert!(matches!(r, Err(Error::Status { status: 401, .. })), "{r:?}");
        let unsigned = call(
            addr,
            &key,
            To {
                path: "/unsigned",
                node: "",
            },
            b"{}".to_vec(),
            secs,
            4096,
        )
        .await;
        assert!(
            matches!(unsigned, Err(Error::Transport { .. })),
            "{unsigned:?}"
        );
        stop.cancel();
        let _ = server.await;
    }
}
