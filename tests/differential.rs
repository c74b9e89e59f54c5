//! The Redis script is the Lua twin of the Rust arithmetic: random request sequences, with a
//! driven clock, over every algorithm and policy (reservations' holds, commits and the holds'
//! expiry included), calendar windows across their boundaries, and per-counter (weighted)
//! costs, must get identical answers from memory and from Redis (standalone and cluster),
//! call by call. The `disk` storage decides as memory does and must keep deciding so after
//! being closed and reopened at random points (every state and hold read back).

mod common;

use std::time::Duration;

use ratekeeper::algorithm::{
    Algorithm, Calendar, Concurrency, FixedWindow, Group, GroupOutcome, HoldRequest, Period,
    Policy, SlidingWindow, TokenBucket, calendar::zone,
};
use ratekeeper::storage::{
    Batch, CounterKey, CounterRequest, MemoryStorage, RedisStorage, Storage, open_disk,
};

/// xorshift64*: deterministic, so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn algorithms() -> Vec<Algorithm> {
    vec![
        Algorithm::FixedWindow(FixedWindow::new(20, 1_000)),
        Algorithm::FixedWindow(FixedWindow::new(0, 5_000)),
        // envoyproxy/ratelimit's windows, aligned to the clock.
        Algorithm::FixedWindow(FixedWindow::aligned(9, 1_500)),
        Algorithm::TokenBucket(TokenBucket::continuous(30, 3_000)),
        Algorithm::TokenBucket(TokenBucket::stepped(200, 50, 30_000)),
        Algorithm::TokenBucket(TokenBucket::continuous(7, 1_000)),
        Algorithm::SlidingWindow(SlidingWindow::new(25, 2_000)),
        Algorithm::SlidingWindow(SlidingWindow::new(3, 700)),
        Algorithm::Concurrency(Concurrency::new(3, 2_000)),
        Algorithm::Concurrency(Concurrency::new(1, 700)),
        Algorithm::Concurrency(Concurrency::new(0, 1_000)),
    ]
}

/// Calendar windows, with a fixed window beside them: a UTC day, a Paris month (it ends an
/// hour before UTC's), a Monday-to-Sunday week in Kathmandu (UTC+05:45).
fn calendar_algorithms() -> Vec<Algorithm> {
    let calendar = |period, name| Calendar::new(period, zone(name).unwrap());
    vec![
        Algorithm::FixedWindow(FixedWindow::calendar(20, calendar(Period::Day, "UTC"))),
        Algorithm::FixedWindow(FixedWindow::calendar(
            30,
            calendar(Period::Month, "Europe/Paris"),
        )),
        Algorithm::FixedWindow(FixedWindow::calendar(
            15,
            calendar(Period::Week, "Asia/Kathmandu"),
        )),
        Algorithm::FixedWindow(FixedWindow::new(20, 1_000)),
    ]
}

fn random_batch(rng: &mut Rng, algorithms: &[Algorithm], now: u64) -> Batch<'static> {
    // Up to 3 counters (each an algorithm with one of two users), in up to 3 groups.
    let count = 1 + rng.below(3) as usize;
    let mut counters = Vec::new();
    for _ in 0..count {
        let limit = rng.below(algorithms.len() as u64);
        let user = rng.below(2);
        let key = CounterKey::new(limit, [format!("user{user}")]);
        if counters.iter().any(|c: &CounterRequest| c.key == key) {
            continue;
        }
        counters.push(CounterRequest {
            key,
            algorithm: algorithms[limit as usize],
        });
    }
    let groups = (0..1 + rng.below(3))
        .map(|_| {
            let policy = match rng.below(6) {
                0 => Policy::AllOrNothing,
                1 => Policy::CheckOnly,
                2 => Policy::Refund,
                3 => Policy::Reserve,
                4 => Policy::Commit,
                _ => Policy::Charge,
            };
            let cost = match rng.below(10) {
                0 => 0,
                1 => rng.below(300),
                9 if rng.below(20) == 0 => u64::MAX,
                _ => 1 + rng.below(12),
            };
            let members: Vec<usize> = (0..counters.len()).filter(|_| rng.below(3) > 0).collect();
            // Sometimes each counter has its own cost (a limit's `cost:`).
            let costs = match rng.below(3) {
                0 => members.iter().map(|_| rng.below(15)).collect(),
                _ => Vec::new(),
            };
            Group {
                policy,
                cost,
                counters: members,
                costs,
            }
        })
        .collect();
    // Reservations from a few ids, so that commits find them (or find them expired).
    let hold = (rng.below(4) > 0).then(|| HoldRequest {
        id: format!("r{}", rng.below(4)),
        expires_at_ms: now + rng.below(3_000),
        // (A reservation holds one slot on a concurrency counter, whatever its amount.)
        amounts: (counters.iter())
            .map(|c| match rng.below(12) {
                amount if c.algorithm.slot_lifetime_ms().is_some() => {
                    c.algorithm.hold_for(amount, 0.5)
                }
                amount => amount,
            })
            .collect(),
    });
    Batch {
        namespace: "diff",
        hold,
        counters,
        groups,
    }
}

async fn compare(redis_url: String, seed: u64) {
    compare_from(redis_url, seed, algorithms(), 1_767_225_600_000).await;
}

