//! The controller's ACME loop: for every certificate the routed TLS hosts want, obtain it
//! when missing or due, and publish it to the render loop, which delivers it to every
//! node that runs nginx with the rendered file.
//!
//! Only the controller orders. On taking over (start, leader change) it reads the account,
//! certificates and ledger back from Swarm ([`super::store`]) and publishes what it holds
//! before it looks at what is due, so a restart or a new leader serves the same
//! certificates and orders nothing. One host's failure backs off that host only; the
//! ledger refuses an order past the CA's limits; every outcome is a status row, a metric
//! and one log line per change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::acme::{BindingKey, Client, Token};
use super::exchange::{Exchange, Pair, Wanted};
use super::ledger::{Ledger, Limits};
use super::schedule::{Failures, renew_at_left};
use super::store::{Kept, Store};
use crate::config::{Certificates, HostChoice};
use crate::docker::Engine;
use crate::role::Role;
use crate::status::{Board, CertificateStatus};

/// How long every node may take to serve a new token before the order is given up.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest sleep between two looks at what is due.
const LOOK_EVERY: Duration = Duration::from_secs(30);
/// How long after every node reported the tokens in place before the CA is asked to
/// validate: a reload by signal is asynchronous (nginx's old workers keep accepting until
/// the new ones run), and a CA that validates at once would meet an old worker.
const RELOAD_SETTLE: Duration = Duration::from_secs(2);
/// After the store or the CA could not be reached at all.
const RETRY_SETUP: Duration = Duration::from_secs(15);

pub struct Manager {
    pub config: Certificates,
    pub engine: Engine,
    /// The cluster key: what the store seals with.
    pub key: Vec<u8>,
    /// The job journal's name: the store's scope.
    pub scope: String,
    pub exchange: Arc<Exchange>,
    pub board: Arc<Board>,
    pub role: watch::Receiver<Role>,
    /// External account binding, read from `certificates.eab` at start.
    pub binding: Option<BindingKey>,
}

/// What the controller holds while it is the controller.
struct Held {
    client: Client,
    store: Store,
    certificates: BTreeMap<String, Kept>,
    ledger: Ledger,
    failures: BTreeMap<String, Failures>,
    /// Orders placed since this take-over.
    ordered: u64,
}

