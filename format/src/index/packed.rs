//! An index as a registry stores it: packed with lz4, the chunks' codec.
//!
//! Why: every layer's index crosses the link before the layer can mount, ahead of the
//! container's first read. The five indexes of the benchmark's python image are 1.57 MB, 63 ms
//! at 200 Mbit/s; packed they are 0.75 MB, and unpacking them takes about a millisecond.
//!
//! Layout (little-endian): the magic `BEAMIDZ4`, the unpacked length (u64), then one lz4 block
//! (`lz4_flex::block`). A packed index is told apart by its media type in the artifact, not by
//! guessing from the bytes; the magic makes a blob under the wrong media type a clear error.
//! [`unpack`] checks the stated length against the reader's limit before it allocates anything,
//! and the block must unpack to exactly that length. The unpacked bytes are then an index like
//! any other, checked in full by [`super::IndexReader`] (checksum included).

use super::IndexError;

/// The first bytes of a packed index.
pub const PACKED_MAGIC: [u8; 8] = *b"BEAMIDZ4";

/// Magic and unpacked length.
pub const PACKED_HEADER_LEN: usize = 16;

/// Pack an encoded index.
pub fn pack(index: &[u8]) -> Vec<u8> {
    let block = lz4_flex::block::compress(index);
    let mut out = Vec::with_capacity(PACKED_HEADER_LEN + block.len());
    out.extend_from_slice(&PACKED_MAGIC);
    out.extend_from_slice(&(index.len() as u64).to_le_bytes());
    out.extend_from_slice(&block);
    out
}

/// Unpack a packed index of at most `max_len` bytes (unpacked).
pub fn unpack(packed: &[u8], max_len: usize) -> Result<Vec<u8>, IndexError> {
    let bad = |why: String| IndexError::BadPacking(why);
    let Some((header, block)) = packed.split_at_checked(PACKED_HEADER_LEN) else {
        return Err(bad(format!(
            "{} bytes, shorter than the {PACKED_HEADER_LEN}-byte header",
            packed.len()
        )));
    };
    if header[..8] != PACKED_MAGIC {
        return Err(bad(format!("bad magic {:02x?}", &header[..8])));
    }
    let stated = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if stated > max_len as u64 {
        return Err(IndexError::TooLong {
            len: usize::try_from(stated).unwrap_or(usize::MAX),
            limit: max_len,
        });
    }
    let mut out = vec![0u8; stated as usize];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(n) if n == out.len() => Ok(out),
        Ok(n) => Err(bad(format!(
            "unpacks to {n} bytes, not the {stated} it states"
        ))),
        Err(e) => Err(bad(format!("lz4: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_index() -> Vec<u8> {
        crate::index::sample().encode().unwrap()
    }

    #[test]
    fn a_packed_index_unpacks_to_the_same_bytes_and_is_smaller() {
        let index = sample_index();
        let packed = pack(&index);
        assert_eq!(unpack(&packed, index.len()).unwrap(), index);
        assert!(
            packed.len() < index.len(),
            "{} >= {}",
            packed.len(),
            index.len()
        );
    }

    #[test]
    fn damaged_or_oversized_packings_are_refused() {
        let index = sample_index();
        let packed = pack(&index);
        // Larger than the reader allows: refused before anything is allocated.
        assert!(matches!(
            unpack(&packed, index.len() - 1),
            Err(IndexError::TooLong { .. })
        ));
        let mut huge = packed.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            unpack(&huge, 1 << 20),
            Err(IndexError::TooLong { .. })
        ));
        // An index that is not packed (a wrong media type).
        assert!(matches!(
            unpack(&index, 1 << 20),
            Err(IndexError::BadPacking(_))
        ));
        // Cut short, or stating a length its block does not have.
        for cut in [0, 10, PACKED_HEADER_LEN, packed.len() - 1] {
            assert!(
                matches!(
                    unpack(&packed[..cut], 1 << 20),
                    Err(IndexError::BadPacking(_))
                ),
                "cut at {cut}"
            );
        }
        let mut longer = packed.clone();
        longer[8..16].copy_from_slice(&(index.len() as u64 + 1).to_le_bytes());
        assert!(matches!(
            unpack(&longer, 1 << 20),
            Err(IndexError::BadPacking(_))
        ));
        // A flipped byte in the block: an lz4 error, or bytes the index checksum refuses.
        let mut flipped = packed;
        let at = flipped.len() / 2;
        flipped[at] ^= 0x55;
        if let Ok(bytes) = unpack(&flipped, 1 << 20) {
            assert!(crate::index::IndexReader::new(bytes).is_err());
        }
    }
}
