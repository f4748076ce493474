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
//! The backing file is assembled in the cache (`files/`) chunk by chunk, never holding more
//! than one chunk in memory: a file's size is the image's to choose (a sparse 1 TiB file is an
//! 8 MiB index), the daemon's memory is not. Chunks of zeros stay holes. Before a backing file
//! is handed to the kernel its length is checked on every open and its chunks' digests once
//! per process (holes are checked as holes, without reading them), as the cache checks chunks:
//! after a power loss or damage on disk it is built anew, never served. Opens of one inode are
//! serialised from the passthrough decision to the reply: the kernel takes one backing file per
//! inode at a time, and no passthrough open while a caching-mode open is live.
//!
//! OCI whiteouts appear as character devices 0/0 and opaque directories carry
//! `trusted.overlay.opaque=y`, which is how overlayfs expects them in a lower layer.

// FUSE passthrough ids and received fds are raw kernel handles: wrapping them is unsafe.
#![allow(unsafe_code)]

use crate::cache::ChunkCache;
use crate::fetch::{ChunkRef, Fetcher, RangeSource};
use crate::follow::{LayerHandle, MountedLayers};
use crate::format::chunk::ChunkDigest;
use crate::format::index::{ChunkRecord, IndexReader, InodeKind, InodeRecord};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
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
    /// Held by an open of an inode from its passthrough decision to its reply.
    open_locks: InodeLocks,
    /// Digest of a chunk of zeros, by length (such chunks are holes in backing files).
    zero_digests: Mutex<HashMap<u32, ChunkDigest>>,
    next_fh: AtomicU64,
    pub counters: Arc<LayerCounters>,
    /// When recording (`beam record`): regular files in the order they were first opened.
    pub access_trace: Option<Arc<AccessTrace>>,
    /// Sequential readers, per inode.
    streams: Mutex<HashMap<u64, Option<ReadStream>>>,
    /// Directories whose files were read cold, for guessing across files (see
    /// `LayerFs::directory_ahead`).
    cold_dirs: Mutex<HashMap<u64, ColdDir>>,
    /// Files whose rest was asked for at their first cold read (see `LayerFs::file_ahead`).
    guessed_files: Mutex<std::collections::HashSet<u64>>,
    /// This layer as a follows walk sees it, and the other layers it may lead to (see
    /// `LayerFs::follow_ahead`); None when the layer's diff_id is unknown.
    pub follow: Option<(Arc<LayerHandle>, Arc<MountedLayers>)>,
    /// Files whose follows were fetched at their first open.
    followed: Mutex<std::collections::HashSet<u64>>,
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

/// Per-inode locks: [`InodeLocks::lock`] waits while another holder has the same inode.
#[derive(Default)]
struct InodeLocks {
    held: Mutex<HashSet<u64>>,
    released: Condvar,
}

impl InodeLocks {
    fn lock(&self, ino: u64) -> InodeLock<'_> {
        let mut held = self.held.lock().expect("inode lock");
        while held.contains(&ino) {
            held = self.released.wait(held).expect("inode lock");
        }
        held.insert(ino);
        InodeLock { locks: self, ino }
    }
}

/// One inode's lock, released on drop.
struct InodeLock<'a> {
    locks: &'a InodeLocks,
    ino: u64,
}

impl Drop for InodeLock<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        held.remove(&self.ino);
        self.locks.released.notify_all();
    }
}

/// One chunk of a file and where it sits in the file.
struct Piece {
    at: u64,
    rec: ChunkRecord,
}

/// The first offset at or after `from` where `f` holds data (`u64::MAX` when only holes
/// follow). A filesystem that does not track holes reports data everywhere.
fn next_data(f: &File, from: u64) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(from) else {
        return Ok(u64::MAX);
    };
    match nix::unistd::lseek(f.as_raw_fd(), off, nix::unistd::Whence::SeekData) {
        Ok(at) => Ok(at as u64),
        Err(nix::errno::Errno::ENXIO) => Ok(u64::MAX),
        Err(e) => Err(e.into()),
    }
}

