//! The load generator: a fixed number of calls in flight (`--concurrency`), each a loop that
//! sends one call, waits for its answer and records its latency, until the time is up.
//!
//! It is built to cost little CPU per call, since on a small machine it shares the CPU with the
//! server: one current-thread runtime by default (`--threads`), requests built from a template
//! without locks, one histogram per client thread, no per-call timers. The run is bounded: it
//! stops issuing calls at the end of `--duration`, and gives calls still in flight 5 s more.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::ToSocketAddrs;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ratekeeper::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratekeeper::proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use ratekeeper::proto::kuadrant::service::ratelimit::v1::{CommitRequest, ReserveRequest};
use tonic::transport::{Channel, Endpoint};

use crate::summary::{Latency, RunResult};

/// The longest run accepted, warm-up included.
const MAX_RUN_SECONDS: f64 = 3600.0;
/// How long calls still in flight at the end get before the run gives up on them.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CallKind {
    /// Envoy's ShouldRateLimit.
    Should,
    /// Kuadrant's CheckRateLimit.
    Check,
    /// Kuadrant's Report.
    Report,
    /// The token pattern: CheckRateLimit (cost `--check-hits`), then, when it is OK, Report
    /// (cost `--hits`) for the same user. One operation is both calls.
    Token,
    /// The reservation pattern: Reserve (amount `--hits`), then, when it is OK, Commit (actual
    /// `--hits`) with its id. One operation is both calls.
    Reservation,
}

impl CallKind {
    pub fn name(self) -> &'static str {
        match self {
            CallKind::Should => "should",
            CallKind::Check => "check",
            CallKind::Report => "report",
            CallKind::Token => "token",
            CallKind::Reservation => "reservation",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Order {
    /// Users 0, 1, 2, ... in turn (with `--requests` equal to `--users`, each user exactly once).
    Sequential,
    /// Users drawn uniformly at random.
    Random,
}

#[derive(Debug, Clone, Args)]
pub struct RunOptions {
    /// The server, as http://host:port.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    target: String,

    /// What to send.
    #[arg(long, value_enum, default_value = "should")]
    call: CallKind,

    /// Operations in flight at once.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,

    /// HTTP/2 connections to open (operations are spread over them).
    #[arg(long, default_value_t = 1)]
    connections: usize,

    /// Distinct users, hence distinct counters per limit.
    #[arg(long, default_value_t = 1000)]
    users: u64,

    /// In which order users are picked.
    #[arg(long, value_enum, default_value = "sequential")]
    order: Order,

    /// Cost (hits_addend) of ShouldRateLimit, CheckRateLimit and Report calls; for the token
    /// pattern, of the Report.
    #[arg(long, default_value_t = 1)]
    hits: u32,

    /// Cost of the CheckRateLimit of the token pattern.
    #[arg(long, default_value_t = 1)]
    check_hits: u32,

    /// Put the cost in the descriptor's own hits_addend (Envoy >= 1.34) instead of the
    /// request's.
    #[arg(long)]
    descriptor_hits: bool,

    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,

    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,

    /// Stop after this many operations in all (or at the end of `--duration`, if sooner).
    #[arg(long)]
    requests: Option<u64>,

    /// The request's domain (ratekeeper's namespace).
    #[arg(long, default_value = "bench")]
    domain: String,

    /// The descriptor's entries, `key=value,key=value`; `{user}` in a value is replaced by the
    /// user's number.
    #[arg(long, default_value = "tier=free,user=user-{user}")]
    descriptor: String,

    /// Client threads, each with its own current-thread runtime, share of the operations in
    /// flight and of the connections.
    #[arg(long, default_value_t = 1)]
    threads: usize,

    /// Print the result as one line of JSON.
    #[arg(long)]
    json: bool,

    /// A name for this run in its result (e.g. floor, memory, redis).
    #[arg(long, default_value = "")]
    label: String,

    /// The server's process id, to report its CPU time per operation (Linux).
    #[arg(long)]
    server_pid: Option<u32>,

    /// Allow a target that is not a loopback address. Never point a load test at a machine
    /// that is not yours.
    #[arg(long)]
    allow_non_loopback: bool,
}

/// One descriptor value, with `{user}` split out.
#[derive(Debug)]
enum Value {
    Fixed(String),
    User { before: String, after: String },
}

/// Builds each call's request from the options, without shared state.
#[derive(Debug)]
struct Template {
    domain: String,
    entries: Vec<(String, Value)>,
    descriptor_hits: bool,
}

impl Template {
    fn parse(domain: &str, text: &str, descriptor_hits: bool) -> Result<Self, String> {
        let mut entries = Vec::new();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("descriptor entry `{part}` is not key=value"))?;
            let value = match value.split_once("{user}") {
                Some((before, after)) => Value::User {
                    before: before.to_string(),
                    after: after.to_string(),
                },
                None => Value::Fixed(value.to_string()),
            };
            entries.push((key.to_string(), value));
        }
        Ok(Self {
            domain: domain.to_string(),
            entries,
            descriptor_hits,
        })
    }

