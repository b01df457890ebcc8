//! The error policy of the reconcile loop: when to try again after a failure, decided
//! from the error's kind, never from its text.
//!
//! A failed snapshot never makes work due at once: a transient error (engine gone,
//! restarting, 5xx) waits a [`Backoff`] delay (800 ms doubling to 30 s, jitter), a
//! permanent one waits the longest delay. An outage is logged twice however long it
//! lasts: once when it starts, once when the engine answers again, with how long it was
//! gone.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;

/// What the loop needs to know about a failed step.
pub trait Failure: std::fmt::Display {
    /// Worth retrying soon: the other side may be restarting or briefly overloaded.
    fn is_transient(&self) -> bool;
}

impl Failure for crate::state::Error {
    fn is_transient(&self) -> bool {
        crate::state::Error::is_transient(self)
    }
}

/// The memory of one kind of fault (the engine, one target's check) across attempts.
#[derive(Debug, Default)]
pub struct Policy {
    backoff: Backoff,
    down_since: Option<Instant>,
}

impl Policy {
    /// Records a failure; returns how long to wait before the next attempt.
    pub fn failed(&mut self, error: &impl Failure) -> Duration {
        let delay = if error.is_transient() {
            self.backoff.delay()
        } else {
            Backoff::MAX
        };
        let retry_ms = delay.as_millis() as u64;
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            if error.is_transient() {
                warn!(error = %error, retry_ms, "engine unreachable");
            } else {
                warn!(error = %error, retry_ms, "cannot fetch cluster state");
            }
        } else {
            debug!(error = %error, retry_ms, "still failing");
        }
        delay
    }

    /// Records a success; returns how long the fault lasted if there was one.
    pub fn succeeded(&mut self) -> Option<Duration> {
        let since = self.down_since.take()?;
        self.backoff.reset();
        let gone = since.elapsed();
        info!(down_ms = gone.as_millis() as u64, "engine back");
        Some(gone)
    }

    /// Whether the last attempt failed.
    pub fn is_failing(&self) -> bool {
        self.down_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fault(bool);

    impl std::fmt::Display for Fault {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("fault")
        }
    }

    impl Failure for Fault {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_outage_backs_off_to_a_cap_and_never_retries_at_once() {
        let mut p = Policy::default();
        let mut last = Duration::ZERO;
        for attempt in 0..12 {
            let d = p.failed(&Fault(true));
            assert!(d >= Backoff::START, "attempt {attempt}: {d:?}");
            assert!(d <= Backoff::MAX.mul_f64(1.25), "attempt {attempt}: {d:?}");
            if attempt < 5 {
                assert!(d > last, "attempt {attempt} grows: {d:?} after {last:?}");
            }
            last = d;
            tokio::time::advance(d).await;
        }
        assert!(last >= Backoff::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn recovery_reports_how_long_the_engine_was_gone_and_starts_over() {
        let mut p = Policy::default();
        assert_eq!(p.succeeded(), None, "no fault, nothing to report");
        p.failed(&Fault(true));
        tokio::time::advance(Duration::from_secs(10)).await;
        p.failed(&Fault(true));
        assert!(p.is_failing());
        assert_eq!(p.succeeded(), Some(Duration::from_secs(10)));
        assert!(!p.is_failing());
        assert!(p.failed(&Fault(true)) < Backoff::START * 2);
    }

    #[test]
    fn a_permanent_error_waits_the_longest_delay() {
        let mut p = Policy::default();
        assert_eq!(p.failed(&Fault(false)), Backoff::MAX);
    }
}
