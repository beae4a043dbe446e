//! `serve()`: builds the services (sync, health, reflection), serves until
//! shutdown, drains, and closes the store.

use std::future::Future;

use futures_util::TryStreamExt;
use tokio::net::TcpListener;
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    auth::{Auth, overload::OverloadLayer},
    config::Config,
    metrics::Metrics,
    pb::{
        self, admin_service_server::AdminServiceServer,
        replication_service_server::ReplicationServiceServer,
        sync_service_server::SyncServiceServer,
    },
    replication::{self, Node, admin::AdminApi, source::ReplicationApi},
    service::{Settings, SyncApi},
    shutdown::CancellationToken,
    store::{self, Store},
};

/// How often the auth file and TLS certificates are checked for changes.
const AUTH_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] store::StoreError),
    /// The node's cluster state could not be set up.
    #[error("replication: {0}")]
    Replication(#[from] crate::error::Error),
    /// Reflection descriptors did not load.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Opens the store described by `config` and serves on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with(config, store::Options::default(), listener, shutdown).await
}

/// As [`serve`], with store options (e.g. an injected clock) chosen by the
/// caller; durability settings still come from `config`.
pub async fn serve_with(
    config: Config,
    options: store::Options,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let options = store::Options {
        durability: config.durability,
        flush_interval: config.flush_interval,
        feed_capacity: config.feed_capacity,
        feed_max_bytes: config.feed_max_bytes,
        max_body_bytes: config.max_body_bytes,
        cache_bytes: config.cache_bytes,
        metrics: Metrics::new(config.metrics_collection_labels),
        ..options
    };
    let store = Store::open(&config.data_dir, options)?;
    let result = run(&config, store.clone(), listener, shutdown).await;
    store.close().await;
    tracing::info!("store closed");
    result
}

