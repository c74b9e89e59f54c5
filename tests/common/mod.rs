//! A ratekeeper server started in this process on free loopback ports, with a clock the test
//! drives, and clients for its gRPC services and HTTP API.
#![allow(dead_code)]

pub mod child;
pub mod envoy;
pub mod process;
pub mod redis;
pub mod stack;
pub mod transcript;
pub mod upstream;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use ratekeeper::clock::ManualClock;
use ratekeeper::limiter::{Decided, Limiter, Observer, Reservations};
use ratekeeper::limits::{
    EvalError, FixedLimits, Limit, RATE_LIMIT_CONFIG, RatelimitSettings, load_path,
    parse_rate_limit_config,
};
use ratekeeper::metrics::Prometheus;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ratekeeper::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratekeeper::proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use ratekeeper::request::RequestBounds;
use ratekeeper::rls::headers::RateLimitHeaders;
use ratekeeper::rls::refusal::OverLimitResponse;
use ratekeeper::server::{self, Running, Settings};
use ratekeeper::status::ServerStatus;
use ratekeeper::storage::{
    CounterSnapshot, MemoryStorage, PageRequest, RedisStorage, Storage, StorageError,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::Channel;

/// 2026-01-01T00:00:00Z: tests start at a fixed, realistic time.
pub const START_MS: u64 = 1_767_225_600_000;

/// The server's observer: Prometheus, as in production, plus a count of failed evaluations.
pub struct Counting {
    metrics: Prometheus,
    pub evaluation_errors: AtomicUsize,
    /// Cost expressions that failed (the call's own hits were charged).
    pub cost_errors: AtomicUsize,
}

impl Observer for Counting {
    fn decided(&self, decided: &Decided<'_>) {
        self.metrics.decided(decided);
    }

    fn evaluation_failed(&self, namespace: &str, limit: &Limit, error: &EvalError) {
        self.evaluation_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.evaluation_failed(namespace, limit, error);
    }

    fn cost_failed(&self, namespace: &str, limit: &Limit, why: &str) {
        self.cost_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.cost_failed(namespace, limit, why);
    }

    fn refunded(&self, limit: &Limit, amount: u64) {
        self.metrics.refunded(limit, amount);
    }

    fn storage_called(&self, elapsed: Duration) {
        self.metrics.storage_called(elapsed);
    }

    fn storage_failed(&self, error: &StorageError) {
        self.metrics.storage_failed(error);
    }
}

pub struct TestServer {
    pub clock: Arc<ManualClock>,
    /// What the limiter reported.
    pub observed: Arc<Counting>,
    pub status: Arc<ServerStatus>,
    pub limiter: Arc<Limiter>,
    pub http_base: String,
    running: Option<Running>,
    pub envoy: RateLimitServiceClient<Channel>,
    pub kuadrant: KuadrantClient<Channel>,
    limits_path: std::path::PathBuf,
    _limits_dir: tempfile::TempDir,
}

/// Where the server under test keeps its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    RedisCluster,
}

pub struct Options {
    pub backend: Backend,
    pub headers: RateLimitHeaders,
    pub over_limit_response: OverLimitResponse,
    pub bounds: RequestBounds,
    pub capacity: usize,
    pub grpc_reflection: bool,
    pub limit_name_in_labels: bool,
    /// Content written over the limits file after it is loaded and before the server starts:
    /// an edit that lands while the server is starting.
    pub edited_while_starting: Option<String>,
    /// ASM's `RATE_LIMIT_CONFIG` rules (JSON), in the namespace `asm`, beside the file's.
    pub asm_rate_limit_config: Option<String>,
    /// A Redis the test owns, instead of the backend's shared one.
    pub redis_url: Option<String>,
    /// How reservations work (`--max-reservation-*`, `--disable-reservations`).
    pub reservations: Reservations,
    /// envoyproxy/ratelimit's settings (`SHADOW_MODE`, `QUOTA_MODE`, ...) for files of its
    /// format.
    pub ratelimit: RatelimitSettings,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            headers: RateLimitHeaders::None,
            over_limit_response: OverLimitResponse::None,
            bounds: RequestBounds::default(),
            capacity: 10_000,
            grpc_reflection: false,
            limit_name_in_labels: false,
            edited_while_starting: None,
            asm_rate_limit_config: None,
            redis_url: None,
            reservations: Reservations::default(),
            ratelimit: RatelimitSettings::default(),
        }
    }
}

