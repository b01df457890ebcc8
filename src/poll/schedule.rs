//! When each image is checked: every image at its period, and no registry asked more often
//! than the budget allows (`poll.budget`: its requests spread evenly over its window), nor
//! than the registry itself says is left (`ratelimit-remaining`). Pure: time is passed in.
//!
//! Spreading follows from the pacing: images that fall due together are checked one
//! spacing apart, and keep those offsets. When the images of one registry need more
//! requests than its budget, each is checked less often than its period (never more).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Budget;
use crate::registry::RateLimit;

/// A registry that says nothing is left, without saying its window, is not asked again for
/// this long.
pub const HOLD: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Slot {
    registry: String,
    every: Duration,
    next: Instant,
}

#[derive(Debug)]
struct Pacer {
    /// The registry may be asked again from then.
    free_at: Instant,
    /// The spacing the registry's own header asks for (its window over what is left).
    observed: Option<Duration>,
}

#[derive(Debug)]
pub struct Schedule {
    spacing: Duration,
    images: BTreeMap<String, Slot>,
    pacers: HashMap<String, Pacer>,
}

impl Schedule {
    pub fn new(budget: Budget) -> Schedule {
        Schedule {
            spacing: budget.spacing(),
            images: BTreeMap::new(),
            pacers: HashMap::new(),
        }
    }