async fn run(
    config: &Config,
    store: Store,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let streams = CancellationToken::new();
    // A primary's Follow streams end after the pushes in flight at shutdown
    // were answered, so those waiting for --sync-replicas acks get them.
    let follows = CancellationToken::new();
    let metrics = store.metrics().clone();
    let auth = Auth::load(config.auth_file.as_deref())
        .map_err(ServeError::Config)?
        .with_metrics(metrics.clone());
    let mut cluster = replication::Settings::from_config(config);
    if config.advertise_url.is_none()
        && let Ok(addr) = listener.local_addr()
    {
        // The bound address (port 0 resolved); a node others reach by
        // another name says so with --advertise-url.
        cluster.advertise_url = format!("http://{addr}");
    }
    let node = Node::new(store.clone(), cluster, streams.clone())?;
    node.take_over().await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let compaction = tokio::spawn(store::compaction::run(
        store.clone(),
        config.retention(),
        config.compaction_interval,
        streams.clone(),
    ));
    // Readiness: a store that stops taking writes (a failed flush), or a
    // replica too far behind its primary, is reported not serving, so
    // probes and clients move away.
    if *node.watch_ready().borrow() {
        health.set_serving::<SyncServiceServer<SyncApi>>().await;
    } else {
        health.set_not_serving::<SyncServiceServer<SyncApi>>().await;
    }
    let readiness = tokio::spawn(report_readiness(
        store.writable(),
        node.watch_ready(),
        health.clone(),
    ));
    node.start_following();
    let api = SyncApi::new(node.clone(), Settings::from_config(config), streams.clone());
    // Who calls is decided here, once, for every service but health and
    // reflection (which stay open to probes and grpcurl).
    let sync = tonic::service::interceptor::InterceptedService::new(
        SyncServiceServer::new(api)
            .max_decoding_message_size(config.max_request_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        auth.interceptor(),
    );
    let replication_api = tonic::service::interceptor::InterceptedService::new(
        ReplicationServiceServer::new(ReplicationApi::new(node.clone(), follows.clone()))
            .max_encoding_message_size(usize::MAX),
        auth.interceptor(),
    );
    let admin = tonic::service::interceptor::InterceptedService::new(
        AdminServiceServer::new(AdminApi::new(node.clone())),
        auth.interceptor(),
    );
    if let Some(path) = &config.auth_file {
        tokio::spawn(crate::auth::watch(
            auth.clone(),
            path.clone(),
            AUTH_RELOAD_INTERVAL,
            streams.clone(),
        ));
    } else if listener
        .local_addr()
        .is_ok_and(|addr| !addr.ip().is_loopback())
    {
        tracing::warn!(
            "serving beyond loopback without --auth-file: anyone who reaches this port can read, write and replicate everything"
        );
    }

    // Bound before "serving gRPC" is logged, so a tool that waits for
    // that line has seen this address too.
    let metrics_http = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                ServeError::Config(format!("cannot bind --metrics-listen {addr}: {e}"))
            })?;
            let addr = listener.local_addr().unwrap_or(addr);
            // Tools that start the server on port 0 read the address from here.
            tracing::info!(%addr, "serving metrics");
            let node = node.clone();
            Some(tokio::spawn(crate::metrics::http::serve(
                listener,
                metrics.clone(),
                std::sync::Arc::new(move || node.metrics_sample()),
                streams.clone(),
            )))
        }
        None => None,
    };
    if let Ok(addr) = listener.local_addr() {
        // Tools that start the server on port 0 read the address from here.
        tracing::info!(%addr, "serving gRPC");
    }
    let draining = streams.clone();
    let (node_at_shutdown, follows_at_shutdown) = (node.clone(), follows.clone());
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: ending streams, finishing in-flight calls");
        readiness.abort();
        health.set_not_serving::<SyncServiceServer<SyncApi>>().await;
        draining.cancel();
        let (node, follows) = (node_at_shutdown, follows_at_shutdown);
        tokio::spawn(async move {
            node.close_pushes().await;
            follows.cancel();
        });
    };
    // Probes that speak only plaintext get health alone on a port of its own.
    let health_only = match config.health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                ServeError::Config(format!("cannot bind --health-listen {addr}: {e}"))
            })?;
            let addr = listener.local_addr().unwrap_or(addr);
            tracing::info!(%addr, "serving grpc.health.v1 alone, plaintext");
            let stop = streams.clone();
            Some(tokio::spawn(
                Server::builder()
                    .add_service(health_service.clone())
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        async move { stop.cancelled().await },
                    ),
            ))
        }
        None => None,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let files = crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls_client_ca.clone(),
            };
            let tls = crate::tls::Reloadable::new(files).map_err(ServeError::Config)?;
            tokio::spawn(crate::tls::watch(
                tls.clone(),
                AUTH_RELOAD_INTERVAL,
                streams.clone(),
            ));
            Some(tls)
        }
        _ => None,
    };
    let router = Server::builder()
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        // Calls cancelled by their deadline before the server took them up
        // look like HTTP/2 "rapid reset" to h2, whose default (20) closes
        // the whole connection; a connection's own stream limit still
        // bounds the reset work.
        .http2_max_pending_accept_reset_streams(Some(
            usize::try_from(config.max_streams_per_connection).unwrap_or(usize::MAX),
        ))
        // Outermost: calls the layers below refuse are counted too.
        .layer(metrics.rpc_layer())
        .layer(OverloadLayer::new(
            config.max_concurrent_requests,
            metrics.clone(),
        ))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(sync)
        .add_service(replication_api)
        .add_service(admin);
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(tls) => Box::pin(
            router.serve_with_incoming_shutdown(
                crate::tls::incoming(listener, tls, streams.clone())
                    .map_ok(crate::conn::Coalescing::new),
                signal,
            ),
        ),
        None => Box::pin(
            router.serve_with_incoming_shutdown(
                // Without TCP_NODELAY small responses wait out delayed ACKs (~40 ms).
                TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .map_ok(crate::conn::Coalescing::new),
                signal,
            ),
        ),
    };
    let grace = config.shutdown_grace;
    tokio::select! {
        result = server => result?,
        () = async { streams.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "calls still open after the grace period; stopping anyway");
        }
    }
    streams.cancel();
    follows.cancel();
    let _ = compaction.await;
    if let Some(health_only) = health_only {
        let _ = health_only.await;
    }
    if let Some(metrics_http) = metrics_http {
        let _ = metrics_http.await;
    }
    Ok(())
}

/// Keeps `deltasync.v1.SyncService`'s health at SERVING while the store
/// takes writes and the node is ready (a replica close enough to its
/// primary), NOT_SERVING otherwise. The empty service name (liveness) stays
/// SERVING while the process serves.
async fn report_readiness(
    mut writable: tokio::sync::watch::Receiver<bool>,
    mut ready: tokio::sync::watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
) {
    loop {
        let serving = *writable.borrow_and_update() && *ready.borrow_and_update();
        if serving {
            health.set_serving::<SyncServiceServer<SyncApi>>().await;
        } else {
            health.set_not_serving::<SyncServiceServer<SyncApi>>().await;
        }
        tokio::select! {
            changed = writable.changed() => if changed.is_err() { return },
            changed = ready.changed() => if changed.is_err() { return },
        }
    }
}
