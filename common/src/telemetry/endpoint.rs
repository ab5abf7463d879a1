//! The plain-HTTP endpoint of a process (`--metrics-listen`): `/metrics` (Prometheus text format),
//! `/healthz` (the process answers) and `/readyz` (it serves current state; what that means is the
//! process's own [`Observed::ready`]). Requests are small and bounded: 5 s to send the headers, 30 s per
//! connection.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// What the endpoint asks the process.
pub trait Observed: Send + Sync + 'static {
    /// The metrics, encoded in the Prometheus (OpenMetrics) text format.
    fn metrics(&self) -> String;
    /// Ready, or why not.
    fn ready(&self) -> Result<(), String>;
}

/// The content type of [`Observed::metrics`].
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn answer(status: StatusCode, content_type: &str, text: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub async fn serve(source: Arc<dyn Observed>, listener: tokio::net::TcpListener, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let source = source.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let source = source.clone();
            async move {
                let text = "text/plain; charset=utf-8";
                let r = match req.uri().path() {
                    "/metrics" => answer(StatusCode::OK, METRICS_CONTENT_TYPE, source.metrics()),
                    "/healthz" => answer(StatusCode::OK, text, "ok\n".into()),
                    "/readyz" => match source.ready() {
                        Ok(()) => answer(StatusCode::OK, text, "ready\n".into()),
                        Err(why) => answer(StatusCode::SERVICE_UNAVAILABLE, text, format!("not ready: {why}\n")),
                    },
                    _ => answer(StatusCode::NOT_FOUND, text, "/metrics, /healthz or /readyz\n".into()),
                };
                Ok::<_, std::convert::Infallible>(r)
            }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(30), conn).await {
                debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}
