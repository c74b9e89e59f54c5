//! envoyproxy/ratelimit's environment variables, so its Kubernetes Deployment runs ratekeeper
//! with only the image changed. A pure function of the environment: [`read`] says what each
//! variable means here, and refuses what ratekeeper cannot honour (docs/from-envoy-ratelimit.md
//! has the table).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::limits::RatelimitSettings;
use crate::xds::XdsSettings;

/// What envoyproxy/ratelimit's variables ask of ratekeeper.
#[derive(Debug, Default, PartialEq)]
pub struct RatelimitEnv {
    /// `RUNTIME_ROOT`/`RUNTIME_SUBDIRECTORY`/`RUNTIME_APPDIRECTORY` (default `config`), when
    /// `RUNTIME_ROOT` is set.
    pub limits_path: Option<PathBuf>,
    pub settings: RatelimitSettings,
    /// `GRPC_PORT` and `PORT`.
    pub rls_port: Option<u16>,
    pub http_port: Option<u16>,
    /// `LIMIT_RESPONSE_HEADERS_ENABLED`.
    pub response_headers: bool,
    /// `CONFIG_TYPE=GRPC_XDS_SOTW`: the limits come from an xDS server, not from files.
    pub xds: Option<XdsSettings>,
    /// Variables set that ratekeeper accepts and does not need, each with why (logged once).
    pub ignored: Vec<String>,
}

/// A Go duration (`300ms`, `10s`, `1m30s`), as envoyproxy/ratelimit's settings are written.
fn go_duration(name: &str, text: &str) -> Result<Duration, String> {
    let bad = || format!("{name} must be a duration such as 500ms, 10s or 1m, not {text:?}");
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_end].parse().map_err(|_| bad())?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3_600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// `a=1,b=2` (or `a:1,b:2` with `separator` ':'): pairs without the separator are skipped, as
/// envoyproxy/ratelimit does.
fn pairs(text: &str, separator: char) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|entry| entry.split_once(separator))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn read_xds(get: &dyn Fn(&str) -> Option<String>) -> Result<XdsSettings, String> {
    let url = get("CONFIG_GRPC_XDS_SERVER_URL").unwrap_or_else(|| "localhost:18000".into());
    let url = url.trim();
    let server_url = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    if flag(
        "CONFIG_GRPC_XDS_SERVER_USE_TLS",
        get("CONFIG_GRPC_XDS_SERVER_USE_TLS"),
    )? || server_url.starts_with("https://")
    {
        return Err(
            "CONFIG_GRPC_XDS_SERVER_USE_TLS=true is not supported: the xDS server is reached \
             without TLS for now"
                .into(),
        );
    }
    let duration = |name: &str, default: Duration| match get(name) {
        Some(text) => go_duration(name, &text),
        None => Ok(default),
    };
    let backoff_initial = duration(
        "XDS_CLIENT_BACKOFF_INITIAL_INTERVAL",
        Duration::from_secs(10),
    )?;
    let backoff_max = duration("XDS_CLIENT_BACKOFF_MAX_INTERVAL", Duration::from_secs(60))?;
    let max_message = match get("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES") {
        Some(text) => Some(text.trim().parse::<usize>().map_err(|_| {
            format!("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES must be a number of bytes, not {text:?}")
        })?)
        .filter(|&size| size > 0),
        None => None,
    };
    Ok(XdsSettings {
        server_url,
        node_id: get("CONFIG_GRPC_XDS_NODE_ID").unwrap_or_else(|| "default".into()),
        node_metadata: get("CONFIG_GRPC_XDS_NODE_METADATA")
            .map(|text| pairs(&text, '='))
            .unwrap_or_default(),
        headers: get("CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS")
            .map(|text| pairs(&text, ':'))
            .unwrap_or_default(),
        backoff_initial,
        backoff_max: backoff_max.max(backoff_initial),
        max_message,
    })
}

