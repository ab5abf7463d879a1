//! `/healthz` and `/readyz` over plain HTTP (`--health-listen`), for Kubernetes probes. Live: the process
//! answers. Ready: it serves current state — a single hub once its store is open; a replica while its etcd
//! watch runs and it is at most [`crate::leader`]'s `LAG_READY` revisions behind etcd.

use crate::server::Hub;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

fn answer(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub async fn serve(hub: Arc<Hub>, listener: tokio::net::TcpListener) {
    let shutdown = hub.shutdown_token();
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
        let hub = hub.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let hub = hub.clone();
            async move {
                let r = match req.uri().path() {
                    "/healthz" => answer(StatusCode::OK, "ok\n".into()),
                    "/readyz" => match hub.shared.readiness() {
                        Ok(()) => answer(StatusCode::OK, "ready\n".into()),
                        Err(why) => answer(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                    },
                    _ => answer(StatusCode::NOT_FOUND, "/healthz or /readyz\n".into()),
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
                debug!(error = %e, "health connection ended with an error");
            }
        });
    }
}
