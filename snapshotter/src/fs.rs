//! The read-only FUSE filesystem of one Beam layer.
//!
//! Metadata (lookup, getattr, readdir, readlink, xattrs) is answered from the index alone, with
//! no network. Inode numbers are the index's (stable for a layer, derived from its tree), so a
//! successor daemon could serve the same connection. A read maps to chunks; chunks in the cache
//! are served at once from the FUSE thread; missing ones are fetched on the async runtime and
//! the reply is sent from there, so one slow fetch never blocks other readers. Once every chunk
//! of a file is cached, `open` hands the kernel a backing file (FUSE passthrough): reads then
//! cost what a local read costs.
//!
//! OCI whiteouts appear as character devices 0/0 and opaque directories carry
//! `trusted.overlay.opaque=y`, which is how overlayfs expects them in a lower layer.

use crate::cache::ChunkCache;
use crate::fetch::{ChunkRef, Fetcher, RangeSource};
use crate::format::index::{IndexReader, InodeKind, InodeRecord};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, UNIX_EPOCH};

/// The layer never changes: the kernel may cache names and attributes for long.
const TTL: Duration = Duration::from_secs(3600);
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
/// File handle of opens served by the daemon (not passthrough).
const CACHED_FH: u64 = 0;

/// A layer's index, shared between the filesystem and background fetch.
pub type SharedIndex = Arc<IndexReader<Vec<u8>>>;

/// Counters of one mounted layer.
#[derive(Debug, Default)]
pub struct LayerCounters {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub read_errors: AtomicU64,
    pub passthrough_opens: AtomicU64,
}

/// The filesystem of one layer.
pub struct LayerFs {
    pub index: SharedIndex,
    pub source: Arc<dyn RangeSource>,
    pub fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    passthrough_wanted: bool,
    passthrough: AtomicBool,
    /// One backing id per inode, shared by its opens (a second backing id for an inode that
    /// is already open fails with EIO), dropped when the last open is released.
    backing_by_ino: Mutex<HashMap<u64, Weak<Backing>>>,
    backing_by_fh: Mutex<HashMap<u64, Arc<Backing>>>,
    /// Takeover (issue 7): where backing ids and caching-open counts are written down for a
    /// successor (`crate::takeover::OpenTable`); None when the mount is not held.
    open_table: Option<Arc<crate::takeover::OpenTable>>,
    /// Backing ids a predecessor registered, by inode, not yet used by this daemon.
    adopted_ids: Mutex<HashMap<u64, u32>>,
    /// Adopted backing ids in use: kept for the life of the mount, since opens made through
    /// the predecessor (unknown to this daemon) may still use them.
    adopted_live: Mutex<HashMap<u64, Arc<Backing>>>,
    /// Opens in the kernel's caching mode, per inode: while any is open, the kernel refuses
    /// a passthrough open of that inode (ETXTBSY), so none is attempted.
    cached_opens: Mutex<HashMap<u64, u32>>,
    next_fh: AtomicU64,
    pub counters: Arc<LayerCounters>,
    /// When recording (`beam record`): regular files in the order they were first opened.
    pub recorder: Option<Arc<AccessRecorder>>,
    /// End of the last read per inode, to detect sequential reading.
    last_read_end: Mutex<HashMap<u64, u64>>,
    /// What the kernel offered in FUSE_INIT, recorded by `init` so that a successor daemon can
    /// replay the handshake and take the connection over (`crate::takeover`).
    pub init_params: Arc<Mutex<Option<crate::takeover::InitParams>>>,
    /// Set when this daemon hands the connection to a successor (takeover): from then on a
    /// read is never answered with an error by this process (its runtime is going away); it is
    /// left unanswered, and the successor's FUSE_NOTIFY_RESEND has the kernel deliver it again.
    pub frozen: Arc<AtomicBool>,
}

