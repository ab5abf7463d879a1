//! The agent: one per cluster. It dials the hub (so clusters behind NAT work and the hub holds no cluster
//! credentials), applies its cluster's desired state with server-side apply, and reports per app the digest
//! and revision applied, object counts and any error.

pub mod apply;
pub mod session;