    fn request(&self, user: u64, hits: u32) -> RateLimitRequest {
        let entries = self
            .entries
            .iter()
            .map(|(key, value)| Entry {
                key: key.clone(),
                value: match value {
                    Value::Fixed(text) => text.clone(),
                    Value::User { before, after } => {
                        let mut text = String::with_capacity(before.len() + 20 + after.len());
                        text.push_str(before);
                        let _ = write!(text, "{user}");
                        text.push_str(after);
                        text
                    }
                },
            })
            .collect();
        let (request_hits, descriptor_hits) = if self.descriptor_hits {
            (0, Some(u64::from(hits)))
        } else {
            (hits, None)
        };
        RateLimitRequest {
            domain: self.domain.clone(),
            descriptors: vec![RateLimitDescriptor {
                entries,
                limit: None,
                hits_addend: descriptor_hits,
                is_negative_hits: false,
            }],
            hits_addend: request_hits,
        }
    }
}

/// What every client thread shares: the schedule, the operation budget and the user sequence.
struct Plan {
    call: CallKind,
    hits: u32,
    check_hits: u32,
    users: u64,
    order: Order,
    template: Template,
    warmup: Duration,
    duration: Duration,
    /// Operations left to start, when `--requests` bounds the run.
    budget: Option<AtomicU64>,
    next_user: AtomicU64,
    /// Set once every thread is connected: when the load starts.
    started: Mutex<Option<Instant>>,
    /// Set when every client thread is done.
    finished: AtomicBool,
}

/// When the current run measures.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

/// One client thread's tallies.
struct Stats {
    latency: Histogram<u64>,
    ok: u64,
    over_limit: u64,
    unknown: u64,
    errors: BTreeMap<String, u64>,
    /// RPCs completed, warm-up included (for CPU per call).
    rpcs_total: u64,
    measured_ops: u64,
    measured_rpcs: u64,
    last_finish: Option<Instant>,
    unfinished: u64,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .expect("valid histogram bounds"),
            ok: 0,
            over_limit: 0,
            unknown: 0,
            errors: BTreeMap::new(),
            rpcs_total: 0,
            measured_ops: 0,
            measured_rpcs: 0,
            last_finish: None,
            unfinished: 0,
        }
    }

    fn merge(&mut self, other: Stats) {
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        self.over_limit += other.over_limit;
        self.unknown += other.unknown;
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        self.rpcs_total += other.rpcs_total;
        self.measured_ops += other.measured_ops;
        self.measured_rpcs += other.measured_rpcs;
        self.last_finish = self.last_finish.max(other.last_finish);
        self.unfinished += other.unfinished;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    OverLimit,
    Unknown,
    Error(tonic::Code),
}

fn outcome(result: Result<tonic::Response<RateLimitResponse>, tonic::Status>) -> Outcome {
    match result {
        Ok(response) => match Code::try_from(response.get_ref().overall_code) {
            Ok(Code::Ok) => Outcome::Ok,
            Ok(Code::OverLimit) => Outcome::OverLimit,
            _ => Outcome::Unknown,
        },
        Err(status) => Outcome::Error(status.code()),
    }
}

