//! `GET /counters/{ns}` page by page, black box: every counter exactly once across pages on
//! every storage, `?limit=` bounding a page, bad parameters answered 400, a page of a huge
//! in-memory store staying a page, and a Redis listing among many unrelated keys never making
//! Redis run one long command.

mod common;

use std::collections::HashMap;

use common::redis::{RedisProcess, cli};
use common::{Backend, Options, TestServer, descriptor, http_client, request};
use ratekeeper::limiter::{Call, Descriptor, Request};
use reqwest::StatusCode;
use serde_json::Value;

const LIMITS: &str = r#"
- name: per-user
  namespace: paging
  max_value: 1000
  seconds: 60
  variables:
    - descriptors[0].user
- name: other
  namespace: elsewhere
  max_value: 10
  seconds: 60
  variables:
    - descriptors[0].user
"#;

/// Charges 1 to the counter of each user `u<i>` of `users` in `namespace`, over gRPC (Report),
/// from 8 concurrent clients.
async fn fill(server: &TestServer, namespace: &str, users: std::ops::Range<usize>) {
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let mut client = server.kuadrant.clone();
        let namespace = namespace.to_string();
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            for user in users.skip(worker).step_by(8) {
                let user = format!("u{user}");
                let call = request(&namespace, vec![descriptor(&[("user", &user)])], 1);
                client.report(call).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// One page: the status, the body, and the next page's path and cursor if there is one.
struct Page {
    status: StatusCode,
    body: String,
    next: Option<(String, String)>,
}

impl Page {
    fn counters(&self) -> Vec<Value> {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        let value: Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON: {e}: {}", self.body));
        value
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("not a list: {value}"))
    }
}

async fn get(server: &TestServer, path_and_query: &str) -> Page {
    let url = format!("{}{path_and_query}", server.http_base);
    let response = http_client().get(&url).send().await.unwrap();
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let next = match (header("link"), header("x-next-cursor")) {
        (None, None) => None,
        (Some(link), Some(cursor)) => {
            // `<path>; rel="next"`, and the cursor it carries is the header's.
            let path = link
                .strip_prefix('<')
                .and_then(|l| l.strip_suffix(">; rel=\"next\""))
                .unwrap_or_else(|| panic!("Link: {link}"))
                .to_string();
            assert!(path.ends_with(&format!("cursor={cursor}")), "{link}");
            Some((path, cursor))
        }
        other => panic!("Link and X-Next-Cursor come together: {other:?}"),
    };
    let body = response.text().await.unwrap();
    Page { status, body, next }
}

/// Follows the pages of `namespace` from `first` to the end: the users of each page.
async fn all_pages(server: &TestServer, first: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut path = first.to_string();
    loop {
        let page = get(server, &path).await;
        let users = page
            .counters()
            .iter()
            .map(|c| {
                c["set_variables"]["descriptors[0].user"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        pages.push(users);
        match page.next {
            Some((next, _)) => path = next,
            None => return pages,
        }
        assert!(pages.len() < 100_000, "the listing does not end");
    }
}

/// How many times each user was listed.
fn tally(pages: &[Vec<String>]) -> HashMap<&str, usize> {
    let mut seen = HashMap::new();
    for user in pages.iter().flatten() {
        *seen.entry(user.as_str()).or_insert(0) += 1;
    }
    seen
}

fn assert_each_once(pages: &[Vec<String>], users: usize) {
    let seen = tally(pages);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "listed more than once: {twice:?}");
    assert_eq!(seen.len(), users, "every counter is listed");
    for user in 0..users {
        assert!(seen.contains_key(format!("u{user}").as_str()), "u{user}");
    }
}

async fn pages_list_every_counter_exactly_once(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    fill(&server, "paging", 0..2_500).await;
    fill(&server, "elsewhere", 0..300).await;

    let pages = all_pages(&server, "/counters/paging?limit=1000").await;
    for page in &pages {
        assert!(page.len() <= 1000, "a page of {} counters", page.len());
    }
    assert!(pages.len() >= 3, "{} pages", pages.len());
    assert_each_once(&pages, 2_500);

    // Without parameters: the first page of the default size, entries as they always were.
    let page = get(&server, "/counters/paging").await;
    let counters = page.counters();
    assert_eq!(counters.len(), 1000);
    assert!(page.next.is_some(), "a next page");
    let first = &counters[0];
    assert_eq!(first["limit"]["name"], "per-user");
    assert_eq!(first["remaining"], 999);
    assert_eq!(first["expires_in_seconds"], 60);
    server.shutdown().await;
}

async fn limit_bounds_a_page_and_bad_parameters_are_400(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    fill(&server, "paging", 0..20).await;

    let page = get(&server, "/counters/paging?limit=7").await;
    assert_eq!(page.counters().len(), 7);
    let (next, _) = page.next.expect("a next page");
    assert!(next.starts_with("/counters/paging?"), "{next}");
    let pages = all_pages(&server, "/counters/paging?limit=7").await;
    assert!(pages.iter().all(|p| p.len() <= 7), "{pages:?}");
    assert_each_once(&pages, 20);
    // The largest page is allowed, and a small listing ends on its first page.
    let page = get(&server, "/counters/paging?limit=10000").await;
    assert_eq!(page.counters().len(), 20);
    assert!(page.next.is_none());

    let cases = [
        ("cursor=garbage", "cursor"),
        ("cursor=", "cursor"),
        ("cursor=1.2.3", "cursor"),
        ("cursor=-1.0", "cursor"),
        ("cursor=99999999999999999999999.0", "cursor"),
        ("limit=0", "limit"),
        ("limit=-3", "limit"),
        ("limit=ten", "limit"),
        ("limit=10001", "limit"),
        ("limit=5&limit=6", "limit"),
        ("limt=5", "limt"),
    ];
    for (query, named) in cases {
        let page = get(&server, &format!("/counters/paging?{query}")).await;
        assert_eq!(
            page.status,
            StatusCode::BAD_REQUEST,
            "?{query}: {}",
            page.body
        );
        assert!(page.body.contains(named), "?{query}: {}", page.body);
    }
    server.shutdown().await;
}

on_every_storage!(
    pages_list_every_counter_exactly_once,
    limit_bounds_a_page_and_bad_parameters_are_400,
);

/// 200,000 counters in memory: a page is a page (1000 by default), not the whole store, and
/// walking the pages lists each counter once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_a_huge_memory_store_is_bounded() {
    const USERS: usize = 200_000;
    let options = Options {
        capacity: 300_000,
        ..Options::default()
    };
    let server = TestServer::start_with(LIMITS, options).await;
    for user in 0..USERS {
        let user = format!("u{user}");
        let call = Request {
            namespace: "paging".to_string(),
            descriptors: vec![Descriptor::of(&[("user", &user)])],
            hits: 1,
        };
        server.limiter.decide(&call, Call::Report).await.unwrap();
    }

    let page = get(&server, "/counters/paging").await;
    assert_eq!(page.counters().len(), 1000);
    assert!(page.next.is_some(), "a next page");
    let page = get(&server, "/counters/paging?limit=10000").await;
    assert_eq!(page.counters().len(), 10_000);

    let pages = all_pages(&server, "/counters/paging?limit=10000").await;
    assert!(pages.iter().all(|p| p.len() <= 10_000));
    assert_each_once(&pages, USERS);
    server.shutdown().await;
}

/// A namespace's 3000 counters among 200,000 unrelated keys: the listing pages from the client
/// (SCAN and MGET, no long script), and no command it sends keeps Redis busy for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_listing_among_many_unrelated_keys_runs_no_long_command() {
    let redis = RedisProcess::start();
    let fill_script =
        "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'unrelated:' .. i, 'x') end";
    cli(redis.port, &["EVAL", fill_script, "0", "200000"]).expect("redis-cli EVAL");
    let options = Options {
        backend: Backend::Redis,
        redis_url: Some(redis.url()),
        ..Options::default()
    };
    let server = TestServer::start_with(LIMITS, options).await;
    fill(&server, "paging", 0..3_000).await;

    // From here on: what the listing makes Redis do. One script over the whole keyspace took
    // about 200 ms here; a SCAN of 1000 keys takes about 0.5 ms on average, but a busy machine
    // (this suite on 2 cores) stretches single commands past 10 ms now and then. So: no long
    // script, SCANs short on average, and no single command anywhere near the script's time.
    for command in [
        &["CONFIG", "SET", "slowlog-log-slower-than", "50000"][..],
        &["SLOWLOG", "RESET"],
        &["CONFIG", "RESETSTAT"],
    ] {
        cli(redis.port, command).expect("redis-cli");
    }
    let pages = all_pages(&server, "/counters/paging?limit=1000").await;

    let slow = cli(redis.port, &["SLOWLOG", "GET", "10"]).unwrap();
    assert_eq!(
        cli(redis.port, &["SLOWLOG", "LEN"]).unwrap().trim(),
        "0",
        "commands slower than 50 ms: {slow}"
    );
    let stats = cli(redis.port, &["INFO", "commandstats"]).unwrap();
    // Scripts may run meanwhile (the readiness probe's ping is one), but only short ones.
    for script in ["eval", "evalsha"] {
        if let Some(usec) = usec_per_call(&stats, script) {
            assert!(usec < 1000.0, "{script} took {usec} µs on average: {stats}");
        }
    }
    let scan = usec_per_call(&stats, "scan").unwrap_or_else(|| panic!("no SCAN ran: {stats}"));
    assert!(scan < 3000.0, "SCANs took {scan} µs on average");
    assert!(pages.iter().all(|p| p.len() <= 1000));
    assert_each_once(&pages, 3_000);
    server.shutdown().await;
}

/// A command's average time in `INFO commandstats`, if it ran.
fn usec_per_call(stats: &str, command: &str) -> Option<f64> {
    let line = stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))?;
    line.split(',')
        .find_map(|field| field.strip_prefix("usec_per_call="))?
        .parse()
        .ok()
}
