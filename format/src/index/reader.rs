//! Reading an index: [`IndexReader::new`] checks the header, the checksum and every
//! cross-reference once, in time linear in the index size and with no allocation that depends
//! on the input; the queries afterwards trust what it checked and read records in place.

use super::records::*;
use super::IndexError;
use crate::chunk::ChunkDigest;
use crate::{FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Section {
    pub(super) offset: usize,
    pub(super) len: usize,
}

/// What a reader accepts at most: a node reads indexes from registries it does not control,
/// and each one is held in memory while its layer is mounted. The defaults are what
/// [`IndexReader::new`] uses; a node can set its own (beam-snapshotter's `[index]` config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Bytes of the whole index.
    pub max_len: usize,
    /// Inodes (files, directories, links...) in one layer.
    pub max_inodes: u64,
    /// Directories nested in one another below the root.
    pub max_depth: u32,
}

/// lz4's largest expansion, and slack for its fixed costs (token, offsets, last literals).
const LZ4_MAX_RATIO: u64 = 255;
const LZ4_RATIO_SLACK: u64 = 1024;

/// A directory nesting limit well above any real tree (4096-byte paths allow 2048 levels only
/// with one-letter names) and low enough for recursive tools.
pub const DEFAULT_MAX_DEPTH: u32 = 1024;
/// Inodes per layer; `beam convert` refuses layers with more entries than this.
pub const DEFAULT_MAX_INODES: u64 = 10_000_000;

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_len: MAX_INDEX_LEN,
            max_inodes: DEFAULT_MAX_INODES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// A validated index, queried in place. `B` is anything that holds the bytes (a `Vec`, an
/// `Arc<[u8]>`, a memory map).
pub struct IndexReader<B> {
    bytes: B,
    chunk_size: u32,
    blob_size: u64,
    pub(super) sections: [Section; SECTIONS],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<B: AsRef<[u8]>> IndexReader<B> {
    /// Check `bytes` (header, checksum, every reference) and wrap them for queries.
    pub fn new(bytes: B) -> Result<Self, IndexError> {
        Self::with_limits(bytes, &ReadLimits::default())
    }

    /// [`IndexReader::new`] with the node's own limits.
    pub fn with_limits(bytes: B, limits: &ReadLimits) -> Result<Self, IndexError> {
        let b = bytes.as_ref();
        if b.len() < HEADER_LEN {
            return Err(IndexError::TooShort(b.len()));
        }
        let max_len = limits.max_len.min(MAX_INDEX_LEN);
        if b.len() > max_len {
            return Err(IndexError::TooLong {
                len: b.len(),
                limit: max_len,
            });
        }
        let magic: [u8; 8] = b[0..8].try_into().expect("8 bytes");
        if &magic != MAGIC {
            return Err(IndexError::BadMagic(magic));
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(IndexError::UnsupportedVersion(version));
        }
        let mut hasher = Sha256::new();
        hasher.update(&b[..CHECKSUM_AT]);
        hasher.update([0u8; 32]);
        hasher.update(&b[CHECKSUM_AT + 32..]);
        let sum: [u8; 32] = hasher.finalize().into();
        if sum[..] != b[CHECKSUM_AT..CHECKSUM_AT + 32] {
            return Err(IndexError::BadChecksum);
        }
        let header_len = u32_at(b, 12) as usize;
        if header_len != HEADER_LEN {
            return Err(IndexError::SectionOutOfBounds {
                name: "header",
                offset: 0,
                len: header_len as u64,
                total: b.len(),
            });
        }
        let chunk_size = u32_at(b, 16);
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(IndexError::BadChunkSize(chunk_size));
        }
        let blob_size = u64_at(b, 24);
        let mut sections = [Section::default(); SECTIONS];
        for (i, s) in sections.iter_mut().enumerate() {
            let offset = u64_at(b, 32 + i * 16);
            let len = u64_at(b, 40 + i * 16);
            let end = offset.checked_add(len);
            if len == 0 {
                // Empty: where it points does not matter (an index written before the follows
                // section existed has zeros there).
                continue;
            }
            if offset < HEADER_LEN as u64 || end.is_none_or(|e| e > b.len() as u64) {
                return Err(IndexError::SectionOutOfBounds {
                    name: SECTION_NAMES[i],
                    offset,
                    len,
                    total: b.len(),
                });
            }
            if len % RECORD_LENS[i] as u64 != 0 {
                return Err(IndexError::SectionMisaligned {
                    name: SECTION_NAMES[i],
                    len,
                    record: RECORD_LENS[i],
                });
            }
            *s = Section {
                offset: offset as usize,
                len: len as usize,
            };
        }
        let reader = IndexReader {
            bytes,
            chunk_size,
            blob_size,
            sections,
        };
        reader.validate(limits)?;
        Ok(reader)
    }