pub fn run(options: RunOptions) -> Result<(), String> {
    validate(&options)?;
    let template = Template::parse(
        &options.domain,
        &options.descriptor,
        options.descriptor_hits,
    )?;
    let plan = Arc::new(Plan {
        call: options.call,
        hits: options.hits,
        check_hits: options.check_hits,
        users: options.users,
        order: options.order,
        template,
        warmup: Duration::from_secs_f64(options.warmup),
        duration: Duration::from_secs_f64(options.duration),
        budget: options.requests.map(AtomicU64::new),
        next_user: AtomicU64::new(0),
        started: Mutex::new(None),
        finished: AtomicBool::new(false),
    });

    let threads = options.threads.max(1);
    let barrier = Arc::new(Barrier::new(threads));
    let cpu_before = process_cpu_seconds("self");
    let mut server_cpu = None;
    let results: Vec<Result<Stats, String>> = std::thread::scope(|scope| {
        if let Some(pid) = options.server_pid {
            // Samples the server's CPU time at the start and the end of the measured window.
            let plan = plan.clone();
            let server_cpu = &mut server_cpu;
            scope.spawn(move || {
                let started = loop {
                    if let Some(started) = plan.started.lock().ok().and_then(|s| *s) {
                        break started;
                    }
                    if plan.finished.load(Ordering::Relaxed) {
                        return; // the clients gave up before the load started
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                let (from, until) = (started + plan.warmup, started + plan.warmup + plan.duration);
                std::thread::sleep(from.saturating_duration_since(Instant::now()));
                let before = process_cpu_seconds(&pid.to_string());
                while Instant::now() < until && !plan.finished.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let after = process_cpu_seconds(&pid.to_string());
                *server_cpu = after.zip(before).map(|(a, b)| a - b);
            });
        }
        let handles: Vec<_> = (0..threads)
            .map(|index| {
                let share = |total: usize| total / threads + usize::from(index < total % threads);
                let concurrency = share(options.concurrency);
                let connections = share(options.connections).max(1);
                let (plan, barrier, target) = (plan.clone(), barrier.clone(), &options.target);
                scope.spawn(move || {
                    client_thread(index, target, connections, concurrency, &plan, &barrier)
                })
            })
            .collect();
        let results = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a client thread panicked".to_string()))
            })
            .collect();
        plan.finished.store(true, Ordering::Relaxed);
        results
    });
    let cpu_seconds = process_cpu_seconds("self")
        .zip(cpu_before)
        .map(|(after, before)| after - before);

    let mut stats = Stats::new();
    for result in results {
        stats.merge(result?);
    }
    let started = plan
        .started
        .lock()
        .map_err(|_| "poisoned".to_string())?
        .ok_or("the load never started")?;
    let measure_from = started + plan.warmup;
    let measured_until = (started + plan.warmup + plan.duration).min(
        stats
            .last_finish
            .unwrap_or(started + plan.warmup + plan.duration),
    );
    let seconds = measured_until
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    let per_second = |n: u64| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    let micros = |q: f64| stats.latency.value_at_quantile(q) as f64 / 1000.0;
    let result = RunResult {
        label: options.label.clone(),
        call: options.call.name().to_string(),
        target: options.target.clone(),
        domain: options.domain.clone(),
        concurrency: options.concurrency,
        connections: options.connections,
        threads,
        users: options.users,
        hits: options.hits,
        warmup_s: options.warmup,
        duration_s: seconds,
        ops: stats.measured_ops,
        rpcs: stats.measured_rpcs,
        ops_per_sec: per_second(stats.measured_ops),
        rpcs_per_sec: per_second(stats.measured_rpcs),
        latency_us: Latency {
            p50: micros(0.50),
            p90: micros(0.90),
            p99: micros(0.99),
            p999: micros(0.999),
            max: stats.latency.max() as f64 / 1000.0,
            mean: stats.latency.mean() / 1000.0,
        },
        ok: stats.ok,
        over_limit: stats.over_limit,
        unknown: stats.unknown,
        errors: stats.errors.clone(),
        unfinished: stats.unfinished,
        client_cpu_us_per_rpc: cpu_seconds
            .filter(|_| stats.rpcs_total > 0)
            .map(|s| s * 1e6 / stats.rpcs_total as f64),
        server_cpu_us_per_op: server_cpu
            .filter(|_| stats.measured_ops > 0)
            .map(|s| s * 1e6 / stats.measured_ops as f64),
        server_cpu_cores: server_cpu.filter(|_| seconds > 0.0).map(|s| s / seconds),
    };
    if options.json {
        println!(
            "{}",
            serde_json::to_string(&result).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", result.text());
    }
    let errors: u64 = stats.errors.values().sum();
    if errors > 0 || stats.unfinished > 0 {
        return Err(format!(
            "{errors} calls failed and {} did not finish",
            stats.unfinished
        ));
    }
    Ok(())
}

fn validate(options: &RunOptions) -> Result<(), String> {
    if options.concurrency == 0 || options.users == 0 {
        return Err("--concurrency and --users must be at least 1".into());
    }
    if options.threads > options.concurrency {
        return Err("--threads cannot exceed --concurrency".into());
    }
    let total = options.duration + options.warmup;
    if !(options.duration > 0.0 && options.warmup >= 0.0 && total <= MAX_RUN_SECONDS) {
        return Err(format!(
            "--duration must be > 0 and --warmup >= 0, {MAX_RUN_SECONDS} s at most together"
        ));
    }
    check_target(&options.target, options.allow_non_loopback)
}

/// `target` is `http://host:port` and, unless `allow_non_loopback`, on this machine.
pub fn check_target(target: &str, allow_non_loopback: bool) -> Result<(), String> {
    let uri: http::Uri = target
        .parse()
        .map_err(|e| format!("invalid --target {target}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("--target must be http://host:port (plaintext gRPC)".into());
    }
    let host = uri.host().ok_or("--target has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let addresses: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addresses.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    if !allow_non_loopback && let Some(remote) = addresses.iter().find(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "{host} resolves to {}, which is not a loopback address; pass \
             --allow-non-loopback to load a server that is not on this machine",
            remote.ip()
        ));
    }
    Ok(())
}

