//! Counters in Redis or Redis Cluster, shared by every ratekeeper replica.
//!
//! One request is one decision of `decide.lua` (the Lua twin of [`crate::algorithm::evaluate`]):
//! it reads, decides and writes all the request's counters atomically, in one round trip.
//! The decisions waiting at the same moment share one `EVALSHA` (see [`batch`]), and
//! connections are multiplexed, so concurrent requests pipeline instead of queueing.
//!
//! A call answered as failed never takes effect later: each call carries a deadline on Redis's
//! clock, half the timeout after it was sent, and the script does nothing when it runs later
//! (a Redis that was paused, swapped out or overloaded). ratekeeper's clock need not agree with
//! Redis's: every reply (and every health ping) carries Redis's `TIME`, and `TIME − ratekeeper's
//! monotonic clock when the reply is read` is a lower bound of the offset between the two
//! clocks (low by the reply's travel time). ratekeeper uses the largest such bound of the last
//! 10 to 20 seconds (a late-read reply does not spoil it; a clock that steps back is followed
//! within 20 s), so deadlines err early. The deadline is `sent + offset + timeout / 2` on
//! Redis's clock: a script that passes it started within half the timeout of the send,
//! leaving the other half for its reply. Until the first reply, calls carry no deadline. In a
//! cluster, the offset is learned from whichever node answered last: the nodes' clocks must
//! agree with each other to well within half the timeout (they need not agree with
//! ratekeeper's).
//!
//! Key layout: `<prefix>:{<namespace tag>}:<limit id, 16 hex>:<values>`, where the namespace
//! tag is the namespace with `%`, `{` and `}` percent-encoded ([`namespace_tag`]) and
//! `<values>` is each variable value as `<byte length>:<value>`. The `{…}` hash tag puts every
//! counter of a namespace in one cluster slot, so one script can touch all of a request's
//! counters. The value is the counter's state, packed (see decide.lua), and the key expires when
//! the state no longer matters: nothing grows forever. A counter's reservation holds live beside
//! it in `<counter key>:h` (same hash tag; a hash from reservation id to amount and expiry, at
//! most [`crate::algorithm::MAX_HOLDS`] of them), which the same script reads and writes, and
//! which expires with its last hold. The key format and the packed values
//! outlive upgrades: tests/golden.rs pins them (docs/redis.md, "Upgrades and the Redis key format").
//!
//! Listing a namespace's counters (the admin API) pages from the client: each round trip is one
//! `SCAN … MATCH <namespace prefix>* COUNT 1000` and one `MGET` of the keys it found, sent to the
//! node that owns the namespace's slot, so Redis never runs a long command for it. A page stops
//! when full, at the end of the keyspace, or after [`LIST_BUDGET`]; its cursor is
//! `<SCAN cursor>.<keys of that SCAN's answer already listed>`.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use redis::aio::ConnectionLike;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, Script, ServerErrorKind, Value};
use tokio::sync::{OnceCell, oneshot};

#[path = "redis_batch.rs"]
mod batch;

use super::{
    Batch, CounterKey, CounterSnapshot, LimitId, ListError, Page, PageRequest, Storage,
    StorageError, parse_cursor,
};
use crate::algorithm::{
    Algorithm, BucketState, CounterOutcome, CounterState, GroupOutcome, HoldChange, MAX_COUNT,
    Policy, SlidingState, SlotState, WindowState,
};

/// Numbers per argument of decide.lua: well below the 8000 values one Lua `struct.unpack` may
/// return.
const CHUNK: usize = 4000;

/// The `COUNT` of a listing's `SCAN`s: keys Redis looks at per round trip (well under a
/// millisecond). Fixed, so that repeating a `SCAN` repeats its answer.
const SCAN_COUNT: usize = 1000;
/// How long one page of a listing keeps sending round trips (each bounded by the storage
/// timeout); then it ends early, with a cursor to go on from.
const LIST_BUDGET: Duration = Duration::from_secs(1);

pub struct RedisStorage {
    connection: Arc<Connection>,
    /// Where `apply` sends its decisions, to share script calls.
    batches: batch::Coalescer,
    decide: Script,
    ping: Script,
    /// `<` and `CHUNK` `d`s: the `struct` formats of decide.lua's arguments are its prefixes.
    format: String,
    prefix: String,
    timeout: Duration,
    /// ratekeeper's monotonic clock: milliseconds since this instant.
    epoch: Instant,
    /// Redis's clock minus ratekeeper's monotonic clock, in ms, as replies show it.
    redis_offset: Mutex<ClockOffset>,
    /// The URL with any password masked, for logs and errors.
    display_url: String,
}

enum Connection {
    Standalone(Box<Standalone>),
    /// Connected on first use, so the server starts while the cluster is down.
    Cluster(Box<(ClusterClient, OnceCell<ClusterConnection>)>),
}

/// A standalone Redis: one multiplexed connection, replaced when the node it reaches turned
/// into a read-only replica (a failover behind the same address or DNS name promoted another).
struct Standalone {
    manager: ArcSwap<ConnectionManager>,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// When it was last replaced: at most once a second, however many calls saw READONLY.
    replaced_at: Mutex<Option<Instant>>,
}