async fn compare_from(redis_url: String, seed: u64, algorithms: Vec<Algorithm>, start: u64) {
    let memory = MemoryStorage::new(10_000);
    let prefix = format!("diff{}-{seed}-{start}", std::process::id());
    let redis = RedisStorage::open(&redis_url, &prefix, Duration::from_secs(2)).unwrap();
    let mut rng = Rng(seed);
    let mut now = start;
    for step in 0..400 {
        now += match rng.below(6) {
            0 => 0,
            1 => 1,
            2 => rng.below(100),
            3 => rng.below(1_500),
            4 => rng.below(40_000),
            _ => rng.below(10),
        };
        let batch = random_batch(&mut rng, &algorithms, now);
        let expected: Vec<GroupOutcome> = memory.apply(&batch, now).await.unwrap();
        let actual = redis.apply(&batch, now).await.unwrap();
        assert_eq!(
            actual, expected,
            "seed {seed}, step {step}, at {now}: Redis differs from memory for {batch:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_decides_exactly_as_memory_does() {
    for seed in [1, 2, 3, 0xdead_beef, 42] {
        compare(common::redis::shared_url(), seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_decides_exactly_as_memory_does_across_reopens() {
    for seed in [1, 2, 0xdead_beef] {
        let dir =
            std::env::temp_dir().join(format!("ratekeeper-diff-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let memory = MemoryStorage::new(10_000);
        let algorithms = algorithms();
        let mut rng = Rng(seed);
        let mut now = 1_767_225_600_000u64;
        let mut disk = Some(open_disk(&dir, 10_000).unwrap());
        let mut reopened = 0;
        for step in 0..400 {
            now += match rng.below(5) {
                0 => 0,
                1 => rng.below(100),
                2 => rng.below(1_500),
                3 => rng.below(40_000),
                _ => rng.below(10),
            };
            if rng.below(25) == 0 {
                drop(disk.take());
                disk = Some(open_disk(&dir, 10_000).unwrap());
                reopened += 1;
            }
            let batch = random_batch(&mut rng, &algorithms, now);
            let expected: Vec<GroupOutcome> = memory.apply(&batch, now).await.unwrap();
            let actual = disk.as_ref().unwrap().apply(&batch, now).await.unwrap();
            assert_eq!(
                actual, expected,
                "seed {seed}, step {step}, at {now} (reopened {reopened} times): disk differs from memory for {batch:#?}"
            );
        }
        assert!(reopened > 5, "seed {seed}: reopened only {reopened} times");
        drop(disk);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_decides_exactly_as_memory_does() {
    compare(common::redis::shared_cluster_url(), 7).await;
}

/// 2026-01-31T22:55:00Z, five minutes before Paris's February, and 23:55:00Z, five before
/// UTC's: the random steps (about 20 minutes in all) cross the one, then the other.
const BEFORE_BOUNDARIES: [u64; 2] = [1_769_900_100_000, 1_769_903_700_000];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_windows_decide_on_redis_exactly_as_in_memory() {
    for start in BEFORE_BOUNDARIES {
        for seed in [5, 0xfeed] {
            let url = common::redis::shared_url();
            compare_from(url, seed, calendar_algorithms(), start).await;
        }
        let url = common::redis::shared_cluster_url();
        compare_from(url, 8, calendar_algorithms(), start).await;
    }
}

/// Any limit the file accepts works on Redis exactly as in memory, up to the longest `seconds`
/// (Redis wrote a TTL of 10^17 ms or more as `1e+17`, which `SET … PX` refuses: such windows
/// failed every call there while working in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_that_validates_decides_the_same_on_redis_up_to_the_bounds() {
    let memory = MemoryStorage::new(10_000);
    let prefix = format!("bounds{}", std::process::id());
    let redis = RedisStorage::open(
        &common::redis::shared_url(),
        &prefix,
        Duration::from_secs(2),
    )
    .unwrap();
    let shapes = [
        "max_value: 5",
        "max_value: 5, algorithm: token_bucket, refill_tokens: 2",
        "max_value: 1, algorithm: token_bucket",
        "max_value: 1, algorithm: sliding_window",
        "max_value: 0, algorithm: sliding_window",
        "max_value: 3, algorithm: concurrency",
    ];
    let bound = 1_000_000_000_000u64;
    let mut validated = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        for seconds in [
            bound,
            bound + 1,
            100_000_000_000_000,
            u64::MAX / 1000,
            u64::MAX,
        ] {
            let text = format!("- {{namespace: bounds, seconds: {seconds}, {shape}}}");
            let Ok(limits) = ratekeeper::limits::parse_limits("bounds.yaml", &text) else {
                continue;
            };
            validated.push((*shape, seconds));
            let key = CounterKey::new(i as u64, [seconds.to_string()]);
            let counters = vec![CounterRequest {
                key,
                algorithm: limits[0].algorithm,
            }];
            let mut now = 1_767_225_600_000u64;
            for (policy, cost) in [
                (Policy::AllOrNothing, 1),
                (Policy::Charge, 7),
                (Policy::CheckOnly, 0),
                (Policy::AllOrNothing, 1),
            ] {
                let batch = Batch {
                    namespace: "bounds",
                    hold: None,
                    counters: counters.clone(),
                    groups: vec![Group {
                        policy,
                        cost,
                        counters: vec![0],
                        costs: vec![],
                    }],
                };
                let expected = memory.apply(&batch, now).await.unwrap();
                let actual = redis.apply(&batch, now).await.unwrap_or_else(|e| {
                    panic!("{shape}, seconds {seconds} validates but fails on Redis: {e}")
                });
                assert_eq!(actual, expected, "{shape}, seconds {seconds}");
                now += 1_000;
            }
        }
    }
    // The longest `seconds` is accepted for every algorithm (the test is not vacuous).
    for shape in shapes {
        assert!(
            validated.contains(&(shape, bound)),
            "{shape}: {validated:?}"
        );
    }
}
