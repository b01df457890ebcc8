//! Connections and requests: accept, admit, serve with timers, drain.
//!
//! `axum::serve` has no timers and no caps, so a client that opens sockets and never
//! finishes its headers holds them for ever. Here every connection is admitted through a
//! [`Gate`] (a cap in all and per source address; beyond it the socket is closed at once),
//! served by hyper's HTTP/1 connection with a header-read timeout (which also bounds the
//! wait for the next request on a kept-alive connection) and watched for idleness: no byte
//! either way for `idle_timeout` closes it. Each request on it is admitted through the
//! listener's request [`Gate`] (503 beyond) and given the request time limit (408), see
//! [`Requests`]. On shutdown the listener closes, connections finish the request in
//! flight, and whatever is left after the drain limit is dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, warn};

use crate::{config, metrics};

/// Largest request head (request line and headers) a connection may buffer.
const MAX_HEAD: usize = 16 * 1024;

/// Counts holders in all and per source address, and refuses beyond either cap.
pub struct Gate {
    what: &'static str,
    total: usize,
    per_source: usize,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Gate {
    pub fn new(what: &'static str, total: usize, per_source: usize) -> Arc<Gate> {
        Arc::new(Gate {
            what,
            total,
            per_source,
            held: Mutex::default(),
        })
    }

    /// A pass while both caps have room; `None` when either is reached.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Pass> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_source) = &mut *held;
        let mine = by_source.get(&ip).copied().unwrap_or(0);
        if *total >= self.total || mine >= self.per_source {
            metrics::get()
                .http_refused
                .with_label_values(&[self.what])
                .inc();
            return None;
        }
        *total += 1;
        by_source.insert(ip, mine + 1);
        Some(Pass {
            gate: self.clone(),
            ip,
        })
    }

    /// Holders right now, in all.
    pub fn held(&self) -> usize {
        self.held.lock().map(|h| h.0).unwrap_or(0)
    }
}

/// Held while a connection is open or a request is being handled.
pub struct Pass {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut held = self.gate.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_source) = &mut *held;
        *total = total.saturating_sub(1);
        if let Some(n) = by_source.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Forget the address, so the map holds only sources with something open.
                by_source.remove(&self.ip);
            }
        }
    }
}

/// How a listener treats its connections.
#[derive(Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub connections: Arc<Gate>,
    /// Requests in flight and their time; `None` leaves both to the router.
    pub requests: Option<Requests>,
    /// How long shutdown waits for requests in flight.
    pub drain: Duration,
    /// Which local addresses connections may arrive at (the agent API: its own network's);
    /// `None`: any.
    pub local: Option<LocalFilter>,
}

/// Whether a connection that arrived at this local address is served.
pub type LocalFilter = Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

impl Limits {
    /// The timers and caps of `http`; `what` names the connection cap in
    /// `drover_http_refused_total`. Requests are capped (`requests`) and given
    /// `http.request_timeout`, as on the public and operator listeners.
    pub fn of(http: &config::Http, what: &'static str) -> Limits {
        Limits {
            header_timeout: http.header_timeout,
            idle_timeout: http.idle_timeout,
            connections: Gate::new(what, http.max_connections, http.max_connections_per_source),
            requests: Some(Requests {
                gate: Gate::new("requests", http.max_requests, http.max_requests_per_source),
                timeout: http.request_timeout,
            }),
            drain: drain_limit(http),
            local: None,
        }
    }
}

/// How long shutdown waits for requests in flight.
pub fn drain_limit(http: &config::Http) -> Duration {
    http.request_timeout + Duration::from_secs(1)
}

/// The cap on requests in flight (beyond it: 503) and their time limit (beyond it: 408).
/// Applied here rather than as router layers: a layer costs every request a boxed service
/// clone and a boxed future more, and webhook intake is drover's hot path.
#[derive(Clone)]
pub struct Requests {
    pub gate: Arc<Gate>,
    pub timeout: Duration,
}

impl Requests {
    async fn serve(&self, peer: IpAddr, app: &mut Router, req: Request<Body>) -> Response {
        let Some(_pass) = self.gate.enter(peer) else {
            return super::Error::Busy.into_response();
        };
        match tokio::time::timeout(self.timeout, app.call(req)).await {
            Ok(Ok(res)) => res,
            Ok(Err(never)) => match never {},
            Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
        }
    }
}

/// What a listener serves: the router of the moment. Each request takes the current one,
/// so drover answers on its sockets from the first moment and installs its full routes
/// when start-up is through, without closing or refusing a connection.
pub type Routes = watch::Receiver<Router>;

/// Routes that never change.
pub fn fixed(app: Router) -> Routes {
    watch::channel(app).1
}

/// Serves `app` on `listener` until `shutdown`, then drains for at most `limits.drain`.
pub async fn serve(
    listener: TcpListener,
    app: Routes,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        if let Some(local) = &limits.local {
            if !tcp.local_addr().is_ok_and(|a| local(a.ip())) {
                debug!(%peer, "connection refused: arrived on another network");
                continue;
            }
        }
        let Some(pass) = limits.connections.enter(peer.ip()) else {
            debug!(%peer, "connection refused: too many open");
            continue;
        };
        // Small answers: don't let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
        tracker.spawn(connection(
            tcp,
            peer,
            app.clone(),
            limits.clone(),
            shutdown.clone(),
            pass,
        ));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(limits.drain, tracker.wait())
        .await
        .is_err()
    {
        warn!(limit = ?limits.drain, "http drain limit reached, closing remaining connections");
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Routes,
    limits: Limits,
    shutdown: CancellationToken,
    _pass: Pass,
) {
    let io = Watched::new(tcp);
    let activity = io.activity.clone();
    let requests = limits.requests.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.borrow().clone();
        let requests = requests.clone();
        async move {
            let req = req.map(Body::new);
            match requests {
                Some(r) => Ok::<_, Infallible>(r.serve(peer.ip(), &mut app, req).await),
                None => app.call(req).await,
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD.max(8192));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = activity.idle_for(limits.idle_timeout) => {
                debug!(%peer, "idle connection closed");
                return;
            }
        }
    }
}

/// When a connection last moved a byte, in milliseconds since it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = last + limit;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A TCP stream that records when it last made progress.
struct Watched {
    tcp: TcpStream,
    activity: Arc<Activity>,
}

impl Watched {
    fn new(tcp: TcpStream) -> Watched {
        Watched {
            tcp,
            activity: Arc::new(Activity {
                opened: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_caps_in_all_and_per_source_and_frees_on_drop() {
        let gate = Gate::new("test", 3, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = gate.enter(a).expect("first from a");
        let a2 = gate.enter(a).expect("second from a");
        assert!(
            gate.enter(a).is_none(),
            "third from a passes the per-source cap"
        );
        let b1 = gate.enter(b).expect("first from b");
        assert!(
            gate.enter(b).is_none(),
            "fourth in all passes the total cap"
        );
        drop(a1);
        assert!(gate.enter(b).is_some(), "a freed slot is usable by anyone");
        drop((a2, b1));
        assert_eq!(gate.held.lock().expect("lock").1.get(&a), None);
    }
}
