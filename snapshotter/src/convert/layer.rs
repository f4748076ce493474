//! Converting one uncompressed tar stream into a Beam layer (chunk blob + index).
//!
//! The tar is read once, front to back. File bytes are cut into chunks and handed to a pool of
//! worker threads that hash and compress them; a writer puts them into the chunk blob in tar
//! order (so the blob is the same bytes for the same input, and a file's chunks sit next to
//! each other for Range merging), storing each distinct chunk once. Memory is bounded: at most
//! `2 * workers + 2` chunks are in flight at any time, whatever the layer's size.

use super::tar_stream::TarStream;
use super::tree::{EntryMeta, Limits, TreeBuilder, TreeError};
use crate::format::chunk::{self, ChunkDigest, CompressedChunk};
use crate::format::index::{ChunkRecord, IndexBuilder, InodeKind};
use crate::format::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use tar_core::EntryType;

/// Options of a layer conversion.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub chunk_size: u32,
    pub workers: usize,
    pub limits: Limits,
    /// How an image conversion stores each layer's index in the registry.
    pub index_packing: crate::oci::IndexPacking,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_size: crate::format::DEFAULT_CHUNK_SIZE,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            limits: Limits::default(),
            index_packing: crate::oci::IndexPacking::default(),
        }
    }
}

/// Why a layer could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("reading the tar stream: {0}")]
    Tar(#[source] io::Error),
    #[error("writing the chunk blob: {0}")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("encoding the index: {0}")]
    Index(#[from] crate::format::IndexError),
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
    #[error("tar entry {path:?}: unsupported entry type {kind}")]
    UnsupportedEntry { path: String, kind: String },
}

/// What a conversion produced, besides the chunk blob bytes written to the output.
#[derive(Debug, Clone)]
pub struct ConvertedLayer {
    /// Encoded index.
    pub index: Vec<u8>,
    /// Length and sha256 (`sha256:<hex>`) of the chunk blob written.
    pub blob_size: u64,
    pub blob_digest: String,
    /// sha256 of the uncompressed tar as read (the layer's diff ID).
    pub diff_id: String,
    pub stats: ConvertStats,
}

/// Counters of a conversion, for progress output and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct ConvertStats {
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub chunks_total: u64,
    pub chunks_unique: u64,
    pub tar_bytes: u64,
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if let Some(p) = &self.progress {
            p(n as u64);
        }
        Ok(n)
    }
}

