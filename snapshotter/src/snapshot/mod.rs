//! Snapshots with the semantics of containerd's overlayfs snapshotter, kept in a durable
//! metadata store. This is the domain core of beam-snapshotter: no gRPC types here (those live
//! in the daemon's grpc module); errors carry the kind that maps to a gRPC code.
//!
//! Layout under the root directory:
//!
//! ```text
//! metadata.redb          snapshot records (store.rs)
//! snapshots/<id>/fs      the snapshot's directory (upper dir of an active snapshot)
//! snapshots/<id>/work    overlayfs work dir
//! ```
//!
//! Crash protocol: a snapshot's directories are created inside the metadata transaction that
//! records it, before the commit, so every record has its directories; a crash before the
//! commit leaves directories no record names, which [`Snapshots::cleanup`] (run at start and on
//! containerd's Cleanup) removes. Removal commits first and deletes directories after.

pub mod filter;
pub mod store;

use filter::{Fields, Filters};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{MetaStore, SnapshotRecord};

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The name containerd's filters use.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// A failed snapshot operation; the variant decides the gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
}

/// What Stat, Update and List return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: Kind,
    pub name: String,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// A mount for containerd to perform (its `Mount` message, in our own type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Usage of one snapshot (excluding its parents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn time(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

fn info_of(r: &SnapshotRecord) -> Info {
    Info {
        kind: r.kind,
        name: r.name.clone(),
        parent: r.parent.clone(),
        labels: r.labels.clone(),
        created: time(r.created),
        updated: time(r.updated),
    }
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> SnapshotError {
    SnapshotError::Internal(format!("{what} {}: {e}", p.display()))
}

/// The snapshots of one beam-snapshotter root.
pub struct Snapshots {
    root: PathBuf,
    store: MetaStore,
}

impl Snapshots {
    /// Open (or create) the snapshots under `root` and remove leftovers of interrupted work.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(root.join("snapshots")).map_err(|e| io_err("creating", root, e))?;
        let store = MetaStore::open(&root.join("metadata.redb"))?;
        let s = Snapshots {
            root: root.to_path_buf(),
            store,
        };
        s.cleanup()?;
        Ok(s)
    }

    /// Directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// Remove snapshot directories that no record names.
    pub fn cleanup(&self) -> Result<usize, SnapshotError> {
        let known: HashSet<u64> = self.store.all()?.iter().map(|r| r.id).collect();
        let dir = self.root.join("snapshots");
        let mut removed = 0;
        for e in std::fs::read_dir(&dir).map_err(|e| io_err("reading", &dir, e))? {
            let e = e.map_err(|e| io_err("reading", &dir, e))?;
            let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
            if id.is_some_and(|id| known.contains(&id)) {
                continue;
            }
            let p = e.path();
            if is_mountpoint(&p.join("fs")) {
                // A lazy layer a dead daemon had mounted for a snapshot never recorded.
                if let Err(e) = nix::mount::umount2(&p.join("fs"), nix::mount::MntFlags::MNT_DETACH)
                {
                    tracing::warn!(dir = %p.display(), "unknown snapshot directory is mounted: {e}");
                    continue;
                }
            }
            std::fs::remove_dir_all(&p).map_err(|e| io_err("removing", &p, e))?;
            removed += 1;
        }
        Ok(removed)
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        self.store
            .get(key)?
            .map(|r| info_of(&r))
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))
    }

    /// Create an active (`kind = Active`) or read-only view (`kind = View`) snapshot.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "snapshot key is empty".into(),
            ));
        }
        let now = nanos(SystemTime::now());
        let rec = self.store.update(|tx| {
            if tx.get(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key.to_string()));
            }
            if !parent.is_empty() {
                match tx.get(parent)? {
                    None => return Err(SnapshotError::NotFound(parent.to_string())),
                    Some(p) if p.kind != Kind::Committed => {
                        return Err(SnapshotError::InvalidArgument(format!(
                            "parent {parent} is not a committed snapshot"
                        )))
                    }
                    Some(_) => {}
                }
            }
            let id = tx.next_id()?;
            let rec = SnapshotRecord {
                id,
                kind,
                name: key.to_string(),
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                usage: (0, 0),
                remote: None,
            };
            let dir = self.dir(id);
            for sub in ["fs", "work"] {
                std::fs::create_dir_all(dir.join(sub)).map_err(|e| io_err("creating", &dir, e))?;
            }
            tx.put(&rec)?;
            Ok(rec)
        })?;
        self.mounts_of(&rec)
    }

    /// Reserve a snapshot id and its empty directory (for a remote layer to be mounted on
    /// before [`Snapshots::commit_remote`] records it). Unrecorded, it is removed by cleanup.
    pub fn reserve(&self) -> Result<(u64, PathBuf), SnapshotError> {
        let id = self.store.update(|tx| tx.next_id())?;
        let dir = self.dir(id);
        for sub in ["fs", "work"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| io_err("creating", &dir, e))?;
        }
        Ok((id, self.fs_dir(id)))
    }

    /// Record reserved snapshot `id` (its layer mounted lazily at its `fs` dir) as the
    /// committed snapshot `name`.
    pub fn commit_remote(
        &self,
        id: u64,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: store::RemoteLayer,
    ) -> Result<(), SnapshotError> {
        let now = nanos(SystemTime::now());
        self.store.update(|tx| {
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_string()));
            }
            if !parent.is_empty() {
                match tx.get(parent)? {
                    Some(p) if p.kind == Kind::Committed => {}
                    Some(_) => {
                        return Err(SnapshotError::InvalidArgument(format!(
                            "parent {parent} is not a committed snapshot"
                        )))
                    }
                    None => return Err(SnapshotError::NotFound(parent.to_string())),
                }
            }
            tx.put(&SnapshotRecord {
                id,
                kind: Kind::Committed,
                name: name.to_string(),
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                usage: (0, 0),
                remote: Some(remote),
            })
        })
    }

    /// The record of a snapshot (for the daemon: its id and remote layer).
    pub fn record(&self, key: &str) -> Result<Option<SnapshotRecord>, SnapshotError> {
        self.store.get(key)
    }

    /// Every snapshot whose layer is mounted lazily.
    pub fn remote_records(&self) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        Ok(self
            .store
            .all()?
            .into_iter()
            .filter(|r| r.remote.is_some())
            .collect())
    }

    /// Directory a snapshot's layer is (or is mounted) in.
    pub fn fs_path(&self, id: u64) -> PathBuf {
        self.fs_dir(id)
    }

    /// Mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        if rec.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed: it has no mounts"
            )));
        }
        self.mounts_of(&rec)
    }

    /// Directories of the parent chain, nearest first.
    fn lower_dirs(&self, parent: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut out = Vec::new();
        let mut p = parent.to_string();
        while !p.is_empty() {
            let r = self
                .store
                .get(&p)?
                .ok_or_else(|| SnapshotError::NotFound(p.clone()))?;
            if let Some(remote) = &r.remote {
                if !is_mountpoint(&self.fs_dir(r.id)) {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "lazy layer {} of snapshot {} is not mounted",
                        remote.layer, r.name
                    )));
                }
            }
            out.push(self.fs_dir(r.id));
            p = r.parent;
            if out.len() > 500 {
                return Err(SnapshotError::FailedPrecondition(
                    "parent chain longer than 500 snapshots".into(),
                ));
            }
        }
        Ok(out)
    }

    fn mounts_of(&self, rec: &SnapshotRecord) -> Result<Vec<Mount>, SnapshotError> {
        let lowers = self.lower_dirs(&rec.parent)?;
        let fs = self.fs_dir(rec.id).display().to_string();
        let bind = |source: String, ro: bool| Mount {
            kind: "bind".into(),
            source,
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let lowerdir = || {
            format!(
                "lowerdir={}",
                lowers
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            )
        };
        Ok(match (rec.kind, lowers.len()) {
            (Kind::Active, 0) => vec![bind(fs, false)],
            (Kind::View, 0) => vec![bind(fs, true)],
            (Kind::View, 1) => vec![bind(lowers[0].display().to_string(), true)],
            (Kind::View, _) => vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![lowerdir()],
            }],
            (Kind::Active, _) => vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={}", self.dir(rec.id).join("work").display()),
                    format!("upperdir={fs}"),
                    lowerdir(),
                ],
            }],
            (Kind::Committed, _) => {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {} is committed: it has no mounts",
                    rec.name
                )))
            }
        })
    }

    /// Commit active snapshot `key` as `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "snapshot name is empty".into(),
            ));
        }
        let active = self
            .store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        if active.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        let usage = disk_usage(&self.fs_dir(active.id));
        let now = nanos(SystemTime::now());
        self.store.update(|tx| {
            let Some(current) = tx.get(key)? else {
                return Err(SnapshotError::NotFound(key.to_string()));
            };
            if current.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_string()));
            }
            tx.delete(key)?;
            tx.put(&SnapshotRecord {
                kind: Kind::Committed,
                name: name.to_string(),
                labels,
                created: now,
                updated: now,
                usage: (usage.size, usage.inodes),
                ..current
            })
        })
    }

    /// Remove a snapshot that has no children.
    pub fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let rec = self.remove_record(key)?;
        self.remove_dir(rec.id);
        Ok(())
    }

    /// Forget a snapshot that has no children, leaving its directory (for the caller to
    /// unmount a lazy layer first, then [`Snapshots::remove_dir`]).
    pub fn remove_record(&self, key: &str) -> Result<SnapshotRecord, SnapshotError> {
        self.store.update(|tx| {
            let Some(rec) = tx.get(key)? else {
                return Err(SnapshotError::NotFound(key.to_string()));
            };
            if tx.has_children(key)? {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: it has children"
                )));
            }
            tx.delete(key)?;
            Ok(rec)
        })
    }

    /// Delete the directory of a forgotten snapshot.
    pub fn remove_dir(&self, id: u64) {
        let dir = self.dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            // The record is gone; cleanup removes the directory later.
            tracing::warn!(dir = %dir.display(), "removing snapshot directory: {e}");
        }
    }

    /// Update labels: with no field paths (or `labels`) all labels are replaced; `labels.KEY`
    /// sets or (when absent from `labels`) deletes one label. Other fields cannot change.
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Info, SnapshotError> {
        let now = nanos(SystemTime::now());
        let rec = self.store.update(|tx| {
            let Some(mut rec) = tx.get(name)? else {
                return Err(SnapshotError::NotFound(name.to_string()));
            };
            if fieldpaths.is_empty() {
                rec.labels = labels.clone();
            }
            for path in fieldpaths {
                if path == "labels" {
                    rec.labels = labels.clone();
                } else if let Some(k) = path.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => {
                            rec.labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            rec.labels.remove(k);
                        }
                    }
                } else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update field {path:?} of snapshot {name}"
                    )));
                }
            }
            rec.updated = now;
            tx.put(&rec)?;
            Ok(rec)
        })?;
        Ok(info_of(&rec))
    }

    /// Usage of one snapshot: measured for active ones, recorded at commit for committed ones.
    pub fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        Ok(match rec.kind {
            Kind::Committed => Usage {
                size: rec.usage.0,
                inodes: rec.usage.1,
            },
            _ => disk_usage(&self.fs_dir(rec.id)),
        })
    }

    /// Every snapshot matching `filters` (containerd's syntax).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError> {
        let f = Filters::parse(filters)?;
        Ok(self
            .store
            .all()?
            .iter()
            .filter(|r| {
                f.matches(&Fields {
                    name: &r.name,
                    parent: &r.parent,
                    kind: r.kind.as_str(),
                    labels: &r.labels,
                })
            })
            .map(info_of)
            .collect())
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, not following links, not crossing mounts.
fn disk_usage(dir: &Path) -> Usage {
    use std::os::unix::fs::MetadataExt;
    let mut u = Usage::default();
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return u;
    };
    let dev = top.dev();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev || !seen.insert(m.ino()) {
                continue;
            }
            u.inodes += 1;
            u.size += (m.blocks() * 512) as i64;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    u
}

