//! Certificates the hub issues: a cluster joining with a bootstrap token on the bootstrap port (server TLS
//! only: the agent has no certificate yet), and an agent renewing its certificate over its live session. The
//! agent makes its key in the cluster and sends a certificate signing request; the hub signs it with the fleet
//! CA's key (`ca-key.pem` beside `ca.pem` in its certificates directory) for `--cert-ttl`. Every join and
//! renewal, allowed or refused, is audited.

use crate::audit::AuditRecord;
use crate::hub::Hub;
use crate::limits::{SourceLimiter, SourceLimits};
use flotilla_common::identity::{requested_identity, FleetCa, Identity};
use flotilla_proto::agent::v1 as pb;
use flotilla_proto::agent::v1::bootstrap_service_server::{BootstrapService, BootstrapServiceServer};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// Largest join or renewal request: a CSR is about a kilobyte.
const MAX_REQUEST: usize = 64 << 10;

/// What issues certificates: the fleet CA and how long its certificates last.
pub struct Signer {
    ca: FleetCa,
    pub ca_pem: String,
    pub ttl: Duration,
}

impl Signer {
    /// The CA in `dir` (`ca.pem`, `ca-key.pem`), or `None` when the key is not there (the hub then issues
    /// nothing: joins and renewals are refused with the reason).
    pub fn load(dir: &Path, ttl: Duration) -> Result<Option<Signer>, flotilla_common::identity::IdentityError> {
        if !dir.join(flotilla_common::identity::CA_KEY).exists() {
            return Ok(None);
        }
        let ca = FleetCa::load(dir)?;
        Ok(Some(Signer { ca_pem: ca.cert_pem().to_string(), ca, ttl }))
    }

    /// Signs `csr_pem` for `cluster`, or says why not.
    pub fn sign(&self, csr_pem: &str, cluster: &str) -> Result<pb::IssuedCertificate, String> {
        let cert_pem = self
            .ca
            .sign_request(csr_pem, &Identity::Cluster(cluster.to_string()), self.ttl)
            .map_err(|e| e.to_string())?;
        let expires = flotilla_common::identity::pem_der(&cert_pem)
            .and_then(|d| flotilla_common::identity::expiry_of(&d))
            .unwrap_or_default();
        Ok(pb::IssuedCertificate { cert_pem, ca_pem: self.ca_pem.clone(), expires_unix_ms: expires })
    }
}

fn no_signer() -> Status {
    Status::unavailable("this hub issues no certificates: its certificates directory has no ca-key.pem")
}

/// The cluster a request names, or why it names none.
fn cluster_of(csr_pem: &str) -> Result<String, String> {
    if csr_pem.len() > MAX_REQUEST {
        return Err("the certificate signing request is too large".into());
    }
    match requested_identity(csr_pem).map_err(|e| e.to_string())? {
        Identity::Cluster(c) => Ok(c),
        other => Err(format!("the request names {other}; only a cluster's agent joins or renews here")),
    }
}

pub struct BootstrapApi {
    hub: Arc<Hub>,
    limiter: Mutex<SourceLimiter>,
}

impl BootstrapApi {
    pub fn new(hub: Arc<Hub>) -> Self {
        // Strangers reach this port: a few joins per source, then one a second.
        let limits = SourceLimits { rate: 1.0, burst: 5.0, connections: 16, sources: 10_000 };
        BootstrapApi { hub, limiter: Mutex::new(SourceLimiter::new(limits)) }
    }
}

#[tonic::async_trait]
impl BootstrapService for BootstrapApi {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::IssuedCertificate>, Status> {
        if let Some(ip) = req.remote_addr().map(|a| a.ip()) {
            let now = tokio::time::Instant::now();
            if self.limiter.lock().unwrap_or_else(|p| p.into_inner()).request(ip, now).is_err() {
                return Err(Status::resource_exhausted("too many join requests from this address; try again later"));
            }
        }
        let signer = self.hub.shared.signer.load_full().ok_or_else(no_signer)?;
        let r = req.into_inner();
        let (id, secret) = crate::join::parse(&r.token).map_err(Status::invalid_argument)?;
        let cluster = cluster_of(&r.csr_pem).map_err(Status::invalid_argument)?;
        // The token's use is spent (and recorded) by the writer, so two joins cannot share one use.
        match self.hub.join(id, secret, &cluster).await {
            Ok(()) => {}
            Err(e) if e == crate::hub::NOT_LEADING => return Err(Status::unavailable(e)),
            Err(e) => {
                warn!(%cluster, reason = %e, "join refused");
                return Err(Status::permission_denied(e));
            }
        }
        let issued = signer.sign(&r.csr_pem, &cluster).map_err(Status::invalid_argument)?;
        info!(%cluster, token = %id, "a cluster joined: certificate issued");
        Ok(Response::new(issued))
    }
}

/// `AgentService.Renew`: a new certificate for the calling cluster, for the key in its request.
pub async fn renew(hub: &Hub, cluster: &str, serial: &str, csr_pem: &str) -> Result<pb::IssuedCertificate, Status> {
    let signer = hub.shared.signer.load_full().ok_or_else(no_signer)?;
    let rec = |allowed: bool, answer: String| AuditRecord {
        who: format!("cluster {cluster}"),
        action: "renew".into(),
        allowed,
        answer,
        ..Default::default()
    };
    let decided = crate::sessions::admitted(hub, cluster, serial).and_then(|()| match cluster_of(csr_pem)? {
        c if c == cluster => signer.sign(csr_pem, cluster),
        c => Err(format!("cluster {cluster} may renew only its own certificate, not cluster {c}'s")),
    });
    match decided {
        Ok(issued) => {
            hub.record(rec(true, format!("issued, valid {} s", signer.ttl.as_secs()))).await;
            info!(%cluster, "certificate renewed");
            Ok(issued)
        }
        Err(e) => {
            hub.record(rec(false, format!("refused: {e}"))).await;
            Err(Status::permission_denied(e))
        }
    }
}

/// Serves the bootstrap port (server TLS with the hub's certificate; no client certificate asked) until
/// shutdown.
pub async fn serve(
    hub: Arc<Hub>,
    listener: tokio::net::TcpListener,
    tls: &crate::server::HubTls,
) -> Result<(), tonic::transport::Error> {
    let shutdown = hub.shared.shutdown.clone();
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(&tls.cert_pem, &tls.key_pem))
        .timeout(Duration::from_secs(10));
    Server::builder()
        .tls_config(tls)?
        .timeout(Duration::from_secs(30))
        .max_concurrent_streams(Some(4))
        .add_service(BootstrapServiceServer::new(BootstrapApi::new(hub)).max_decoding_message_size(MAX_REQUEST))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await
}
