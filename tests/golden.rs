//! Golden values: what must survive an upgrade, pinned byte for byte.
//!
//! Counters outlive ratekeeper releases (in Redis, across rolling upgrades where old and new
//! replicas share one Redis). A counter is found again only if the new release computes the
//! same limit identity ([`Limit::key`](ratekeeper::limits::Limit), the FNV-1a fingerprint of
//! what makes two limits "the same"), the same Redis key, and reads the stored value the same
//! way. So these values are constants here, not recomputed by a copy of the code.
//!
//! **Changing any value in this file is a deliberate, documented act**: it orphans counters
//! (budgets silently restart) or misreads them. Do it only with an entry in docs/redis.md's
//! "Upgrades and the Redis key format" section that says which counters are affected and what
//! operators should do. (The last changes, both in this release: namespace tags, where `%`, `{` and `}`
//! became `%25`, `%7B`, `%7D`; and the identity of a continuous token bucket with an `id`, which
//! now includes its `seconds`. Reservations added a new key beside a counter, its holds, pinned
//! below; calendar quotas added new identities and a fixed window whose end is a calendar
//! boundary, stored as any fixed window; in-flight limits added a new identity,
//! `concurrency`, and keep their slots in the holds' key, pinned below; the `disk` storage's
//! entries are pinned below too; no existing value changed.)

mod common;

use std::time::Duration;

use ratekeeper::algorithm::{
    Algorithm, BucketState, Calendar, Concurrency, CounterState, FixedWindow, Group, HoldRequest,
    Period, Policy, SlidingState, SlidingWindow, TokenBucket, WindowState,
};
use ratekeeper::limits::parse_limits;
use ratekeeper::storage::counter_key;
use ratekeeper::storage::{Batch, CounterKey, CounterRequest, RedisStorage, Storage};

/// 2026-01-01T00:00:00Z.
const NOW: u64 = 1_767_225_600_000;

/// Representative limits: each algorithm, with and without `id`, Kuadrant-style namespaces.
const LIMITS: &str = r#"
- name: free
  namespace: llm_tokens
  max_value: 50
  seconds: 60
  conditions: ["descriptors[0]['tier'] == 'free'"]
  variables: ["descriptors[0]['user_id']"]
- id: gold-tokens
  namespace: llm_tokens
  max_value: 200
  seconds: 60
  conditions: ["descriptors[0]['tier'] == 'gold'"]
  variables: ["descriptors[0]['user_id']"]
- namespace: llm/llm-route
  max_value: 100
  seconds: 60
  conditions: ["descriptors[0]['tokenlimit.free__ee9a5e2c'] == '1'", "descriptors[0]['x'] == 'y'"]
  variables: ["descriptors[0]['auth.identity.userid']"]
- name: regular-user
  namespace: asm
  algorithm: token_bucket
  max_value: 200
  seconds: 30
  refill_tokens: 50
  conditions: ["descriptors[0].key.startsWith('regular-user:')"]
  variables: ["descriptors[0].key"]
- id: continuous
  namespace: kuadrant-system/toystore
  algorithm: token_bucket
  max_value: 1000
  seconds: 60
  variables: ["descriptors[0].user"]
- namespace: llm_tokens
  algorithm: token_bucket
  max_value: 300
  seconds: 60
  variables: ["descriptors[0].user"]
- namespace: team{a}
  algorithm: sliding_window
  max_value: 25
  seconds: 2
  variables: ["descriptors[0].user", "descriptors[0].model"]
- id: window
  namespace: "100%"
  algorithm: sliding_window
  max_value: 5
  seconds: 1
- name: team-month
  namespace: llm_tokens
  max_value: 1000000
  calendar: month
  timezone: Europe/Paris
  variables: ["descriptors[0].team"]
  cost: "uint(descriptors[0].input_tokens) + 4u * uint(descriptors[0].output_tokens)"
- id: daily
  namespace: llm_tokens
  max_value: 5000
  calendar: day