impl Standalone {
    fn manager(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.manager.load())
    }

    /// Connects anew (lazily), so the next call reaches whatever the address leads to now.
    fn reconnect(&self, display_url: &str) {
        {
            let mut replaced_at = self.replaced_at.lock().unwrap_or_else(|e| e.into_inner());
            if replaced_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *replaced_at = Some(Instant::now());
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(manager) => {
                self.manager.store(Arc::new(manager));
                tracing::warn!(
                    url = display_url,
                    "Redis answered READONLY (a replica): reconnecting"
                );
            }
            Err(error) => tracing::warn!(url = display_url, %error, "cannot reconnect to Redis"),
        }
    }
}

impl RedisStorage {
    /// Prepares a storage for `url`; connects lazily, so Redis need not be up yet.
    ///
    /// `redis://[user:password@]host:port[/db]`, `rediss://` for TLS, and
    /// `redis+cluster://[user:password@]host1:port1,host2:port2` (or `rediss+cluster://`) for a
    /// cluster given by any of its nodes.
    pub fn open(url: &str, prefix: &str, timeout: Duration) -> Result<Self, String> {
        if prefix.contains(['{', '}']) {
            // The first `{` of a key would open the hash tag inside the prefix.
            return Err(format!(
                "invalid key prefix {prefix:?}: it must not contain `{{` or `}}`"
            ));
        }
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
            let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(bad)?;
            Connection::Standalone(Box::new(Standalone {
                manager: ArcSwap::from_pointee(manager),
                client,
                config,
                replaced_at: Mutex::new(None),
            }))
        };
        Ok(Self {
            connection: Arc::new(connection),
            batches: batch::Coalescer::default(),
            decide: Script::new(include_str!("decide.lua")),
            // A write, so a node that became a read-only replica is not taken for healthy.
            ping: Script::new(
                "redis.call('SET', KEYS[1], '1', 'PX', 60000) return redis.call('TIME')",
            ),
            format: format!("<{}", "d".repeat(CHUNK)),
            prefix: prefix.to_string(),
            timeout,
            epoch: Instant::now(),
            redis_offset: Mutex::new(ClockOffset::default()),
            display_url,
        })
    }

    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// ratekeeper's monotonic clock, in ms.
    fn local_ms(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// The deadline, on Redis's clock, of a call sent at `sent_ms` (ratekeeper's clock); 0 (none)
    /// while the offset between the clocks is unknown.
    fn deadline(&self, sent_ms: i64) -> u64 {
        let offset = match self.redis_offset.lock() {
            Ok(offset) => offset.estimate(),
            Err(_) => None,
        };
        let Some(offset) = offset else {
            return 0;
        };
        let half = i64::try_from(self.timeout.as_millis() / 2).unwrap_or(i64::MAX);
        let deadline = sent_ms.saturating_add(offset).saturating_add(half);
        // (A deadline before Redis's epoch is already past: 1 ms after it, not 0, which is none.)
        u64::try_from(deadline).unwrap_or(0).max(1)
    }

    /// Learns about the offset between the clocks from Redis's `TIME` in a reply read now.
    fn observe_redis_time(&self, redis_ms: i64) {
        let now = self.local_ms();
        if let Ok(mut offset) = self.redis_offset.lock() {
            offset.observe(redis_ms.saturating_sub(now), now);
        }
    }

    /// What every key of `namespace` starts with (and no key of another namespace does).
    fn namespace_prefix(&self, namespace: &str) -> String {
        format!("{}:{{{}}}:", self.prefix, namespace_tag(namespace))
    }

    /// Runs `cmd` (an `EVALSHA` of `script`) on the connection, within the timeout. A server
    /// that does not know the script yet (`NOSCRIPT`: new, restarted, failed over) is given it,
    /// and the command is sent again.
    async fn run(&self, cmd: &Cmd, script: &Script) -> Result<Value, StorageError> {
        self.bounded(script_call(&self.connection, cmd, script))
            .await
    }

    /// Waits for `call` at most the timeout; an error is the storage's, and READONLY (the node
    /// is a replica now) replaces a standalone connection.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StorageError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(storage_error(&self.connection, &e, &self.display_url)),
            Err(_) => Err(StorageError::Unavailable(format!(
                "{}: no answer within {:?}",
                self.display_url, self.timeout
            ))),
        }
    }
}

/// The cluster's connection, made on first use (so the server starts while the cluster is
/// down); clones share it.
async fn connected(
    cluster: &(ClusterClient, OnceCell<ClusterConnection>),
) -> redis::RedisResult<ClusterConnection> {
    let (client, connection) = cluster;
    let connection = connection
        .get_or_try_init(|| client.get_async_connection())
        .await?;
    Ok(connection.clone())
}

