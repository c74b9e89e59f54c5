//! The `disk` storage through the real binary: counters, every algorithm's state and
//! reservations' holds survive a graceful restart and a `kill -9` with known traffic, and
//! expired counters are deleted from the store.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::process::Server;
use common::{code, descriptor, grpc_channel, request};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use ratekeeper::proto::kuadrant::service::ratelimit::v1::{CommitRequest, ReserveRequest};

/// One limit per algorithm, each on its own descriptor value, and a 1-second window.
const LIMITS: &str = r#"
- {name: window, namespace: disk, max_value: 50, seconds: 600, conditions: ["descriptors[0].kind == 'window'"], variables: ["descriptors[0].user"]}
- {name: bucket, namespace: disk, max_value: 50, seconds: 600, algorithm: token_bucket, conditions: ["descriptors[0].kind == 'bucket'"], variables: ["descriptors[0].user"]}
- {name: sliding, namespace: disk, max_value: 50, seconds: 600, algorithm: sliding_window, conditions: ["descriptors[0].kind == 'sliding'"], variables: ["descriptors[0].user"]}
- {name: short, namespace: disk, max_value: 50, seconds: 1, conditions: ["descriptors[0].kind == 'short'"], variables: ["descriptors[0].user"]}
"#;

/// A fresh directory for a test's store and limits file.
fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ratekeeper-disk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("limits.yaml"), LIMITS).unwrap();
    dir
}

async fn start(dir: &Path) -> Server {
    let limits = dir.join("limits.yaml");
    let store = dir.join("store");
    Server::start_on_loopback(&[
        limits.to_str().unwrap(),
        "disk",
        "--optimize",
        "throughput",
        store.to_str().unwrap(),
    ])
    .await
}

/// Charges `hits` to `user`'s counter of the `kind` limit: (code, remaining).
async fn charge(server: &Server, kind: &str, user: &str, hits: u32) -> (Code, u32) {
    let r = server
        .should(request(
            "disk",
            vec![descriptor(&[("kind", kind), ("user", user)])],
            hits,
        ))
        .await;
    (code(&r), r.statuses[0].limit_remaining)
}

async fn kill_9(server: &mut Server) {
    let pid = server.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success()
    );
    for _ in 0..250 {
        if server.exited().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("ratekeeper survived kill -9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_survives_a_restart_and_a_kill_9() {
    let dir = workdir("restart");
    let mut first = start(&dir).await;
    for kind in ["window", "bucket", "sliding"] {
        assert_eq!(
            charge(&first, kind, "alice", 30).await,
            (Code::Ok, 20),
            "{kind}"
        );
    }
    assert_eq!(first.terminate().await.code(), Some(0));

    // Graceful restart: 20 left on each, so 21 is refused and 20 admitted.
    let mut second = start(&dir).await;
    for kind in ["window", "bucket", "sliding"] {
        assert_eq!(
            charge(&second, kind, "alice", 21).await.0,
            Code::OverLimit,
            "{kind}"
        );
    }
    // Known traffic, then kill -9 right after the last answer: 7 charges of 1 on each.
    for kind in ["window", "bucket", "sliding"] {
        for _ in 0..7 {
            assert_eq!(
                charge(&second, kind, "alice", 1).await.0,
                Code::Ok,
                "{kind}"
            );
        }
    }
    kill_9(&mut second).await;

    let third = start(&dir).await;
    for kind in ["window", "bucket", "sliding"] {
        // 50 - 30 - 7 = 13 left, less this call's 1, to the token (the bucket refills 50
        // per 600 s: at most a token or so while the test runs).
        let (c, left) = charge(&third, kind, "alice", 1).await;
        assert_eq!(c, Code::Ok, "{kind}");
        if kind == "bucket" {
            assert!((12..=13).contains(&left), "{kind}: {left} left");
        } else {
            assert_eq!(left, 12, "{kind}: every answered charge survived kill -9");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_made_before_a_kill_9_is_committed_after_it() {
    let dir = workdir("holds");
    let mut first = start(&dir).await;
    let mut kuadrant = KuadrantClient::new(grpc_channel(first.rls).await.unwrap());
    let entries = [("kind", "window"), ("user", "bob")];
    let reserved = kuadrant
        .reserve(ReserveRequest {
            domain: "disk".into(),
            descriptors: vec![descriptor(&entries)],
            amount: 20,
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reserved.code, Code::Ok as i32);
    kill_9(&mut first).await;

    let second = start(&dir).await;
    // The hold of 20 is still there: 31 does not fit in 50 - 20.
    assert_eq!(
        charge(&second, "window", "bob", 31).await.0,
        Code::OverLimit
    );
    let mut kuadrant = KuadrantClient::new(grpc_channel(second.rls).await.unwrap());
    let committed = kuadrant
        .commit(CommitRequest {
            domain: "disk".into(),
            descriptors: vec![descriptor(&entries)],
            reservation_id: reserved.reservation_id,
            actual_amount: 12,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(committed.reservation_released, "the hold survived kill -9");
    // 12 charged by the commit, 1 by this call.
    assert_eq!(charge(&second, "window", "bob", 1).await, (Code::Ok, 37));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_counters_are_deleted_from_the_store() {
    let dir = workdir("expiry");
    let mut first = start(&dir).await;
    for user in ["a", "b", "c"] {
        assert_eq!(charge(&first, "short", user, 1).await.0, Code::Ok);
    }
    assert_eq!(charge(&first, "window", "d", 1).await.0, Code::Ok);
    assert_eq!(first.terminate().await.code(), Some(0));

    // Loaded as they were (4), then the sweep (every 5 s) deletes the three 1-second ones.
    let mut second = start(&dir).await;
    let log = second
        .log_when(|log| log.contains("counters on disk"))
        .await;
    assert!(log.contains("counters=4"), "{log}");
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    assert_eq!(second.terminate().await.code(), Some(0));

    let third = start(&dir).await;
    let log = third.log_when(|log| log.contains("counters on disk")).await;
    assert!(log.contains("counters=1"), "{log}");
    assert_eq!(charge(&third, "window", "d", 1).await, (Code::Ok, 48));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A path that cannot hold a store stops the server at start, naming it.
#[tokio::test]
async fn an_unusable_path_is_refused_at_start() {
    let dir = workdir("bad");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let output = common::process::command()
        .args(["-b", "127.0.0.1", "-B", "127.0.0.1", "-p", "0", "-P", "0"])
        .arg(dir.join("limits.yaml"))
        .arg("disk")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("cannot open the disk storage at") && err.contains("a-file"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// One process per store: a second server on the same directory is refused at start.
#[tokio::test]
async fn a_second_process_on_the_same_store_is_refused() {
    let dir = workdir("lock");
    let _first = start(&dir).await;
    let output = common::process::command()
        .args(["-b", "127.0.0.1", "-B", "127.0.0.1", "-p", "0", "-P", "0"])
        .arg(dir.join("limits.yaml"))
        .arg("disk")
        .arg(dir.join("store"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    assert!(err.contains("another process is using it"), "{err}");
}
