//! The hub: follows the fleet repository and keeps the fleet's state.
//!
//! Landed so far: [`git`] (fetching the fleet repository with gix and reading a commit's files) and
//! [`store`] (the hub's durable state behind a trait, embedded in redb). The agent stream server, the
//! platform API and the binary come next (see ARCHITECTURE.md).

pub mod git;
pub mod server;
pub mod state;
pub mod store;