/// `EVALSHA` of `script` (`cmd`) on the connection. A server that does not know the script yet
/// (`NOSCRIPT`: new, restarted, failed over) is given it, and the command is sent again.
async fn script_call(
    connection: &Connection,
    cmd: &Cmd,
    script: &Script,
) -> redis::RedisResult<Value> {
    match connection {
        Connection::Standalone(standalone) => evalsha(&mut standalone.manager(), cmd, script).await,
        Connection::Cluster(cluster) => evalsha(&mut connected(cluster).await?, cmd, script).await,
    }
}

/// The storage's error for a failed Redis call; READONLY (the node is a replica now) replaces a
/// standalone connection.
fn storage_error(
    connection: &Connection,
    e: &redis::RedisError,
    display_url: &str,
) -> StorageError {
    if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        && let Connection::Standalone(standalone) = connection
    {
        standalone.reconnect(display_url);
    }
    StorageError::Unavailable(format!("{display_url}: {}", redact(&e.to_string())))
}

impl RedisStorage {
    /// The tokens held now on each of these counters (their `<key>:h` hashes), in one pipelined
    /// round trip to the node that owns the slot of `slot_key`.
    async fn held<'k>(
        &self,
        slot_key: &str,
        keys: impl ExactSizeIterator<Item = &'k [u8]>,
        now_ms: u64,
    ) -> Result<Vec<(u64, SlotState)>, StorageError> {
        let count = keys.len();
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            let holds = [key, b":h"].concat();
            pipe.cmd("HGETALL").arg(holds);
        }
        let replies = self
            .bounded(async {
                match &*self.connection {
                    Connection::Standalone(standalone) => {
                        standalone
                            .manager()
                            .req_packed_commands(&pipe, 0, count)
                            .await
                    }
                    Connection::Cluster(cluster) => {
                        let route = Route::with_key(slot_key, SlotAddr::Master);
                        (connected(cluster).await?)
                            .route_pipeline(
                                pipe,
                                0,
                                count,
                                SingleNodeRoutingInfo::SpecificNode(route),
                            )
                            .await
                    }
                }
            })
            .await?;
        Ok(replies
            .iter()
            .map(|reply| live_held(reply, now_ms))
            .collect())
    }

    /// Runs a listing's `cmd` on the node that owns the slot of `slot_key` (in a cluster), within
    /// the timeout.
    async fn list_call(&self, slot_key: &str, cmd: Cmd) -> Result<Value, StorageError> {
        let call = async {
            match &*self.connection {
                Connection::Standalone(standalone) => standalone
                    .manager()
                    .req_packed_command(&cmd)
                    .await?
                    .extract_error(),
                Connection::Cluster(cluster) => {
                    let mut connection = connected(cluster).await?;
                    let route = Route::with_key(slot_key, SlotAddr::Master);
                    let routing =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                    connection
                        .route_command(cmd, routing)
                        .await?
                        .extract_error()
                }
            }
        };
        self.bounded(call).await
    }
}

/// The value of a `CONFIG GET <name>` answer (a map, or a flat list of name and value; a
/// cluster may answer with one of those per node, of which the first counts).
fn config_value(reply: &Value) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    };
    match reply {
        Value::Array(items) if items.len() == 2 => text(&items[1]),
        Value::Map(pairs) => pairs
            .first()
            .and_then(|(_, v)| text(v).or_else(|| config_value(v))),
        Value::Array(items) => items.first().and_then(config_value),
        _ => None,
    }
}

/// The tokens of a counter's live holds, from `HGETALL <key>:h` (a hash from reservation id to
/// `'<dd'` amount and expiry, as decide.lua writes it), and how many there are and when the
/// first ends (a concurrency counter's slots); what does not read as a hold counts 0.
fn live_held(reply: &Value, now_ms: u64) -> (u64, SlotState) {
    let hold = |value: &Value| -> Option<(u64, u64)> {
        let Value::BulkString(bytes) = value else {
            return None;
        };
        let number = |i: usize| -> Option<f64> {
            Some(f64::from_le_bytes(
                bytes.get(8 * i..8 * i + 8)?.try_into().ok()?,
            ))
        };
        let (amount, expires) = (number(0)?, number(1)?);
        (bytes.len() == 16 && expires > now_ms as f64 && amount >= 0.0)
            .then_some((amount as u64, expires as u64))
    };
    let values: Vec<&Value> = match reply {
        Value::Map(pairs) => pairs.iter().map(|(_, v)| v).collect(),
        Value::Array(items) => items.iter().skip(1).step_by(2).collect(),
        _ => Vec::new(),
    };
    let mut held = 0u64;
    let mut slots = SlotState::default();
    for (amount, ends) in values.into_iter().filter_map(hold) {
        held = held.saturating_add(amount);
        slots.taken += 1;
        if slots.oldest_ends_ms == 0 || ends < slots.oldest_ends_ms {
            slots.oldest_ends_ms = ends;
        }
    }
    (held, slots)
}

