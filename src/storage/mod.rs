//! Where counters live. A storage makes the whole decision for one request in one atomic step:
//! it loads the states of every counter the request touches, runs
//! [`crate::algorithm::evaluate`], and stores what changed.

mod disk;
mod memory;
mod redis;

use std::collections::HashSet;
use std::fmt;

use async_trait::async_trait;

use crate::algorithm::{Algorithm, CounterState, Group, GroupOutcome, HoldRequest};

pub use disk::{decode_entry, decode_key, encode_entry, encode_key, open_disk};
pub use memory::{Entry, Journal, MemoryStorage};
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
    /// What a Reserve or Commit group does with holds (its reservation id, and for a Reserve
    /// the holds to place).
    pub hold: Option<HoldRequest>,
}

/// A live counter, for the admin API.
#[derive(Debug, Clone)]
pub struct CounterSnapshot {
    pub key: CounterKey,
    pub state: CounterState,
    /// Tokens held on it now by reservations (live holds).
    pub held: u64,
}

/// Which page of a namespace's counters to list.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    /// Where to resume: `None` for the first page, else the `next` of the page before. Cursors
    /// are opaque to clients; each storage reads its own.
    pub cursor: Option<&'a str>,
    /// At most this many counters.
    pub limit: usize,
}

impl PageRequest<'_> {
    /// A page's size when the client does not say.
    pub const DEFAULT_LIMIT: usize = 1000;
    /// The largest page a client may ask for.
    pub const MAX_LIMIT: usize = 10_000;
}

impl Default for PageRequest<'_> {
    fn default() -> Self {
        Self {
            cursor: None,
            limit: Self::DEFAULT_LIMIT,
        }
    }
}

/// One page of a listing. Each page is bounded work: it may hold fewer than the limit (even
/// none) and still have a next page. The listing has ended when `next` is `None`.
///
/// A listing is not atomic: a counter created, expired or moved while the pages are read may
/// be listed twice or not at all; one that stays unchanged (and the store around it) is listed
/// exactly once.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The cursor of the next page.
    pub next: Option<String>,
}

/// Why a page could not be listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListError {
    /// The cursor is not one this storage hands out (the reason says why).
    InvalidCursor(String),
    Storage(StorageError),
}

impl From<StorageError> for ListError {
    fn from(error: StorageError) -> Self {
        ListError::Storage(error)
    }
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListError::InvalidCursor(reason) => write!(f, "invalid cursor: {reason}"),
            ListError::Storage(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for ListError {}

/// Reads a cursor of the form `<a>.<b>` (two decimal numbers), the form both storages use.
fn parse_cursor(cursor: &str) -> Result<(u64, u64), ListError> {
    let invalid = || {
        ListError::InvalidCursor(format!(
            "{cursor:?} is not a cursor this server handed out (use the `next` cursor of the previous page)"
        ))
    };
    let (a, b) = cursor.split_once('.').ok_or_else(invalid)?;
    let number = |text: &str| {
        let digits = !text.is_empty() && text.bytes().all(|c| c.is_ascii_digit());
        digits.then(|| text.parse::<u64>().ok()).flatten()
    };
    Ok((
        number(a).ok_or_else(invalid)?,
        number(b).ok_or_else(invalid)?,
    ))
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

    /// One page of the live (unexpired) counters of the given limits, all of `namespace`:
    /// bounded work, and never long on the threads that answer decisions (see [`Page`]).
    async fn counters(
        &self,
        namespace: &str,
        limits: &[LimitId],
        page: PageRequest<'_>,
        now_ms: u64,
    ) -> Result<Page<CounterSnapshot>, ListError>;

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

    /// Whether the storage may drop live counters on its own, resetting budgets (Redis with an
    /// evicting `maxmemory-policy`): `Ok(Some(why))` if it may, `Ok(None)` if it never does,
    /// an error when it cannot tell.
    async fn evicts(&self) -> Result<Option<String>, StorageError> {
        Ok(None)
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

    #[test]
    fn cursors_are_two_decimal_numbers() {
        assert_eq!(parse_cursor("0.0"), Ok((0, 0)));
        assert_eq!(parse_cursor("18446744073709551615.7"), Ok((u64::MAX, 7)));
        for bad in [
            "",
            ".",
            "1",
            "1.",
            ".1",
            "1.2.3",
            "-1.0",
            "+1.0",
            "a.b",
            "18446744073709551616.0",
        ] {
            assert!(
                matches!(parse_cursor(bad), Err(ListError::InvalidCursor(_))),
                "{bad:?}"
            );
        }
    }
}