/// One client thread: its own runtime, connections and share of the operations in flight.
fn client_thread(
    index: usize,
    target: &str,
    connections: usize,
    concurrency: usize,
    plan: &Arc<Plan>,
    barrier: &Barrier,
) -> Result<Stats, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(async {
        let endpoint = Endpoint::from_shared(target.to_string())
            .map_err(|e| format!("invalid --target {target}: {e}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let connected = async {
            let mut channels = Vec::with_capacity(connections);
            for _ in 0..connections {
                let channel = endpoint
                    .connect()
                    .await
                    .map_err(|e| format!("cannot connect to {target}: {e:?}"))?;
                channels.push(channel);
            }
            Ok::<_, String>(channels)
        }
        .await;
        // Every thread reaches the barrier, connected or not, so none waits there forever.
        barrier.wait();
        let channels = connected?;
        let started = {
            let mut started = plan.started.lock().map_err(|_| "poisoned")?;
            *started.get_or_insert_with(Instant::now)
        };
        let window = Window {
            measure_from: started + plan.warmup,
            end: started + plan.warmup + plan.duration,
        };
        let stats = Rc::new(RefCell::new(Stats::new()));
        let local = tokio::task::LocalSet::new();
        let mut workers = Vec::with_capacity(concurrency);
        for worker in 0..concurrency {
            let channel = channels[worker % channels.len()].clone();
            let seed = (index as u64) << 32 | worker as u64;
            workers.push(local.spawn_local(operate(
                channel,
                plan.clone(),
                window,
                stats.clone(),
                seed,
            )));
        }
        let deadline = tokio::time::Instant::from_std(window.end + GRACE);
        let unfinished = local
            .run_until(async {
                let mut unfinished = 0;
                for worker in workers {
                    if tokio::time::timeout_at(deadline, worker).await.is_err() {
                        unfinished += 1;
                    }
                }
                unfinished
            })
            .await;
        drop(local);
        let mut stats = Rc::try_unwrap(stats)
            .map_err(|_| "a worker is still running".to_string())?
            .into_inner();
        stats.unfinished = unfinished;
        Ok(stats)
    })
}

