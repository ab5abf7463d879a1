//! Fleet identity: a fleet CA issues certificates whose subject alternative name is a URI naming who holds
//! them (`flotilla://cluster/<name>`, `flotilla://operator/<name>`, `flotilla://hub`). The hub trusts only
//! its fleet CA and takes an agent's cluster name from its certificate, never from a message.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SCHEME: &str = "flotilla://";

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// The agent of one cluster.
    Cluster(String),
    /// A person or automation using the platform API.
    Operator(String),
    /// The hub's server certificate.
    Hub,
}

impl Identity {
    pub fn uri(&self) -> String {
        match self {
            Identity::Cluster(n) => format!("{SCHEME}cluster/{n}"),
            Identity::Operator(n) => format!("{SCHEME}operator/{n}"),
            Identity::Hub => format!("{SCHEME}hub"),
        }
    }

    pub fn parse_uri(s: &str) -> Option<Identity> {
        let rest = s.strip_prefix(SCHEME)?;
        if rest == "hub" {
            return Some(Identity::Hub);
        }
        let (kind, name) = rest.split_once('/')?;
        if !valid_name(name) {
            return None;
        }
        match kind {
            "cluster" => Some(Identity::Cluster(name.to_string())),
            "operator" => Some(Identity::Operator(name.to_string())),
            _ => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Cluster(n) => write!(f, "cluster {n}"),
            Identity::Operator(n) => write!(f, "operator {n}"),
            Identity::Hub => write!(f, "hub"),
        }
    }
}

/// Cluster and operator names: lowercase letters, digits, '-' and '.', 1 to 63 characters, starting and
/// ending with a letter or digit (they become file names and Kubernetes label values).
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && n.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && n.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("generating a certificate failed")]
    GenerateFailed(#[source] rcgen::Error),
    #[error("the fleet CA certificate or key is not usable")]
    InvalidCa(#[source] rcgen::Error),
    #[error("invalid name {0:?}: use 1 to 63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit")]
    InvalidName(String),
    #[error("the certificate cannot be parsed: {0}")]
    UnparsableCertificate(String),
    #[error("the certificate carries no Flotilla identity (a SAN URI flotilla://cluster/NAME, flotilla://operator/NAME or flotilla://hub)")]
    NoIdentity,
    #[error("the certificate carries more than one Flotilla identity")]
    AmbiguousIdentity,
    #[error("the certificate signing request cannot be used: {0}")]
    BadRequest(String),
    #[error("the CA key is not the key of the first certificate in the CA file")]
    KeyMismatch,
    #[error("writing {path} failed")]
    WriteFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path} failed")]
    ReadFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The fleet's certificate authority.
pub struct FleetCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl FleetCa {
    /// A new CA for the fleet `fleet`.
    pub fn generate(fleet: &str) -> Result<FleetCa, IdentityError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("Flotilla fleet CA {fleet}"));
        params.distinguished_name.push(DnType::OrganizationName, "Flotilla");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(IdentityError::GenerateFailed)?;
        let cert = params.self_signed(&key).map_err(IdentityError::GenerateFailed)?;
        let key_pem = key.serialize_pem();
        Ok(FleetCa { cert_pem: cert.pem(), key_pem, issuer: Issuer::new(params, key) })
    }

    /// A CA loaded from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<FleetCa, IdentityError> {
        let key = KeyPair::from_pem(key_pem).map_err(IdentityError::InvalidCa)?;
        // The key must be the (first) certificate's: a bundle in the wrong order, or a key replaced before its
        // certificate, would sign certificates nobody can verify.
        let der = pem_der(cert_pem).ok_or(IdentityError::NoIdentity)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| IdentityError::UnparsableCertificate(e.to_string()))?;
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(IdentityError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(IdentityError::InvalidCa)?;
        Ok(FleetCa { issuer, cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string() })
    }

    pub fn load(dir: &Path) -> Result<FleetCa, IdentityError> {
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| IdentityError::ReadFailed { path, source })
        };
        FleetCa::from_pem(&read(CA_CERT)?, &read(CA_KEY)?)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `id`. `hosts` (DNS names or IP addresses) go into the certificate for the
    /// hub's server certificate.
    pub fn issue(&self, id: &Identity, hosts: &[String]) -> Result<Issued, IdentityError> {
        self.issue_for(id, hosts, None)
    }

    /// Issues a certificate for `id` valid from now for `ttl` (`None`: for [`DEFAULT_TTL`]), with a random
    /// serial number (what a revoked list names).
    pub fn issue_for(&self, id: &Identity, hosts: &[String], ttl: Option<Duration>) -> Result<Issued, IdentityError> {
        let params = leaf_params(id, hosts, ttl)?;
        let key = KeyPair::generate().map_err(IdentityError::GenerateFailed)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(IdentityError::GenerateFailed)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs a certificate signing request that names exactly `expect` (nothing else of the request is taken:
    /// the certificate's names, usages and lifetime are the fleet's), valid for `ttl`.
    pub fn sign_request(&self, csr_pem: &str, expect: &Identity, ttl: Duration) -> Result<String, IdentityError> {
        let (mut csr, named) = parse_request(csr_pem)?;
        if named.as_slice() != std::slice::from_ref(expect) {
            let found = named.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
            return Err(IdentityError::BadRequest(format!(
                "the request names {}, not {expect}",
                if found.is_empty() { "no Flotilla identity".to_string() } else { found }
            )));
        }
        csr.params = leaf_params(expect, &[], Some(ttl))?;
        let cert = csr.signed_by(&self.issuer).map_err(IdentityError::GenerateFailed)?;
        Ok(cert.pem())
    }
}

/// A certificate signing request (its signature checked) and the Flotilla identities it names.
fn parse_request(csr_pem: &str) -> Result<(rcgen::CertificateSigningRequestParams, Vec<Identity>), IdentityError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| IdentityError::BadRequest(e.to_string()))?;
    let named = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Identity::parse_uri(u.as_str()),
            _ => None,
        })
        .collect();
    Ok((csr, named))
}

