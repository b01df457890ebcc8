//! A local record of orders, certificates and failed validations, that refuses an order
//! which would go past the CA's limits.
//!
//! Let's Encrypt's limits (2025) are counted by the CA; going past them locks a name out
//! for up to a week, and a daemon that retries in a loop gets there fast. The ledger counts
//! the same things first and refuses with a message that says which limit, how many, and
//! from when an order is possible again: 5 certificates per exact set of names per 7 days,
//! 5 failed validations per name per hour, 300 new orders per account per 3 hours. It is
//! serializable, so it survives a restart and a leader change with the account and
//! certificates it counts. Entries older than their window are pruned as they age out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How many of one thing the CA allows within a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub count: usize,
    /// Seconds.
    pub window: i64,
}

/// The CA's limits the ledger enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub per_name_set: Limit,
    pub failures_per_name: Limit,
    pub orders_per_account: Limit,
}

impl Limits {
    /// Let's Encrypt's production limits.
    pub const LETS_ENCRYPT: Limits = Limits {
        per_name_set: Limit {
            count: 5,
            window: 7 * 86_400,
        },
        failures_per_name: Limit {
            count: 5,
            window: 3600,
        },
        orders_per_account: Limit {
            count: 300,
            window: 3 * 3600,
        },
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::LETS_ENCRYPT
    }
}

/// Why an order is refused, and the unix second from which it would not be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{count} certificates for exactly [{names}] in the last {days} days (the CA allows {count}); not ordered before unix time {until}"
    )]
    NameSet {
        names: String,
        count: usize,
        days: i64,
        until: i64,
    },
    #[error(
        "{count} failed validations of {name} in the last {minutes} minutes (the CA allows {count}); not tried before unix time {until}"
    )]
    Failures {
        name: String,
        count: usize,
        minutes: i64,
        until: i64,
    },
    #[error(
        "{count} new orders by this account in the last {hours} hours (the CA allows {count}); not ordered before unix time {until}"
    )]
    Orders {
        count: usize,
        hours: i64,
        until: i64,
    },
}

impl Refusal {
    /// The unix second from which the refused order would be allowed.
    pub fn until(&self) -> i64 {
        match self {
            Refusal::NameSet { until, .. }
            | Refusal::Failures { until, .. }
            | Refusal::Orders { until, .. } => *until,
        }
    }
}

/// What was ordered, issued and failed, in unix seconds, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Certificates issued per name set (names joined by `,`, from [`super::name_set`]).
    #[serde(default)]
    issued: BTreeMap<String, Vec<i64>>,
    /// Failed validations per name.
    #[serde(default)]
    failures: BTreeMap<String, Vec<i64>>,
    /// New orders by the account.
    #[serde(default)]
    orders: Vec<i64>,
}

fn key(names: &[String]) -> String {
    super::name_set(names).join(",")
}

/// `Err(until)` when `times` already holds `limit.count` entries within the window
/// ending at `now`; `until` is when the oldest of those leaves the window.
fn room(times: &[i64], limit: Limit, now: i64) -> Result<(), i64> {
    let recent: Vec<i64> = times
        .iter()
        .copied()
        .filter(|t| *t > now - limit.window)
        .collect();
    if recent.len() < limit.count {
        return Ok(());
    }
    // The entry whose leaving makes room for one more.
    let oldest_that_counts = recent[recent.len() - limit.count];
    Err(oldest_that_counts + limit.window)
}

impl Ledger {
    /// Whether an order for `names` may be placed at `now` under `limits`.
    pub fn check(&self, names: &[String], now: i64, limits: &Limits) -> Result<(), Refusal> {
        let set = key(names);
        if let Some(times) = self.issued.get(&set) {
            room(times, limits.per_name_set, now).map_err(|until| Refusal::NameSet {
                names: set.clone(),
                count: limits.per_name_set.count,
                days: limits.per_name_set.window / 86_400,
                until,
            })?;
        }
        for name in super::name_set(names) {
            if let Some(times) = self.failures.get(&name) {
                room(times, limits.failures_per_name, now).map_err(|until| Refusal::Failures {
                    name: name.clone(),
                    count: limits.failures_per_name.count,
                    minutes: limits.failures_per_name.window / 60,
                    until,
                })?;
            }
        }
        room(&self.orders, limits.orders_per_account, now).map_err(|until| Refusal::Orders {
            count: limits.orders_per_account.count,
            hours: limits.orders_per_account.window / 3600,
            until,
        })
    }