/// How far ahead of a sequential reader its chunks are fetched at first. The distance grows as
/// the reader goes on, up to [`Fetcher::readahead_bytes`] (what the link moves in a tenth of a
/// second, so only a fast link goes past this: a reader that stops early leaves little fetched
/// for nothing on a slow one, and one that streams a large file keeps several requests going
/// on a fast one).
const READAHEAD_BYTES: u64 = 4 << 20;

/// What readahead asks for at once goes out in requests of this size, in parallel, each
/// stored as it comes, so the reader need not wait for all of them.
const READAHEAD_REQUEST_BYTES: u64 = 2 << 20;

/// A read that needs at most this many bytes from the registry takes its neighbours along.
const SMALL_READ_BYTES: u64 = 64 << 10;

/// How many bytes of neighbouring chunks a small read takes along (see `LayerFs::neighbours`):
/// about 1.3 ms at 200 Mbit/s, against a round trip saved each time a program then opens one
/// of them. (Half the measured bandwidth-delay product instead was tried: at 200 Mbit/s and
/// 20 ms it took 2 MB more by python's first output for no time saved, 1.23 s against 1.22 s,
/// and on an unlimited local link it made the start slower, 0.51 s to 0.68 s.)
const NEIGHBOUR_BYTES: u64 = 32 << 10;

/// The chunks of directory `dir`'s regular files (not its subdirectories') that `cached` says
/// are missing, up to `budget` stored bytes: those at or after blob offset `from` in blob
/// order, then those before it in blob order (the requests go out in that order, so the files
/// a program reads next, most often after its last in a tar's order, come first).
fn directory_guess(
    index: &IndexReader<Vec<u8>>,
    dir: u64,
    from: u64,
    budget: u64,
    cached: impl Fn(&ChunkDigest) -> bool,
) -> Vec<ChunkRecord> {
    let Ok(d) = index.inode(dir) else {
        return Vec::new();
    };
    if d.kind != InodeKind::Dir {
        return Vec::new();
    }
    let mut recs: Vec<ChunkRecord> = Vec::new();
    for (_, ino) in index.dirents(&d) {
        let Ok(f) = index.inode(ino) else { continue };
        if f.kind != InodeKind::File || f.size == 0 {
            continue;
        }
        for id in index.file_chunks(&f) {
            if let Ok(rec) = index.chunk(id) {
                if !cached(&rec.digest) {
                    recs.push(rec);
                }
            }
        }
    }
    recs.sort_by_key(|c| (c.offset < from, c.offset));
    recs.dedup_by_key(|c| c.offset);
    let mut taken = 0u64;
    let mut picked = Vec::new();
    for rec in recs {
        if taken + rec.stored_len as u64 > budget {
            break;
        }
        taken += rec.stored_len as u64;
        picked.push(rec);
    }
    picked
}

/// A directory as far as guessing across files cares: the first of its files read cold, and
/// whether the rest was asked for.
#[derive(Debug, Clone, Copy)]
struct ColdDir {
    first: u64,
    fetched: bool,
}

/// A file's reader as far as readahead cares: where its next read would start if sequential,
/// how far ahead of it chunks were asked for, the distance it is kept ahead, and where that
/// distance last grew.
#[derive(Debug, Clone, Copy)]
struct ReadStream {
    next: u64,
    ahead: u64,
    window: u64,
    grown_at: u64,
}

