//! Following what a file loads: when a program opens a file whose index lists what reading it
//! loads next (a Python module's imports, an ELF file's libraries; the follows section, made
//! by `convert::follows`), the node fetches those files, and what they load in turn, before
//! the program asks for them.
//!
//! Why: a starting interpreter imports one module, runs it, and only then opens the modules it
//! imports. On a far registry every such step waited a round trip. The walk here turns a chain
//! of them into a few merged requests sent at the first open.
//!
//! Edges may name a file of another layer (the standard library split across packages, an
//! extension module's library in a lower layer); [`MountedLayers`] finds that layer among those
//! this process has mounted, by diff_id. A layer that is not mounted here is skipped.

use crate::fetch::{ChunkRef, RangeSource};
use crate::format::{ChunkDigest, InodeKind};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};

/// Files visited by one walk at most (cached ones cost nothing to fetch, but still a lookup).
pub const MAX_FOLLOWED_FILES: usize = 256;
/// Edges read from one file at most (`beam convert` writes at most 64): a hostile index with
/// millions of edges from one file costs a walk no more than this.
pub const MAX_EDGES_READ: usize = 1024;

/// One mounted layer as a walk needs it: its index and where its chunks are read from.
pub struct LayerHandle {
    pub index: Arc<crate::format::index::IndexReader<Vec<u8>>>,
    pub source: Arc<dyn RangeSource>,
}

/// The layers this process has mounted, by diff_id (sha256 of the uncompressed layer).
#[derive(Debug, Default)]
pub struct MountedLayers {
    by_diff_id: Mutex<HashMap<[u8; 32], Weak<LayerHandle>>>,
}

impl MountedLayers {
    /// Make `layer` findable by `diff_id` while it lives (the filesystem holds it).
    pub fn add(&self, diff_id: [u8; 32], layer: &Arc<LayerHandle>) {
        let mut map = self.by_diff_id.lock().expect("mounted layers lock");
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(diff_id, Arc::downgrade(layer));
    }

    pub fn get(&self, diff_id: &[u8; 32]) -> Option<Arc<LayerHandle>> {
        self.by_diff_id
            .lock()
            .expect("mounted layers lock")
            .get(diff_id)
            .and_then(Weak::upgrade)
    }
}

/// What opening file `ino` of `start` will load, breadth first, as chunks to fetch: one list
/// per layer, each in blob order (so that it goes out in few requests). Chunks for which
/// `cached` holds are left out, and so is every file that would take the total past `budget`
/// bytes on the wire; the walk still goes through them, up to [`MAX_FOLLOWED_FILES`] files.
/// The opened file's own chunks are not in it: its reads fetch them.
pub fn follow_chunks(
    start: &Arc<LayerHandle>,
    ino: u64,
    layers: &MountedLayers,
    cached: impl Fn(&ChunkDigest) -> bool,
    budget: u64,
) -> Vec<Vec<ChunkRef>> {
    let key = |h: &Arc<LayerHandle>, ino: u64| (Arc::as_ptr(h) as usize, ino);
    let mut seen: HashSet<(usize, u64)> = HashSet::from([key(start, ino)]);
    let mut queue: VecDeque<(Arc<LayerHandle>, u64)> = VecDeque::from([(start.clone(), ino)]);
    let mut groups: Vec<(usize, Vec<ChunkRef>)> = Vec::new();
    let mut digests: HashSet<ChunkDigest> = HashSet::new();
    let mut bytes = 0u64;
    while let Some((h, ino)) = queue.pop_front() {
        for (slot, to) in h.index.follows(ino).take(MAX_EDGES_READ) {
            if seen.len() >= MAX_FOLLOWED_FILES {
                break;
            }
            let target = if slot == 0 {
                h.clone()
            } else {
                match h.index.follow_layer(slot).and_then(|id| layers.get(&id)) {
                    Some(t) => t,
                    None => continue,
                }
            };
            if !seen.insert(key(&target, to)) {
                continue;
            }
            let Ok(rec) = target.index.inode(to) else {
                continue;
            };
            if rec.kind != InodeKind::File {
                continue;
            }
            let mut missing = Vec::new();
            let mut file_bytes = 0u64;
            for id in target.index.file_chunks(&rec) {
                let Ok(c) = target.index.chunk(id) else {
                    continue;
                };
                if cached(&c.digest) || digests.contains(&c.digest) {
                    continue;
                }
                file_bytes += c.stored_len as u64;
                missing.push(c);
            }
            if bytes + file_bytes <= budget && !missing.is_empty() {
                bytes += file_bytes;
                let layer = Arc::as_ptr(&target) as usize;
                let at = match groups.iter().position(|(l, _)| *l == layer) {
                    Some(i) => i,
                    None => {
                        groups.push((layer, Vec::new()));
                        groups.len() - 1
                    }
                };
                for c in missing {
                    if digests.insert(c.digest) {
                        groups[at].1.push(ChunkRef {
                            rec: c,
                            source: target.source.clone(),
                        });
                    }
                }
            }
            queue.push_back((target, to));
        }
    }
    groups
        .into_iter()
        .map(|(_, mut chunks)| {
            chunks.sort_by_key(|c| c.rec.offset);
            chunks
        })
        .collect()
}