/// A passthrough backing id shared by the opens of one inode. With an open table, its slot is
/// cleared before the id is closed (a successor must never adopt a closed id).
struct Backing {
    id: Option<BackingId>,
    ino: u64,
    table: Option<Arc<crate::takeover::OpenTable>>,
}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Some(t) = &self.table {
            if let Err(e) = t.set_backing(self.ino, 0) {
                tracing::warn!(ino = self.ino, "clearing the open table: {e}");
            }
        }
        drop(self.id.take());
    }
}

/// A read's reply that is never turned into EIO once the filesystem is frozen: dropped unsent
/// (e.g. its task cancelled when the runtime shuts down) it is forgotten, so the kernel keeps
/// the request for the next daemon, instead of fuser's default of answering EIO.
struct ReadReply {
    reply: Option<ReplyData>,
    frozen: Arc<AtomicBool>,
}

impl ReadReply {
    fn data(mut self, data: &[u8]) {
        if let Some(r) = self.reply.take() {
            r.data(data);
        }
    }

    fn error(mut self, e: Errno) {
        if let Some(r) = self.reply.take() {
            if self.frozen.load(Ordering::SeqCst) {
                std::mem::forget(r);
            } else {
                r.error(e);
            }
        }
    }
}

impl Drop for ReadReply {
    fn drop(&mut self) {
        if let Some(r) = self.reply.take() {
            if self.frozen.load(Ordering::SeqCst) {
                std::mem::forget(r);
            }
            // Else fuser answers EIO for a reply dropped unsent.
        }
    }
}

/// The first passthrough file handle of this process: the clock's nanoseconds in the high
/// half, so that handles differ from those of any earlier daemon serving the same connection.
fn first_fh() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
        .unwrap_or(0);
    ((nanos & 0x7fff_ffff) << 32) | 1
}

/// How far ahead a sequential reader's chunks are fetched.
const READAHEAD_BYTES: u64 = 4 << 20;

/// First-open order of a layer's files, for prefetch lists.
#[derive(Debug, Default)]
pub struct AccessRecorder {
    inner: Mutex<(Vec<u64>, std::collections::HashSet<u64>)>,
}

impl AccessRecorder {
    fn note(&self, ino: u64) {
        let mut g = self.inner.lock().expect("recorder lock");
        if g.1.insert(ino) {
            g.0.push(ino);
        }
    }

    /// Inode numbers in first-open order.
    pub fn order(&self) -> Vec<u64> {
        self.inner.lock().expect("recorder lock").0.clone()
    }
}

impl LayerFs {
    /// The record of directory `ino` (ENOTDIR for another kind, ENOENT if there is none).
    fn dir_inode(&self, ino: INodeNo) -> Result<InodeRecord, Errno> {
        match self.index.inode(ino.0) {
            Ok(r) if r.kind == InodeKind::Dir => Ok(r),
            Ok(_) => Err(Errno::ENOTDIR),
            Err(_) => Err(Errno::ENOENT),
        }
    }

    pub fn new(
        index: SharedIndex,
        source: Arc<dyn RangeSource>,
        fetcher: Arc<Fetcher>,
        rt: tokio::runtime::Handle,
        passthrough: bool,
    ) -> Self {
        LayerFs {
            index,
            source,
            fetcher,
            rt,
            passthrough_wanted: passthrough,
            passthrough: AtomicBool::new(false),
            backing_by_ino: Mutex::new(HashMap::new()),
            backing_by_fh: Mutex::new(HashMap::new()),
            open_table: None,
            adopted_ids: Mutex::new(HashMap::new()),
            adopted_live: Mutex::new(HashMap::new()),
            cached_opens: Mutex::new(HashMap::new()),
            // Passthrough handles start at a value no earlier daemon on this connection used
            // (the clock's low bits in the high half): releases of a predecessor's handles
            // must not match this daemon's.
            next_fh: AtomicU64::new(first_fh()),
            counters: Arc::new(LayerCounters::default()),
            recorder: None,
            last_read_end: Mutex::new(HashMap::new()),
            init_params: Arc::default(),
            frozen: Arc::default(),
        }
    }