impl ReadStream {
    /// Note a read of `[offset, end)` of a file of `file_size` bytes (chunks of `cs`); the
    /// range of the file to fetch ahead now, if any. A read that does not continue the last
    /// one starts a new stream. From the second sequential read on, the chunks up to `window`
    /// past the end of the read's chunk are asked for, in steps of at least a quarter window
    /// (one chunk at the first size). The window starts at [`READAHEAD_BYTES`] and doubles,
    /// up to `max()` (asked only then: it reads the fetcher's link estimate, and this runs on
    /// every FUSE read), each time the reader has read as much as the window since it last grew.
    fn advance(
        this: &mut Option<ReadStream>,
        offset: u64,
        end: u64,
        file_size: u64,
        cs: u64,
        max: impl FnOnce() -> u64,
    ) -> Option<(u64, u64)> {
        let s = match this {
            Some(s) if s.next == offset => s,
            _ => {
                *this = Some(ReadStream {
                    next: end,
                    ahead: 0,
                    window: READAHEAD_BYTES,
                    grown_at: end,
                });
                return None;
            }
        };
        s.next = end;
        if end - s.grown_at >= s.window {
            s.window = (s.window * 2).min(max()).max(s.window);
            s.grown_at = end;
        }
        let chunk_end = end.div_ceil(cs) * cs;
        s.ahead = s.ahead.max(chunk_end);
        let want = (chunk_end + s.window).min(file_size);
        let step = if s.window > READAHEAD_BYTES {
            s.window / 4
        } else {
            cs
        };
        if want <= s.ahead || (want - s.ahead < step && want < file_size) {
            return None;
        }
        let from = s.ahead;
        s.ahead = want;
        Some((from, want - from))
    }
}

/// First-open order of a layer's files, for prefetch lists.
#[derive(Debug, Default)]
pub struct AccessTrace {
    inner: Mutex<(Vec<u64>, std::collections::HashSet<u64>)>,
}

impl AccessTrace {
    fn note(&self, ino: u64) {
        let mut g = self.inner.lock().expect("access_trace lock");
        if g.1.insert(ino) {
            g.0.push(ino);
        }
    }

