//! Shared body of the index fuzz targets: decode, and if the reader accepts the bytes, walk
//! the whole index with every query it offers. The reader promises that an accepted index is
//! safe to query (no panic, no out-of-bounds read) and consistent; the assertions below
//! check that promise, so a failing one is a reader bug just like a panic.

use beam_format::index::{
    with_prefetch, IndexReader, InodeKind, InodeRecord, MAX_NAME_LEN, ROOT_INO,
};
use sha2::{Digest, Sha256};

/// Where the index stores its checksum: sha256 over the whole index with these bytes zeroed.
pub const CHECKSUM_RANGE: std::ops::Range<usize> = 160..192;

/// Recompute the checksum of `bytes` in place (a no-op below the header length), so that a
/// mutated index gets past the checksum and into the structural checks.
pub fn reseal(bytes: &mut [u8]) {
    if bytes.len() < CHECKSUM_RANGE.end {
        return;
    }
    bytes[CHECKSUM_RANGE].fill(0);
    let sum: [u8; 32] = Sha256::digest(&*bytes).into();
    bytes[CHECKSUM_RANGE].copy_from_slice(&sum);
}

/// Longest path the walk builds for `lookup_path` checks; deeper entries are still walked,
/// only not looked up by their full path (bounds the harness's own work and memory).
const MAX_CHECKED_PATH: usize = 4096;

/// Whether `BEAM_FUZZ_VERBOSE` is set: then every input's verdict is printed to stderr (for
/// triage: run a target over a corpus with `-runs=0` and count the verdicts).
fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("BEAM_FUZZ_VERBOSE").is_some())
}

/// Unpacked-length limit of [`unpack_decode_and_walk`] (the daemon's default is 64 MiB; a
/// smaller one keeps the fuzzer's iterations fast and still reaches the length check).
pub const UNPACK_LIMIT: usize = 4 << 20;

/// Unpack `data` as a packed (lz4) index; if that works, decode and walk the result. Returns
/// whether the reader accepted it.
pub fn unpack_decode_and_walk(data: &[u8]) -> bool {
    match beam_format::index::packed::unpack(data, UNPACK_LIMIT) {
        Ok(bytes) => {
            assert!(bytes.len() <= UNPACK_LIMIT, "unpacked past the limit");
            decode_and_walk(&bytes)
        }
        Err(e) => {
            let _ = e.to_string();
            false
        }
    }
}

/// Decode `data`; if accepted, walk it. Returns whether the reader accepted it.
pub fn decode_and_walk(data: &[u8]) -> bool {
    match IndexReader::new(data) {
        Ok(r) => {
            walk(&r, data);
            if verbose() {
                eprintln!("verdict: accepted ({} inodes)", r.inode_count());
            }
            true
        }
        Err(e) => {
            // Formatting the error must not panic either.
            let msg = e.to_string();
            if verbose() {
                eprintln!("verdict: {msg}");
            }
            false
        }
    }
}

