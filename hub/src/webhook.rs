//! The Git webhook: GitHub and GitLab push events trigger a fetch at once instead of waiting for the poll
//! interval. A push only ever triggers a fetch; the content always comes from Git, so a forged event can do
//! no more than cause one early fetch. With a secret configured, events must prove it: GitHub's
//! `X-Hub-Signature-256` (HMAC-SHA256 of the body) or GitLab's `X-Gitlab-Token`.
//!
//! `POST /hooks/git`: 202 when a fetch was triggered, 200 when the event is understood but needs no fetch
//! (a ping, another branch), 401 on a missing or wrong signature, 400 on anything else.

use crate::git::Secret;
use crate::limits::{Refusal, SourceLimiter, SourceLimits, Tally};
use crate::server::Hub;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn, Instrument};

/// Bodies larger than this are refused (GitHub caps payloads at 25 MB; pushes are far smaller).
const MAX_BODY: usize = 5 << 20;
/// How long a request's body may take to arrive once its headers have (a slow-body stranger is cut off).
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// How long one connection may stay open, whatever it does (keep-alive included).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed at once (counted, logged once a minute). Far below the
/// process's open-file limit, so strangers can never starve agents and operators of file descriptors.
pub const MAX_CONNECTIONS: usize = 256;
/// How often refusals are logged (counted in between).
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(60);

/// What the webhook's strangers share: per-source limits and the tally of what was refused.
struct Guard {
    sources: std::sync::Mutex<SourceLimiter>,
    refused: std::sync::Mutex<Tally>,
}