    /// Inode numbers in first-open order.
    pub fn order(&self) -> Vec<u64> {
        self.inner.lock().expect("access_trace lock").0.clone()
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
            open_locks: InodeLocks::default(),
            zero_digests: Mutex::new(HashMap::new()),
            // Passthrough handles start at a value no earlier daemon on this connection used
            // (the clock's low bits in the high half): releases of a predecessor's handles
            // must not match this daemon's.
            next_fh: AtomicU64::new(first_fh()),
            counters: Arc::new(LayerCounters::default()),
            access_trace: None,
            streams: Mutex::new(HashMap::new()),
            cold_dirs: Mutex::new(HashMap::new()),
            guessed_files: Mutex::new(std::collections::HashSet::new()),
            follow: None,
            followed: Mutex::new(std::collections::HashSet::new()),
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
        let t = mtime_of(r.mtime, r.mtime_nsec);
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

    /// The chunks right after a small read's last chunk in the blob, up to
    /// [`NEIGHBOUR_BYTES`], to fetch in the same request: a layer's blob follows its tar's
    /// order, so they are the next files of the same directory, which a starting program
    /// tends to open next (python's imports of a package: 32 reads became 19 requests). They
    /// are taken along, never waited for ([`Fetcher::ensure_along`]): one in flight elsewhere
    /// ends them, as does a cached one (checked there, not on this FUSE thread), and one that
    /// fails verification is dropped without failing the read.
    fn neighbours(&self, r: &InodeRecord, chunks: &[(u32, ChunkRef)]) -> Vec<ChunkRef> {
        let needed: u64 = chunks.iter().map(|(_, c)| c.rec.stored_len as u64).sum();
        let Some((last_i, last)) = chunks.last() else {
            return Vec::new();
        };
        if needed > SMALL_READ_BYTES {
            return Vec::new();
        }
        let Some(mut id) = self.index.file_chunk(r, *last_i) else {
            return Vec::new();
        };
        let mut end = last.rec.offset + last.rec.stored_len as u64;
        let mut taken = 0u64;
        let mut out = Vec::new();
        loop {
            id += 1;
            let Ok(rec) = self.index.chunk(id) else { break };
            // Only what one request carries: contiguous, within the bound.
            if rec.offset != end || taken + rec.stored_len as u64 > NEIGHBOUR_BYTES {
                break;
            }
            end += rec.stored_len as u64;
            taken += rec.stored_len as u64;
            out.push(ChunkRef {
                rec,
                source: self.source.clone(),
            });
        }
        out
    }

    /// A path of inode `r` in the layer, for logs: its first name, up through the parents.
    fn path_of(&self, r: &InodeRecord) -> String {
        let mut names: Vec<String> = Vec::new();
        let (mut ino, mut parent) = (r.ino, r.parent);
        // Bounded: a damaged index cannot loop here.
        for _ in 0..256 {
            if ino == parent {
                break;
            }
            let Ok(p) = self.index.inode(parent) else {
                break;
            };
            match self.index.dirents(&p).find(|(_, i)| *i == ino) {
                Some((name, _)) => names.push(String::from_utf8_lossy(name).into_owned()),
                None => names.push(format!("#{ino}")),
            }
            (ino, parent) = (p.ino, p.parent);
        }
        names.reverse();
        format!("/{}", names.join("/"))
    }

    /// Guess within a file, where a round trip is dear: at a file's first cold read, the rest of
    /// it is fetched too (as readahead nobody waits on), when it fits in
    /// [`Fetcher::speculation_bytes`]. A program that maps a library reads its header, then
    /// the pages its loader touches here and there: on a far registry each was a round trip
    /// (python's libsqlite3 at 20 ms: three in a row). Nothing on a near registry.
    fn file_ahead(&self, r: &InodeRecord, reading: &[(u32, ChunkRef)]) {
        let budget = self.fetcher.speculation_bytes();
        // A file far larger than the budget would not fit even well compressed (and is not
        // walked chunk by chunk on this FUSE thread).
        if budget == 0
            || r.size > budget.saturating_mul(4)
            || !self
                .guessed_files
                .lock()
                .expect("guessed lock")
                .insert(r.ino)
        {
            return;
        }
        let cache = self.cache();
        let mut rest: Vec<ChunkRef> = Vec::new();
        let mut bytes = 0u64;
        for id in self.index.file_chunks(r) {
            let Ok(rec) = self.index.chunk(id) else {
                continue;
            };
            if reading.iter().any(|(_, c)| c.rec.offset == rec.offset)
                || rest.iter().any(|c| c.rec.offset == rec.offset)
                || cache.contains(&rec.digest)
            {
                continue;
            }
            bytes += rec.stored_len as u64;
            if bytes > budget {
                return;
            }
            rest.push(ChunkRef {
                rec,
                source: self.source.clone(),
            });
        }
        self.spawn_readahead(rest);
    }

    /// Guess across files, where a round trip is dear: when a program reads a second file of
    /// a directory cold, fetch the directory's other files too, nearest after it in the blob
    /// first, up to [`Fetcher::speculation_bytes`] (four round trips of the link; nothing on a
    /// near registry), as readahead nobody waits on. A starting interpreter reads its modules
    /// one after another, each after the last is parsed: on a far registry each was a round
    /// trip, and a layer's blob keeps a directory's files together (its tar's order), so the
    /// guess is a few large requests. Once per directory.
    fn directory_ahead(&self, r: &InodeRecord, missing: &[(u32, ChunkRef)]) {
        let budget = self.fetcher.speculation_bytes();
        let Some((_, here)) = missing.first() else {
            return;
        };
        if budget == 0 {
            // A near registry: no guesses, and no bookkeeping on this FUSE thread.
            return;
        }
        {
            let mut dirs = self.cold_dirs.lock().expect("cold dirs lock");
            let d = dirs.entry(r.parent).or_insert(ColdDir {
                first: r.ino,
                fetched: false,
            });
            if d.fetched || d.first == r.ino {
                return;
            }
            d.fetched = true;
        }
        let cache = self.cache();
        // Not the read's own chunks: those go out first in a request of their own, not
        // behind guessed bytes.
        let guess: Vec<ChunkRef> =
            directory_guess(&self.index, r.parent, here.rec.offset, budget, |d| {
                cache.contains(d) || missing.iter().any(|(_, c)| c.rec.digest == *d)
            })
            .into_iter()
            .map(|rec| ChunkRef {
                rec,
                source: self.source.clone(),
            })
            .collect();
        tracing::debug!(
            dir = r.parent,
            chunks = guess.len(),
            "guessing a directory's files"
        );
        self.spawn_readahead(guess);
    }

    /// Fetch what opening `r` loads, and what that loads (`crate::follow`), at its first
    /// open, as readahead nobody waits on, up to [`Fetcher::speculation_bytes`] (nothing on a
    /// near registry). The walk runs off the FUSE thread; the open does not wait for it.
    fn follow_ahead(&self, r: &InodeRecord) {
        let Some((own, layers)) = &self.follow else {
            return;
        };
        let budget = self.fetcher.speculation_bytes();
        if budget == 0
            || self.index.follows(r.ino).next().is_none()
            || !self.followed.lock().expect("followed lock").insert(r.ino)
        {
            return;
        }
        let (own, layers, fetcher, rt, ino) = (
            own.clone(),
            layers.clone(),
            self.fetcher.clone(),
            self.rt.clone(),
            r.ino,
        );
        self.rt.spawn_blocking(move || {
            let cache = fetcher.cache.clone();
            let groups =
                crate::follow::follow_chunks(&own, ino, &layers, |d| cache.contains(d), budget);
            tracing::debug!(
                ino,
                chunks = groups.iter().map(Vec::len).sum::<usize>(),
                "following what a file loads"
            );
            for chunks in groups {
                spawn_readahead(&rt, &fetcher, chunks);
            }
        });
    }

    /// [`spawn_readahead`] on this layer's runtime and fetcher.
    fn spawn_readahead(&self, chunks: Vec<ChunkRef>) {
        spawn_readahead(&self.rt, &self.fetcher, chunks)
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

    /// The chunks of a file in order; an item is `None` where the index has no chunk of the
    /// length that place in the file needs (such a file gets no backing file).
    fn pieces<'a>(&'a self, r: &InodeRecord) -> impl Iterator<Item = Option<Piece>> + 'a {
        let cs = self.index.chunk_size() as u64;
        let r = *r;
        let n = r.size.div_ceil(cs);
        (0..n).map(move |i| {
            let i32 = u32::try_from(i).ok()?;
            let rec = self.index.chunk(self.index.file_chunk(&r, i32)?).ok()?;
            let at = i * cs;
            (rec.uncompressed_len as u64 == (r.size - at).min(cs)).then_some(Piece { at, rec })
        })
    }

