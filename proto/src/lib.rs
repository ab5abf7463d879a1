//! Flotilla's wire protocol, generated at build time from `proto/flotilla/**.proto`.
//!
//! - [`agent::v1`]: the agent stream (`AgentService.Session`): Hello with applied digests, desired state,
//!   bundle chunks, status reports, heartbeats, acknowledgements.
//! - [`platform::v1`]: the operators' fleet view (`PlatformService`).
//!
//! Domain code converts to and from these types only at the gRPC edge.

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("flotilla.agent.v1");
    }
}

pub mod platform {
    pub mod v1 {
        tonic::include_proto!("flotilla.platform.v1");
    }
}

/// Largest bundle chunk the hub sends, in bytes (gRPC's default message limit is 4 MiB).
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;

/// A health or phase as a metric label: `HEALTH_DEGRADED` → `degraded` (an unknown number: `unspecified`).
pub fn health_label(health: i32) -> String {
    label(agent::v1::Health::try_from(health).unwrap_or_default().as_str_name(), "HEALTH_")
}

/// See [`health_label`]: `PHASE_APPLIED` → `applied`.
pub fn phase_label(phase: i32) -> String {
    label(agent::v1::Phase::try_from(phase).unwrap_or_default().as_str_name(), "PHASE_")
}

fn label(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}