- name: inflight
  namespace: llm_tokens
  algorithm: concurrency
  max_value: 4
  seconds: 60
  conditions: ["descriptors[0]['tier'] == 'free'"]
  variables: ["descriptors[0]['user_id']"]
"#;

/// Per limit above, in order: its identity, the values of one of its counters, and that
/// counter's Redis key under the default prefix `ratekeeper`.
const GOLDEN: [(u64, &[&str], &str); 11] = [
    (
        0x7cd19f4bbcb78639,
        &["alice"],
        "ratekeeper:{llm_tokens}:7cd19f4bbcb78639:5:alice",
    ),
    (
        0xad1ef16ca0ed5f0c,
        &["alice"],
        "ratekeeper:{llm_tokens}:ad1ef16ca0ed5f0c:5:alice",
    ),
    (
        0x957b7c56736876a9,
        &["bob"],
        "ratekeeper:{llm/llm-route}:957b7c56736876a9:3:bob",
    ),
    (
        0x15994bfba5f0928d,
        &["regular-user:carol"],
        "ratekeeper:{asm}:15994bfba5f0928d:18:regular-user:carol",
    ),
    (
        0x301bbf294005cc2b,
        &["dave"],
        "ratekeeper:{kuadrant-system/toystore}:301bbf294005cc2b:4:dave",
    ),
    (
        0x17390eec343ad2f0,
        &["erin"],
        "ratekeeper:{llm_tokens}:17390eec343ad2f0:4:erin",
    ),
    (
        0xe1ba71da589900d4,
        &["frank", "gpt-4o"],
        "ratekeeper:{team%7Ba%7D}:e1ba71da589900d4:5:frank6:gpt-4o",
    ),
    (
        0x97f3d3764c6ecd0b,
        &[],
        "ratekeeper:{100%25}:97f3d3764c6ecd0b:",
    ),
    (
        0x5fb1e793e5541449,
        &["research"],
        "ratekeeper:{llm_tokens}:5fb1e793e5541449:8:research",
    ),
    (
        0x27af56d62abe73f1,
        &[],
        "ratekeeper:{llm_tokens}:27af56d62abe73f1:",
    ),
    (
        0x6367d89287276fb9,
        &["alice"],
        "ratekeeper:{llm_tokens}:6367d89287276fb9:5:alice",
    ),
];

#[test]
fn limit_identities_and_redis_keys_are_the_golden_ones() {
    let limits = parse_limits("golden.yaml", LIMITS).unwrap();
    assert_eq!(limits.len(), GOLDEN.len());
    // A concurrency limit is another limit than the fixed window with the same fields.
    assert_ne!(limits[8].key, limits[0].key);
    assert_golden_keys(
        limits.iter().map(|l| (l.key, l.namespace.as_str())),
        &GOLDEN,
    );
}

/// Each limit's identity, and the Redis key of its counter for the golden values, are the
/// golden ones (`golden`, in the limits' order).
fn assert_golden_keys<'a>(
    limits: impl Iterator<Item = (u64, &'a str)>,
    golden: &[(u64, &[&str], &str)],
) {
    let mut actual = Vec::new();
    for ((id, namespace), &(_, values, _)) in limits.zip(golden) {
        let key = CounterKey::new(id, values);
        let redis_key =
            String::from_utf8(counter_key("ratekeeper", namespace, &key)).expect("UTF-8");
        actual.push((id, values, redis_key));
    }
    let actual_text: Vec<String> = actual
        .iter()
        .map(|(id, values, key)| format!("(0x{id:016x}, &{values:?}, {key:?}),"))
        .collect();
    let golden: Vec<(u64, &[&str], String)> = golden
        .iter()
        .map(|&(id, values, key)| (id, values, key.to_string()))
        .collect();
    assert_eq!(
        actual,
        golden,
        "limit identities or Redis keys changed; if deliberate (see this file's doc comment):\n{}",
        actual_text.join("\n")
    );
}