    /// Whether `rec` is a chunk of zeros (a hole in a backing file).
    fn is_zero_chunk(&self, rec: &ChunkRecord) -> bool {
        let mut zeros = self.zero_digests.lock().expect("zero lock");
        let d = zeros
            .entry(rec.uncompressed_len)
            .or_insert_with(|| ChunkDigest::of(&vec![0u8; rec.uncompressed_len as usize]));
        *d == rec.digest
    }

    /// The backing file of a wholly cached file, assembled from its chunks when first needed
    /// (or when the one on disk fails its check). `None` when a chunk is not cached.
    fn backing_file(&self, r: &InodeRecord) -> io::Result<Option<File>> {
        // Named by the file's size and chunk digests: files with the same content share one.
        let key = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(r.size.to_le_bytes());
            for p in self.pieces(r) {
                let Some(p) = p else { return Ok(None) };
                if !self.cache().contains(&p.rec.digest) {
                    return Ok(None);
                }
                h.update(p.rec.digest.0);
            }
            hex::encode(h.finalize())
        };
        let cache = self.cache();
        match File::open(cache.file_path(&key)) {
            Ok(f) => {
                if self.backing_file_intact(r, &key, &f)? {
                    return Ok(Some(f));
                }
                tracing::warn!(ino = r.ino, file = %key, "assembled file is damaged; building it anew");
                cache.discard_file(&key);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut missing = false;
        let built = cache.put_file(&key, |f| {
            let complete = self.assemble(r, f)?;
            missing = !complete;
            if complete {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "a chunk left the cache",
                ))
            }
        });
        match built {
            Ok(f) => Ok(Some(f)),
            Err(_) if missing => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write a file's chunks into `f` one at a time, zeros as holes. `false` when a chunk is
    /// missing from the cache (evicted, deleted or found damaged meanwhile).
    fn assemble(&self, r: &InodeRecord, f: &mut File) -> io::Result<bool> {
        let mut buf = Vec::new();
        for p in self.pieces(r) {
            let Some(p) = p else { return Ok(false) };
            if self.is_zero_chunk(&p.rec) {
                continue;
            }
            let len = p.rec.uncompressed_len as usize;
            let Some(chunk) = self.cache().open_chunk(&p.rec.digest, len)? else {
                return Ok(false);
            };
            buf.resize(len, 0);
            chunk.read_exact_at(&mut buf, 0)?;
            f.write_all_at(&buf, p.at)?;
        }
        f.set_len(r.size)?;
        Ok(true)
    }

    /// Whether an assembled file on disk holds the file: its length, on every open, and its
    /// chunks' digests, once per process (a chunk of zeros that is a hole needs no reading).
    fn backing_file_intact(&self, r: &InodeRecord, key: &str, f: &File) -> io::Result<bool> {
        if f.metadata()?.len() != r.size {
            return Ok(false);
        }
        if self.cache().file_verified(key) {
            return Ok(true);
        }
        let mut buf = Vec::new();
        // No data in [asked, data_at): one SEEK_DATA covers a run of holes.
        let (mut asked, mut data_at) = (u64::MAX, 0u64);
        for p in self.pieces(r) {
            let Some(p) = p else { return Ok(false) };
            let len = p.rec.uncompressed_len as usize;
            let end = p.at + len as u64;
            if self.is_zero_chunk(&p.rec) {
                if !(asked <= p.at && data_at >= end) {
                    data_at = next_data(f, p.at)?;
                    asked = p.at;
                }
                if data_at >= end {
                    continue;
                }
            }
            buf.resize(len, 0);
            match f.read_exact_at(&mut buf, p.at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e),
            }
            if ChunkDigest::of(&buf) != p.rec.digest {
                return Ok(false);
            }
        }
        self.cache().mark_file_verified(key);
        Ok(true)
    }
}