impl Guard {
    fn refused(&self, what: &'static str) {
        let due = self.refused.lock().unwrap_or_else(|p| p.into_inner()).count(what, tokio::time::Instant::now());
        if let Some(counts) = due {
            let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            warn!(refused = %counts.join(", "), "webhook requests refused (counted since the last such line)");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A push to the followed branch: fetch now.
    Fetch { provider: &'static str, git_ref: String },
    /// Understood, nothing to do.
    Ignore(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    BadRequest(String),
}

/// Decides what a webhook request means. `header` looks a header up by lower-case name.
pub fn classify(
    header: &dyn Fn(&str) -> Option<String>,
    body: &[u8],
    secret: Option<&str>,
    branch: &str,
) -> Result<Verdict, Rejection> {
    let (provider, event) = if let Some(e) = header("x-github-event") {
        if let Some(secret) = secret {
            let sig = header("x-hub-signature-256")
                .ok_or_else(|| Rejection::Unauthorized("X-Hub-Signature-256 is missing".into()))?;
            let hex_sig = sig
                .strip_prefix("sha256=")
                .ok_or_else(|| Rejection::Unauthorized("X-Hub-Signature-256 must start with sha256=".into()))?;
            let expected =
                hex::decode(hex_sig).map_err(|_| Rejection::Unauthorized("X-Hub-Signature-256 is not hex".into()))?;
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .map_err(|_| Rejection::Unauthorized("unusable secret".into()))?;
            mac.update(body);
            mac.verify_slice(&expected)
                .map_err(|_| Rejection::Unauthorized("X-Hub-Signature-256 does not match the body".into()))?;
        }
        ("github", e)
    } else if let Some(e) = header("x-gitlab-event") {
        if let Some(secret) = secret {
            let token =
                header("x-gitlab-token").ok_or_else(|| Rejection::Unauthorized("X-Gitlab-Token is missing".into()))?;
            // Compare digests, so the comparison takes the same time wherever the token differs.
            if Sha256::digest(token.as_bytes()) != Sha256::digest(secret.as_bytes()) {
                return Err(Rejection::Unauthorized("X-Gitlab-Token is wrong".into()));
            }
        }
        ("gitlab", e)
    } else {
        return Err(Rejection::BadRequest(
            "not a GitHub or GitLab event (no X-GitHub-Event or X-Gitlab-Event header)".into(),
        ));
    };
    match (provider, event.as_str()) {
        ("github", "ping") => return Ok(Verdict::Ignore("ping".into())),
        ("github", "push") | ("gitlab", "Push Hook") => {}
        (_, other) => return Ok(Verdict::Ignore(format!("{provider} event {other:?} is not a push"))),
    }
    let payload: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Rejection::BadRequest(format!("the {provider} push payload is not JSON: {e}")))?;
    let git_ref = payload
        .get("ref")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| Rejection::BadRequest(format!("the {provider} push payload has no ref")))?
        .to_string();
    if git_ref != format!("refs/heads/{branch}") {
        return Ok(Verdict::Ignore(format!("push to {git_ref}; following refs/heads/{branch}")));
    }
    Ok(Verdict::Fetch { provider, git_ref })
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "message": message }).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

async fn handle(
    hub: Arc<Hub>,
    secret: Option<Secret>,
    branch: String,
    guard: &Guard,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let limited =
        guard.sources.lock().unwrap_or_else(|p| p.into_inner()).request(peer.ip(), tokio::time::Instant::now());
    if limited.is_err() {
        guard.refused("over the per-source rate");
        return reply(StatusCode::TOO_MANY_REQUESTS, "too many requests from this address; slow down");
    }
    if req.uri().path() != "/hooks/git" {
        return reply(StatusCode::NOT_FOUND, "the webhook is at POST /hooks/git");
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    let headers = req.headers().clone();
    let body = match tokio::time::timeout(BODY_DEADLINE, Limited::new(req.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return reply(StatusCode::PAYLOAD_TOO_LARGE, &format!("reading the body failed: {e}")),
        Err(_) => {
            let why = format!("the body did not arrive within {} s", BODY_DEADLINE.as_secs());
            return reply(StatusCode::REQUEST_TIMEOUT, &why);
        }
    };
    let secret = match secret.as_ref().map(Secret::read).transpose() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "reading the webhook secret failed");
            return reply(StatusCode::INTERNAL_SERVER_ERROR, "the hub cannot read its webhook secret");
        }
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    match classify(&header, &body, secret.as_deref(), &branch) {
        Ok(Verdict::Fetch { provider, git_ref }) => {
            info!(provider, %git_ref, "push event: fetching now");
            hub.refresh();
            reply(StatusCode::ACCEPTED, "fetching")
        }
        Ok(Verdict::Ignore(why)) => {
            debug!(%why, "webhook event needs no fetch");
            reply(StatusCode::OK, &why)
        }
        Err(Rejection::Unauthorized(why)) => {
            debug!(%why, %peer, "webhook event refused");
            guard.refused("unauthorized");
            reply(StatusCode::UNAUTHORIZED, &why)
        }
        Err(Rejection::BadRequest(why)) => reply(StatusCode::BAD_REQUEST, &why),
    }
}

/// Serves the webhook on `listener` until the hub shuts down.
pub async fn serve(hub: Arc<Hub>, listener: tokio::net::TcpListener, secret: Option<Secret>, branch: String) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let shutdown = hub.shutdown_token();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let guard = Arc::new(Guard {
        sources: std::sync::Mutex::new(SourceLimiter::new(SourceLimits::default())),
        refused: std::sync::Mutex::new(Tally::new(REFUSALS_LOGGED_EVERY)),
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "webhook accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Full: closed at once, counted, logged once a minute rather than once per stranger.
                    drop(stream);
                    guard.refused("connections over the cap");
                    continue;
                };
                let admitted =
                    guard.sources.lock().unwrap_or_else(|p| p.into_inner()).connect(peer.ip(), tokio::time::Instant::now());
                if let Err(why) = admitted {
                    drop(stream);
                    guard.refused(match why {
                        Refusal::Rate => "connections over the per-source rate",
                        Refusal::Connections => "connections over the per-source cap",
                    });
                    continue;
                }
                let (hub, secret, branch, g) = (hub.clone(), secret.clone(), branch.clone(), guard.clone());
                let svc = hyper::service::service_fn(move |req| {
                    let (hub, secret, branch, g) = (hub.clone(), secret.clone(), branch.clone(), g.clone());
                    async move { Ok::<_, std::convert::Infallible>(handle(hub, secret, branch, &g, peer, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                let fut = graceful.watch(conn);
                let g = guard.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let _open = OpenConnection(g, peer);
                    match tokio::time::timeout(CONNECTION_LIFETIME, fut).await {
                        Ok(Err(e)) => debug!(%peer, error = %e, "webhook connection ended with an error"),
                        Err(_) => debug!(%peer, "webhook connection closed: open too long"),
                        Ok(Ok(())) => {}
                    }
                }.instrument(tracing::debug_span!("webhook-conn")));
            }
            _ = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
}

/// An admitted connection: counted open for its source until it ends.
struct OpenConnection(Arc<Guard>, SocketAddr);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.sources.lock().unwrap_or_else(|p| p.into_inner()).disconnect(self.1.ip());
    }
}

/// The address the webhook would be served at, for logs.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/hooks/git")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    const PUSH: &[u8] = br#"{"ref": "refs/heads/main", "after": "abc"}"#;