/// Whether `p` is a mountpoint (per /proc/self/mountinfo).
pub fn is_mountpoint(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parent_chains_kinds_and_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        let m = s.create(Kind::Active, "a", "", labels(&[])).unwrap();
        assert_eq!(m[0].kind, "bind");
        assert!(m[0].options.contains(&"rw".to_string()));
        std::fs::write(PathBuf::from(&m[0].source).join("f"), b"x").unwrap();
        s.commit("base", "a", labels(&[("l", "1")])).unwrap();
        assert!(matches!(s.stat("a"), Err(SnapshotError::NotFound(_))));
        let base = s.stat("base").unwrap();
        assert_eq!(
            (base.kind, base.labels.get("l").map(String::as_str)),
            (Kind::Committed, Some("1"))
        );
        assert!(s.usage("base").unwrap().inodes >= 1);

        let m = s.create(Kind::Active, "b", "base", labels(&[])).unwrap();
        assert_eq!(m[0].kind, "overlay");
        assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=")));
        let v = s.create(Kind::View, "v", "base", labels(&[])).unwrap();
        assert_eq!(
            (v[0].kind.as_str(), v[0].options[0].as_str()),
            ("bind", "ro")
        );
        s.commit("second", "b", labels(&[])).unwrap();
        let v2 = s.create(Kind::View, "v2", "second", labels(&[])).unwrap();
        assert_eq!(v2[0].kind, "overlay");
        assert_eq!(v2[0].options.len(), 1, "a view has no upper dir");

        // Errors, with the kinds containerd expects.
        assert!(matches!(
            s.create(Kind::Active, "b2", "nope", labels(&[])),
            Err(SnapshotError::NotFound(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "v", "", labels(&[])),
            Err(SnapshotError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "x", "v", labels(&[])),
            Err(SnapshotError::InvalidArgument(_))
        ));
        assert!(matches!(
            s.commit("c", "v", labels(&[])),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.commit("base", "x-missing", labels(&[])),
            Err(SnapshotError::NotFound(_))
        ));
        assert!(matches!(
            s.remove("base"),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.mounts("base"),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        s.remove("v").unwrap();
        s.remove("v2").unwrap();
        s.remove("second").unwrap();
        s.remove("base").unwrap();
        assert!(s.list(&[]).unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("snapshots"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn labels_update_by_field_path() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        s.create(Kind::Active, "a", "", labels(&[("x", "1"), ("y", "2")]))
            .unwrap();
        let before = s.stat("a").unwrap();
        let i = s
            .update(
                "a",
                labels(&[("x", "9")]),
                &["labels.x".into(), "labels.y".into()],
            )
            .unwrap();
        assert_eq!(i.labels, labels(&[("x", "9")]));
        assert!(i.updated >= before.updated);
        assert_eq!(i.created, before.created);
        let i = s.update("a", labels(&[("z", "3")]), &[]).unwrap();
        assert_eq!(i.labels, labels(&[("z", "3")]));
        assert!(matches!(
            s.update("a", labels(&[]), &["parent".into()]),
            Err(SnapshotError::InvalidArgument(_))
        ));
        assert!(matches!(
            s.update("nope", labels(&[]), &[]),
            Err(SnapshotError::NotFound(_))
        ));
    }

    #[test]
    fn state_survives_reopen_and_orphans_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Snapshots::open(dir.path()).unwrap();
            s.create(Kind::Active, "a", "", labels(&[("k", "v")]))
                .unwrap();
            s.commit("c", "a", labels(&[("k", "v")])).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("snapshots/999/fs")).unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        assert_eq!(s.stat("c").unwrap().labels, labels(&[("k", "v")]));
        assert!(
            !dir.path().join("snapshots/999").exists(),
            "orphan directory removed"
        );
        let listed = s.list(&["labels.k==v".into()]).unwrap();
        assert_eq!(listed.len(), 1);
    }
}
