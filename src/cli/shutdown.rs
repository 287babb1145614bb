//! When a long-running subcommand (`serve`, `runner`, `controller`, `webhook`) stops.

/// Resolves on SIGTERM (what the kubelet sends to stop a pod) or Ctrl-C. Without a
/// SIGTERM handler (it cannot be installed) only Ctrl-C stops the process.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
