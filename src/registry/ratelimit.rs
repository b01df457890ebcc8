//! Docker Hub's rate-limit headers: `ratelimit-limit: 100;w=21600` and
//! `ratelimit-remaining: 76;w=21600` (requests, and the window in seconds). Pure.

use std::time::Duration;

/// What a registry said is left of its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub remaining: u64,
    /// The window the limit counts over (`w=`), when given.
    pub window: Option<Duration>,
}

impl RateLimit {
    /// From a `ratelimit-remaining` value; `None` when it is not a number (a registry's
    /// header is outside input: a bad one is ignored, never trusted).
    pub fn parse(value: &str) -> Option<RateLimit> {
        let mut parts = value.split(';');
        let remaining = parts.next()?.trim().parse().ok()?;
        let window = parts
            .filter_map(|p| p.trim().strip_prefix("w="))
            .find_map(|w| w.trim().parse::<u64>().ok())
            .filter(|w| *w > 0)
            .map(Duration::from_secs);
        Some(RateLimit { remaining, window })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hubs_header_gives_the_count_and_the_window() {
        assert_eq!(
            RateLimit::parse("76;w=21600"),
            Some(RateLimit {
                remaining: 76,
                window: Some(Duration::from_secs(21600))
            })
        );
        assert_eq!(
            RateLimit::parse(" 0 ; w=60 "),
            Some(RateLimit {
                remaining: 0,
                window: Some(Duration::from_secs(60))
            })
        );
    }

    #[test]
    fn a_count_without_window_is_read_and_garbage_is_ignored() {
        assert_eq!(
            RateLimit::parse("5"),
            Some(RateLimit {
                remaining: 5,
                window: None
            })
        );
        assert_eq!(RateLimit::parse("5;w=abc").map(|r| r.window), Some(None));
        assert_eq!(RateLimit::parse("-1;w=60"), None);
        assert_eq!(RateLimit::parse("many"), None);
        assert_eq!(RateLimit::parse(""), None);
    }
}
