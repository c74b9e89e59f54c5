//! Binds the gRPC and HTTP listeners and runs them until told to stop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::ServiceExt;

use self::connections::Protocol;

use crate::http::HttpToken;
use crate::limiter::{Call, Limiter};
use crate::metrics::{self, Outcome};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use crate::proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::RateLimitServiceServer as KuadrantServer;
use crate::reload::watch_limits;
use crate::request::RequestBounds;
use crate::rls::headers::RateLimitHeaders;
use crate::rls::refusal::OverLimitResponse;
use crate::rls::{Answers, RateLimitServer};
use crate::status::ServerStatus;
use crate::telemetry::Tracer;

/// How often expired counters are swept from storage.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);

/// How often the storage's health is checked.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

mod connections;
mod tls;

pub use self::tls::{Tls, TlsFiles};

/// Defaults of [`Connections`]. The two connection limits together stay well inside the 1024
/// open files many systems allow a process by default.
pub const DEFAULT_RLS_MAX_CONNECTIONS: u32 = 800;
pub const DEFAULT_HTTP_MAX_CONNECTIONS: u32 = 100;
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS: u64 = 30_000;
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS: u64 = 10_000;

/// How the listeners treat connections: how many each holds at once and how long a peer may
/// stay silent.
#[derive(Debug, Clone, Copy)]
pub struct Connections {
    /// Most connections the gRPC listener holds at once; past it, clients wait in the backlog.
    pub rls_max: usize,
    /// Most connections the HTTP listener holds at once.
    pub http_max: usize,
    /// HTTP API: the longest wait for a request's headers (from the connection's start or the
    /// previous answer, so also how long an idle keep-alive connection is kept) and for the
    /// rest of the request and its answer (408 past it). gRPC: the longest wait for a new
    /// connection's HTTP/2 preface.
    pub header_read_timeout: Duration,
    /// gRPC: a PING after this long without traffic...
    pub http2_keepalive_interval: Duration,
    /// ...and the connection is closed when the PING is not acknowledged within this.
    pub http2_keepalive_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            rls_max: DEFAULT_RLS_MAX_CONNECTIONS as usize,
            http_max: DEFAULT_HTTP_MAX_CONNECTIONS as usize,
            header_read_timeout: Duration::from_millis(DEFAULT_HEADER_READ_TIMEOUT_MS),
            http2_keepalive_interval: Duration::from_millis(DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS),
            http2_keepalive_timeout: Duration::from_millis(DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub rls_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub rate_limit_headers: RateLimitHeaders,
    /// The body of an `OVER_LIMIT` answer (`--over-limit-response`).
    pub over_limit_response: OverLimitResponse,
    pub bounds: RequestBounds,
    /// The limits file to watch and hot-reload; `None` to keep the limits given at start.
    pub limits_file: Option<PathBuf>,
    /// Serve gRPC reflection (`grpc.reflection.v1` and `grpc.reflection.v1alpha`).
    pub grpc_reflection: bool,
    /// Namespace of the ASM-compatible HTTP endpoints.
    pub asm_namespace: String,
    /// Connection limits and timeouts of both listeners.
    pub connections: Connections,
    /// The bearer token the HTTP API requires on all but its open endpoints; `None`: open.
    pub http_auth_token: Option<HttpToken>,
    /// TLS on both listeners (mTLS on the gRPC one with a client CA), loaded with
    /// [`Tls::load`] and kept up to date with its files while serving; `None`: plain text.
    pub tls: Option<Arc<Tls>>,
    /// `--tracing-endpoint`: a span per gRPC call; `None`: no tracing.
    pub tracer: Option<Tracer>,
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
    let tls = settings.tls.clone();
    let rls_listener = bind(settings.rls_addr, "gRPC").await?;
    let http_listener = bind(settings.http_addr, "HTTP").await?;
    let rls_addr = rls_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let max_message = settings.bounds.max_message_bytes;
    let answers = Answers {
        headers: settings.rate_limit_headers,
        over_limit: settings.over_limit_response,
    };
    let rls = RateLimitServer::new(limiter.clone(), answers, settings.bounds)
        .traced_by(settings.tracer.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    // Reflection under both names: `grpc.reflection.v1` and the older `v1alpha` that many
    // tools (grpcio-reflection's client among them) still ask for.
    let reflection = if settings.grpc_reflection {
        let builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let v1 = builder().build_v1().map_err(std::io::Error::other)?;
        let v1alpha = builder().build_v1alpha().map_err(std::io::Error::other)?;
        Some((v1, v1alpha))
    } else {
        None
    };
    let mut routes = tonic::service::Routes::new(
        RateLimitServiceServer::new(rls.clone()).max_decoding_message_size(max_message),
    )
    .add_service(KuadrantServer::new(rls).max_decoding_message_size(max_message))
    .add_service(health_service);
    if let Some((v1, v1alpha)) = reflection {
        routes = routes.add_service(v1).add_service(v1alpha);
    }
    let routes = routes.prepare();
    let grpc = tower::service_fn(move |request| answer_grpc(routes.clone(), request));
    let limits = settings.connections;
    let protocol = Protocol::Http2 {
        handshake_timeout: limits.header_read_timeout,
        keepalive_interval: limits.http2_keepalive_interval,
        keepalive_timeout: limits.http2_keepalive_timeout,
    };
    let serving = connections::serve(
        rls_listener,
        protocol,
        tls.as_ref().map(|tls| tls.grpc.clone()),
        limits.rls_max,
        grpc,
        stopped.clone(),
    );
    tasks.spawn(infallible(serving));

    if let Some(tls) = tls.clone() {
        let watcher = tls::watch_files(tls, stopped.clone());
        tasks.spawn(infallible(watcher));
    }

    tasks.spawn(check_health(
        limiter.clone(),
        status.clone(),
        health,
        stopped.clone(),
    ));
    if let Some(path) = settings.limits_file.clone() {
        let watcher = watch_limits(path, limiter.clone(), status.clone(), stopped.clone());
        tasks.spawn(infallible(watcher));
    }

    if settings.http_auth_token.is_none() && !http_addr.ip().is_loopback() {
        tracing::warn!(
            %http_addr,
            "the HTTP API listens beyond loopback without a token: whoever reaches it can read \
             and change counters (set --http-auth-token or --http-auth-token-file)"
        );
    }
    let router = crate::http::router(
        limiter.clone(),
        status,
        settings.bounds,
        settings.asm_namespace.clone(),
        settings.http_auth_token.clone(),
    );
    let request_timeout = limits.header_read_timeout;
    let http =
        tower::service_fn(move |request| answer_http(router.clone(), request_timeout, request));
    let protocol = Protocol::Http1 {
        header_read_timeout: limits.header_read_timeout,
    };
    let serving = connections::serve(
        http_listener,
        protocol,
        tls.as_ref().map(|tls| tls.http.clone()),
        limits.http_max,
        http,
        stopped.clone(),
    );
    tasks.spawn(infallible(serving));

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

    tracing::info!(%rls_addr, %http_addr, tls = tls.is_some(), mtls = tls.as_ref().is_some_and(|tls| tls.mutual()), "listening: gRPC rate limit services and HTTP API");
    Ok(Running {
        rls_addr,
        http_addr,
        stop,
        tasks,
    })
}

/// Binds a listener; its error names the address (and which listener) it was for.
async fn bind(addr: SocketAddr, listener: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{listener} on {addr}: {e}")))
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

/// One gRPC call: routed to its service, bounded by the client's `grpc-timeout` (answered as
/// tonic's own server does), refusals by tonic rewritten and counted ([`refused_by_tonic`]).
async fn answer_grpc(
    routes: tonic::service::Routes,
    request: http::Request<Incoming>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let started = Instant::now();
    let call = rpc_of(request.uri().path());
    let deadline = grpc_timeout(request.headers());
    let answer = routes.oneshot(request);
    let response = match deadline {
        Some(deadline) => match tokio::time::timeout(deadline, answer).await {
            Ok(response) => response?,
            Err(_) => tonic::Status::cancelled("Timeout expired").into_http(),
        },
        None => answer.await?,
    };
    Ok(refused_by_tonic(response, call, started))
}

/// One HTTP call, bounded by `timeout`: a body trickling in (or an answer that cannot be
/// made) holds neither the connection nor a shutdown longer than that (408).
async fn answer_http(
    router: axum::Router,
    timeout: Duration,
    request: http::Request<Incoming>,
) -> Result<axum::response::Response, Infallible> {
    match tokio::time::timeout(timeout, router.oneshot(request)).await {
        Ok(answer) => answer,
        Err(_) => Ok((
            http::StatusCode::REQUEST_TIMEOUT,
            "the request did not arrive in time",
        )
            .into_response()),
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
    let mut evictions = EvictionCheck::default();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped.changed() => return Ok(()),
        }
        let storage = limiter.storage();
        let reachable = storage.ping().await.is_ok();
        if reachable {
            evictions.check(storage.as_ref(), &status).await;
        }
        if let Some(count) = storage.live_counters() {
            metrics::active_counters(count);
        }
        metrics::upkeep();
        status.set_storage_reachable(reachable);
        let ready = status.is_ready();
        if last == Some((reachable, ready)) {
            continue;
        }
        let previous = last.replace((reachable, ready));
        metrics::storage_reachable(reachable);
        let serving = if ready {
            // Coming back is said as loudly as going away (the first check says nothing).
            if previous.is_some() {
                tracing::warn!(
                    storage_reachable = reachable,
                    "ready again: health is SERVING"
                );
            }
            ServingStatus::Serving
        } else {
            let reason = status.not_ready_because().unwrap_or_default();
            tracing::warn!(%reason, "not ready: health is NOT_SERVING");
            ServingStatus::NotServing
        };
        health.set_service_status("", serving).await;
        for service in SERVICES {
            health.set_service_status(service, serving).await;
        }
    }
}

/// Whether the storage may evict live counters (resetting budgets without a trace), asked when
/// it is first reached and every [`EVICTION_EVERY`] after: said loudly when it changes, kept in
/// `/status`, a metric and (with `--refuse-evicting-storage`) readiness.
#[derive(Default)]
struct EvictionCheck {
    next: Option<tokio::time::Instant>,
    last: Option<Result<Option<String>, String>>,
}

/// How often the storage's eviction setting is asked again (it can be changed at run time).
const EVICTION_EVERY: Duration = Duration::from_secs(60);

impl EvictionCheck {
    async fn check(&mut self, storage: &dyn crate::storage::Storage, status: &ServerStatus) {
        let now = tokio::time::Instant::now();
        if self.next.is_some_and(|next| now < next) {
            return;
        }
        self.next = Some(now + EVICTION_EVERY);
        let seen = storage.evicts().await.map_err(|e| e.to_string());
        if self.last.as_ref() == Some(&seen) {
            return;
        }
        match &seen {
            Ok(Some(reason)) => tracing::error!(
                %reason,
                "the storage may EVICT live counters: budgets would reset silently when it is full; \
                 set maxmemory-policy noeviction (see docs/redis.md)"
            ),
            Ok(None) => tracing::info!("the storage does not evict counters"),
            Err(error) => tracing::info!(%error, "cannot tell whether the storage evicts counters"),
        }
        let evicts = seen.as_ref().ok().cloned().flatten();
        metrics::storage_may_evict(evicts.is_some());
        status.set_storage_evicts(evicts);
        self.last = Some(seen);
    }
}

/// A task that cannot fail, as one of the server's tasks.
async fn infallible(task: impl Future<Output = ()>) -> std::io::Result<()> {
    task.await;
    Ok(())
}

/// The services health reports on, by their full gRPC names.
const SERVICES: [&str; 2] = [
    crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::SERVICE_NAME,
    crate::proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::SERVICE_NAME,
];

/// The client's deadline from its `grpc-timeout` header (up to 8 digits and a unit: `H`,
/// `M`, `S`, `m`, `u`, `n`); `None` when absent or malformed.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let unit = value.get(value.len().checked_sub(1)?..)?;
    let digits = value.get(..value.len() - 1)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Rewrites the status of a call tonic refused before our handlers saw it to what the
/// contract says, and counts it as an invalid call of its RPC (`call`, when it is one of ours):
/// - an oversized message: OUT_OF_RANGE becomes RESOURCE_EXHAUSTED (what gRPC itself uses for
///   "message larger than max");
/// - a body that does not decode as the method's message: INTERNAL becomes INVALID_ARGUMENT
///   (the client's error; INTERNAL would say the server's).
fn refused_by_tonic<B>(
    mut response: http::Response<B>,
    call: Option<Call>,
    started: Instant,
) -> http::Response<B> {
    const OUT_OF_RANGE: &str = "11";
    const RESOURCE_EXHAUSTED: &str = "8";
    const INTERNAL: &str = "13";
    const INVALID_ARGUMENT: &str = "3";
    let Some(code) = response.headers().get("grpc-status") else {
        return response;
    };
    let rewritten = if code == OUT_OF_RANGE {
        RESOURCE_EXHAUSTED
    } else if code == INTERNAL
        && tonic::Status::from_header_map(response.headers())
            .is_some_and(|status| status.message().starts_with(DECODE_ERROR))
    {
        INVALID_ARGUMENT
    } else {
        return response;
    };
    response
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from_static(rewritten));
    if let Some(call) = call {
        metrics::rpc(call, Outcome::Invalid, started.elapsed());
    }
    response
}

/// How prost's decode errors start (tonic passes them on as the status message).
const DECODE_ERROR: &str = "failed to decode Protobuf message";

/// The rate-limit RPC a gRPC path names (`/<package>.<Service>/<Method>`), if any.
fn rpc_of(path: &str) -> Option<Call> {
    let method = path.rsplit('/').next()?;
    Call::ALL.into_iter().find(|call| call.name() == method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_reads_every_unit_and_refuses_the_rest() {
        let read = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", http::HeaderValue::from_str(value).unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(read("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(read("3M"), Some(Duration::from_secs(180)));
        assert_eq!(read("20S"), Some(Duration::from_secs(20)));
        assert_eq!(read("20m"), Some(Duration::from_millis(20)));
        assert_eq!(read("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(read("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "20", "20x", "+2m", "-2m", "123456789m", "2 m", "é"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn rpcs_are_named_by_the_last_path_segment() {
        let envoy = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
        assert_eq!(rpc_of(envoy), Some(Call::ShouldRateLimit));
        let kuadrant = "/kuadrant.service.ratelimit.v1.RateLimitService/Report";
        assert_eq!(rpc_of(kuadrant), Some(Call::Report));
        assert_eq!(rpc_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(rpc_of(""), None);
    }
}
