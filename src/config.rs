//! Command line and environment, compatible with Limitador's for everything ratekeeper has:
//! `ratekeeper [OPTIONS] <LIMITS_FILE> [STORAGE]`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

pub mod ratelimit_env;

use crate::limiter::OnStorageError;
use crate::request::RequestBounds;
use crate::rls::headers::RateLimitHeaders;
use crate::rls::refusal::OverLimitResponse;
use crate::server::{
    Connections, DEFAULT_HEADER_READ_TIMEOUT_MS, DEFAULT_HTTP_MAX_CONNECTIONS,
    DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS, DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS,
    DEFAULT_RLS_MAX_CONNECTIONS, TlsFiles,
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ratekeeper",
    version,
    about = "Token-aware rate limiting for LLM APIs: Envoy's and Kuadrant's rate limit gRPC \
             services and Limitador's HTTP API, over limits from a Limitador-format YAML file.",
    after_help = "Storage defaults to `memory`. Every option can also be set through the \
                  environment variable shown; the command line wins."
)]
pub struct Cli {
    /// The limits file (Limitador's YAML format, or envoyproxy/ratelimit's), or a directory of
    /// such files. Optional with `--rate-limit-config` or RUNTIME_ROOT.
    #[arg(
        env = "LIMITS_FILE",
        value_name = "LIMITS_FILE",
        required_unless_present_any = ["rate_limit_config", "runtime_root", "config_type"]
    )]
    pub limits_file: Option<PathBuf>,

    /// envoyproxy/ratelimit's `CONFIG_TYPE`: `GRPC_XDS_SOTW` takes the limits from an xDS
    /// server (docs/from-envoy-ratelimit.md); read with its other variables.
    #[arg(long, env = "CONFIG_TYPE", value_name = "TYPE", hide = true)]
    pub config_type: Option<String>,

    /// envoyproxy/ratelimit's runtime root: without a limits file, limits are read from the
    /// directory RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY (default `config`).
    #[arg(long, env = "RUNTIME_ROOT", value_name = "DIR", hide = true)]
    pub runtime_root: Option<PathBuf>,

    /// Address the gRPC rate limit services listen on.
    #[arg(short = 'b', long, env = "ENVOY_RLS_HOST", default_value = "0.0.0.0")]
    pub rls_ip: IpAddr,

    /// Port of the gRPC rate limit services.
    #[arg(short = 'p', long, env = "ENVOY_RLS_PORT", default_value_t = 8081)]
    pub rls_port: u16,

    /// Address of the HTTP API.
    #[arg(short = 'B', long, env = "HTTP_API_HOST", default_value = "0.0.0.0")]
    pub http_ip: IpAddr,

    /// Port of the HTTP API.
    #[arg(short = 'P', long, env = "HTTP_API_PORT", default_value_t = 8080)]
    pub http_port: u16,

    /// Add a `limit_name` label to every per-limit metric.
    #[arg(short = 'l', long, env = "LIMIT_NAME_IN_PROMETHEUS_LABELS", value_parser = clap::builder::FalseyValueParser::new())]
    pub limit_name_in_labels: bool,

    /// Export a span per gRPC call (namespace, decision, refusing limit; a child span for the
    /// storage call) over OTLP/gRPC to this collector (`http://host:4317`), parented by the
    /// caller's W3C `traceparent`. Empty: no tracing (Limitador's flag).
    #[arg(long, env = "TRACING_ENDPOINT", value_name = "URL", default_value = "")]
    pub tracing_endpoint: String,

    /// A CEL expression over `descriptors` giving a map of extra labels (name → value) for
    /// authorized_calls, authorized_hits and limited_calls (Limitador's; e.g.
    /// `descriptors[1]`). Each label takes at most 100 values (later ones are `other`), and
    /// at most 16 label names come from it. See docs/operations.md.
    #[arg(long, value_name = "CEL")]
    pub metric_labels_default: Option<String>,

    /// A YAML file of custom labels for authorized_calls, authorized_hits and limited_calls:
    /// `label_name: <CEL expression over descriptors>` per line (Limitador's format). Each
    /// label takes at most 100 values (later ones are `other`); reloaded when it changes.
    #[arg(short = 'L', long, value_name = "FILE")]
    pub custom_metric_labels: Option<PathBuf>,

    /// Rate limit headers added to gRPC answers: X-RateLimit-Limit, -Remaining and -Reset (and
    /// Retry-After when over the limit) with DRAFT_VERSION_03.
    #[arg(
        short = 'H',
        long,
        env = "RATE_LIMIT_HEADERS",
        value_parser = PossibleValuesParser::new(["NONE", "DRAFT_VERSION_03"])
            .try_map(|s| s.parse::<RateLimitHeaders>()),
        default_value = "NONE"
    )]
    pub rate_limit_headers: RateLimitHeaders,

    /// What an OVER_LIMIT answer from ShouldRateLimit carries for the client: `none`, or
    /// `openai` (OpenAI's error body as `raw_body`, which Envoy sends as the 429's body, and
    /// `retry-after`/`retry-after-ms` headers, so OpenAI SDKs back off by themselves).
    #[arg(
        long,
        env = "OVER_LIMIT_RESPONSE",
        value_parser = PossibleValuesParser::new(["none", "openai"])
            .try_map(|s| s.parse::<OverLimitResponse>()),
        default_value = "none"
    )]
    pub over_limit_response: OverLimitResponse,

    /// Check the limits file, print the limits as loaded and exit (non-zero on errors).
    #[arg(long)]
    pub validate: bool,

    /// Log more: -v ratekeeper's debug lines (one per decision), -vv its trace lines, -vvv
    /// everything's trace (the HTTP/2 frames too). Default: info; RUST_LOG overrides.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log as JSON lines.
    #[arg(long, env = "STRUCTURED_LOGS", value_parser = clap::builder::FalseyValueParser::new())]
    pub structured_logs: bool,

    /// Serve gRPC reflection (grpc.reflection.v1 and v1alpha) on the gRPC port.
    #[arg(long, env = "GRPC_REFLECTION_SERVICE", value_parser = clap::builder::FalseyValueParser::new())]
    pub grpc_reflection_service: bool,

    /// On SIGTERM/SIGINT, how many seconds in-flight calls get to finish before exiting.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value_t = 10)]
    pub shutdown_timeout: u64,

    /// Longest wait for the storage, in milliseconds; past it the call fails as
    /// `--on-storage-error` says. Keep it below the gateway's own timeout (Envoy: 20 ms by default).
    #[arg(long, env = "STORAGE_TIMEOUT_MS", default_value_t = 100)]
    pub storage_timeout: u64,

    /// What a call gets when the storage fails or times out: `error` (gRPC UNAVAILABLE, so
    /// Envoy's failure_mode_deny decides; HTTP 500), `allow` (OK) or `deny` (OVER_LIMIT).
    #[arg(
        long,
        env = "ON_STORAGE_ERROR",
        value_parser = PossibleValuesParser::new(["error", "allow", "deny"])
            .try_map(|s| s.parse::<OnStorageError>()),
        default_value = "error"
    )]
    pub on_storage_error: OnStorageError,

    /// The most a reservation holds on a counter, as a fraction (above 0, at most 1) of its
    /// limit's `max_value` (a Reserve of more is admitted on its whole amount but holds only
    /// this much). Limitador's flag.
    #[arg(long, env = "MAX_RESERVATION_FRACTION", default_value_t = 0.5,
        value_parser = parse_fraction)]
    pub max_reservation_fraction: f64,

    /// The longest a reservation's hold lives, in seconds (a shorter `ttl` in the Reserve, or
    /// the end of a fixed window, ends it sooner).
    #[arg(long, env = "MAX_RESERVATION_TTL", default_value_t = 60)]
    pub max_reservation_ttl: u64,

    /// Answer Kuadrant's Reserve and Commit (and HTTP `/reserve`, `/commit`) with UNIMPLEMENTED
    /// (HTTP 501).
    #[arg(long, env = "DISABLE_RESERVATIONS", value_parser = clap::builder::FalseyValueParser::new())]
    pub disable_reservations: bool,

    /// Namespace whose limits the ASM-compatible endpoints (`GET /ratelimit`,
    /// `POST /update_ratelimit_record`) apply.
    #[arg(long, env = "ASM_NAMESPACE", default_value = "asm")]
    pub asm_namespace: String,

    /// A bearer token the HTTP API requires (`Authorization: Bearer <token>`) on every
    /// endpoint that changes or reveals counters; /metrics, /status, /healthz, /readyz and
    /// /limits/{ns} stay open. Without one, every endpoint is open (as in Limitador).
    #[arg(
        long,
        env = "HTTP_AUTH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub http_auth_token: Option<String>,

    /// Read the HTTP API's token from this file (e.g. a mounted Kubernetes secret);
    /// surrounding whitespace is ignored.
    #[arg(
        long,
        env = "HTTP_AUTH_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "http_auth_token"
    )]
    pub http_auth_token_file: Option<PathBuf>,

    /// Alibaba ASM's token rate limit rules, as its example service reads them: a JSON list of
    /// `{rate_limit_key_regex, max_tokens, tokens_per_fill, fill_interval_second,
    /// redis_expired_seconds}`, applied to the `--asm-namespace` (which the limits file must
    /// then leave alone).
    #[arg(long, env = "RATE_LIMIT_CONFIG", value_name = "JSON")]
    pub rate_limit_config: Option<String>,

    /// Not ready (HTTP /readyz 503, gRPC health NOT_SERVING) while the storage may evict live
    /// counters (Redis with a maxmemory-policy other than noeviction): an evicted counter is a
    /// budget reset without a trace. Without it, ratekeeper logs an error and serves.
    #[arg(long, env = "REFUSE_EVICTING_STORAGE", value_parser = clap::builder::FalseyValueParser::new())]
    pub refuse_evicting_storage: bool,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub bounds: BoundsArgs,

    #[command(flatten)]
    pub connections: ConnectionArgs,

    #[command(subcommand)]
    pub storage: Option<StorageCommand>,
}

