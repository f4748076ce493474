//! Durable snapshot metadata in redb: one table of snapshot records by name, and a counter for
//! snapshot ids (the names of their directories). Every change is one redb write transaction,
//! so a `kill -9` at any moment leaves either the old or the new state.
//!
//! After a failed write (a full disk) redb refuses every later transaction of that handle
//! ("previous I/O error"); the database is then opened again, so that one refused Commit does
//! not take every later request down with it (issue 15).

use super::{Kind, SnapshotError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Where a remote (lazily mounted) snapshot's layer comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyLayer {
    /// Image reference the layer was pulled for (`host/repo:tag`).
    pub image: String,
    /// Digest of the image manifest.
    pub manifest: String,
    /// Digest of the original layer.
    pub layer: String,
    /// The transport settings of the `beam pull` that asked for it, used again when the layer
    /// is remounted after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<crate::registry::PullTransport>,
}

/// One snapshot, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: u64,
    pub kind: Kind,
    pub name: String,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: i64,
    pub updated: i64,
    /// Bytes and inodes, computed at commit.
    #[serde(default)]
    pub usage: (i64, i64),
    #[serde(default)]
    pub remote: Option<LazyLayer>,
}

/// The metadata database.
pub struct SnapshotDb {
    path: std::path::PathBuf,
    /// Replaced by a fresh handle after an I/O error (see [`SnapshotDb::recover_from_io_error`]).
    db: std::sync::RwLock<Database>,
}

fn internal(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Internal(format!("metadata store: {e}"))
}

/// A redb error: an I/O failure (after which redb refuses the handle) is told apart, so that
/// the database is opened again (see [`SnapshotDb::recovering`]).
fn db_err(e: impl Into<redb::Error>) -> SnapshotError {
    let e: redb::Error = e.into();
    match e {
        redb::Error::Io(_) | redb::Error::PreviousIo => {
            SnapshotError::Io(format!("metadata store: {e}"))
        }
        e => internal(e),
    }
}

/// Where RELIABILITY.md tells an operator how to recover from a damaged database.
pub const RECOVERY_DOC: &str = "RELIABILITY.md, \"A damaged snapshot database\"";

