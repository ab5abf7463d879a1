//! What every Flotilla binary does last: a cancellation token that SIGINT or SIGTERM cancels, for graceful
//! shutdown. (Logging and traces: `telemetry`, feature `telemetry`.)

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT or SIGTERM. Must be called inside a tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}
