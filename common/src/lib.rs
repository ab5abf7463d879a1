//! Shared by Flotilla's hub, agent and CLI: fleet identity and TLS.
//!
//! Domain types (cluster identity, revisions, bundle digests, health and drift) join this crate as the hub
//! and agent land; it has no tonic or kube dependency.

pub mod fleet;
pub mod identity;
pub mod selector;

pub use identity::{identity_of, FleetCa, Identity, IdentityError};