impl TestServer {
    pub async fn start(limits_yaml: &str) -> Self {
        Self::start_with(limits_yaml, Options::default()).await
    }

    pub async fn on(backend: Backend, limits_yaml: &str) -> Self {
        let options = Options {
            backend,
            ..Options::default()
        };
        Self::start_with(limits_yaml, options).await
    }

    pub async fn start_with(limits_yaml: &str, options: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.yaml");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(limits_yaml.as_bytes())
            .unwrap();
        let mut limits = load_path(&path, options.ratelimit).unwrap();
        if let Some(json) = &options.asm_rate_limit_config {
            let rules = parse_rate_limit_config(json, "asm").unwrap();
            let fixed = FixedLimits::new(RATE_LIMIT_CONFIG, "asm", rules);
            limits = limits
                .with_fixed("limits.yaml", Some(Arc::new(fixed)))
                .unwrap();
        }
        if let Some(edited) = &options.edited_while_starting {
            std::fs::write(&path, edited).unwrap();
        }
        let clock = Arc::new(ManualClock::new(START_MS));
        ratekeeper::metrics::install().unwrap();
        let observed = Arc::new(Counting {
            metrics: Prometheus::new(options.limit_name_in_labels),
            evaluation_errors: AtomicUsize::new(0),
            cost_errors: AtomicUsize::new(0),
        });
        let limiter = Arc::new(
            Limiter::new(limits, storage(&options), clock.clone())
                .observed_by(observed.clone())
                .with_reservations(options.reservations),
        );
        let status = Arc::new(ServerStatus::default());
        let settings = Settings {
            rls_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            rate_limit_headers: options.headers,
            over_limit_response: options.over_limit_response,
            bounds: options.bounds,
            limits_file: Some(path.clone()),
            grpc_reflection: options.grpc_reflection,
            asm_namespace: "asm".to_string(),
            connections: Default::default(),
            http_auth_token: None,
            tls: None,
            tracer: None,
        };
        let running = server::start(settings, limiter.clone(), status.clone())
            .await
            .unwrap();
        let channel = grpc_channel(running.rls_addr).await.unwrap();
        Self {
            clock,
            observed,
            status,
            limiter,
            http_base: format!("http://{}", running.http_addr),
            running: Some(running),
            envoy: RateLimitServiceClient::new(channel.clone()),
            kuadrant: KuadrantClient::new(channel),
            limits_path: path,
            _limits_dir: dir,
        }
    }

    /// The limits file the server watches.
    pub fn limits_path(&self) -> &std::path::Path {
        &self.limits_path
    }

