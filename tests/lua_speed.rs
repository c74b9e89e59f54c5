//! How long decide.lua runs inside Redis, per shape of call, as Redis itself measures it
//! (`INFO commandstats`, `usec_per_call` of `evalsha`): a measurement, not an assertion.
//!
//! The calls are the ones `RedisStorage::apply` makes (the same keys and packed arguments).
//! To compare versions of the script fairly on a busy machine, give several files in
//! `LUA_SPEED_SCRIPTS` (comma-separated): rounds alternate between them on one redis-server.
//! `LUA_SPEED_SHAPES=window` measures only the shapes whose name contains `window`.
//! Redis measures the script alone, so a debug build measures the same as a release one.
//! `LUA_SPEED_BATCH=N` sends N decisions per script call to scripts that take batches (those
//! with `BATCH`), as `RedisStorage` does when calls wait at the same moment; the figures are then
//! µs per decision.
//!
//! Run: `cargo test --test lua_speed -- --ignored --nocapture`
//! e.g. `git show 2ceb609:src/storage/decide.lua > /tmp/old.lua;
//!       LUA_SPEED_SCRIPTS=/tmp/old.lua,src/storage/decide.lua cargo test --test lua_speed ...`

mod common;

use common::redis::{RedisProcess, cli};

const CALLS: usize = 10_000;
const ROUNDS: usize = 5;
const NOW: u64 = 1_767_225_600_000;

/// A counter's kind and parameters, as decide.lua takes them.
type Counter = Vec<u64>;

fn window() -> Counter {
    vec![0, 1_000_000_000, 60_000]
}

fn bucket() -> Counter {
    vec![1, 1_000_000_000, 1, 50, 30_000]
}

fn sliding() -> Counter {
    vec![2, 1_000_000, 60_000]
}

/// 1000 slots of 60 s: a run's 10,000 calls (on 100 users) leave up to 100 slots per counter.
fn slots() -> Counter {
    vec![3, 1_000, 60_000]
}

/// `EVALSHA` arguments of one call on `counters`, one all-or-nothing group of cost 1, with a
/// deadline (on Redis's clock: far in the future) when the script takes one (scripts before
/// the deadline was added, e.g. 2ceb609's, do not), and the holds' keys and arguments (no
/// reservation) when it takes them (scripts before reservations do not).
fn call(
    counters: &[Counter],
    user: usize,
    now: u64,
    deadline: bool,
    holds: bool,
) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut keys: Vec<String> = (0..counters.len())
        .map(|i| format!("speed:{{speed}}:{i:016x}:5:user{user}"))
        .collect();
    if holds {
        keys.extend(keys.clone().into_iter().map(|k| format!("{k}:h")));
    }
    let mut numbers = vec![now];
    if deadline {
        numbers.push(4_000_000_000_000);
    }
    counters.iter().for_each(|c| numbers.extend(c));
    if holds {
        numbers.extend(std::iter::repeat_n(0, 1 + counters.len()));
    }
    numbers.extend([0, 1, counters.len() as u64]);
    numbers.extend(1..=counters.len() as u64);
    let format = format!("<{}", "d".repeat(numbers.len())).into_bytes();
    let packed = numbers
        .iter()
        .flat_map(|&x| (x as f64).to_le_bytes())
        .collect();
    let mut args = vec![format, packed];
    if holds {
        args.push(Vec::new()); // no reservation id
    }
    (keys, args)
}

/// `usec_per_call` of `evalsha` since the last reset.
fn evalsha_usec(port: u16) -> f64 {
    let stats = cli(port, &["INFO", "commandstats"]).unwrap_or_default();
    stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split("usec_per_call=").nth(1))
        .and_then(|rest| rest.split(',').next())
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn decide_lua_usec_per_call() {
    let paths = std::env::var("LUA_SPEED_SCRIPTS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/src/storage/decide.lua").into());
    let scripts: Vec<(String, redis::Script, bool, bool, bool)> = paths
        .split(',')
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let deadline = text.contains("deadline_ms");
            let holds = text.contains("hold_expires");
            let batches = text.contains("BATCH");
            (
                path.to_string(),
                redis::Script::new(&text),
                deadline,
                holds,
                batches,
            )
        })
        .collect();
    let per_call: usize = std::env::var("LUA_SPEED_BATCH")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let redis = RedisProcess::start();
    let client = redis::Client::open(redis.url()).unwrap();
    // No response timeout: a busy machine may stall a call for a while.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let shapes: [(&str, Vec<Counter>); 7] = [
        ("one fixed window", vec![window()]),
        ("three fixed windows", vec![window(), window(), window()]),
        ("one token bucket", vec![bucket()]),
        (
            "mixed (window, bucket, sliding)",
            vec![window(), bucket(), sliding()],
        ),
        ("one concurrency (<= 100 slots)", vec![slots()]),
        ("one concurrency of 4 (full)", vec![vec![3, 4, 60_000]]),
        ("window and concurrency", vec![window(), slots()]),
    ];
    let only = std::env::var("LUA_SPEED_SHAPES").unwrap_or_default();
    for (name, counters) in shapes.iter().filter(|(name, _)| name.contains(&only)) {
        let mut figures = vec![Vec::new(); scripts.len()];
        for _ in 0..ROUNDS {
            for ((_, script, deadline, holds, batches), figures) in scripts.iter().zip(&mut figures)
            {
                cli(redis.port, &["FLUSHALL"]).unwrap();
                cli(redis.port, &["CONFIG", "RESETSTAT"]).unwrap();
                let per_call = if *batches { per_call } else { 1 };
                for first in (0..CALLS).step_by(per_call) {
                    let mut all_keys = Vec::new();
                    let mut all_args = Vec::new();
                    let mut shape = vec![0u64];
                    for i in first..(first + per_call).min(CALLS) {
                        let (keys, args) =
                            call(counters, i % 100, NOW + i as u64, *deadline, *holds);
                        shape[0] += 1;
                        shape.extend([keys.len() as u64, args.len() as u64]);
                        all_keys.extend(keys);
                        all_args.extend(args);
                    }
                    let mut invocation = script.prepare_invoke();
                    all_keys.iter().for_each(|k| {
                        invocation.key(k);
                    });
                    if per_call > 1 {
                        let format = format!("<{}", "d".repeat(shape.len()));
                        let packed: Vec<u8> = shape
                            .iter()
                            .flat_map(|&x| (x as f64).to_le_bytes())
                            .collect();
                        invocation.arg("batch").arg(format).arg(packed);
                    }
                    all_args.iter().for_each(|a| {
                        invocation.arg(a);
                    });
                    let reply: redis::Value =
                        invocation.invoke_async(&mut connection).await.unwrap();
                    assert!(matches!(
                        reply,
                        redis::Value::BulkString(_) | redis::Value::Array(_)
                    ));
                }
                figures.push(evalsha_usec(redis.port) / per_call as f64);
            }
        }
        for ((path, _, _, _, _), figures) in scripts.iter().zip(&mut figures) {
            figures.sort_by(f64::total_cmp);
            println!(
                "{name:32} {path}: evalsha usec_per_call median {:.2} (rounds of {CALLS}: {figures:?})",
                figures[ROUNDS / 2]
            );
        }
    }
}