impl Manager {
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if !self.role.borrow_and_update().is_controller() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = self.role.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let held = tokio::select! {
                _ = shutdown.cancelled() => return,
                held = self.take_over() => held,
            };
            let Some(mut held) = held else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_SETUP) => {}
                }
                continue;
            };
            let mut wanted = self.exchange.wanted.subscribe();
            let mut first = true;
            while self.role.borrow_and_update().is_controller() {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = self.pass(&mut held) => next,
                };
                if std::mem::take(&mut first) {
                    // One line per take-over, after its first look: what it holds, and
                    // whether that look had to order anything (a restart or a new leader
                    // should not).
                    info!(
                        certificates = held.certificates.len(),
                        ordered = held.ordered,
                        next_look_in = next,
                        "certificates: took over"
                    );
                }
                let sleep =
                    Duration::from_secs(u64::try_from(next).unwrap_or(0).max(1)).min(LOOK_EVERY);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(sleep) => {}
                    _ = wanted.changed() => {}
                    _ = self.role.changed() => {}
                }
            }
        }
    }

    /// Reads the store back, publishes what it holds, and reaches the CA.
    async fn take_over(&self) -> Option<Held> {
        let store = Store::new(self.engine.clone(), &self.scope, &self.key);
        let loaded = match store.load().await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "certificates: cannot read what was kept; not ordering");
                return None;
            }
        };
        for name in &loaded.unreadable {
            warn!(config = %name, "certificates: a kept object does not open with this cluster key; ignored");
        }
        let pairs: BTreeMap<String, Arc<Pair>> = loaded
            .certificates
            .iter()
            .map(|(h, k)| (h.clone(), Arc::new(k.pair.clone())))
            .collect();
        info!(
            certificates = pairs.len(),
            "certificates: serving what was kept"
        );
        self.exchange.publish(|p| {
            p.tokens.clear();
            p.pairs = pairs;
        });
        for kept in loaded.certificates.values() {
            self.show(kept, None, None);
        }
        let ca = self.config.ca_file.as_deref();
        let (client, created) = match Client::connect(
            &self.config.directory,
            ca,
            loaded.account,
            self.binding.as_ref(),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, directory = %self.config.directory, "certificates: cannot reach the CA");
                return None;
            }
        };
        if let Some(credentials) = created {
            info!(directory = %self.config.directory, "certificates: ACME account created");
            if let Err(e) = store.put_account(&credentials).await {
                // Without it a restart would create another account: not fatal, but said.
                warn!(error = %e, "certificates: cannot keep the new account");
            }
        }
        Some(Held {
            client,
            store,
            certificates: loaded.certificates,
            ledger: loaded.ledger,
            failures: BTreeMap::new(),
            ordered: 0,
        })
    }

    /// One look at everything wanted; returns the seconds until something is due.
    async fn pass(&self, held: &mut Held) -> i64 {
        let wanted: Vec<Wanted> = self
            .exchange
            .wanted
            .borrow()
            .iter()
            .filter(|w| self.config.hosts == HostChoice::All || w.opted_in)
            .cloned()
            .collect();
        let now = crate::clock::unix_secs();
        let mut next = LOOK_EVERY.as_secs() as i64;
        for w in wanted {
            let due_at = match held.certificates.get(&w.host) {
                Some(k) if k.names == w.names => self.renew_at(k),
                _ => now,
            };
            let failures = held.failures.get(&w.host).copied().unwrap_or_default();
            let at = due_at.max(failures.retry_at());
            if at > now {
                next = next.min(at - now);
                continue;
            }
            if let Err(refusal) = held.ledger.check(&w.names, now, &Limits::LETS_ENCRYPT) {
                crate::metrics::get()
                    .acme_orders
                    .with_label_values(&["refused"])
                    .inc();
                self.failed(&w, &refusal.to_string(), Some(refusal.until()));
                next = next.min((refusal.until() - now).max(1));
                continue;
            }
            self.order(held, &w).await;
        }
        next
    }

    async fn order(&self, held: &mut Held, w: &Wanted) {
        let now = crate::clock::unix_secs();
        held.ledger.ordered(now);
        held.ordered += 1;
        info!(host = %w.host, names = ?w.names, "certificates: ordering");
        let exchange = self.exchange.clone();
        let publish = async move |tokens: Vec<Token>| serve(&exchange, tokens).await;
        let result = held.client.obtain(&w.names, publish).await;
        // The tokens are of no use once the order ended, either way.
        self.exchange.publish(|p| p.tokens.clear());
        let m = crate::metrics::get();
        match result {
            Ok(issued) => {
                m.acme_orders.with_label_values(&["issued"]).inc();
                held.ledger.issued(&w.names, now);
                held.failures.remove(&w.host);
                let pair = Pair::new(
                    w.host.clone(),
                    issued.chain_pem.clone(),
                    issued.key_pem().to_owned(),
                );
                let kept = Kept {
                    names: w.names.clone(),
                    pair: pair.clone(),
                };
                if let Err(e) = held.store.put_certificate(&kept).await {
                    warn!(host = %w.host, error = %e, "certificates: cannot keep the certificate; it is served but a restart orders again");
                }
                self.exchange.publish(|p| {
                    p.pairs.insert(w.host.clone(), Arc::new(pair));
                });
                let renew = self.renew_at(&kept);
                info!(host = %w.host, renew_at = renew, "certificates: obtained");
                self.board.notify(crate::notifications::Event {
                    kind: crate::config::EventKind::CertificateRenewed,
                    subject: w.host.clone(),
                    summary: format!("certificate for {} obtained, renewed from unix time {renew}", w.names.join(", ")),
                    details: serde_json::json!({"host": w.host, "names": w.names, "renew_at": renew}),
                });
                self.show(&kept, None, None);
                held.certificates.insert(w.host.clone(), kept);
            }
            Err(e) => {
                m.acme_orders.with_label_values(&["failed"]).inc();
                if matches!(e, super::acme::Error::Order { .. }) {
                    for name in &w.names {
                        held.ledger.failed(name, now);
                    }
                }
                let f = held.failures.entry(w.host.clone()).or_default();
                f.failed(now);
                let retry = f.retry_at();
                warn!(host = %w.host, error = %e, retry_at = retry, "certificates: order failed");
                self.failed(w, &e.to_string(), Some(retry));
            }
        }
        held.ledger.prune(now, &Limits::LETS_ENCRYPT);
        if let Err(e) = held.store.put_ledger(&held.ledger).await {
            warn!(error = %e, "certificates: cannot keep the ledger");
        }
    }

    fn renew_at(&self, kept: &Kept) -> i64 {
        match super::x509::validity(&kept.pair.chain_pem) {
            Some((from, until)) => renew_at_left(from, until, self.config.renew_when_left),
            // A chain drover cannot read is renewed: it would not know when it ends.
            None => 0,
        }
    }

    /// The status row and the expiry gauge of a certificate held.
    fn show(&self, kept: &Kept, error: Option<String>, retry_at: Option<i64>) {
        let validity = super::x509::validity(&kept.pair.chain_pem);
        if let Some((_, until)) = validity {
            crate::metrics::get()
                .certificate_expiry
                .with_label_values(&[kept.pair.host.as_str()])
                .set(until);
        }
        let renew = self.renew_at(kept);
        self.board.update_certificate(&kept.pair.host, |s| {
            s.names = kept.names.clone();
            s.not_after = validity.map(|v| v.1);
            s.renew_at = Some(renew);
            s.error = error;
            s.retry_at = retry_at;
        });
    }

    fn failed(&self, w: &Wanted, error: &str, retry_at: Option<i64>) {
        // Repeats within the sinks' `repeat_after` are suppressed there.
        self.board.notify(crate::notifications::Event {
            kind: crate::config::EventKind::CertificateFailing,
            subject: w.host.clone(),
            summary: format!("no certificate for {}: {error}", w.names.join(", ")),
            details: serde_json::json!({"host": w.host, "names": w.names, "error": error, "retry_at": retry_at}),
        });
        self.board
            .update_certificate(&w.host, |s: &mut CertificateStatus| {
                s.names = w.names.clone();
                s.error = Some(error.to_owned());
                s.retry_at = retry_at;
            });
    }
}

/// Publishes `tokens` and waits until every node that runs the proxy serves them.
async fn serve(exchange: &Exchange, tokens: Vec<Token>) -> Result<(), String> {
    if let Some(bad) = tokens.iter().find(|t| {
        !super::exchange::safe_token(&t.token) || !super::exchange::safe_token(&t.key_authorization)
    }) {
        return Err(format!(
            "the CA sent a token drover will not put into nginx's config: {:?}",
            bad.token
        ));
    }
    let generation = exchange.publish(|p| p.tokens = tokens);
    let mut served = exchange.served.subscribe();
    // The watch's guard is dropped here, before the settle delay below.
    let waited = tokio::time::timeout(SERVE_TIMEOUT, served.wait_for(|g| *g >= generation))
        .await
        .map(|r| r.map(drop));
    match waited {
        Ok(Ok(_)) => {
            tokio::time::sleep(RELOAD_SETTLE).await;
            Ok(())
        }
        Ok(Err(_)) => Err("the render loop is gone".to_owned()),
        Err(_) => Err(format!(
            "not every node's nginx served the challenge within {}s (see the target's nodes on the status page)",
            SERVE_TIMEOUT.as_secs()
        )),
    }
}
