//! Writing an index: [`IndexBuilder`] encodes a tree and a chunk table, [`with_prefetch`]
//! replaces the prefetch list of an existing index and [`with_follows`] its follows section.
//! All seal the result with its checksum.

use super::reader::IndexReader;
use super::records::*;
use super::IndexError;
use crate::FORMAT_VERSION;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

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
            &[],
        ];
        let total: usize = HEADER_LEN + sections.iter().map(|s| s.len()).sum::<usize>();
        if total > MAX_INDEX_LEN {
            return Err(IndexError::TooLong {
                len: total,
                limit: MAX_INDEX_LEN,
            });
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
        // No follows here (`with_follows` adds them): the slot stays zeros, as in indexes
        // written before it existed, so the same tree encodes to the same bytes.
        out.truncate(32 + SEC_FOLLOWS * 16);
        out.resize(HEADER_LEN, 0);
        for s in &sections {
            out.extend_from_slice(s);
        }
        seal(&mut out);
        Ok(out)
    }

    /// Children of a directory node, reversed so that popping yields name order.
    fn child_ids(&self, dir: usize) -> Vec<usize> {
        self.nodes[dir].children.values().rev().copied().collect()
    }
}

/// The same index with its prefetch list replaced by `inos` (in order; unknown or repeated
/// inode numbers are dropped). Everything else stays byte for byte.
pub fn with_prefetch(bytes: &[u8], inos: &[u64]) -> Result<Vec<u8>, IndexError> {
    let r = IndexReader::new(bytes)?;
    let mut seen = std::collections::HashSet::new();
    let mut prefetch = Vec::new();
    for &ino in inos {
        if ino >= 1 && ino <= r.inode_count() && seen.insert(ino) {
            prefetch.extend_from_slice(&(ino as u32).to_le_bytes());
        }
    }
    let follows = r.section_bytes(SEC_FOLLOWS).to_vec();
    rebuild(&r, &follows, &prefetch)
}

/// One edge of the follows section: reading file `from` (an inode of this layer) loads the
/// file `ino` of `layer` next (0: this layer; n: the n-th diff_id handed to [`with_follows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Follow {
    pub from: u64,
    pub layer: usize,
    pub ino: u64,
}

/// The same index with its follows section replaced by `layers` (other layers' diff_ids,
/// sha256) and `edges` (sorted here; repeated ones dropped). Everything else stays byte for
/// byte.
pub fn with_follows(
    bytes: &[u8],
    layers: &[[u8; 32]],
    edges: &[Follow],
) -> Result<Vec<u8>, IndexError> {
    let r = IndexReader::new(bytes)?;
    let bad = |reason: String| IndexError::BadFollow { index: 0, reason };
    if layers.len() > MAX_FOLLOW_LAYERS {
        return Err(bad(format!(
            "{} layers (at most {MAX_FOLLOW_LAYERS})",
            layers.len()
        )));
    }
    let mut sorted = edges.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut section = Vec::new();
    if !(sorted.is_empty() && layers.is_empty()) {
        section.reserve(4 + layers.len() * 32 + sorted.len() * FOLLOW_LEN);
        section.extend_from_slice(&(layers.len() as u32).to_le_bytes());
        for l in layers {
            section.extend_from_slice(l);
        }
        for e in &sorted {
            if e.ino > MAX_FOLLOW_INO || e.from > u32::MAX as u64 || e.layer > layers.len() {
                return Err(bad(format!("edge {e:?} cannot be written")));
            }
            section.extend_from_slice(&(e.from as u32).to_le_bytes());
            section.extend_from_slice(&(((e.layer as u32) << 24) | e.ino as u32).to_le_bytes());
        }
    }
    let prefetch = r.section_bytes(SEC_PREFETCH).to_vec();
    rebuild(&r, &section, &prefetch)
}

