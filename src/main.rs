use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ratekeeper::clock::SystemClock;
use ratekeeper::config::{Cli, RedisCachedOptions, StorageCommand};
use ratekeeper::http::HttpToken;
use ratekeeper::limiter::{Limiter, Reservations};
use ratekeeper::limits::{
    FixedLimits, LimitSet, RATE_LIMIT_CONFIG, RatelimitSettings, load_path, parse_rate_limit_config,
};
use ratekeeper::metrics::{self, MetricLabels, Prometheus};
use ratekeeper::server::{self, Settings, Tls};
use ratekeeper::status::ServerStatus;
use ratekeeper::storage::{MemoryStorage, RedisStorage, Storage, open_disk};
use ratekeeper::telemetry::Tracer;
use ratekeeper::xds::XdsSettings;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let (cli, ratelimit_env) = Cli::parse_all();
    // Kept until main returns: dropping it flushes the lines still queued.
    let _logging = init_logging(&cli);
    for note in &ratelimit_env.ignored {
        tracing::info!("{note} (an envoyproxy/ratelimit variable)");
    }
    let limits = match load_limits(&cli, ratelimit_env.settings) {
        Ok(limits) => limits,
        Err(e) => {
            eprintln!("{e}");
            if cli.validate {
                eprintln!("FAILED: {}", plural(e.problems, "problem"));
            }
            return ExitCode::FAILURE;
        }
    };
    if cli.validate {
        let views: Vec<_> = limits.iter().map(|l| l.view()).collect();
        match serde_yaml::to_string(&views) {
            Ok(text) => print!("{text}"),
            Err(e) => {
                eprintln!("cannot print the limits: {e}");
                return ExitCode::FAILURE;
            }
        }
        // The summary goes to stderr, so stdout stays the limits as YAML.
        let namespaces: std::collections::HashSet<&str> =
            limits.iter().map(|l| l.namespace.as_str()).collect();
        eprintln!(
            "OK: {} in {}",
            plural(limits.len(), "limit"),
            plural(namespaces.len(), "namespace")
        );
        return ExitCode::SUCCESS;
    }
    if ratelimit_env.xds.is_some() {
        tracing::info!(
            "limits come from the xDS server (CONFIG_TYPE=GRPC_XDS_SOTW): none until its first version"
        );
    } else if limits.is_empty() {
        tracing::warn!("no limits loaded: every request will be allowed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, limits, ratelimit_env.xds)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Said once: in the log when errors are logged (JSON log collectors see it), else
            // plainly on stderr.
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{e:#}");
            } else {
                eprintln!("ratekeeper: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The limits file's limits (none without one) and ASM's `RATE_LIMIT_CONFIG` rules, if set.
fn load_limits(cli: &Cli, settings: RatelimitSettings) -> Result<LimitSet, LoadError> {
    let (limits, file) = match &cli.limits_path() {
        Some(path) => (
            load_path(path, settings).map_err(|e| LoadError {
                message: e.to_string(),
                problems: e.problems.len(),
            })?,
            path.display().to_string(),
        ),
        None => (LimitSet::default(), String::new()),
    };
    let Some(json) = &cli.rate_limit_config else {
        return Ok(limits);
    };
    let rules = parse_rate_limit_config(json, &cli.asm_namespace).map_err(|e| LoadError {
        message: e.to_string(),
        problems: e.problems.len(),
    })?;
    let fixed = FixedLimits::new(RATE_LIMIT_CONFIG, &cli.asm_namespace, rules);
    limits
        .with_fixed(&file, Some(Arc::new(fixed)))
        .map_err(|message| LoadError {
            message,
            problems: 1,
        })
}

/// Why the limits could not be loaded, and how many problems that is (for `--validate`).
struct LoadError {
    message: String,
    problems: usize,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

async fn run(cli: Cli, limits: LimitSet, xds: Option<XdsSettings>) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(cli.storage_timeout);
    let storage: Arc<dyn Storage> = match cli.storage().map_err(anyhow::Error::msg)? {
        StorageCommand::Memory(options) => Arc::new(MemoryStorage::new(options.cache)),
        StorageCommand::Redis(options)
        | StorageCommand::RedisCached(RedisCachedOptions { redis: options, .. }) => {
            let storage = RedisStorage::open(&options.url, &options.key_prefix, timeout)
                .map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(
                url = storage.display_url(),
                prefix = options.key_prefix,
                "counters in Redis"
            );
            Arc::new(storage)
        }
        StorageCommand::Disk(options) => {
            if options.optimize.is_some() {
                tracing::info!("disk --optimize is Limitador's RocksDB tuning: no effect here");
            }
            Arc::new(open_disk(&options.path, options.cache).map_err(anyhow::Error::msg)?)
        }
    };
    tracing::info!(limits = limits.len(), path = ?cli.limits_path(), asm_rules = limits.fixed().is_some(), "limits loaded");
    metrics::install().map_err(|e| anyhow::anyhow!("cannot set up metrics: {e}"))?;
    metrics::limits_applied(0, limits.len());
    let labels = metric_labels(&cli).map_err(anyhow::Error::msg)?;
    let status = ServerStatus::default().refusing_evicting_storage(cli.refuse_evicting_storage);
    let observer = Arc::new(
        Prometheus::new(cli.limit_name_in_labels)
            .recording_refusals(status.refusals().clone())
            .with_labels(labels),
    );
    let limiter = Arc::new(
        Limiter::new(limits, storage, Arc::new(SystemClock))
            .observed_by(observer)
            .on_storage_error(cli.on_storage_error)
            .with_reservations(Reservations {
                enabled: !cli.disable_reservations,
                max_fraction: cli.max_reservation_fraction,
                max_ttl: Duration::from_secs(cli.max_reservation_ttl),
            }),
    );
    let http_auth_token = http_auth_token(&cli)?;
    let tls = match cli.tls.files() {
        Some(files) => Some(Arc::new(Tls::load(files).map_err(anyhow::Error::msg)?)),
        None => None,
    };
    // An empty endpoint (kuadrant-operator passes one) is no tracing, as in Limitador.
    let tracer = match cli.tracing_endpoint.as_str() {
        "" => None,
        endpoint => {
            let tracer = Tracer::start(endpoint).map_err(anyhow::Error::msg)?;
            tracing::info!(endpoint, "exporting traces (OTLP/gRPC)");
            Some(tracer)
        }
    };
    let settings = Settings {
        rls_addr: SocketAddr::new(cli.rls_ip, cli.rls_port),
        http_addr: SocketAddr::new(cli.http_ip, cli.http_port),
        rate_limit_headers: cli.rate_limit_headers,
        over_limit_response: cli.over_limit_response,
        bounds: cli.bounds.into(),
        limits_file: cli.limits_path(),
        grpc_reflection: cli.grpc_reflection_service,
        asm_namespace: cli.asm_namespace.clone(),
        connections: cli.connections.into(),
        http_auth_token,
        tls,
        tracer,
    };
    // Signals are registered before the listeners open (a SIGTERM right after start must
    // not kill the process).
    let signalled = shutdown_signal();
    let status = Arc::new(status);
    let running = server::start(settings, limiter.clone(), status.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen: {e}"))?;
    // envoyproxy/ratelimit's xDS config source, when CONFIG_TYPE=GRPC_XDS_SOTW.
    let (stop_xds, xds_stopped) = tokio::sync::watch::channel(false);
    if let Some(xds) = xds {
        tokio::spawn(ratekeeper::xds::subscribe(
            xds,
            limiter,
            status,
            xds_stopped,
        ));
    }
    signalled.await;
    let _ = stop_xds.send(true);
    let grace = Duration::from_secs(cli.shutdown_timeout);
    tracing::info!(?grace, "shutting down: finishing in-flight calls");
    match tokio::time::timeout(grace, running.shutdown()).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("in-flight calls did not finish in time; exiting anyway"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The custom metric labels of `-L` and `--metric-labels-default`, if any; the `-L` file is
/// watched for changes.
fn metric_labels(cli: &Cli) -> Result<Option<Arc<MetricLabels>>, String> {
    let named = match &cli.custom_metric_labels {
        Some(path) => Some(metrics::parse_labels_file(path)?),
        None => None,
    };
    let labels = MetricLabels::new(cli.metric_labels_default.as_deref(), named)?.map(Arc::new);
    if let (Some(labels), Some(path)) = (&labels, &cli.custom_metric_labels) {
        tokio::spawn(metrics::watch_labels_file(path.clone(), labels.clone()));
    }
    Ok(labels)
}

/// The HTTP API's token, from `--http-auth-token` or the file `--http-auth-token-file` names.
fn http_auth_token(cli: &Cli) -> anyhow::Result<Option<HttpToken>> {
    let token = match (&cli.http_auth_token, &cli.http_auth_token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the HTTP API token from {}: {e}",
                    path.display()
                )
            })?
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    HttpToken::new(&token)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// "1 limit", "3 limits".
fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Registers for SIGTERM and SIGINT now, and returns what waits for one. Called before the
/// listeners open: a signal that arrives as soon as the server answers is then a graceful
/// shutdown, not the default action (killed).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Logs go to stderr through a background thread: a call that logs only queues the line, and
/// when the queue is full (stderr not read fast enough) the line is dropped rather than the
/// call kept waiting. Dropping the returned guard flushes what is queued.
fn init_logging(cli: &Cli) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log_filter())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("ratekeeper-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    if cli.structured_logs {
        builder.json().init();
    } else {
        builder.init();
    }
    guard
}