    /// The bytes of section `sec` (empty when it is).
    pub(super) fn section_bytes(&self, sec: usize) -> &[u8] {
        let s = self.sections[sec];
        &self.bytes.as_ref()[s.offset..s.offset + s.len]
    }

    fn count(&self, sec: usize) -> u64 {
        (self.sections[sec].len / RECORD_LENS[sec]) as u64
    }

    fn record(&self, sec: usize, i: u64) -> &[u8] {
        let s = self.sections[sec];
        let len = RECORD_LENS[sec];
        let at = s.offset + i as usize * len;
        &self.bytes.as_ref()[at..at + len]
    }

    fn string(&self, off: u32, len: u32) -> Option<&[u8]> {
        let s = self.sections[SEC_STRINGS];
        let end = (off as usize).checked_add(len as usize)?;
        if end > s.len {
            return None;
        }
        Some(&self.bytes.as_ref()[s.offset + off as usize..s.offset + end])
    }

    /// Check every cross-reference once so that queries can trust them.
    fn validate(&self, limits: &ReadLimits) -> Result<(), IndexError> {
        let inodes = self.inode_count();
        if inodes == 0 {
            return Err(IndexError::BadInode {
                ino: ROOT_INO,
                reason: "the index has no root".into(),
            });
        }
        let max_inodes = limits.max_inodes.min(u32::MAX as u64);
        if inodes > max_inodes {
            return Err(IndexError::TooMany {
                what: "inodes",
                count: inodes,
                limit: max_inodes,
            });
        }
        let cs = self.chunk_size as u64;
        let nchunks = self.count(SEC_CHUNKS);
        for i in 0..nchunks {
            let c = self.chunk(i).map_err(|_| IndexError::BadChunk {
                index: i,
                reason: "unreadable".into(),
            })?;
            let bad = |reason: String| IndexError::BadChunk { index: i, reason };
            if c.uncompressed_len as u64 > cs {
                return Err(bad(format!(
                    "uncompressed length {} exceeds the chunk size {cs}",
                    c.uncompressed_len
                )));
            }
            if c.stored_len > c.uncompressed_len {
                return Err(bad(format!(
                    "stored length {} exceeds uncompressed length {}",
                    c.stored_len, c.uncompressed_len
                )));
            }
            // lz4 cannot expand more than about 255:1 (each further byte of a match length
            // stands for 255 bytes); a claim beyond that is not a chunk, whatever it decodes to.
            if (c.stored_len as u64) * LZ4_MAX_RATIO + LZ4_RATIO_SLACK < c.uncompressed_len as u64 {
                return Err(bad(format!(
                    "{} stored bytes cannot hold {} bytes (more than lz4's {LZ4_MAX_RATIO}:1)",
                    c.stored_len, c.uncompressed_len
                )));
            }
            if c.offset
                .checked_add(c.stored_len as u64)
                .is_none_or(|e| e > self.blob_size)
            {
                return Err(bad(format!(
                    "range {}+{} is past the end of the {}-byte chunk blob",
                    c.offset, c.stored_len, self.blob_size
                )));
            }
        }
        let ndirents = self.count(SEC_DIRENTS);
        let nrefs = self.count(SEC_REFS);
        let nxattrs = self.count(SEC_XATTRS);
        // Each inode's dirents, refs and xattrs must start where the previous inode's ended
        // (as the encoder writes them): ranges can then neither overlap nor be shared, and
        // validation stays linear in the index size whatever the input.
        let (mut next_dirent, mut next_ref, mut next_xattr) = (0u64, 0u64, 0u64);
        // Directories already named by an entry: a directory has exactly one name (two would
        // make the tree a graph, and walks and `..` ambiguous).
        // Depth of each named directory (0: not named yet; the root is 1). A directory's
        // children come after it (checked below), so one pass fills it.
        let mut named_dirs = vec![0u32; inodes as usize + 1];
        named_dirs[ROOT_INO as usize] = 1;
        for ino in 1..=inodes {
            let r = self.inode(ino)?;
            let bad = |reason: String| IndexError::BadInode { ino, reason };
            if r.xattr_first as u64 != next_xattr {
                return Err(bad("xattr records out of order".into()));
            }
            next_xattr += r.xattr_count as u64;
            match r.kind {
                InodeKind::Dir if r.a as u64 != next_dirent => {
                    return Err(bad("directory entries out of order".into()))
                }
                InodeKind::Dir => next_dirent += r.b as u64,
                InodeKind::File if r.a as u64 != next_ref => {
                    return Err(bad("chunk refs out of order".into()))
                }
                InodeKind::File => next_ref += r.b as u64,
                _ => {}
            }
            if r.mode > 0o7777 {
                return Err(bad(format!("mode {:o} has file-type bits", r.mode)));
            }
            if r.mtime_nsec >= 1_000_000_000 {
                return Err(bad(format!(
                    "mtime nanoseconds {} are not under one second",
                    r.mtime_nsec
                )));
            }
            if r.parent == 0 || r.parent > inodes {
                return Err(bad(format!("parent {} does not exist", r.parent)));
            }
            if ino == ROOT_INO && r.kind != InodeKind::Dir {
                return Err(bad("the root is not a directory".into()));
            }
            if (r.xattr_first as u64 + r.xattr_count as u64) > nxattrs {
                return Err(bad("xattr range out of bounds".into()));
            }
            for x in 0..r.xattr_count as u64 {
                let idx = r.xattr_first as u64 + x;
                let rec = self.xattr_record(idx);
                if self.string(rec.name_off, rec.name_len).is_none()
                    || self.string(rec.value_off, rec.value_len).is_none()
                    || rec.name_len == 0
                {
                    return Err(IndexError::BadXattr {
                        index: idx,
                        reason: "name or value out of bounds".into(),
                    });
                }
            }
            match r.kind {
                InodeKind::Dir => {
                    if r.a as u64 + r.b as u64 > ndirents {
                        return Err(bad("directory entries out of bounds".into()));
                    }
                    let mut prev: Option<&[u8]> = None;
                    for d in 0..r.b as u64 {
                        let idx = r.a as u64 + d;
                        let de = self.dirent_record(idx);
                        let bad_d = |reason: String| IndexError::BadDirent { index: idx, reason };
                        let name = self
                            .string(de.name_off, de.name_len as u32)
                            .ok_or_else(|| bad_d("name out of bounds".into()))?;
                        if name.is_empty()
                            || name.len() > MAX_NAME_LEN
                            || name == b"."
                            || name == b".."
                            || name.contains(&b'/')
                            || name.contains(&0)
                        {
                            return Err(bad_d(format!(
                                "invalid name {:?}",
                                String::from_utf8_lossy(name)
                            )));
                        }
                        if prev.is_some_and(|p| p >= name) {
                            return Err(bad_d("entries are not sorted by name".into()));
                        }
                        prev = Some(name);
                        if de.ino <= ROOT_INO || de.ino > inodes {
                            return Err(bad_d(format!("inode {} does not exist", de.ino)));
                        }
                        let child = self.inode(de.ino)?;
                        if child.kind == InodeKind::Dir && (child.parent != ino || de.ino <= ino) {
                            return Err(bad_d(format!(
                                "directory {} is not a child of {ino}",
                                de.ino
                            )));
                        }
                        if child.kind == InodeKind::Dir {
                            let depth = named_dirs[ino as usize].saturating_add(1);
                            let seen = &mut named_dirs[de.ino as usize];
                            if *seen != 0 {
                                return Err(bad_d(format!(
                                    "directory {} has a second name",
                                    de.ino
                                )));
                            }
                            *seen = depth;
                            // The root is depth 1: its subdirectories are one level deep.
                            if depth - 1 > limits.max_depth {
                                return Err(IndexError::TooDeep {
                                    ino: de.ino,
                                    depth: depth - 1,
                                    limit: limits.max_depth,
                                });
                            }
                        }
                    }
                }
                InodeKind::File => {
                    if r.a as u64 + r.b as u64 > nrefs {
                        return Err(bad("chunk refs out of bounds".into()));
                    }
                    if r.size.div_ceil(cs) != r.b as u64 {
                        return Err(bad(format!(
                            "size {} needs {} chunks, index lists {}",
                            r.size,
                            r.size.div_ceil(cs),
                            r.b
                        )));
                    }
                    for i in 0..r.b as u64 {
                        let c = u32_at(self.record(SEC_REFS, r.a as u64 + i), 0) as u64;
                        if c >= nchunks {
                            return Err(bad(format!("chunk {c} does not exist")));
                        }
                        let want = (r.size - i * cs).min(cs);
                        let got = self.chunk(c)?.uncompressed_len as u64;
                        if got != want {
                            return Err(bad(format!(
                                "chunk {i} of the file holds {got} bytes, expected {want}"
                            )));
                        }
                    }
                }
                InodeKind::Symlink if self.string(r.a, r.b).is_none() || r.b as u64 != r.size => {
                    return Err(bad("symlink target out of bounds".into()));
                }
                _ => {}
            }
        }
        if next_dirent != ndirents || next_ref != nrefs || next_xattr != nxattrs {
            return Err(IndexError::BadInode {
                ino: inodes,
                reason: "records not owned by any inode".into(),
            });
        }
        for i in 0..self.count(SEC_PREFETCH) {
            let ino = u32_at(self.record(SEC_PREFETCH, i), 0) as u64;
            if ino == 0 || ino > inodes {
                return Err(IndexError::BadPrefetch { index: i, ino });
            }
        }
        self.validate_follows(inodes)
    }

