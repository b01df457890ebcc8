//! The one wall clock: unix time as every timestamp drover writes or compares (status
//! page, agent and webhook timestamps, job records). A clock before 1970 reads as 1970,
//! so every timestamp compared against it is stale rather than a panic.
//!
//! Intervals and deadlines use `tokio::time::Instant`, never this clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Unix seconds now.
pub fn unix_secs() -> i64 {
    i64::try_from(since_epoch().as_secs()).unwrap_or(i64::MAX)
}

/// Unix milliseconds now.
pub fn unix_millis() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

/// Unix nanoseconds now: unique-enough ids and jitter, not time.
pub fn unix_nanos() -> u128 {
    since_epoch().as_nanos()
}
