//! The min/max batching window of one target.
//!
//! Each change hint pushes the quiet deadline `min` further out, but never past `max`
//! after the first hint of the batch: a burst of 200 events in 10 s gives one render per
//! `max`, a lone event renders after `min`. Pure and clock-agnostic (the caller passes
//! `now`), so it is tested with paused tokio time.

use tokio::time::Instant;

use crate::config::Debounce;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// When the first hint of the batch arrived (for the event-to-apply lag metric).
    pub first: Instant,
    pub last: Instant,
}

#[derive(Debug, Clone)]
pub struct Debouncer {
    window: Debounce,
    pending: Option<Batch>,
}

impl Debouncer {
    pub fn new(window: Debounce) -> Debouncer {
        Debouncer {
            window,
            pending: None,
        }
    }

    pub fn hint(&mut self, at: Instant) {
        match &mut self.pending {
            Some(b) => b.last = b.last.max(at),
            None => {
                self.pending = Some(Batch {
                    first: at,
                    last: at,
                })
            }
        }
    }

    /// When the pending batch is due, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending
            .map(|b| (b.last + self.window.min).min(b.first + self.window.max))
    }

    /// Takes the batch if it is due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<Batch> {
        if self.deadline().is_some_and(|d| d <= now) {
            self.pending.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::advance;

    fn window() -> Debounce {
        Debounce {
            min: Duration::from_millis(250),
            max: Duration::from_secs(2),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_event_is_due_after_min() {
        let mut d = Debouncer::new(window());
        d.hint(Instant::now());
        advance(Duration::from_millis(249)).await;
        assert!(d.take_due(Instant::now()).is_none());
        advance(Duration::from_millis(1)).await;
        assert!(d.take_due(Instant::now()).is_some());
        assert!(d.deadline().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_burst_renders_once_per_max() {
        let mut d = Debouncer::new(window());
        let mut renders = 0;
        // 200 events, one every 50 ms, for 10 s.
        for _ in 0..200 {
            d.hint(Instant::now());
            advance(Duration::from_millis(50)).await;
            if d.take_due(Instant::now()).is_some() {
                renders += 1;
            }
        }
        advance(Duration::from_millis(250)).await;
        if d.take_due(Instant::now()).is_some() {
            renders += 1;
        }
        assert_eq!(renders, 5, "one render per 2 s of a 10 s burst");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_gap_ends_the_batch_at_min() {
        let mut d = Debouncer::new(window());
        let start = Instant::now();
        d.hint(start);
        advance(Duration::from_millis(100)).await;
        d.hint(Instant::now());
        assert_eq!(d.deadline(), Some(start + Duration::from_millis(350)));
        let batch = d.take_due(start + Duration::from_millis(350)).expect("due");
        assert_eq!(batch.first, start);
    }
}
