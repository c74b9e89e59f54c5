//! Counters in Redis or Redis Cluster, shared by every ratekeeper replica.
//!
//! One request is one `EVALSHA` of `decide.lua` (the Lua twin of [`crate::algorithm::evaluate`]):
//! it reads, decides and writes all the request's counters atomically, in one round trip.
//! Connections are multiplexed, so concurrent requests pipeline instead of queueing.
//!
//! Key layout: `<prefix>:{<namespace>}:<limit id, 16 hex>:<values>`, where `<values>` is each
//! variable value as `<byte length>:<value>`. The `{namespace}` hash tag puts every counter of a
//! namespace in one cluster slot, so one script can touch all of a request's counters. The
//! value is `<used> <window end, ms>` and the key expires with its window: nothing grows forever.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};
use tokio::sync::OnceCell;

use super::{Batch, CounterKey, CounterSnapshot, Storage, StorageError};
use crate::algorithm::{
    Algorithm, BucketState, CounterOutcome, CounterState, GroupOutcome, Policy, SlidingState,
    WindowState,
};
use crate::limits::LimitId;

pub struct RedisStorage {
    connection: Connection,
    decide: Script,
    list: Script,
    ping: Script,
    prefix: String,
    timeout: Duration,
    /// The URL with any password masked, for logs and errors.
    display_url: String,
}

enum Connection {
    Standalone(ConnectionManager),
    /// Connected on first use, so the server starts while the cluster is down.
    Cluster(Box<(ClusterClient, OnceCell<ClusterConnection>)>),
}

impl RedisStorage {
    /// Prepares a storage for `url`; connects lazily, so Redis need not be up yet.
    ///
    /// `redis://[user:password@]host:port[/db]`, `rediss://` for TLS, and
    /// `redis+cluster://[user:password@]host1:port1,host2:port2` (or `rediss+cluster://`) for a
    /// cluster given by any of its nodes.
    pub fn open(url: &str, prefix: &str, timeout: Duration) -> Result<Self, String> {
        let display_url = redact(url);
        let bad = |e: redis::RedisError| format!("invalid Redis URL {display_url}: {e}");
        let connection = if let Some((scheme, rest)) = cluster_scheme(url) {
            let (credentials, hosts) = match rest.rsplit_once('@') {
                Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
                None => (String::new(), rest),
            };
            let nodes: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|host| format!("{scheme}://{credentials}{host}"))
                .collect();
            if nodes.is_empty() {
                return Err(format!("invalid Redis URL {display_url}: no cluster node"));
            }
            let client = ClusterClient::builder(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()
                .map_err(bad)?;
            Connection::Cluster(Box::new((client, OnceCell::new())))
        } else {
            let client = redis::Client::open(url).map_err(bad)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            Connection::Standalone(
                ConnectionManager::new_lazy_with_config(client, config).map_err(bad)?,
            )
        };
        Ok(Self {
            connection,
            decide: Script::new(include_str!("decide.lua")),
            list: Script::new(include_str!("list.lua")),
            ping: Script::new("return redis.call('PING')"),
            prefix: prefix.to_string(),
            timeout,
            display_url,
        })
    }

    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    fn namespace_prefix(&self, namespace: &str) -> String {
        format!("{}:{{{namespace}}}:", self.prefix)
    }

    fn key(&self, namespace_prefix: &str, key: &CounterKey) -> String {
        format!("{namespace_prefix}{:016x}:{}", key.limit, key.encoded())
    }

    /// Runs `invocation` on the connection, within the timeout.
    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Value, StorageError> {
        let call = async {
            match &self.connection {
                Connection::Standalone(manager) => {
                    invocation.invoke_async(&mut manager.clone()).await
                }
                Connection::Cluster(cluster) => {
                    let (client, connection) = cluster.as_ref();
                    let connection = connection
                        .get_or_try_init(|| client.get_async_connection())
                        .await?;
                    invocation.invoke_async(&mut connection.clone()).await
                }
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StorageError::Unavailable(format!(
                "{}: {}",
                self.display_url,
                redact(&e.to_string())
            ))),
            Err(_) => Err(StorageError::Unavailable(format!(
                "{}: no answer within {:?}",
                self.display_url, self.timeout
            ))),
        }
    }
}

#[async_trait]
impl Storage for RedisStorage {
    async fn apply(&self, batch: &Batch, now_ms: u64) -> Result<Vec<GroupOutcome>, StorageError> {
        let namespace_prefix = self.namespace_prefix(&batch.namespace);
        let mut invocation = self.decide.prepare_invoke();
        invocation.arg(now_ms).arg(batch.counters.len());
        for counter in &batch.counters {
            invocation.key(self.key(&namespace_prefix, &counter.key));
            let (kind, parameters) = match counter.algorithm {
                Algorithm::FixedWindow(w) => (0, [w.max, w.period_ms, 0, 0]),
                Algorithm::TokenBucket(b) => (1, b.parameters()),
                Algorithm::SlidingWindow(w) => (2, [w.max, w.period_ms, 0, 0]),
            };
            invocation.arg(kind).arg(&parameters[..]);
        }
        invocation.arg(batch.groups.len());
        for group in &batch.groups {
            let policy = match group.policy {
                Policy::AllOrNothing => 0,
                Policy::CheckOnly => 1,
                Policy::Charge => 2,
            };
            invocation
                .arg(policy)
                .arg(group.cost)
                .arg(group.counters.len());
            for &index in &group.counters {
                invocation.arg(index + 1);
            }
        }
        let reply = self.run(invocation).await?;
        parse_outcomes(&reply, batch)
            .ok_or_else(|| StorageError::Unavailable("unexpected reply from Redis".to_string()))
    }

