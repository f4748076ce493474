//! The durable queue of tags to convert, and the last result per tag, in redb.
//!
//! A push event is acknowledged only after its job is committed here (redb commits are
//! durable when `commit` returns), and a job leaves the queue only when its conversion has
//! finished or failed for good, in the same transaction that records the result. So a
//! `kill -9` at any moment loses no acknowledged push: at the next start the job is still
//! queued, and converting it again is harmless (conversion is deterministic and a bound image
//! is recognised as done).
//!
//! Jobs are keyed by `repository:tag`: a burst of pushes to one tag is one job, for the digest
//! pushed last. Each enqueue gets a new sequence number; a worker's result removes the job
//! only when the sequence is still the one it ran, so a push that arrives during a conversion
//! is converted after it.

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// A tag waiting to be converted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub repository: String,
    pub tag: String,
    /// The digest the event named (None: whatever the tag names, e.g. found by a scan).
    pub digest: Option<String>,
    /// Enqueue order; a newer push of the same tag gets a larger one.
    pub seq: u64,
    /// Failed attempts so far (registry errors worth retrying).
    pub attempts: u32,
    /// Not before this time (milliseconds since the epoch): the retry backoff.
    pub not_before_ms: u64,
    /// Milliseconds since the epoch when first queued.
    pub queued_ms: u64,
    /// The last retryable error.
    #[serde(default)]
    pub last_error: String,
}

impl Job {
    pub fn key(&self) -> String {
        key(&self.repository, &self.tag)
    }
}

fn key(repository: &str, tag: &str) -> String {
    format!("{repository}:{tag}")
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Converted and bound: the tag now names the bound image.
    Converted,
    /// Nothing to do: the tag already named a bound Beam image.
    AlreadyConverted,
    /// Not converted on purpose (Beam's own output, another tool's artifact, a rule).
    Skipped,
    /// Cannot be converted (e.g. a foreign layer media type), or retries ran out.
    Failed,
}

/// The last result for one tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub repository: String,
    pub tag: String,
    pub state: State,
    /// The manifest (or index) converted, and the bound one the tag names now.
    pub source: Option<String>,
    pub bound: Option<String>,
    /// Why it was skipped or failed; what was done otherwise.
    pub detail: String,
    pub finished_ms: u64,
    pub seconds: f64,
    /// Bytes of the original layers converted.
    pub bytes: u64,
    pub attempts: u32,
}

/// Queue errors: the database.
#[derive(Debug, thiserror::Error)]
#[error("autoconvert queue {path}: {msg}")]
pub struct QueueError {
    path: String,
    msg: String,
}

/// The queue database.
pub struct Queue {
    db: Database,
    path: String,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Queue {
    /// Open (or create) the queue at `path`. redb holds a lock: one service per state dir.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        let p = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| QueueError {
            path: p.clone(),
            msg: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        {
            txn.open_table(PENDING).map_err(|e| err(&e))?;
            txn.open_table(RESULTS).map_err(|e| err(&e))?;
            txn.open_table(COUNTERS).map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| err(&e))?;
        Ok(Queue { db, path: p })
    }

