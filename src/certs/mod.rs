//! Certificates drover obtains itself (ACME, RFC 8555): the pure decisions first.
//!
//! The controller is the only ACME client (DESIGN.md item 13). What is here decides, from
//! hand-built data and a clock reading passed in, *when* to act: [`schedule`] says when a
//! certificate is due for renewal (one third of its lifetime left, earlier when the CA's
//! renewal information says so) and how long a name that failed waits before the next
//! try; [`ledger`] remembers what was ordered and what failed, and refuses an order that
//! would go past Let's Encrypt's limits, with a message saying why and until when.
//! Times are unix seconds from [`crate::clock`]; nothing here reads the clock itself.
//! [`acme`] is the conversation with the CA (instant-acme); [`seal`] encrypts what is kept
//! in Swarm config objects ([`store`]) with a key derived from the cluster key;
//! [`manager`] is the controller's loop, and [`exchange`] what it and the render loop tell
//! each other (tokens to serve, certificates to deliver, what is served, what is wanted).

pub mod acme;
pub mod exchange;
pub mod ledger;
pub mod manager;
pub mod schedule;
pub mod seal;
pub mod store;
pub mod x509;

pub use exchange::{Exchange, Pair, Published, Wanted};
pub use ledger::{Ledger, Refusal};
pub use schedule::{Failures, RenewalWindow, renew_at, renew_at_left};

/// A certificate's names as one key: lowercased, sorted, without duplicates (Let's
/// Encrypt counts certificates per *exact* set of names, in any order or case).
pub fn name_set<I, S>(names: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let set: std::collections::BTreeSet<String> = names
        .into_iter()
        .map(|n| n.as_ref().trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_set_ignores_order_case_and_repeats() {
        assert_eq!(
            name_set(["B.example.com", "a.example.com", "b.example.com "]),
            ["a.example.com", "b.example.com"]
        );
        assert_eq!(name_set(["x.com", "y.com"]), name_set(["Y.com", "x.com"]));
    }
}
