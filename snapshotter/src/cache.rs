//! The local chunk cache: verified, uncompressed chunks on local disk, addressed by digest and
//! shared by every layer and image on the node.
//!
//! Layout under the cache directory:
//!
//! ```text
//! chunks/ab/abcdef…   one file per chunk, named by the sha256 of its bytes
//! files/12/1234…      whole files assembled from cached chunks (FUSE passthrough backing)
//! indexes/sha256-…    Beam index blobs, so a restarted daemon needs no network for metadata
//! tmp/                writes in progress where the filesystem has no O_TMPFILE; emptied on
//!                     open
//! ```
//!
//! Invariants:
//! - an assembled file or index appears under its name only by a link of a fully written and
//!   fsynced unnamed file (`O_TMPFILE`; else a temp file's rename), and the directory is
//!   fsynced after it, so neither a torn write nor a power loss leaves a short file under its
//!   name; never by a rename from another directory (see `write_via_temp`: it deadlocks with
//!   overlayfs' copy-up);
//! - a chunk appears under its digest only by a link of a fully written unnamed file, not
//!   fsynced: chunks are many and small (a python image has tens of thousands), two fsyncs each
//!   made storing them the bottleneck of background fill, and the digest check below already
//!   catches what a power loss could leave (a short or empty chunk file is deleted and fetched
//!   again);
//! - bytes are served from a chunk file only after this process has checked that file's
//!   digest once (a crash after rename but before the data reached the disk, or a damaged
//!   disk, is caught: the file is deleted and the chunk fetched again);
//! - the same holds for assembled files: one is used only once this process has checked its
//!   length and its chunks' digests (`crate::fs` does the check; this module remembers it);
//! - what this process believes is cached is a hint, never the truth: a chunk file found
//!   missing (deleted from outside, by a prune, with the whole cache directory) is forgotten and
//!   reported missing so that it is fetched again, and a missing directory is made anew by the
//!   next write;
//! - eviction removes the least recently written chunks that no mounted layer pins, until the
//!   cache is under its budget. Assembled files count against the budget by the disk space they
//!   take (a sparse file by its data, not its length) and are evicted first.