/// A counting semaphore bounding the chunks in flight.
struct Permits {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Permits {
    fn acquire(&self) {
        let mut f = self.free.lock().expect("permits lock");
        while *f == 0 {
            f = self.cv.wait(f).expect("permits lock");
        }
        *f -= 1;
    }
    fn release(&self) {
        *self.free.lock().expect("permits lock") += 1;
        self.cv.notify_one();
    }
}

struct Job {
    seq: u64,
    data: Vec<u8>,
}

struct Done {
    seq: u64,
    chunk: CompressedChunk,
}

/// Writes compressed chunks to the blob in sequence order, once per digest.
struct BlobWriter<W: Write> {
    out: W,
    hasher: Sha256,
    offset: u64,
    by_digest: HashMap<ChunkDigest, u32>,
    chunks: Vec<ChunkRecord>,
    /// Chunk table position of every sequence number.
    seq_to_chunk: Vec<u32>,
    pending: BTreeMap<u64, CompressedChunk>,
    next: u64,
}

impl<W: Write> BlobWriter<W> {
    fn accept(&mut self, done: Done, permits: &Permits) -> io::Result<()> {
        self.pending.insert(done.seq, done.chunk);
        while let Some(c) = self.pending.remove(&self.next) {
            let idx = match self.by_digest.get(&c.digest) {
                Some(&i) => i,
                None => {
                    self.out.write_all(&c.stored)?;
                    self.hasher.update(&c.stored);
                    let i = self.chunks.len() as u32;
                    self.chunks.push(ChunkRecord {
                        digest: c.digest,
                        offset: self.offset,
                        stored_len: c.stored.len() as u32,
                        uncompressed_len: c.uncompressed_len,
                    });
                    self.offset += c.stored.len() as u64;
                    self.by_digest.insert(c.digest, i);
                    i
                }
            };
            self.seq_to_chunk.push(idx);
            self.next += 1;
            permits.release();
        }
        Ok(())
    }
}

fn worker(jobs: Arc<Mutex<Receiver<Job>>>, done: SyncSender<Done>) {
    loop {
        let job = {
            let rx = jobs.lock().expect("job queue lock");
            rx.recv()
        };
        let Ok(job) = job else { return };
        let chunk = chunk::compress(&job.data);
        if done
            .send(Done {
                seq: job.seq,
                chunk,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Convert the uncompressed tar read from `tar` into a Beam layer, writing the chunk blob to
/// `blob`. `progress` is called with the number of tar bytes consumed as they are read.
pub fn convert_layer<R: Read, W: Write + Send>(
    tar: R,
    blob: W,
    opts: &ConvertOptions,
    progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
) -> Result<ConvertedLayer, ConvertError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size) {
        return Err(ConvertError::ChunkSize(opts.chunk_size));
    }
    let workers = opts.workers.max(1);
    let in_flight = 2 * workers + 2;
    let permits = Arc::new(Permits {
        free: Mutex::new(in_flight),
        cv: Condvar::new(),
    });
    let (job_tx, job_rx) = sync_channel::<Job>(workers);
    let (done_tx, done_rx) = sync_channel::<Done>(in_flight);
    let job_rx = Arc::new(Mutex::new(job_rx));

    std::thread::scope(|scope| {
        for _ in 0..workers {
            let rx = job_rx.clone();
            let tx = done_tx.clone();
            scope.spawn(move || worker(rx, tx));
        }
        drop(done_tx);
        let writer_permits = permits.clone();
        let writer = scope.spawn(move || -> io::Result<BlobWriter<W>> {
            let mut w = BlobWriter {
                out: blob,
                hasher: Sha256::new(),
                offset: 0,
                by_digest: HashMap::new(),
                chunks: Vec::new(),
                seq_to_chunk: Vec::new(),
                pending: BTreeMap::new(),
                next: 0,
            };
            for done in done_rx {
                w.accept(done, &writer_permits)?;
            }
            w.out.flush()?;
            Ok(w)
        });

        let mut reader = HashingReader {
            inner: tar,
            hasher: Sha256::new(),
            count: 0,
            progress,
        };
        let read_result = read_tar(&mut reader, opts, &job_tx, &permits);
        drop(job_tx);
        let writer = writer.join().expect("blob writer thread panicked");
        let (mut tree, file_seqs, stats) = read_result?;
        let w = writer.map_err(ConvertError::Write)?;
        // Resolve each file's sequence numbers to chunk table positions.
        for (id, first, n) in file_seqs {
            tree.nodes[id].chunks = (first..first + n)
                .map(|s| w.seq_to_chunk[s as usize])
                .collect();
        }
        let blob_size = w.offset;
        let builder = IndexBuilder {
            chunk_size: opts.chunk_size,
            blob_size,
            nodes: tree.nodes,
            chunks: w.chunks,
            prefetch: Vec::new(),
        };
        let index = builder.encode()?;
        let stats = ConvertStats {
            chunks_unique: builder.chunks.len() as u64,
            tar_bytes: reader.count,
            ..stats
        };
        Ok(ConvertedLayer {
            index,
            blob_size,
            blob_digest: format!("sha256:{}", hex::encode(w.hasher.finalize())),
            diff_id: format!("sha256:{}", hex::encode(reader.hasher.clone().finalize())),
            stats,
        })
    })
}

type FileSeqs = Vec<(usize, u64, u64)>;

fn read_tar<R: Read>(
    reader: &mut HashingReader<R>,
    opts: &ConvertOptions,
    jobs: &SyncSender<Job>,
    permits: &Permits,
) -> Result<(TreeBuilder, FileSeqs, ConvertStats), ConvertError> {
    let mut tree = TreeBuilder::new(opts.limits.clone());
    let mut stats = ConvertStats::default();
    let mut file_seqs = Vec::new();
    let mut seq: u64 = 0;
    let cs = opts.chunk_size as usize;
    let mut stream = TarStream::new(&mut *reader);
    while let Some(entry) = stream.next_entry().map_err(ConvertError::Tar)? {
        stats.entries += 1;
        let path = entry.path.clone();
        let refuse = |reason: String| {
            ConvertError::Tree(TreeError::Refused {
                path: String::from_utf8_lossy(&path).into_owned(),
                reason,
            })
        };
        let id32 = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| refuse(format!("{what} {v} does not fit 32 bits")))
        };
        let mut meta = EntryMeta {
            kind: InodeKind::File,
            mode: entry.mode & 0o7777,
            uid: id32(entry.uid, "uid")?,
            gid: id32(entry.gid, "gid")?,
            mtime: entry.mtime,
            mtime_nsec: entry.mtime_nsec,
            size: 0,
            rdev: entry.dev,
            xattrs: entry.xattrs.clone(),
        };
        let link = || {
            entry
                .link_target
                .clone()
                .ok_or_else(|| refuse("link without a target".into()))
        };
        match entry.entry_type {
            EntryType::Link => {
                tree.add_hardlink(&path, &link()?)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GnuSparse => {
                meta.size = entry.size;
                let id = tree.add(&path, meta, None)?;
                let first = seq;
                send_chunks(&mut stream, entry.size, cs, &mut seq, jobs, permits)?;
                // Whiteout markers are dropped by the tree (their chunks, if any, too).
                if let Some(id) = id {
                    file_seqs.push((id, first, seq - first));
                    stats.files += 1;
                    stats.file_bytes += entry.size;
                }
            }
            EntryType::Directory => {
                meta.kind = InodeKind::Dir;
                tree.add(&path, meta, None)?;
            }
            EntryType::Symlink => {
                meta.kind = InodeKind::Symlink;
                tree.add(&path, meta, Some(link()?))?;
            }
            EntryType::Char => {
                meta.kind = InodeKind::CharDev;
                tree.add(&path, meta, None)?;
            }
            EntryType::Block => {
                meta.kind = InodeKind::BlockDev;
                tree.add(&path, meta, None)?;
            }
            EntryType::Fifo => {
                meta.kind = InodeKind::Fifo;
                tree.add(&path, meta, None)?;
            }
            other => {
                return Err(ConvertError::UnsupportedEntry {
                    path: String::from_utf8_lossy(&path).into_owned(),
                    kind: format!("{other:?}"),
                })
            }
        }
    }
    // Drain the rest of the stream (tar padding) so the diff ID covers the whole layer.
    stream.drain().map_err(ConvertError::Tar)?;
    stats.chunks_total = seq;
    Ok((tree, file_seqs, stats))
}

/// Cut `size` bytes of `r` into chunks and queue them for hashing and compression.
fn send_chunks<R: Read>(
    r: &mut R,
    size: u64,
    cs: usize,
    seq: &mut u64,
    jobs: &SyncSender<Job>,
    permits: &Permits,
) -> Result<(), ConvertError> {
    let mut remaining = size;
    while remaining > 0 {
        let n = remaining.min(cs as u64) as usize;
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).map_err(ConvertError::Tar)?;
        remaining -= n as u64;
        permits.acquire();
        if jobs
            .send(Job {
                seq: *seq,
                data: buf,
            })
            .is_err()
        {
            return Err(ConvertError::Write(io::Error::other(
                "chunk writer stopped",
            )));
        }
        *seq += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::IndexReader;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut b = tar::Builder::new(&mut out);
            build(&mut b);
            b.finish().unwrap();
        }
        out
    }

