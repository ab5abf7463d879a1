//! The agent of one cluster: [`session`] talks to the hub; [`engine`] keeps the cluster as the last desired
//! state says (order, pruning, health, drift), with its state kept in the cluster ([`state`]) and a
//! watch-driven view of what it manages ([`cache`]); [`apply`] talks to the API server; [`lease`] makes one
//! agent of several the active one; [`certs`] joins the fleet with a token and renews the agent's certificate.

pub mod apply;
pub mod cache;
pub mod certs;
pub mod engine;
pub mod kube_client;
pub mod lease;
pub mod session;
pub mod state;
pub mod telemetry;
