//! The vocabulary every area validates with: a [`Problem`] (the reason, and the text to
//! point at in the file), the bounds on durations and sizes, and the rule for names.
//!
//! A leaf: it knows no area, so each area can use it without the areas knowing each other.

/// The first thing wrong with a config: why, and a piece of the file's text to look for so
/// the error can name its line (`Config::parse` falls back to the file alone).
#[derive(Debug)]
pub struct Problem {
    pub reason: String,
    /// Searched for line by line; the first line that contains it is reported.
    pub near: String,
    /// Searched from the first line that starts with this (a top-level section such as
    /// `poll:`), when set: a field name other sections use too is found in its own.
    pub section: Option<&'static str>,
}

impl Problem {
    pub fn new(reason: impl Into<String>, near: impl Into<String>) -> Problem {
        Problem {
            reason: reason.into(),
            near: near.into(),
            section: None,
        }
    }

    /// The same problem, looked for under the top-level `section`.
    pub fn under(self, section: &'static str) -> Problem {
        Problem {
            section: Some(section),
            ..self
        }
    }
}

/// A field's error found near the line `field:`.
pub fn at_field(field: &'static str) -> impl Fn(String) -> Problem {
    move |reason| Problem::new(reason, format!("{field}:"))
}

/// Bounds on every duration and size, so `check` refuses what `run` would choke on: a
/// duration added to an `Instant` must not overflow (that aborts the daemon), a period of
/// zero must not turn a loop into a busy one, and no size may let one request or one
/// queue take the memory of a small node.
pub mod bounds {
    use std::time::Duration;

    pub const RESYNC: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(24 * 3600));
    pub const DEBOUNCE: Duration = Duration::from_secs(3600);
    pub const QUIET: Duration = Duration::from_secs(24 * 3600);
    pub const REPLAY_WINDOW: Duration = Duration::from_secs(24 * 3600);
    pub const REQUEST_TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(3600));
    pub const UPDATE_TIMEOUT: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(7 * 24 * 3600));
    pub const MAX_BODY: usize = 64 * 1024 * 1024;
    pub const QUEUE: usize = 100_000;
    pub const HISTORY: usize = 100_000;
    pub const RATE: u32 = 1_000_000;

    /// `value` within `min..=max`, or why not, in the config's own duration syntax.
    pub fn duration(
        field: &str,
        value: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<(), String> {
        if value < min || value > max {
            return Err(format!(
                "{field} must be between {} and {} (got {})",
                humantime::format_duration(min),
                humantime::format_duration(max),
                humantime::format_duration(value)
            ));
        }
        Ok(())
    }

    pub fn size(field: &str, value: usize, min: usize, max: usize) -> Result<(), String> {
        if value < min || value > max {
            return Err(format!(
                "{field} must be between {min} and {max} (got {value})"
            ));
        }
        Ok(())
    }
}

/// Target and hook names appear in logs, metrics labels and URLs: `[A-Za-z0-9_-]+`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
