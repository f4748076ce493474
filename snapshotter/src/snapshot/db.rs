//! Durable snapshot metadata in redb: one table of snapshot records by name, and a counter for
//! snapshot ids (the names of their directories). Every change is one redb write transaction,
//! so a `kill -9` at any moment leaves either the old or the new state.

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
    db: Database,
}

fn internal(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Internal(format!("metadata store: {e}"))
}

/// Where RELIABILITY.md tells an operator how to recover from a damaged database.
pub const RECOVERY_DOC: &str = "RELIABILITY.md, \"A damaged snapshot database\"";

impl SnapshotDb {
    /// Open the database at `path`, creating it when there is none. A file that is there but
    /// cannot be read as one is an error that names it and the recovery, and is left exactly
    /// as it is: never replaced, never "repaired" into an empty store.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let damaged = |e: &dyn std::fmt::Display| {
            SnapshotError::Internal(format!(
                "the snapshot database {} is damaged ({e}); it was left as it is. To recover, \
                 see {RECOVERY_DOC}: move it aside (mv {0} {0}.damaged) and start again; the \
                 snapshot directories are then kept aside, not deleted",
                path.display()
            ))
        };
        // redb repairs a file in place when it was not closed cleanly (a kill -9), and an
        // open that fails may already have written to it: work on the file with a copy of it
        // aside, put back if anything fails. The database is small (records, not data).
        let copy = path.with_extension("redb.before-open");
        let existed = path.exists();
        if existed {
            std::fs::copy(path, &copy)
                .map_err(|e| internal(format!("copying {}: {e}", path.display())))?;
        }
        let opened = (|| -> Result<SnapshotDb, String> {
            let db = Database::create(path).map_err(|e| e.to_string())?;
            let txn = db.begin_write().map_err(|e| e.to_string())?;
            {
                txn.open_table(SNAPSHOTS).map_err(|e| e.to_string())?;
                txn.open_table(COUNTERS).map_err(|e| e.to_string())?;
            }
            txn.commit().map_err(|e| e.to_string())?;
            let db = SnapshotDb { db };
            // Every record must read: a damaged page found now is the same clear error, not
            // a failure of some later request.
            db.all().map_err(|e| e.to_string())?;
            Ok(db)
        })();
        match opened {
            Ok(db) => {
                if existed {
                    let _ = std::fs::remove_file(&copy);
                }
                Ok(db)
            }
            Err(e) => {
                if existed {
                    std::fs::rename(&copy, path).map_err(|re| {
                        internal(format!(
                            "{e}; and putting {} back from {} failed: {re}",
                            path.display(),
                            copy.display()
                        ))
                    })?;
                } else {
                    let _ = std::fs::remove_file(path);
                }
                Err(damaged(&e))
            }
        }
    }

    pub fn get(&self, name: &str) -> Result<Option<SnapshotRecord>, SnapshotError> {
        let txn = self.db.begin_read().map_err(internal)?;
        let t = txn.open_table(SNAPSHOTS).map_err(internal)?;
        match t.get(name).map_err(internal)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(internal)?)),
            None => Ok(None),
        }
    }

    pub fn all(&self) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        let txn = self.db.begin_read().map_err(internal)?;
        let t = txn.open_table(SNAPSHOTS).map_err(internal)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(internal)? {
            let (_, v) = item.map_err(internal)?;
            out.push(serde_json::from_slice(v.value()).map_err(internal)?);
        }
        Ok(out)
    }

    /// Run `f` on a write transaction view; its changes are committed together or not at all.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let txn = self.db.begin_write().map_err(internal)?;
        let out = {
            let snapshots = txn.open_table(SNAPSHOTS).map_err(internal)?;
            let counters = txn.open_table(COUNTERS).map_err(internal)?;
            let mut tx = Tx {
                snapshots,
                counters,
            };
            f(&mut tx)?
        };
        txn.commit().map_err(internal)?;
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
        match self.snapshots.get(name).map_err(internal)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(internal)?)),
            None => Ok(None),
        }
    }

    pub fn put(&mut self, r: &SnapshotRecord) -> Result<(), SnapshotError> {
        let bytes = serde_json::to_vec(r).map_err(internal)?;
        self.snapshots
            .insert(r.name.as_str(), bytes.as_slice())
            .map_err(internal)?;
        Ok(())
    }

    pub fn delete(&mut self, name: &str) -> Result<(), SnapshotError> {
        self.snapshots.remove(name).map_err(internal)?;
        Ok(())
    }

    /// Whether any snapshot names `name` as its parent.
    pub fn has_children(&self, name: &str) -> Result<bool, SnapshotError> {
        for item in self.snapshots.iter().map_err(internal)? {
            let (_, v) = item.map_err(internal)?;
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
        for item in self.snapshots.iter().map_err(internal)? {
            let (_, v) = item.map_err(internal)?;
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
            .map_err(internal)?
            .map(|v| v.value())
            .unwrap_or(0)
            + 1;
        self.counters.insert("snapshot-id", n).map_err(internal)?;
        Ok(n)
    }
}
