//! `beam unpack`: materialise an image's root filesystem from its Beam layers, applying them
//! bottom to top the way a container runtime applies OCI layers (whiteouts delete, opaque
//! directories hide what is below). Used by tests as the reference for the lazy mount, and
//! for debugging a conversion. Every chunk is verified against its digest before a byte of it
//! is written.

use crate::format::chunk;
use crate::format::index::{IndexReader, InodeKind, InodeRecord, ROOT_INO};
use crate::store::Store;
use anyhow::{bail, Context, Result};
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Counters of an unpack.
#[derive(Debug, Default, Clone)]
pub struct UnpackStats {
    pub layers: usize,
    pub entries: u64,
    pub bytes: u64,
}

/// Unpack the Beam conversion of the image at `store` into `dir` (created if missing; must be
/// empty).
pub async fn unpack_image(store: &Store, dir: &Path) -> Result<UnpackStats> {
    let (_, artifact, layers) = store.beam_image().await?;
    tracing::info!(%artifact, layers = layers.len(), "unpacking Beam layers");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if fs::read_dir(dir)?.next().is_some() {
        bail!("{} is not empty", dir.display());
    }
    let tmp = tempfile::Builder::new().prefix("beam-unpack-").tempdir()?;
    let mut stats = UnpackStats::default();
    for (i, l) in layers.iter().enumerate() {
        let index = store
            .blob_bytes(&l.index, crate::format::index::MAX_INDEX_LEN as u64)
            .await
            .with_context(|| format!("fetching index of layer {}", l.source))?;
        let blob_path = tmp.path().join(format!("chunks-{i}"));
        store
            .blob_to_file(&l.chunks, &blob_path)
            .await
            .with_context(|| format!("fetching chunks of layer {}", l.source))?;
        let dir = dir.to_path_buf();
        let source = l.source.clone();
        let s = tokio::task::spawn_blocking(move || -> Result<UnpackStats> {
            let reader =
                IndexReader::new(index).with_context(|| format!("index of layer {source}"))?;
            let blob = File::open(&blob_path)?;
            let s = apply_layer(&reader, &blob, &dir)
                .with_context(|| format!("applying layer {source}"))?;
            fs::remove_file(&blob_path).ok();
            Ok(s)
        })
        .await??;
        stats.layers += 1;
        stats.entries += s.entries;
        stats.bytes += s.bytes;
    }
    Ok(stats)
}

fn join(dir: &Path, name: &[u8]) -> PathBuf {
    dir.join(OsStr::from_bytes(name))
}

/// Remove whatever is at `p` (a directory with its contents); fine if nothing is there.
fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))
        }
        Ok(_) => fs::remove_file(p).with_context(|| format!("removing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", p.display())),
    }
}

/// Apply one layer to `root`.
pub fn apply_layer<B: AsRef<[u8]>>(
    idx: &IndexReader<B>,
    blob: &File,
    root: &Path,
) -> Result<UnpackStats> {
    let mut stats = UnpackStats::default();
    let mut dirs: Vec<(InodeRecord, PathBuf)> = Vec::new();
    let mut linked: HashMap<u64, PathBuf> = HashMap::new();
    let mut stack: Vec<(u64, PathBuf)> = vec![(ROOT_INO, root.to_path_buf())];
    let mut decoder = ChunkDecoder::default();
    while let Some((ino, path)) = stack.pop() {
        let dir = idx.inode(ino)?;
        if dir.is_opaque() {
            for e in fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))? {
                remove_any(&e?.path())?;
            }
        }
        for (name, child_ino) in idx.dirents(&dir) {
            let child = idx.inode(child_ino)?;
            let cpath = join(&path, name);
            stats.entries += 1;
            match child.kind {
                InodeKind::Whiteout => remove_any(&cpath)?,
                InodeKind::Dir => {
                    let is_dir = fs::symlink_metadata(&cpath)
                        .map(|m| m.is_dir())
                        .unwrap_or(false);
                    if !is_dir {
                        remove_any(&cpath)?;
                        fs::create_dir(&cpath)
                            .with_context(|| format!("creating {}", cpath.display()))?;
                    }
                    dirs.push((child, cpath.clone()));
                    stack.push((child_ino, cpath));
                }
                _ => {
                    remove_any(&cpath)?;
                    if let Some(first) = linked.get(&child_ino) {
                        fs::hard_link(first, &cpath)
                            .with_context(|| format!("linking {}", cpath.display()))?;
                        continue;
                    }
                    stats.bytes += create_leaf(idx, blob, &child, &cpath, &mut decoder)?;
                    set_metadata(idx, &child, &cpath)?;
                    if child.nlink > 1 {
                        linked.insert(child_ino, cpath);
                    }
                }
            }
        }
    }
    // Children first, so that setting a directory's time is the last change to it.
    for (rec, p) in dirs.iter().rev() {
        set_metadata(idx, rec, p)?;
    }
    Ok(stats)
}