    /// The follows section: its layer table fits, every edge names inodes that exist (in
    /// this layer; another layer's inode numbers are checked against that layer's index when
    /// used) and a layer of the table, and edges are sorted by their first inode (lookups
    /// are binary searches).
    fn validate_follows(&self, inodes: u64) -> Result<(), IndexError> {
        let s = self.sections[SEC_FOLLOWS];
        if s.len == 0 {
            return Ok(());
        }
        let bad = |index: u64, reason: String| IndexError::BadFollow { index, reason };
        let b = &self.bytes.as_ref()[s.offset..s.offset + s.len];
        if b.len() < 4 {
            return Err(bad(0, "no layer count".into()));
        }
        let layers = u32_at(b, 0) as usize;
        if layers > MAX_FOLLOW_LAYERS {
            return Err(bad(
                0,
                format!("{layers} layers (at most {MAX_FOLLOW_LAYERS})"),
            ));
        }
        let edges_at = 4 + layers * 32;
        if edges_at > b.len() || (b.len() - edges_at) % FOLLOW_LEN != 0 {
            return Err(bad(
                0,
                format!(
                    "{} bytes do not hold {layers} layers and whole edges",
                    b.len()
                ),
            ));
        }
        let mut last = 0u64;
        for (i, e) in b[edges_at..].chunks_exact(FOLLOW_LEN).enumerate() {
            let from = u32_at(e, 0) as u64;
            let to = u32_at(e, 4);
            let (layer, ino) = ((to >> 24) as usize, (to & 0xff_ffff) as u64);
            if from == 0 || from > inodes {
                return Err(bad(i as u64, format!("inode {from} does not exist")));
            }
            if from < last {
                return Err(bad(i as u64, "edges out of order".into()));
            }
            last = from;
            if layer > layers || ino == 0 || (layer == 0 && ino > inodes) {
                return Err(bad(i as u64, format!("no inode {ino} in layer {layer}")));
            }
        }
        Ok(())
    }