    #[test]
    fn github_pushes_need_a_valid_signature() {
        let good = sign("s3cret", PUSH);
        let h = headers(&[("x-github-event", "push"), ("x-hub-signature-256", &good)]);
        assert_eq!(
            classify(&h, PUSH, Some("s3cret"), "main"),
            Ok(Verdict::Fetch { provider: "github", git_ref: "refs/heads/main".into() })
        );
        let forged = sign("guess", PUSH);
        let h = headers(&[("x-github-event", "push"), ("x-hub-signature-256", &forged)]);
        assert_eq!(
            classify(&h, PUSH, Some("s3cret"), "main"),
            Err(Rejection::Unauthorized("X-Hub-Signature-256 does not match the body".into()))
        );
        let h = headers(&[("x-github-event", "push")]);
        assert!(matches!(classify(&h, PUSH, Some("s3cret"), "main"), Err(Rejection::Unauthorized(_))));
        // Without a secret configured, the event is taken as it comes (it can only trigger a fetch).
        assert!(matches!(classify(&h, PUSH, None, "main"), Ok(Verdict::Fetch { .. })));
    }

    #[test]
    fn gitlab_pushes_need_the_token() {
        let h = headers(&[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "s3cret")]);
        assert!(matches!(classify(&h, PUSH, Some("s3cret"), "main"), Ok(Verdict::Fetch { provider: "gitlab", .. })));
        let h = headers(&[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "nope")]);
        assert_eq!(
            classify(&h, PUSH, Some("s3cret"), "main"),
            Err(Rejection::Unauthorized("X-Gitlab-Token is wrong".into()))
        );
    }

    #[test]
    fn other_events_and_branches_need_no_fetch() {
        let h = headers(&[("x-github-event", "ping")]);
        assert_eq!(classify(&h, b"{}", None, "main"), Ok(Verdict::Ignore("ping".into())));
        let h = headers(&[("x-github-event", "push")]);
        assert_eq!(
            classify(&h, br#"{"ref": "refs/heads/dev"}"#, None, "main"),
            Ok(Verdict::Ignore("push to refs/heads/dev; following refs/heads/main".into()))
        );
        let h = headers(&[("x-gitlab-event", "Tag Push Hook")]);
        assert!(matches!(classify(&h, PUSH, None, "main"), Ok(Verdict::Ignore(_))));
        let h = headers(&[("x-github-event", "push")]);
        assert!(matches!(classify(&h, b"not json", None, "main"), Err(Rejection::BadRequest(_))));
        let h = headers(&[("content-type", "application/json")]);
        assert!(matches!(classify(&h, PUSH, None, "main"), Err(Rejection::BadRequest(_))));
    }
}