/// Per kind of state: a counter, the charge made on it at [`NOW`], the exact value decide.lua
/// stores for it (a tag byte, then little-endian doubles; decide.lua's header), and the state
/// that value means.
fn states() -> [(Algorithm, u64, &'static str, CounterState); 5] {
    [
        // Fixed window: 1, used, window end.
        (
            Algorithm::FixedWindow(FixedWindow::new(50, 60_000)),
            7,
            "01 0000000000001c40 000026b96db77942",
            CounterState::Window(WindowState {
                used: 7,
                expires_at_ms: NOW + 60_000,
            }),
        ),
        // Token bucket refilled in steps (units are tokens): 2, level, last refill.
        (
            Algorithm::TokenBucket(TokenBucket::stepped(200, 50, 30_000)),
            30,
            "02 0000000000406540 000080aa6db77942",
            CounterState::Bucket(BucketState {
                units: 170,
                refilled_at_ms: NOW,
            }),
        ),
        // Token bucket refilled continuously (units are 1/60000 token): 2, level, last refill.
        (
            Algorithm::TokenBucket(TokenBucket::continuous(1000, 60_000)),
            30,
            "02 000000007ec08b41 000080aa6db77942",
            CounterState::Bucket(BucketState {
                units: 58_200_000,
                refilled_at_ms: NOW,
            }),
        ),
        // Sliding window: 3, window start, current, previous.
        (
            Algorithm::SlidingWindow(SlidingWindow::new(25, 2_000)),
            3,
            "03 000080aa6db77942 0000000000000840 0000000000000000",
            CounterState::Sliding(SlidingState {
                start_ms: NOW,
                current: 3,
                previous: 0,
            }),
        ),
        // Calendar quota (a month in UTC): a fixed window that ends on the 1st of next month.
        (
            Algorithm::FixedWindow(FixedWindow::calendar(
                1000,
                Calendar::new(Period::Month, "UTC".parse().unwrap()),
            )),
            7,
            "01 0000000000001c40 0000c0fc67c17942",
            CounterState::Window(WindowState {
                used: 7,
                expires_at_ms: NOW + 31 * 86_400_000,
            }),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn one_group(
    namespace: &str,
    key: CounterKey,
    algorithm: Algorithm,
    policy: Policy,
    cost: u64,
) -> Batch<'_> {
    Batch {
        namespace,
        hold: None,
        counters: vec![CounterRequest { key, algorithm }],
        groups: vec![Group {
            policy,
            cost,
            counters: vec![0],
            costs: Vec::new(),
        }],
    }
}

/// What this release writes is the golden value, and a golden value written by an earlier
/// release is read as the state it means.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_values_are_the_golden_ones_both_ways() {
    let url = common::redis::shared_url();
    let prefix = format!("golden{}", std::process::id());
    let storage = RedisStorage::open(&url, &prefix, Duration::from_secs(2)).unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let namespace = "llm/golden";
    for (i, (algorithm, cost, golden, state)) in states().into_iter().enumerate() {
        let golden = golden.replace(' ', "");
        // Written by this release.
        let key = CounterKey::new(i as u64, ["written"]);
        let batch = one_group(namespace, key.clone(), algorithm, Policy::Charge, cost);
        storage.apply(&batch, NOW).await.unwrap();
        let stored: Vec<u8> = redis::cmd("GET")
            .arg(counter_key(&prefix, namespace, &key))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(
            hex(&stored),
            golden,
            "{algorithm:?}: the stored value changed"
        );

        // Written by an earlier release: read back as the same state, and decided on.
        let key = CounterKey::new(i as u64, ["earlier"]);
        let bytes: Vec<u8> = (0..golden.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&golden[at..at + 2], 16).unwrap())
            .collect();
        let _: () = redis::cmd("SET")
            .arg(counter_key(&prefix, namespace, &key))
            .arg(bytes)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut connection)
            .await
            .unwrap();
        let listed = common::list_all(&storage, namespace, &[i as u64], NOW).await;
        let read: Vec<_> = listed
            .iter()
            .filter(|c| c.key == key)
            .map(|c| c.state)
            .collect();
        assert_eq!(read, [state], "{algorithm:?}");
        let check = one_group(namespace, key, algorithm, Policy::CheckOnly, 0);
        let outcome = storage.apply(&check, NOW).await.unwrap();
        let expected = algorithm.remaining(algorithm.current(Some(state), NOW), NOW);
        assert_eq!(outcome[0].counters[0].remaining, expected, "{algorithm:?}");
        let new = algorithm.remaining(algorithm.current(None, NOW), NOW);
        assert_ne!(expected, new, "the stored state is used, not a new one");
    }
}

