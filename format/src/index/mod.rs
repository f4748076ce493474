//! The index blob: a checksummed table of a layer's tree, queried in place.
//!
//! Encoding (all integers little-endian; `docs/format.md` has the same in prose):
//!
//! ```text
//! header   192 bytes   magic "BEAMIDX\0", version, chunk size, flags, chunk blob size,
//!                      8 sections (offset, length), sha256 over the whole index with the
//!                      checksum field zeroed
//! inodes   64 bytes each; inode number = position + 1, root = 1
//! dirents  16 bytes each; a directory's entries are contiguous and sorted by name bytes
//! chunks   48 bytes each; sha256, offset in the chunk blob, stored and uncompressed length
//! refs      4 bytes each; a file's chunks, in file order (chunk i covers [i*cs, (i+1)*cs))
//! xattrs   16 bytes each; name and value as ranges of the string section
//! strings  names, symlink targets, xattr names and values
//! prefetch  4 bytes each; inode numbers in the order a recorded workload first read them
//! follows   what reading a file loads next: other layers' diff_ids, then 8-byte edges
//!           (file inode, layer << 24 | inode), sorted by file inode; optional
//! ```
//!
//! Every record has a fixed size, so a lookup reads only what it needs: a path lookup is a
//! binary search per component, `getattr` one record. [`IndexReader::new`] checks the header,
//! the checksum and every cross-reference once, with no allocation that depends on the input,
//! so that the accessors afterwards cannot index out of bounds; they still return errors rather
//! than panic.
//!
//! The code follows the data: `records` is the on-disk layout (header constants and the
//! fixed-size record types), `encoder` writes an index from a tree ([`IndexBuilder`], and
//! [`with_prefetch`] to replace a published index's prefetch list), `reader` validates an index
//! once and answers queries on it ([`IndexReader`]), `packed` is the lz4 form a registry
//! stores.

mod encoder;
pub mod packed;
mod reader;
mod records;

pub use encoder::{with_follows, with_prefetch, Follow, IndexBuilder, Node};
pub use reader::{IndexReader, ReadLimits, DEFAULT_MAX_DEPTH, DEFAULT_MAX_INODES};
pub use records::{
    ChunkRecord, DirentRecord, InodeKind, InodeRecord, XattrRecord, FLAG_OPAQUE, HEADER_LEN, MAGIC,
    MAX_FOLLOW_INO, MAX_FOLLOW_LAYERS, MAX_INDEX_LEN, MAX_NAME_LEN, ROOT_INO,
};

use crate::{FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// What a malformed index looks like to the caller. Every variant names what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("index is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("index is {len} bytes, larger than the {limit}-byte limit")]
    TooLong { len: usize, limit: usize },
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
    #[error("follows edge {index}: {reason}")]
    BadFollow { index: u64, reason: String },
    #[error("no inode {0}")]
    NoSuchInode(u64),
    #[error("too many {what}: {count} (limit {limit})")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("directory {ino} is {depth} levels deep (limit {limit})")]
    TooDeep { ino: u64, depth: u32, limit: u32 },
    #[error("packed index: {0}")]
    BadPacking(String),
}

/// The tree the encoder and reader tests share, and one of the fuzzers' seeds
/// (`fuzz/gen_seeds.rs`): root/{a (file, 2 chunks, xattr), d (opaque)/{b (hard link of a),
/// l -> ../a, w (whiteout)}, dev (char 1/3)}, with a prefetch list.
#[doc(hidden)]
pub fn sample() -> IndexBuilder {
    use crate::ChunkDigest;
    let digest = |n: u8| ChunkDigest([n; 32]);
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