/// The Flotilla identity a certificate signing request names (exactly one).
pub fn requested_identity(csr_pem: &str) -> Result<Identity, IdentityError> {
    let (_, mut named) = parse_request(csr_pem)?;
    match named.len() {
        1 => Ok(named.remove(0)),
        0 => Err(IdentityError::BadRequest("the request names no Flotilla identity".into())),
        _ => Err(IdentityError::BadRequest("the request names more than one Flotilla identity".into())),
    }
}

/// A new private key and a certificate signing request for `id`: the key stays with the caller.
pub fn request_for(id: &Identity) -> Result<(String, String), IdentityError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(IdentityError::GenerateFailed)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, id.to_string());
    let uri = id.uri().try_into().map_err(IdentityError::GenerateFailed)?;
    params.subject_alt_names.push(SanType::URI(uri));
    let key = KeyPair::generate().map_err(IdentityError::GenerateFailed)?;
    let csr = params.serialize_request(&key).map_err(IdentityError::GenerateFailed)?;
    Ok((csr.pem().map_err(IdentityError::GenerateFailed)?, key.serialize_pem()))
}

/// What every certificate of `id` carries: its name, its usages, its lifetime and a random serial.
fn leaf_params(id: &Identity, hosts: &[String], ttl: Option<Duration>) -> Result<CertificateParams, IdentityError> {
    if let Identity::Cluster(n) | Identity::Operator(n) = id {
        if !valid_name(n) {
            return Err(IdentityError::InvalidName(n.clone()));
        }
    }
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(IdentityError::GenerateFailed)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, id.to_string());
    params.distinguished_name.push(DnType::OrganizationName, "Flotilla");
    let uri = id.uri().try_into().map_err(IdentityError::GenerateFailed)?;
    params.subject_alt_names.push(SanType::URI(uri));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = match id {
        // Client too: a standby replica forwards operators' controls to the leader with it.
        Identity::Hub => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    set_lifetime(&mut params, ttl.unwrap_or(DEFAULT_TTL));
    Ok(params)
}

/// How long certificates are valid when nobody says: a year.
pub const DEFAULT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Valid from a minute ago (clocks differ a little) for `ttl`, with a random positive 16-byte serial.
fn set_lifetime(params: &mut CertificateParams, ttl: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::seconds(ttl.as_secs().min(100 * 365 * 24 * 3600) as i64);
    let mut serial = [0u8; 16];
    if rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut serial).is_err() {
        // Unique still: the time in nanoseconds.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        serial = t.to_be_bytes();
    }
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
}

/// A duration as people write it: `12h`, `30d`, `1h 30m`, `90s`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write 12h, 30d, 90m"))?;
    if d < Duration::from_secs(60) {
        return Err(format!("{text:?} is shorter than a minute"));
    }
    Ok(d)
}

/// A certificate's serial number, lowercase hex without separators or leading zeros (as revoked lists are
/// compared).
pub fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(normalize_serial(&hex::encode(cert.raw_serial())))
}

/// A serial as written anywhere (`00:1A:2b`, `1a2b`): lowercase hex, no separators, no leading zeros.
pub fn normalize_serial(s: &str) -> String {
    let hex: String = s.chars().filter(|c| c.is_ascii_hexdigit()).map(|c| c.to_ascii_lowercase()).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.to_string()
    }
}

/// When a certificate starts and stops being valid (Unix ms).
pub fn validity_of(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((cert.validity().not_before.timestamp() * 1000, cert.validity().not_after.timestamp() * 1000))
}