/// Fetch `chunks` at readahead priority, nobody waiting: in parallel requests of about
/// [`READAHEAD_REQUEST_BYTES`] on the wire, each stored as it comes, sent in the order of
/// `chunks` (each request's chunks in blob order: a chunk before the last starts another).
fn spawn_readahead(rt: &tokio::runtime::Handle, fetcher: &Arc<Fetcher>, chunks: Vec<ChunkRef>) {
    let mut parts: Vec<Vec<ChunkRef>> = Vec::new();
    let mut part_bytes = 0u64;
    for c in chunks {
        let n = c.rec.stored_len as u64;
        match parts.last_mut() {
            Some(part)
                if part_bytes + n <= READAHEAD_REQUEST_BYTES
                    && part.last().is_some_and(|l| l.rec.offset < c.rec.offset) =>
            {
                part.push(c)
            }
            _ => {
                parts.push(vec![c]);
                part_bytes = 0;
            }
        }
        part_bytes += n;
    }
    for part in parts {
        let fetcher = fetcher.clone();
        rt.spawn(async move {
            let _ = fetcher
                .ensure(&part, crate::fetch::Priority::Readahead)
                .await;
        });
    }
}

/// An index time as a `SystemTime`, clamped to what the platform holds (an index may say
/// `i64::MAX` seconds; adding that to the epoch must not panic a FUSE thread).
fn mtime_of(secs: i64, nsec: u32) -> std::time::SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nsec.min(999_999_999)))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.unwrap_or(UNIX_EPOCH)
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
            Some(crate::takeover::InitParams::capture(config));
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
        if let Some(rec) = &self.access_trace {
            if r.kind == InodeKind::File {
                rec.note(r.ino);
            }
        }
        if r.kind == InodeKind::File {
            self.follow_ahead(&r);
        }
        self.fetcher.note_open();
        // From the decision (passthrough or caching mode) to the reply: two first opens must
        // share one backing id, and a caching-mode open must not pass a passthrough one.
        let _decided = self.open_locks.lock(ino.0);
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
        let ahead = ReadStream::advance(
            self.streams
                .lock()
                .expect("streams lock")
                .entry(ino.0)
                .or_default(),
            offset,
            offset + size as u64,
            r.size,
            cs,
            || self.fetcher.readahead_bytes(READAHEAD_BYTES),
        );
        if let Some((from, len)) = ahead {
            // A sequential reader will want the next chunks: start fetching them now, in a few
            // requests at once, without making this read wait for them.
            let missing: Vec<ChunkRef> = self
                .chunks_for(&r, from, len)
                .into_iter()
                .map(|(_, c)| c)
                .filter(|c| !self.cache().contains(&c.rec.digest))
                .collect();
            self.spawn_readahead(missing);
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
        if tracing::enabled!(tracing::Level::DEBUG) {
            // What a start waits on, by name (`BEAM_LOG=beam=debug`).
            tracing::debug!(path = %self.path_of(&r), offset, size, "cold read");
        }
        self.file_ahead(&r, &chunks);
        self.directory_ahead(&r, &chunks);
        let fetcher = self.fetcher.clone();
        let counters = self.counters.clone();
        let mut neighbours = self.neighbours(&r, &chunks);
        self.rt.spawn(async move {
            let refs: Vec<ChunkRef> = chunks.iter().map(|(_, c)| c.clone()).collect();
            // Two tries: a chunk evicted or found damaged between fetch and read is fetched
            // once more.
            for _ in 0..2 {
                let along = std::mem::take(&mut neighbours);
                if let Err(e) = fetcher
                    .ensure_along(&refs, &along, crate::fetch::Priority::Demand)
                    .await
                {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory's guess: its files' missing chunks (not its subdirectories'), those after
    /// the read first, within the budget, in blob order.
    #[test]
    fn a_directory_guess_takes_the_files_after_the_read_first() {
        use crate::format::index::Node;
        // root/{f0..f5 (one 100-byte chunk each, in blob order), sub/{g}}
        let mut b = crate::follow::flat_index(1, 6);
        b.chunks.push(ChunkRecord {
            digest: ChunkDigest([7; 32]),
            offset: 600,
            stored_len: 100,
            uncompressed_len: 200,
        });
        b.blob_size = 700;
        let mut g = Node::new(InodeKind::File, 0o644);
        g.size = 200;
        g.chunks = vec![6];
        b.nodes.push(g); // 7
        b.nodes.push(Node::new(InodeKind::Dir, 0o755)); // 8
        b.nodes[8].children.insert(b"g".to_vec(), 7);
        b.nodes[0].children.insert(b"sub".to_vec(), 8);
        let bytes = b.encode().unwrap();
        let index = IndexReader::new(bytes).unwrap();
        let root = index.lookup_path(b"").unwrap().unwrap();
        let offsets = |recs: Vec<ChunkRecord>| recs.iter().map(|c| c.offset).collect::<Vec<_>>();
        // f1 is cached; the read was at f3: f3, f4, f5 first, then f0, f2; never sub/g.
        let f1 = ChunkDigest([2; 32]);
        let guess = |budget| directory_guess(&index, root, 300, budget, |d| *d == f1);
        assert_eq!(offsets(guess(10_000)), vec![300, 400, 500, 0, 200]);
        assert_eq!(offsets(guess(300)), vec![300, 400, 500]);
        assert_eq!(offsets(guess(400)), vec![300, 400, 500, 0]);
        assert!(guess(99).is_empty());
        // Not a directory: nothing.
        let f0 = index.lookup(root, b"f0").unwrap().unwrap();
        assert!(directory_guess(&index, f0, 0, 10_000, |_| false).is_empty());
    }

    #[test]
    fn inode_locks_serialise_one_inode_and_not_others() {
        let locks = Arc::new(InodeLocks::default());
        let inside = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside, most) = (locks.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _held = locks.lock(7);
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        // Another inode is not held up by a held one.
        let _seven = locks.lock(7);
        let _eight = locks.lock(8);
    }

    #[test]
    fn readahead_keeps_ahead_of_a_streaming_reader() {
        const K: u64 = 1 << 10;
        const M: u64 = 1 << 20;
        let (cs, size) = (512 * K, 100 * M);
        // Read 128 KiB at a time to the end; what is asked for, and where.
        let stream = |max: u64| {
            let mut s = None;
            let mut asked = Vec::new();
            let mut at = 0;
            while at < size {
                if let Some(w) = ReadStream::advance(&mut s, at, at + 128 * K, size, cs, || max) {
                    asked.push((at, w));
                }
                at += 128 * K;
            }
            asked
        };
        for max in [4 * M, 32 * M] {
            let asked = stream(max);
            // The first read is on its own; the second asks for 4 MiB after its chunk.
            assert_eq!(asked[0], (128 * K, (512 * K, 4 * M)));
            // The whole file once, in order, never past its end, never more than the window
            // ahead of the reader's chunk.
            let mut next = 512 * K;
            for (read_at, (from, len)) in &asked {
                assert_eq!(*from, next, "{asked:?}");
                next = from + len;
                let chunk_end = (read_at + 128 * K).div_ceil(cs) * cs;
                assert!(next - chunk_end <= max, "{asked:?}");
            }
            assert_eq!(next, size);
            if max == 4 * M {
                // A slow link: one chunk at a time, as the reader enters the next chunk.
                assert!(asked[1..].iter().all(|(_, (_, l))| *l == cs), "{asked:?}");
            } else {
                // A fast link: the window grows, and so do the requests.
                assert!(asked.iter().any(|(_, (_, l))| *l >= 8 * M), "{asked:?}");
                assert!(asked.len() < 40, "{}", asked.len());
            }
        }
        // A jump starts a new stream: nothing until the reader is sequential again, then the
        // first window after its chunk.
        let mut s = None;
        for at in [0, 128 * K, 256 * K] {
            ReadStream::advance(&mut s, at, at + 128 * K, size, cs, || 32 * M);
        }
        assert_eq!(
            ReadStream::advance(&mut s, 10 * M, 10 * M + 4 * K, size, cs, || 32 * M),
            None
        );
        let w = ReadStream::advance(&mut s, 10 * M + 4 * K, 10 * M + 8 * K, size, cs, || 32 * M);
        assert_eq!(w, Some((10 * M + 512 * K, 4 * M)));
    }

    #[test]
    fn holes_are_told_from_data() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"data", 32 << 20).unwrap();
        f.sync_all().unwrap();
        let at = next_data(&f, 0).unwrap();
        // A filesystem without hole tracking reports data everywhere; one with it, the block.
        assert!(at == 0 || at == 32 << 20, "{at}");
        assert_eq!(next_data(&f, 1 << 40).unwrap(), u64::MAX);
    }

    #[test]
    fn extreme_times_do_not_panic() {
        for (s, n) in [
            (i64::MAX, 999_999_999),
            (i64::MIN, 0),
            (0, u32::MAX),
            (-1, 5),
        ] {
            let _ = super::mtime_of(s, n);
        }
        assert_eq!(super::mtime_of(1, 5), UNIX_EPOCH + Duration::new(1, 5));
    }
}