/// `SCAN`'s answer: the next cursor and the keys.
fn parse_scan(reply: Value) -> Option<(u64, Vec<Vec<u8>>)> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let [Value::BulkString(cursor), Value::Array(keys)] = <[Value; 2]>::try_from(parts).ok()?
    else {
        return None;
    };
    let cursor = std::str::from_utf8(&cursor).ok()?.parse().ok()?;
    let keys = keys
        .into_iter()
        .map(|key| match key {
            Value::BulkString(key) => Some(key),
            _ => None,
        })
        .collect::<Option<_>>()?;
    Some((cursor, keys))
}

/// `EVALSHA` of `script`, loading it first when the server answers `NOSCRIPT`.
async fn evalsha(
    connection: &mut impl ConnectionLike,
    cmd: &Cmd,
    script: &Script,
) -> redis::RedisResult<Value> {
    let reply = connection.req_packed_command(cmd).await;
    match reply.and_then(Value::extract_error) {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(connection).await?;
            connection.req_packed_command(cmd).await?.extract_error()
        }
        other => other,
    }
}

/// The start of an `EVALSHA` of `script` on `keys` keys.
fn evalsha_cmd(script: &Script, keys: usize, capacity: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(3 + keys + 2, capacity);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    cmd
}

#[async_trait]
impl Storage for RedisStorage {
    async fn apply(
        &self,
        batch: &Batch<'_>,
        now_ms: u64,
    ) -> Result<Vec<GroupOutcome>, StorageError> {
        // The numbers, as decide.lua reads them: little-endian doubles (exact below 2^53; a
        // larger one rounds as Lua's `tonumber` of its decimal form would).
        let mut numbers = Vec::with_capacity(8 * (2 + 5 * batch.counters.len() + 8));
        let mut push = |x: u64| numbers.extend_from_slice(&(x as f64).to_le_bytes());
        push(now_ms);
        push(self.deadline(self.local_ms()));
        for counter in &batch.counters {
            push(counter.algorithm.wire().into());
            match counter.algorithm {
                Algorithm::FixedWindow(w) => [w.max, w.length_from_ms(now_ms)]
                    .into_iter()
                    .for_each(&mut push),
                Algorithm::TokenBucket(b) => b.parameters().into_iter().for_each(&mut push),
                Algorithm::SlidingWindow(w) => [w.max, w.period_ms].into_iter().for_each(&mut push),
                Algorithm::Concurrency(c) => [c.max, c.lifetime_ms].into_iter().for_each(&mut push),
            }
        }
        let hold = batch.hold.as_ref();
        push(hold.map_or(0, |h| h.expires_at_ms));
        for i in 0..batch.counters.len() {
            push(hold.map_or(0, |h| h.amounts.get(i).copied().unwrap_or(0)));
        }
        for group in &batch.groups {
            push(group.policy.wire().into());
            push(group.counters.len() as u64);
            for (position, &index) in group.counters.iter().enumerate() {
                push(index as u64 + 1);
                push(group.cost_at(position));
            }
        }

        // The decision's keys and arguments, one after the other in one buffer (see batch::Job).
        let key_bytes = batch.counters.len() * (self.prefix.len() + batch.namespace.len() + 64);
        let mut bytes = Vec::with_capacity(2 * key_bytes + numbers.len() * 9 / 8 + 64);
        let mut ends = Vec::with_capacity(2 * batch.counters.len() + 3);
        let tag = namespace_tag(batch.namespace);
        for holds in [false, true] {
            for counter in &batch.counters {
                write_key(&mut bytes, &self.prefix, &tag, &counter.key, holds);
                ends.push(bytes.len());
            }
        }
        for chunk in numbers.chunks(8 * CHUNK) {
            bytes.extend_from_slice(&self.format.as_bytes()[..1 + chunk.len() / 8]);
            ends.push(bytes.len());
            bytes.extend_from_slice(chunk);
            ends.push(bytes.len());
        }
        bytes.extend_from_slice(hold.map_or("", |h| h.id.as_str()).as_bytes());
        ends.push(bytes.len());
        let (answer, answered) = oneshot::channel();
        let job = batch::Job {
            bytes,
            ends,
            keys: 2 * batch.counters.len(),
            answer,
        };
        self.batches.submit(job, || batch::Link {
            connection: Arc::clone(&self.connection),
            script: self.decide.clone(),
            display_url: self.display_url.clone(),
            timeout: self.timeout,
        })?;
        let reply = match tokio::time::timeout(self.timeout, answered).await {
            Ok(Ok(reply)) => reply?,
            Ok(Err(_)) => {
                return Err(StorageError::Unavailable(
                    "the Redis dispatcher has stopped".into(),
                ));
            }
            Err(_) => {
                return Err(StorageError::Unavailable(format!(
                    "{}: no answer within {:?}",
                    self.display_url, self.timeout
                )));
            }
        };
        let unexpected = || StorageError::Unavailable("unexpected reply from Redis".to_string());
        let (status, redis_ms, records) = parse_head(&reply).ok_or_else(unexpected)?;
        self.observe_redis_time(redis_ms);
        match status {
            DECIDED => parse_outcomes(records, batch).ok_or_else(unexpected),
            FAILED => Err(StorageError::Unavailable(format!(
                "{}: {}",
                self.display_url,
                String::from_utf8_lossy(records)
            ))),
            TOO_LATE => Err(StorageError::Unavailable(format!(
                "{}: Redis ran the call after its deadline (half of {:?} after it was sent); \
                 nothing was changed",
                self.display_url, self.timeout
            ))),
            _ => Err(unexpected()),
        }
    }

