//! A Kubernetes client that speaks HTTP/2 when the API server offers it (ALPN `h2`, as every real API
//! server does over TLS), so one agent's requests and its watches of every kind share one connection
//! instead of one TCP connection per watch. kube-rs' default client offers only HTTP/1.1.
//!
//! The stack is the default one's, minus the read timeout (a watch is quiet for minutes; dead connections
//! are found by HTTP/2 keepalive pings instead): base URI, authentication, extra headers, TLS from the
//! kubeconfig (CA, client certificate, `tls-server-name`).

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use std::time::Duration;
use tower::ServiceBuilder;

/// How often an idle HTTP/2 connection is pinged, and how long the answer may take before the connection
/// (and every watch on it) is given up and redialled.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for `config`: HTTP/2 over TLS where the server agrees, HTTP/1.1 otherwise (and for plain HTTP).
pub fn client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout.or(Some(Duration::from_secs(30))));
    // ALPN (h2, http/1.1) is set by the connector from the versions it enables.
    let tls = config.rustls_client_config()?;
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                kube::Error::Service(format!("invalid tls-server-name {name:?} in the kubeconfig: {e}").into())
            })?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let https = builder.enable_all_versions().wrap_connector(http);
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(https);
    let default_ns = config.default_namespace.clone();
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(|e: hyper_util::client::legacy::Error| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
        .service(hyper);
    Ok(kube::Client::new(service, default_ns))
}
