//! `beam unpack`: materialise an image's root filesystem from its Beam layers, applying them
//! bottom to top the way a container runtime applies OCI layers (whiteouts delete, opaque
//! directories hide what is below). Used by tests as the reference for the lazy mount, and
//! for debugging a conversion. Every chunk is verified against its digest before a byte of it
//! is written.
//!
//! Writes stay beneath the target (issue 16). Every directory is opened relative to its parent
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and every entry is created, changed
//! and removed relative to its directory's descriptor without following a symlink
//! (`O_NOFOLLOW | O_EXCL`, `AT_SYMLINK_NOFOLLOW`). A symlink an earlier layer (or anyone)
//! planted where a later layer has a directory is replaced, never followed, so no layer writes
//! outside the target, whatever the order of its entries.
//!
//! Rootless: a user that is not root cannot set owners, make device nodes or set `trusted.*`
//! and `security.*` xattrs. Unpacking as such a user (or with `rootless`) skips those with one
//! warning per kind and counts them, instead of aborting.

use crate::format::chunk;
use crate::format::index::{IndexReader, InodeKind, InodeRecord, ROOT_INO};
use crate::store::Store;
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fchmodat, mknodat, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

/// Counters of an unpack.
#[derive(Debug, Default, Clone)]
pub struct UnpackStats {
    pub layers: usize,
    pub entries: u64,
    pub bytes: u64,
    /// Rootless: owners not set, device nodes not made, privileged xattrs not set.
    pub skipped_owners: u64,
    pub skipped_devices: u64,
    pub skipped_xattrs: u64,
}

impl UnpackStats {
    fn add(&mut self, o: &UnpackStats) {
        self.entries += o.entries;
        self.bytes += o.bytes;
        self.skipped_owners += o.skipped_owners;
        self.skipped_devices += o.skipped_devices;
        self.skipped_xattrs += o.skipped_xattrs;
    }
}

/// How to unpack.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Skip what needs root (owners, device nodes, privileged xattrs), with a warning.
    pub rootless: bool,
}

impl Default for UnpackOptions {
    /// Rootless when not running as root.
    fn default() -> Self {
        UnpackOptions {
            rootless: !nix::unistd::geteuid().is_root(),
        }
    }
}

/// Unpack the Beam conversion of the image at `store` into `dir` (created if missing; must be
/// empty).
pub async fn unpack_image(store: &Store, dir: &Path, opts: UnpackOptions) -> Result<UnpackStats> {
    let (_, artifact, layers) = store.beam_image().await?;
    tracing::info!(%artifact, layers = layers.len(), "unpacking Beam layers");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} is not empty", dir.display());
    }
    let tmp = tempfile::Builder::new().prefix("beam-unpack-").tempdir()?;
    let mut stats = UnpackStats::default();
    for (i, l) in layers.iter().enumerate() {
        let index = store
            .blob_bytes(&l.index, crate::format::index::MAX_INDEX_LEN as u64)
            .await
            .and_then(|blob| {
                Ok(crate::oci::index_of_blob(
                    &l.index,
                    blob,
                    crate::format::index::MAX_INDEX_LEN,
                )?)
            })
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
            let s = apply_layer(&reader, &blob, &dir, opts)
                .with_context(|| format!("applying layer {source}"))?;
            std::fs::remove_file(&blob_path).ok();
            Ok(s)
        })
        .await??;
        stats.layers += 1;
        stats.add(&s);
    }
    if stats.skipped_owners + stats.skipped_devices + stats.skipped_xattrs > 0 {
        tracing::warn!(
            owners = stats.skipped_owners,
            devices = stats.skipped_devices,
            xattrs = stats.skipped_xattrs,
            "rootless unpack: skipped what needs root"
        );
    }
    Ok(stats)
}

