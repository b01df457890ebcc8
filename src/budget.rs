//! Body budgets (webhook intake, agent API): bytes of request bodies held at once, in
//! all and per source.
//!
//! Invariants: bytes are taken as they arrive (never from a declared `Content-Length`,
//! which costs a client nothing to send), so a request that announces a large body and
//! sends nothing holds nothing; one source holds at most its share, so whatever one
//! address does, the rest of the budget stays for everyone else. Every byte taken is given
//! back when its [`Held`] is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use tokio::time::Instant;

/// One source holds at most this fraction of the budget (or one `max_body`, if larger).
pub const SOURCE_SHARE: usize = 4;

pub struct Budget {
    total: usize,
    per_source: usize,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why bytes could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The source holds its share.
    Source,
    /// Every source together holds the budget.
    All,
}

impl Budget {
    /// `total` bytes in all; a source's share is `total / SOURCE_SHARE`, but never less than
    /// `max_body`, so one full-size body from one source always fits an empty budget.
    pub fn new(total: usize, max_body: usize) -> Arc<Budget> {
        Arc::new(Budget {
            total,
            per_source: (total / SOURCE_SHARE).max(max_body).min(total),
            held: Mutex::default(),
        })
    }

    /// Nothing held yet, for `source`.
    pub fn hold(self: &Arc<Self>, source: IpAddr) -> Held {
        Held {
            budget: self.clone(),
            source,
            bytes: 0,
        }
    }

    /// Bytes held right now, in all and by `source`.
    pub fn held(&self, source: IpAddr) -> (usize, usize) {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        (held.0, held.1.get(&source).copied().unwrap_or(0))
    }
}

/// Bytes held for one request; given back on drop.
pub struct Held {
    budget: Arc<Budget>,
    source: IpAddr,
    bytes: usize,
}

impl Held {
    /// Takes `n` more bytes, or none when the source's share or the whole budget would be
    /// passed.
    pub fn grow(&mut self, n: usize) -> Result<(), Full> {
        if n == 0 {
            return Ok(());
        }
        let b = &self.budget;
        let mut held = b.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_source) = &mut *held;
        let mine = by_source.get(&self.source).copied().unwrap_or(0);
        if mine.saturating_add(n) > b.per_source {
            return Err(Full::Source);
        }
        if total.saturating_add(n) > b.total {
            return Err(Full::All);
        }
        *total += n;
        by_source.insert(self.source, mine + n);
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut held = self.budget.held.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_source) = &mut *held;
        *total = total.saturating_sub(self.bytes);
        if let Some(n) = by_source.get_mut(&self.source) {
            *n = n.saturating_sub(self.bytes);
            if *n == 0 {
                // Only sources holding something stay in the map.
                by_source.remove(&self.source);
            }
        }
    }
}

/// How long a body may take to start before the minimum rate of [`read`] applies.
pub const BODY_GRACE: Duration = Duration::from_secs(2);

/// Why a body was not read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Short {
    /// Declared or sent beyond the limit.
    TooLarge,
    /// Fell behind the minimum rate.
    TooSlow,
    /// The connection failed mid-body.
    Read,
    /// The budget could not take the bytes.
    Full(Full),
}

/// The body in one buffer of at most `limit` bytes, with the share of the budget it holds:
/// the one body reader of every listener (webhooks, agent API). A declared length over the
/// limit is refused before reading; chunked bodies are copied as they come, so a million
/// one-byte chunks cost what one million-byte chunk does. Every byte is taken from the
/// budget as it arrives (a declared length reserves nothing). A body that falls behind
/// `min_rate` bytes per second after [`BODY_GRACE`] is cut off, so a held-open body holds
/// its place for seconds, not for the listener's whole request time.
pub async fn read(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    mut held: Held,
    min_rate: usize,
) -> Result<(Vec<u8>, Held), Short> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Short::TooLarge);
    }
    let start = Instant::now();
    let per_byte = 1.0 / min_rate.max(1) as f64;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let due = start + BODY_GRACE + Duration::from_secs_f64(buf.len() as f64 * per_byte);
        let frame = match tokio::time::timeout_at(due, body.frame()).await {
            Err(_) => return Err(Short::TooSlow),
            Ok(None) => break,
            Ok(Some(frame)) => frame.map_err(|_| Short::Read)?,
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(Short::TooLarge);
            }
            let grow = (buf.len() + data.len()).saturating_sub(buf.capacity());
            if grow > 0 {
                // Reserve exactly what the budget granted, so capacity never outruns it.
                let want = grow.max(buf.capacity()).min(limit - buf.capacity());
                let want = match held.grow(want) {
                    Ok(()) => want,
                    // Doubling asked for more than is left: what this frame needs may fit.
                    Err(_) => {
                        held.grow(grow).map_err(Short::Full)?;
                        grow
                    }
                };
                buf.reserve_exact(want);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((buf, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_holds_at_most_its_share_and_the_rest_stays_for_others() {
        let budget = Budget::new(1000, 100);
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        let mut a1 = budget.hold(a);
        assert_eq!(a1.grow(200), Ok(()));
        let mut a2 = budget.hold(a);
        assert_eq!(a2.grow(100), Err(Full::Source), "a quarter of 1000 is 250");
        assert_eq!(a2.grow(50), Ok(()));
        let mut others: Vec<Held> = (3..=5)
            .map(|i| {
                let mut h = budget.hold([192, 0, 2, i].into());
                assert_eq!(h.grow(250), Ok(()));
                h
            })
            .collect();
        let mut b1 = budget.hold(b);
        assert_eq!(b1.grow(1), Err(Full::All), "1000 held in all");
        others.pop();
        assert_eq!(b1.grow(250), Ok(()));
        drop((a1, a2, b1, others));
        assert_eq!(budget.held(a), (0, 0));
        assert!(budget.held.lock().expect("lock").1.is_empty());
    }

    #[test]
    fn a_share_is_never_less_than_one_full_body() {
        let budget = Budget::new(1000, 600);
        let mut h = budget.hold([192, 0, 2, 1].into());
        assert_eq!(h.grow(600), Ok(()));
    }
}
