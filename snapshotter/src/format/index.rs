//! The index blob: a checksummed table of a layer's tree, queried in place.
//!
//! Encoding (all integers little-endian; `docs/format.md` has the same in prose):
//!
//! ```text
//! header   192 bytes   magic "BEAMIDX\0", version, chunk size, flags, chunk blob size,
//!                      7 sections (offset, length), sha256 over the whole index with the
//!                      checksum field zeroed
//! inodes   64 bytes each; inode number = position + 1, root = 1
//! dirents  16 bytes each; a directory's entries are contiguous and sorted by name bytes
//! chunks   48 bytes each; sha256, offset in the chunk blob, stored and uncompressed length
//! refs      4 bytes each; a file's chunks, in file order (chunk i covers [i*cs, (i+1)*cs))
//! xattrs   16 bytes each; name and value as ranges of the string section
//! strings  names, symlink targets, xattr names and values
//! prefetch  4 bytes each; inode numbers in the order a recorded workload first read them
//! ```
//!
//! Every record has a fixed size, so a lookup reads only what it needs: a path lookup is a
//! binary search per component, `getattr` one record. [`IndexReader::new`] checks the header,
//! the checksum and every cross-reference once, with no allocation that depends on the input,
//! so that the accessors afterwards cannot index out of bounds; they still return errors rather
//! than panic.

use super::chunk::ChunkDigest;
use super::{FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Magic bytes at the start of every index.
pub const MAGIC: &[u8; 8] = b"BEAMIDX\0";
/// Size of the fixed header.
pub const HEADER_LEN: usize = 192;
/// Inode number of the layer's root directory.
pub const ROOT_INO: u64 = 1;
/// Largest index a reader accepts (1 GiB): bounds what a hostile blob can make us hold.
pub const MAX_INDEX_LEN: usize = 1 << 30;
/// Longest name of one directory entry, as in Linux.
pub const MAX_NAME_LEN: usize = 255;

const INODE_LEN: usize = 64;
const DIRENT_LEN: usize = 16;
const CHUNK_LEN: usize = 48;
const REF_LEN: usize = 4;
const XATTR_LEN: usize = 16;
const PREFETCH_LEN: usize = 4;
const SECTIONS: usize = 7;
const SEC_INODES: usize = 0;
const SEC_DIRENTS: usize = 1;
const SEC_CHUNKS: usize = 2;
const SEC_REFS: usize = 3;
const SEC_XATTRS: usize = 4;
const SEC_STRINGS: usize = 5;
const SEC_PREFETCH: usize = 6;
const SECTION_NAMES: [&str; SECTIONS] = [
    "inodes", "dirents", "chunks", "refs", "xattrs", "strings", "prefetch",
];
const RECORD_LENS: [usize; SECTIONS] = [
    INODE_LEN,
    DIRENT_LEN,
    CHUNK_LEN,
    REF_LEN,
    XATTR_LEN,
    1,
    PREFETCH_LEN,
];
const CHECKSUM_AT: usize = 160;

/// Inode flag: this directory is opaque (OCI `.wh..wh..opq`).
pub const FLAG_OPAQUE: u8 = 1;

/// What a malformed index looks like to the caller. Every variant names what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("index is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("index is {0} bytes, larger than the {MAX_INDEX_LEN}-byte limit")]
    TooLong(usize),
    #[error("not a Beam index: bad magic {0:02x?}")]
    BadMagic([u8; 8]),
    #[error("unsupported Beam index version {0} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("index checksum mismatch: the index is corrupt or truncated")]
    BadChecksum,
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    #[error("section {name} at {offset}+{len} does not fit the {total}-byte index")]
    SectionOutOfBounds {
        name: &'static str,
        offset: u64,
        len: u64,
        total: usize,
    },
    #[error("section {name} length {len} is not a multiple of its {record}-byte record")]
    SectionMisaligned {
        name: &'static str,
        len: u64,
        record: usize,
    },
    #[error("inode {ino}: {reason}")]
    BadInode { ino: u64, reason: String },
    #[error("directory entry {index}: {reason}")]
    BadDirent { index: u64, reason: String },
    #[error("chunk {index}: {reason}")]
    BadChunk { index: u64, reason: String },
    #[error("xattr record {index}: {reason}")]
    BadXattr { index: u64, reason: String },
    #[error("prefetch entry {index}: inode {ino} does not exist")]
    BadPrefetch { index: u64, ino: u64 },
    #[error("no inode {0}")]
    NoSuchInode(u64),
    #[error("too many {what}: {count} (limit {limit})")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: u64,
    },
}