    /// The images wanted now, as (key, registry, period): new ones are due at once, gone
    /// ones are forgotten, and a changed period counts from the next check.
    pub fn retarget<'a>(
        &mut self,
        wanted: impl IntoIterator<Item = (&'a str, &'a str, Duration)>,
        now: Instant,
    ) {
        let mut kept = BTreeMap::new();
        for (key, registry, every) in wanted {
            let slot = match self.images.remove(key) {
                Some(mut s) => {
                    // A shorter period is not waited out at the longer one.
                    if every < s.every {
                        s.next = s.next.min(now + every);
                    }
                    s.every = every;
                    s
                }
                None => Slot {
                    registry: registry.to_owned(),
                    every,
                    next: now,
                },
            };
            kept.insert(key.to_owned(), slot);
        }
        self.images = kept;
        let images = &self.images;
        self.pacers
            .retain(|r, p| p.free_at > now || images.values().any(|s| &s.registry == r));
    }

    fn free_at(&self, registry: &str) -> Option<Instant> {
        self.pacers.get(registry).map(|p| p.free_at)
    }

    /// The image to check now, if any: the longest overdue whose registry may be asked.
    /// It is due again one period from now, and its registry's first request is spent.
    pub fn next_due(&mut self, now: Instant) -> Option<String> {
        let key = self
            .images
            .iter()
            .filter(|(_, s)| s.next <= now && self.free_at(&s.registry).is_none_or(|f| f <= now))
            .min_by_key(|(_, s)| s.next)
            .map(|(k, _)| k.clone())?;
        let slot = self.images.get_mut(&key)?;
        slot.next = now + slot.every;
        let registry = slot.registry.clone();
        self.spend(&registry, 1, now);
        Some(key)
    }

    /// `n` requests made to `registry` now.
    pub fn spend(&mut self, registry: &str, n: u32, now: Instant) {
        let spacing = self.spacing;
        let p = self.pacers.entry(registry.to_owned()).or_insert(Pacer {
            free_at: now,
            observed: None,
        });
        let step = p.observed.map_or(spacing, |o| o.max(spacing));
        p.free_at = p.free_at.max(now) + step * n;
    }

    /// What the registry said is left: nothing left holds it for its window (or [`HOLD`]);
    /// otherwise the rest of the window is spread over what is left.
    pub fn observe(&mut self, registry: &str, rate: RateLimit, now: Instant) {
        let p = self.pacers.entry(registry.to_owned()).or_insert(Pacer {
            free_at: now,
            observed: None,
        });
        if rate.remaining == 0 {
            p.free_at = p.free_at.max(now + rate.window.unwrap_or(HOLD));
            p.observed = None;
        } else {
            p.observed = rate
                .window
                .map(|w| w / u32::try_from(rate.remaining).unwrap_or(u32::MAX));
        }
    }

    /// A registry that refused for its rate (429): not asked again for [`HOLD`].
    pub fn hold(&mut self, registry: &str, now: Instant) {
        self.observe(
            registry,
            RateLimit {
                remaining: 0,
                window: None,
            },
            now,
        );
    }

    /// When the next check can happen; `None` with nothing to poll.
    pub fn wake_at(&self) -> Option<Instant> {
        self.images
            .values()
            .map(|s| self.free_at(&s.registry).map_or(s.next, |f| f.max(s.next)))
            .min()
    }

    /// When `key` is checked next, as far as its period and its registry's pace say.
    pub fn next_check(&self, key: &str) -> Option<Instant> {
        let s = self.images.get(key)?;
        Some(self.free_at(&s.registry).map_or(s.next, |f| f.max(s.next)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn budget(requests: u32, per: Duration) -> Budget {
        Budget { requests, per }
    }

    /// Runs the schedule for `span`, second by second; the checks made, as (second, key).
    fn run(s: &mut Schedule, t0: Instant, span: Duration) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for sec in 0..span.as_secs() {
            let now = t0 + Duration::from_secs(sec);
            while let Some(k) = s.next_due(now) {
                out.push((sec, k));
            }
        }
        out
    }

    #[test]
    fn new_images_fall_due_at_once_but_one_registry_is_asked_a_spacing_apart() {
        let t0 = Instant::now();
        let mut s = Schedule::new(budget(6, MIN)); // one request every 10 s
        s.retarget([("a", "r1", MIN), ("b", "r1", MIN), ("c", "r2", MIN)], t0);
        let checks = run(&mut s, t0, Duration::from_secs(25));
        assert_eq!(checks, [(0, "a".into()), (0, "c".into()), (10, "b".into())]);
    }

    #[test]
    fn each_image_is_checked_once_per_period_when_the_budget_allows() {
        let t0 = Instant::now();
        let mut s = Schedule::new(budget(1000, 6 * 60 * MIN));
        s.retarget([("a", "r", MIN), ("b", "r", 2 * MIN)], t0);
        let checks = run(&mut s, t0, 10 * MIN);
        let count = |k: &str| checks.iter().filter(|(_, c)| c == k).count();
        assert_eq!(count("a"), 10);
        assert_eq!(count("b"), 5);
    }

    #[test]
    fn a_registry_is_never_asked_more_than_its_budget_and_periods_stretch_instead() {
        let t0 = Instant::now();
        let mut s = Schedule::new(budget(100, 6 * 60 * MIN)); // one per 216 s
        let keys: Vec<String> = (0..20).map(|i| format!("img{i}")).collect();
        s.retarget(keys.iter().map(|k| (k.as_str(), "docker.io", 5 * MIN)), t0);
        let checks = run(&mut s, t0, 6 * 60 * MIN);
        assert!(checks.len() <= 100, "{} requests in 6 h", checks.len());
        assert!(checks.len() >= 99, "the budget is used: {}", checks.len());
        for w in checks.windows(2) {
            assert!(w[1].0 - w[0].0 >= 216, "{w:?}");
        }
        for k in &keys {
            assert!(
                checks.iter().filter(|(_, c)| c == k).count() >= 4,
                "{k} starved"
            );
        }
    }

    #[test]
    fn the_registrys_own_header_slows_it_down_and_nothing_left_holds_it() {
        let t0 = Instant::now();
        let mut s = Schedule::new(budget(1000, 60 * MIN));
        s.retarget([("a", "hub", MIN)], t0);
        assert_eq!(s.next_due(t0).as_deref(), Some("a"));
        s.observe(
            "hub",
            RateLimit {
                remaining: 10,
                window: Some(20 * MIN),
            },
            t0,
        );
        // The request already spent keeps its spacing; from then on, 2 min apart.
        let checks = run(&mut s, t0 + Duration::from_secs(1), 10 * MIN);
        assert_eq!(checks.len(), 5, "{checks:?}");
        let t1 = t0 + 11 * MIN;
        s.observe(
            "hub",
            RateLimit {
                remaining: 0,
                window: None,
            },
            t1,
        );
        assert!(s.next_check("a").expect("known") >= t1 + HOLD);
        assert!(run(&mut s, t1, HOLD - Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn a_shorter_period_applies_at_once_and_gone_images_are_forgotten() {
        let t0 = Instant::now();
        let mut s = Schedule::new(budget(1_000_000, MIN));
        s.retarget([("a", "r", 60 * MIN)], t0);
        assert!(s.next_due(t0).is_some());
        s.retarget(
            [("a", "r", MIN), ("b", "r", MIN)],
            t0 + Duration::from_secs(1),
        );
        assert_eq!(s.next_check("a"), Some(t0 + Duration::from_secs(61)));
        s.retarget([("b", "r", MIN)], t0 + Duration::from_secs(2));
        assert_eq!(s.next_check("a"), None);
        assert!(s.wake_at().is_some());
        s.retarget([], t0 + Duration::from_secs(3));
        assert_eq!(s.wake_at(), None);
    }
}