    pub fn rls_addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().unwrap().rls_addr
    }

    pub async fn should(&self, request: RateLimitRequest) -> RateLimitResponse {
        self.envoy
            .clone()
            .should_rate_limit(request)
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn check(&self, request: RateLimitRequest) -> RateLimitResponse {
        self.kuadrant
            .clone()
            .check_rate_limit(request)
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn report(&self, request: RateLimitRequest) -> RateLimitResponse {
        self.kuadrant
            .clone()
            .report(request)
            .await
            .unwrap()
            .into_inner()
    }

    /// Every live counter of a namespace (all the pages of its listing).
    pub async fn counters(&self, namespace: &str) -> Vec<(Arc<Limit>, CounterSnapshot)> {
        let mut counters = Vec::new();
        let mut cursor = None;
        loop {
            let page = PageRequest {
                cursor: cursor.as_deref(),
                ..PageRequest::default()
            };
            let page = self.limiter.counters(namespace, page).await.unwrap();
            counters.extend(page.items);
            match page.next {
                Some(next) => cursor = Some(next),
                None => return counters,
            }
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }
}

/// A storage for the backend; Redis ones get a key prefix of their own, so tests sharing a
/// server never see each other's counters.
fn storage(options: &Options) -> Arc<dyn Storage> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let prefix = format!(
        "test{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let url = match (options.backend, &options.redis_url) {
        (Backend::Memory, _) => return Arc::new(MemoryStorage::new(options.capacity)),
        (_, Some(url)) => url.clone(),
        (Backend::Redis, None) => redis::shared_url(),
        (Backend::RedisCluster, None) => redis::shared_cluster_url(),
    };
    Arc::new(RedisStorage::open(&url, &prefix, Duration::from_secs(2)).unwrap())
}

/// Every live counter of `limits` in `namespace`, straight from a storage (all the pages).
pub async fn list_all(
    storage: &dyn Storage,
    namespace: &str,
    limits: &[u64],
    now_ms: u64,
) -> Vec<CounterSnapshot> {
    let mut counters = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = PageRequest {
            cursor: cursor.as_deref(),
            ..PageRequest::default()
        };
        let page = storage
            .counters(namespace, limits, page, now_ms)
            .await
            .unwrap();
        counters.extend(page.items);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return counters,
        }
    }
}

/// Runs each scenario `async fn name(backend: Backend)` once per storage, as
/// `memory::name`, `redis::name` and `redis_cluster::name`.
#[macro_export]
macro_rules! on_every_storage {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::common::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::common::Backend::Redis).await })*
        }
        mod redis_cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::common::Backend::RedisCluster).await })*
        }
    };
}

/// A free loopback port for a server a test starts. Taken below the kernel's ephemeral range
/// (32768 and up), so no outgoing connection of this process (a client, a Redis connection)
/// can take it between now and the server binding it, and never the same twice in one test
/// process (tests run in parallel threads). Port + 10000 is free and below that range too: a
/// Redis Cluster node listens there for its bus. Each test binary starts at its own place.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 32_768 - 10_000 - FIRST;
    let start = (std::process::id() % 20) * 130;
    let free = |port: u32| std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok();
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start + n) % COUNT;
        if free(port) && free(port + 10_000) {
            return port as u16;
        }
    }
    panic!(
        "no free loopback port between {FIRST} and {}",
        FIRST + COUNT
    );
}

/// A gRPC channel to `addr` on loopback, for any of the clients (bounded: 5 s to connect,
/// 5 s per call).
pub async fn grpc_channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// An HTTP client for loopback (no proxy), bounded: 10 s per request.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap()
}

/// GETs `url` and parses its JSON body, asserting a success status (bounded: 5 s).
/// The body of `GET url` as text, whatever its status (bounded: 5 s).
pub async fn get_text(url: &str) -> String {
    let response = http_client()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    response
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let response = client
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let response = client
        .post(url)
        .json(body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert!(
        response.status().is_success(),
        "POST {url}: {}",
        response.status()
    );
    response
        .json()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: not JSON: {e}"))
}

/// A descriptor from (key, value) pairs, without its own hits_addend.
pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        limit: None,
        hits_addend: None,
        is_negative_hits: false,
    }
}

/// A descriptor that gives `hits` back (Envoy >= 1.38's `is_negative_hits`).
pub fn refund(entries: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(hits),
        is_negative_hits: true,
        ..descriptor(entries)
    }
}

/// A descriptor carrying its own hits_addend (Envoy >= 1.34).
pub fn descriptor_with_hits(entries: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(hits),
        ..descriptor(entries)
    }
}

pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors,
        hits_addend: hits,
    }
}

pub fn code(response: &RateLimitResponse) -> Code {
    Code::try_from(response.overall_code).unwrap()
}

pub fn header<'a>(response: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    response
        .response_headers_to_add
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// What a fixed-window counter has used (the tests' usual measure).
pub fn used(state: &ratekeeper::algorithm::CounterState) -> u64 {
    match state {
        ratekeeper::algorithm::CounterState::Window(w) => w.used,
        other => panic!("not a fixed window: {other:?}"),
    }
}
