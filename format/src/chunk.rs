//! One chunk: compress it for the chunk blob, and turn stored bytes back into verified
//! uncompressed bytes.
//!
//! A chunk is addressed by the sha256 of its *uncompressed* bytes, so the same bytes have the
//! same address in every layer and image and the local cache stores them once. The stored form
//! is lz4 block format when that is strictly shorter, else the raw bytes: a stored length equal
//! to the uncompressed length therefore means "raw".

use sha2::{Digest, Sha256};
use std::fmt;

/// sha256 of a chunk's uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkDigest(pub [u8; 32]);

impl ChunkDigest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkDigest(Sha256::digest(data).into())
    }

    /// Lower-case hex, as used for cache file names.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

/// Why stored chunk bytes could not be turned into the chunk they claim to be.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {digest}: stored length {stored} is larger than its uncompressed length {uncompressed}")]
    BadLengths {
        digest: ChunkDigest,
        stored: usize,
        uncompressed: usize,
    },
    #[error("chunk {digest}: lz4 data is corrupt: {reason}")]
    Corrupt { digest: ChunkDigest, reason: String },
    #[error("chunk {expected}: digest mismatch, got {actual}")]
    DigestMismatch {
        expected: ChunkDigest,
        actual: ChunkDigest,
    },
}

/// A chunk ready to be written to the chunk blob.
pub struct CompressedChunk {
    /// sha256 of the uncompressed bytes.
    pub digest: ChunkDigest,
    /// Bytes as stored in the blob (lz4 block, or raw).
    pub stored: Vec<u8>,
    /// Length of the uncompressed bytes.
    pub uncompressed_len: u32,
}

/// Hash and compress one chunk. Raw bytes are kept when lz4 does not make them shorter.
///
/// A chunk of zeros (the holes of sparse files, disk images) is hashed and compressed once
/// per length and then copied: a 1 TiB sparse file converts at the speed zeros can be
/// checked, not hashed.
pub fn compress(data: &[u8]) -> CompressedChunk {
    if is_zeros(data) {
        static ZEROS: std::sync::Mutex<Vec<(usize, ChunkDigest, Vec<u8>)>> =
            std::sync::Mutex::new(Vec::new());
        let mut known = ZEROS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, digest, stored)) = known.iter().find(|(n, ..)| *n == data.len()) {
            return CompressedChunk {
                digest: *digest,
                stored: stored.clone(),
                uncompressed_len: data.len() as u32,
            };
        }
        let c = compress_bytes(data);
        // A few lengths at most (the chunk size, and each file's last chunk of zeros).
        if known.len() < 64 {
            known.push((data.len(), c.digest, c.stored.clone()));
        }
        return c;
    }
    compress_bytes(data)
}

/// Whether every byte is zero (an OR over blocks, which the compiler vectorizes).
fn is_zeros(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

fn compress_bytes(data: &[u8]) -> CompressedChunk {
    let digest = ChunkDigest::of(data);
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(data.len())];
    let stored = match lz4_flex::block::compress_into(data, &mut out) {
        Ok(n) if n < data.len() => {
            out.truncate(n);
            out
        }
        _ => data.to_vec(),
    };
    CompressedChunk {
        digest,
        stored,
        uncompressed_len: data.len() as u32,
    }
}

/// Turn stored bytes back into the chunk's bytes, appending them to `out`, and verify them
/// against `digest`. Nothing is appended unless the digest matches.
pub fn decode_into(
    stored: &[u8],
    uncompressed_len: usize,
    digest: &ChunkDigest,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    let start = out.len();
    if stored.len() > uncompressed_len {
        return Err(ChunkError::BadLengths {
            digest: *digest,
            stored: stored.len(),
            uncompressed: uncompressed_len,
        });
    }
    if stored.len() == uncompressed_len {
        out.extend_from_slice(stored);
    } else {
        out.resize(start + uncompressed_len, 0);
        match lz4_flex::block::decompress_into(stored, &mut out[start..]) {
            Ok(n) if n == uncompressed_len => {}
            Ok(n) => {
                out.truncate(start);
                return Err(ChunkError::Corrupt {
                    digest: *digest,
                    reason: format!("decoded {n} bytes, expected {uncompressed_len}"),
                });
            }
            Err(e) => {
                out.truncate(start);
                return Err(ChunkError::Corrupt {
                    digest: *digest,
                    reason: e.to_string(),
                });
            }
        }
    }
    let actual = ChunkDigest::of(&out[start..]);
    if actual != *digest {
        out.truncate(start);
        return Err(ChunkError::DigestMismatch {
            expected: *digest,
            actual,
        });
    }
    Ok(())
}

/// [`decode_into`] into a fresh buffer.
pub fn decode(
    stored: &[u8],
    uncompressed_len: usize,
    digest: &ChunkDigest,
) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::with_capacity(uncompressed_len);
    decode_into(stored, uncompressed_len, digest, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_are_the_same_as_computed_and_decode() {
        for len in [1usize, 4095, 4096, 512 << 10] {
            let zeros = vec![0u8; len];
            let first = compress(&zeros);
            let again = compress(&zeros);
            let computed = compress_bytes(&zeros);
            assert_eq!(first.digest, computed.digest);
            assert_eq!(again.digest, computed.digest);
            assert_eq!(again.stored, computed.stored);
            let mut out = Vec::new();
            decode_into(&again.stored, len, &again.digest, &mut out).unwrap();
            assert_eq!(out, zeros);
        }
        // One byte set is not zeros.
        let mut almost = vec![0u8; 8192];
        almost[8191] = 1;
        assert_ne!(compress(&almost).digest, compress(&vec![0u8; 8192]).digest);
    }

    #[test]
    fn compressible_chunk_round_trips_through_lz4() {
        let data = b"hello beam ".repeat(1000);
        let c = compress(&data);
        assert!(c.stored.len() < data.len(), "repetitive data must shrink");
        assert_eq!(decode(&c.stored, data.len(), &c.digest).unwrap(), data);
    }

    #[test]
    fn incompressible_chunk_is_stored_raw() {
        // A xorshift stream does not compress.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let c = compress(&data);
        assert_eq!(c.stored, data);
        assert_eq!(decode(&c.stored, data.len(), &c.digest).unwrap(), data);
    }

    #[test]
    fn a_flipped_bit_is_never_returned() {
        let data = b"abcdefgh".repeat(512);
        let c = compress(&data);
        for i in 0..c.stored.len() {
            let mut bad = c.stored.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad, data.len(), &c.digest).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn stored_longer_than_uncompressed_is_rejected() {
        let d = ChunkDigest::of(b"x");
        assert!(matches!(
            decode(b"xx", 1, &d),
            Err(ChunkError::BadLengths { .. })
        ));
    }

    #[test]
    fn empty_chunk_is_valid() {
        let c = compress(b"");
        assert_eq!(decode(&c.stored, 0, &c.digest).unwrap(), b"");
    }
}
