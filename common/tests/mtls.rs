//! Fleet certificates over real mutually authenticated TLS: a gRPC server (the generated platform service)
//! that trusts only the fleet CA learns each caller's identity from its certificate, and refuses callers
//! without one or with a certificate from another CA at the handshake.

use flotilla_common::identity::{identity_of, FleetCa, Identity, Issued};
use flotilla_proto::platform::v1::platform_service_client::PlatformServiceClient;
use flotilla_proto::platform::v1::platform_service_server::{PlatformService, PlatformServiceServer};
use flotilla_proto::platform::v1::{
    Cluster, GetClusterRequest, ListClustersRequest, ListClustersResponse, RefreshRequest, RefreshResponse,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// Answers ListClusters with the caller's identity, as the hub will authorize operators.
struct WhoAmI;

#[tonic::async_trait]
impl PlatformService for WhoAmI {
    async fn list_clusters(&self, req: Request<ListClustersRequest>) -> Result<Response<ListClustersResponse>, Status> {
        let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let first = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id = identity_of(first).map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok(Response::new(ListClustersResponse { revision: id.uri(), ..Default::default() }))
    }

    async fn get_cluster(&self, _: Request<GetClusterRequest>) -> Result<Response<Cluster>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn refresh(&self, _: Request<RefreshRequest>) -> Result<Response<RefreshResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn list_rollouts(
        &self,
        _: Request<flotilla_proto::platform::v1::ListRolloutsRequest>,
    ) -> Result<Response<flotilla_proto::platform::v1::ListRolloutsResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn control_rollout(
        &self,
        _: Request<flotilla_proto::platform::v1::ControlRolloutRequest>,
    ) -> Result<Response<flotilla_proto::platform::v1::ControlRolloutResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn explain(
        &self,
        _: Request<flotilla_proto::platform::v1::ExplainRequest>,
    ) -> Result<Response<flotilla_proto::platform::v1::ExplainResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn list_hubs(
        &self,
        _: Request<flotilla_proto::platform::v1::ListHubsRequest>,
    ) -> Result<Response<flotilla_proto::platform::v1::ListHubsResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn list_audit(
        &self,
        _: Request<flotilla_proto::platform::v1::ListAuditRequest>,
    ) -> Result<Response<flotilla_proto::platform::v1::ListAuditResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn who_am_i(
        &self,
        _: Request<flotilla_proto::platform::v1::WhoAmIRequest>,
    ) -> Result<Response<flotilla_proto::platform::v1::WhoAmIResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }

    async fn create_join_token(
        &self,
        _: Request<flotilla_proto::platform::v1::CreateJoinTokenRequest>,
    ) -> Result<Response<flotilla_proto::platform::v1::CreateJoinTokenResponse>, Status> {
        Err(Status::unimplemented("not part of this test"))
    }
}

async fn serve(ca: &FleetCa) -> (String, tokio::sync::oneshot::Sender<()>) {
    flotilla_common::install_crypto_provider();
    let hub = ca.issue(&Identity::Hub, &["localhost".into()]).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(&hub.cert_pem, &hub.key_pem))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder().tls_config(tls).unwrap().add_service(PlatformServiceServer::new(WhoAmI));
    tokio::spawn(server.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
        let _ = stopped.await;
    }));
    (format!("https://localhost:{}", addr.port()), stop)
}

async fn call(url: &str, ca_pem: &str, client: Option<&Issued>) -> Result<String, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(TlsIdentity::from_pem(&c.cert_pem, &c.key_pem));
    }
    let channel: Channel = Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = PlatformServiceClient::new(channel);
    client
        .list_clusters(ListClustersRequest::default())
        .await
        .map(|r| r.into_inner().revision)
        .map_err(|s| format!("{}: {}", s.code(), s.message()))
}

#[tokio::test]
async fn callers_are_identified_by_their_certificate() {
    let ca = FleetCa::generate("test").unwrap();
    let (url, _stop) = serve(&ca).await;
    let alice = ca.issue(&Identity::Operator("alice".into()), &[]).unwrap();
    assert_eq!(call(&url, ca.cert_pem(), Some(&alice)).await.unwrap(), "flotilla://operator/alice");
    let eu1 = ca.issue(&Identity::Cluster("eu-1".into()), &[]).unwrap();
    assert_eq!(call(&url, ca.cert_pem(), Some(&eu1)).await.unwrap(), "flotilla://cluster/eu-1");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let ca = FleetCa::generate("test").unwrap();
    let (url, _stop) = serve(&ca).await;
    let other = FleetCa::generate("intruder").unwrap();
    let mallory = other.issue(&Identity::Cluster("eu-1".into()), &[]).unwrap();
    let err = call(&url, ca.cert_pem(), Some(&mallory)).await.unwrap_err();
    assert!(!err.contains("flotilla://"), "the call must not succeed: {err}");
}

#[tokio::test]
async fn a_caller_without_a_certificate_is_refused() {
    let ca = FleetCa::generate("test").unwrap();
    let (url, _stop) = serve(&ca).await;
    assert!(call(&url, ca.cert_pem(), None).await.is_err());
}
