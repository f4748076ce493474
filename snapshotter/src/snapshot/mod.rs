//! Snapshots with the semantics of containerd's overlayfs snapshotter, kept in a durable
//! metadata store. This is the domain core of beam-snapshotter: no gRPC types here (those live
//! in the daemon's grpc module); errors carry the kind that maps to a gRPC code.
//!
//! "The semantics of containerd's overlayfs snapshotter" is meant literally, down to what
//! containerd's snapshotter test suite checks and what its `snapshots/storage` and
//! `plugins/snapshots/overlay` code does: which error a request gets when several things are
//! wrong (the parent is checked before the key, the new name before the kind), that labels
//! with empty values are not kept, how usage is counted (the upper directory including itself;
//! a view has none), the directory modes (`fs` 0755, `work` 0711, whatever the umask), that a
//! new upper directory takes the owner of its parent's, and the mount options (`index=off` on
//! overlay mounts when the kernel has the parameter). `tests/tests/snapshots_api.rs` runs that
//! test suite case by case against the daemon.
//!
//! Layout under the root directory:
//!
//! ```text
//! metadata.redb          snapshot records (store.rs)
//! snapshots/<id>/fs      the snapshot's directory (upper dir of an active snapshot)
//! snapshots/<id>/work    overlayfs work dir (active snapshots)
//! ```
//!
//! Crash protocol: a snapshot's directories are created inside the metadata transaction that
//! records it, before the commit, so every record has its directories; a crash before the
//! commit leaves directories no record names, which [`Snapshots::cleanup`] (run at start and on
//! containerd's Cleanup) removes. Cleanup decides what to remove inside a write transaction, so
//! it never takes the directory of a snapshot being created. Removal commits first and deletes
//! directories after.

pub mod db;
pub mod filter;
mod re2;

use db::{SnapshotDb, SnapshotRecord};
use filter::{Fields, Filters};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// The metadata store could not read or write its file (a full or failing disk).
    #[error("{0}")]
    Io(String),
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

/// How long a reserved id (a lazy layer being mounted) is kept from cleanup while nothing is
/// mounted on it yet.
const RESERVATION_GRACE: Duration = Duration::from_secs(600);

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

/// containerd never stores a label with an empty value (`boltutil.WriteLabels` skips them), so
/// creating with one, or updating one to "", leaves the label unset.
fn without_empty(mut labels: BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels.retain(|_, v| !v.is_empty());
    labels
}

/// Create `p` (and missing parents) and give it exactly `mode`, whatever the umask.
fn mkdir_mode(p: &Path, mode: u32) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(p).map_err(|e| io_err("creating", p, e))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err("setting the mode of", p, e))
}

/// The snapshots of one beam-snapshotter root.
pub struct Snapshots {
    root: PathBuf,
    store: SnapshotDb,
    /// Ids handed out by [`Snapshots::reserve`] and not yet recorded, with when.
    reserved: Mutex<HashMap<u64, Instant>>,
    /// Options containerd's overlayfs snapshotter adds to every overlay mount.
    overlay_options: Vec<String>,
}

