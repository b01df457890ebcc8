//! The rollout library: `image` parses references, `pin` edits specs, `follow` runs and
//! watches one rollout. Used by the job runner (`jobs::runner`) and by `apply`'s
//! `restart` step; it knows nothing of jobs.
//!
//! Invariants: a spec change goes through `docker::Engine::edit_service` (raw JSON,
//! nothing lost, retried when out of sequence, under the service's lock) and keeps
//! everything but the image (or `ForceUpdate`); the outcome is what Swarm reports in
//! `UpdateStatus` for *our* update, and drover never asks for a rollback itself.

mod follow;
mod image;
mod pin;

pub use follow::{Change, End, Rolled, follow_started, roll};
pub use image::{ImageRef, InvalidImage, normalise_registry, without_digest};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidImage(#[from] InvalidImage),
    #[error("cannot read the password of registry {address}: {source}")]
    Secret {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Label that opts a service out of webhook updates (see [`opted_out`]).
pub const OPT_OUT_LABEL: &str = "drover.update";

/// Whether a value of [`OPT_OUT_LABEL`] says no: `false`, `no`, `off` or `0`, in any case,
/// surrounding spaces ignored (stack files quote booleans every which way).
pub fn opted_out(value: &str) -> bool {
    let v = value.trim();
    ["false", "no", "off", "0"]
        .iter()
        .any(|no| v.eq_ignore_ascii_case(no))
}

#[cfg(test)]
mod opt_out_tests {
    #[test]
    fn every_spelling_of_no_opts_out_and_nothing_else_does() {
        for v in ["false", "False", "FALSE", "no", "No", "0", "off", " false "] {
            assert!(super::opted_out(v), "{v:?}");
        }
        for v in ["true", "yes", "1", "", "nope", "f"] {
            assert!(!super::opted_out(v), "{v:?}");
        }
    }
}