    /// Write opens down in `table` for a successor (takeover). With `adopt`, first take over
    /// what a predecessor wrote there: its backing ids and caching-open counts.
    pub fn with_open_table(
        &mut self,
        table: Arc<crate::takeover::OpenTable>,
        adopt: bool,
    ) -> std::io::Result<()> {
        if adopt {
            let mut ids = self.adopted_ids.lock().expect("backing lock");
            let mut cached = self.cached_opens.lock().expect("open lock");
            for (ino, slot) in table.entries()? {
                if slot.backing_id != 0 {
                    ids.insert(ino, slot.backing_id);
                }
                if slot.cached_opens != 0 {
                    cached.insert(ino, slot.cached_opens);
                }
            }
        }
        self.open_table = Some(table);
        Ok(())
    }

    /// The backing id to open `ino` with: the one its open files share, else one a
    /// predecessor registered, else a new one (written down before the kernel hears of it).
    fn backing_for(&self, r: &InodeRecord, reply: &ReplyOpen) -> Option<Arc<Backing>> {
        let ino = r.ino;
        let live = self
            .backing_by_ino
            .lock()
            .expect("backing lock")
            .get(&ino)
            .and_then(Weak::upgrade);
        if let Some(b) = live {
            return Some(b);
        }
        if let Some(b) = self.adopted_live.lock().expect("backing lock").get(&ino) {
            return Some(b.clone());
        }
        if let Some(raw) = self.adopted_ids.lock().expect("backing lock").remove(&ino) {
            // SAFETY: `raw` was registered on this connection by the previous daemon and is
            // open: its open-table slot is cleared before an id is closed, and this daemon
            // never closes it before the mount ends (it stays in `adopted_live`).
            let id = unsafe { reply.wrap_backing(raw) };
            let b = Arc::new(Backing {
                id: Some(id),
                ino,
                table: None,
            });
            self.adopted_live
                .lock()
                .expect("backing lock")
                .insert(ino, b.clone());
            return Some(b);
        }
        let file = match self.backing_file(r) {
            Ok(Some(file)) => file,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(ino, "no backing file: {e}");
                return None;
            }
        };
        let id = match reply.open_backing(&file) {
            Ok(id) => id,
            Err(e) => {
                tracing::debug!(ino, "no passthrough: {e}");
                return None;
            }
        };
        let table = self.open_table.clone();
        let id = match &table {
            Some(t) => {
                let raw = id.into_raw();
                // SAFETY: `raw` was just registered on this connection and nothing closed it.
                let id = unsafe { reply.wrap_backing(raw) };
                if let Err(e) = t.set_backing(ino, raw) {
                    // A successor could not reuse it: no passthrough (drop closes the id).
                    tracing::warn!(ino, "writing the open table: {e}; no passthrough");
                    return None;
                }
                id
            }
            None => id,
        };
        let b = Arc::new(Backing {
            id: Some(id),
            ino,
            table,
        });
        self.backing_by_ino
            .lock()
            .expect("backing lock")
            .insert(ino, Arc::downgrade(&b));
        Some(b)
    }

    fn cache(&self) -> &ChunkCache {
        &self.fetcher.cache
    }

    fn attr(&self, r: &InodeRecord) -> FileAttr {
        let kind = file_type(r.kind);
        let (maj, min) = r.rdev();
        let t = if r.mtime >= 0 {
            UNIX_EPOCH + Duration::new(r.mtime as u64, r.mtime_nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(r.mtime.unsigned_abs())
        };
        FileAttr {
            ino: INodeNo(r.ino),
            size: r.size,
            blocks: r.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: r.mode as u16,
            nlink: r.nlink,
            uid: r.uid,
            gid: r.gid,
            rdev: nix::sys::stat::makedev(maj as u64, min as u64) as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The chunks covering `[offset, offset + size)` of a file.
    fn chunks_for(&self, r: &InodeRecord, offset: u64, size: u64) -> Vec<(u32, ChunkRef)> {
        let cs = self.index.chunk_size() as u64;
        if size == 0 || offset >= r.size {
            return Vec::new();
        }
        let end = (offset + size).min(r.size);
        let (first, last) = (offset / cs, (end - 1) / cs);
        (first..=last)
            .filter_map(|i| {
                let c = self.index.file_chunk(r, i as u32)?;
                let rec = self.index.chunk(c).ok()?;
                Some((
                    i as u32,
                    ChunkRef {
                        rec,
                        source: self.source.clone(),
                    },
                ))
            })
            .collect()
    }

    /// Copy `[offset, offset+size)` of a file out of cached chunks. `None` when a chunk is
    /// missing (evicted or found damaged meanwhile).
    fn read_cached(
        cache: &ChunkCache,
        cs: u64,
        file_size: u64,
        chunks: &[(u32, ChunkRef)],
        offset: u64,
        size: u64,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let end = (offset + size).min(file_size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        for (i, c) in chunks {
            let chunk_start = *i as u64 * cs;
            let from = offset.max(chunk_start) - chunk_start;
            let to = end.min(chunk_start + c.rec.uncompressed_len as u64) - chunk_start;
            let Some(f) = cache.open_chunk(&c.rec.digest, c.rec.uncompressed_len as usize)? else {
                return Ok(None);
            };
            let at = out.len();
            out.resize(at + (to - from) as usize, 0);
            f.read_exact_at(&mut out[at..], from)?;
        }
        Ok(Some(out))
    }

    /// The backing file of a wholly cached file, assembled from its chunks when first needed.
    fn backing_file(&self, r: &InodeRecord) -> std::io::Result<Option<std::fs::File>> {
        let chunks = self.chunks_for(r, 0, r.size);
        if chunks
            .iter()
            .any(|(_, c)| !self.cache().contains(&c.rec.digest))
        {
            return Ok(None);
        }
        let key = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(r.size.to_le_bytes());
            for (_, c) in &chunks {
                h.update(c.rec.digest.0);
            }
            hex::encode(h.finalize())
        };
        let path = self.cache().file_path(&key);
        if !path.exists() {
            let cs = self.index.chunk_size() as u64;
            let Some(data) = Self::read_cached(self.cache(), cs, r.size, &chunks, 0, r.size)?
            else {
                return Ok(None);
            };
            self.cache().write_atomic(&path, &data)?;
        }
        Ok(Some(std::fs::File::open(&path)?))
    }
}

fn file_type(k: InodeKind) -> FileType {
    match k {
        InodeKind::File => FileType::RegularFile,
        InodeKind::Dir => FileType::Directory,
        InodeKind::Symlink => FileType::Symlink,
        InodeKind::CharDev | InodeKind::Whiteout => FileType::CharDevice,
        InodeKind::BlockDev => FileType::BlockDevice,
        InodeKind::Fifo => FileType::NamedPipe,
    }
}

fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        *self.init_params.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::takeover::InitParams::record(config));
        let _ = config.set_max_readahead(1 << 20);
        // The tree never changes: entries and attributes come with directory listings
        // (READDIRPLUS: `find` + `stat` needs no LOOKUP per file), symlink targets are cached,
        // and lookups in one directory run in parallel. The same offer always gets the same
        // answer (a successor daemon replays it at takeover).
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            // A kernel that does not offer one simply goes without it.
            let _ = config.add_capabilities(flag);
        }
        if self.passthrough_wanted {
            // Depth 1 keeps overlayfs stackable on top of this mount.
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                self.passthrough.store(true, Ordering::Relaxed);
            } else {
                tracing::info!("kernel offers no FUSE passthrough; serving reads from the daemon");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.index.lookup(parent.0, name.as_bytes()) {
            Ok(Some(ino)) => match self.index.inode(ino) {
                Ok(r) => reply.entry(&TTL, &self.attr(&r), Generation(0)),
                Err(_) => reply.error(Errno::EIO),
            },
            Ok(None) => reply.error(Errno::ENOENT),
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.index.inode(ino.0) {
            Ok(r) => reply.attr(&TTL, &self.attr(&r)),
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.index.inode(ino.0) {
            Ok(r) if r.kind == InodeKind::Symlink => reply.data(self.index.symlink_target(&r)),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        let r = match self.index.inode(ino.0) {
            Ok(r) => r,
            Err(_) => return reply.error(Errno::ENOENT),
        };
        if let Some(rec) = &self.recorder {
            if r.kind == InodeKind::File {
                rec.note(r.ino);
            }
        }
        let busy_cached = self
            .cached_opens
            .lock()
            .expect("open lock")
            .get(&ino.0)
            .is_some_and(|n| *n > 0);
        if self.passthrough.load(Ordering::Relaxed)
            && r.kind == InodeKind::File
            && r.size > 0
            && !busy_cached
        {
            let id = self.backing_for(&r, &reply);
            if let Some(id) = id {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.backing_by_fh
                    .lock()
                    .expect("backing lock")
                    .insert(fh, id.clone());
                self.counters
                    .passthrough_opens
                    .fetch_add(1, Ordering::Relaxed);
                // The kernel accepts no caching flags with FOPEN_PASSTHROUGH (EINVAL).
                if let Some(backing) = &id.id {
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), backing);
                    return;
                }
                reply.error(Errno::EIO);
                return;
            }
        }
        if r.kind == InodeKind::File {
            let mut opens = self.cached_opens.lock().expect("open lock");
            let n = opens.entry(ino.0).or_insert(0);
            *n += 1;
            // Before the reply: a successor may count an open too many (no passthrough for
            // that inode then), never one too few.
            if let Some(t) = &self.open_table {
                if let Err(e) = t.set_cached_opens(ino.0, *n) {
                    tracing::warn!(ino = ino.0, "writing the open table: {e}");
                }
            }
        }
        // The handle only tells release which kind of open it was: reads need no state, so
        // any daemon can serve them.
        reply.opened(FileHandle(CACHED_FH), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = match self.index.inode(ino.0) {
            Ok(r) if r.kind == InodeKind::File => r,
            Ok(_) => return reply.error(Errno::EISDIR),
            Err(_) => return reply.error(Errno::ENOENT),
        };
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let chunks = self.chunks_for(&r, offset, size as u64);
        let cs = self.index.chunk_size() as u64;
        let sequential = {
            let mut last = self.last_read_end.lock().expect("read lock");
            let seq = last.get(&ino.0) == Some(&offset);
            last.insert(ino.0, offset + size as u64);
            // Look ahead once per chunk a sequential reader enters, not on every read.
            seq && offset % cs < size as u64
        };
        if sequential {
            // A sequential reader will want the next chunks: start fetching them now, without
            // making this read wait for them.
            let from = chunks
                .last()
                .map(|(i, _)| (*i as u64 + 1) * cs)
                .unwrap_or(r.size);
            let ahead: Vec<ChunkRef> = self
                .chunks_for(&r, from, READAHEAD_BYTES)
                .into_iter()
                .map(|(_, c)| c)
                .filter(|c| !self.cache().contains(&c.rec.digest))
                .collect();
            if !ahead.is_empty() {
                let fetcher = self.fetcher.clone();
                self.rt.spawn(async move {
                    let _ = fetcher
                        .ensure(&ahead, crate::fetch::Priority::Readahead)
                        .await;
                });
            }
        }
        if chunks
            .iter()
            .all(|(_, c)| self.cache().contains(&c.rec.digest))
        {
            if let Ok(Some(data)) =
                Self::read_cached(self.cache(), cs, r.size, &chunks, offset, size as u64)
            {
                self.counters
                    .bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.data(&data);
                return;
            }
        }
        let reply = ReadReply {
            reply: Some(reply),
            frozen: self.frozen.clone(),
        };
        if self.frozen.load(Ordering::SeqCst) {
            // Handing over: the successor answers this one.
            return reply.error(Errno::EIO);
        }
        let fetcher = self.fetcher.clone();
        let counters = self.counters.clone();
        self.rt.spawn(async move {
            let refs: Vec<ChunkRef> = chunks.iter().map(|(_, c)| c.clone()).collect();
            // Two tries: a chunk evicted or found damaged between fetch and read is fetched
            // once more.
            for _ in 0..2 {
                if let Err(e) = fetcher.ensure(&refs, crate::fetch::Priority::Demand).await {
                    tracing::warn!(ino = ino.0, offset, size, "read failed: {e}");
                    counters.read_errors.fetch_add(1, Ordering::Relaxed);
                    reply.error(Errno::EIO);
                    return;
                }
                let cache = fetcher.cache.clone();
                let chunks = chunks.clone();
                let read = tokio::task::spawn_blocking(move || {
                    Self::read_cached(&cache, cs, r.size, &chunks, offset, size as u64)
                })
                .await;
                match read {
                    Ok(Ok(Some(data))) => {
                        counters
                            .bytes_read
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        reply.data(&data);
                        return;
                    }
                    Ok(Ok(None)) => continue,
                    _ => break,
                }
            }
            counters.read_errors.fetch_add(1, Ordering::Relaxed);
            reply.error(Errno::EIO);
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 == CACHED_FH {
            let left = {
                let mut opens = self.cached_opens.lock().expect("open lock");
                let left = opens.get_mut(&ino.0).map(|n| {
                    *n = n.saturating_sub(1);
                    *n
                });
                if left == Some(0) {
                    opens.remove(&ino.0);
                }
                left
            };
            // After the reply: a successor may count an open too many, never one too few.
            reply.ok();
            if let (Some(t), Some(n)) = (&self.open_table, left) {
                if let Err(e) = t.set_cached_opens(ino.0, n) {
                    tracing::warn!(ino = ino.0, "writing the open table: {e}");
                }
            }
            return;
        } else {
            self.backing_by_fh
                .lock()
                .expect("backing lock")
                .remove(&fh.0);
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.dir_inode(ino) {
            Ok(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = match self.dir_inode(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        // Offsets: 1 = ".", 2 = "..", 3 + i = entry i. Stable across calls.
        let mut next = offset;
        loop {
            let full = match next {
                0 => reply.add(ino, 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(r.parent), 2, FileType::Directory, ".."),
                n => {
                    let i = (n - 2) as u32;
                    let Some((name, child)) = self.index.dirent(&r, i) else {
                        break;
                    };
                    let kind = self
                        .index
                        .inode(child)
                        .map(|c| file_type(c.kind))
                        .unwrap_or(FileType::RegularFile);
                    reply.add(INodeNo(child), n + 1, kind, OsStr::from_bytes(name))
                }
            };
            if full {
                break;
            }
            next += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let r = match self.dir_inode(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        // The same offsets as `readdir`, each entry with its attributes.
        let mut next = offset;
        loop {
            let (child, name): (u64, &[u8]) = match next {
                0 => (ino.0, b"."),
                1 => (r.parent, b".."),
                n => match self.index.dirent(&r, (n - 2) as u32) {
                    Some((name, child)) => (child, name),
                    None => break,
                },
            };
            let Ok(c) = self.index.inode(child) else {
                return reply.error(Errno::EIO);
            };
            if reply.add(
                INodeNo(child),
                next + 1,
                OsStr::from_bytes(name),
                &TTL,
                &self.attr(&c),
                Generation(0),
            ) {
                break;
            }
            next += 1;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.index.blob_size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.index.inode_count(), 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = match self.index.inode(ino.0) {
            Ok(r) => r,
            Err(_) => return reply.error(Errno::ENOENT),
        };
        let name = name.as_bytes();
        if name == OPAQUE_XATTR && r.is_opaque() {
            return xattr_reply(b"y", size, reply);
        }
        match self.index.xattrs(&r).find(|(k, _)| *k == name) {
            Some((_, v)) => xattr_reply(v, size, reply),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = match self.index.inode(ino.0) {
            Ok(r) => r,
            Err(_) => return reply.error(Errno::ENOENT),
        };
        let mut names = Vec::new();
        for (k, _) in self.index.xattrs(&r) {
            names.extend_from_slice(k);
            names.push(0);
        }
        if r.is_opaque() {
            names.extend_from_slice(OPAQUE_XATTR);
            names.push(0);
        }
        xattr_reply(&names, size, reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}