    async fn counters(
        &self,
        namespace: &str,
        limits: &[LimitId],
        page: PageRequest<'_>,
        now_ms: u64,
    ) -> Result<Page<CounterSnapshot>, ListError> {
        // `<SCAN cursor>.<keys of that SCAN's answer already listed>`.
        let (mut cursor, mut skip) = match page.cursor {
            None => (0, 0),
            Some(text) => parse_cursor(text)?,
        };
        let namespace_prefix = self.namespace_prefix(namespace);
        let pattern = format!("{}*", glob_escape(&namespace_prefix));
        let deadline = Instant::now() + LIST_BUDGET;
        let mut items = Vec::new();
        loop {
            let mut scan = Cmd::new();
            scan.arg("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, keys) = parse_scan(self.list_call(&namespace_prefix, scan).await?)
                .ok_or_else(|| StorageError::Unavailable("unexpected reply to SCAN".into()))?;
            let unseen = keys.get(skip as usize..).unwrap_or_default();
            let taken = unseen.len().min(page.limit.saturating_sub(items.len()));
            if taken > 0 {
                let mut mget = Cmd::new();
                mget.arg("MGET").arg(&unseen[..taken]);
                let reply = self.list_call(&namespace_prefix, mget).await?;
                let Value::Array(values) = reply else {
                    return Err(StorageError::Unavailable("unexpected reply to MGET".into()).into());
                };
                let mut found = Vec::new();
                for (raw, value) in unseen[..taken].iter().zip(&values) {
                    let Value::BulkString(value) = value else {
                        // Expired since the SCAN, or a counter's holds: listed as slots (the
                        // limiter keeps them for concurrency limits, whose counters have only
                        // those).
                        let base = raw.strip_suffix(b":h").map(<[u8]>::to_vec);
                        let key = (base.as_deref())
                            .and_then(|b| std::str::from_utf8(b).ok())
                            .and_then(|k| k.strip_prefix(&namespace_prefix))
                            .and_then(parse_key);
                        if let (Some(base), Some(key)) = (base, key)
                            && limits.contains(&key.limit)
                        {
                            found.push((Cow::Owned(base), key, None));
                        }
                        continue;
                    };
                    let key = std::str::from_utf8(raw).ok();
                    let Some(key) = key
                        .and_then(|k| k.strip_prefix(&namespace_prefix))
                        .and_then(parse_key)
                    else {
                        continue;
                    };
                    let Some(state) = parse_state(value) else {
                        continue;
                    };
                    let expired =
                        matches!(state, CounterState::Window(w) if w.expires_at_ms <= now_ms);
                    if limits.contains(&key.limit) && !expired {
                        found.push((Cow::Borrowed(raw.as_slice()), key, Some(state)));
                    }
                }
                let held = self
                    .held(
                        &namespace_prefix,
                        found.iter().map(|(raw, _, _)| raw.as_ref()),
                        now_ms,
                    )
                    .await?;
                for ((_, key, state), (held, slots)) in found.into_iter().zip(held) {
                    match state {
                        Some(state) => items.push(CounterSnapshot { key, state, held }),
                        None if slots.taken > 0 => items.push(CounterSnapshot {
                            key,
                            state: CounterState::Slots(slots),
                            held,
                        }),
                        None => {}
                    }
                }
            }
            if taken < unseen.len() {
                // The page is full within this SCAN's answer: the next page repeats it.
                let next = Some(format!("{cursor}.{}", skip + taken as u64));
                return Ok(Page { items, next });
            }
            if next == 0 {
                return Ok(Page { items, next: None });
            }
            (cursor, skip) = (next, 0);
            if items.len() >= page.limit || Instant::now() >= deadline {
                let next = Some(format!("{cursor}.0"));
                return Ok(Page { items, next });
            }
        }
    }

    async fn evicts(&self) -> Result<Option<String>, StorageError> {
        let setting = |name: &'static str| async move {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg(name);
            let reply = self
                .bounded(async {
                    match &*self.connection {
                        Connection::Standalone(standalone) => {
                            standalone.manager().req_packed_command(&cmd).await
                        }
                        Connection::Cluster(cluster) => {
                            connected(cluster).await?.req_packed_command(&cmd).await
                        }
                    }
                })
                .await?;
            config_value(&reply).ok_or_else(|| {
                StorageError::Unavailable(format!(
                    "{}: CONFIG GET {name}: {reply:?}",
                    self.display_url
                ))
            })
        };
        let policy = setting("maxmemory-policy").await?;
        let maxmemory = setting("maxmemory").await?;
        // Without a memory limit nothing is evicted; with one, any policy but `noeviction`
        // may drop counters (every counter key has a TTL, so `volatile-*` policies too).
        if policy == "noeviction" || maxmemory == "0" {
            return Ok(None);
        }
        Ok(Some(format!(
            "maxmemory-policy {policy} with maxmemory {maxmemory}"
        )))
    }