/// Decodes chunks, remembering the last one (a sparse 4 GiB file is one zero chunk
/// referenced thousands of times).
#[derive(Default)]
struct ChunkDecoder {
    last: Option<(u64, Vec<u8>, bool)>,
    stored: Vec<u8>,
}

impl ChunkDecoder {
    fn get<B: AsRef<[u8]>>(
        &mut self,
        idx: &IndexReader<B>,
        blob: &File,
        c: u64,
    ) -> Result<(&[u8], bool)> {
        if self.last.as_ref().map(|l| l.0) != Some(c) {
            let rec = idx.chunk(c)?;
            self.stored.resize(rec.stored_len as usize, 0);
            blob.read_exact_at(&mut self.stored, rec.offset)
                .with_context(|| format!("reading chunk {} from the chunk blob", rec.digest))?;
            let data = chunk::decode(&self.stored, rec.uncompressed_len as usize, &rec.digest)?;
            let zero = data.iter().all(|b| *b == 0);
            self.last = Some((c, data, zero));
        }
        let l = self.last.as_ref().expect("just set");
        Ok((&l.1, l.2))
    }
}

fn create_leaf<B: AsRef<[u8]>>(
    idx: &IndexReader<B>,
    blob: &File,
    rec: &InodeRecord,
    p: &Path,
    decoder: &mut ChunkDecoder,
) -> Result<u64> {
    let ctx = || format!("creating {}", p.display());
    match rec.kind {
        InodeKind::File => {
            let mut f = File::create(p).with_context(ctx)?;
            for c in idx.file_chunks(rec) {
                let (data, zero) = decoder.get(idx, blob, c)?;
                if zero {
                    f.seek(SeekFrom::Current(data.len() as i64))?;
                } else {
                    f.write_all(data).with_context(ctx)?;
                }
            }
            f.set_len(rec.size).with_context(ctx)?;
            return Ok(rec.size);
        }
        InodeKind::Symlink => {
            std::os::unix::fs::symlink(OsStr::from_bytes(idx.symlink_target(rec)), p)
                .with_context(ctx)?;
        }
        InodeKind::CharDev | InodeKind::BlockDev => {
            let kind = if rec.kind == InodeKind::CharDev {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            let (maj, min) = rec.rdev();
            mknod(
                p,
                kind,
                Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(maj as u64, min as u64),
            )
            .with_context(ctx)?;
        }
        InodeKind::Fifo => {
            nix::unistd::mkfifo(p, Mode::from_bits_truncate(0o600)).with_context(ctx)?;
        }
        InodeKind::Dir | InodeKind::Whiteout => unreachable!("handled by the caller"),
    }
    Ok(0)
}

/// Owner, mode, xattrs, then times: chown clears setuid bits and file capabilities, so it
/// goes first; the time goes last.
fn set_metadata<B: AsRef<[u8]>>(idx: &IndexReader<B>, rec: &InodeRecord, p: &Path) -> Result<()> {
    let ctx = |what: &str| format!("setting {what} of {}", p.display());
    std::os::unix::fs::lchown(p, Some(rec.uid), Some(rec.gid)).with_context(|| ctx("owner"))?;
    if rec.kind != InodeKind::Symlink {
        fs::set_permissions(p, fs::Permissions::from_mode(rec.mode))
            .with_context(|| ctx("mode"))?;
    }
    for (k, v) in idx.xattrs(rec) {
        xattr::set(p, OsStr::from_bytes(k), v)
            .with_context(|| ctx(&format!("xattr {}", String::from_utf8_lossy(k))))?;
    }
    let t = TimeSpec::new(rec.mtime, rec.mtime_nsec as i64);
    utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink).with_context(|| ctx("times"))?;
    Ok(())
}