/// TLS on the listeners ([`TlsFiles`]), as flags. Plain text without them.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Serve TLS on both listeners with this PEM certificate chain (with `--tls-key`). The
    /// files are checked every few seconds and a changed pair is used for new connections
    /// (cert-manager's rotations); a pair that does not load is logged and the old one kept.
    #[arg(long, env = "TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// mTLS on the gRPC listener: clients must present a certificate signed by a CA in this
    /// PEM file, or are refused at the handshake. The HTTP listener never asks for one.
    #[arg(
        long,
        env = "TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files TLS is served from; `None`: plain text (clap has checked that the
    /// certificate and the key come together).
    pub fn files(&self) -> Option<TlsFiles> {
        let (cert, key) = (self.tls_cert.clone()?, self.tls_key.clone()?);
        Some(TlsFiles {
            cert,
            key,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

/// Bounds on what one request may carry ([`RequestBounds`]), as flags.
#[derive(Debug, Clone, Copy, Args)]
pub struct BoundsArgs {
    /// Most descriptors in one request (INVALID_ARGUMENT beyond).
    #[arg(long, env = "MAX_DESCRIPTORS", default_value_t = 64)]
    pub max_descriptors: usize,

    /// Most entries in one descriptor (INVALID_ARGUMENT beyond).
    #[arg(long, env = "MAX_DESCRIPTOR_ENTRIES", default_value_t = 64)]
    pub max_descriptor_entries: usize,

    /// Longest descriptor key or value, in bytes (INVALID_ARGUMENT beyond).
    #[arg(long, env = "MAX_ENTRY_BYTES", default_value_t = 4096)]
    pub max_entry_bytes: usize,

    /// Largest gRPC message or HTTP body, in bytes (RESOURCE_EXHAUSTED / 413 beyond).
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
}

impl From<BoundsArgs> for RequestBounds {
    fn from(args: BoundsArgs) -> Self {
        Self {
            max_descriptors: args.max_descriptors,
            max_descriptor_entries: args.max_descriptor_entries,
            max_entry_bytes: args.max_entry_bytes,
            max_message_bytes: args.max_message_bytes,
        }
    }
}

/// Connection limits and timeouts of the listeners ([`Connections`]), as flags.
#[derive(Debug, Clone, Copy, Args)]
pub struct ConnectionArgs {
    /// Most connections the gRPC listener holds at once; past it, new clients wait in the
    /// kernel's backlog until one closes. Keep both limits below the open-file limit
    /// (`ulimit -n`).
    #[arg(long, env = "ENVOY_RLS_MAX_CONNECTIONS", default_value_t = DEFAULT_RLS_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rls_max_connections: u32,

    /// Most connections the HTTP API holds at once; past it, new clients wait.
    #[arg(long, env = "HTTP_API_MAX_CONNECTIONS", default_value_t = DEFAULT_HTTP_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,

    /// HTTP API: longest wait, in milliseconds, for a request's headers (from the connection's
    /// start or the previous answer, so idle keep-alive connections close after it) and again
    /// for the rest of the request and its answer (408). gRPC: longest wait for a new
    /// connection's HTTP/2 preface.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = DEFAULT_HEADER_READ_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout: u64,

    /// gRPC: milliseconds without traffic after which a connection is sent an HTTP/2 PING.
    #[arg(long, env = "HTTP2_KEEPALIVE_INTERVAL_MS", default_value_t = DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub http2_keepalive_interval: u64,

    /// gRPC: milliseconds a PING may go unacknowledged before the connection is closed.
    #[arg(long, env = "HTTP2_KEEPALIVE_TIMEOUT_MS", default_value_t = DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub http2_keepalive_timeout: u64,
}

impl From<ConnectionArgs> for Connections {
    fn from(args: ConnectionArgs) -> Self {
        Self {
            rls_max: args.rls_max_connections as usize,
            http_max: args.http_max_connections as usize,
            header_read_timeout: Duration::from_millis(args.header_read_timeout),
            http2_keepalive_interval: Duration::from_millis(args.http2_keepalive_interval),
            http2_keepalive_timeout: Duration::from_millis(args.http2_keepalive_timeout),
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum StorageCommand {
    /// Counters in this process's memory (the default).
    Memory(MemoryOptions),
    /// Counters in Redis or Redis Cluster, shared by every replica.
    Redis(RedisOptions),
    /// Limitador's cached Redis mode, accepted for compatibility: ratekeeper's `redis` already
    /// decides in one round trip, so this is `redis` and the cache options are ignored.
    #[command(name = "redis_cached")]
    RedisCached(RedisCachedOptions),
    /// Counters that survive restarts on one node, in a directory (Limitador's `disk`).
    Disk(DiskOptions),
}

/// Limitador's `disk` storage arguments (`disk [--optimize throughput|disk] PATH`).
#[derive(Debug, Clone, Args)]
pub struct DiskOptions {
    /// The directory of the counters' store (created if missing).
    #[arg(value_name = "PATH")]
    pub path: std::path::PathBuf,
    /// Limitador's RocksDB tuning (`throughput` or `disk`): accepted, no effect here.
    #[arg(long, value_parser = ["throughput", "disk"])]
    pub optimize: Option<String>,
    /// Most live counters held at once, as for `memory`.
    #[arg(short = 'c', long = "cache", env = "CACHE_SIZE", default_value_t = DEFAULT_COUNTERS)]
    pub cache: usize,
}

#[derive(Debug, Clone, Args)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS), or
    /// `redis+cluster://[user:password@]host1:port1,host2:port2` (`rediss+cluster://` for TLS).
    #[arg(env = "REDIS_URL", value_name = "URL")]
    pub url: String,

    /// Prefix of every key ratekeeper writes (lets several deployments share one Redis).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = DEFAULT_KEY_PREFIX)]
    pub key_prefix: String,
}

#[derive(Debug, Clone, Args)]
pub struct RedisCachedOptions {
    #[command(flatten)]
    pub redis: RedisOptions,
    /// Ignored (Limitador compatibility).
    #[arg(long)]
    pub batch_size: Option<u64>,
    /// Ignored (Limitador compatibility).
    #[arg(long)]
    pub flush_period: Option<u64>,
    /// Ignored (Limitador compatibility).
    #[arg(long)]
    pub max_cached: Option<u64>,
    /// Ignored (Limitador compatibility).
    #[arg(long)]
    pub response_timeout: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct MemoryOptions {
    /// Most live counters held at once. When reached, expired counters are reclaimed; if none
    /// has expired, a request that needs a new counter fails with RESOURCE_EXHAUSTED (live
    /// counters are never evicted).
    #[arg(short = 'c', long = "cache", env = "CACHE_SIZE", default_value_t = DEFAULT_COUNTERS)]
    pub cache: usize,
}

pub const DEFAULT_COUNTERS: usize = 1_000_000;

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            cache: DEFAULT_COUNTERS,
        }
    }
}

/// The default `--key-prefix` of Redis keys.
const DEFAULT_KEY_PREFIX: &str = "ratekeeper";

impl Cli {
    /// The storage to use: the subcommand, else Redis when REDIS_URL is set (as Limitador
    /// does), else Redis when ASM's REDIS_ADDRESS is set ([`asm_redis_url`]), else memory.
    pub fn storage(&self) -> Result<StorageCommand, String> {
        if let Some(storage) = &self.storage {
            return Ok(storage.clone());
        }
        let env = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let url = match (env("REDIS_URL"), env("REDIS_ADDRESS")) {
            // envoyproxy/ratelimit's REDIS_URL is an address, not a URL.
            (Some(address), _) if !address.contains("://") => {
                ratelimit_env::redis_url(&address, |name| std::env::var(name).ok())?
            }
            (Some(url), _) => url,
            (None, Some(address)) => asm_redis_url(
                &address,
                env("REDIS_PASSWORD").as_deref(),
                env("REDIS_DB_INDEX").as_deref(),
            )?,
            (None, None) => return Ok(StorageCommand::Memory(MemoryOptions::default())),
        };
        Ok(StorageCommand::Redis(RedisOptions {
            url,
            key_prefix: env("REDIS_KEY_PREFIX").unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_string()),
        }))
    }

    /// The command line and environment, with envoyproxy/ratelimit's variables applied where
    /// neither a flag nor ratekeeper's own variable is set (`GRPC_PORT`, `PORT`,
    /// `LIMIT_RESPONSE_HEADERS_ENABLED`); exits with the reason on bad input.
    pub fn parse_all() -> (Self, ratelimit_env::RatelimitEnv) {
        use clap::parser::ValueSource;
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().get_matches();
        let mut cli = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let ratelimit = ratelimit_env::read(|name| std::env::var(name).ok()).unwrap_or_else(|e| {
            Self::command()
                .error(clap::error::ErrorKind::InvalidValue, e)
                .exit()
        });
        let defaulted = |id: &str| matches.value_source(id) == Some(ValueSource::DefaultValue);
        if let (true, Some(port)) = (defaulted("rls_port"), ratelimit.rls_port) {
            cli.rls_port = port;
        }
        if let (true, Some(port)) = (defaulted("http_port"), ratelimit.http_port) {
            cli.http_port = port;
        }
        if defaulted("rate_limit_headers") && ratelimit.response_headers {
            cli.rate_limit_headers = RateLimitHeaders::EnvoyRatelimit;
        }
        let refuse = |message: &str| -> ! {
            Self::command()
                .error(clap::error::ErrorKind::ArgumentConflict, message)
                .exit()
        };
        if ratelimit.xds.is_some() {
            if cli.limits_file.is_some() {
                refuse(
                    "CONFIG_TYPE=GRPC_XDS_SOTW takes the limits from the xDS server: no limits file",
                );
            }
            cli.runtime_root = None;
        } else if cli.limits_file.is_none()
            && cli.runtime_root.is_none()
            && cli.rate_limit_config.is_none()
        {
            refuse("a limits file is required (or RUNTIME_ROOT, or RATE_LIMIT_CONFIG)");
        }
        (cli, ratelimit)
    }

    /// The limits path: the limits file, else envoyproxy/ratelimit's runtime directory.
    pub fn limits_path(&self) -> Option<PathBuf> {
        let runtime = self
            .runtime_root
            .as_ref()
            .map(|root| ratelimit_env::runtime_path(root, |name| std::env::var(name).ok()));
        self.limits_file.clone().or(runtime)
    }

    /// The tracing filter: RUST_LOG if set, else from `-v`.
    pub fn log_filter(&self) -> String {
        match std::env::var("RUST_LOG") {
            Ok(filter) if !filter.is_empty() => filter,
            _ => verbosity_filter(self.verbose).to_string(),
        }
    }
}

/// The tracing filter of `-v` repeated `count` times: more of ratekeeper's own lines, and only
/// at `-vvv` its dependencies' debug and trace lines (hyper's and h2's are HTTP/2 frame dumps).
pub fn verbosity_filter(count: u8) -> &'static str {
    match count {
        0 => "info",
        1 => "ratekeeper=debug,info",
        2 => "ratekeeper=trace,info",
        _ => "trace",
    }
}

/// The Redis URL of the environment variables Alibaba ASM's example token rate limit service
/// reads: `REDIS_ADDRESS` (`host:port`), `REDIS_PASSWORD` (sent as is to AUTH, so
/// `user:password` works where the server accepts that form) and `REDIS_DB_INDEX` (default 0).
pub fn asm_redis_url(
    address: &str,
    password: Option<&str>,
    db_index: Option<&str>,
) -> Result<String, String> {
    if address.contains(['/', '@', '?', '#']) || address.chars().any(char::is_whitespace) {
        return Err(format!("REDIS_ADDRESS must be host:port, not {address:?}"));
    }
    let db = match db_index {
        None => 0,
        Some(index) => index.trim().parse::<u32>().map_err(|_| {
            format!("REDIS_DB_INDEX must be a database number (0, 1, ...), not {index:?}")
        })?,
    };
    let auth = match password {
        Some(password) => format!(":{}@", percent_encode(password)),
        None => String::new(),
    };
    Ok(format!("redis://{auth}{address}/{db}"))
}

/// `text` with every byte but URL-unreserved ones (`A-Z a-z 0-9 - . _ ~`) as `%XX`.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A fraction greater than 0 and at most 1 (as Limitador takes `--max-reservation-fraction`).
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err(format!(
            "{text:?} is not a fraction greater than 0 and at most 1"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_fraction_is_above_0_and_at_most_1() {
        assert_eq!(parse_fraction("0.5"), Ok(0.5));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        for bad in ["0", "-0.1", "1.01", "NaN", "inf", "half", ""] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn asm_redis_variables_make_a_url() {
        assert_eq!(
            asm_redis_url("r-bp1.redis.rds.aliyuncs.com:6379", None, None),
            Ok("redis://r-bp1.redis.rds.aliyuncs.com:6379/0".to_string())
        );
        assert_eq!(
            asm_redis_url("10.0.0.1:6380", Some("MyP@ss:w/rd%"), Some("3")),
            Ok("redis://:MyP%40ss%3Aw%2Frd%25@10.0.0.1:6380/3".to_string())
        );
        assert!(
            asm_redis_url("h:1", None, Some("one"))
                .unwrap_err()
                .contains("REDIS_DB_INDEX")
        );
        assert!(
            asm_redis_url("redis://h:1", None, None)
                .unwrap_err()
                .contains("REDIS_ADDRESS")
        );
    }
}
