//! Exponential backoff with jitter, shared by every loop that retries the engine.
//!
//! 800 ms doubling to 30 s, plus up to 25 % jitter so several drovers restarted together
//! spread out; reset after two quiet minutes (or explicitly, when the caller knows the
//! fault is over). Delays never exceed `MAX` plus its jitter, however long the fault lasts.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    healthy_since: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new()
    }
}

impl Backoff {
    pub const START: Duration = Duration::from_millis(800);
    pub const MAX: Duration = Duration::from_secs(30);
    pub const RESET_AFTER: Duration = Duration::from_secs(120);

    pub fn new() -> Backoff {
        Backoff {
            next: Self::START,
            healthy_since: None,
        }
    }

    /// The guarded thing works again; two quiet minutes from now the backoff starts over.
    pub fn connected(&mut self) {
        self.healthy_since = Some(Instant::now());
    }

    /// Starts over at once: the fault is known to be over.
    pub fn reset(&mut self) {
        self.next = Self::START;
        self.healthy_since = None;
    }

    /// The delay before the next attempt.
    pub fn delay(&mut self) -> Duration {
        if self
            .healthy_since
            .is_some_and(|t| t.elapsed() >= Self::RESET_AFTER)
        {
            self.next = Self::START;
        }
        self.healthy_since = None;
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Jitter from the clock's low bits: no shared seed between instances.
        let nanos = (crate::clock::unix_nanos() % 1_000_000_000) as u32;
        base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_a_cap_and_resets_after_quiet() {
        let mut b = Backoff::new();
        let first = b.delay();
        assert!(first >= Backoff::START && first < Backoff::START * 2);
        for _ in 0..10 {
            b.delay();
        }
        let capped = b.delay();
        assert!(capped >= Backoff::MAX && capped <= Backoff::MAX.mul_f64(1.25));
        b.connected();
        tokio::time::advance(Backoff::RESET_AFTER).await;
        assert!(b.delay() < Backoff::START * 2);
    }

    #[test]
    fn reset_starts_over_at_once() {
        let mut b = Backoff::new();
        for _ in 0..5 {
            b.delay();
        }
        b.reset();
        assert!(b.delay() < Backoff::START * 2);
    }
}