    /// Chunk size the layer was cut with.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Length of the chunk blob this index points into.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// Number of inodes; valid inode numbers are `1..=inode_count()`.
    pub fn inode_count(&self) -> u64 {
        self.count(SEC_INODES)
    }

    /// Number of unique chunks.
    pub fn chunk_count(&self) -> u64 {
        self.count(SEC_CHUNKS)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// One inode.
    pub fn inode(&self, ino: u64) -> Result<InodeRecord, IndexError> {
        if ino == 0 || ino > self.inode_count() {
            return Err(IndexError::NoSuchInode(ino));
        }
        let r = self.record(SEC_INODES, ino - 1);
        let kind = InodeKind::from_u8(r[0]).ok_or_else(|| IndexError::BadInode {
            ino,
            reason: format!("unknown kind {}", r[0]),
        })?;
        Ok(InodeRecord {
            ino,
            kind,
            flags: r[1],
            mode: u32_at(r, 4),
            uid: u32_at(r, 8),
            gid: u32_at(r, 12),
            mtime: u64_at(r, 16) as i64,
            mtime_nsec: u32_at(r, 24),
            nlink: u32_at(r, 28),
            parent: u32_at(r, 32) as u64,
            size: u64_at(r, 36),
            a: u32_at(r, 44),
            b: u32_at(r, 48),
            xattr_first: u32_at(r, 52),
            xattr_count: u32_at(r, 56),
        })
    }

    fn dirent_record(&self, i: u64) -> DirentRecord {
        let r = self.record(SEC_DIRENTS, i);
        DirentRecord {
            name_off: u32_at(r, 0),
            name_len: u16_at(r, 4),
            ino: u64_at(r, 8),
        }
    }

    fn xattr_record(&self, i: u64) -> XattrRecord {
        let r = self.record(SEC_XATTRS, i);
        XattrRecord {
            name_off: u32_at(r, 0),
            name_len: u32_at(r, 4),
            value_off: u32_at(r, 8),
            value_len: u32_at(r, 12),
        }
    }

    fn name_of(&self, d: &DirentRecord) -> &[u8] {
        self.string(d.name_off, d.name_len as u32).unwrap_or(&[])
    }

    /// The `i`-th entry (name order) of directory `dir`.
    pub fn dirent(&self, dir: &InodeRecord, i: u32) -> Option<(&[u8], u64)> {
        if dir.kind != InodeKind::Dir || i >= dir.b {
            return None;
        }
        let d = self.dirent_record(dir.a as u64 + i as u64);
        Some((self.name_of(&d), d.ino))
    }

    /// Entries of directory `dir`, in name order.
    pub fn dirents<'a>(&'a self, dir: &InodeRecord) -> impl Iterator<Item = (&'a [u8], u64)> + 'a {
        let dir = *dir;
        let n = if dir.kind == InodeKind::Dir { dir.b } else { 0 };
        (0..n).filter_map(move |i| self.dirent(&dir, i))
    }

    /// Look `name` up in directory `dir` (binary search).
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<u64>, IndexError> {
        let d = self.inode(dir)?;
        if d.kind != InodeKind::Dir {
            return Ok(None);
        }
        let (mut lo, mut hi) = (0u32, d.b);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let rec = self.dirent_record(d.a as u64 + mid as u64);
            match self.name_of(&rec).cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(rec.ino)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Look a `/`-separated path up from the root ("" and "/" are the root).
    pub fn lookup_path(&self, path: &[u8]) -> Result<Option<u64>, IndexError> {
        let mut ino = ROOT_INO;
        for comp in path.split(|c| *c == b'/').filter(|c| !c.is_empty()) {
            match self.lookup(ino, comp)? {
                Some(i) => ino = i,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    /// A symlink's target.
    pub fn symlink_target(&self, inode: &InodeRecord) -> &[u8] {
        if inode.kind != InodeKind::Symlink {
            return &[];
        }
        self.string(inode.a, inode.b).unwrap_or(&[])
    }

    /// Extended attributes of an inode, in name order.
    pub fn xattrs<'a>(
        &'a self,
        inode: &InodeRecord,
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let (first, n) = (inode.xattr_first as u64, inode.xattr_count as u64);
        (first..first + n).map(move |i| {
            let r = self.xattr_record(i);
            (
                self.string(r.name_off, r.name_len).unwrap_or(&[]),
                self.string(r.value_off, r.value_len).unwrap_or(&[]),
            )
        })
    }

    /// Position in the chunk table of the `i`-th chunk of a file.
    pub fn file_chunk(&self, file: &InodeRecord, i: u32) -> Option<u64> {
        if file.kind != InodeKind::File || i >= file.b {
            return None;
        }
        Some(u32_at(self.record(SEC_REFS, file.a as u64 + i as u64), 0) as u64)
    }

    /// Chunk table positions of a file's chunks, in file order.
    pub fn file_chunks<'a>(&'a self, file: &InodeRecord) -> impl Iterator<Item = u64> + 'a {
        let f = *file;
        let n = if f.kind == InodeKind::File { f.b } else { 0 };
        (0..n).filter_map(move |i| self.file_chunk(&f, i))
    }

    /// One chunk record.
    pub fn chunk(&self, i: u64) -> Result<ChunkRecord, IndexError> {
        if i >= self.chunk_count() {
            return Err(IndexError::BadChunk {
                index: i,
                reason: "does not exist".into(),
            });
        }
        let r = self.record(SEC_CHUNKS, i);
        Ok(ChunkRecord {
            digest: ChunkDigest(r[0..32].try_into().expect("32 bytes")),
            offset: u64_at(r, 32),
            stored_len: u32_at(r, 40),
            uncompressed_len: u32_at(r, 44),
        })
    }

    /// What reading file `ino` is known to load next, found at conversion (a Python
    /// module's imports, an ELF file's libraries): `(layer, inode)` pairs, where layer 0 is
    /// this layer and layer `n` the one [`IndexReader::follow_layer`]`(n)` names.
    pub fn follows(&self, ino: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        let (b, edges_at) = self.follow_parts();
        let edges = &b[edges_at..];
        let n = edges.len() / FOLLOW_LEN;
        let from_at = |i: usize| u32_at(edges, i * FOLLOW_LEN) as u64;
        // First edge from `ino`: edges are sorted by their first inode (validated).
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if from_at(mid) < ino {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo..n)
            .take_while(move |&i| from_at(i) == ino)
            .map(move |i| {
                let to = u32_at(edges, i * FOLLOW_LEN + 4);
                ((to >> 24) as usize, (to & 0xff_ffff) as u64)
            })
    }

    /// The diff_id (sha256) of layer `n` (1-based) of the follows section's layer table.
    pub fn follow_layer(&self, n: usize) -> Option<[u8; 32]> {
        let (b, _) = self.follow_parts();
        let at = 4 + n.checked_sub(1)? * 32;
        (n <= self.follow_layer_count()).then(|| b[at..at + 32].try_into().expect("32 bytes"))
    }

    /// How many other layers the follows section names.
    pub fn follow_layer_count(&self) -> usize {
        let (b, _) = self.follow_parts();
        if b.len() < 4 {
            0
        } else {
            u32_at(b, 0) as usize
        }
    }

    /// The follows section's bytes and where its edges start (both empty when it is).
    fn follow_parts(&self) -> (&[u8], usize) {
        let s = self.sections[SEC_FOLLOWS];
        if s.len == 0 {
            return (&[], 0);
        }
        let b = &self.bytes.as_ref()[s.offset..s.offset + s.len];
        (b, 4 + u32_at(b, 0) as usize * 32)
    }

    /// Inode numbers in recorded access order (empty when no trace was recorded).
    pub fn prefetch(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count(SEC_PREFETCH)).map(move |i| u32_at(self.record(SEC_PREFETCH, i), 0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::encoder::seal as reseal;
    use crate::index::sample;
    use crate::index::Node;

    #[test]
    fn encodes_and_queries_a_tree() {
        let bytes = sample().encode().unwrap();
        let r = IndexReader::new(bytes).unwrap();
        assert_eq!(r.inode_count(), 6);
        let root = r.inode(ROOT_INO).unwrap();
        assert_eq!(root.kind, InodeKind::Dir);
        assert_eq!(root.nlink, 3);
        let names: Vec<_> = r.dirents(&root).map(|(n, _)| n.to_vec()).collect();
        assert_eq!(names, vec![b"a".to_vec(), b"d".to_vec(), b"dev".to_vec()]);

        let a = r.lookup_path(b"/a").unwrap().unwrap();
        let b = r.lookup_path(b"d/b").unwrap().unwrap();
        assert_eq!(a, b, "hard links share an inode");
        let f = r.inode(a).unwrap();
        assert_eq!(
            (f.kind, f.mode, f.uid, f.nlink, f.size),
            (InodeKind::File, 0o4755, 1000, 2, 4106)
        );
        assert_eq!(r.file_chunks(&f).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(
            r.xattrs(&f).collect::<Vec<_>>(),
            vec![(&b"security.capability"[..], &[1u8, 2, 3][..])]
        );
        let d = r.inode(r.lookup_path(b"d").unwrap().unwrap()).unwrap();
        assert!(d.is_opaque());
        assert_eq!(d.mode, 0o1777);
        let l = r.inode(r.lookup_path(b"d/l").unwrap().unwrap()).unwrap();
        assert_eq!(r.symlink_target(&l), b"../a");
        assert_eq!(l.parent, d.ino);
        let w = r.inode(r.lookup_path(b"d/w").unwrap().unwrap()).unwrap();
        assert_eq!(w.kind, InodeKind::Whiteout);
        let dev = r.inode(r.lookup_path(b"dev").unwrap().unwrap()).unwrap();
        assert_eq!(dev.rdev(), (1, 3));
        assert_eq!(r.lookup_path(b"d/missing").unwrap(), None);
        assert_eq!(
            r.lookup_path(b"a/x").unwrap(),
            None,
            "a file has no entries"
        );
        assert_eq!(r.prefetch().collect::<Vec<_>>(), vec![l.ino, f.ino]);
    }

    /// An index of `depth` directories nested in one another below the root.
    fn nested(depth: usize) -> Vec<u8> {
        let mut b = sample();
        b.nodes = vec![Node::new(InodeKind::Dir, 0o755)];
        b.chunks.clear();
        b.prefetch.clear();
        for i in 1..=depth {
            b.nodes.push(Node::new(InodeKind::Dir, 0o755));
            b.nodes[i - 1].children.insert(b"d".to_vec(), i);
        }
        b.encode().unwrap()
    }

    #[test]
    fn limits_accept_an_index_at_them_and_refuse_one_past() {
        let bytes = nested(5);
        let at = ReadLimits {
            max_len: bytes.len(),
            max_inodes: 6,
            max_depth: 5,
        };
        IndexReader::with_limits(&bytes, &at).unwrap();
        assert_eq!(
            IndexReader::with_limits(
                &bytes,
                &ReadLimits {
                    max_len: bytes.len() - 1,
                    ..at
                }
            )
            .err(),
            Some(IndexError::TooLong {
                len: bytes.len(),
                limit: bytes.len() - 1
            })
        );
        assert_eq!(
            IndexReader::with_limits(
                &bytes,
                &ReadLimits {
                    max_inodes: 5,
                    ..at
                }
            )
            .err(),
            Some(IndexError::TooMany {
                what: "inodes",
                count: 6,
                limit: 5
            })
        );
        assert_eq!(
            IndexReader::with_limits(&bytes, &ReadLimits { max_depth: 4, ..at }).err(),
            Some(IndexError::TooDeep {
                ino: 6,
                depth: 5,
                limit: 4
            })
        );
        // The defaults take a tree 1024 deep and refuse 1025.
        IndexReader::new(nested(DEFAULT_MAX_DEPTH as usize)).unwrap();
        assert!(matches!(
            IndexReader::new(nested(DEFAULT_MAX_DEPTH as usize + 1)),
            Err(IndexError::TooDeep { .. })
        ));
    }

    #[test]
    fn a_chunk_claiming_more_than_lz4_can_expand_is_refused() {
        let mut b = sample();
        b.chunk_size = 1 << 20;
        b.blob_size = 1 << 20;
        for n in &mut b.nodes {
            if n.kind == InodeKind::File {
                n.size = 1 << 20;
                n.chunks = vec![0];
            }
        }
        b.chunks.truncate(1);
        b.chunks[0].uncompressed_len = 1 << 20;
        // 1 MiB from 4096 stored bytes (256:1 with slack): the most lz4 can do.
        b.chunks[0].stored_len = ((1u64 << 20) - LZ4_RATIO_SLACK).div_ceil(LZ4_MAX_RATIO) as u32;
        IndexReader::new(b.encode().unwrap()).unwrap();
        b.chunks[0].stored_len -= 1;
        let Err(IndexError::BadChunk { reason, .. }) = IndexReader::new(b.encode().unwrap()) else {
            panic!("an impossible expansion was accepted");
        };
        assert!(reason.contains("lz4"), "{reason}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(IndexReader::new(&bytes[..n]).is_err(), "truncated to {n}");
        }
    }

    #[test]
    fn every_flipped_byte_is_an_error() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(IndexReader::new(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn a_damaged_follows_section_is_refused() {
        use crate::index::{with_follows, Follow};
        let e = |from, layer, ino| Follow { from, layer, ino };
        let good = with_follows(
            &sample().encode().unwrap(),
            &[[1; 32]],
            &[e(2, 0, 3), e(4, 1, 5)],
        )
        .unwrap();
        let s = u64_at(&good, 32 + SEC_FOLLOWS * 16) as usize;
        let edges = s + 4 + 32;
        let damaged = |at: usize, v: u32| {
            let mut b = good.clone();
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            reseal(&mut b);
            IndexReader::new(&b).err()
        };
        assert_eq!(
            damaged(0, u32::from_le_bytes(good[0..4].try_into().unwrap())),
            None
        );
        // Out of order, a missing first inode, a missing inode of this layer, a layer
        // outside the table, a table larger than the section.
        assert!(matches!(
            damaged(edges, 5),
            Some(IndexError::BadFollow { .. })
        ));
        assert!(matches!(
            damaged(edges, 0),
            Some(IndexError::BadFollow { .. })
        ));
        assert!(matches!(
            damaged(edges + 4, 99),
            Some(IndexError::BadFollow { .. })
        ));
        assert!(matches!(
            damaged(edges + 4, (2 << 24) | 1),
            Some(IndexError::BadFollow { .. })
        ));
        assert!(matches!(damaged(s, 3), Some(IndexError::BadFollow { .. })));
        assert!(matches!(
            damaged(s, u32::MAX),
            Some(IndexError::BadFollow { .. })
        ));
    }

    #[test]
    fn structural_damage_behind_a_valid_checksum_is_caught() {
        let good = sample().encode().unwrap();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(IndexReader::new(&b), Err(IndexError::BadMagic(_))));

        let mut b = good.clone();
        b[8] = 9;
        reseal(&mut b);
        assert_eq!(
            IndexReader::new(&b).err(),
            Some(IndexError::UnsupportedVersion(9))
        );

        // A section offset past the end.
        let mut b = good.clone();
        b[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(
            IndexReader::new(&b),
            Err(IndexError::SectionOutOfBounds { name: "inodes", .. })
        ));

        // A huge dirent count in the root inode.
        let mut b = good.clone();
        let root = HEADER_LEN;
        b[root + 48..root + 52].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(
            IndexReader::new(&b),
            Err(IndexError::BadInode { ino: 1, .. })
        ));

        // A chunk pointing past the end of the blob.
        let r = IndexReader::new(&good).unwrap();
        let chunks_at = r.sections[SEC_CHUNKS].offset;
        let mut b = good.clone();
        b[chunks_at + 32..chunks_at + 40].copy_from_slice(&1_000_000u64.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(
            IndexReader::new(&b),
            Err(IndexError::BadChunk { index: 0, .. })
        ));

        // A dirent named "..".
        let dirents_at = r.sections[SEC_DIRENTS].offset;
        let strings_at = r.sections[SEC_STRINGS].offset;
        let mut b = good.clone();
        let off = u32_at(&b, dirents_at) as usize;
        b[strings_at + off] = b'.';
        b[dirents_at + 4..dirents_at + 6].copy_from_slice(&2u16.to_le_bytes());
        b[strings_at + off + 1] = b'.';
        reseal(&mut b);
        assert!(IndexReader::new(&b).is_err());
    }

    /// Directories sharing one range of entries (K x M validation work) are refused outright.
    #[test]
    fn shared_record_ranges_are_refused() {
        let good = sample().encode().unwrap();
        let r = IndexReader::new(&good).unwrap();
        let d = r.lookup_path(b"d").unwrap().unwrap();
        let at = HEADER_LEN + (d as usize - 1) * INODE_LEN;
        let mut b = good.clone();
        b[at + 44..at + 48].copy_from_slice(&0u32.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(
            IndexReader::new(&b),
            Err(IndexError::BadInode { .. })
        ));
    }

    #[test]
    fn nanoseconds_of_a_second_or_more_are_refused() {
        let mut b = sample();
        b.nodes[3].mtime_nsec = 1_000_000_000;
        let Err(e) = IndexReader::new(b.encode().unwrap()) else {
            panic!("an index with 1e9 nanoseconds was accepted");
        };
        assert!(e.to_string().contains("nanoseconds"), "{e}");
        let mut b = sample();
        b.nodes[3].mtime = i64::MAX;
        b.nodes[3].mtime_nsec = 999_999_999;
        IndexReader::new(b.encode().unwrap()).unwrap();
    }

    #[test]
    fn one_directory_under_two_names_is_refused() {
        // The root's entries are `a`, `d` (a directory), `dev`: make `dev` name `d`'s inode.
        let good = sample().encode().unwrap();
        let r = IndexReader::new(&good).unwrap();
        let ino_at = |i: usize| r.sections[SEC_DIRENTS].offset + i * DIRENT_LEN + 8;
        let d = u64::from_le_bytes(good[ino_at(1)..ino_at(1) + 8].try_into().unwrap());
        assert_eq!(r.inode(d).unwrap().kind, InodeKind::Dir);
        let mut b = good.clone();
        b[ino_at(2)..ino_at(2) + 8].copy_from_slice(&d.to_le_bytes());
        reseal(&mut b);
        let Err(e) = IndexReader::new(&b) else {
            panic!("a directory with two names was accepted");
        };
        assert!(e.to_string().contains("second name"), "{e}");
    }
}