/// Go's `strconv.ParseBool`, as envoyproxy/ratelimit reads its flags.
fn flag(name: &str, value: Option<String>) -> Result<bool, String> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(false),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(format!("{name} must be true or false, not {other:?}")),
    }
}

fn port(name: &str, value: Option<String>) -> Result<Option<u16>, String> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<u16>()
            .map(Some)
            .map_err(|_| format!("{name} must be a port number, not {text:?}")),
    }
}

/// The limits directory under envoyproxy/ratelimit's runtime `root`:
/// `root/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY` (default `config`).
pub fn runtime_path(root: &Path, env: impl Fn(&str) -> Option<String>) -> PathBuf {
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let mut path = root.to_path_buf();
    if let Some(sub) = get("RUNTIME_SUBDIRECTORY") {
        path.push(sub);
    }
    path.push(get("RUNTIME_APPDIRECTORY").unwrap_or_else(|| "config".to_string()));
    path
}

/// Reads envoyproxy/ratelimit's variables from `env`.
pub fn read(env: impl Fn(&str) -> Option<String>) -> Result<RatelimitEnv, String> {
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let mut out = RatelimitEnv {
        settings: RatelimitSettings {
            shadow_mode: flag("SHADOW_MODE", get("SHADOW_MODE"))?,
            quota_mode: flag("QUOTA_MODE", get("QUOTA_MODE"))?,
            stop_increment_when_over: flag(
                "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
                get("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT"),
            )?,
            merge_domains: flag("MERGE_DOMAIN_CONFIG", get("MERGE_DOMAIN_CONFIG"))?,
            dynamic_metadata: flag(
                "RESPONSE_DYNAMIC_METADATA",
                get("RESPONSE_DYNAMIC_METADATA"),
            )?,
        },
        rls_port: port("GRPC_PORT", get("GRPC_PORT"))?,
        http_port: port("PORT", get("PORT"))?,
        response_headers: flag(
            "LIMIT_RESPONSE_HEADERS_ENABLED",
            get("LIMIT_RESPONSE_HEADERS_ENABLED"),
        )?,
        ..RatelimitEnv::default()
    };
    out.limits_path = get("RUNTIME_ROOT").map(|root| runtime_path(Path::new(&root), &env));
    // Header names: envoyproxy/ratelimit's defaults are the only ones ratekeeper writes.
    for (name, default) in [
        ("LIMIT_LIMIT_HEADER", "RateLimit-Limit"),
        ("LIMIT_REMAINING_HEADER", "RateLimit-Remaining"),
        ("LIMIT_RESET_HEADER", "RateLimit-Reset"),
    ] {
        if let Some(value) = get(name)
            && !value.eq_ignore_ascii_case(default)
        {
            return Err(format!(
                "{name}={value:?} is not supported: ratekeeper writes envoyproxy/ratelimit's \
                 default header names ({default})"
            ));
        }
    }
    // Values that would change what is decided, and that ratekeeper does not do: refused, so
    // a deployment never runs with a behaviour it did not ask for.
    let refused = [
        (
            "CONFIG_TYPE",
            "FILE|GRPC_XDS_SOTW",
            "the limits come from files (FILE) or an xDS server (GRPC_XDS_SOTW)",
        ),
        ("BACKEND_TYPE", "redis", "counters live in memory or Redis"),
        (
            "REDIS_TYPE",
            "SINGLE|CLUSTER",
            "Redis Sentinel is not supported",
        ),
        (
            "REDIS_PERSECOND",
            "false",
            "per-second limits share the one Redis",
        ),
        (
            "REDIS_PERSECOND_URL",
            "",
            "per-second limits share the one Redis",
        ),
        ("MEMCACHE_HOST_PORT", "", "memcached is not supported"),
        ("MEMCACHE_SRV", "", "memcached is not supported"),
        (
            "GRPC_SERVER_USE_TLS",
            "false",
            "use --tls-cert/--tls-key (TLS_CERT, TLS_KEY)",
        ),
        ("GRPC_UDS", "", "the gRPC service listens on TCP only"),
    ];
    for (name, allowed, why) in refused {
        let Some(value) = get(name) else { continue };
        let fine = match name {
            "CONFIG_TYPE" => ["FILE", "GRPC_XDS_SOTW"].contains(&value.to_uppercase().as_str()),
            "BACKEND_TYPE" => value.eq_ignore_ascii_case(allowed),
            "REDIS_TYPE" => ["SINGLE", "CLUSTER"].contains(&value.to_uppercase().as_str()),
            "REDIS_PERSECOND" | "GRPC_SERVER_USE_TLS" => !flag(name, Some(value.clone()))?,
            _ => false,
        };
        if !fine {
            return Err(format!("{name}={value:?} is not supported: {why}"));
        }
    }
    if get("CONFIG_TYPE").is_some_and(|v| v.eq_ignore_ascii_case("GRPC_XDS_SOTW")) {
        out.xds = Some(read_xds(&get)?);
        if out.limits_path.take().is_some() {
            out.ignored.push(
                "RUNTIME_ROOT is ignored: with CONFIG_TYPE=GRPC_XDS_SOTW the limits come from \
                 the xDS server"
                    .into(),
            );
        }
    }
    let ignored = [
        (
            "XDS_CLIENT_BACKOFF_RANDOM_FACTOR",
            "the xDS backoff doubles, with jitter",
        ),
        (
            "XDS_CLIENT_BACKOFF_JITTER",
            "the xDS backoff always has jitter",
        ),
        (
            "CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL",
            "one backoff (XDS_CLIENT_BACKOFF_*) paces every reconnection",
        ),
        (
            "USE_STATSD",
            "metrics are Prometheus, at /metrics on the HTTP port",
        ),
        (
            "STATSD_HOST",
            "metrics are Prometheus, at /metrics on the HTTP port",
        ),
        (
            "STATSD_PORT",
            "metrics are Prometheus, at /metrics on the HTTP port",
        ),
        (
            "USE_PROMETHEUS",
            "metrics are always Prometheus, at /metrics on the HTTP port",
        ),
        (
            "RUNTIME_WATCH_ROOT",
            "the limits directory is always watched (and polled)",
        ),
        (
            "RUNTIME_IGNOREDOTFILES",
            "names starting with `.` are always skipped",
        ),
        (
            "LOCAL_CACHE_SIZE_IN_BYTES",
            "every decision is exact; there is no local cache",
        ),
        ("NEAR_LIMIT_RATIO", "there are no near-limit statistics"),
        (
            "EXPIRATION_JITTER_MAX_SECONDS",
            "keys expire when their window ends",
        ),
        (
            "CACHE_KEY_PREFIX",
            "Redis keys are ratekeeper's (REDIS_KEY_PREFIX sets their prefix)",
        ),
        (
            "REDIS_POOL_SIZE",
            "one multiplexed connection serves every call",
        ),
        ("REDIS_PIPELINE_WINDOW", "each decision is one script call"),
        ("REDIS_PIPELINE_LIMIT", "each decision is one script call"),
        ("LOG_LEVEL", "use -v or RUST_LOG"),
        ("LOG_FORMAT", "use STRUCTURED_LOGS=true for JSON lines"),
        (
            "DEBUG_PORT",
            "the debug endpoints are the HTTP API's (/status, /metrics)",
        ),
    ];
    for (name, why) in ignored {
        if get(name).is_some() {
            out.ignored.push(format!("{name} is ignored: {why}"));
        }
    }
    Ok(out)
}