    fn file(b: &mut tar::Builder<&mut Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    #[test]
    fn converts_files_into_verified_deduplicated_chunks() {
        let big: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let tar = tar_of(|b| {
            file(b, "a", &big);
            file(b, "dir/copy-of-a", &big);
            file(b, "empty", b"");
        });
        let mut blob = Vec::new();
        let opts = ConvertOptions {
            chunk_size: 8192,
            workers: 3,
            ..Default::default()
        };
        let out = convert_layer(&tar[..], &mut blob, &opts, None).unwrap();
        assert_eq!(out.blob_size, blob.len() as u64);
        assert_eq!(out.stats.chunks_total, 2 * 80_000u64.div_ceil(8192));
        assert_eq!(out.stats.chunks_unique, 80_000u64.div_ceil(8192));
        let idx = IndexReader::new(out.index).unwrap();
        for path in [&b"a"[..], b"dir/copy-of-a"] {
            let f = idx.inode(idx.lookup_path(path).unwrap().unwrap()).unwrap();
            let mut content = Vec::new();
            for c in idx.file_chunks(&f) {
                let c = idx.chunk(c).unwrap();
                let stored = &blob[c.offset as usize..(c.offset + c.stored_len as u64) as usize];
                chunk::decode_into(stored, c.uncompressed_len as usize, &c.digest, &mut content)
                    .unwrap();
            }
            assert_eq!(content, big);
        }
        let e = idx
            .inode(idx.lookup_path(b"empty").unwrap().unwrap())
            .unwrap();
        assert_eq!((e.size, idx.file_chunks(&e).count()), (0, 0));
        assert_eq!(
            out.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
        );
    }

    #[test]
    fn output_is_identical_across_runs_and_worker_counts() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let tar = tar_of(|b| {
            for i in 0..5 {
                file(b, &format!("f{i}"), &data[i * 1000..]);
            }
        });
        let run = |workers| {
            let mut blob = Vec::new();
            let opts = ConvertOptions {
                chunk_size: 4096,
                workers,
                ..Default::default()
            };
            let out = convert_layer(&tar[..], &mut blob, &opts, None).unwrap();
            (out.index, blob)
        };
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn a_truncated_tar_is_an_error() {
        let tar = tar_of(|b| file(b, "a", &[7u8; 50_000]));
        let mut blob = Vec::new();
        let r = convert_layer(&tar[..20_000], &mut blob, &ConvertOptions::default(), None);
        assert!(r.is_err());
    }
}
