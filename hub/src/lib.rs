//! The hub: follows the fleet repository, renders each cluster's desired state, keeps the fleet's state
//! durable, and serves agents, operators and Git webhooks.
//!
//! [`git`] fetches the fleet repository with gix (credentials, SSH keys) and reads a commit's files;
//! [`state`] advances each cluster's desired state from a commit's renders and [`rollouts`] gates it through
//! waves (both pure); [`machine`] is the hub as one state machine (pure transitions, [`keys`] the store's key
//! schema, [`report`] the bounds of agents' reports); [`hub`] runs it: one writer commits every transition to
//! the [`store`] (embedded redb) and publishes immutable snapshots; [`sessions`] serves agents, [`platform`]
//! operators, [`server`] the process around them; [`webhook`] turns GitHub and GitLab push events into
//! immediate fetches; [`access`] (roles, pure), [`identities`] (roles and revocations in force) and [`audit`]
//! decide and record who may do what; [`metrics`] and [`traces`] say what it does (Prometheus, OpenTelemetry).

pub mod access;
pub mod audit;
pub mod bootstrap;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod forward;
pub mod git;
pub mod hub;
pub mod identities;
pub mod join;
pub mod keys;
#[cfg(feature = "etcd")]
pub mod leader;
pub mod limits;
pub mod machine;
pub mod metrics;
#[cfg(feature = "etcd")]
pub mod mirror;
pub mod platform;
pub mod report;
pub mod rollouts;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
pub mod tls;
pub mod traces;
pub mod webhook;
