//! Redis keys of hostile namespaces, on real Redis and a real Redis Cluster: a namespace with
//! `{` or `}` keeps all of a request's counters in one slot, never shares a counter with another
//! namespace, and `/counters` lists exactly its own counters.

mod common;

use std::time::Duration;

use common::redis::{RedisCluster, cli, shared_url};
use ratekeeper::algorithm::{Algorithm, FixedWindow, Group, GroupOutcome, Policy};
use ratekeeper::storage::{Batch, CounterKey, CounterRequest, RedisStorage, Storage, StorageError};

const NOW: u64 = 1_767_225_600_000;
const MINUTE: u64 = 60_000;

fn window(max: u64) -> Algorithm {
    Algorithm::FixedWindow(FixedWindow::new(max, MINUTE))
}

/// One all-or-nothing group over `counters` (limit id, value) of `namespace`, each a window of
/// `max` a minute.
fn batch<'a>(namespace: &'a str, counters: &[(u64, &str)], max: u64, cost: u64) -> Batch<'a> {
    Batch {
        namespace,
        hold: None,
        counters: counters
            .iter()
            .map(|&(limit, value)| CounterRequest {
                key: CounterKey::new(limit, [value]),
                algorithm: window(max),
            })
            .collect(),
        groups: vec![Group {
            policy: Policy::AllOrNothing,
            cost,
            counters: (0..counters.len()).collect(),
            costs: Vec::new(),
        }],
    }
}

async fn apply(
    storage: &RedisStorage,
    batch: &Batch<'_>,
) -> Result<Vec<GroupOutcome>, StorageError> {
    storage.apply(batch, NOW).await
}

/// Every key under `prefix` on the cluster, with the port of the node that holds it.
fn keys_on(cluster: &RedisCluster, prefix: &str) -> Vec<(u16, String)> {
    let mut found = Vec::new();
    for node in &cluster.nodes {
        let keys = cli(node.port, &["--scan", "--pattern", &format!("{prefix}*")]).unwrap();
        for key in keys.lines().filter(|k| !k.is_empty()) {
            found.push((node.port, key.to_string()));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_with_braces_keeps_a_requests_counters_in_one_cluster_slot() {
    let cluster = RedisCluster::start();
    let namespaces = ["}x{", "}", "{}", "a}b{c", "{", "%7D", "plain"];
    for (i, namespace) in namespaces.iter().enumerate() {
        // A prefix per namespace, to find its keys.
        let prefix = format!("rk{i}");
        let storage = RedisStorage::open(&cluster.url(), &prefix, Duration::from_secs(2)).unwrap();
        // Three counters (three limits), decided by one script: they must share a slot.
        let counters = [(1, "u"), (2, "u"), (3, "v")];
        let outcome = apply(&storage, &batch(namespace, &counters, 10, 4))
            .await
            .unwrap_or_else(|e| panic!("namespace {namespace:?}: {e}"));
        assert!(outcome[0].admitted, "{namespace:?}");
        let keys = keys_on(&cluster, &format!("{prefix}:"));
        assert_eq!(keys.len(), 3, "{namespace:?}: {keys:#?}");
        let slots: std::collections::BTreeSet<String> = keys
            .iter()
            .map(|(port, key)| cli(*port, &["CLUSTER", "KEYSLOT", key]).unwrap())
            .collect();
        assert_eq!(
            slots.len(),
            1,
            "{namespace:?}: {keys:#?} in slots {slots:?}"
        );
        // The counters are the namespace's own: a second call sees the first one's charge.
        let outcome = apply(&storage, &batch(namespace, &[(1, "u")], 10, 0))
            .await
            .unwrap();
        assert_eq!(outcome[0].counters[0].remaining, 6, "{namespace:?}");
    }
}

/// Before namespaces were encoded, `a}:0000000000000001:22:` with limit 2 and value `z` wrote
/// the very key of namespace `a`, limit 1, value `}:0000000000000002:1:z`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_cannot_reach_into_another_namespaces_counters() {
    let prefix = format!("collide{}", std::process::id());
    let storage = RedisStorage::open(&shared_url(), &prefix, Duration::from_secs(2)).unwrap();
    let intruder = "a}:0000000000000001:22:";
    let victim_value = "}:0000000000000002:1:z";
    let outcome = apply(&storage, &batch(intruder, &[(2, "z")], 1, 1))
        .await
        .unwrap();
    assert!(outcome[0].admitted);

    let outcome = apply(&storage, &batch("a", &[(1, victim_value)], 1, 1))
        .await
        .unwrap();
    assert!(
        outcome[0].admitted,
        "namespace `a` was charged by namespace {intruder:?}"
    );
    let listed = common::list_all(&storage, "a", &[1], NOW).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key.values(), [victim_value]);
    let listed = common::list_all(&storage, intruder, &[2], NOW).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key.values(), ["z"]);
}

/// `/counters/{ns}` lists exactly the namespace's counters, whatever characters the names hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_namespace_shows_exactly_its_counters() {
    let prefix = format!("list{}", std::process::id());
    let storage = RedisStorage::open(&shared_url(), &prefix, Duration::from_secs(2)).unwrap();
    let namespaces = [
        "a", "a}", "a}:x", "{a}", "a*", "ab", "a[b]", "%7D", "}", "a%",
    ];
    for (i, namespace) in namespaces.iter().enumerate() {
        apply(&storage, &batch(namespace, &[(1, &format!("n{i}"))], 10, 1))
            .await
            .unwrap();
    }
    for (i, namespace) in namespaces.iter().enumerate() {
        let listed = common::list_all(&storage, namespace, &[1], NOW).await;
        let values: Vec<Vec<&str>> = listed.iter().map(|c| c.key.values()).collect();
        assert_eq!(values, [[format!("n{i}")]], "namespace {namespace:?}");
    }
}
