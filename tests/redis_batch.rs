//! Decisions waiting at the same moment share one script call (src/storage/redis_batch.rs), on
//! a real redis-server and a real Redis Cluster: each decision stays exact, an error stops only
//! its own decision, a lone call goes alone, and a cluster call never mixes slots.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{RedisCluster, RedisProcess, cli, shared_cluster_url};
use ratekeeper::algorithm::{Algorithm, FixedWindow, Group, GroupOutcome, Policy};
use ratekeeper::storage::{
    Batch, CounterKey, CounterRequest, RedisStorage, Storage, StorageError, counter_key,
};

const NOW: u64 = 1_767_225_600_000;

/// One all-or-nothing decision of cost 1 on `namespace`'s counter `value` (a window of `max`
/// a minute).
fn decision(namespace: &str, value: &str, max: u64) -> Batch<'static> {
    Batch {
        namespace: Box::leak(namespace.to_string().into_boxed_str()),
        hold: None,
        counters: vec![CounterRequest {
            key: CounterKey::new(1, [value]),
            algorithm: Algorithm::FixedWindow(FixedWindow::new(max, 60_000)),
        }],
        groups: vec![Group {
            policy: Policy::AllOrNothing,
            cost: 1,
            counters: vec![0],
            costs: vec![],
        }],
    }
}