/// When a certificate stops being valid (Unix ms).
pub fn expiry_of(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp() * 1000)
}

/// The first certificate of a PEM text, as DER.
pub fn pem_der(cert_pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok().map(|(_, p)| p.contents)
}

/// The identity a DER certificate carries.
pub fn identity_of(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::UnparsableCertificate(e.to_string()))?;
    let san = cert.subject_alternative_name().map_err(|e| IdentityError::UnparsableCertificate(e.to_string()))?;
    let mut found: Vec<Identity> = san
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Identity::parse_uri(u),
            _ => None,
        })
        .collect();
    match found.len() {
        0 => Err(IdentityError::NoIdentity),
        1 => Ok(found.remove(0)),
        _ => Err(IdentityError::AmbiguousIdentity),
    }
}

/// The identity of a PEM certificate (its first certificate).
pub fn identity_of_pem(cert_pem: &str) -> Result<Identity, IdentityError> {
    match x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) {
        Ok((_, pem)) => identity_of(&pem.contents),
        Err(_) => Err(IdentityError::NoIdentity),
    }
}

/// The DNS names (then IP addresses, as text) a PEM certificate is valid for, in its order.
pub fn host_names(cert_pem: &str) -> Vec<String> {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else { return Vec::new() };
    let Ok(cert) = pem.parse_x509() else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    for g in &san.value.general_names {
        match g {
            x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_string()),
            x509_parser::extensions::GeneralName::IPAddress(b) if b.len() == 4 => {
                ips.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string())
            }
            _ => {}
        }
    }
    dns.extend(ips);
    dns
}

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";

/// Where [`write_fleet`] puts each file.
pub fn cert_paths(dir: &Path, id: &Identity) -> (PathBuf, PathBuf) {
    let (sub, name) = match id {
        Identity::Cluster(n) => ("clusters", n.as_str()),
        Identity::Operator(n) => ("operators", n.as_str()),
        Identity::Hub => ("", "hub"),
    };
    let d = if sub.is_empty() { dir.to_path_buf() } else { dir.join(sub) };
    (d.join(format!("{name}.pem")), d.join(format!("{name}-key.pem")))
}

