//! Coalescing: the decisions waiting at the same moment go to Redis as one script call.
//!
//! `apply` encodes its decision (its keys and arguments, as decide.lua reads one decision) as a
//! [`Job`] and hands it to the storage's dispatcher, a task (started on first use) that takes
//! every job waiting at that moment, up to [`MAX_DECISIONS`], and sends them as one `EVALSHA`
//! of decide.lua. The script makes the decisions one after the other, each exactly as it would
//! alone, and answers one record per decision, which the dispatcher hands back to its caller.
//! At most [`IN_FLIGHT`] such calls are outstanding at once: while they are, new jobs wait and
//! join the next call, so the busier the server, the more decisions one call carries (and the
//! fewer script calls, replies and wake-ups per decision). With nothing outstanding a job is
//! sent at once: one channel hop more than sending it directly.
//!
//! In a cluster, one call carries only decisions of one hash tag (one namespace: one slot), so
//! it runs on the node that owns them all, and the bound on outstanding calls is per hash tag:
//! a node that stalls holds back only the namespaces it owns, not the others' calls. A job whose
//! caller gave up before it was sent is dropped unsent; one that was sent is bounded by its
//! deadline on Redis's clock, as before.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::{Cmd, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::{Connection, evalsha_cmd, script_call, storage_error};
use crate::storage::StorageError;

/// Decisions one script call carries at most (it runs about 20–30 µs per decision in Redis,
/// so a full call stays within a few milliseconds).
pub(super) const MAX_DECISIONS: usize = 128;
/// Keys one script call carries at most (a decision with more still goes, alone).
const MAX_KEYS: usize = 1024;
/// Script calls outstanding at once on the connection (in a cluster: per hash tag).
pub(super) const IN_FLIGHT: usize = 2;

/// One decision's `EVALSHA` keys and arguments, and where its answer goes.
pub(super) struct Job {
    /// The keys, then the arguments, one after the other.
    pub bytes: Vec<u8>,
    /// Where each key ends in `bytes`, then where each argument ends.
    pub ends: Vec<usize>,
    /// How many of `ends` are keys.
    pub keys: usize,
    /// decide.lua's answer for this decision, or why there is none.
    pub answer: oneshot::Sender<Result<Vec<u8>, StorageError>>,
}

impl Job {
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| self.bytes.get(start..end).unwrap_or_default())
    }

    /// Which calls it may share and whose bound on outstanding calls it counts against: in a
    /// cluster its hash tag, else one lane for all.
    fn lane(&self, cluster: bool) -> &[u8] {
        if cluster { self.tag() } else { &[] }
    }

    /// The hash tag of its first key (`{…}`): jobs with the same one live in the same slot.
    fn tag(&self) -> &[u8] {
        let first = self.parts().next().unwrap_or_default();
        let open = first.iter().position(|&b| b == b'{');
        let tag = open.and_then(|open| {
            let rest = &first[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .map(|close| &rest[..close])
        });
        tag.unwrap_or_default()
    }
}

/// What the dispatcher needs of the storage.
pub(super) struct Link {
    pub connection: Arc<Connection>,
    pub script: Script,
    pub display_url: String,
    pub timeout: Duration,
}

/// The way to the dispatcher, started on first use (inside the runtime that uses it).
#[derive(Default)]
pub(super) struct Coalescer {
    jobs: OnceLock<mpsc::UnboundedSender<Job>>,
}

impl Coalescer {
    /// Queues `job`; `link` is called once, to start the dispatcher.
    pub fn submit(&self, job: Job, link: impl FnOnce() -> Link) -> Result<(), StorageError> {
        let jobs = self.jobs.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(dispatch(Arc::new(link()), receiver));
            sender
        });
        jobs.send(job)
            .map_err(|_| StorageError::Unavailable("the Redis dispatcher has stopped".into()))
    }
}

/// The jobs of one lane waiting to be sent, and its calls outstanding.
#[derive(Default)]
struct Lane {
    waiting: VecDeque<Job>,
    outstanding: usize,
}

/// Takes the waiting jobs and sends them, as batches, while fewer than [`IN_FLIGHT`] calls of
/// their lane are outstanding; ends when the storage is dropped.
async fn dispatch(link: Arc<Link>, mut receiver: mpsc::UnboundedReceiver<Job>) {
    let cluster = matches!(*link.connection, Connection::Cluster(_));
    let mut lanes: HashMap<Vec<u8>, Lane> = HashMap::new();
    // Each call reports its lane here when it is over.
    let (over, mut finished) = mpsc::unbounded_channel::<Vec<u8>>();
    loop {
        // On one Redis, while its calls are all outstanding, new jobs stay in the channel and
        // are taken at once when one is over; in a cluster they are sorted into their lanes
        // meanwhile (another lane may be free).
        let busy = !cluster
            && lanes
                .get(&[][..])
                .is_some_and(|lane| lane.outstanding >= IN_FLIGHT);
        // Calls that are over are heard of at once only when a lane waits for one; otherwise at
        // the next job (so a lone call's end wakes nobody).
        let waits = busy
            || lanes
                .values()
                .any(|lane| lane.outstanding >= IN_FLIGHT && !lane.waiting.is_empty());
        tokio::select! {
            job = receiver.recv(), if !busy => match job {
                Some(job) => queue(&mut lanes, job, cluster),
                None => return,
            },
            Some(lane) = finished.recv(), if waits => done(&mut lanes, &lane),
        }
        while let Ok(lane) = finished.try_recv() {
            done(&mut lanes, &lane);
        }
        while let Ok(job) = receiver.try_recv() {
            queue(&mut lanes, job, cluster);
        }
        for (name, lane) in lanes.iter_mut() {
            while lane.outstanding < IN_FLIGHT {
                let batch = take_batch(&mut lane.waiting);
                if batch.is_empty() {
                    break;
                }
                lane.outstanding += 1;
                let call = Outstanding {
                    lane: name.clone(),
                    over: over.clone(),
                };
                tokio::spawn(send(Arc::clone(&link), batch, call));
            }
        }
        lanes.retain(|_, lane| lane.outstanding > 0 || !lane.waiting.is_empty());
    }
}

