//! Criterion benchmarks of the hot path, through the engine's public API (`Limiter::decide`):
//!
//! - `match/one_of/N`, `match/all_of/N`: N limits in the request's namespace, each with a CEL
//!   condition and a CEL variable; one of them (or all) applies. Memory storage, manual clock.
//! - `memory_contention/T_threads/K_users`: T threads deciding at once on one memory storage,
//!   on one hot counter (K = 1) or spread over 1000; throughput is decisions per second, all
//!   threads together.
//! - `budgets/{seconds,calendar_month,weighted_cost}`: one limit counting per user, as a window
//!   of `seconds`, as a calendar month in Europe/Paris, and as that month with a CEL `cost:`
//!   (input + 4 × output tokens); memory storage (what a calendar window or a cost expression
//!   adds to a decision).
//! - `redis/*`: the decision script on a real `redis-server` started on a free loopback port
//!   for the benchmark (skipped when `redis-server` is not installed): one call at a time
//!   (a round trip), 64 in flight (pipelined on the multiplexed connection), and a bare PING
//!   round trip to compare with.
//!
//! The Prometheus recorder is installed, as in the server, so metrics cost what they cost there.
//! Run: `cargo bench --bench hot_path` (add `-- match` to pick benchmarks by name).

use std::future::Future;
use std::net::TcpListener;
use std::pin::pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ratekeeper::clock::ManualClock;
use ratekeeper::limiter::{Call, Code, Descriptor, Limiter, Request};
use ratekeeper::limits::{LimitSet, parse_limits};
use ratekeeper::storage::{MemoryStorage, RedisStorage, Storage};

/// 2026-01-01T00:00:00Z.
const START_MS: u64 = 1_767_225_600_000;

/// N limits in namespace `bench`: limit i applies to route `r{i}` (or, with `all`, to every
/// request) and counts per user.
fn limits(n: usize, all: bool) -> LimitSet {
    let mut yaml = String::new();
    for i in 0..n {
        let condition = if all {
            format!("descriptors[0].tier == 'free' && {i} >= 0")
        } else {
            format!("descriptors[0].route == 'r{i}'")
        };
        yaml.push_str(&format!(
            "- name: limit-{i}\n  namespace: bench\n  max_value: 1000000000000\n  seconds: 3600\n  \
             conditions: [\"{condition}\"]\n  variables: [\"descriptors[0].user\"]\n"
        ));
    }
    LimitSet::new(parse_limits("bench", &yaml).expect("valid bench limits"))
}

fn limiter(limits: LimitSet, storage: Arc<dyn Storage>) -> Limiter {
    let _ = ratekeeper::metrics::install();
    Limiter::new(limits, storage, Arc::new(ManualClock::new(START_MS)))
        .observed_by(Arc::new(ratekeeper::metrics::Prometheus::new(false)))
}

fn request(user: usize) -> Request {
    let user = format!("user-{user}");
    Request {
        namespace: "bench".to_string(),
        descriptors: vec![Descriptor::of(&[
            ("route", "r0"),
            ("tier", "free"),
            ("user", &user),
        ])],
        hits: 1,
    }
}

/// Runs a future that never waits (the memory storage decides synchronously) to completion.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
    }
}

fn decide_ok(limiter: &Limiter, request: &Request) {
    let decision = ready(limiter.decide(request, Call::ShouldRateLimit)).expect("decided");
    assert!(decision.code() == Code::Ok);
}

fn matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("match");
    let requests: Vec<Request> = (0..1000).map(request).collect();
    for (label, all, sizes) in [
        ("one_of", false, &[1, 10, 100][..]),
        ("all_of", true, &[1, 10]),
    ] {
        for &n in sizes {
            let limiter = limiter(limits(n, all), Arc::new(MemoryStorage::new(10_000_000)));
            let mut next = 0;
            group.throughput(Throughput::Elements(1));
            group.bench_function(BenchmarkId::new(label, n), |b| {
                b.iter(|| {
                    next = (next + 1) % requests.len();
                    decide_ok(&limiter, &requests[next]);
                })
            });
        }
    }
    group.finish();
}

