//! A standby replica forwards what only the leader does — operators' controls and refreshes, webhooks'
//! fetches — to the leader, over the same mutual TLS, with the hub's own certificate and the operator's name
//! (which the standby took from the operator's certificate) in [`ON_BEHALF_OF`]. The leader answers as if the
//! operator had called it: the answer, and the audit record, are the same.

use flotilla_proto::platform::v1 as api;
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Status;
use tracing::{debug, warn};

/// The metadata a forwarded call names its operator in (accepted only from a hub certificate).
pub const ON_BEHALF_OF: &str = "x-flotilla-on-behalf-of";

/// How long a forwarded call waits for a leader (a fail-over takes a few seconds).
const WAIT_FOR_LEADER: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct Forward {
    inner: Arc<Inner>,
}

struct Inner {
    tls: ClientTlsConfig,
    /// The leader's address, as its presence says (`host:port`).
    leader: Mutex<Option<String>>,
    channel: Mutex<Option<(String, Channel)>>,
}

impl Forward {
    /// `domain`: the name the leader's certificate carries (replicas share the hub's certificate).
    pub fn new(ca_pem: &str, cert_pem: &str, key_pem: &str, domain: &str) -> Forward {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .identity(Identity::from_pem(cert_pem, key_pem))
            .domain_name(domain.to_string());
        Forward { inner: Arc::new(Inner { tls, leader: Mutex::default(), channel: Mutex::default() }) }
    }

    /// Where the leader serves now (None: no replica leads).
    pub fn set_leader(&self, address: Option<String>) {
        *self.inner.leader.lock().unwrap_or_else(|p| p.into_inner()) = address;
    }

    fn client(&self) -> Result<Option<PlatformServiceClient<Channel>>, Status> {
        let Some(addr) = self.inner.leader.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(None);
        };
        let mut cached = self.inner.channel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, ch)) = cached.as_ref().filter(|(a, _)| *a == addr) {
            debug!(leader = %a, "forwarding over the open channel");
            return Ok(Some(PlatformServiceClient::new(ch.clone())));
        }
        let ep = Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(self.inner.tls.clone()))
            .map_err(|e| Status::internal(format!("the leader's address {addr} cannot be used: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(20));
        let ch = ep.connect_lazy();
        *cached = Some((addr, ch.clone()));
        Ok(Some(PlatformServiceClient::new(ch)))
    }

    /// Calls the leader, again while there is none or it does not answer (a fail-over), for a while.
    async fn call<T, F, Fut>(&self, who: &str, f: F) -> Result<T, Status>
    where
        F: Fn(PlatformServiceClient<Channel>, tonic::metadata::MetadataValue<tonic::metadata::Ascii>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let who: tonic::metadata::MetadataValue<_> =
            who.parse().map_err(|_| Status::invalid_argument("the operator's name cannot be forwarded"))?;
        let deadline = tokio::time::Instant::now() + WAIT_FOR_LEADER;
        loop {
            let last = match self.client()? {
                Some(c) => match f(c, who.clone()).await {
                    Ok(r) => return Ok(r.into_inner()),
                    // The replica it reached does not lead (any more), or cannot be reached: the view catches up.
                    Err(e) if e.code() == tonic::Code::Unavailable || e.message() == crate::hub::NOT_LEADING => e,
                    Err(e) => return Err(e),
                },
                None => Status::unavailable("no hub replica leads right now"),
            };
            if tokio::time::Instant::now() >= deadline {
                warn!(error = %last, "forwarding to the leader failed");
                return Err(Status::unavailable(format!(
                    "the leading hub replica could not be reached: {}",
                    last.message()
                )));
            }
            self.inner.channel.lock().unwrap_or_else(|p| p.into_inner()).take();
            tokio::time::sleep(Duration::from_millis(250 + fastrand::u64(0..250))).await;
        }
    }

    pub async fn control(
        &self,
        who: &str,
        req: api::ControlRolloutRequest,
    ) -> Result<api::ControlRolloutResponse, Status> {
        self.call(who, |mut c, who| {
            let mut r = tonic::Request::new(req.clone());
            r.metadata_mut().insert(ON_BEHALF_OF, who);
            async move { c.control_rollout(r).await }
        })
        .await
    }

    pub async fn refresh(&self, who: &str) -> Result<api::RefreshResponse, Status> {
        self.call(who, |mut c, who| {
            let mut r = tonic::Request::new(api::RefreshRequest {});
            r.metadata_mut().insert(ON_BEHALF_OF, who);
            async move { c.refresh(r).await }
        })
        .await
    }
}