impl SnapshotDb {
    /// Open the database at `path`, creating it when there is none. A file that is there but
    /// cannot be read as one is an error that names it and the recovery, and is left exactly
    /// as it is: never replaced, never "repaired" into an empty store.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let damaged = |e: &dyn std::fmt::Display, kept: bool| {
            SnapshotError::Internal(format!(
                "the snapshot database {} is damaged ({e}){}. To recover, see {RECOVERY_DOC}: \
                 move it aside (mv {0} {0}.damaged) and start again; the snapshot directories \
                 are then kept aside, not deleted",
                path.display(),
                if kept { "; it was left as it is" } else { "" }
            ))
        };
        // redb repairs a file in place when it was not closed cleanly (a kill -9), and an
        // open that fails may already have written to it: work on the file with a copy of it
        // aside, put back if anything fails. The database is small (records, not data).
        let copy = path.with_extension("redb.before-open");
        // Without room for the copy (a full state disk) the daemon still starts, without it.
        let existed = path.exists();
        let backed_up = existed
            && match std::fs::copy(path, &copy) {
                Ok(_) => true,
                Err(e) => {
                    let _ = std::fs::remove_file(&copy);
                    tracing::warn!(db = %path.display(), "opening without a copy aside: {e}");
                    false
                }
            };
        let opened = (|| -> Result<SnapshotDb, String> {
            let db = Database::create(path).map_err(|e| e.to_string())?;
            let txn = db.begin_write().map_err(|e| e.to_string())?;
            {
                txn.open_table(SNAPSHOTS).map_err(|e| e.to_string())?;
                txn.open_table(COUNTERS).map_err(|e| e.to_string())?;
            }
            txn.commit().map_err(|e| e.to_string())?;
            let db = SnapshotDb {
                path: path.to_path_buf(),
                db: std::sync::RwLock::new(db),
            };
            // Every record must read: a damaged page found now is the same clear error, not
            // a failure of some later request.
            db.all().map_err(|e| e.to_string())?;
            Ok(db)
        })();
        match opened {
            Ok(db) => {
                if backed_up {
                    let _ = std::fs::remove_file(&copy);
                }
                Ok(db)
            }
            Err(e) if !existed => Err(internal(format!(
                "creating the snapshot database {}: {e}",
                path.display()
            ))),
            Err(e) => {
                if backed_up {
                    std::fs::rename(&copy, path).map_err(|re| {
                        internal(format!(
                            "{e}; and putting {} back from {} failed: {re}",
                            path.display(),
                            copy.display()
                        ))
                    })?;
                }
                Err(damaged(&e, backed_up))
            }
        }
    }

    /// The database handle, for one transaction.
    fn handle(&self) -> std::sync::RwLockReadGuard<'_, Database> {
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Open the database again after an I/O error, as redb asks: its handle refuses every
    /// transaction after one. What was committed is on disk; the failed transaction never was.
    fn reopen(&self) {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        // redb holds a lock on the file: the old handle must go before the new one opens.
        // An empty in-memory database stands in meanwhile.
        let placeholder =
            match Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("reopening the snapshot database: {e}");
                    return;
                }
            };
        let old = std::mem::replace(&mut *db, placeholder);
        drop(old);
        match Database::create(&self.path) {
            Ok(fresh) => {
                *db = fresh;
                tracing::warn!(db = %self.path.display(), "reopened after an I/O error");
            }
            Err(e) => {
                tracing::error!(db = %self.path.display(), "reopening after an I/O error: {e}")
            }
        }
    }

    /// `op`; after an I/O error, the database opened again for the next request.
    fn recovering<T>(
        &self,
        op: impl FnOnce() -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let r = op();
        if matches!(r, Err(SnapshotError::Io(_))) {
            self.reopen();
        }
        r
    }

    pub fn get(&self, name: &str) -> Result<Option<SnapshotRecord>, SnapshotError> {
        self.recovering(|| self.get_once(name))
    }

    fn get_once(&self, name: &str) -> Result<Option<SnapshotRecord>, SnapshotError> {
        let db = self.handle();
        let txn = db.begin_read().map_err(db_err)?;
        let t = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        match t.get(name).map_err(db_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(internal)?)),
            None => Ok(None),
        }
    }

    pub fn all(&self) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        self.recovering(|| self.all_once())
    }

    fn all_once(&self) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        let db = self.handle();
        let txn = db.begin_read().map_err(db_err)?;
        let t = txn.open_table(SNAPSHOTS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (_, v) = item.map_err(db_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(internal)?);
        }
        Ok(out)
    }

    /// Run `f` on a write transaction view; its changes are committed together or not at all.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        self.recovering(|| self.update_once(f))
    }

    fn update_once<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let db = self.handle();
        let txn = db.begin_write().map_err(db_err)?;
        let out = {
            let snapshots = txn.open_table(SNAPSHOTS).map_err(db_err)?;
            let counters = txn.open_table(COUNTERS).map_err(db_err)?;
            let mut tx = Tx {
                snapshots,
                counters,
            };
            f(&mut tx)?
        };
        txn.commit().map_err(db_err)?;
        Ok(out)
    }
}

/// Changes inside one write transaction.
pub struct Tx<'t> {
    snapshots: redb::Table<'t, &'static str, &'static [u8]>,
    counters: redb::Table<'t, &'static str, u64>,
}

impl Tx<'_> {
    pub fn get(&self, name: &str) -> Result<Option<SnapshotRecord>, SnapshotError> {
        match self.snapshots.get(name).map_err(db_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(internal)?)),
            None => Ok(None),
        }
    }

    pub fn put(&mut self, r: &SnapshotRecord) -> Result<(), SnapshotError> {
        let bytes = serde_json::to_vec(r).map_err(internal)?;
        self.snapshots
            .insert(r.name.as_str(), bytes.as_slice())
            .map_err(db_err)?;
        Ok(())
    }

    pub fn delete(&mut self, name: &str) -> Result<(), SnapshotError> {
        self.snapshots.remove(name).map_err(db_err)?;
        Ok(())
    }

    /// Whether any snapshot names `name` as its parent.
    pub fn has_children(&self, name: &str) -> Result<bool, SnapshotError> {
        for item in self.snapshots.iter().map_err(db_err)? {
            let (_, v) = item.map_err(db_err)?;
            let r: SnapshotRecord = serde_json::from_slice(v.value()).map_err(internal)?;
            if r.parent == name {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The ids of every recorded snapshot.
    pub fn ids(&self) -> Result<std::collections::HashSet<u64>, SnapshotError> {
        let mut out = std::collections::HashSet::new();
        for item in self.snapshots.iter().map_err(db_err)? {
            let (_, v) = item.map_err(db_err)?;
            let r: SnapshotRecord = serde_json::from_slice(v.value()).map_err(internal)?;
            out.insert(r.id);
        }
        Ok(out)
    }

    /// A new snapshot id (never reused).
    pub fn next_id(&mut self) -> Result<u64, SnapshotError> {
        let n = self
            .counters
            .get("snapshot-id")
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(0)
            + 1;
        self.counters.insert("snapshot-id", n).map_err(db_err)?;
        Ok(n)
    }
}
