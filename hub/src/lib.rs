//! The hub: follows the fleet repository, renders each cluster's desired state, keeps the fleet's state
//! durable, and serves agents, operators and Git webhooks.
//!
//! [`git`] fetches the fleet repository with gix (credentials, SSH keys) and reads a commit's files;
//! [`state`] advances each cluster's desired state from a commit's renders (pure); [`store`] keeps the
//! hub's durable state behind a trait (embedded redb); [`server`] is the running hub (follow loop, agent
//! sessions, platform API); [`webhook`] turns GitHub and GitLab push events into immediate fetches.

pub mod git;
pub mod rollouts;
pub mod server;
pub mod state;
pub mod store;
pub mod webhook;