/// Puts `job` at the end of its lane's queue.
fn queue(lanes: &mut HashMap<Vec<u8>, Lane>, job: Job, cluster: bool) {
    let name = job.lane(cluster);
    match lanes.get_mut(name) {
        Some(lane) => lane.waiting.push_back(job),
        None => {
            let name = name.to_vec();
            lanes.entry(name).or_default().waiting.push_back(job);
        }
    }
}

/// A call is over on lane `name`.
fn done(lanes: &mut HashMap<Vec<u8>, Lane>, name: &[u8]) {
    if let Some(lane) = lanes.get_mut(name) {
        lane.outstanding = lane.outstanding.saturating_sub(1);
    }
}

/// An outstanding call: reports its lane to the dispatcher when dropped (however it ended).
struct Outstanding {
    lane: Vec<u8>,
    over: mpsc::UnboundedSender<Vec<u8>>,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let _ = self.over.send(std::mem::take(&mut self.lane));
    }
}

/// The next batch of a lane: its first waiting jobs, in order, up to the bounds; a job whose
/// caller gave up is dropped unsent.
fn take_batch(waiting: &mut VecDeque<Job>) -> Vec<Job> {
    let mut batch: Vec<Job> = Vec::new();
    let mut keys = 0;
    while let Some(job) = waiting.pop_front() {
        if job.answer.is_closed() {
            continue;
        }
        if !batch.is_empty() && (batch.len() >= MAX_DECISIONS || keys + job.keys > MAX_KEYS) {
            waiting.push_front(job);
            break;
        }
        keys += job.keys;
        batch.push(job);
    }
    batch
}

/// One `EVALSHA` of decide.lua for `batch` (see its `BATCH`; one decision goes alone), each
/// answer to its caller.
async fn send(link: Arc<Link>, batch: Vec<Job>, _call: Outstanding) {
    let keys: usize = batch.iter().map(|job| job.keys).sum();
    let bytes: usize = batch
        .iter()
        .map(|job| job.bytes.len() + 8 * job.ends.len())
        .sum();
    let mut cmd: Cmd = evalsha_cmd(&link.script, keys, 64 + bytes + 8 * 2 * batch.len());
    for job in &batch {
        for key in job.parts().take(job.keys) {
            cmd.arg(key);
        }
    }
    if batch.len() > 1 {
        let mut shape: Vec<u8> = Vec::with_capacity(8 * (1 + 2 * batch.len()));
        let mut push = |x: usize| shape.extend_from_slice(&(x as f64).to_le_bytes());
        push(batch.len());
        for job in &batch {
            push(job.keys);
            push(job.ends.len() - job.keys);
        }
        let mut format = String::with_capacity(1 + shape.len() / 8);
        format.push('<');
        format.extend(std::iter::repeat_n('d', shape.len() / 8));
        cmd.arg("batch").arg(format).arg(shape);
    }
    for job in &batch {
        for arg in job.parts().skip(job.keys) {
            cmd.arg(arg);
        }
    }
    let reply = tokio::time::timeout(
        link.timeout,
        script_call(&link.connection, &cmd, &link.script),
    )
    .await;
    let error = match reply {
        // One decision: its answer alone.
        Ok(Ok(Value::BulkString(bytes))) if batch.len() == 1 => {
            if let Some(job) = batch.into_iter().next() {
                let _ = job.answer.send(Ok(bytes));
            }
            return;
        }
        Ok(Ok(Value::Array(answers))) if answers.len() == batch.len() => {
            for (job, answer) in batch.into_iter().zip(answers) {
                let answer = match answer {
                    Value::BulkString(bytes) => Ok(bytes),
                    _ => Err(unexpected()),
                };
                // (A caller that gave up meanwhile no longer listens.)
                let _ = job.answer.send(answer);
            }
            return;
        }
        Ok(Ok(_)) => unexpected(),
        Ok(Err(e)) => storage_error(&link.connection, &e, &link.display_url),
        Err(_) => StorageError::Unavailable(format!(
            "{}: no answer within {:?}",
            link.display_url, link.timeout
        )),
    };
    for job in batch {
        let _ = job.answer.send(Err(error.clone()));
    }
}

fn unexpected() -> StorageError {
    StorageError::Unavailable("unexpected reply from Redis".to_string())
}
