//! The agent's own certificate: joining the fleet with a bootstrap token (the key is made here and never leaves
//! the cluster), keeping the certificate and key in files, and renewing the certificate over the live session
//! when a third of its lifetime is left (kubelet-style), without dropping the session.

use flotilla_common::identity::{pem_der, request_for, validity_of, Identity};
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::agent::v1::agent_service_client::AgentServiceClient;
use flotilla_proto::agent::v1::bootstrap_service_client::BootstrapServiceClient;
use k8s_openapi::api::core::v1::Secret;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

/// Where the certificate and key are kept: files, or a Secret (`tls.crt`, `tls.key`) in the cluster, so a
/// restarted or moved agent finds them again.
#[derive(Clone)]
pub enum Keep {
    Files(PathBuf, PathBuf),
    Secret { client: kube::Client, namespace: String, name: String },
}

impl Keep {
    /// The certificate and key kept, if any.
    pub async fn load(&self) -> Result<Option<(String, String)>, String> {
        match self {
            Keep::Files(cert, key) => {
                if !cert.exists() {
                    return Ok(None);
                }
                let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()));
                Ok(Some((read(cert)?, read(key)?)))
            }
            Keep::Secret { client, namespace, name } => {
                let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
                let s = api.get_opt(name).await.map_err(|e| format!("reading Secret {namespace}/{name}: {e}"))?;
                let field = |k: &str| {
                    s.as_ref()
                        .and_then(|s| s.data.as_ref())
                        .and_then(|d| d.get(k))
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                };
                Ok(field("tls.crt").zip(field("tls.key")))
            }
        }
    }

    pub async fn save(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        match self {
            Keep::Files(cert, key) => save(cert, key, cert_pem, key_pem),
            Keep::Secret { client, namespace, name } => {
                let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
                let secret = serde_json::json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": {"app.kubernetes.io/managed-by": "flotilla-agent"}},
                    "type": "kubernetes.io/tls",
                    "stringData": {"tls.crt": cert_pem, "tls.key": key_pem},
                });
                let pp = kube::api::PatchParams::apply("flotilla-agent").force();
                api.patch(name, &pp, &kube::api::Patch::Apply(secret))
                    .await
                    .map_err(|e| format!("writing Secret {namespace}/{name}: {e}"))?;
                Ok(())
            }
        }
    }
}

/// The certificate and key in use, where they are kept, and when to renew.
pub struct Credentials {
    pair: RwLock<(String, String)>,
    keep: Option<Keep>,
    /// Renew when this little of the lifetime is left (`None`: a third of it).
    renew_before: Option<Duration>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Credentials {
    pub fn new(cert_pem: String, key_pem: String, keep: Option<Keep>, renew_before: Option<Duration>) -> Self {
        Credentials { pair: RwLock::new((cert_pem, key_pem)), keep, renew_before }
    }

    /// The certificate and key (PEM) to connect with now.
    pub fn current(&self) -> (String, String) {
        self.pair.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How long until the certificate should be renewed (zero: now).
    pub fn renew_in(&self) -> Duration {
        let (cert, _) = self.current();
        let Some((from, until)) = pem_der(&cert).and_then(|d| validity_of(&d)) else { return Duration::MAX };
        let before = self.renew_before.map_or((until - from) / 3, |d| d.as_millis() as i64);
        Duration::from_millis((until - before - now_ms()).max(0) as u64)
    }

    /// Renews the certificate of `cluster` over `channel` (the live session's connection): a new key made
    /// here, a request signed by the hub, both kept (files replaced whole), used from the next connection on.
    pub async fn renew(&self, channel: Channel, cluster: &str) -> Result<i64, String> {
        let (csr, key) = request_for(&Identity::Cluster(cluster.to_string())).map_err(|e| e.to_string())?;
        let issued = tokio::time::timeout(
            Duration::from_secs(10),
            AgentServiceClient::new(channel).renew(pb::CertificateRequest { csr_pem: csr }),
        )
        .await
        .map_err(|_| "the hub did not answer the renewal within 10 s".to_string())?
        .map_err(|s| format!("the hub refused the renewal: {}", s.message()))?
        .into_inner();
        if let Some(keep) = &self.keep {
            keep.save(&issued.cert_pem, &key).await?;
        }
        *self.pair.write().unwrap_or_else(|p| p.into_inner()) = (issued.cert_pem, key);
        Ok(issued.expires_unix_ms)
    }
}

/// Keeps a certificate and its key: the key first, so a crash between the two leaves a key the next join or
/// renewal replaces, never a certificate without its key.
pub fn save(cert_path: &Path, key_path: &Path, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    let write = flotilla_common::identity::write_file;
    write(key_path, key_pem, true).map_err(|e| flotilla_common::error_chain(&e))?;
    write(cert_path, cert_pem, false).map_err(|e| flotilla_common::error_chain(&e))
}

/// Joins the fleet as `cluster` with `token` at the hub's bootstrap port `url` (trusting `ca_pem`): the
/// certificate and key, once the hub issued it.
pub async fn join(
    url: &str,
    hub_name: Option<&str>,
    ca_pem: &str,
    token: &str,
    cluster: &str,
) -> Result<(String, String), String> {
    let (csr, key) = request_for(&Identity::Cluster(cluster.to_string())).map_err(|e| e.to_string())?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(n) = hub_name {
        tls = tls.domain_name(n.to_string());
    }
    let channel = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("invalid bootstrap URL {url}: {e}"))?
        .tls_config(tls)
        .map_err(|e| format!("TLS configuration: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| format!("connecting to the bootstrap port {url}: {e:?}"))?;
    let issued = BootstrapServiceClient::new(channel)
        .join(pb::JoinRequest { token: token.trim().to_string(), csr_pem: csr })
        .await
        .map_err(|s| format!("the hub refused to let cluster {cluster} join: {}", s.message()))?
        .into_inner();
    info!(%cluster, expires_unix_ms = issued.expires_unix_ms, "joined the fleet: certificate issued");
    Ok((issued.cert_pem, key))
}

/// The agent's certificate and key: as kept, or, when none is kept yet and a token is given, by joining
/// (retried with jittered backoff while the hub cannot be reached; a refusal is final).
pub async fn obtain(
    keep: &Keep,
    bootstrap: Option<(&str, &str, &str)>,
    hub_name: Option<&str>,
    ca_pem: &str,
) -> Result<(String, String), String> {
    if let Some(pair) = keep.load().await? {
        return Ok(pair);
    }
    let Some((url, token, cluster)) = bootstrap else {
        let what = match keep {
            Keep::Files(cert, _) => format!("{} does not exist", cert.display()),
            Keep::Secret { namespace, name, .. } => format!("Secret {namespace}/{name} holds no certificate"),
        };
        return Err(format!(
            "{what}; give the agent a certificate (flotilla certs) or a join token (--bootstrap-token)"
        ));
    };
    let mut delay = Duration::from_millis(500);
    loop {
        match join(url, hub_name, ca_pem, token, cluster).await {
            Ok((cert, key)) => {
                keep.save(&cert, &key).await?;
                return Ok((cert, key));
            }
            // The hub answered and said no: the token or the inventory must change, not the timing.
            Err(e) if e.starts_with("the hub refused") && !e.contains("too many") && !e.contains("not lead") => {
                return Err(e)
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "joining the fleet failed; trying again")
            }
        }
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64())).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