    fn err(&self, e: impl std::fmt::Display) -> QueueError {
        QueueError {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }

    /// The job queued under `key` in `pending`, if any.
    fn queued(
        &self,
        pending: &redb::Table<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Job>, QueueError> {
        Ok(pending
            .get(key)
            .map_err(|e| self.err(e))?
            .and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Queue `(repository, tag, digest)` jobs in one durable transaction. A tag already queued
    /// takes the new digest and a new sequence number (and starts its retries afresh).
    /// Returns how many were new to the queue.
    pub fn push(&self, items: &[(String, String, Option<String>)]) -> Result<usize, QueueError> {
        if items.is_empty() {
            return Ok(0);
        }
        let now = now_ms();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut added = 0;
        {
            let mut pending = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let mut counters = txn.open_table(COUNTERS).map_err(|e| self.err(e))?;
            let mut seq = counters
                .get("seq")
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
                .unwrap_or(0);
            for (repository, tag, digest) in items {
                seq += 1;
                let k = key(repository, tag);
                let old = self.queued(&pending, &k)?;
                if old.is_none() {
                    added += 1;
                }
                let job = Job {
                    repository: repository.clone(),
                    tag: tag.clone(),
                    digest: digest.clone(),
                    seq,
                    attempts: 0,
                    not_before_ms: 0,
                    queued_ms: old.map(|o| o.queued_ms).unwrap_or(now),
                    last_error: String::new(),
                };
                let bytes = serde_json::to_vec(&job).map_err(|e| self.err(e))?;
                pending
                    .insert(k.as_str(), bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            counters.insert("seq", seq).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(added)
    }

    /// Every record of `table` that parses as a `T`.
    fn all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, QueueError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(table).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            if let Ok(x) = serde_json::from_slice(v.value()) {
                out.push(x);
            }
        }
        Ok(out)
    }

    /// All queued jobs, oldest first.
    pub fn pending(&self) -> Result<Vec<Job>, QueueError> {
        let mut out: Vec<Job> = self.all(PENDING)?;
        out.sort_by_key(|j| j.seq);
        Ok(out)
    }

    /// How many jobs are queued.
    pub fn depth(&self) -> Result<u64, QueueError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }

    /// The oldest job that is due and not in `busy` (keys being converted).
    pub fn next_due(&self, busy: &HashSet<String>) -> Result<Option<Job>, QueueError> {
        let now = now_ms();
        Ok(self
            .pending()?
            .into_iter()
            .find(|j| j.not_before_ms <= now && !busy.contains(&j.key())))
    }

    /// Take `job` off the queue, unless a newer push of the same tag replaced it meanwhile
    /// (then that one stays queued), and record `outcome` as the tag's result. No outcome: an
    /// event about our own output, whose tag's result is already recorded.
    pub fn finish(&self, job: &Job, outcome: Option<&Outcome>) -> Result<(), QueueError> {
        let k = job.key();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut pending = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let current = self.queued(&pending, &k)?;
            if current.is_some_and(|c| c.seq == job.seq) {
                pending.remove(k.as_str()).map_err(|e| self.err(e))?;
            }
            if let Some(outcome) = outcome {
                let mut results = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
                let bytes = serde_json::to_vec(outcome).map_err(|e| self.err(e))?;
                results
                    .insert(k.as_str(), bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Keep `job` queued for another attempt after `delay_ms` (unless a newer push replaced it).
    pub fn retry_later(&self, job: &Job, delay_ms: u64, error: &str) -> Result<(), QueueError> {
        let k = job.key();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut pending = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let current = self.queued(&pending, &k)?;
            if let Some(mut c) = current.filter(|c| c.seq == job.seq) {
                c.attempts += 1;
                c.not_before_ms = now_ms() + delay_ms;
                c.last_error = error.to_string();
                let bytes = serde_json::to_vec(&c).map_err(|e| self.err(e))?;
                pending
                    .insert(k.as_str(), bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The last result of every tag, newest first, at most `limit`.
    pub fn results(&self, limit: usize) -> Result<Vec<Outcome>, QueueError> {
        let mut out: Vec<Outcome> = self.all(RESULTS)?;
        out.sort_by_key(|o| std::cmp::Reverse(o.finished_ms));
        out.truncate(limit);
        Ok(out)
    }

    /// The last result for one tag.
    pub fn result(&self, repository: &str, tag: &str) -> Result<Option<Outcome>, QueueError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(RESULTS).map_err(|e| self.err(e))?;
        let k = key(repository, tag);
        let v = t.get(k.as_str()).map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(job: &Job, state: State) -> Outcome {
        Outcome {
            repository: job.repository.clone(),
            tag: job.tag.clone(),
            state,
            source: job.digest.clone(),
            bound: None,
            detail: String::new(),
            finished_ms: now_ms(),
            seconds: 0.0,
            bytes: 0,
            attempts: job.attempts,
        }
    }

    #[test]
    fn jobs_survive_reopen_and_leave_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.redb");
        {
            let q = Queue::open(&path).unwrap();
            let added = q
                .push(&[
                    ("a".into(), "v1".into(), Some("sha256:1".into())),
                    ("b".into(), "v1".into(), None),
                ])
                .unwrap();
            assert_eq!(added, 2);
        }
        // Reopened as after a kill: both still there, in order.
        let q = Queue::open(&path).unwrap();
        let jobs = q.pending().unwrap();
        assert_eq!(
            jobs.iter().map(|j| j.key()).collect::<Vec<_>>(),
            ["a:v1", "b:v1"]
        );
        let first = q.next_due(&HashSet::new()).unwrap().unwrap();
        assert_eq!(first.key(), "a:v1");
        let busy: HashSet<String> = [first.key()].into();
        assert_eq!(q.next_due(&busy).unwrap().unwrap().key(), "b:v1");
        q.finish(&first, Some(&outcome(&first, State::Converted)))
            .unwrap();
        assert_eq!(q.depth().unwrap(), 1);
        assert_eq!(
            q.result("a", "v1").unwrap().unwrap().state,
            State::Converted
        );
    }

    #[test]
    fn a_push_during_a_conversion_stays_queued() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("q.redb")).unwrap();
        q.push(&[("a".into(), "v1".into(), Some("sha256:1".into()))])
            .unwrap();
        let running = q.next_due(&HashSet::new()).unwrap().unwrap();
        // A second push of the tag while the first conversion runs: one job, new digest.
        assert_eq!(
            q.push(&[("a".into(), "v1".into(), Some("sha256:2".into()))])
                .unwrap(),
            0
        );
        q.finish(&running, Some(&outcome(&running, State::Converted)))
            .unwrap();
        let left = q.pending().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].digest.as_deref(), Some("sha256:2"));
    }

    #[test]
    fn retry_waits_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("q.redb")).unwrap();
        q.push(&[("a".into(), "v1".into(), None)]).unwrap();
        let job = q.next_due(&HashSet::new()).unwrap().unwrap();
        q.retry_later(&job, 60_000, "503").unwrap();
        assert!(q.next_due(&HashSet::new()).unwrap().is_none());
        let p = q.pending().unwrap();
        assert_eq!(p[0].attempts, 1);
        assert_eq!(p[0].last_error, "503");
    }
}
