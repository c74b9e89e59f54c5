//! Exactness under concurrency: many clients, many connections, one counter.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

const LIMIT: u64 = 500;

async fn concurrent_calls_admit_exactly_the_limit(backend: Backend) {
    let yaml = format!(
        "- {{name: shared, namespace: ns, max_value: {LIMIT}, seconds: 3600, variables: ['descriptors[0].k']}}\n\
         - {{name: global, namespace: ns, max_value: 100000, seconds: 3600}}"
    );
    let server = TestServer::on(backend, &yaml).await;
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // 8 connections x 8 tasks each, 1600 calls of cost 1 for a limit of 500.
    for _ in 0..8 {
        let channel = grpc_channel(server.rls_addr()).await.unwrap();
        for _ in 0..8 {
            let mut client = RateLimitServiceClient::new(channel.clone());
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    let r = client
                        .should_rate_limit(request("ns", vec![descriptor(&[("k", "hot")])], 1))
                        .await
                        .unwrap()
                        .into_inner();
                    if code(&r) == Code::Ok {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), LIMIT);
    // All-or-nothing: the global counter was charged exactly as often as the shared one.
    let counters = server.counters("ns").await;
    let used: Vec<u64> = counters.iter().map(|(_, c)| used(&c.state)).collect();
    assert_eq!(used, vec![LIMIT, LIMIT]);
}

async fn concurrent_charges_are_never_lost(backend: Backend) {
    let yaml =
        "- {name: t, namespace: ns, max_value: 10, seconds: 3600, variables: ['descriptors[0].k']}";
    let server = TestServer::on(backend, yaml).await;
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let mut client = server.kuadrant.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                client
                    .report(request(
                        "ns",
                        vec![descriptor(&[("k", "hot")])],
                        (t + 1) as u32,
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let expected: u64 = (1..=16).map(|t| t * 20).sum();
    let counters = server.counters("ns").await;
    assert_eq!(used(&counters[0].1.state), expected);
}

on_every_storage!(
    concurrent_calls_admit_exactly_the_limit,
    concurrent_charges_are_never_lost,
);