fn walk(r: &IndexReader<&[u8]>, data: &[u8]) {
    assert_eq!(r.as_bytes(), data);
    let n = r.inode_count();
    assert!(n >= 1, "an accepted index has a root");
    let cs = r.chunk_size() as u64;
    let blob = r.blob_size();

    // Every chunk record, and the ones just past the table.
    let nchunks = r.chunk_count();
    for i in 0..nchunks {
        let c = r.chunk(i).expect("a chunk below chunk_count is readable");
        assert!(c.stored_len <= c.uncompressed_len);
        assert!(c.uncompressed_len as u64 <= cs);
        assert!(c
            .offset
            .checked_add(c.stored_len as u64)
            .is_some_and(|e| e <= blob));
        let _ = c.is_compressed();
    }
    assert!(r.chunk(nchunks).is_err());
    assert!(r.chunk(u64::MAX).is_err());

    // Out-of-range inode numbers are errors, not panics.
    assert!(r.inode(0).is_err());
    assert!(r.inode(n + 1).is_err());
    assert!(r.inode(u64::MAX).is_err());
    assert!(r.lookup(0, b"x").is_err());
    assert!(r.lookup(n + 1, b"x").is_err());

    let root = r.inode(ROOT_INO).expect("root");
    assert_eq!(root.kind, InodeKind::Dir);
    assert_eq!(r.lookup_path(b"").unwrap(), Some(ROOT_INO));
    assert_eq!(r.lookup_path(b"/").unwrap(), Some(ROOT_INO));
    assert_eq!(r.lookup_path(b"//").unwrap(), Some(ROOT_INO));

    // Depth-first from the root; each inode is queued and visited once (`seen` is set when it
    // is queued), whatever the number of names (hard links, a directory listed twice) that
    // reach it, so the stack never holds more than `n` entries.
    let mut seen = vec![false; n as usize + 1];
    seen[ROOT_INO as usize] = true;
    let mut stack: Vec<(u64, Option<Vec<u8>>)> = vec![(ROOT_INO, Some(Vec::new()))];
    while let Some((ino, path)) = stack.pop() {
        let rec = r
            .inode(ino)
            .expect("an inode reached from the root is readable");
        assert_eq!(rec.ino, ino);
        if let Some(p) = &path {
            assert_eq!(r.lookup_path(p).unwrap(), Some(ino), "path {p:?}");
        }
        check_inode(r, &rec);
        if rec.kind != InodeKind::Dir {
            continue;
        }
        let mut prev: Option<&[u8]> = None;
        for (i, (name, child)) in r.dirents(&rec).enumerate() {
            assert_eq!(r.dirent(&rec, i as u32), Some((name, child)));
            assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN);
            assert!(name != b"." && name != b"..");
            assert!(!name.contains(&b'/') && !name.contains(&0));
            assert!(prev.is_none_or(|p| p < name), "entries sorted by name");
            prev = Some(name);
            assert!(child > ROOT_INO && child <= n);
            assert_eq!(r.lookup(ino, name).unwrap(), Some(child));
            let c = r.inode(child).expect("a directory entry names an inode");
            if c.kind == InodeKind::Dir {
                assert_eq!(c.parent, ino, "a directory's parent is the one listing it");
                assert!(child > ino);
            }
            if std::mem::replace(&mut seen[child as usize], true) {
                continue;
            }
            let child_path = path.as_ref().and_then(|p| {
                (p.len() + 1 + name.len() <= MAX_CHECKED_PATH).then(|| {
                    let mut q = p.clone();
                    q.push(b'/');
                    q.extend_from_slice(name);
                    q
                })
            });
            stack.push((child, child_path));
        }
        // Names that sort before, between and after the entries, and that are not names.
        assert_eq!(r.lookup(ino, b"").unwrap(), None);
        let _ = r.lookup(ino, b"\x00").unwrap();
        let _ = r.lookup(ino, &[0xff; 300]).unwrap();
        if let Some(last) = prev {
            let mut after = last.to_vec();
            after.push(0);
            assert_eq!(r.lookup(ino, &after).unwrap(), None);
        }
        assert_eq!(r.dirent(&rec, rec.child_count()), None);
        assert_eq!(r.dirent(&rec, u32::MAX), None);
    }

    // Inodes no name reaches are still readable by number.
    for ino in 1..=n {
        if !seen[ino as usize] {
            let rec = r
                .inode(ino)
                .expect("every inode below inode_count is readable");
            check_inode(r, &rec);
            let _ = r.dirents(&rec).count();
        }
    }

    for ino in r.prefetch() {
        assert!((1..=n).contains(&ino), "prefetch names an inode");
        r.inode(ino).expect("prefetch inode readable");
    }

    // Follows: every edge names an inode of this index or a layer of its table.
    let layers = r.follow_layer_count();
    for l in 1..=layers {
        assert!(r.follow_layer(l).is_some(), "a follows layer of the table reads");
    }
    assert!(r.follow_layer(layers + 1).is_none());
    for ino in 1..=n {
        for (layer, to) in r.follows(ino) {
            assert!(layer <= layers, "a follows edge names a layer of the table");
            assert!(to >= 1);
            if layer == 0 {
                r.inode(to).expect("a follows edge of this layer names an inode");
            }
        }
    }

    // A path made of the input's own tail: anything goes, but no panic.
    let tail = &data[data.len().saturating_sub(64)..];
    let _ = r.lookup_path(tail).unwrap();

    // Rewriting the prefetch list (what `beam record` does to a published index): the old
    // list reversed plus numbers that must be dropped. It may refuse an index whose prefetch
    // section is not the last one, but what it returns must read back as asked.
    let mut list: Vec<u64> = r.prefetch().collect();
    list.reverse();
    list.extend([0, n + 1, u64::MAX, ROOT_INO, n]);
    if let Ok(out) = with_prefetch(data, &list) {
        let r2 = IndexReader::new(&out[..]).expect("with_prefetch output is a valid index");
        assert_eq!(r2.inode_count(), n);
        let mut kept = std::collections::HashSet::new();
        let want: Vec<u64> = list
            .iter()
            .copied()
            .filter(|ino| (1..=n).contains(ino) && kept.insert(*ino))
            .collect();
        assert_eq!(r2.prefetch().collect::<Vec<_>>(), want);
    }
}

fn check_inode(r: &IndexReader<&[u8]>, rec: &InodeRecord) {
    let n = r.inode_count();
    assert!(rec.mode <= 0o7777);
    assert!(rec.parent >= 1 && rec.parent <= n);
    r.inode(rec.parent).expect("parent readable");
    let _ = (
        rec.rdev(),
        rec.is_opaque(),
        rec.nlink,
        rec.uid,
        rec.gid,
        rec.mtime,
    );

    let target = r.symlink_target(rec);
    if rec.kind == InodeKind::Symlink {
        assert_eq!(target.len() as u64, rec.size);
    } else {
        assert!(target.is_empty());
    }

    let mut nx = 0u32;
    for (name, _value) in r.xattrs(rec) {
        assert!(!name.is_empty());
        nx += 1;
    }
    assert_eq!(nx, rec.xattr_count());

    let chunks: Vec<u64> = r.file_chunks(rec).collect();
    if rec.kind == InodeKind::File {
        assert_eq!(chunks.len() as u64, rec.child_count() as u64);
        let cs = r.chunk_size() as u64;
        assert_eq!(rec.size.div_ceil(cs), chunks.len() as u64);
        for (i, &c) in chunks.iter().enumerate() {
            assert_eq!(r.file_chunk(rec, i as u32), Some(c));
            let chunk = r.chunk(c).expect("a file's chunk exists");
            let want = (rec.size - i as u64 * cs).min(cs);
            assert_eq!(chunk.uncompressed_len as u64, want);
        }
        assert_eq!(r.file_chunk(rec, rec.child_count()), None);
    } else {
        assert!(chunks.is_empty());
        assert_eq!(r.file_chunk(rec, 0), None);
    }
    if rec.kind != InodeKind::Dir {
        assert_eq!(r.dirents(rec).count(), 0);
        assert_eq!(r.lookup(rec.ino, b"x").unwrap(), None);
    }
}