/// Holds (new with reservations): `<counter key>:h` beside the counter (same hash tag), a hash
/// from reservation id to '<dd' amount, expiry (ms since 1970), whose TTL lasts until its last
/// hold expires. Written and read byte for byte, like the counters' values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_the_golden_ones_both_ways() {
    let url = common::redis::shared_url();
    let prefix = format!("goldenholds{}", std::process::id());
    let storage = RedisStorage::open(&url, &prefix, Duration::from_secs(2)).unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let namespace = "llm/golden";
    let algorithm = Algorithm::FixedWindow(FixedWindow::new(100, 60_000));
    let key = CounterKey::new(9, ["held"]);
    let hold_key = [counter_key(&prefix, namespace, &key), b":h".to_vec()].concat();
    let id = "00112233445566778899aabbccddeeff";
    let mut reserve = one_group(namespace, key.clone(), algorithm, Policy::Reserve, 30);
    reserve.hold = Some(HoldRequest {
        id: id.into(),
        expires_at_ms: NOW + 30_000,
        amounts: vec![30],
    });
    assert!(storage.apply(&reserve, NOW).await.unwrap()[0].admitted);
    let stored: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&hold_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    let stored: Vec<(String, String)> = stored.into_iter().map(|(k, v)| (k, hex(&v))).collect();
    assert_eq!(
        stored,
        [(
            id.to_string(),
            "0000000000003e400000d3b16db77942".to_string()
        )],
        "30 held until NOW + 30 s"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&hold_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        (1..=30_000).contains(&ttl),
        "the holds' key has a TTL: {ttl}"
    );

    // A hold written by an earlier release: 40 until NOW + 50 s, counted by every admission.
    let bytes = (0..32)
        .step_by(2)
        .map(|at| u8::from_str_radix(&"00000000000044400000b5b66db77942"[at..at + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let _: () = redis::cmd("HSET")
        .arg(&hold_key)
        .arg("earlier")
        .arg(bytes)
        .query_async(&mut connection)
        .await
        .unwrap();
    let check = one_group(namespace, key.clone(), algorithm, Policy::CheckOnly, 30);
    let outcome = storage.apply(&check, NOW).await.unwrap();
    assert_eq!(outcome[0].counters[0].remaining, 30, "100 - 30 - 40");
    let outcome = storage.apply(&check, NOW + 30_000).await.unwrap();
    assert_eq!(
        outcome[0].counters[0].remaining, 60,
        "the first hold expired"
    );
    assert_eq!(outcome[0].counters[0].holds.expired, 30);
}

/// A fixed window's key lives until its window ends: the TTL set when the window opened is kept
/// by later charges in it (decide.lua writes them with KEEPTTL), and a new window sets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_window_key_expires_when_its_window_ends() {
    let url = common::redis::shared_url();
    let prefix = format!("goldenttl{}", std::process::id());
    let storage = RedisStorage::open(&url, &prefix, Duration::from_secs(2)).unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let namespace = "llm/golden";
    let key = CounterKey::new(7, ["ttl"]);
    let redis_key = counter_key(&prefix, namespace, &key);
    let algorithm = Algorithm::FixedWindow(FixedWindow::new(100, 60_000));
    let charge = one_group(namespace, key, algorithm, Policy::Charge, 1);
    let pttl = |connection: &redis::aio::MultiplexedConnection| {
        let mut connection = connection.clone();
        let redis_key = redis_key.clone();
        async move {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&redis_key)
                .query_async(&mut connection)
                .await
                .unwrap();
            ttl
        }
    };

    // A new window: the key lives 60 s.
    storage.apply(&charge, NOW).await.unwrap();
    let opened = pttl(&connection).await;
    assert!(
        (59_000..=60_000).contains(&opened),
        "new window: PTTL {opened}"
    );
    // 30 s later on ratekeeper's clock (a moment later on Redis's), in the same window: the TTL
    // set when it opened stays (setting it again would give 30 s).
    storage.apply(&charge, NOW + 30_000).await.unwrap();
    let kept = pttl(&connection).await;
    assert!(
        (59_000..=60_000).contains(&kept),
        "same window: PTTL {kept}"
    );
    // The key about to expire, and a charge in the next window: that window sets its 60 s.
    let _: () = redis::cmd("PEXPIRE")
        .arg(&redis_key)
        .arg(5_000)
        .query_async(&mut connection)
        .await
        .unwrap();
    storage.apply(&charge, NOW + 60_000).await.unwrap();
    let renewed = pttl(&connection).await;
    assert!(
        (59_000..=60_000).contains(&renewed),
        "next window: PTTL {renewed}"
    );
}