    async fn counters(
        &self,
        namespace: &str,
        limits: &[LimitId],
        now_ms: u64,
    ) -> Result<Vec<CounterSnapshot>, StorageError> {
        let namespace_prefix = self.namespace_prefix(namespace);
        let mut invocation = self.list.prepare_invoke();
        invocation
            .key(&namespace_prefix)
            .arg(format!("{}*", glob_escape(&namespace_prefix)));
        let reply = self.run(invocation).await?;
        let Value::Array(items) = reply else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for pair in items.chunks(2) {
            let [Value::BulkString(key), Value::BulkString(value)] = pair else {
                continue;
            };
            let (Ok(key), Ok(value)) = (std::str::from_utf8(key), std::str::from_utf8(value))
            else {
                continue;
            };
            let Some(key) = key.strip_prefix(&namespace_prefix).and_then(parse_key) else {
                continue;
            };
            let Some(state) = parse_state(value) else {
                continue;
            };
            let expired = matches!(state, CounterState::Window(w) if w.expires_at_ms <= now_ms);
            if limits.contains(&key.limit) && !expired {
                found.push(CounterSnapshot { key, state });
            }
        }
        Ok(found)
    }

    async fn ping(&self) -> Result<(), StorageError> {
        let mut ping = self.ping.prepare_invoke();
        ping.key(format!("{}:ping", self.prefix));
        self.run(ping).await.map(|_| ())
    }
}

fn parse_outcomes(reply: &Value, batch: &Batch) -> Option<Vec<GroupOutcome>> {
    let Value::Array(items) = reply else {
        return None;
    };
    let mut numbers = items.iter().map(|item| match item {
        Value::Int(i) => Some(*i),
        _ => None,
    });
    let mut next = || numbers.next().flatten();
    let mut outcomes = Vec::with_capacity(batch.groups.len());
    for group in &batch.groups {
        let admitted = next()? == 1;
        let mut counters = Vec::with_capacity(group.counters.len());
        for _ in &group.counters {
            let over = next()? == 1;
            let remaining = u64::try_from(next()?).ok()?;
            let reset_in_ms = u64::try_from(next()?).ok()?;
            let retry = next()?;
            counters.push(CounterOutcome {
                over,
                remaining,
                reset_in_ms,
                retry_after_ms: u64::try_from(retry).ok(),
                charged: u64::try_from(next()?).ok()?,
                overshoot: u64::try_from(next()?).ok()?,
            });
        }
        outcomes.push(GroupOutcome { admitted, counters });
    }
    Some(outcomes)
}

/// `<limit hex>:<len>:<value>...` back into a key.
fn parse_key(rest: &str) -> Option<CounterKey> {
    let (limit, values) = rest.split_once(':')?;
    CounterKey::from_encoded(u64::from_str_radix(limit, 16).ok()?, values)
}

/// A stored value (see decide.lua) back into a state.
fn parse_state(value: &str) -> Option<CounterState> {
    let mut fields = value.split(' ');
    let kind = fields.next()?;
    let mut number = || fields.next()?.parse::<i64>().ok();
    let (a, b) = (number()?, number()?);
    let unsigned = |v: i64| u64::try_from(v).ok();
    Some(match kind {
        "w" => CounterState::Window(WindowState {
            used: unsigned(a)?,
            expires_at_ms: unsigned(b)?,
        }),
        "b" => CounterState::Bucket(BucketState {
            units: a,
            refilled_at_ms: unsigned(b)?,
        }),
        "s" => CounterState::Sliding(SlidingState {
            start_ms: unsigned(a)?,
            current: unsigned(b)?,
            previous: unsigned(number()?)?,
        }),
        _ => return None,
    })
}

fn cluster_scheme(url: &str) -> Option<(&'static str, &str)> {
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        Some(("redis", rest))
    } else {
        url.strip_prefix("rediss+cluster://")
            .map(|rest| ("rediss", rest))
    }
}

/// Escapes SCAN MATCH's glob characters.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Masks the password in a Redis URL (or in any text that contains one).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (head, tail) = rest.split_at(start + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', ' ', ',']).unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &tail[..at];
                match userinfo.split_once(':') {
                    Some((user, _password)) => out.push_str(&format!("{user}:***")),
                    None => out.push_str("***"),
                }
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://user:pw@h:1"), "rediss://user:***@h:1");
        assert_eq!(redact("redis://token@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact("redis+cluster://u:p@a:1,b:2"),
            "redis+cluster://u:***@a:1,b:2"
        );
    }

    #[tokio::test]
    async fn keys_round_trip() {
        let storage =
            RedisStorage::open("redis://127.0.0.1:1", "rk", Duration::from_millis(5)).unwrap();
        let key = CounterKey::new(0xabc, ["alice:1", "", "ünï"]);
        assert_eq!(key.values(), ["alice:1", "", "ünï"]);
        let prefix = storage.namespace_prefix("llm/route");
        let text = storage.key(&prefix, &key);
        assert_eq!(text, "rk:{llm/route}:0000000000000abc:7:alice:10:5:ünï");
        assert_eq!(parse_key(text.strip_prefix(&prefix).unwrap()), Some(key));
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("rk:{a*b?}:"), "rk:{a\\*b\\?}:");
    }
}
