//! Stacks from git (DESIGN.md 12): a stack repository is a desired state. A push hook, a
//! poll of the branch head and a manual sync are hints that the branch moved; each
//! becomes a `SyncStacks`/`SyncStack` job, and this module carries it out: one deploy at
//! a time per stack, the newest request wins (an older one still waiting is superseded,
//! and every deploy looks the branch head up when it starts, so nothing newer is lost and
//! nothing older is deployed after it), independent stacks side by side.
//!
//! The deploy itself runs in a one-off container of the deploy image
//! ([`deployer`], `drover stack-deploy`): `docker stack deploy` is the reference
//! conversion of a compose file, never a second one here. Files are renamed by content
//! ([`compose`]) so Swarm's immutable configs and secrets rotate.

mod archive;
pub mod compose;
pub mod deployer;
pub mod poll;
pub mod record;
pub mod refs;
pub mod runner;

pub use poll::{POLL_HOOK, SYNC_HOOK};
pub use runner::{StackRunner, StackState};