/// One operation in flight, again and again until the end of the run.
async fn operate(
    channel: Channel,
    plan: Arc<Plan>,
    window: Window,
    stats: Rc<RefCell<Stats>>,
    seed: u64,
) {
    let mut envoy = RateLimitServiceClient::new(channel.clone());
    let mut kuadrant = KuadrantClient::new(channel);
    let mut random = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let template = &plan.template;
    loop {
        if Instant::now() >= window.end {
            return;
        }
        if let Some(budget) = &plan.budget
            && budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err()
        {
            return;
        }
        let user = match plan.order {
            Order::Sequential => plan.next_user.fetch_add(1, Ordering::Relaxed) % plan.users,
            Order::Random => {
                // xorshift64*
                random ^= random >> 12;
                random ^= random << 25;
                random ^= random >> 27;
                random.wrapping_mul(0x2545_F491_4F6C_DD1D) % plan.users
            }
        };
        let started = Instant::now();
        let (result, rpcs) = match plan.call {
            CallKind::Should => {
                let request = template.request(user, plan.hits);
                (outcome(envoy.should_rate_limit(request).await), 1)
            }
            CallKind::Check => {
                let request = template.request(user, plan.hits);
                (outcome(kuadrant.check_rate_limit(request).await), 1)
            }
            CallKind::Report => {
                let request = template.request(user, plan.hits);
                (outcome(kuadrant.report(request).await), 1)
            }
            CallKind::Reservation => {
                let request = template.request(user, 0);
                let reserve = ReserveRequest {
                    domain: request.domain.clone(),
                    descriptors: request.descriptors.clone(),
                    amount: u64::from(plan.hits),
                    ttl: None,
                };
                match kuadrant.reserve(reserve).await {
                    Ok(reserved) if reserved.get_ref().code == Code::Ok as i32 => {
                        let commit = CommitRequest {
                            domain: request.domain,
                            descriptors: request.descriptors,
                            reservation_id: reserved.into_inner().reservation_id,
                            actual_amount: u64::from(plan.hits),
                        };
                        let committed = kuadrant.commit(commit).await;
                        (
                            committed.map_or_else(|s| Outcome::Error(s.code()), |_| Outcome::Ok),
                            2,
                        )
                    }
                    Ok(_) => (Outcome::OverLimit, 1),
                    Err(status) => (Outcome::Error(status.code()), 1),
                }
            }
            CallKind::Token => {
                let check = template.request(user, plan.check_hits);
                match outcome(kuadrant.check_rate_limit(check).await) {
                    Outcome::Ok => {
                        let report = template.request(user, plan.hits);
                        (outcome(kuadrant.report(report).await), 2)
                    }
                    other => (other, 1),
                }
            }
        };
        let finished = Instant::now();
        let mut stats = stats.borrow_mut();
        stats.rpcs_total += rpcs;
        if started >= window.measure_from && finished <= window.end {
            stats
                .latency
                .saturating_record(finished.duration_since(started).as_nanos() as u64);
            stats.measured_ops += 1;
            stats.measured_rpcs += rpcs;
            stats.last_finish = stats.last_finish.max(Some(finished));
            match result {
                Outcome::Ok => stats.ok += 1,
                Outcome::OverLimit => stats.over_limit += 1,
                Outcome::Unknown => stats.unknown += 1,
                Outcome::Error(code) => {
                    *stats.errors.entry(format!("{code:?}")).or_default() += 1;
                }
            }
        } else if let Outcome::Error(code) = result {
            // Errors count wherever they happen.
            *stats.errors.entry(format!("{code:?}")).or_default() += 1;
        }
    }
}

/// User plus system CPU time of a process (`self` or a pid), from /proc (Linux); `None`
/// elsewhere.
fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture Rust targets.
    Some((utime + stime) / 100.0)
}
