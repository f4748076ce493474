//! The Beam layer format: pure encoding and decoding, no I/O.
//!
//! A Beam layer is two blobs that live in any OCI registry beside the original layer:
//!
//! - the **chunk blob**: the layer's file bytes cut into fixed-size chunks, each compressed on
//!   its own with lz4 (block format) or stored raw when lz4 does not shrink it, and each stored
//!   once however many files contain it. A reader can fetch any chunk with one HTTP Range
//!   request and verify it against the sha256 of its uncompressed bytes;
//! - the **index blob**: a compact, checksummed table of the layer's whole tree (every tar
//!   entry type, modes, owners, times, xattrs, OCI whiteouts and opaque directories) and, per
//!   regular file, its list of chunks. Records are fixed-size so that a lookup by path or by
//!   inode reads only the records it needs, without decoding the whole index.
//!
//! `docs/format.md` is the normative description; [`index`] implements it.
//!
//! This is a crate of its own, apart from the daemon (`beam`, which re-exports it as
//! `beam::format`), so that whatever only reads or writes the format (the fuzzers in `fuzz/`,
//! other tools) builds without the daemon's runtime, FUSE and gRPC dependencies. It does no
//! I/O: callers hand it bytes and get bytes back.

pub mod chunk;
pub mod index;

pub use chunk::{ChunkDigest, ChunkError};
pub use index::{
    ChunkRecord, DirentRecord, IndexBuilder, IndexError, IndexReader, InodeKind, InodeRecord,
    ReadLimits, XattrRecord, ROOT_INO,
};

/// Version of the index encoding written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// Default chunk size: 512 KiB. See `docs/format.md` ("Choosing the chunk size") for the
/// measurement behind it.
pub const DEFAULT_CHUNK_SIZE: u32 = 512 * 1024;

/// Smallest and largest chunk sizes a writer may choose and a reader accepts.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk size; bounds the memory one chunk can make a reader allocate.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
