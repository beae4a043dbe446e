//! Shutdown: the OS signal future, and the token that ends open streams.

pub use tokio_util::sync::CancellationToken;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes sends).
///
/// The handlers are installed when this is called, not when the future is
/// first polled: the server polls it only once it serves, and a SIGTERM
/// that comes while the store opens (a pod deleted as it starts) would
/// otherwise kill the process instead of stopping it cleanly.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            tokio::select! {
                () = received(interrupt, "SIGINT") => tracing::info!("SIGINT received"),
                () = received(terminate, "SIGTERM") => tracing::info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C received");
    }
}

/// Waits for a signal whose handler was installed, or forever if it could
/// not be.
#[cfg(unix)]
async fn received(handler: std::io::Result<tokio::signal::unix::Signal>, name: &str) {
    match handler {
        Ok(mut handler) => {
            handler.recv().await;
        }
        Err(e) => {
            tracing::error!(cause = %e, "cannot listen for {name}");
            std::future::pending::<()>().await;
        }
    }
}

/// Calls `on_tick(false)` every `interval` and `on_tick(true)` on SIGHUP,
/// until `shutdown`: how files that configure a running server (the auth
/// file, TLS certificates) are watched. The callee compares the files with
/// what it last read.
pub async fn every_change(
    interval: std::time::Duration,
    shutdown: CancellationToken,
    mut on_tick: impl FnMut(bool),
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup = async {
            match &mut hangup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        let forced = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => false,
            _ = hup => true,
        };
        on_tick(forced);
    }
}