/// The `disk` storage's keys and entries (src/storage/disk.rs), byte for byte, and read back:
/// a store written by this version must be read by the next.
#[test]
fn disk_entries_are_the_golden_ones_both_ways() {
    use ratekeeper::algorithm::Hold;
    use ratekeeper::storage::{Entry, decode_entry, decode_key, encode_entry, encode_key};
    let key = CounterKey::new(0x0102_0304_0506_0708, ["alice", "gold"]);
    assert_eq!(
        hex(&encode_key(&key)),
        "0102030405060708353a616c696365343a676f6c64"
    );
    assert_eq!(decode_key(&encode_key(&key)), Some(key));
    let hold = Hold {
        id: "ab".into(),
        amount: 3,
        expires_at_ms: 9,
    };
    let cases = [
        (
            Some(CounterState::Window(WindowState {
                used: 7,
                expires_at_ms: 1_000,
            })),
            vec![hold.clone()],
            "0101\
             0700000000000000e803000000000000\
             e803000000000000\
             01000000\
             02006162\
             0300000000000000\
             0900000000000000",
        ),
        (
            Some(CounterState::Bucket(BucketState {
                units: -2,
                refilled_at_ms: 5,
            })),
            vec![],
            "0102feffffffffffffff0500000000000000e80300000000000000000000",
        ),
        (
            Some(CounterState::Sliding(SlidingState {
                start_ms: 1,
                current: 2,
                previous: 3,
            })),
            vec![],
            "0103010000000000000002000000000000000300000000000000e80300000000000000000000",
        ),
        (
            None,
            vec![hold],
            "0100e803000000000000010000000200616203000000000000000900000000000000",
        ),
    ];
    for (state, holds, golden) in cases {
        let entry = Entry {
            state,
            expires_at_ms: 1_000,
            holds,
        };
        assert_eq!(hex(&encode_entry(&entry)), golden, "{entry:?}");
        let bytes: Vec<u8> = (0..golden.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&golden[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(decode_entry(&bytes), Some(entry));
    }
}

/// Slots (new with in-flight limits): a concurrency counter has no value of its own; each slot
/// is a hold of 1 in `<counter key>:h`, an admission's under `~<now_ms>.<n>` (the smallest `n`
/// free), ending `seconds` after it was taken. Written and read byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_the_golden_ones_both_ways() {
    let url = common::redis::shared_url();
    let prefix = format!("goldenslots{}", std::process::id());
    let storage = RedisStorage::open(&url, &prefix, Duration::from_secs(2)).unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let namespace = "llm/golden";
    let algorithm = Algorithm::Concurrency(Concurrency::new(4, 60_000));
    let key = CounterKey::new(10, ["running"]);
    let hold_key = [counter_key(&prefix, namespace, &key), b":h".to_vec()].concat();
    let admit = one_group(namespace, key.clone(), algorithm, Policy::AllOrNothing, 1);
    assert!(storage.apply(&admit, NOW).await.unwrap()[0].admitted);
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg(counter_key(&prefix, namespace, &key))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(value, None, "no counter value, only slots");
    let stored = |connection: &mut redis::aio::MultiplexedConnection| {
        let mut connection = connection.clone();
        let hold_key = hold_key.clone();
        async move {
            let stored: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(&hold_key)
                .query_async(&mut connection)
                .await
                .unwrap();
            let mut stored: Vec<(String, String)> =
                stored.into_iter().map(|(k, v)| (k, hex(&v))).collect();
            stored.sort();
            stored
        }
    };
    assert_eq!(
        stored(&mut connection).await,
        [(
            "~1767225600000.0".to_string(),
            "000000000000f03f000026b96db77942".to_string()
        )],
        "1 slot until NOW + 60 s"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&hold_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        (1..=60_000).contains(&ttl),
        "the slots' key has a TTL: {ttl}"
    );

    // A slot written by an earlier release, ending at NOW + 10 s: counted, and the oldest.
    let bytes = (0..32)
        .step_by(2)
        .map(|at| u8::from_str_radix(&"000000000000f03f0000f1ac6db77942"[at..at + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let _: () = redis::cmd("HSET")
        .arg(&hold_key)
        .arg("~1767225550000.0")
        .arg(bytes)
        .query_async(&mut connection)
        .await
        .unwrap();
    let check = one_group(namespace, key.clone(), algorithm, Policy::CheckOnly, 0);
    let outcome = storage.apply(&check, NOW).await.unwrap();
    let counter = outcome[0].counters[0];
    assert_eq!((counter.remaining, counter.reset_in_ms), (2, 10_000));
    // A refund frees the oldest.
    let refund = one_group(namespace, key.clone(), algorithm, Policy::Refund, 1);
    storage.apply(&refund, NOW).await.unwrap();
    assert_eq!(
        stored(&mut connection).await,
        [(
            "~1767225600000.0".to_string(),
            "000000000000f03f000026b96db77942".to_string()
        )]
    );
}

/// envoyproxy/ratelimit-format limits: their identity is their domain, descriptor path, unit
/// and algorithm (not `requests_per_unit` or `name`), their counter's values the descriptor's.
const RATELIMIT_FORMAT: &str = r#"
domain: envoy/route
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 10, name: per-user}
  - key: route
    value: chat
    descriptors:
      - key: model
        value: gpt*
        share_threshold: true
        rate_limit: {unit: hour, requests_per_unit: 1000}
  - key: bucket
    rate_limit: {unit: day, requests_per_unit: 5, algorithm: token_bucket}
"#;

const RATELIMIT_GOLDEN: [(u64, &[&str], &str); 3] = [
    (
        0x92887ccdf6280823,
        &["alice"],
        "ratekeeper:{envoy/route}:92887ccdf6280823:5:alice",
    ),
    (
        0x182701fd7e891232,
        &["chat", "gpt*"],
        "ratekeeper:{envoy/route}:182701fd7e891232:4:chat4:gpt*",
    ),
    (
        0xf42e82a30eb62855,
        &["b"],
        "ratekeeper:{envoy/route}:f42e82a30eb62855:1:b",
    ),
];

#[test]
fn ratelimit_format_identities_and_redis_keys_are_the_golden_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, RATELIMIT_FORMAT).unwrap();
    let set = ratekeeper::limits::load_path(&path, Default::default()).unwrap();
    let limits = set.namespace("envoy/route");
    assert_eq!(limits.len(), RATELIMIT_GOLDEN.len());
    assert_golden_keys(
        limits.iter().map(|l| (l.key, l.namespace.as_str())),
        &RATELIMIT_GOLDEN,
    );
}