/// A flat tree for tests: root/{f0..f(n-1)}, file i of one 200-byte chunk stored in 100
/// bytes at offset 100 * i of the blob, digest [seed + i; 32].
#[cfg(test)]
pub(crate) fn flat_index(seed: u8, files: usize) -> crate::format::index::IndexBuilder {
    use crate::format::index::{IndexBuilder, Node};
    use crate::format::ChunkRecord;
    let mut nodes = vec![Node::new(InodeKind::Dir, 0o755)];
    let mut chunks = Vec::new();
    for i in 0..files {
        chunks.push(ChunkRecord {
            digest: ChunkDigest([seed + i as u8; 32]),
            offset: 100 * i as u64,
            stored_len: 100,
            uncompressed_len: 200,
        });
        let mut f = Node::new(InodeKind::File, 0o644);
        f.size = 200;
        f.chunks = vec![i as u32];
        nodes.push(f);
        nodes[0]
            .children
            .insert(format!("f{i}").into_bytes(), i + 1);
    }
    IndexBuilder {
        chunk_size: 4096,
        blob_size: 100 * files as u64,
        nodes,
        chunks,
        prefetch: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobError;
    use crate::format::index::{with_follows, Follow, IndexReader};
    use bytes::Bytes;
    use futures_util::future::BoxFuture;

    struct NoBlob;
    impl RangeSource for NoBlob {
        fn read_range(&self, _: u64, _: u64) -> BoxFuture<'static, Result<Bytes, BlobError>> {
            unreachable!("a walk reads nothing")
        }
        fn describe(&self) -> String {
            "nothing".into()
        }
    }

    /// A layer of `files` files (inodes 2..): file i has one chunk of 100 stored bytes at
    /// offset 100 * i, digest [seed + i; 32]; with `edges` and `layers` as its follows.
    fn layer(
        seed: u8,
        files: usize,
        layers: &[[u8; 32]],
        edges: &[(u64, usize, u64)],
    ) -> Arc<LayerHandle> {
        let bytes = flat_index(seed, files).encode().unwrap();
        let edges: Vec<Follow> = edges
            .iter()
            .map(|&(from, layer, ino)| Follow { from, layer, ino })
            .collect();
        let bytes = with_follows(&bytes, layers, &edges).unwrap();
        Arc::new(LayerHandle {
            index: Arc::new(IndexReader::new(bytes).unwrap()),
            source: Arc::new(NoBlob),
        })
    }

    fn offsets(groups: &[Vec<ChunkRef>]) -> Vec<Vec<u64>> {
        groups
            .iter()
            .map(|g| g.iter().map(|c| c.rec.offset).collect())
            .collect()
    }

    /// A chain f0 -> f1 -> f2 in one layer, f1 -> g0 in another (by diff_id), cycles and
    /// files of layers not mounted ignored; cached chunks and files past the budget left out.
    #[test]
    fn a_walk_follows_edges_across_layers_within_its_budget() {
        let lower_id = [9u8; 32];
        let lower = layer(100, 2, &[], &[(2, 0, 3)]);
        let upper = layer(
            1,
            4,
            &[lower_id, [8u8; 32]],
            &[(2, 0, 3), (3, 0, 4), (3, 1, 2), (3, 2, 2), (4, 0, 2)],
        );
        let mounted = MountedLayers::default();
        mounted.add(lower_id, &lower);
        let walk = |cached: &dyn Fn(&ChunkDigest) -> bool, budget| {
            offsets(&follow_chunks(&upper, 2, &mounted, cached, budget))
        };
        // Upper f1 (ino 3), f2 (ino 4); lower f0 (ino 2) and through it lower f1 (ino 3).
        assert_eq!(walk(&|_| false, 10_000), vec![vec![100, 200], vec![0, 100]]);
        // The opened file's own chunk is not asked for even when another edge leads to it.
        assert!(!walk(&|_| false, 10_000)[0].contains(&0));
        // Cached chunks are left out, and the walk goes on through them.
        let cached_f1 = ChunkDigest([2; 32]);
        assert_eq!(
            walk(&|d| *d == cached_f1, 10_000),
            vec![vec![200], vec![0, 100]]
        );
        // The budget: 250 bytes take the first two files met (breadth first).
        assert_eq!(walk(&|_| false, 250), vec![vec![100, 200]]);
        assert!(walk(&|_| false, 99).is_empty());
        // The lower layer unmounted: only this layer's files.
        drop(mounted);
        let none = MountedLayers::default();
        assert_eq!(
            offsets(&follow_chunks(&upper, 2, &none, |_| false, 10_000)),
            vec![vec![100, 200]]
        );
    }
}