/// Before a new database is created beside snapshot directories a lost one described (the
/// file was deleted, or moved aside as the recovery from damage says): move `snapshots/` to
/// `snapshots.orphaned-SECS/` instead of letting cleanup delete directories no record names.
/// Containers running on them keep their mounts (a rename does not move a mount's dentries);
/// the operator removes the directory once none runs.
fn keep_orphans_aside(root: &Path) -> Result<(), SnapshotError> {
    let dir = root.join("snapshots");
    let has_any = std::fs::read_dir(&dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !has_any {
        return Ok(());
    }
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = root.join(format!("snapshots.orphaned-{secs}"));
    std::fs::rename(&dir, &aside).map_err(|e| io_err("moving aside", &dir, e))?;
    tracing::warn!(
        kept = %aside.display(),
        "no snapshot database: the snapshot directories it described were moved aside, not \
         deleted; remove them once no container uses them"
    );
    Ok(())
}

impl Snapshots {
    /// Open (or create) the snapshots under `root` and remove leftovers of interrupted work.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        let db_path = root.join("metadata.redb");
        let fresh = !db_path.exists();
        if fresh {
            keep_orphans_aside(root)?;
        }
        std::fs::create_dir_all(root.join("snapshots")).map_err(|e| io_err("creating", root, e))?;
        let store = SnapshotDb::open(&db_path)?;
        // As containerd's overlay snapshotter: no inode index when the kernel knows the option
        // (a layer is the lower dir of many overlays at once).
        let overlay_options = if Path::new("/sys/module/overlay/parameters/index").exists() {
            vec!["index=off".to_string()]
        } else {
            Vec::new()
        };
        let s = Snapshots {
            root: root.to_path_buf(),
            store,
            reserved: Mutex::new(HashMap::new()),
            overlay_options,
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

    /// Make the directories of snapshot `id`: `fs` (0755) and, for an active snapshot, `work`
    /// (0711). `fs` takes the owner of `owner_of` (the parent's directory), as containerd's
    /// overlay snapshotter does, so that the root of a container's overlay keeps the owner
    /// its image gave it.
    fn make_dirs(&self, id: u64, work: bool, owner_of: Option<&Path>) -> Result<(), SnapshotError> {
        let fs = self.fs_dir(id);
        mkdir_mode(&fs, 0o755)?;
        if work {
            mkdir_mode(&self.dir(id).join("work"), 0o711)?;
        }
        if let Some(parent) = owner_of {
            let m = std::fs::metadata(parent).map_err(|e| io_err("stat parent", parent, e))?;
            std::os::unix::fs::lchown(&fs, Some(m.uid()), Some(m.gid()))
                .map_err(|e| io_err("chown", &fs, e))?;
        }
        Ok(())
    }

    /// Remove snapshot directories that no record names (and no lazy layer being mounted has
    /// reserved). What to remove is decided inside a write transaction: a snapshot's record and
    /// its directory appear in one transaction, so a concurrent create is never taken.
    pub fn cleanup(&self) -> Result<usize, SnapshotError> {
        let dir = self.root.join("snapshots");
        let doomed: Vec<(PathBuf, bool)> = self.store.update(|tx| {
            let known = tx.ids()?;
            let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
            let mut out = Vec::new();
            for e in std::fs::read_dir(&dir).map_err(|e| io_err("reading", &dir, e))? {
                let e = e.map_err(|e| io_err("reading", &dir, e))?;
                let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
                if id.is_some_and(|id| known.contains(&id)) {
                    continue;
                }
                let p = e.path();
                let mounted = is_mountpoint(&p.join("fs"));
                if let Some(id) = id {
                    if let Some(since) = reserved.get(&id) {
                        if mounted || since.elapsed() < RESERVATION_GRACE {
                            continue;
                        }
                        reserved.remove(&id);
                    }
                }
                out.push((p, mounted));
            }
            Ok(out)
        })?;
        let mut removed = 0;
        for (p, mounted) in doomed {
            if mounted {
                // A lazy layer a dead daemon had mounted for a snapshot never recorded.
                if let Err(e) = nix::mount::umount2(&p.join("fs"), nix::mount::MntFlags::MNT_DETACH)
                {
                    tracing::warn!(dir = %p.display(), "unknown snapshot directory is mounted: {e}");
                    continue;
                }
            }
            match std::fs::remove_dir_all(&p) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &p, e)),
            }
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
        let labels = without_empty(labels);
        let now = nanos(SystemTime::now());
        let (rec, lowers) = self.store.update(|tx| {
            // containerd's order: the parent first (NotFound, InvalidArgument), then the key.
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
            if tx.get(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key.to_string()));
            }
            // A parent chain that cannot be mounted (a lazy layer that is not) fails the
            // request before anything is recorded, so that it can be retried.
            let lowers = self.lower_dirs(|n| tx.get(n), parent)?;
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
            if let Err(e) = self.make_dirs(
                id,
                kind == Kind::Active,
                lowers.first().map(PathBuf::as_path),
            ) {
                let _ = std::fs::remove_dir_all(self.dir(id));
                return Err(e);
            }
            crate::crash::point("prepare.dirs-made");
            tx.put(&rec)?;
            Ok((rec, lowers))
        })?;
        crate::crash::point("prepare.recorded");
        self.mounts_with(&rec, &lowers)
    }

    /// Reserve a snapshot id and its empty directory (for a remote layer to be mounted on
    /// before [`Snapshots::commit_remote`] records it). Cleanup leaves it alone while a layer
    /// is mounted on it or for [`RESERVATION_GRACE`]; [`Snapshots::release`] gives it up.
    pub fn reserve(&self) -> Result<(u64, PathBuf), SnapshotError> {
        let id = self.store.update(|tx| {
            let id = tx.next_id()?;
            // Inside the transaction, so that cleanup sees the directory only as reserved.
            self.make_dirs(id, true, None)?;
            self.reserved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, Instant::now());
            Ok(id)
        })?;
        Ok((id, self.fs_dir(id)))
    }

    /// Give up reserved id `id` (nothing mounted on it any more) and remove its directory.
    pub fn release(&self, id: u64) {
        let was_reserved = self
            .reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
            .is_some();
        if was_reserved {
            self.remove_dir(id);
        }
    }

    /// Record reserved snapshot `id` (its layer mounted lazily at its `fs` dir) as the
    /// committed snapshot `name`. The reservation ends either way: on an error the caller
    /// unmounts and the directory goes with the next cleanup.
    pub fn commit_remote(
        &self,
        id: u64,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: db::LazyLayer,
    ) -> Result<(), SnapshotError> {
        let labels = without_empty(labels);
        let now = nanos(SystemTime::now());
        let r = self.store.update(|tx| {
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
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_string()));
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
        });
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        r
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
        let lowers = self.lower_dirs(|n| self.store.get(n), &rec.parent)?;
        self.mounts_with(&rec, &lowers)
    }

    /// Directories of the parent chain, nearest first, looked up with `get`.
    fn lower_dirs(
        &self,
        get: impl Fn(&str) -> Result<Option<SnapshotRecord>, SnapshotError>,
        parent: &str,
    ) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut out = Vec::new();
        let mut p = parent.to_string();
        while !p.is_empty() {
            let r = get(&p)?.ok_or_else(|| SnapshotError::NotFound(p.clone()))?;
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

    /// The mounts of `rec` over the parent directories `lowers` (containerd's overlay
    /// `mounts`): a bind mount without parents, a read-only bind mount of the parent for a view
    /// of one, else overlay.
    fn mounts_with(
        &self,
        rec: &SnapshotRecord,
        lowers: &[PathBuf],
    ) -> Result<Vec<Mount>, SnapshotError> {
        let fs = self.fs_dir(rec.id).display().to_string();
        let bind = |source: String, ro: bool| Mount {
            kind: "bind".into(),
            source,
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let lowerdir = format!(
            "lowerdir={}",
            lowers
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        );
        let overlay = |mut options: Vec<String>| {
            options.push(lowerdir.clone());
            options.extend(self.overlay_options.iter().cloned());
            Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options,
            }
        };
        Ok(match (rec.kind, lowers.len()) {
            (Kind::Active, 0) => vec![bind(fs, false)],
            (Kind::View, 0) => vec![bind(fs, true)],
            (Kind::View, 1) => vec![bind(lowers[0].display().to_string(), true)],
            (Kind::View, _) => vec![overlay(Vec::new())],
            (Kind::Active, _) => vec![overlay(vec![
                format!("workdir={}", self.dir(rec.id).join("work").display()),
                format!("upperdir={fs}"),
            ])],
            (Kind::Committed, _) => {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {} is committed: it has no mounts",
                    rec.name
                )))
            }
        })
    }

    /// Commit active snapshot `key` as `name`. Errors in containerd's order: the key
    /// (NotFound), the name (AlreadyExists), then the key's kind (FailedPrecondition).
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
        let labels = without_empty(labels);
        let now = nanos(SystemTime::now());
        self.store.update(|tx| {
            let Some(current) = tx.get(key)? else {
                return Err(SnapshotError::NotFound(key.to_string()));
            };
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_string()));
            }
            if current.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            // Measured inside the transaction, as containerd does: nothing can change the
            // snapshot between the measurement and the record.
            let usage = disk_usage(&self.fs_dir(current.id));
            crate::crash::point("commit.measured");
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
        })?;
        crate::crash::point("commit.recorded");
        Ok(())
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
        self.store
            .update(|tx| {
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
            .inspect(|_| crate::crash::point("remove.forgotten"))
    }

    /// Delete the directory of a forgotten snapshot.
    pub fn remove_dir(&self, id: u64) {
        let dir = self.dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            // The record is gone; cleanup removes the directory later.
            tracing::warn!(dir = %dir.display(), "removing snapshot directory: {e}");
        }
        crate::crash::point("remove.dir-deleted");
    }

    /// Update labels: with no field paths (or `labels`) all labels are replaced; `labels.KEY`
    /// sets or (when absent from `labels`) deletes one label; a label set to "" is deleted.
    /// Other fields cannot change (InvalidArgument, and nothing changes).
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
                if let Some(k) = path.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => {
                            rec.labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            rec.labels.remove(k);
                        }
                    }
                } else if path == "labels" {
                    rec.labels = labels.clone();
                } else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update {path:?} field on snapshot {name:?}"
                    )));
                }
            }
            rec.labels = without_empty(std::mem::take(&mut rec.labels));
            rec.updated = now;
            tx.put(&rec)?;
            Ok(rec)
        })?;
        Ok(info_of(&rec))
    }

    /// Usage of one snapshot: measured for an active one (its upper directory), recorded at
    /// commit for a committed one, none for a view (containerd's overlay `Usage`).
    pub fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        Ok(match rec.kind {
            Kind::Active => disk_usage(&self.fs_dir(rec.id)),
            Kind::Committed | Kind::View => Usage {
                size: rec.usage.0,
                inodes: rec.usage.1,
            },
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

/// containerd's `fs.DiskUsage` (continuity): every inode under `dir`, `dir` itself included,
/// counted once (hard links), with its allocated blocks; symlinks are not followed.
fn disk_usage(dir: &Path) -> Usage {
    let mut u = Usage::default();
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return u;
    };
    let mut seen = HashSet::new();
    let mut stack = vec![(dir.to_path_buf(), top)];
    while let Some((p, m)) = stack.pop() {
        if seen.insert((m.dev(), m.ino())) {
            u.inodes += 1;
            u.size += (m.blocks() * 512) as i64;
        }
        if m.is_dir() {
            let Ok(rd) = std::fs::read_dir(&p) else {
                continue;
            };
            for e in rd.flatten() {
                if let Ok(cm) = e.metadata() {
                    stack.push((e.path(), cm));
                }
            }
        }
    }
    u
}

/// Whether `p` is a mountpoint (per /proc/self/mountinfo).
pub use crate::mountinfo::is_mountpoint;

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
        assert!(
            v2[0].options[0].starts_with("lowerdir=")
                && !v2[0]
                    .options
                    .iter()
                    .any(|o| o.starts_with("upperdir=") || o.starts_with("workdir=")),
            "a view has no upper dir: {:?}",
            v2[0].options
        );
        assert_eq!(
            &v2[0].options[1..],
            &s.overlay_options[..],
            "containerd's overlay options follow lowerdir"
        );

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

    /// When several things are wrong, the error is the one containerd's storage reports.
    #[test]
    fn errors_come_in_containerds_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        s.create(Kind::Active, "a", "", labels(&[])).unwrap();
        s.commit("c", "a", labels(&[])).unwrap();
        s.create(Kind::View, "v", "c", labels(&[])).unwrap();
        s.create(Kind::Active, "b", "c", labels(&[])).unwrap();
        // Create: the parent before the key.
        assert!(matches!(
            s.create(Kind::Active, "b", "missing", labels(&[])),
            Err(SnapshotError::NotFound(p)) if p == "missing"
        ));
        assert!(matches!(
            s.create(Kind::View, "v", "b", labels(&[])),
            Err(SnapshotError::InvalidArgument(_))
        ));
        // Commit: the key, then the name, then the kind.
        assert!(matches!(
            s.commit("c", "missing", labels(&[])),
            Err(SnapshotError::NotFound(k)) if k == "missing"
        ));
        assert!(matches!(
            s.commit("c", "v", labels(&[])),
            Err(SnapshotError::AlreadyExists(n)) if n == "c"
        ));
        assert!(matches!(
            s.commit("b", "b", labels(&[])),
            Err(SnapshotError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.commit("c2", "v", labels(&[])),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.commit("c2", "c", labels(&[])),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        // Nothing of the failed requests stayed behind.
        let names: HashSet<String> = s.list(&[]).unwrap().into_iter().map(|i| i.name).collect();
        let want: HashSet<String> = ["c", "v", "b"].iter().map(|n| n.to_string()).collect();
        assert_eq!(names, want);
    }

    #[test]
    fn labels_with_empty_values_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        s.create(Kind::Active, "a", "", labels(&[("x", "1"), ("e", "")]))
            .unwrap();
        assert_eq!(s.stat("a").unwrap().labels, labels(&[("x", "1")]));
        let i = s
            .update("a", labels(&[("x", ""), ("y", "2")]), &["labels".into()])
            .unwrap();
        assert_eq!(i.labels, labels(&[("y", "2")]));
        assert_eq!(s.stat("a").unwrap().labels, i.labels);
        let i = s
            .update("a", labels(&[("y", "")]), &["labels.y".into()])
            .unwrap();
        assert!(i.labels.is_empty(), "{:?}", i.labels);
        s.commit("c", "a", labels(&[("k", ""), ("l", "v")]))
            .unwrap();
        assert_eq!(s.stat("c").unwrap().labels, labels(&[("l", "v")]));
        // A failed update changes nothing, not even labels before the bad path.
        let before = s.stat("c").unwrap();
        assert!(matches!(
            s.update(
                "c",
                labels(&[("l", "w")]),
                &["labels.l".into(), "kind".into()]
            ),
            Err(SnapshotError::InvalidArgument(_))
        ));
        assert_eq!(s.stat("c").unwrap(), before);
    }

    /// containerd's `fs.DiskUsage`: the upper directory itself counts, hard links once; a view
    /// has no usage; a committed snapshot keeps what commit measured.
    #[test]
    fn usage_counts_like_containerd() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        let m = s.create(Kind::Active, "a", "", labels(&[])).unwrap();
        let fs = PathBuf::from(&m[0].source);
        let root_blocks = std::fs::metadata(&fs).unwrap().blocks() as i64 * 512;
        assert_eq!(
            s.usage("a").unwrap(),
            Usage {
                inodes: 1,
                size: root_blocks
            }
        );
        std::fs::write(fs.join("f"), vec![1u8; 64 << 10]).unwrap();
        std::fs::hard_link(fs.join("f"), fs.join("g")).unwrap();
        std::fs::create_dir(fs.join("d")).unwrap();
        let u = s.usage("a").unwrap();
        assert_eq!(u.inodes, 3, "root, f (= g), d");
        assert!(u.size >= root_blocks + (64 << 10), "{u:?}");
        s.commit("c", "a", labels(&[])).unwrap();
        assert_eq!(s.usage("c").unwrap(), u);
        s.create(Kind::View, "v", "c", labels(&[])).unwrap();
        assert_eq!(s.usage("v").unwrap(), Usage::default());
        assert!(matches!(s.usage("x"), Err(SnapshotError::NotFound(_))));
    }

    #[test]
    fn directory_modes_do_not_depend_on_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        s.create(Kind::Active, "a", "", labels(&[])).unwrap();
        let id = s.record("a").unwrap().unwrap().id;
        // Whatever the process umask, the modes are containerd's.
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(s.fs_path(id)), 0o755);
        assert_eq!(mode(s.dir(id).join("work")), 0o711);
    }

    /// A parent chain that cannot be mounted (an unmounted lazy layer) fails Prepare before
    /// anything is recorded, so that the same key can be prepared again.
    #[test]
    fn unmountable_parent_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        let (id, _fs) = s.reserve().unwrap();
        let remote = db::LazyLayer {
            image: "r/i:t".into(),
            manifest: "sha256:m".into(),
            layer: "sha256:l".into(),
            transport: None,
        };
        s.commit_remote(id, "lazy", "", labels(&[]), remote)
            .unwrap();
        assert!(matches!(
            s.create(Kind::Active, "k", "lazy", labels(&[])),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        assert!(matches!(s.stat("k"), Err(SnapshotError::NotFound(_))));
        assert_eq!(
            std::fs::read_dir(dir.path().join("snapshots"))
                .unwrap()
                .count(),
            1,
            "no directory for the failed prepare"
        );
    }

    /// Cleanup keeps what records name and what a lazy mount has reserved; released
    /// reservations and unknown directories go.
    #[test]
    fn cleanup_keeps_records_and_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshots::open(dir.path()).unwrap();
        s.create(Kind::Active, "a", "", labels(&[])).unwrap();
        let (kept, _) = s.reserve().unwrap();
        let (released, _) = s.reserve().unwrap();
        std::fs::create_dir_all(dir.path().join("snapshots/999/fs")).unwrap();
        std::fs::create_dir_all(dir.path().join("snapshots/not-an-id")).unwrap();
        s.release(released);
        assert!(!s.dir(released).exists(), "release removes the directory");
        assert_eq!(s.cleanup().unwrap(), 2);
        assert!(s.dir(kept).exists(), "a reservation survives cleanup");
        assert!(s.dir(s.record("a").unwrap().unwrap().id).exists());
        // Once the reservation is recorded or given up it is ordinary.
        s.release(kept);
        assert!(!s.dir(kept).exists());
        assert_eq!(s.cleanup().unwrap(), 0);
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