/// The type of an inode, as the tar entry it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum InodeKind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    CharDev = 4,
    BlockDev = 5,
    Fifo = 6,
    /// An OCI whiteout (`.wh.NAME` in the tar): NAME is deleted from the layers below.
    /// Presented to overlayfs as a character device 0/0.
    Whiteout = 7,
}

impl InodeKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => InodeKind::File,
            2 => InodeKind::Dir,
            3 => InodeKind::Symlink,
            4 => InodeKind::CharDev,
            5 => InodeKind::BlockDev,
            6 => InodeKind::Fifo,
            7 => InodeKind::Whiteout,
            _ => return None,
        })
    }
}

/// One inode as stored. `a`/`b` depend on the kind: first dirent and count for a directory,
/// first chunk ref and count for a file, string offset and length for a symlink, device
/// major and minor for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InodeRecord {
    pub ino: u64,
    pub kind: InodeKind,
    pub flags: u8,
    /// Permission bits incl. setuid, setgid and sticky (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u32,
    /// Inode number of the directory holding this inode's first name.
    pub parent: u64,
    /// File size; length of a symlink's target; 0 otherwise.
    pub size: u64,
    a: u32,
    b: u32,
    xattr_first: u32,
    xattr_count: u32,
}

impl InodeRecord {
    /// Device numbers of a character or block device (0/0 for a whiteout).
    pub fn rdev(&self) -> (u32, u32) {
        match self.kind {
            InodeKind::CharDev | InodeKind::BlockDev => (self.a, self.b),
            _ => (0, 0),
        }
    }

    /// Whether this directory hides the layers below it (OCI opaque directory).
    pub fn is_opaque(&self) -> bool {
        self.flags & FLAG_OPAQUE != 0
    }

    /// Number of entries of a directory, chunks of a file, 0 otherwise.
    pub fn child_count(&self) -> u32 {
        match self.kind {
            InodeKind::Dir | InodeKind::File => self.b,
            _ => 0,
        }
    }

    /// Number of extended attributes.
    pub fn xattr_count(&self) -> u32 {
        self.xattr_count
    }
}

/// One directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirentRecord {
    pub ino: u64,
    name_off: u32,
    name_len: u16,
}

/// One unique chunk of the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    pub digest: ChunkDigest,
    /// Offset of the stored bytes in the chunk blob.
    pub offset: u64,
    /// Length of the stored bytes; equal to `uncompressed_len` when stored raw.
    pub stored_len: u32,
    pub uncompressed_len: u32,
}

impl ChunkRecord {
    /// Whether the stored bytes are lz4-compressed.
    pub fn is_compressed(&self) -> bool {
        self.stored_len < self.uncompressed_len
    }
}

/// One extended attribute, as ranges of the string section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XattrRecord {
    name_off: u32,
    name_len: u32,
    value_off: u32,
    value_len: u32,
}

// ---------------------------------------------------------------------------------------------
// Writing

/// A node of the tree handed to [`IndexBuilder`]. Hard links are several directory entries
/// naming the same node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: InodeKind,
    pub opaque: bool,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Files: size in bytes.
    pub size: u64,
    /// Devices: (major, minor).
    pub rdev: (u32, u32),
    /// Symlinks: target.
    pub target: Vec<u8>,
    /// Sorted by name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Files: chunk table positions, in file order.
    pub chunks: Vec<u32>,
    /// Directories: entries by name, each naming a node id of the tree.
    pub children: BTreeMap<Vec<u8>, usize>,
}

impl Node {
    /// A node of `kind` with mode `mode`, root-owned, time 0, nothing else.
    pub fn new(kind: InodeKind, mode: u32) -> Self {
        Node {
            kind,
            opaque: false,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            rdev: (0, 0),
            target: Vec::new(),
            xattrs: BTreeMap::new(),
            chunks: Vec::new(),
            children: BTreeMap::new(),
        }
    }
}

/// Encodes a tree (node 0 is the root directory) and a chunk table into an index.
pub struct IndexBuilder {
    pub chunk_size: u32,
    /// Total length of the chunk blob the chunk records point into.
    pub blob_size: u64,
    pub nodes: Vec<Node>,
    pub chunks: Vec<ChunkRecord>,
    /// Node ids in the order a recorded workload read them.
    pub prefetch: Vec<usize>,
}

