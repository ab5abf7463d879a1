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

/// The HTTP client both kinds of connection share: pooled connections, HTTP/2 pings on idle ones.
fn hyper_builder() -> hyper_util::client::legacy::Builder {
    let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true);
    b
}

/// A client for `config`: HTTP/2 over TLS where the server agrees, HTTP/1.1 otherwise (and for plain HTTP).
/// Through a proxy (`proxy-url` in the kubeconfig) it is kube-rs' own client, which speaks HTTP/1.1.
pub fn client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    if config.proxy_url.is_some() {
        return kube::Client::try_from(config);
    }
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
    let hyper = hyper_builder().build(https);
    let default_ns = config.default_namespace.clone();
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(|e: hyper_util::client::legacy::Error| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
        .service(hyper);
    Ok(kube::Client::new(service, default_ns))
}

/// Opens a new in-memory connection to an API server (a simulated cluster in the same process); `None`
/// when it refuses (an offline cluster).
pub type Dial = std::sync::Arc<dyn Fn() -> Option<tokio::io::DuplexStream> + Send + Sync>;

/// An in-memory connection, as hyper's client sees it.
struct Pipe(hyper_util::rt::TokioIo<tokio::io::DuplexStream>);

impl hyper::rt::Read for Pipe {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Pipe {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl hyper_util::client::legacy::connect::Connection for Pipe {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

/// A client whose connections are in-memory HTTP/2 pipes made by `dial` (no file descriptor each), for
/// thousands of agents and simulated clusters in one process. Otherwise the stack of [`client`].
pub fn in_process(dial: Dial) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::new(http::Uri::from_static("http://in-process.invalid"));
    let connector = tower::service_fn(move |_: http::Uri| {
        std::future::ready(dial().map(|io| Pipe(hyper_util::rt::TokioIo::new(io))).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "the simulated cluster refused the connection")
        }))
    });
    let hyper = hyper_builder().http2_only(true).build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .map_err(|e: hyper_util::client::legacy::Error| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}
