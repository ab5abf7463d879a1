//! TLS like a real API server's: a CA the simulator generates at start, one server certificate for every
//! cluster (`*.flotilla-sim.internal`, `localhost` and the listen address), ALPN `h2` and `http/1.1`.
//!
//! A cluster is chosen by the name the client sends in SNI: `<cluster>.flotilla-sim.internal` (kubeconfigs
//! carry it as `tls-server-name`), so every cluster is served at the root of its own base URL on one shared
//! port, and each client's requests and watches share one HTTP/2 connection.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The DNS suffix of every cluster's server name.
pub const DOMAIN: &str = "flotilla-sim.internal";

/// The server name a client sends to reach `cluster`.
pub fn server_name(cluster: &str) -> String {
    format!("{cluster}.{DOMAIN}")
}

/// The cluster an SNI name selects (`None` for the bare address, `localhost` or another name).
pub fn cluster_of(sni: &str) -> Option<&str> {
    sni.strip_suffix(DOMAIN).and_then(|s| s.strip_suffix('.')).filter(|s| !s.is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the simulator's certificates failed")]
    Generate(#[from] rcgen::Error),
    #[error("loading the simulator's certificate into TLS failed")]
    Rustls(#[from] rustls::Error),
}

/// The simulator's CA and its server-side TLS configuration.
pub struct SimTls {
    pub ca_pem: String,
    pub config: Arc<rustls::ServerConfig>,
}

struct Resolver {
    shared: Arc<CertifiedKey>,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates for cluster names with dots, which a one-label wildcard does not cover.
    dotted: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

fn leaf(issuer: &Issuer<'static, KeyPair>, names: Vec<String>, ips: &[IpAddr]) -> Result<CertifiedKey, TlsError> {
    let mut params = CertificateParams::new(names)?;
    for ip in ips {
        params.subject_alt_names.push(rcgen::SanType::IpAddress(*ip));
    }
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "flotilla-sim");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)?;
    Ok(CertifiedKey::new(vec![CertificateDer::from(cert.der().to_vec())], signer))
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().and_then(cluster_of).filter(|n| n.contains('.')) else {
            return Some(self.shared.clone());
        };
        let mut dotted = self.dotted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = dotted.get(name) {
            return Some(k.clone());
        }
        let k = Arc::new(leaf(&self.issuer, vec![server_name(name)], &[]).ok()?);
        dotted.insert(name.to_string(), k.clone());
        Some(k)
    }
}

impl SimTls {
    /// A new CA and a server certificate for every cluster name and for `listen_ip`.
    pub fn generate(listen_ip: IpAddr) -> Result<SimTls, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "flotilla-sim CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate()?;
        let ca = params.self_signed(&ca_key)?;
        let issuer = Issuer::new(params, ca_key);
        let mut ips = vec![IpAddr::from([127, 0, 0, 1])];
        if !listen_ip.is_unspecified() && !ips.contains(&listen_ip) {
            ips.push(listen_ip);
        }
        let shared =
            Arc::new(leaf(&issuer, vec![format!("*.{DOMAIN}"), DOMAIN.to_string(), "localhost".to_string()], &ips)?);
        let resolver = Resolver { shared, issuer, dotted: Mutex::new(HashMap::new()) };
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(SimTls { ca_pem: ca.pem(), config: Arc::new(config) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_come_from_sni() {
        assert_eq!(cluster_of("eu-1.flotilla-sim.internal"), Some("eu-1"));
        assert_eq!(cluster_of("a.b.flotilla-sim.internal"), Some("a.b"));
        assert_eq!(cluster_of("flotilla-sim.internal"), None);
        assert_eq!(cluster_of(".flotilla-sim.internal"), None);
        assert_eq!(cluster_of("localhost"), None);
        assert_eq!(cluster_of("evilflotilla-sim.internal"), None);
        assert_eq!(cluster_of(&server_name("sim-0001")), Some("sim-0001"));
    }
}