#[derive(Default)]
struct Strings {
    bytes: Vec<u8>,
}

impl Strings {
    fn add(&mut self, s: &[u8]) -> u32 {
        let off = self.bytes.len() as u32;
        self.bytes.extend_from_slice(s);
        off
    }
}

impl IndexBuilder {
    /// Encode. Inode numbers follow a depth-first walk in name order, so the same tree always
    /// gives the same bytes, and a directory's inode number is smaller than its children's.
    pub fn encode(&self) -> Result<Vec<u8>, IndexError> {
        let n = self.nodes.len();
        if n == 0 || self.nodes[0].kind != InodeKind::Dir {
            return Err(IndexError::BadInode {
                ino: ROOT_INO,
                reason: "the root is not a directory".into(),
            });
        }
        // Assign inode numbers: depth-first, pre-order, children in name order.
        let mut ino_of = vec![0u64; n];
        let mut parent_of = vec![0u64; n];
        let mut nlink = vec![0u32; n];
        let mut order: Vec<usize> = Vec::with_capacity(n);
        ino_of[0] = ROOT_INO;
        parent_of[0] = ROOT_INO;
        order.push(0);
        let mut stack: Vec<(usize, Vec<usize>)> = vec![(0, self.child_ids(0))];
        while let Some((dir, pending)) = stack.last_mut() {
            let dir = *dir;
            let Some(child) = pending.pop() else {
                stack.pop();
                continue;
            };
            nlink[child] += 1;
            if ino_of[child] != 0 {
                if self.nodes[child].kind == InodeKind::Dir {
                    return Err(IndexError::BadInode {
                        ino: ino_of[child],
                        reason: "directory has more than one name".into(),
                    });
                }
                continue;
            }
            order.push(child);
            ino_of[child] = order.len() as u64;
            parent_of[child] = ino_of[dir];
            if self.nodes[child].kind == InodeKind::Dir {
                let ids = self.child_ids(child);
                stack.push((child, ids));
            }
        }
        for (id, node) in self.nodes.iter().enumerate() {
            if node.kind == InodeKind::Dir {
                // "." and the entry in the parent, plus each subdirectory's "..".
                nlink[id] = 2 + node
                    .children
                    .values()
                    .filter(|c| self.nodes[**c].kind == InodeKind::Dir)
                    .count() as u32;
            }
        }

        let mut strings = Strings::default();
        let mut inodes = Vec::with_capacity(order.len() * INODE_LEN);
        let mut dirents = Vec::new();
        let mut refs = Vec::new();
        let mut xattrs = Vec::new();
        let mut dirent_count: u64 = 0;
        let mut ref_count: u64 = 0;
        let mut xattr_count: u64 = 0;
        for &id in &order {
            let node = &self.nodes[id];
            let (a, b) = match node.kind {
                InodeKind::Dir => {
                    let first = dirent_count;
                    for (name, child) in &node.children {
                        let off = strings.add(name);
                        dirents.extend_from_slice(&off.to_le_bytes());
                        dirents.extend_from_slice(&(name.len() as u16).to_le_bytes());
                        dirents.extend_from_slice(&[0u8; 2]);
                        dirents.extend_from_slice(&ino_of[*child].to_le_bytes());
                        dirent_count += 1;
                    }
                    (first as u32, node.children.len() as u32)
                }
                InodeKind::File => {
                    let first = ref_count;
                    for c in &node.chunks {
                        refs.extend_from_slice(&c.to_le_bytes());
                        ref_count += 1;
                    }
                    (first as u32, node.chunks.len() as u32)
                }
                InodeKind::Symlink => (strings.add(&node.target), node.target.len() as u32),
                InodeKind::CharDev | InodeKind::BlockDev => node.rdev,
                InodeKind::Fifo | InodeKind::Whiteout => (0, 0),
            };
            let xfirst = xattr_count;
            for (k, v) in &node.xattrs {
                let ko = strings.add(k);
                let vo = strings.add(v);
                xattrs.extend_from_slice(&ko.to_le_bytes());
                xattrs.extend_from_slice(&(k.len() as u32).to_le_bytes());
                xattrs.extend_from_slice(&vo.to_le_bytes());
                xattrs.extend_from_slice(&(v.len() as u32).to_le_bytes());
                xattr_count += 1;
            }
            let size = match node.kind {
                InodeKind::File => node.size,
                InodeKind::Symlink => node.target.len() as u64,
                _ => 0,
            };
            let mut rec = [0u8; INODE_LEN];
            rec[0] = node.kind as u8;
            rec[1] = if node.opaque { FLAG_OPAQUE } else { 0 };
            rec[4..8].copy_from_slice(&(node.mode & 0o7777).to_le_bytes());
            rec[8..12].copy_from_slice(&node.uid.to_le_bytes());
            rec[12..16].copy_from_slice(&node.gid.to_le_bytes());
            rec[16..24].copy_from_slice(&node.mtime.to_le_bytes());
            rec[24..28].copy_from_slice(&node.mtime_nsec.to_le_bytes());
            rec[28..32].copy_from_slice(&nlink[id].to_le_bytes());
            rec[32..36].copy_from_slice(&(parent_of[id] as u32).to_le_bytes());
            rec[36..44].copy_from_slice(&size.to_le_bytes());
            rec[44..48].copy_from_slice(&a.to_le_bytes());
            rec[48..52].copy_from_slice(&b.to_le_bytes());
            rec[52..56].copy_from_slice(&(xfirst as u32).to_le_bytes());
            rec[56..60].copy_from_slice(&(node.xattrs.len() as u32).to_le_bytes());
            inodes.extend_from_slice(&rec);
        }
        let mut chunks = Vec::with_capacity(self.chunks.len() * CHUNK_LEN);
        for c in &self.chunks {
            chunks.extend_from_slice(&c.digest.0);
            chunks.extend_from_slice(&c.offset.to_le_bytes());
            chunks.extend_from_slice(&c.stored_len.to_le_bytes());
            chunks.extend_from_slice(&c.uncompressed_len.to_le_bytes());
        }
        let mut prefetch = Vec::with_capacity(self.prefetch.len() * PREFETCH_LEN);
        for id in &self.prefetch {
            prefetch.extend_from_slice(&(ino_of[*id] as u32).to_le_bytes());
        }

        let sections: [&[u8]; SECTIONS] = [
            &inodes,
            &dirents,
            &chunks,
            &refs,
            &xattrs,
            &strings.bytes,
            &prefetch,
        ];
        let total: usize = HEADER_LEN + sections.iter().map(|s| s.len()).sum::<usize>();
        if total > MAX_INDEX_LEN {
            return Err(IndexError::TooLong(total));
        }
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // flags
        out.extend_from_slice(&self.blob_size.to_le_bytes());
        let mut offset = HEADER_LEN as u64;
        for s in &sections {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            offset += s.len() as u64;
        }
        out.resize(HEADER_LEN, 0);
        for s in &sections {
            out.extend_from_slice(s);
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out[CHECKSUM_AT..CHECKSUM_AT + 32].copy_from_slice(&sum);
        Ok(out)
    }

    /// Children of a directory node, reversed so that popping yields name order.
    fn child_ids(&self, dir: usize) -> Vec<usize> {
        self.nodes[dir].children.values().rev().copied().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

#[derive(Debug, Clone, Copy, Default)]
struct Section {
    offset: usize,
    len: usize,
}

/// A validated index, queried in place. `B` is anything that holds the bytes (a `Vec`, an
/// `Arc<[u8]>`, a memory map).
pub struct IndexReader<B> {
    bytes: B,
    chunk_size: u32,
    blob_size: u64,
    sections: [Section; SECTIONS],
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
        let b = bytes.as_ref();
        if b.len() < HEADER_LEN {
            return Err(IndexError::TooShort(b.len()));
        }
        if b.len() > MAX_INDEX_LEN {
            return Err(IndexError::TooLong(b.len()));
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
        reader.validate()?;
        Ok(reader)
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
    fn validate(&self) -> Result<(), IndexError> {
        let inodes = self.inode_count();
        if inodes == 0 {
            return Err(IndexError::BadInode {
                ino: ROOT_INO,
                reason: "the index has no root".into(),
            });
        }
        if inodes > u32::MAX as u64 {
            return Err(IndexError::TooMany {
                what: "inodes",
                count: inodes,
                limit: u32::MAX as u64,
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

    /// Inode numbers in recorded access order (empty when no trace was recorded).
    pub fn prefetch(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count(SEC_PREFETCH)).map(move |i| u32_at(self.record(SEC_PREFETCH, i), 0) as u64)
    }
}

/// The same index with its prefetch list replaced by `inos` (in order; unknown or repeated
/// inode numbers are dropped). Everything else stays byte for byte.
pub fn with_prefetch(bytes: &[u8], inos: &[u64]) -> Result<Vec<u8>, IndexError> {
    let r = IndexReader::new(bytes)?;
    let at = r.sections[SEC_PREFETCH].offset;
    let mut out = bytes[..at].to_vec();
    let mut seen = std::collections::HashSet::new();
    let mut n = 0u64;
    for &ino in inos {
        if ino >= 1 && ino <= r.inode_count() && seen.insert(ino) {
            out.extend_from_slice(&(ino as u32).to_le_bytes());
            n += 1;
        }
    }
    let len_at = 40 + SEC_PREFETCH * 16;
    out[len_at..len_at + 8].copy_from_slice(&(n * PREFETCH_LEN as u64).to_le_bytes());
    out[CHECKSUM_AT..CHECKSUM_AT + 32].fill(0);
    let sum: [u8; 32] = Sha256::digest(&out).into();
    out[CHECKSUM_AT..CHECKSUM_AT + 32].copy_from_slice(&sum);
    IndexReader::new(&out[..])?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_lists_can_be_replaced() {
        let bytes = sample().encode().unwrap();
        let out = with_prefetch(&bytes, &[4, 2, 4, 99, 0]).unwrap();
        let r = IndexReader::new(&out[..]).unwrap();
        assert_eq!(r.prefetch().collect::<Vec<_>>(), vec![4, 2]);
        assert_eq!(r.inode_count(), 6);
        let again = with_prefetch(&out, &[3]).unwrap();
        assert_eq!(
            IndexReader::new(&again[..])
                .unwrap()
                .prefetch()
                .collect::<Vec<_>>(),
            vec![3]
        );
    }

    fn digest(n: u8) -> ChunkDigest {
        ChunkDigest([n; 32])
    }

    /// root/{a (file, 2 chunks), d/{b (hardlink of a), l -> a, w (whiteout)}, dev}
    fn sample() -> IndexBuilder {
        let mut nodes = vec![Node::new(InodeKind::Dir, 0o755)];
        let mut file = Node::new(InodeKind::File, 0o4755);
        file.size = 4096 + 10;
        file.chunks = vec![0, 1];
        file.uid = 1000;
        file.xattrs
            .insert(b"security.capability".to_vec(), vec![1, 2, 3]);
        nodes.push(file); // 1
        let mut d = Node::new(InodeKind::Dir, 0o1777);
        d.opaque = true;
        nodes.push(d); // 2
        let mut l = Node::new(InodeKind::Symlink, 0o777);
        l.target = b"../a".to_vec();
        nodes.push(l); // 3
        nodes.push(Node::new(InodeKind::Whiteout, 0)); // 4
        let mut dev = Node::new(InodeKind::CharDev, 0o666);
        dev.rdev = (1, 3);
        nodes.push(dev); // 5
        nodes[0].children.insert(b"a".to_vec(), 1);
        nodes[0].children.insert(b"d".to_vec(), 2);
        nodes[0].children.insert(b"dev".to_vec(), 5);
        nodes[2].children.insert(b"b".to_vec(), 1);
        nodes[2].children.insert(b"l".to_vec(), 3);
        nodes[2].children.insert(b"w".to_vec(), 4);
        IndexBuilder {
            chunk_size: 4096,
            blob_size: 100,
            nodes,
            chunks: vec![
                ChunkRecord {
                    digest: digest(1),
                    offset: 0,
                    stored_len: 50,
                    uncompressed_len: 4096,
                },
                ChunkRecord {
                    digest: digest(2),
                    offset: 50,
                    stored_len: 10,
                    uncompressed_len: 10,
                },
            ],
            prefetch: vec![3, 1],
        }
    }

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

    #[test]
    fn encoding_is_deterministic() {
        assert_eq!(sample().encode().unwrap(), sample().encode().unwrap());
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

    /// Rewrite the checksum so that structural checks, not the checksum, must catch damage.
    fn reseal(b: &mut [u8]) {
        b[CHECKSUM_AT..CHECKSUM_AT + 32].fill(0);
        let sum: [u8; 32] = Sha256::digest(&*b).into();
        b[CHECKSUM_AT..CHECKSUM_AT + 32].copy_from_slice(&sum);
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
    fn a_directory_with_two_names_is_refused_when_encoding() {
        let mut s = sample();
        s.nodes[0].children.insert(b"again".to_vec(), 2);
        assert!(s.encode().is_err());
    }
}
