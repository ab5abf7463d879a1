//! Shared by Flotilla's hub, agent and CLI: the fleet repository model and its rendering, fleet identity and
//! TLS. It has no tonic or kube dependency; `tools` is its one module that runs processes (kustomize, helm).

pub mod drift;
pub mod fleet;
pub mod health;
pub mod identity;
pub mod process;
pub mod rollout;
pub mod selector;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod tools;
pub mod yaml;

pub use identity::{identity_of, FleetCa, Identity, IdentityError};

/// Selects rustls' aws-lc-rs crypto provider for the process. The workspace builds only that provider, so
/// rustls would pick it anyway; binaries call this first so that a dependency enabling a second provider
/// can never leave rustls unable to choose.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// An error with its causes: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