fn budgets(c: &mut Criterion) {
    let mut group = c.benchmark_group("budgets");
    let base = "- {name: b, namespace: bench, max_value: 1000000000000, variables: [\"descriptors[0].user\"]";
    let cost =
        "cost: \"uint(descriptors[0].input_tokens) + 4u * uint(descriptors[0].output_tokens)\"";
    let requests: Vec<Request> = (0..1000)
        .map(|user| Request {
            namespace: "bench".to_string(),
            descriptors: vec![Descriptor::of(&[
                ("user", &format!("user-{user}")),
                ("input_tokens", "120"),
                ("output_tokens", "480"),
            ])],
            hits: 1,
        })
        .collect();
    for (label, fields) in [
        ("seconds", "seconds: 3600".to_string()),
        (
            "calendar_month",
            "calendar: month, timezone: Europe/Paris".to_string(),
        ),
        (
            "weighted_cost",
            format!("calendar: month, timezone: Europe/Paris, {cost}"),
        ),
    ] {
        let yaml = format!("{base}, {fields}}}\n");
        let limits = LimitSet::new(parse_limits("bench", &yaml).expect("valid bench limits"));
        let limiter = limiter(limits, Arc::new(MemoryStorage::new(10_000_000)));
        let mut next = 0;
        group.throughput(Throughput::Elements(1));
        group.bench_function(label, |b| {
            b.iter(|| {
                next = (next + 1) % requests.len();
                decide_ok(&limiter, &requests[next]);
            })
        });
    }
    group.finish();
}

fn memory_contention(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_contention");
    for threads in [1usize, 2, 4] {
        for users in [1usize, 1000] {
            let limiter = Arc::new(limiter(
                limits(1, true),
                Arc::new(MemoryStorage::new(10_000_000)),
            ));
            let requests: Arc<Vec<Request>> = Arc::new((0..users).map(request).collect());
            group.throughput(Throughput::Elements(threads as u64));
            let id = BenchmarkId::new(format!("{threads}_threads"), format!("{users}_users"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    std::thread::scope(|scope| {
                        for thread in 0..threads {
                            let (limiter, requests) = (&limiter, &requests);
                            scope.spawn(move || {
                                for i in 0..iters as usize {
                                    let request = &requests[(i * 7 + thread * 131) % users];
                                    decide_ok(limiter, request);
                                }
                            });
                        }
                    });
                    started.elapsed()
                })
            });
        }
    }
    group.finish();
}

/// A redis-server of the benchmark's own, stopped when dropped.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let dir = tempfile::tempdir().ok()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis(c: &mut Criterion) {
    let Some(server) = RedisServer::start() else {
        eprintln!("redis benchmarks skipped: cannot start redis-server");
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // The storage's connection task is spawned on the runtime it is opened in.
    let _entered = runtime.enter();
    let url = format!("redis://127.0.0.1:{}", server.port);
    let storage: Arc<dyn Storage> = Arc::new(
        RedisStorage::open(&url, "bench", Duration::from_secs(2)).expect("a Redis storage"),
    );
    let limiter = Arc::new(limiter(limits(1, true), storage.clone()));
    let requests: Arc<Vec<Request>> = Arc::new((0..1000).map(request).collect());

    let mut group = c.benchmark_group("redis");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ping_round_trip", |b| {
        b.to_async(&runtime)
            .iter(|| async { storage.ping().await.expect("ping") })
    });
    let mut next = 0;
    group.bench_function("decide/1_in_flight", |b| {
        b.to_async(&runtime).iter(|| {
            next = (next + 1) % requests.len();
            let (limiter, requests) = (limiter.clone(), requests.clone());
            async move {
                let decision = limiter
                    .decide(&requests[next], Call::ShouldRateLimit)
                    .await
                    .expect("decided");
                assert!(decision.code() == Code::Ok);
            }
        })
    });
    group.bench_function("decide/64_in_flight", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                let per_task = iters.div_ceil(64) as usize;
                let tasks: Vec<_> = (0..64usize)
                    .map(|task| {
                        let (limiter, requests) = (limiter.clone(), requests.clone());
                        tokio::spawn(async move {
                            for i in 0..per_task {
                                let request = &requests[(task * 17 + i) % requests.len()];
                                let decision = limiter
                                    .decide(request, Call::ShouldRateLimit)
                                    .await
                                    .expect("decided");
                                assert!(decision.code() == Code::Ok);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("a task");
                }
                let done = (per_task * 64) as f64;
                Duration::from_secs_f64(started.elapsed().as_secs_f64() * iters as f64 / done)
            })
        })
    });
    group.finish();
    drop(limiter);
    drop(storage);
    drop(server);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = matching, budgets, memory_contention, redis
}
criterion_main!(benches);
