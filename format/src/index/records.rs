//! The on-disk layout of an index: header constants, the section table, and the fixed-size
//! records the encoder writes and the reader decodes in place. Offsets within each record are
//! spelled out in `encoder` (writing) and `reader` (reading); `docs/format.md` has them in
//! prose.

use crate::chunk::ChunkDigest;

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

// Record sizes, and the sections in the order of the header's section table.
pub(super) const INODE_LEN: usize = 64;
pub(super) const DIRENT_LEN: usize = 16;
pub(super) const CHUNK_LEN: usize = 48;
pub(super) const REF_LEN: usize = 4;
pub(super) const XATTR_LEN: usize = 16;
pub(super) const PREFETCH_LEN: usize = 4;
pub(super) const SECTIONS: usize = 8;
pub(super) const SEC_INODES: usize = 0;
pub(super) const SEC_DIRENTS: usize = 1;
pub(super) const SEC_CHUNKS: usize = 2;
pub(super) const SEC_REFS: usize = 3;
pub(super) const SEC_XATTRS: usize = 4;
pub(super) const SEC_STRINGS: usize = 5;
pub(super) const SEC_PREFETCH: usize = 6;
/// Written after the other sections, by [`super::with_follows`]; empty (offset and length 0,
/// as in indexes written before it existed) when the layer has none.
pub(super) const SEC_FOLLOWS: usize = 7;
pub(super) const SECTION_NAMES: [&str; SECTIONS] = [
    "inodes", "dirents", "chunks", "refs", "xattrs", "strings", "prefetch", "follows",
];
pub(super) const RECORD_LENS: [usize; SECTIONS] = [
    INODE_LEN,
    DIRENT_LEN,
    CHUNK_LEN,
    REF_LEN,
    XATTR_LEN,
    1,
    PREFETCH_LEN,
    1,
];
/// The follows section: a count of other layers (u32), their diff_ids (32 bytes each), then
/// edges of [`FOLLOW_LEN`] bytes sorted by their first inode.
pub(super) const FOLLOW_LEN: usize = 8;
/// Largest inode number an edge can name (the low 24 bits of its second word).
pub const MAX_FOLLOW_INO: u64 = (1 << 24) - 1;
/// Most other layers one layer's follows can name (the high 8 bits of an edge's second word).
pub const MAX_FOLLOW_LAYERS: usize = 255;
/// Where the header keeps the index's sha256 (32 bytes).
pub(super) const CHECKSUM_AT: usize = 160;

/// Inode flag: this directory is opaque (OCI `.wh..wh..opq`).
pub const FLAG_OPAQUE: u8 = 1;

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
    pub(super) fn from_u8(v: u8) -> Option<Self> {
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
    pub(super) a: u32,
    pub(super) b: u32,
    pub(super) xattr_first: u32,
    pub(super) xattr_count: u32,
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
    pub(super) name_off: u32,
    pub(super) name_len: u16,
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
    pub(super) name_off: u32,
    pub(super) name_len: u32,
    pub(super) value_off: u32,
    pub(super) value_len: u32,
}
