//! Binds the gRPC and HTTP listeners and runs them until told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::util::MapResponseLayer;

use crate::limiter::Limiter;
use crate::metrics;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use crate::proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::RateLimitServiceServer as KuadrantServer;
use crate::reload::watch_limits;
use crate::request::RequestBounds;
use crate::rls::RateLimitServer;
use crate::rls::headers::RateLimitHeaders;
use crate::status::ServerStatus;

/// How often expired counters are swept from storage.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);

/// How often the storage's health is checked.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Settings {
    pub rls_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub rate_limit_headers: RateLimitHeaders,
    pub bounds: RequestBounds,
    /// The limits file to watch and hot-reload; `None` to keep the limits given at start.
    pub limits_file: Option<PathBuf>,
    /// Serve gRPC reflection (`grpc.reflection.v1`).
    pub grpc_reflection: bool,
    /// Namespace of the ASM-compatible HTTP endpoints.
    pub asm_namespace: String,
}

/// A server that is listening; stop it with [`Running::shutdown`].
pub struct Running {
    pub rls_addr: SocketAddr,
    pub http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: JoinSet<std::io::Result<()>>,
}

/// Binds both listeners (port 0 picks a free port) and starts serving.
pub async fn start(
    settings: Settings,
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
) -> std::io::Result<Running> {
    let rls_listener = TcpListener::bind(settings.rls_addr).await?;
    let http_listener = TcpListener::bind(settings.http_addr).await?;
    let rls_addr = rls_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let max_message = settings.bounds.max_message_bytes;
    let rls = RateLimitServer::new(
        limiter.clone(),
        settings.rate_limit_headers,
        settings.bounds,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = if settings.grpc_reflection {
        let service = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(std::io::Error::other)?;
        Some(service)
    } else {
        None
    };
    let grpc = tonic::transport::Server::builder()
        .layer(MapResponseLayer::new(oversized_is_resource_exhausted))
        .add_service(
            RateLimitServiceServer::new(rls.clone()).max_decoding_message_size(max_message),
        )
        .add_service(KuadrantServer::new(rls).max_decoding_message_size(max_message))
        .add_service(health_service)
        .add_optional_service(reflection)
        .serve_with_incoming_shutdown(
            // Nagle's algorithm with delayed ACKs adds ~40 ms to small answers.
            TcpIncoming::from(rls_listener).with_nodelay(Some(true)),
            wait_for(stopped.clone()),
        );
    tasks.spawn(async move { grpc.await.map_err(std::io::Error::other) });

    tasks.spawn(check_health(
        limiter.clone(),
        status.clone(),
        health,
        stopped.clone(),
    ));
    if let Some(path) = settings.limits_file.clone() {
        let watcher = watch_limits(path, limiter.clone(), status.clone(), stopped.clone());
        tasks.spawn(async move {
            watcher.await;
            Ok(())
        });
    }

    let http = crate::http::router(
        limiter.clone(),
        status,
        settings.bounds,
        settings.asm_namespace.clone(),
    );
    let stop_http = wait_for(stopped.clone());
    tasks.spawn(async move {
        axum::serve(http_listener, http)
            .with_graceful_shutdown(stop_http)
            .await
    });

    let mut stop_sweeping = stopped;
    tasks.spawn(async move {
        let mut every = tokio::time::interval(RECLAIM_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    let limiter = limiter.clone();
                    let now = limiter.now_ms();
                    let _ = tokio::task::spawn_blocking(move || limiter.storage().reclaim_expired(now)).await;
                }
                _ = stop_sweeping.changed() => return Ok(()),
            }
        }
    });

    tracing::info!(%rls_addr, %http_addr, "listening: gRPC rate limit services and HTTP API");
    Ok(Running {
        rls_addr,
        http_addr,
        stop,
        tasks,
    })
}

impl Running {
    /// Stops accepting, lets in-flight calls finish, and returns once everything has stopped.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(e) => result = Err(std::io::Error::other(e)),
            }
        }
        result
    }
}

/// Follows the storage's health: gRPC health (NOT_SERVING while unreachable), readiness, and
/// the `datastore_partitioned` and active-counter metrics.
async fn check_health(
    limiter: Arc<Limiter>,
    status: Arc<ServerStatus>,
    health: HealthReporter,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut every = tokio::time::interval(HEALTH_EVERY);
    let mut last = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped.changed() => return Ok(()),
        }
        let storage = limiter.storage();
        let reachable = storage.ping().await.is_ok();
        if let Some(count) = storage.live_counters() {
            metrics::active_counters(count);
        }
        metrics::upkeep();
        if last == Some(reachable) {
            continue;
        }
        last = Some(reachable);
        status.set_storage_reachable(reachable);
        metrics::storage_reachable(reachable);
        let serving = if reachable {
            ServingStatus::Serving
        } else {
            tracing::warn!("storage unreachable: health is NOT_SERVING");
            ServingStatus::NotServing
        };
        health.set_service_status("", serving).await;
        for service in SERVICES {
            health.set_service_status(service, serving).await;
        }
    }
}

/// The services health reports on, by their full gRPC names.
const SERVICES: [&str; 2] = [
    crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::SERVICE_NAME,
    crate::proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::SERVICE_NAME,
];

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|&stop| stop).await;
}

/// tonic answers an oversized message with OUT_OF_RANGE; the contract says
/// RESOURCE_EXHAUSTED (what gRPC itself uses for "message larger than max").
fn oversized_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    const OUT_OF_RANGE: &str = "11";
    const RESOURCE_EXHAUSTED: &str = "8";
    if response
        .headers()
        .get("grpc-status")
        .is_some_and(|status| status == OUT_OF_RANGE)
    {
        response.headers_mut().insert(
            "grpc-status",
            http::HeaderValue::from_static(RESOURCE_EXHAUSTED),
        );
    }
    response
}