    async fn ping(&self) -> Result<(), StorageError> {
        let mut cmd = evalsha_cmd(&self.ping, 1, 0);
        cmd.arg(format!("{}:ping", self.prefix));
        let reply = self.run(&cmd, &self.ping).await?;
        if let Some(redis_ms) = parse_time(&reply) {
            self.observe_redis_time(redis_ms);
        }
        Ok(())
    }
}

/// The first byte of decide.lua's reply (its `DECIDED`, `TOO_LATE`; a test compares them).
const TOO_LATE: u8 = 0;
const DECIDED: u8 = 1;
const FAILED: u8 = 2;

/// Lower bounds of (Redis's clock − ratekeeper's monotonic clock): the largest of the current
/// period and of the one before, so that a low sample (a reply read late) changes nothing and a
/// clock stepping back is followed within two periods.
#[derive(Debug, Default)]
struct ClockOffset {
    period_start_ms: i64,
    current: Option<i64>,
    previous: Option<i64>,
}

impl ClockOffset {
    const PERIOD_MS: i64 = 10_000;

    fn observe(&mut self, sample: i64, now_ms: i64) {
        let elapsed = now_ms.saturating_sub(self.period_start_ms);
        if self.current.is_none() || elapsed >= Self::PERIOD_MS {
            self.previous = if elapsed < 2 * Self::PERIOD_MS {
                self.current
            } else {
                None
            };
            self.current = None;
            self.period_start_ms = now_ms;
        }
        self.current = Some(self.current.map_or(sample, |c| c.max(sample)));
    }

    fn estimate(&self) -> Option<i64> {
        self.current.max(self.previous)
    }
}

/// decide.lua's reply head: its status, Redis's clock in ms, and the records that follow.
fn parse_head(bytes: &[u8]) -> Option<(u8, i64, &[u8])> {
    let (&status, rest) = bytes.split_first()?;
    let time = f64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    // Milliseconds since 1970, as the script computes them: an integer well below 2^53.
    let exact = time.fract() == 0.0 && (0.0..=MAX_COUNT as f64).contains(&time);
    exact.then_some((status, time as i64, &rest[8..]))
}

/// `TIME`'s reply (seconds, microseconds), in ms.
fn parse_time(reply: &Value) -> Option<i64> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let number = |v: &Value| -> Option<i64> {
        match v {
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Value::Int(i) => Some(*i),
            _ => None,
        }
    };
    match parts.as_slice() {
        [seconds, micros] => number(seconds)?
            .checked_mul(1000)?
            .checked_add(number(micros)? / 1000),
        _ => None,
    }
}

/// decide.lua's records: for each group, for each of its counters, a flags byte (1: over, 2:
/// the group is admitted, 4: holds full) and nine little-endian doubles.
fn parse_outcomes(bytes: &[u8], batch: &Batch) -> Option<Vec<GroupOutcome>> {
    const RECORD: usize = 1 + 9 * 8;
    let mut records = bytes.chunks_exact(RECORD);
    if !records.remainder().is_empty() {
        return None;
    }
    let mut outcomes = Vec::with_capacity(batch.groups.len());
    for group in &batch.groups {
        // A group without counters is admitted (a commit without counters released nothing).
        let mut admitted = group.policy != Policy::Commit;
        let mut holds_full = false;
        let mut counters = Vec::with_capacity(group.counters.len());
        for _ in &group.counters {
            let (&flags, numbers) = records.next()?.split_first()?;
            let number = |i: usize| -> Option<i64> {
                let bytes = numbers.get(8 * i..8 * i + 8)?;
                let x = f64::from_le_bytes(bytes.try_into().ok()?);
                // Integers, as the script computes them (`as` would saturate anything else).
                (x.fract() == 0.0 && x.abs() < 2f64.powi(63)).then_some(x as i64)
            };
            admitted = flags & 2 != 0;
            holds_full = flags & 4 != 0;
            let unsigned = |i: usize| u64::try_from(number(i)?).ok();
            counters.push(CounterOutcome {
                over: flags & 1 != 0,
                remaining: u64::try_from(number(0)?).ok()?,
                reset_in_ms: u64::try_from(number(1)?).ok()?,
                retry_after_ms: u64::try_from(number(2)?).ok(),
                charged: u64::try_from(number(3)?).ok()?,
                overshoot: u64::try_from(number(4)?).ok()?,
                holds: HoldChange {
                    placed: unsigned(5)?,
                    released: unsigned(6)?,
                    expired_holds: unsigned(7)?,
                    expired: unsigned(8)?,
                },
            });
        }
        outcomes.push(GroupOutcome {
            admitted,
            counters,
            holds_full,
        });
    }
    records.next().is_none().then_some(outcomes)
}