    /// A new order was placed at `now`.
    pub fn ordered(&mut self, now: i64) {
        self.orders.push(now);
    }

    /// A certificate for `names` was issued at `now`.
    pub fn issued(&mut self, names: &[String], now: i64) {
        self.issued.entry(key(names)).or_default().push(now);
    }

    /// A validation of `name` failed at `now`.
    pub fn failed(&mut self, name: &str, now: i64) {
        self.failures
            .entry(name.trim().to_ascii_lowercase())
            .or_default()
            .push(now);
    }

    /// Forgets entries no limit counts any more at `now`.
    pub fn prune(&mut self, now: i64, limits: &Limits) {
        let keep = |times: &mut Vec<i64>, window: i64| times.retain(|t| *t > now - window);
        for times in self.issued.values_mut() {
            keep(times, limits.per_name_set.window);
        }
        self.issued.retain(|_, t| !t.is_empty());
        for times in self.failures.values_mut() {
            keep(times, limits.failures_per_name.window);
        }
        self.failures.retain(|_, t| !t.is_empty());
        keep(&mut self.orders, limits.orders_per_account.window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_sixth_certificate_for_one_name_set_within_a_week_is_refused_with_its_date() {
        let limits = Limits::default();
        let mut l = Ledger::default();
        let set = names(&["b.example.com", "a.example.com"]);
        for day in 0..5 {
            assert_eq!(l.check(&set, day * DAY, &limits), Ok(()));
            l.ordered(day * DAY);
            l.issued(&set, day * DAY);
        }
        let refused = l
            .check(
                &names(&["A.example.com", "b.example.com"]),
                5 * DAY,
                &limits,
            )
            .expect_err("a sixth certificate in the week");
        // The first of the five leaves the window 7 days after it was issued.
        assert_eq!(refused.until(), 7 * DAY);
        let msg = refused.to_string();
        assert!(
            msg.contains(
                "5 certificates for exactly [a.example.com,b.example.com] in the last 7 days"
            ),
            "{msg}"
        );
        // Another set of names is not affected; the same set is allowed again a week on.
        assert_eq!(
            l.check(&names(&["a.example.com"]), 5 * DAY, &limits),
            Ok(())
        );
        assert_eq!(l.check(&set, 7 * DAY, &limits), Ok(()));
    }

    #[test]
    fn five_failed_validations_of_a_name_within_an_hour_stop_orders_with_that_name() {
        let limits = Limits::default();
        let mut l = Ledger::default();
        for m in 0..5 {
            l.failed("bad.example.com", m * 60);
        }
        let both = names(&["ok.example.com", "bad.example.com"]);
        let refused = l.check(&both, 300, &limits).expect_err("refused");
        assert!(matches!(refused, Refusal::Failures { ref name, .. } if name == "bad.example.com"));
        assert_eq!(refused.until(), 3600);
        assert_eq!(l.check(&names(&["ok.example.com"]), 300, &limits), Ok(()));
        assert_eq!(l.check(&both, 3600, &limits), Ok(()));
    }

    #[test]
    fn the_account_s_order_limit_is_counted_over_three_hours() {
        let limits = Limits {
            orders_per_account: Limit {
                count: 3,
                window: 3 * 3600,
            },
            ..Limits::default()
        };
        let mut l = Ledger::default();
        for t in [0, 10, 20] {
            l.ordered(t);
        }
        let refused = l
            .check(&names(&["x.com"]), 30, &limits)
            .expect_err("refused");
        assert_eq!(refused.until(), 3 * 3600);
        assert_eq!(l.check(&names(&["x.com"]), 3 * 3600 + 1, &limits), Ok(()));
    }

    #[test]
    fn pruning_forgets_only_what_no_window_counts_and_the_ledger_survives_serde() {
        let limits = Limits::default();
        let mut l = Ledger::default();
        let set = names(&["a.com"]);
        l.issued(&set, 0);
        l.issued(&set, 6 * DAY);
        l.failed("a.com", 6 * DAY);
        l.ordered(6 * DAY);
        l.prune(7 * DAY, &limits);
        let text = serde_json::to_string(&l).expect("serialize");
        let back: Ledger = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, l);
        assert_eq!(back.issued.get("a.com").map(Vec::len), Some(1));
        assert!(back.failures.is_empty());
        assert!(back.orders.is_empty());
        // An empty or older record reads as an empty ledger.
        assert_eq!(
            serde_json::from_str::<Ledger>("{}").expect("empty"),
            Ledger::default()
        );
    }
}