/// `evalsha` calls Redis has counted since the last `CONFIG RESETSTAT`.
fn evalsha_calls(port: u16) -> u64 {
    let stats = cli(port, &["INFO", "commandstats"]).unwrap_or_default();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs every decision at once on `storage`; the results in the same order.
async fn all_at_once(
    storage: &Arc<RedisStorage>,
    decisions: Vec<Batch<'static>>,
) -> Vec<Result<Vec<GroupOutcome>, StorageError>> {
    let tasks: Vec<_> = decisions
        .into_iter()
        .map(|batch| {
            let storage = Arc::clone(storage);
            tokio::spawn(async move { storage.apply(&batch, NOW).await })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("the task ran"));
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_decisions_share_script_calls_and_each_stays_exact() {
    let redis = RedisProcess::start();
    let storage =
        Arc::new(RedisStorage::open(&redis.url(), "batch", Duration::from_secs(10)).unwrap());
    // The script is loaded and the clock offset learned.
    storage
        .apply(&decision("n", "warm", 10), NOW)
        .await
        .unwrap();

    // One call at a time: each goes alone.
    cli(redis.port, &["CONFIG", "RESETSTAT"]).unwrap();
    for _ in 0..5 {
        storage
            .apply(&decision("n", "alone", 10), NOW)
            .await
            .unwrap();
    }
    assert_eq!(evalsha_calls(redis.port), 5);

    // A counter whose key holds something else (a hash): its decision fails (WRONGTYPE).
    let bad = counter_key("batch", "n", &CounterKey::new(1, ["bad"]));
    let bad = String::from_utf8(bad).unwrap();
    cli(redis.port, &["HSET", &bad, "x", "1"]).unwrap();

    // Redis frozen while 151 decisions arrive: they wait together and go in a few calls.
    cli(redis.port, &["CONFIG", "RESETSTAT"]).unwrap();
    redis.pause();
    let mut decisions = Vec::new();
    for i in 0..150 {
        // 100 on a counter of 30, 50 on one of 1000, and the bad one among them.
        decisions.push(if i % 3 == 2 {
            decision("n", "roomy", 1000)
        } else {
            decision("n", "tight", 30)
        });
        if i == 75 {
            decisions.push(decision("n", "bad", 10));
        }
    }
    let storage2 = Arc::clone(&storage);
    let running = tokio::spawn(async move { all_at_once(&storage2, decisions).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.resume();
    let results = running.await.unwrap();

    let calls = evalsha_calls(redis.port);
    assert!(
        calls <= 10,
        "151 waiting decisions took {calls} script calls"
    );
    let mut tight_remaining = Vec::new();
    let (mut roomy, mut failed) = (0, 0);
    for result in &results {
        match result {
            Ok(outcome) if outcome[0].counters[0].remaining >= 900 => {
                assert!(outcome[0].admitted);
                roomy += 1;
            }
            Ok(outcome) if outcome[0].admitted => {
                tight_remaining.push(outcome[0].counters[0].remaining)
            }
            Ok(outcome) => assert_eq!(outcome[0].counters[0].remaining, 0),
            Err(StorageError::Unavailable(message)) => {
                assert!(message.contains("WRONGTYPE"), "{message}");
                failed += 1;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((roomy, failed), (50, 1));
    // Exactly 30 of the 100 admitted, each seeing the one before it.
    tight_remaining.sort_unstable();
    assert_eq!(tight_remaining, (0..30).collect::<Vec<u64>>());
    let tight = counter_key("batch", "n", &CounterKey::new(1, ["tight"]));
    let tight = String::from_utf8(tight).unwrap();
    assert_eq!(cli(redis.port, &["STRLEN", &tight]).unwrap().trim(), "17");
    assert_eq!(
        cli(redis.port, &["TYPE", &bad]).unwrap().trim(),
        "hash",
        "the failed decision changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_call_carries_one_slot_and_each_decision_stays_exact() {
    let prefix = format!("batchc{}", std::process::id());
    let storage = Arc::new(
        RedisStorage::open(&shared_cluster_url(), &prefix, Duration::from_secs(10)).unwrap(),
    );
    // Namespaces in different slots, all at once: a call that mixed them would fail
    // (CROSSSLOT) or run on a node that does not own some of its keys (MOVED).
    let namespaces = ["a", "b", "c", "d", "e", "f"];
    let mut decisions = Vec::new();
    for round in 0..25 {
        for namespace in namespaces {
            decisions.push(decision(namespace, &format!("u{}", round % 2), 10));
        }
    }
    let results = all_at_once(&storage, decisions).await;
    let mut admitted = std::collections::HashMap::new();
    for (i, result) in results.iter().enumerate() {
        let outcome = result
            .as_ref()
            .unwrap_or_else(|e| panic!("decision {i}: {e:?}"));
        if outcome[0].admitted {
            *admitted.entry(i % namespaces.len()).or_insert(0) += 1;
        }
    }
    // Each namespace: 2 counters of 10, one asked 13 times, the other 12.
    for n in 0..namespaces.len() {
        assert_eq!(admitted.get(&n), Some(&20), "{admitted:?}");
    }
}

/// The node of `cluster` that owns hash tag `{tag}` (the others answer MOVED).
fn owner(cluster: &RedisCluster, tag: &str) -> usize {
    let key = format!("{{{tag}}}");
    (0..cluster.nodes.len())
        .find(|&i| {
            cli(cluster.nodes[i].port, &["GET", &key])
                .is_some_and(|answer| !answer.contains("MOVED"))
        })
        .expect("one node owns the slot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_cluster_node_holds_back_only_its_own_namespaces() {
    let cluster = RedisCluster::start();
    let storage =
        Arc::new(RedisStorage::open(&cluster.url(), "stall", Duration::from_secs(2)).unwrap());
    // Two namespaces on different nodes.
    let stalled = "a";
    let node = owner(&cluster, stalled);
    let healthy = (0..100)
        .map(|i| format!("n{i}"))
        .find(|namespace| owner(&cluster, namespace) != node)
        .expect("a namespace on another node");
    for namespace in [stalled, healthy.as_str()] {
        storage
            .apply(&decision(namespace, "warm", 10), NOW)
            .await
            .unwrap();
    }

    // The stalled namespace's node freezes with two calls outstanding on it.
    cluster.nodes[node].pause();
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let storage = Arc::clone(&storage);
        stuck.push(tokio::spawn(async move {
            storage.apply(&decision("a", "u", 10), NOW).await
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Meanwhile the other node answers the other namespace, at once.
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let outcome = storage
            .apply(&decision(&healthy, "u", 10), NOW)
            .await
            .expect("the healthy node's namespace is answered");
        assert!(outcome[0].admitted);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "held back {:?} by the stalled node",
        started.elapsed()
    );
    // The stalled node's calls fail within the timeout and, once it runs again, change nothing.
    for call in stuck {
        assert!(call.await.unwrap().is_err());
    }
    cluster.nodes[node].resume();
    let key = counter_key("stall", stalled, &CounterKey::new(1, ["u"]));
    let key = String::from_utf8(key).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        cli(cluster.nodes[node].port, &["EXISTS", &key])
            .unwrap()
            .trim(),
        "0"
    );
}