use crate::format::chunk::ChunkDigest;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters shown by `beam cache stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub indexes: u64,
    pub index_bytes: u64,
}

impl CacheStats {
    pub fn total_bytes(&self) -> u64 {
        self.chunk_bytes + self.file_bytes + self.index_bytes
    }
}

/// What a prune removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub removed_chunks: u64,
    pub removed_files: u64,
    pub freed_bytes: u64,
}

/// The chunk cache of one node.
pub struct ChunkCache {
    dir: PathBuf,
    /// Size budget in bytes (chunks + assembled files); 0 = unlimited.
    budget: u64,
    used: AtomicU64,
    tmp_seq: AtomicU64,
    /// Chunks whose file this process has verified.
    verified: Mutex<HashSet<ChunkDigest>>,
    /// Assembled files (by key) this process has verified or written.
    verified_files: Mutex<HashSet<String>>,
    /// Pins by holder (a mounted layer): chunks eviction must keep.
    pins: Mutex<HashMap<String, Arc<HashSet<ChunkDigest>>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Recently opened chunk files, so that reads served by the daemon need no open(2) each.
    open_files: Mutex<HashMap<ChunkDigest, Arc<File>>>,
    /// Bytes in use after the last eviction that could not get under the budget because pins
    /// hold the rest (0: none such). Until a tenth of the budget more is written or the pins
    /// change, eviction is not tried again: it would walk the whole cache directory on every
    /// store and free nothing (issue 15).
    prune_floor: AtomicU64,
    /// Evictions run (each walks the cache directory).
    pub prunes: AtomicU64,
}

/// Most chunk files kept open.
const MAX_OPEN_FILES: usize = 256;

fn hex2(d: &str) -> &str {
    &d[..2]
}

/// Disk space a file takes (a sparse file's holes take none).
fn disk_bytes(m: &fs::Metadata) -> u64 {
    m.blocks() * 512
}

/// The entries of `dir`; none when it is gone (deleted from outside: the next write makes it).
fn read_dir_or_empty(dir: &Path) -> io::Result<Box<dyn Iterator<Item = io::Result<fs::DirEntry>>>> {
    match fs::read_dir(dir) {
        Ok(r) => Ok(Box::new(r)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Box::new(std::iter::empty())),
        Err(e) => Err(e),
    }
}

impl ChunkCache {
    /// Open (or create) the cache at `dir` with a byte budget (0 = unlimited).
    pub fn open(dir: &Path, budget: u64) -> io::Result<Self> {
        for sub in ["chunks", "files", "indexes", "tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        // Writes that were in progress when a process died. Temp names start with the
        // writer's pid; another live process (a running `beam mount` while `beam cache stats`
        // runs) keeps its own.
        for e in fs::read_dir(dir.join("tmp"))? {
            let e = e?;
            let pid = e
                .file_name()
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            let alive = pid.is_some_and(|p| {
                p != std::process::id() as i32
                    && nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
            });
            if !alive {
                let _ = fs::remove_file(e.path());
            }
        }
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            budget,
            used: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            verified: Mutex::new(HashSet::new()),
            verified_files: Mutex::new(HashSet::new()),
            pins: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            open_files: Mutex::new(HashMap::new()),
            prune_floor: AtomicU64::new(0),
            prunes: AtomicU64::new(0),
        };
        let s = cache.stats()?;
        cache
            .used
            .store(s.chunk_bytes + s.file_bytes, Ordering::Relaxed);
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a chunk's file.
    pub fn chunk_path(&self, d: &ChunkDigest) -> PathBuf {
        let h = d.to_hex();
        self.dir.join("chunks").join(hex2(&h)).join(&h)
    }

    /// Path of an assembled file named by `key` (hex).
    pub fn file_path(&self, key: &str) -> PathBuf {
        self.dir.join("files").join(hex2(key)).join(key)
    }

    /// Path of a cached index blob.
    pub fn index_path(&self, digest: &str) -> PathBuf {
        self.dir.join("indexes").join(digest.replacen(':', "-", 1))
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// Atomically write `data` to `dest` (temp file + rename).
    pub fn write_atomic(&self, dest: &Path, data: &[u8]) -> io::Result<()> {
        self.write_atomic_with(dest, |f| f.write_all(data))
    }

    /// Atomically write `dest` with what `fill` writes into a fresh temp file: fsynced before
    /// the rename, the directory fsynced after it, so that after a power loss `dest` is either
    /// absent or whole. A missing `tmp/` or destination directory (deleted from outside) is
    /// made anew.
    pub fn write_atomic_with(
        &self,
        dest: &Path,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<()> {
        self.write_via_temp(dest, fill, true)
    }

    /// Write `dest` through a fresh temp file and a rename, without fsync (chunks only: their
    /// digest is checked before their first use, see the module's invariants).
    fn write_renamed(&self, dest: &Path, data: &[u8]) -> io::Result<()> {
        self.write_via_temp(dest, |f| f.write_all(data), false)
    }

    /// Write `dest` with what `fill` writes into a fresh, unnamed file in `dest`'s directory
    /// (`O_TMPFILE`), then link it under its name; `durable`: fsync the file before the link
    /// and its directory after it. Nothing is left behind on failure or a crash.
    ///
    /// Never a rename from another directory: overlayfs holds the filesystem's rename lock
    /// during a copy-up while it asks this daemon's FUSE mounts for a file's attributes, and
    /// a rename between two directories waits for that lock. A FUSE thread storing a file that
    /// way on the filesystem of containerd's snapshots (the default) deadlocked with the
    /// container it served (ten python containers started at once hung in `D` state). A link
    /// locks only the destination directory. Where the filesystem has no `O_TMPFILE`, the
    /// temp file goes to `tmp/` and is renamed, as before.
    fn write_via_temp(
        &self,
        dest: &Path,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
        durable: bool,
    ) -> io::Result<()> {
        let parent = dest.parent().expect("cache paths have a parent");
        let unnamed = match open_unnamed(parent) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(parent)?;
                open_unnamed(parent)
            }
            r => r,
        };
        match unnamed {
            Ok(mut f) => {
                fill(&mut f)?;
                if durable {
                    f.sync_all()?;
                }
                link_unnamed(&f, dest)?;
                if durable {
                    File::open(parent)?.sync_all()?;
                }
                Ok(())
            }
            Err(e) if no_tmpfile(&e) => self.write_renamed_from_tmp(dest, fill, durable),
            Err(e) => Err(e),
        }
    }

    /// [`Self::write_via_temp`] on a filesystem without `O_TMPFILE`: a named temp file in
    /// `tmp/`, renamed into place; removed on failure.
    fn write_renamed_from_tmp(
        &self,
        dest: &Path,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
        durable: bool,
    ) -> io::Result<()> {
        let tmp = self.tmp_path();
        let parent = dest.parent().expect("cache paths have a parent");
        let result = (|| {
            let mut f = match File::create(&tmp) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %self.dir.display(), "cache tmp/ is gone; making it anew");
                    fs::create_dir_all(tmp.parent().expect("tmp path has a parent"))?;
                    File::create(&tmp)?
                }
                r => r?,
            };
            fill(&mut f)?;
            if durable {
                f.sync_all()?;
            }
            drop(f);
            // The destination directory is made only when the rename says it is missing.
            if let Err(e) = fs::rename(&tmp, dest) {
                if e.kind() != io::ErrorKind::NotFound {
                    return Err(e);
                }
                fs::create_dir_all(parent)?;
                fs::rename(&tmp, dest)?;
            }
            if durable {
                File::open(parent)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Store an assembled file under `key`: written by `fill` into a temp file (see
    /// [`Self::write_atomic_with`]), counted against the budget by the disk space it takes,
    /// and opened for reading. The budget is enforced after the open, so the file returned
    /// stays readable even when it is evicted at once.
    pub fn put_file(
        &self,
        key: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<File> {
        let path = self.file_path(key);
        self.write_atomic_with(&path, fill)?;
        let f = File::open(&path)?;
        self.used
            .fetch_add(disk_bytes(&f.metadata()?), Ordering::Relaxed);
        self.verified_files
            .lock()
            .expect("cache lock")
            .insert(key.to_string());
        if let Err(e) = self.enforce_budget() {
            tracing::warn!("evicting over the cache budget: {e}");
        }
        Ok(f)
    }

    /// Whether this process has verified (or written) the assembled file `key`.
    pub fn file_verified(&self, key: &str) -> bool {
        self.verified_files
            .lock()
            .expect("cache lock")
            .contains(key)
    }

    /// Note that the assembled file `key` passed its check.
    pub fn mark_file_verified(&self, key: &str) {
        self.verified_files
            .lock()
            .expect("cache lock")
            .insert(key.to_string());
    }

    /// Delete the assembled file `key` (found damaged): the next use builds it anew.
    pub fn discard_file(&self, key: &str) {
        self.verified_files.lock().expect("cache lock").remove(key);
        let path = self.file_path(key);
        if let Ok(m) = fs::metadata(&path) {
            if fs::remove_file(&path).is_ok() {
                let _ = self
                    .used
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                        Some(u.saturating_sub(disk_bytes(&m)))
                    });
            }
        }
    }

    /// Forget a chunk this process believed cached whose file is gone.
    fn forget_chunk(&self, d: &ChunkDigest) {
        self.verified.lock().expect("cache lock").remove(d);
        self.open_files.lock().expect("cache lock").remove(d);
    }

    /// Whether a chunk is in the cache (not yet verified).
    pub fn contains(&self, d: &ChunkDigest) -> bool {
        self.verified.lock().expect("cache lock").contains(d) || self.chunk_path(d).exists()
    }

    /// Store a chunk whose bytes the caller has verified against `d`.
    pub fn put(&self, d: &ChunkDigest, data: &[u8]) -> io::Result<()> {
        let path = self.chunk_path(d);
        if !path.exists() {
            self.write_renamed(&path, data)?;
            self.used.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        self.verified.lock().expect("cache lock").insert(*d);
        Ok(())
    }

    /// Open a cached chunk, checking its digest the first time this process uses it. A chunk
    /// that fails the check is deleted and reported missing.
    pub fn open_chunk(&self, d: &ChunkDigest, len: usize) -> io::Result<Option<Arc<File>>> {
        let cached = self.open_files.lock().expect("cache lock").get(d).cloned();
        if let Some(f) = cached {
            check_claim(d, f.metadata()?.len(), len)?;
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(f));
        }
        let path = self.chunk_path(d);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Deleted from outside (or never here): a miss, fetched again.
                self.forget_chunk(d);
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let actual = f.metadata()?.len();
        if !self.verified.lock().expect("cache lock").contains(d) {
            // Checked against its own digest at its own length: the caller's claimed length
            // decides nothing (a hostile index claiming another length for a good chunk must
            // not get it deleted).
            let ok = actual <= crate::format::MAX_CHUNK_SIZE as u64 && {
                let mut buf = vec![0u8; actual as usize];
                f.read_exact_at(&mut buf, 0).is_ok() && ChunkDigest::of(&buf) == *d
            };
            if !ok {
                tracing::warn!(chunk = %d, "cached chunk is damaged; discarding it");
                let _ = fs::remove_file(&path);
                self.forget_chunk(d);
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            self.verified.lock().expect("cache lock").insert(*d);
        }
        check_claim(d, actual, len)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        let f = Arc::new(f);
        let mut open = self.open_files.lock().expect("cache lock");
        if open.len() >= MAX_OPEN_FILES {
            open.clear();
        }
        open.insert(*d, f.clone());
        Ok(Some(f))
    }

    /// Read a whole cached chunk (verified), or `None` when it is not cached.
    pub fn read_chunk(&self, d: &ChunkDigest, len: usize) -> io::Result<Option<Vec<u8>>> {
        let Some(f) = self.open_chunk(d, len)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, 0)?;
        Ok(Some(buf))
    }

    /// Cache hit and miss counts since open.
    pub fn hit_miss(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Keep `chunks` from eviction while `holder` (a mounted layer) needs them.
    pub fn pin(&self, holder: &str, chunks: HashSet<ChunkDigest>) {
        self.pins
            .lock()
            .expect("pins lock")
            .insert(holder.to_string(), Arc::new(chunks));
    }

    /// Drop `holder`'s pins; what they kept beyond the budget is evicted now, not at the
    /// next fetch (an image removed from a node gives its disk space back at once).
    pub fn unpin(&self, holder: &str) {
        self.pins.lock().expect("pins lock").remove(holder);
        self.prune_floor.store(0, Ordering::Relaxed);
        if let Err(e) = self.enforce_budget() {
            tracing::warn!("evicting chunks over the cache budget: {e}");
        }
    }

    fn pinned(&self) -> HashSet<ChunkDigest> {
        let pins = self.pins.lock().expect("pins lock");
        pins.values().flat_map(|s| s.iter().copied()).collect()
    }

    /// Whether the cache has a budget and would use 90% of it or more with `extra` bytes more:
    /// background fill stops there.
    pub fn near_budget(&self, extra: u64) -> bool {
        self.budget > 0 && self.used().saturating_add(extra) >= self.budget / 10 * 9
    }

    /// Bytes used by chunks and assembled files (as tracked since open).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Evict if over budget. Cheap when under it, and when pins hold more than the budget
    /// and little was written since the last try.
    pub fn enforce_budget(&self) -> io::Result<PruneStats> {
        let used = self.used();
        if self.budget == 0 || used <= self.budget {
            return Ok(PruneStats::default());
        }
        let floor = self.prune_floor.load(Ordering::Relaxed);
        if floor > 0 && used < floor + self.budget / 10 {
            return Ok(PruneStats::default());
        }
        let target = self.budget * 9 / 10;
        let stats = self.prune(target)?;
        let after = self.used();
        self.prune_floor
            .store(if after > target { after } else { 0 }, Ordering::Relaxed);
        Ok(stats)
    }

    /// Remove unpinned chunks and assembled files, oldest first, until at most `target` bytes
    /// are used (`0` removes every unpinned entry).
    pub fn prune(&self, target: u64) -> io::Result<PruneStats> {
        self.prunes.fetch_add(1, Ordering::Relaxed);
        let pinned = self.pinned();
        let mut entries: Vec<(std::time::SystemTime, u64, PathBuf, bool)> = Vec::new();
        for (sub, is_chunk) in [("chunks", true), ("files", false)] {
            for shard in read_dir_or_empty(&self.dir.join(sub))? {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                for e in read_dir_or_empty(&shard.path())? {
                    let e = e?;
                    let m = match e.metadata() {
                        Ok(m) => m,
                        // Removed meanwhile (another prune, a reader's discard).
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    };
                    if is_chunk {
                        let name = e.file_name();
                        let digest = name
                            .to_str()
                            .and_then(|h| hex::decode(h).ok())
                            .and_then(|b| <[u8; 32]>::try_from(b).ok())
                            .map(ChunkDigest);
                        if digest.is_some_and(|d| pinned.contains(&d)) {
                            continue;
                        }
                    }
                    let len = if is_chunk { m.len() } else { disk_bytes(&m) };
                    entries.push((m.modified()?, len, e.path(), is_chunk));
                }
            }
        }
        // Assembled files first (they can be rebuilt from chunks), then oldest.
        entries.sort_by_key(|(t, _, _, is_chunk)| (*is_chunk, *t));
        let mut stats = PruneStats::default();
        let mut used = self.stats()?;
        let mut total = used.chunk_bytes + used.file_bytes;
        for (_, len, path, is_chunk) in entries {
            if total <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                self.open_files.lock().expect("cache lock").clear();
                total = total.saturating_sub(len);
                stats.freed_bytes += len;
                if is_chunk {
                    stats.removed_chunks += 1;
                    if let Some(d) = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|h| hex::decode(h).ok())
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    {
                        self.verified
                            .lock()
                            .expect("cache lock")
                            .remove(&ChunkDigest(d));
                    }
                } else {
                    stats.removed_files += 1;
                    if let Some(key) = path.file_name().and_then(|n| n.to_str()) {
                        self.verified_files.lock().expect("cache lock").remove(key);
                    }
                }
            }
        }
        used = self.stats()?;
        self.used
            .store(used.chunk_bytes + used.file_bytes, Ordering::Relaxed);
        Ok(stats)
    }

    /// Walk the cache and count what is in it.
    pub fn stats(&self) -> io::Result<CacheStats> {
        let mut s = CacheStats::default();
        for sub in ["chunks", "files"] {
            for shard in read_dir_or_empty(&self.dir.join(sub))? {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                for e in read_dir_or_empty(&shard.path())? {
                    let m = match e?.metadata() {
                        Ok(m) => m,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    };
                    if sub == "chunks" {
                        s.chunks += 1;
                        s.chunk_bytes += m.len();
                    } else {
                        s.files += 1;
                        s.file_bytes += disk_bytes(&m);
                    }
                }
            }
        }
        for e in read_dir_or_empty(&self.dir.join("indexes"))? {
            let Ok(m) = e?.metadata() else { continue };
            s.indexes += 1;
            s.index_bytes += m.len();
        }
        Ok(s)
    }
}

/// A new file in `dir` without a name (`O_TMPFILE`), for writing.
fn open_unnamed(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .read(true)
        .mode(0o644)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// Whether opening an unnamed file failed because the filesystem (or kernel) has none.
fn no_tmpfile(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
    )
}

/// Give the unnamed file `f` the name `dest` (replacing a file of that name: the same
/// content, written by another writer, or a damaged copy being rewritten).
fn link_unnamed(f: &File, dest: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let me = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    let link = || {
        nix::unistd::linkat(
            None,
            me.as_path(),
            None,
            dest,
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        )
    };
    match link() {
        Err(nix::errno::Errno::EEXIST) => {
            match fs::remove_file(dest) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            match link() {
                // Another writer linked it meanwhile: the same content.
                Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        r => r.map_err(io::Error::from),
    }
}

/// A verified chunk is `actual` bytes; an index that says otherwise is wrong (the digest fixes
/// the length), and its reader gets an error while the chunk stays.
fn check_claim(d: &ChunkDigest, actual: u64, claimed: usize) -> io::Result<()> {
    if actual != claimed as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("chunk {d} is {actual} bytes, but the index says {claimed}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 0).unwrap();
        let data = b"hello chunk".to_vec();
        let d = ChunkDigest::of(&data);
        assert!(c.read_chunk(&d, data.len()).unwrap().is_none());
        c.put(&d, &data).unwrap();
        assert_eq!(c.read_chunk(&d, data.len()).unwrap().unwrap(), data);
        // A new process (new cache object) must verify before serving.
        std::fs::write(c.chunk_path(&d), b"hello chunK").unwrap();
        let c2 = ChunkCache::open(dir.path(), 0).unwrap();
        assert!(c2.read_chunk(&d, data.len()).unwrap().is_none());
        assert!(!c2.chunk_path(&d).exists(), "damaged chunk is removed");
    }

    /// What a power loss can leave of a chunk that was not fsynced (an empty file, a short one,
    /// one of the right length with zeros) is found by the next process before it serves a byte.
    #[test]
    fn an_unsynced_chunk_cut_by_a_power_loss_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 0).unwrap();
        let data = vec![7u8; 10_000];
        let d = ChunkDigest::of(&data);
        for damaged in [Vec::new(), data[..4096].to_vec(), vec![0u8; data.len()]] {
            c.put(&d, &data).unwrap();
            std::fs::write(c.chunk_path(&d), &damaged).unwrap();
            let after = ChunkCache::open(dir.path(), 0).unwrap();
            assert!(after.read_chunk(&d, data.len()).unwrap().is_none());
            assert!(!after.chunk_path(&d).exists(), "a damaged chunk is removed");
            c.forget_chunk(&d);
        }
    }

    /// Files appear by a link of an unnamed file in their own directory: no temp file in
    /// `tmp/` or beside them, and so no rename from another directory (which deadlocks with
    /// overlayfs' copy-up, see `write_via_temp`).
    #[test]
    fn writes_leave_no_temp_files_and_replace_a_damaged_copy() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 0).unwrap();
        let data = b"chunk".to_vec();
        let d = ChunkDigest::of(&data);
        c.put(&d, &data).unwrap();
        c.put_file("cd34", |f| f.write_all(b"whole")).unwrap();
        c.write_atomic(&c.index_path("sha256:ef"), b"index")
            .unwrap();
        let shard = c.chunk_path(&d).parent().unwrap().to_path_buf();
        assert_eq!(std::fs::read_dir(&shard).unwrap().count(), 1);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(std::fs::read(c.index_path("sha256:ef")).unwrap(), b"index");
        // A damaged copy under the name is replaced.
        std::fs::write(c.chunk_path(&d), b"junk!").unwrap();
        c.write_renamed(&c.chunk_path(&d), &data).unwrap();
        assert_eq!(std::fs::read(c.chunk_path(&d)).unwrap(), data);
    }

    #[test]
    fn leftover_temp_files_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 0).unwrap();
        std::fs::write(dir.path().join("tmp/123-0"), b"torn").unwrap();
        drop(c);
        ChunkCache::open(dir.path(), 0).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn prune_keeps_pinned_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 0).unwrap();
        let a = vec![1u8; 1000];
        let b = vec![2u8; 1000];
        let (da, db) = (ChunkDigest::of(&a), ChunkDigest::of(&b));
        c.put(&da, &a).unwrap();
        c.put(&db, &b).unwrap();
        c.pin("layer-1", [da].into_iter().collect());
        let s = c.prune(0).unwrap();
        assert_eq!(s.removed_chunks, 1);
        assert!(c.contains(&da));
        assert!(!c.chunk_path(&db).exists());
        c.unpin("layer-1");
        c.prune(0).unwrap();
        assert!(!c.chunk_path(&da).exists());
        assert_eq!(c.stats().unwrap().chunks, 0);
    }

    /// Pins that hold more than the budget: stores do not walk the cache directory each time
    /// (they did, freeing nothing), only after a tenth of the budget more was written; once
    /// the pins go, eviction gets under the budget at once.
    #[test]
    fn pins_over_the_budget_do_not_make_every_store_walk_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 10_000).unwrap();
        let chunks: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; 100]).collect();
        c.pin("layer", chunks.iter().map(|d| ChunkDigest::of(d)).collect());
        for data in &chunks {
            c.put(&ChunkDigest::of(data), data).unwrap();
            c.enforce_budget().unwrap();
        }
        assert_eq!(c.used(), 20_000, "pinned chunks are kept");
        // 100 stores past the budget: one walk, then one per 1,000 bytes (a tenth of the
        // budget) written, ten stores each.
        let walks = c.prunes.load(Ordering::Relaxed);
        assert!(walks <= 11, "{walks} walks of the cache for 100 stores");
        c.unpin("layer");
        assert!(c.used() <= 9_000, "used {} after the pins went", c.used());
    }

    #[test]
    fn budget_evicts_down_to_ninety_percent() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 5000).unwrap();
        for i in 0..10u8 {
            let data = vec![i; 1000];
            c.put(&ChunkDigest::of(&data), &data).unwrap();
        }
        assert_eq!(c.used(), 10_000);
        c.enforce_budget().unwrap();
        assert!(c.used() <= 4500, "used {}", c.used());
    }

    #[test]
    fn a_deleted_chunk_file_is_a_miss_even_after_this_process_verified_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 0).unwrap();
        let data = vec![7u8; 4096];
        let d = ChunkDigest::of(&data);
        c.put(&d, &data).unwrap();
        assert!(c.contains(&d));
        std::fs::remove_file(c.chunk_path(&d)).unwrap();
        assert!(c.read_chunk(&d, data.len()).unwrap().is_none());
        assert!(
            !c.contains(&d),
            "a chunk found missing is forgotten, so it is fetched"
        );
        c.put(&d, &data).unwrap();
        assert_eq!(c.read_chunk(&d, data.len()).unwrap().unwrap(), data);
    }

    #[test]
    fn writes_make_a_deleted_tmp_or_cache_directory_anew() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let c = ChunkCache::open(&root, 1 << 20).unwrap();
        std::fs::remove_dir_all(root.join("tmp")).unwrap();
        let a = b"first".to_vec();
        c.put(&ChunkDigest::of(&a), &a).unwrap();
        assert_eq!(
            c.read_chunk(&ChunkDigest::of(&a), a.len())
                .unwrap()
                .unwrap(),
            a
        );
        std::fs::remove_dir_all(&root).unwrap();
        // Counting and eviction see an empty cache, not an error.
        assert_eq!(c.stats().unwrap(), CacheStats::default());
        c.prune(0).unwrap();
        let b = b"second".to_vec();
        let db = ChunkDigest::of(&b);
        c.put(&db, &b).unwrap();
        assert_eq!(c.read_chunk(&db, b.len()).unwrap().unwrap(), b);
        c.put_file("ab12", |f| f.write_all(b"whole")).unwrap();
        assert_eq!(std::fs::read(c.file_path("ab12")).unwrap(), b"whole");
    }

    #[test]
    fn assembled_files_count_by_the_disk_they_take_and_are_evicted_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let chunk = vec![3u8; 100_000];
        c.put(&ChunkDigest::of(&chunk), &chunk).unwrap();
        // A 1 TiB sparse file with 64 KiB of data counts as what it takes on disk.
        let f = c
            .put_file("cd34", |f| {
                f.write_all_at(&[1u8; 65536], 0)?;
                f.set_len(1 << 40)
            })
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 40);
        let s = c.stats().unwrap();
        assert_eq!(s.files, 1);
        assert!(s.file_bytes >= 65536 && s.file_bytes < 1 << 20, "{s:?}");
        assert_eq!(c.used(), s.chunk_bytes + s.file_bytes);
        assert!(c.file_verified("cd34"));
        // Over budget: the assembled file goes before any chunk.
        let p = c.prune(c.used() - 1).unwrap();
        assert_eq!((p.removed_files, p.removed_chunks), (1, 0));
        assert!(!c.file_verified("cd34"));
        assert!(c.contains(&ChunkDigest::of(&chunk)));
    }

    #[test]
    fn a_failed_fill_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 0).unwrap();
        let r = c.put_file("ef56", |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("chunk gone"))
        });
        assert!(r.is_err());
        assert!(!c.file_path("ef56").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(c.used(), 0);
    }

    /// A claim of another length for a good chunk is that reader's error; the chunk stays.
    #[test]
    fn a_wrong_claimed_length_does_not_delete_a_good_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 0).unwrap();
        let data = b"a good chunk".to_vec();
        let d = ChunkDigest::of(&data);
        c.put(&d, &data).unwrap();
        let fresh = ChunkCache::open(dir.path(), 0).unwrap();
        assert!(fresh.read_chunk(&d, data.len() + 1).is_err());
        assert!(fresh.read_chunk(&d, 3).is_err());
        assert_eq!(fresh.read_chunk(&d, data.len()).unwrap().unwrap(), data);
        assert!(c.read_chunk(&d, 1).is_err());
        assert_eq!(c.read_chunk(&d, data.len()).unwrap().unwrap(), data);
    }
}
