//! Where counters live. A storage makes the whole decision for one request in one atomic step:
//! it loads the states of every counter the request touches, runs
//! [`crate::algorithm::evaluate`], and stores what changed.

mod memory;
mod redis;

use std::collections::HashSet;
use std::fmt;

use async_trait::async_trait;

use crate::algorithm::{Algorithm, CounterState, Group, GroupOutcome};

pub use memory::MemoryStorage;
pub use redis::{RedisStorage, counter_key};

/// Identifies a limit's counters: a stable fingerprint of what makes two limits "the same" in
/// Limitador (namespace, seconds, conditions, variables — or the `id` when given), computed by
/// the limit model; changing `max_value` or `name` keeps the counters.
pub type LimitId = u64;

/// A counter: which limit, and the values of the limit's variables.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub limit: LimitId,
    /// The values, each as `<byte length>:<value>`, one after the other: one allocation per
    /// counter (memory per counter matters at millions of counters), unambiguous whatever the
    /// values contain, and the tail of the counter's Redis key.
    encoded: Box<str>,
}

impl CounterKey {
    pub fn new<S, I>(limit: LimitId, values: I) -> Self
    where
        S: AsRef<str>,
        I: IntoIterator<Item = S, IntoIter: Clone>,
    {
        let values = values.into_iter();
        // Sized exactly up front: the box below then takes the string without copying it.
        let digits = |len: usize| len.checked_ilog10().unwrap_or(0) as usize + 1;
        let size = values
            .clone()
            .map(|v| v.as_ref().len() + digits(v.as_ref().len()) + 1)
            .sum::<usize>();
        let mut encoded = String::with_capacity(size);
        for value in values {
            let value = value.as_ref();
            push_decimal(&mut encoded, value.len());
            encoded.push(':');
            encoded.push_str(value);
        }
        Self {
            limit,
            encoded: encoded.into_boxed_str(),
        }
    }

    /// A key from its encoded values; `None` if they are not well formed.
    pub fn from_encoded(limit: LimitId, encoded: &str) -> Option<Self> {
        let key = Self {
            limit,
            encoded: encoded.into(),
        };
        let well_formed = key.decode().is_some();
        well_formed.then_some(key)
    }

    pub fn encoded(&self) -> &str {
        &self.encoded
    }

    /// The values, in the order of the limit's variables.
    pub fn values(&self) -> Vec<&str> {
        self.decode().unwrap_or_default()
    }

    fn decode(&self) -> Option<Vec<&str>> {
        let mut values = Vec::new();
        let mut rest: &str = &self.encoded;
        while !rest.is_empty() {
            let (len, tail) = rest.split_once(':')?;
            let len: usize = len.parse().ok()?;
            values.push(tail.get(..len)?);
            rest = tail.get(len..)?;
        }
        Some(values)
    }
}

/// Appends `n` in decimal (what `to_string` would give, without its allocation).
fn push_decimal(out: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// One counter a request touches, with the arithmetic of its limit.
#[derive(Debug, Clone)]
pub struct CounterRequest {
    pub key: CounterKey,
    pub algorithm: Algorithm,
}

/// Everything one request asks of the storage.
#[derive(Debug, Clone, Default)]
pub struct Batch<'a> {
    /// All counters of one request belong to one namespace (the request's own).
    pub namespace: &'a str,
    pub counters: Vec<CounterRequest>,
    pub groups: Vec<Group>,
}

/// A live counter, for the admin API.
#[derive(Debug, Clone)]
pub struct CounterSnapshot {
    pub key: CounterKey,
    pub state: CounterState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// The configured bound on live counters is reached and none has expired; a new counter
    /// cannot be created. Nothing was changed.
    CapacityExhausted { capacity: usize },
    /// The storage could not be reached or answered with an error. Nothing is known to have
    /// changed.
    Unavailable(String),
}

impl StorageError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::CapacityExhausted { .. } => "capacity_exhausted",
            StorageError::Unavailable(_) => "unavailable",
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::CapacityExhausted { capacity } => write!(
                f,
                "counter capacity reached ({capacity} live counters); raise `memory --cache`"
            ),
            StorageError::Unavailable(reason) => write!(f, "storage unavailable: {reason}"),
        }
    }
}

impl std::error::Error for StorageError {}

#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Decides `batch` at `now_ms` atomically: every group is evaluated in order and all the
    /// resulting changes are stored, or (on error) none are.
    async fn apply(
        &self,
        batch: &Batch<'_>,
        now_ms: u64,
    ) -> Result<Vec<GroupOutcome>, StorageError>;

    /// The live (unexpired) counters of the given limits, all of `namespace`.
    async fn counters(
        &self,
        namespace: &str,
        limits: &[LimitId],
        now_ms: u64,
    ) -> Result<Vec<CounterSnapshot>, StorageError>;

    /// Frees what has expired; called periodically off the request path.
    fn reclaim_expired(&self, _now_ms: u64) {}

    /// Frees the counters of every limit not in `loaded` (after a reload: limits that are no
    /// longer loaded must not hold capacity). Off the request path. Storages whose counters
    /// expire on their own (Redis) need not do anything.
    fn forget_unloaded(&self, _loaded: &HashSet<LimitId>) {}

    /// Counters held, where the storage can tell cheaply.
    fn live_counters(&self) -> Option<usize> {
        None
    }

    /// Whether the storage can be reached now (for health and readiness).
    async fn ping(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_keys_encode_lengths_and_decode_back() {
        let long = "x".repeat(123);
        let values = ["", "abcdefghi", "abcdefghij", long.as_str(), "1:2"];
        let key = CounterKey::new(7, values);
        assert_eq!(
            key.encoded(),
            format!("0:9:abcdefghi10:abcdefghij123:{long}3:1:2")
        );
        assert_eq!(key.values(), values);
    }
}