/// `<limit hex>:<len>:<value>...` back into a key.
fn parse_key(rest: &str) -> Option<CounterKey> {
    let (limit, values) = rest.split_once(':')?;
    CounterKey::from_encoded(u64::from_str_radix(limit, 16).ok()?, values)
}

/// A stored value (see decide.lua: a tag byte, then little-endian doubles) back into a state.
fn parse_state(value: &[u8]) -> Option<CounterState> {
    let (&tag, rest) = value.split_first()?;
    let number = |i: usize| -> Option<f64> {
        let bytes = rest.get(8 * i..8 * i + 8)?;
        Some(f64::from_le_bytes(bytes.try_into().ok()?))
    };
    // Integers below 2^53, as the script stores them; anything else is not a state.
    let signed = |i: usize| {
        let x = number(i)?;
        (x.fract() == 0.0 && x.abs() <= MAX_COUNT as f64 * 2.0).then_some(x as i64)
    };
    let unsigned = |i: usize| u64::try_from(signed(i)?).ok();
    let fields = match tag {
        1 | 2 => 2,
        3 => 3,
        _ => return None,
    };
    if rest.len() != 8 * fields {
        return None;
    }
    Some(match tag {
        1 => CounterState::Window(WindowState {
            used: unsigned(0)?,
            expires_at_ms: unsigned(1)?,
        }),
        2 => CounterState::Bucket(BucketState {
            units: signed(0)?,
            refilled_at_ms: unsigned(1)?,
        }),
        _ => CounterState::Sliding(SlidingState {
            start_ms: unsigned(0)?,
            current: unsigned(1)?,
            previous: unsigned(2)?,
        }),
    })
}

/// The namespace inside a key's hash tag: `%`, `{` and `}` percent-encoded (`%25`, `%7B`, `%7D`)
/// and every other byte as it is, so that no namespace can end the tag early (`}`), extend it or
/// leave it empty, and two namespaces never share a tag. The empty namespace (no limit has one)
/// is `%`, which no other namespace's tag is. The one place keys get their namespace.
pub fn namespace_tag(namespace: &str) -> Cow<'_, str> {
    if namespace.is_empty() {
        return Cow::Borrowed("%");
    }
    if !namespace.contains(['%', '{', '}']) {
        return Cow::Borrowed(namespace);
    }
    let mut tag = String::with_capacity(namespace.len() + 8);
    for c in namespace.chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            c => tag.push(c),
        }
    }
    Cow::Owned(tag)
}

/// The Redis key of `key`, a counter of `namespace`, under `prefix`: the exact bytes `apply`
/// sends.
pub fn counter_key(prefix: &str, namespace: &str, key: &CounterKey) -> Vec<u8> {
    let mut out = Vec::new();
    write_key(&mut out, prefix, &namespace_tag(namespace), key, false);
    out
}