/// The Redis URL of envoyproxy/ratelimit's variables, from its `REDIS_URL` (a `host:port`,
/// comma-separated `host:port`s for a cluster, or a socket path): `REDIS_SOCKET_TYPE`
/// (`tcp` or `unix`; guessed from the address when unset), `REDIS_TYPE` (`SINGLE` or
/// `CLUSTER`), `REDIS_AUTH` (`password` or `user:password`) and `REDIS_TLS`.
pub fn redis_url(address: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let tls = flag("REDIS_TLS", get("REDIS_TLS"))?;
    let socket = match get("REDIS_SOCKET_TYPE") {
        Some(kind) => kind.to_lowercase(),
        None if address.starts_with('/') => "unix".to_string(),
        None => "tcp".to_string(),
    };
    let cluster = match get("REDIS_TYPE").map(|t| t.to_uppercase()).as_deref() {
        None | Some("SINGLE") => false,
        Some("CLUSTER") => true,
        Some(other) => {
            return Err(format!(
                "REDIS_TYPE={other:?} is not supported (SINGLE or CLUSTER)"
            ));
        }
    };
    let (user, password) = match get("REDIS_AUTH") {
        None => (None, None),
        Some(auth) => match auth.split_once(':') {
            Some((user, password)) => (Some(user.to_string()), Some(password.to_string())),
            None => (None, Some(auth)),
        },
    };
    match socket.as_str() {
        "unix" => {
            if cluster || tls {
                return Err(
                    "REDIS_SOCKET_TYPE=unix goes with neither REDIS_TYPE=CLUSTER nor REDIS_TLS"
                        .into(),
                );
            }
            let mut query = Vec::new();
            if let Some(user) = &user {
                query.push(format!("user={}", super::percent_encode(user)));
            }
            if let Some(password) = &password {
                query.push(format!("pass={}", super::percent_encode(password)));
            }
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            Ok(format!("redis+unix://{address}{query}"))
        }
        "tcp" => {
            if address.contains(['/', '@', '?', '#']) || address.chars().any(char::is_whitespace) {
                return Err(format!(
                    "REDIS_URL must be host:port (or a list of them), not {address:?}"
                ));
            }
            let auth = match (&user, &password) {
                (_, None) => String::new(),
                (None, Some(p)) => format!(":{}@", super::percent_encode(p)),
                (Some(u), Some(p)) => {
                    format!("{}:{}@", super::percent_encode(u), super::percent_encode(p))
                }
            };
            let scheme = match (cluster, tls) {
                (false, false) => "redis",
                (false, true) => "rediss",
                (true, false) => "redis+cluster",
                (true, true) => "rediss+cluster",
            };
            Ok(format!("{scheme}://{auth}{address}"))
        }
        other => Err(format!(
            "REDIS_SOCKET_TYPE={other:?} is not supported (tcp or unix)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn a_deployment_of_envoyproxy_ratelimit_reads_as_ratekeeper_settings() {
        let read = read(env(&[
            ("RUNTIME_ROOT", "/data"),
            ("RUNTIME_SUBDIRECTORY", "ratelimit"),
            ("RUNTIME_WATCH_ROOT", "false"),
            ("USE_STATSD", "false"),
            ("GRPC_PORT", "9091"),
            ("PORT", "9090"),
            ("SHADOW_MODE", "True"),
            ("QUOTA_MODE", "1"),
            ("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "t"),
            ("MERGE_DOMAIN_CONFIG", "true"),
            ("RESPONSE_DYNAMIC_METADATA", "true"),
            ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
            ("LIMIT_REMAINING_HEADER", "RateLimit-Remaining"),
        ]))
        .unwrap();
        assert_eq!(
            read.limits_path,
            Some(PathBuf::from("/data/ratelimit/config"))
        );
        assert_eq!((read.rls_port, read.http_port), (Some(9091), Some(9090)));
        assert!(read.response_headers);
        assert_eq!(
            read.settings,
            RatelimitSettings {
                shadow_mode: true,
                quota_mode: true,
                stop_increment_when_over: true,
                merge_domains: true,
                dynamic_metadata: true,
            }
        );
        assert_eq!(read.ignored.len(), 2, "{:?}", read.ignored);
        assert_eq!(super::read(env(&[])).unwrap(), RatelimitEnv::default());
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_the_reason() {
        for (name, value) in [
            ("CONFIG_TYPE", "GRPC_XDS_DELTA"),
            ("BACKEND_TYPE", "memcache"),
            ("REDIS_TYPE", "SENTINEL"),
            ("REDIS_PERSECOND", "true"),
            ("LIMIT_RESET_HEADER", "X-Reset"),
            ("SHADOW_MODE", "yes"),
            ("GRPC_PORT", "http"),
        ] {
            let e = read(env(&[(name, value)])).err().unwrap();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn redis_variables_make_a_url() {
        let url = |pairs: &[(&str, &str)], address: &str| redis_url(address, env(pairs));
        assert_eq!(url(&[], "redis:6379").unwrap(), "redis://redis:6379");
        assert_eq!(
            url(
                &[("REDIS_AUTH", "user:p@ss"), ("REDIS_TLS", "true")],
                "r:6380"
            )
            .unwrap(),
            "rediss://user:p%40ss@r:6380"
        );
        assert_eq!(
            url(
                &[("REDIS_TYPE", "cluster"), ("REDIS_AUTH", "pw")],
                "a:1,b:2"
            )
            .unwrap(),
            "redis+cluster://:pw@a:1,b:2"
        );
        assert_eq!(
            url(&[("REDIS_AUTH", "pw")], "/var/run/redis.sock").unwrap(),
            "redis+unix:///var/run/redis.sock?pass=pw"
        );
        assert!(url(&[("REDIS_SOCKET_TYPE", "udp")], "r:1").is_err());
        assert!(url(&[("REDIS_TYPE", "SENTINEL")], "r:1").is_err());
        assert!(url(&[("REDIS_SOCKET_TYPE", "tcp")], "redis://r:1").is_err());
    }

    #[test]
    fn xds_variables_describe_the_subscription() {
        let read = read(env(&[
            ("CONFIG_TYPE", "grpc_xds_sotw"),
            ("RUNTIME_ROOT", "/data"),
            ("CONFIG_GRPC_XDS_SERVER_URL", "cp.example:18001"),
            ("CONFIG_GRPC_XDS_NODE_ID", "rl-1"),
            ("CONFIG_GRPC_XDS_NODE_METADATA", "a=1,b=x=y,junk"),
            ("CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS", "x-token:abc"),
            ("XDS_CLIENT_BACKOFF_INITIAL_INTERVAL", "250ms"),
            ("XDS_CLIENT_BACKOFF_MAX_INTERVAL", "1m30s"),
        ]))
        .unwrap();
        assert_eq!(read.limits_path, None);
        let xds = read.xds.unwrap();
        assert_eq!(xds.server_url, "http://cp.example:18001");
        assert_eq!(xds.node_id, "rl-1");
        let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(xds.node_metadata, owned(&[("a", "1"), ("b", "x=y")]));
        assert_eq!(xds.headers, owned(&[("x-token", "abc")]));
        assert_eq!(xds.backoff_initial, Duration::from_millis(250));
        assert_eq!(xds.backoff_max, Duration::from_secs(90));
        let defaults = super::read(env(&[("CONFIG_TYPE", "GRPC_XDS_SOTW")]))
            .unwrap()
            .xds
            .unwrap();
        assert_eq!(defaults.server_url, "http://localhost:18000");
        assert_eq!(defaults.node_id, "default");
        assert_eq!(defaults.backoff_initial, Duration::from_secs(10));
        for (name, value) in [
            ("CONFIG_GRPC_XDS_SERVER_USE_TLS", "true"),
            ("XDS_CLIENT_BACKOFF_MAX_INTERVAL", "soon"),
            ("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES", "big"),
        ] {
            let e = super::read(env(&[("CONFIG_TYPE", "GRPC_XDS_SOTW"), (name, value)]))
                .err()
                .unwrap();
            assert!(e.contains(name), "{e}");
        }
    }
}
