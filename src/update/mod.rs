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

/// Label that opts a service out of webhook updates.
pub const OPT_OUT_LABEL: &str = "drover.update";