/// Appends a counter's Redis key (or, with `holds`, the key of its holds: the counter's key and
/// `:h`, which no counter key ends with) to `out`; `tag` is [`namespace_tag`] of the counter's
/// namespace.
fn write_key(out: &mut Vec<u8>, prefix: &str, tag: &str, key: &CounterKey, holds: bool) {
    let mut hex = [0u8; 16];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[(key.limit >> (60 - 4 * i)) as usize & 0xf];
    }
    for part in [
        prefix.as_bytes(),
        b":{",
        tag.as_bytes(),
        b"}:",
        &hex,
        b":",
        key.encoded().as_bytes(),
        if holds { b":h" } else { b"" },
    ] {
        out.extend_from_slice(part);
    }
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
        for namespace in ["llm/route", "a}b{c%"] {
            let prefix = storage.namespace_prefix(namespace);
            let text = String::from_utf8(counter_key("rk", namespace, &key)).unwrap();
            let rest = text.strip_prefix(&prefix).unwrap();
            assert_eq!(rest, "0000000000000abc:7:alice:10:5:ünï");
            assert_eq!(parse_key(rest), Some(key.clone()));
        }
        let top = CounterKey::new(u64::MAX - 1, ["x"]);
        let text = String::from_utf8(counter_key("rk", "n", &top)).unwrap();
        assert_eq!(text, "rk:{n}:fffffffffffffffe:1:x");
    }

    #[test]
    fn namespace_tags_never_contain_braces_and_never_collide() {
        assert_eq!(namespace_tag("llm/route"), "llm/route");
        assert!(matches!(namespace_tag("llm/route"), Cow::Borrowed(_)));
        assert_eq!(namespace_tag("a}b{c"), "a%7Db%7Bc");
        assert_eq!(namespace_tag("100%"), "100%25");
        assert_eq!(namespace_tag("%7D"), "%257D");
        assert_eq!(namespace_tag(""), "%");
        let namespaces = [
            "", "%", "}", "{", "%7D", "%7B", "%25", "a", "a}", "{a}", "}{",
        ];
        let tags: std::collections::HashSet<_> =
            namespaces.iter().map(|n| namespace_tag(n)).collect();
        assert_eq!(tags.len(), namespaces.len(), "{tags:?}");
        assert!(
            tags.iter()
                .all(|t| !t.is_empty() && !t.contains(['{', '}']))
        );
    }

    #[tokio::test]
    async fn a_key_prefix_with_braces_is_refused() {
        for prefix in ["a{b", "}", "{x}"] {
            let error = RedisStorage::open("redis://127.0.0.1:1", prefix, Duration::from_millis(5))
                .err()
                .unwrap_or_default();
            assert!(error.contains("must not contain"), "{prefix}: {error}");
        }
    }

    #[test]
    fn stored_states_are_read_back() {
        let packed = |tag: u8, numbers: &[f64]| {
            let mut value = vec![tag];
            for x in numbers {
                value.extend_from_slice(&x.to_le_bytes());
            }
            value
        };
        assert_eq!(
            parse_state(&packed(1, &[3.0, 1e12])),
            Some(CounterState::Window(WindowState {
                used: 3,
                expires_at_ms: 1_000_000_000_000
            }))
        );
        assert_eq!(
            parse_state(&packed(2, &[-(MAX_COUNT as f64), 7.0])),
            Some(CounterState::Bucket(BucketState {
                units: -(MAX_COUNT as i64),
                refilled_at_ms: 7
            }))
        );
        assert_eq!(
            parse_state(&packed(3, &[5.0, 0.0, MAX_COUNT as f64])),
            Some(CounterState::Sliding(SlidingState {
                start_ms: 5,
                current: 0,
                previous: MAX_COUNT
            }))
        );
        for garbage in [
            packed(1, &[3.0]),
            packed(1, &[3.0, 4.0, 5.0]),
            packed(3, &[3.0, 4.0]),
            packed(1, &[-1.0, 4.0]),
            packed(1, &[0.5, 4.0]),
            packed(2, &[f64::NAN, 4.0]),
            packed(9, &[3.0, 4.0]),
            b"w 3 1000".to_vec(),
            Vec::new(),
        ] {
            assert_eq!(parse_state(&garbage), None, "{garbage:?}");
        }
    }

    /// The numbers decide.lua names (`local A, B, C = 0, 1, 2`) are Rust's wire numbers.
    #[test]
    fn the_script_numbers_policies_and_algorithms_as_rust_does() {
        let script = include_str!("decide.lua");
        let constants = |names: &str| -> Vec<u8> {
            let line = script
                .lines()
                .find(|l| l.starts_with(&format!("local {names} = ")))
                .unwrap_or_else(|| panic!("decide.lua declares `local {names} = ...`"));
            let values = &line[format!("local {names} = ").len()..];
            values
                .split(',')
                .map(|v| v.trim().parse().unwrap())
                .collect()
        };
        let policies = [
            Policy::AllOrNothing,
            Policy::CheckOnly,
            Policy::Charge,
            Policy::Refund,
            Policy::Reserve,
            Policy::Commit,
        ];
        assert_eq!(
            constants("ALL_OR_NOTHING, CHECK_ONLY, CHARGE, REFUND, RESERVE, COMMIT"),
            policies.map(Policy::wire)
        );
        let max_holds = script
            .lines()
            .find_map(|l| l.strip_prefix("local MAX_HOLDS = "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok());
        assert_eq!(max_holds, Some(crate::algorithm::MAX_HOLDS));
        let algorithms = [
            Algorithm::FixedWindow(crate::algorithm::FixedWindow::new(1, 1)),
            Algorithm::TokenBucket(crate::algorithm::TokenBucket::continuous(1, 1)),
            Algorithm::SlidingWindow(crate::algorithm::SlidingWindow::new(1, 1)),
            Algorithm::Concurrency(crate::algorithm::Concurrency::new(1, 1)),
        ];
        assert_eq!(
            constants("FIXED_WINDOW, TOKEN_BUCKET, SLIDING_WINDOW, CONCURRENCY"),
            algorithms.map(|a| a.wire())
        );
        assert_eq!(
            constants("TOO_LATE, DECIDED, FAILED"),
            [TOO_LATE, DECIDED, FAILED]
        );
    }

    #[test]
    fn the_clock_offset_is_the_largest_recent_lower_bound() {
        let mut offset = ClockOffset::default();
        assert_eq!(offset.estimate(), None);
        offset.observe(1_000, 0);
        offset.observe(960, 5); // a reply read 40 ms late
        assert_eq!(offset.estimate(), Some(1_000));
        offset.observe(990, 10_000); // a new period; the previous one still counts
        assert_eq!(offset.estimate(), Some(1_000));
        offset.observe(-5_000, 20_000); // Redis's clock stepped back 6 s: followed
        assert_eq!(offset.estimate(), Some(990));
        offset.observe(-5_000, 30_000);
        assert_eq!(offset.estimate(), Some(-5_000));
        offset.observe(7, 90_000); // long quiet: only the new sample
        assert_eq!(offset.estimate(), Some(7));
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("rk:{a*b?}:"), "rk:{a\\*b\\?}:");
    }
}
