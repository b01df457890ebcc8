//! `poll:`: registry polling for image updates, for networks a webhook cannot reach. Which
//! services are polled is decided by this section (`all`) and by each service's
//! `drover.poll` label; how often a registry may be asked, by `budget`.

use std::time::Duration;

use serde::Deserialize;

use super::check::{Problem, at_field, bounds};
use super::values::FullMatch;

/// Shortest and longest period between two checks of one image: a check is one request,
/// but a period of zero would make the loop a busy one.
pub const POLL_EVERY: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(24 * 3600));

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Poll {
    /// How often each polled image is checked, unless a service's label names a period.
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    /// Poll every service, not only those labelled `drover.poll` (services of stacks
    /// deployed from git, and those labelled `drover.poll=false` or `drover.update=false`,
    /// excepted).
    pub all: bool,
    /// Only images whose `registry/repo:tag` (normalised: `docker.io/library/nginx:1.27`)
    /// fully matches this regex are polled, labelled or not (default: every image).
    pub images: Option<FullMatch>,
    /// Manifest requests to one registry at most, spread evenly over the window.
    pub budget: Budget,
    /// Registry hosts spoken to over plain http besides loopback ones (`lab.internal:5000`).
    pub plain_http: Vec<String>,
    /// One registry request gives up after this long.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Poll {
    fn default() -> Self {
        Poll {
            every: Duration::from_secs(300),
            all: false,
            images: None,
            budget: Budget::default(),
            plain_http: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budget {
    pub requests: u32,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

impl Default for Budget {
    /// One request every 21.6 s per registry: Docker Hub does not count a `HEAD` against
    /// its pull limit (100 per 6 hours anonymous), and a check is one `HEAD`.
    fn default() -> Self {
        Budget {
            requests: 1000,
            per: Duration::from_secs(6 * 3600),
        }
    }
}

impl Budget {
    /// The least time between two requests to one registry.
    pub fn spacing(&self) -> Duration {
        self.per / self.requests.max(1)
    }
}

impl Poll {
    /// Every problem is looked for under `poll:` (`timeout:` and `every:` are common words).
    pub(super) fn validate(&self) -> Result<(), Problem> {
        self.check().map_err(|p| p.under("poll:"))
    }

    fn check(&self) -> Result<(), Problem> {
        bounds::duration("poll.every", self.every, POLL_EVERY.0, POLL_EVERY.1)
            .map_err(at_field("every"))?;
        bounds::duration(
            "poll.timeout",
            self.timeout,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )
        .map_err(at_field("timeout"))?;
        bounds::size(
            "poll.budget.requests",
            self.budget.requests as usize,
            1,
            bounds::RATE as usize,
        )
        .map_err(at_field("requests"))?;
        bounds::duration(
            "poll.budget.per",
            self.budget.per,
            Duration::from_secs(1),
            Duration::from_secs(7 * 24 * 3600),
        )
        .map_err(at_field("per"))?;
        for host in &self.plain_http {
            if !valid_host(host) {
                return Err(Problem::new(
                    format!("poll.plain_http: {host:?} is not a registry host[:port]"),
                    host.clone(),
                ));
            }
        }
        Ok(())
    }
}

/// A registry host as it appears in an image reference: `[a-z0-9.-]+` with an optional
/// `:port`.
fn valid_host(h: &str) -> bool {
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h, None),
    };
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// What a `drover.poll` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollLabel {
    /// `true`, `yes`, `on`, `1`: at `poll.every`.
    On,
    /// A period such as `5m` (within the bounds of `poll.every`).
    Every(Duration),
    /// `false`, `no`, `off`, `0`: never, even with `poll.all`.
    Off,
}

impl PollLabel {
    /// The label's meaning, or why it has none (the service is then not polled).
    pub fn parse(value: &str) -> Result<PollLabel, String> {
        let v = value.trim();
        let any = |words: &[&str]| words.iter().any(|w| v.eq_ignore_ascii_case(w));
        if any(&["true", "yes", "on", "1"]) {
            return Ok(PollLabel::On);
        }
        if any(&["false", "no", "off", "0"]) {
            return Ok(PollLabel::Off);
        }
        let d = humantime::parse_duration(v)
            .map_err(|_| format!("drover.poll {v:?} is neither true, false nor a period"))?;
        bounds::duration("drover.poll", d, POLL_EVERY.0, POLL_EVERY.1)?;
        Ok(PollLabel::Every(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_is_on_off_or_a_bounded_period() {
        assert_eq!(PollLabel::parse("true"), Ok(PollLabel::On));
        assert_eq!(PollLabel::parse(" Yes "), Ok(PollLabel::On));
        assert_eq!(PollLabel::parse("off"), Ok(PollLabel::Off));
        assert_eq!(PollLabel::parse("0"), Ok(PollLabel::Off));
        assert_eq!(
            PollLabel::parse("5m"),
            Ok(PollLabel::Every(Duration::from_secs(300)))
        );
        assert!(PollLabel::parse("1s").unwrap_err().contains("between"));
        assert!(PollLabel::parse("banana").is_err());
        assert!(PollLabel::parse("").is_err());
    }

    #[test]
    fn plain_hosts_are_host_and_optional_port() {
        assert!(valid_host("lab.internal:5000"));
        assert!(valid_host("10.0.0.2"));
        assert!(!valid_host("http://x"));
        assert!(!valid_host("x:0"));
        assert!(!valid_host("X.test"));
        assert!(!valid_host(""));
    }

    #[test]
    fn the_default_budget_spaces_requests_by_21_6_seconds() {
        assert_eq!(Budget::default().spacing(), Duration::from_millis(21_600));
    }
}
