//! The hub's TLS on its agent and operator port, read again from disk when the files change: its own
//! certificate and key (`hub.pem`, `hub-key.pem`) and the CA bundle it trusts for client certificates
//! (`ca.pem`, one or more CA certificates: during a CA rotation, the old and the new). New handshakes use
//! what was read last; live connections keep theirs. A file that cannot be used keeps what is in force.

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the files are looked at.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// Handshakes in progress at once; more wait in the listener's backlog.
const HANDSHAKES: usize = 512;

/// The certificate and key, and the client verifier, in force.
#[derive(Debug)]
pub struct Material {
    key: ArcSwap<CertifiedKey>,
    verifier: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

impl ResolvesServerCert for Material {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.load_full())
    }
}

/// Delegates to the verifier in force at the time of each handshake.
#[derive(Debug)]
struct Current(Arc<Material>);

impl ClientCertVerifier for Current {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; the CAs in force change, and a borrowed list cannot follow them.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verifier.load().verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verifier.load().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verifier.load().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.verifier.load().supported_verify_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// The hub's certificate (chain) and key from PEM.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the hub's certificate: {e}"))?;
    if chain.is_empty() {
        return Err("the hub's certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("the hub's key: {e}"))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| format!("the hub's certificate and key: {e}"))
}

/// A verifier of client certificates issued by any CA in `ca_pem`.
pub fn verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.map_err(|e| format!("the CA bundle: {e}"))?).map_err(|e| format!("the CA bundle: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA bundle holds no certificate".into());
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("the CA bundle: {e}"))
}

/// The port's TLS, following its files in `dir` (hub.pem, hub-key.pem, ca.pem).
pub struct Reloading {
    dir: PathBuf,
    material: Arc<Material>,
    /// Called after the files changed (the hub reads its signing CA again).
    on_change: Option<Box<dyn Fn() + Send + Sync>>,
}

type Stamp = Vec<Option<(u64, std::time::SystemTime, u64)>>;

fn stamp(dir: &Path) -> Stamp {
    ["hub.pem", "hub-key.pem", "ca.pem", "ca-key.pem"]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            #[cfg(unix)]
            let ino = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let ino = 0;
            Some((m.len(), m.modified().ok()?, ino))
        })
        .collect()
}

impl Reloading {
    /// The TLS of `tls` (as read at start), to be read again from `dir` when the files change.
    pub fn new(dir: PathBuf, tls: &crate::server::HubTls) -> Result<Reloading, String> {
        let material = Material {
            key: ArcSwap::from_pointee(certified_key(&tls.cert_pem, &tls.key_pem)?),
            verifier: ArcSwap::from_pointee(verifier(&tls.ca_pem)?),
        };
        Ok(Reloading { dir, material: Arc::new(material), on_change: None })
    }

    /// Also calls `f` whenever the files change.
    pub fn on_change(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_change = Some(Box::new(f));
        self
    }

    /// Reads the three files again; what cannot be used leaves what is in force.
    pub fn reload(&self) -> Result<(), String> {
        let read = |f: &str| {
            let p = self.dir.join(f);
            std::fs::read_to_string(&p).map_err(|e| format!("reading {}: {e}", p.display()))
        };
        let key = certified_key(&read("hub.pem")?, &read("hub-key.pem")?)?;
        let verifier = verifier(&read("ca.pem")?)?;
        self.material.key.store(Arc::new(key));
        self.material.verifier.store(Arc::new(verifier));
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the provider's default protocol versions")
            .with_client_cert_verifier(Arc::new(Current(self.material.clone())))
            .with_cert_resolver(self.material.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }

    /// Accepted connections, after their handshake (at most `timeout` each), until `stop`.
    pub fn incoming(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        timeout: Duration,
        stop: CancellationToken,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>>
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = stop.cancelled() => return,
                    p = handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                };
                let (tcp, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(e) => {
                            warn!(error = %e, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    // A stranger who connects and never finishes the handshake is cut off.
                    if let Ok(Ok(tls)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    drop(permit);
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Reads the files again whenever they change, until `stop`.
    pub async fn follow(self: Arc<Self>, stop: CancellationToken) {
        let mut seen = stamp(&self.dir);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let now = stamp(&self.dir);
            if now == seen {
                continue;
            }
            seen = now;
            if let Some(f) = &self.on_change {
                f();
            }
            match self.reload() {
                Ok(()) => info!(dir = %self.dir.display(), "the hub's certificate and CA bundle read again"),
                Err(e) => warn!(error = %e, "the hub's TLS files cannot be used: what was read before stays in force"),
            }
        }
    }
}