/// The index of `r` with new follows and prefetch sections, written (in that order) after
/// the others, which stay byte for byte; sealed and checked.
fn rebuild(r: &IndexReader<&[u8]>, follows: &[u8], prefetch: &[u8]) -> Result<Vec<u8>, IndexError> {
    let bytes = r.as_bytes();
    // Where the tree's sections end (the encoder writes them first, in table order).
    let at = r.sections[..SEC_PREFETCH]
        .iter()
        .filter(|s| s.len > 0)
        .map(|s| s.offset + s.len)
        .max()
        .unwrap_or(HEADER_LEN)
        .max(HEADER_LEN);
    let mut out = bytes[..at].to_vec();
    let put = |out: &mut Vec<u8>, sec: usize, offset: usize, len: usize| {
        out[32 + sec * 16..40 + sec * 16].copy_from_slice(&(offset as u64).to_le_bytes());
        out[40 + sec * 16..48 + sec * 16].copy_from_slice(&(len as u64).to_le_bytes());
    };
    let follows_at = if follows.is_empty() { 0 } else { out.len() };
    out.extend_from_slice(follows);
    let prefetch_at = out.len();
    out.extend_from_slice(prefetch);
    put(&mut out, SEC_FOLLOWS, follows_at, follows.len());
    put(&mut out, SEC_PREFETCH, prefetch_at, prefetch.len());
    if out.len() > MAX_INDEX_LEN {
        return Err(IndexError::TooLong {
            len: out.len(),
            limit: MAX_INDEX_LEN,
        });
    }
    seal(&mut out);
    IndexReader::new(&out[..])?;
    Ok(out)
}

/// Write the checksum of `index` into it: sha256 over the whole index with the checksum
/// field zeroed.
pub(super) fn seal(index: &mut [u8]) {
    index[CHECKSUM_AT..CHECKSUM_AT + 32].fill(0);
    let sum: [u8; 32] = Sha256::digest(&*index).into();
    index[CHECKSUM_AT..CHECKSUM_AT + 32].copy_from_slice(&sum);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::sample;

    #[test]
    fn encoding_is_deterministic() {
        let bytes = sample().encode().unwrap();
        assert_eq!(bytes, sample().encode().unwrap());
        // Without follows their slot is zeros: the bytes of indexes written before it existed.
        assert!(bytes[32 + SEC_FOLLOWS * 16..32 + SEC_FOLLOWS * 16 + 16]
            .iter()
            .all(|b| *b == 0));
    }

    #[test]
    fn a_directory_with_two_names_is_refused_when_encoding() {
        let mut s = sample();
        s.nodes[0].children.insert(b"again".to_vec(), 2);
        assert!(s.encode().is_err());
    }

    #[test]
    fn follows_can_be_replaced_and_survive_a_new_prefetch_list() {
        let bytes = with_prefetch(&sample().encode().unwrap(), &[2]).unwrap();
        let other = [7u8; 32];
        let e = |from, layer, ino| Follow { from, layer, ino };
        let out = with_follows(
            &bytes,
            &[other],
            &[e(4, 1, 9), e(2, 0, 4), e(4, 0, 2), e(2, 0, 4)],
        )
        .unwrap();
        let r = IndexReader::new(&out[..]).unwrap();
        assert_eq!(r.follows(2).collect::<Vec<_>>(), vec![(0, 4)]);
        assert_eq!(r.follows(4).collect::<Vec<_>>(), vec![(0, 2), (1, 9)]);
        assert_eq!(r.follows(3).count(), 0);
        assert_eq!(r.follow_layer(1), Some(other));
        assert_eq!(r.follow_layer(0), None);
        assert_eq!(r.follow_layer(2), None);
        assert_eq!(r.prefetch().collect::<Vec<_>>(), vec![2]);
        // A new prefetch list keeps them; new follows replace them.
        let again = with_prefetch(&out, &[3, 4]).unwrap();
        let r = IndexReader::new(&again[..]).unwrap();
        assert_eq!(r.prefetch().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(r.follows(4).collect::<Vec<_>>(), vec![(0, 2), (1, 9)]);
        let replaced = with_follows(&again, &[], &[e(3, 0, 1)]).unwrap();
        let r = IndexReader::new(&replaced[..]).unwrap();
        assert_eq!(r.follows(4).count(), 0);
        assert_eq!(r.follows(3).collect::<Vec<_>>(), vec![(0, 1)]);
        assert_eq!(r.follow_layer_count(), 0);
        assert_eq!(r.prefetch().collect::<Vec<_>>(), vec![3, 4]);
        // Edges naming what is not there are refused.
        assert!(with_follows(&bytes, &[], &[e(99, 0, 1)]).is_err());
        assert!(with_follows(&bytes, &[], &[e(2, 0, 99)]).is_err());
        assert!(with_follows(&bytes, &[], &[e(2, 1, 1)]).is_err());
    }

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
}