/// Writes `path` whole: a temporary file beside it, synced, renamed over it (a crash leaves the old file or
/// the new, never half of one); readable by its owner only when `secret`.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), IdentityError> {
    use std::io::Write;
    let err = |source| IdentityError::WriteFailed { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = path.with_extension("new");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Writes a fleet's certificates: `ca.pem` and `ca-key.pem` (creating the CA unless it exists), `hub.pem`
/// for `hub_hosts`, `clusters/<name>.pem` and `operators/<name>.pem`, each with its `-key.pem`.
/// Private keys are readable by their owner only.
pub fn write_fleet(
    dir: &Path,
    fleet: &str,
    hub_hosts: &[String],
    clusters: &[String],
    operators: &[String],
) -> Result<Vec<PathBuf>, IdentityError> {
    write_fleet_for(dir, fleet, hub_hosts, clusters, operators, None)
}

/// [`write_fleet`], the certificates valid for `ttl` (`None`: [`DEFAULT_TTL`]).
pub fn write_fleet_for(
    dir: &Path,
    fleet: &str,
    hub_hosts: &[String],
    clusters: &[String],
    operators: &[String],
    ttl: Option<Duration>,
) -> Result<Vec<PathBuf>, IdentityError> {
    let ca = if dir.join(CA_CERT).exists() && dir.join(CA_KEY).exists() {
        FleetCa::load(dir)?
    } else {
        let ca = FleetCa::generate(fleet)?;
        write_file(&dir.join(CA_CERT), &ca.cert_pem, false)?;
        write_file(&dir.join(CA_KEY), &ca.key_pem, true)?;
        ca
    };
    let mut written = vec![dir.join(CA_CERT)];
    let ids = std::iter::once(Identity::Hub)
        .chain(clusters.iter().map(|c| Identity::Cluster(c.clone())))
        .chain(operators.iter().map(|o| Identity::Operator(o.clone())));
    for id in ids {
        let hosts: &[String] = if id == Identity::Hub { hub_hosts } else { &[] };
        let issued = ca.issue_for(&id, hosts, ttl)?;
        let (cert, key) = cert_paths(dir, &id);
        write_file(&cert, &issued.cert_pem, false)?;
        write_file(&key, &issued.key_pem, true)?;
        written.push(cert);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64_decode(&body)
    }

    // A tiny decoder keeps the test free of another dependency.
    fn base64_decode(s: &str) -> Vec<u8> {
        let table = |c: u8| -> u32 {
            match c {
                b'A'..=b'Z' => (c - b'A') as u32,
                b'a'..=b'z' => (c - b'a' + 26) as u32,
                b'0'..=b'9' => (c - b'0' + 52) as u32,
                b'+' => 62,
                _ => 63,
            }
        };
        let bytes: Vec<u8> = s.bytes().filter(|b| *b != b'=').collect();
        let mut out = Vec::new();
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, c) in chunk.iter().enumerate() {
                n |= table(*c) << (18 - 6 * i);
            }
            let len = chunk.len() * 6 / 8;
            out.extend_from_slice(&n.to_be_bytes()[1..1 + len]);
        }
        out
    }

    #[test]
    fn identities_round_trip_through_uris() {
        for id in [Identity::Cluster("eu-1".into()), Identity::Operator("alice".into()), Identity::Hub] {
            assert_eq!(Identity::parse_uri(&id.uri()), Some(id));
        }
        assert_eq!(Identity::parse_uri("flotilla://cluster/Bad_Name"), None);
        assert_eq!(Identity::parse_uri("https://cluster/eu-1"), None);
        assert_eq!(Identity::parse_uri("flotilla://robot/x"), None);
    }

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = FleetCa::generate("test").unwrap();
        let c = ca.issue(&Identity::Cluster("eu-1".into()), &[]).unwrap();
        assert_eq!(identity_of(&der(&c.cert_pem)).unwrap(), Identity::Cluster("eu-1".into()));
        let h = ca.issue(&Identity::Hub, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(identity_of(&der(&h.cert_pem)).unwrap(), Identity::Hub);
        assert_eq!(host_names(&h.cert_pem), vec!["localhost".to_string(), "127.0.0.1".to_string()]);
        assert!(matches!(ca.issue(&Identity::Cluster("Not Valid".into()), &[]), Err(IdentityError::InvalidName(_))));
        // The CA itself names nobody.
        assert!(matches!(identity_of(&der(ca.cert_pem())), Err(IdentityError::NoIdentity)));
    }

    #[test]
    fn a_request_is_signed_only_for_the_identity_it_names() {
        let ca = FleetCa::generate("test").unwrap();
        let eu1 = Identity::Cluster("eu-1".into());
        let (csr, _key) = request_for(&eu1).unwrap();
        let cert = ca.sign_request(&csr, &eu1, Duration::from_secs(3600)).unwrap();
        assert_eq!(identity_of_pem(&cert).unwrap(), eu1);
        let e = ca.sign_request(&csr, &Identity::Cluster("eu-2".into()), Duration::from_secs(3600)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the certificate signing request cannot be used: the request names cluster eu-1, not cluster eu-2"
        );
        assert!(ca.sign_request("not a request", &eu1, Duration::from_secs(60)).is_err());
        let expires = expiry_of(&pem_der(&cert).unwrap()).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!((expires - now - 3_600_000).abs() < 5_000, "valid for the hour asked");
    }

    #[test]
    fn a_ca_loaded_from_a_bundle_signs_with_the_first_certificate_and_hands_out_the_bundle() {
        let (old, new) = (FleetCa::generate("old").unwrap(), FleetCa::generate("new").unwrap());
        let bundle = format!("{}{}", new.cert_pem, old.cert_pem);
        let ca = FleetCa::from_pem(&bundle, &new.key_pem).unwrap();
        assert_eq!(ca.cert_pem(), bundle);
        let wrong = format!("{}{}", old.cert_pem, new.cert_pem);
        assert!(matches!(FleetCa::from_pem(&wrong, &new.key_pem), Err(IdentityError::KeyMismatch)));
        let eu1 = Identity::Cluster("eu-1".into());
        let (csr, _) = request_for(&eu1).unwrap();
        let cert = ca.sign_request(&csr, &eu1, Duration::from_secs(600)).unwrap();
        let der = pem_der(&cert).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(parsed.issuer().to_string().contains("Flotilla fleet CA new"), "{}", parsed.issuer());
    }

    #[test]
    fn a_loaded_ca_issues_certificates() {
        let ca = FleetCa::generate("test").unwrap();
        let again = FleetCa::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let op = again.issue(&Identity::Operator("alice".into()), &[]).unwrap();
        assert_eq!(identity_of(&der(&op.cert_pem)).unwrap(), Identity::Operator("alice".into()));
        assert!(FleetCa::from_pem("not a cert", &ca.key_pem).is_err());
    }

    #[test]
    fn write_fleet_lays_out_files_and_keeps_an_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_fleet(dir.path(), "t", &["localhost".into()], &["eu-1".into()], &["alice".into()]).unwrap();
        assert_eq!(files.len(), 4);
        let ca1 = std::fs::read_to_string(dir.path().join(CA_CERT)).unwrap();
        write_fleet(dir.path(), "t", &["localhost".into()], &["eu-2".into()], &[]).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join(CA_CERT)).unwrap(), ca1, "the CA is reused");
        assert!(dir.path().join("clusters/eu-2.pem").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("clusters/eu-1-key.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
        }
    }
}