/// `openat2(dirfd, name, flags, mode)` resolving beneath `dirfd` and through no symlink.
// openat2 returns a raw descriptor that the caller must own.
#[allow(unsafe_code)]
fn open_beneath(dirfd: RawFd, name: &[u8], flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = nix::fcntl::openat2(dirfd, OsStr::from_bytes(name), how)?;
    // SAFETY: openat2 just returned this descriptor, open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open the directory `name` in `dirfd` (no symlink followed).
fn open_dir(dirfd: RawFd, name: &[u8]) -> nix::Result<File> {
    open_beneath(
        dirfd,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .map(File::from)
}

fn what(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Remove `name` from `dirfd`, whatever it is (a directory with its contents, a symlink
/// itself, never its target); fine if nothing is there.
fn remove_at(dirfd: RawFd, name: &[u8]) -> Result<()> {
    let name_os = OsStr::from_bytes(name);
    match unlinkat(Some(dirfd), name_os, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", what(name))),
    }
    // A directory: empty it through its own descriptor, then remove it.
    let sub = open_dir(dirfd, name).with_context(|| format!("opening {}", what(name)))?;
    clear_dir(&sub).with_context(|| format!("emptying {}", what(name)))?;
    unlinkat(Some(dirfd), name_os, UnlinkatFlags::RemoveDir)
        .with_context(|| format!("removing {}", what(name)))
}

/// Remove everything in the directory `dir`.
fn clear_dir(dir: &File) -> Result<()> {
    // The directory's own descriptor, through /proc (the magic link is the open directory,
    // whatever its path has become).
    let fd_path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut names: Vec<Vec<u8>> = Vec::new();
    for e in std::fs::read_dir(&fd_path).with_context(|| format!("reading {fd_path}"))? {
        names.push(e?.file_name().as_bytes().to_vec());
    }
    for n in names {
        remove_at(dir.as_raw_fd(), &n)?;
    }
    Ok(())
}

/// What an entry of a layer is, once created: its directory and name (for the `*at` calls), and
/// for files and directories an open descriptor (for `fchmod`, `fsetxattr`).
struct Placed<'a> {
    dirfd: RawFd,
    name: &'a [u8],
    fd: Option<&'a File>,
}

/// A directory whose metadata is set after its contents: its record, descriptor, name and
/// parent directory.
struct DirToFinish {
    rec: InodeRecord,
    fd: Rc<File>,
    name: Vec<u8>,
    parent: Rc<File>,
}

/// Apply one layer to `root`.
pub fn apply_layer<B: AsRef<[u8]>>(
    idx: &IndexReader<B>,
    blob: &File,
    root: &Path,
    opts: UnpackOptions,
) -> Result<UnpackStats> {
    let root_fd = File::open(root).with_context(|| format!("opening {}", root.display()))?;
    let mut stats = UnpackStats::default();
    // Directories whose metadata is set last (children first), with their parents.
    let mut dirs: Vec<DirToFinish> = Vec::new();
    // The first name of each hard-linked inode: its directory and name.
    let mut linked: HashMap<u64, (Rc<File>, Vec<u8>)> = HashMap::new();
    let root_fd = Rc::new(root_fd);
    let mut stack: Vec<(u64, Rc<File>)> = vec![(ROOT_INO, root_fd.clone())];
    let mut decoder = ChunkDecoder::default();
    let mut warned = Warned::default();
    while let Some((ino, dirfd)) = stack.pop() {
        let dir = idx.inode(ino)?;
        if dir.is_opaque() {
            clear_dir(&dirfd)?;
        }
        let d = dirfd.as_raw_fd();
        for (name, child_ino) in idx.dirents(&dir) {
            let child = idx.inode(child_ino)?;
            stats.entries += 1;
            let ctx = || format!("creating {}", what(name));
            match child.kind {
                InodeKind::Whiteout => remove_at(d, name)?,
                InodeKind::Dir => {
                    // A directory stays (its contents merge); anything else is replaced.
                    let sub = match open_dir(d, name) {
                        Ok(fd) => fd,
                        Err(_) => {
                            remove_at(d, name)?;
                            nix::sys::stat::mkdirat(
                                Some(d),
                                OsStr::from_bytes(name),
                                Mode::from_bits_truncate(0o700),
                            )
                            .with_context(ctx)?;
                            open_dir(d, name).with_context(ctx)?
                        }
                    };
                    let sub = Rc::new(sub);
                    dirs.push(DirToFinish {
                        rec: child,
                        fd: sub.clone(),
                        name: name.to_vec(),
                        parent: dirfd.clone(),
                    });
                    stack.push((child_ino, sub));
                }
                _ => {
                    remove_at(d, name)?;
                    if let Some((first_dir, first_name)) = linked.get(&child_ino) {
                        linkat(
                            Some(first_dir.as_raw_fd()),
                            OsStr::from_bytes(first_name),
                            Some(d),
                            OsStr::from_bytes(name),
                            AtFlags::empty(),
                        )
                        .with_context(|| format!("linking {}", what(name)))?;
                        continue;
                    }
                    let file = create_leaf(
                        idx,
                        blob,
                        &child,
                        d,
                        name,
                        &mut decoder,
                        opts,
                        &mut stats,
                        &mut warned,
                    )?;
                    let Some(file) = file else { continue };
                    let placed = Placed {
                        dirfd: d,
                        name,
                        fd: file.as_ref(),
                    };
                    set_metadata(idx, &child, &placed, opts, &mut stats, &mut warned)?;
                    if child.nlink > 1 {
                        linked.insert(child_ino, (dirfd.clone(), name.to_vec()));
                    }
                }
            }
        }
    }
    // Children first, so that setting a directory's time is the last change to it.
    for d in dirs.iter().rev() {
        let placed = Placed {
            dirfd: d.parent.as_raw_fd(),
            name: &d.name,
            fd: Some(&d.fd),
        };
        set_metadata(idx, &d.rec, &placed, opts, &mut stats, &mut warned)?;
    }
    Ok(stats)
}

/// Which rootless warnings were given (one per kind and layer).
#[derive(Default)]
struct Warned {
    owners: bool,
    devices: bool,
    xattrs: bool,
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

/// Create the leaf `name` in `dirfd`. `Ok(None)`: skipped (a device node, rootless);
/// `Ok(Some(Some(fd)))`: a regular file, open; `Ok(Some(None))`: another kind.
#[allow(clippy::too_many_arguments)]
fn create_leaf<B: AsRef<[u8]>>(
    idx: &IndexReader<B>,
    blob: &File,
    rec: &InodeRecord,
    dirfd: RawFd,
    name: &[u8],
    decoder: &mut ChunkDecoder,
    opts: UnpackOptions,
    stats: &mut UnpackStats,
    warned: &mut Warned,
) -> Result<Option<Option<File>>> {
    let ctx = || format!("creating {}", what(name));
    let name_os = OsStr::from_bytes(name);
    match rec.kind {
        InodeKind::File => {
            let fd = open_beneath(
                dirfd,
                name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                Mode::from_bits_truncate(0o600),
            )
            .with_context(ctx)?;
            let mut f = File::from(fd);
            for c in idx.file_chunks(rec) {
                let (data, zero) = decoder.get(idx, blob, c)?;
                if zero {
                    f.seek(SeekFrom::Current(data.len() as i64))?;
                } else {
                    f.write_all(data).with_context(ctx)?;
                }
            }
            f.set_len(rec.size).with_context(ctx)?;
            stats.bytes += rec.size;
            Ok(Some(Some(f)))
        }
        InodeKind::Symlink => {
            symlinkat(
                OsStr::from_bytes(idx.symlink_target(rec)),
                Some(dirfd),
                name_os,
            )
            .with_context(ctx)?;
            Ok(Some(None))
        }
        InodeKind::CharDev | InodeKind::BlockDev => {
            let kind = if rec.kind == InodeKind::CharDev {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            let (maj, min) = rec.rdev();
            match mknodat(
                Some(dirfd),
                name_os,
                kind,
                Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(maj as u64, min as u64),
            ) {
                Ok(()) => Ok(Some(None)),
                Err(Errno::EPERM) if opts.rootless => {
                    stats.skipped_devices += 1;
                    if !std::mem::replace(&mut warned.devices, true) {
                        tracing::warn!(name = %what(name), "rootless unpack: device nodes are skipped");
                    }
                    Ok(None)
                }
                Err(e) => Err(e).with_context(ctx),
            }
        }
        InodeKind::Fifo => {
            nix::unistd::mkfifoat(Some(dirfd), name_os, Mode::from_bits_truncate(0o600))
                .with_context(ctx)?;
            Ok(Some(None))
        }
        InodeKind::Dir | InodeKind::Whiteout => unreachable!("handled by the caller"),
    }
}

/// Owner, mode, xattrs, then times: chown clears setuid bits and file capabilities, so it
/// goes first; the time goes last. Nothing here follows a symlink.
fn set_metadata<B: AsRef<[u8]>>(
    idx: &IndexReader<B>,
    rec: &InodeRecord,
    p: &Placed<'_>,
    opts: UnpackOptions,
    stats: &mut UnpackStats,
    warned: &mut Warned,
) -> Result<()> {
    let ctx = |w: &str| format!("setting {w} of {}", what(p.name));
    let name = OsStr::from_bytes(p.name);
    match fchownat(
        Some(p.dirfd),
        name,
        Some(Uid::from_raw(rec.uid)),
        Some(Gid::from_raw(rec.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(()) => {}
        Err(Errno::EPERM) | Err(Errno::EINVAL) if opts.rootless => {
            stats.skipped_owners += 1;
            if !std::mem::replace(&mut warned.owners, true) {
                tracing::warn!(
                    "rootless unpack: owners are not set (files belong to the unpacking user)"
                );
            }
        }
        Err(e) => return Err(e).with_context(|| ctx("owner")),
    }
    if rec.kind != InodeKind::Symlink {
        let mode = Mode::from_bits_truncate(rec.mode);
        match p.fd {
            Some(fd) => fchmod(fd.as_raw_fd(), mode),
            // A device node or fifo we just made in this directory (not a symlink).
            None => {
                fchmodat(Some(p.dirfd), name, mode, FchmodatFlags::NoFollowSymlink).or_else(|e| {
                    match e {
                        // Linux before 6.6 has no AT_SYMLINK_NOFOLLOW for fchmodat.
                        Errno::EOPNOTSUPP => {
                            fchmodat(Some(p.dirfd), name, mode, FchmodatFlags::FollowSymlink)
                        }
                        e => Err(e),
                    }
                })
            }
        }
        .with_context(|| ctx("mode"))?;
    }
    for (k, v) in idx.xattrs(rec) {
        let privileged = k.starts_with(b"trusted.") || k.starts_with(b"security.");
        let set = match p.fd {
            Some(fd) => xattr::FileExt::set_xattr(fd, OsStr::from_bytes(k), v),
            // lsetxattr through the directory's descriptor: never the symlink's target.
            None => xattr::set(
                Path::new(&format!("/proc/self/fd/{}", p.dirfd)).join(name),
                OsStr::from_bytes(k),
                v,
            ),
        };
        match set {
            Ok(()) => {}
            Err(e) if opts.rootless && privileged => {
                stats.skipped_xattrs += 1;
                if !std::mem::replace(&mut warned.xattrs, true) {
                    tracing::warn!(error = %e, "rootless unpack: trusted.* and security.* xattrs are skipped");
                }
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| ctx(&format!("xattr {}", String::from_utf8_lossy(k))))
            }
        }
    }
    let t = TimeSpec::new(rec.mtime, rec.mtime_nsec as i64);
    nix::sys::stat::utimensat(Some(p.dirfd), name, &t, &t, UtimensatFlags::NoFollowSymlink)
        .with_context(|| ctx("times"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{convert_layer, ConvertOptions};
    use std::os::unix::fs::MetadataExt;

    fn header(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }

    /// A layer (index and chunk blob file) made by the converter from a tar.
    fn layer(
        dir: &Path,
        n: u32,
        build: impl FnOnce(&mut tar::Builder<&mut Vec<u8>>),
    ) -> (IndexReader<Vec<u8>>, File) {
        let mut tar_bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut tar_bytes);
            build(&mut b);
            b.finish().unwrap();
        }
        let blob_path = dir.join(format!("chunks-{n}"));
        let out = std::io::BufWriter::new(File::create(&blob_path).unwrap());
        let c = convert_layer(&tar_bytes[..], out, &ConvertOptions::default(), None).unwrap();
        (
            IndexReader::new(c.index).unwrap(),
            File::open(&blob_path).unwrap(),
        )
    }

    fn file(b: &mut tar::Builder<&mut Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = header(tar::EntryType::Regular, 0o644, 0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn dir(b: &mut tar::Builder<&mut Vec<u8>>, path: &str) {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, path, &[][..]).unwrap();
    }

    fn symlink(b: &mut tar::Builder<&mut Vec<u8>>, path: &str, target: &Path) {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, path, target).unwrap();
    }

    /// A symlink planted where a layer has a directory, by the target's owner or by a lower
    /// layer, is replaced: nothing is written through it to where it points.
    #[test]
    fn writes_never_pass_through_a_planted_symlink() {
        let work = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("etc")).unwrap();
        let opts = UnpackOptions::default();

        // Layer 1: a symlink to the outside directory, under another name.
        let (l1, b1) = layer(work.path(), 1, |b| symlink(b, "var", outside.path()));
        apply_layer(&l1, &b1, &root, opts).unwrap();
        // Layer 2: directories and files where both symlinks are.
        let (l2, b2) = layer(work.path(), 2, |b| {
            dir(b, "etc");
            file(b, "etc/passwd", b"root:x:0:0::/root:/bin/sh\n");
            dir(b, "var");
            file(b, "var/evil", b"written outside?\n");
        });
        apply_layer(&l2, &b2, &root, opts).unwrap();

        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "a layer wrote outside the target"
        );
        for d in ["etc", "var"] {
            let m = std::fs::symlink_metadata(root.join(d)).unwrap();
            assert!(m.is_dir(), "{d} is still a symlink");
        }
        assert_eq!(
            std::fs::read(root.join("etc/passwd")).unwrap(),
            b"root:x:0:0::/root:/bin/sh\n"
        );
    }

    /// As root everything is applied; as any other user (tests/run.sh runs this as `nobody`)
    /// owners, device nodes and privileged xattrs are skipped and counted, and the rest of the
    /// tree is still written.
    #[test]
    fn rootless_unpack_skips_what_needs_root_and_writes_the_rest() {
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let (l, b) = layer(work.path(), 1, |b| {
            let mut h = header(tar::EntryType::Regular, 0o4755, 1234);
            h.set_size(3);
            b.append_data(&mut h, "bin/tool", &b"abc"[..]).unwrap();
            let mut h = header(tar::EntryType::Char, 0o666, 0);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            b.append_data(&mut h, "dev/null", &[][..]).unwrap();
            // A PAX xattr record, as tar --xattrs writes it.
            b.append_pax_extensions([("SCHILY.xattr.trusted.beam", &b"x"[..])])
                .unwrap();
            file(b, "etc/marked", b"m\n");
        });
        let root_user = nix::unistd::geteuid().is_root();
        let s = apply_layer(&l, &b, &root, UnpackOptions::default()).unwrap();
        assert_eq!(std::fs::read(root.join("bin/tool")).unwrap(), b"abc");
        assert_eq!(std::fs::read(root.join("etc/marked")).unwrap(), b"m\n");
        let tool = std::fs::metadata(root.join("bin/tool")).unwrap();
        if root_user {
            assert_eq!(
                (s.skipped_owners, s.skipped_devices, s.skipped_xattrs),
                (0, 0, 0)
            );
            assert_eq!(tool.uid(), 1234);
            assert_eq!(tool.mode() & 0o7777, 0o4755);
            let dev = std::fs::symlink_metadata(root.join("dev/null")).unwrap();
            assert_eq!(dev.rdev(), nix::sys::stat::makedev(1, 3));
            assert_eq!(
                xattr::get(root.join("etc/marked"), "trusted.beam").unwrap(),
                Some(b"x".to_vec())
            );
        } else {
            assert!(s.skipped_owners >= 1, "{s:?}");
            assert_eq!(s.skipped_devices, 1, "{s:?}");
            assert_eq!(s.skipped_xattrs, 1, "{s:?}");
            assert_eq!(tool.uid(), nix::unistd::geteuid().as_raw());
            assert!(!root.join("dev/null").exists());
        }
    }
}
