//! When to renew, and when a name that failed is tried again.
//!
//! Renewal: at one third of the certificate's lifetime left (30 days before the end of a
//! 90-day certificate, 15 days of a 45-day one), or earlier when the CA's renewal
//! information (ARI, RFC 9773) offers a window that starts earlier — a CA that revokes
//! certificates moves the window into the past, which means now. Inside an ARI window the
//! point is chosen by a fraction the caller passes (random in the daemon, fixed in tests),
//! so several certificates renewed by one window spread out as the RFC asks.
//!
//! Failure: exponential backoff per name, one minute doubling to twelve hours; a success
//! clears it. One name's failures never delay another name.

use serde::{Deserialize, Serialize};

/// An ARI `suggestedWindow`, in unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalWindow {
    pub start: i64,
    pub end: i64,
}

/// When a certificate valid from `not_before` to `not_after` is due for renewal: one
/// third of its lifetime before `not_after`, or the point `fraction` (0.0 to 1.0) into the
/// CA's window when that is earlier. A window whose end is not after its start is ignored
/// (RFC 9773 asks clients to treat it as absent).
pub fn renew_at(
    not_before: i64,
    not_after: i64,
    window: Option<RenewalWindow>,
    fraction: f64,
) -> i64 {
    let lifetime = not_after.saturating_sub(not_before).max(0);
    let own = not_after.saturating_sub(lifetime / 3);
    match window.filter(|w| w.end > w.start) {
        Some(w) => {
            let f = if fraction.is_finite() {
                fraction.clamp(0.0, 1.0)
            } else {
                0.0
            };
            let point = w.start + ((w.end - w.start) as f64 * f) as i64;
            own.min(point)
        }
        None => own,
    }
}

/// When a certificate valid from `not_before` to `not_after` is due with `left` (0 to 1)
/// of its lifetime left: the operator's setting (`certificates.renew_when_left`).
pub fn renew_at_left(not_before: i64, not_after: i64, left: f64) -> i64 {
    let lifetime = not_after.saturating_sub(not_before).max(0);
    let left = if left.is_finite() {
        left.clamp(0.0, 1.0)
    } else {
        1.0 / 3.0
    };
    not_after.saturating_sub((lifetime as f64 * left) as i64)
}

/// Consecutive failures of one name (or name set) and when the last one happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    pub count: u32,
    /// Unix seconds of the last failure.
    pub last: i64,
}

impl Failures {
    /// The first delay after a failure.
    pub const START: i64 = 60;
    /// The longest delay: a name keeps being tried twice a day, whatever happened.
    pub const MAX: i64 = 12 * 3600;

    /// Counts a failure at `now`.
    pub fn failed(&mut self, now: i64) {
        self.count = self.count.saturating_add(1);
        self.last = now;
    }

    /// A success: the next failure starts over at [`Self::START`].
    pub fn succeeded(&mut self) {
        *self = Failures::default();
    }

    /// How long to wait after the last failure: 1 min, 2, 4, ... up to [`Self::MAX`].
    pub fn delay(&self) -> i64 {
        if self.count == 0 {
            return 0;
        }
        let doublings = (self.count - 1).min(30);
        Self::START
            .saturating_mul(1_i64 << doublings)
            .min(Self::MAX)
    }

    /// The earliest unix second the name may be tried again.
    pub fn retry_at(&self) -> i64 {
        if self.count == 0 {
            i64::MIN
        } else {
            self.last.saturating_add(self.delay())
        }
    }

    /// Whether the name may be tried at `now`.
    pub fn due(&self, now: i64) -> bool {
        now >= self.retry_at()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn the_operator_can_renew_earlier() {
        assert_eq!(
            renew_at_left(0, 90 * DAY, 1.0 / 3.0),
            renew_at(0, 90 * DAY, None, 0.0)
        );
        assert_eq!(renew_at_left(0, 100, 0.9), 10);
        assert_eq!(renew_at_left(0, 100, f64::NAN), 67);
    }

    #[test]
    fn a_certificate_is_renewed_with_a_third_of_its_lifetime_left() {
        assert_eq!(renew_at(0, 90 * DAY, None, 0.5), 60 * DAY);
        // Let's Encrypt's shorter lifetimes: 45 days renew at 30, 6 days at 4.
        assert_eq!(renew_at(10, 10 + 45 * DAY, None, 0.5), 10 + 30 * DAY);
        assert_eq!(renew_at(0, 6 * DAY, None, 0.5), 4 * DAY);
    }

    #[test]
    fn an_ari_window_earlier_than_a_third_moves_renewal_into_it() {
        let w = RenewalWindow {
            start: 40 * DAY,
            end: 42 * DAY,
        };
        assert_eq!(renew_at(0, 90 * DAY, Some(w), 0.0), 40 * DAY);
        assert_eq!(renew_at(0, 90 * DAY, Some(w), 0.5), 41 * DAY);
        assert_eq!(renew_at(0, 90 * DAY, Some(w), 1.0), 42 * DAY);
        // Out-of-range fractions stay in the window.
        assert_eq!(renew_at(0, 90 * DAY, Some(w), 7.0), 42 * DAY);
        assert_eq!(renew_at(0, 90 * DAY, Some(w), f64::NAN), 40 * DAY);
    }

    #[test]
    fn a_later_ari_window_never_delays_renewal_past_a_third() {
        let late = RenewalWindow {
            start: 70 * DAY,
            end: 75 * DAY,
        };
        assert_eq!(renew_at(0, 90 * DAY, Some(late), 0.5), 60 * DAY);
    }

    #[test]
    fn a_revocation_window_in_the_past_means_now_and_a_broken_window_is_ignored() {
        let past = RenewalWindow {
            start: 5 * DAY,
            end: 5 * DAY + 3600,
        };
        assert_eq!(renew_at(0, 90 * DAY, Some(past), 0.0), 5 * DAY);
        let broken = RenewalWindow {
            start: 10 * DAY,
            end: 10 * DAY,
        };
        assert_eq!(renew_at(0, 90 * DAY, Some(broken), 0.0), 60 * DAY);
    }

    #[test]
    fn failures_back_off_exponentially_to_twelve_hours_and_a_success_clears_them() {
        let mut f = Failures::default();
        assert!(f.due(0));
        let mut delays = Vec::new();
        for i in 0..12 {
            f.failed(1000 + i);
            delays.push(f.delay());
        }
        assert_eq!(
            delays,
            [
                60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 30720, 43200, 43200
            ]
        );
        assert!(!f.due(f.last + Failures::MAX - 1));
        assert!(f.due(f.last + Failures::MAX));
        for _ in 0..100 {
            f.failed(5000);
        }
        assert_eq!(f.delay(), Failures::MAX, "no overflow after many failures");
        f.succeeded();
        assert!(f.due(5001));
        f.failed(6000);
        assert_eq!(f.retry_at(), 6060);
    }
}
