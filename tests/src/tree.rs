//! Snapshots of a directory tree (metadata, xattrs and content hashes) and their comparison,
//! to check that a lazily served root filesystem equals a reference extraction.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileType {
    /// Regular file.
    Regular,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    Char,
    /// Block device.
    Block,
}

/// Everything recorded about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The kind of entry.
    pub kind: FileType,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes for regular files, 0 otherwise.
    pub size: u64,
    /// Modification time, whole seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds part.
    pub mtime_nsec: i64,
    /// Extended attributes of every namespace, by name (sorted).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Symlink target, for symlinks.
    pub link_target: Option<Vec<u8>>,
    /// `(major, minor)`, for character and block devices.
    pub rdev: Option<(u32, u32)>,
    /// Number of hard links.
    pub nlink: u64,
    /// For a non-directory that shares its inode with other entries of the snapshot: the first
    /// such path (in byte order) when this is not that first path. Describes hard-link structure
    /// independently of inode numbers.
    pub hardlink_to: Option<Vec<u8>>,
    /// Hex sha256 of the content, for regular files.
    pub sha256: Option<String>,
}

/// What [`diff`] ignores.
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Ignore the mtime of directories (it changes whenever an entry is added).
    pub ignore_dir_mtime: bool,
    /// Ignore all mtimes.
    pub ignore_mtime: bool,
    /// Also compare the nanosecond part of mtimes (off by default: tar headers often keep seconds only).
    pub compare_mtime_nsec: bool,
    /// Ignore link counts.
    pub ignore_nlink: bool,
    /// Ignore the link counts of directories only (overlayfs reports 1 for merged ones).
    pub ignore_dir_nlink: bool,
    /// Ignore hard-link structure ([`Entry::hardlink_to`]).
    pub ignore_hardlinks: bool,
    /// Ignore the `security.selinux` xattr.
    pub ignore_selinux: bool,
    /// Ignore the root directory's own entry (`.`).
    pub ignore_root: bool,
}

/// The key of the root directory in a snapshot.
pub const ROOT: &[u8] = b".";

fn file_type(ft: fs::FileType) -> FileType {
    if ft.is_dir() {
        FileType::Dir
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_fifo() {
        FileType::Fifo
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_char_device() {
        FileType::Char
    } else if ft.is_block_device() {
        FileType::Block
    } else {
        FileType::Regular
    }
}

fn read_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    // xattr::list / xattr::get do not follow symlinks (llistxattr / lgetxattr).
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTSUP as i32) => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing xattrs of {}", path.display())),
    };
    for name in names {
        let value = xattr::get(path, &name)
            .with_context(|| format!("reading xattr {:?} of {}", name, path.display()))?
            .unwrap_or_default();
        out.insert(name.as_bytes().to_vec(), value);
    }
    Ok(out)
}

fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn join_rel(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent == ROOT {
        name.to_vec()
    } else {
        let mut v = parent.to_vec();
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

/// Walks `root` (not following symlinks) and records every entry, keyed by its path relative
/// to `root` as raw bytes; the root itself is [`ROOT`] (`.`).
pub fn snapshot(root: &Path) -> Result<BTreeMap<Vec<u8>, Entry>> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    let meta = fs::symlink_metadata(root).with_context(|| format!("stat {}", root.display()))?;
    let mut stack = vec![(ROOT.to_vec(), root.to_path_buf(), meta)];
    while let Some((rel, path, meta)) = stack.pop() {
        let kind = file_type(meta.file_type());
        let mut entry = Entry {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: if kind == FileType::Regular {
                meta.size()
            } else {
                0
            },
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            xattrs: read_xattrs(&path)?,
            link_target: None,
            rdev: None,
            nlink: meta.nlink(),
            hardlink_to: None,
            sha256: None,
        };
        match kind {
            FileType::Regular => entry.sha256 = Some(hash_file(&path)?),
            FileType::Symlink => {
                let target =
                    fs::read_link(&path).with_context(|| format!("readlink {}", path.display()))?;
                entry.link_target = Some(target.as_os_str().as_bytes().to_vec());
            }
            FileType::Char | FileType::Block => {
                let rdev = meta.rdev();
                entry.rdev = Some((
                    nix::sys::stat::major(rdev) as u32,
                    nix::sys::stat::minor(rdev) as u32,
                ));
            }
            FileType::Dir => {
                let rd = fs::read_dir(&path)
                    .with_context(|| format!("reading directory {}", path.display()))?;
                for child in rd {
                    let child =
                        child.with_context(|| format!("reading directory {}", path.display()))?;
                    let child_path = child.path();
                    let child_meta = fs::symlink_metadata(&child_path)
                        .with_context(|| format!("stat {}", child_path.display()))?;
                    let child_rel = join_rel(&rel, child.file_name().as_bytes());
                    stack.push((child_rel, child_path, child_meta));
                }
            }
            FileType::Fifo | FileType::Socket => {}
        }
        if kind != FileType::Dir && meta.nlink() > 1 {
            inodes
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel.clone());
        }
        out.insert(rel, entry);
    }
    for mut paths in inodes.into_values() {
        if paths.len() < 2 {
            continue;
        }
        paths.sort();
        let first = paths[0].clone();
        for p in &paths[1..] {
            if let Some(e) = out.get_mut(p) {
                e.hardlink_to = Some(first.clone());
            }
        }
    }
    Ok(out)
}

/// A path for humans: printable ASCII as is, other bytes escaped.
pub fn show(path: &[u8]) -> String {
    path.escape_ascii().to_string()
}

fn show_opt(v: &Option<Vec<u8>>) -> String {
    match v {
        Some(b) => format!("\"{}\"", show(b)),
        None => "none".into(),
    }
}

/// Human-readable differences from `a` to `b`: paths only in one of them, and every differing
/// field of paths in both. Empty when they are the same under `opts`.
pub fn diff(
    a: &BTreeMap<Vec<u8>, Entry>,
    b: &BTreeMap<Vec<u8>, Entry>,
    opts: &DiffOptions,
) -> Vec<String> {
    let mut out = Vec::new();
    let skip = |p: &Vec<u8>| opts.ignore_root && p.as_slice() == ROOT;
    for (path, ea) in a {
        if skip(path) {
            continue;
        }
        let p = show(path);
        let Some(eb) = b.get(path) else {
            out.push(format!("{p}: only in a ({:?})", ea.kind));
            continue;
        };
        if ea.kind != eb.kind {
            out.push(format!("{p}: type {:?} != {:?}", ea.kind, eb.kind));
            continue;
        }
        if ea.mode != eb.mode {
            out.push(format!("{p}: mode {:04o} != {:04o}", ea.mode, eb.mode));
        }
        if ea.uid != eb.uid || ea.gid != eb.gid {
            out.push(format!(
                "{p}: owner {}:{} != {}:{}",
                ea.uid, ea.gid, eb.uid, eb.gid
            ));
        }
        if ea.size != eb.size {
            out.push(format!("{p}: size {} != {}", ea.size, eb.size));
        }
        let skip_mtime = opts.ignore_mtime || (opts.ignore_dir_mtime && ea.kind == FileType::Dir);
        if !skip_mtime {
            if ea.mtime != eb.mtime {
                out.push(format!("{p}: mtime {} != {}", ea.mtime, eb.mtime));
            } else if opts.compare_mtime_nsec && ea.mtime_nsec != eb.mtime_nsec {
                out.push(format!(
                    "{p}: mtime nsec {} != {}",
                    ea.mtime_nsec, eb.mtime_nsec
                ));
            }
        }
        let keep = |(k, _): &(&Vec<u8>, &Vec<u8>)| {
            !(opts.ignore_selinux && k.as_slice() == b"security.selinux")
        };
        let xa: Vec<_> = ea.xattrs.iter().filter(keep).collect();
        let xb: Vec<_> = eb.xattrs.iter().filter(keep).collect();
        if xa != xb {
            for (k, v) in &xa {
                match eb.xattrs.get(*k) {
                    None => out.push(format!("{p}: xattr {} only in a", show(k))),
                    Some(w) if w != *v => out.push(format!(
                        "{p}: xattr {} = \"{}\" != \"{}\"",
                        show(k),
                        show(v),
                        show(w)
                    )),
                    Some(_) => {}
                }
            }
            for (k, _) in &xb {
                if !ea.xattrs.contains_key(*k) {
                    out.push(format!("{p}: xattr {} only in b", show(k)));
                }
            }
        }
        if ea.link_target != eb.link_target {
            out.push(format!(
                "{p}: symlink target {} != {}",
                show_opt(&ea.link_target),
                show_opt(&eb.link_target)
            ));
        }
        if ea.rdev != eb.rdev {
            out.push(format!("{p}: device {:?} != {:?}", ea.rdev, eb.rdev));
        }
        let dir_nlink_ignored = opts.ignore_dir_nlink && ea.kind == FileType::Dir;
        if !opts.ignore_nlink && !dir_nlink_ignored && ea.nlink != eb.nlink {
            out.push(format!("{p}: nlink {} != {}", ea.nlink, eb.nlink));
        }
        if !opts.ignore_hardlinks && ea.hardlink_to != eb.hardlink_to {
            out.push(format!(
                "{p}: hard link to {} != {}",
                show_opt(&ea.hardlink_to),
                show_opt(&eb.hardlink_to)
            ));
        }
        if ea.sha256 != eb.sha256 {
            out.push(format!(
                "{p}: content sha256 {:?} != {:?}",
                ea.sha256, eb.sha256
            ));
        }
    }
    for (path, eb) in b {
        if !skip(path) && !a.contains_key(path) {
            out.push(format!("{}: only in b ({:?})", show(path), eb.kind));
        }
    }
    out
}

/// Panics, listing the first 50 differences, unless `a` and `b` are the same with the
/// default [`DiffOptions`].
#[track_caller]
pub fn assert_same(a: &BTreeMap<Vec<u8>, Entry>, b: &BTreeMap<Vec<u8>, Entry>) {
    assert_same_with(a, b, &DiffOptions::default());
}

/// [`assert_same`] with explicit options.
#[track_caller]
pub fn assert_same_with(
    a: &BTreeMap<Vec<u8>, Entry>,
    b: &BTreeMap<Vec<u8>, Entry>,
    opts: &DiffOptions,
) {
    let d = diff(a, b, opts);
    if !d.is_empty() {
        let shown: Vec<&str> = d.iter().take(50).map(String::as_str).collect();
        panic!(
            "trees differ in {} place(s) (a: {} entries, b: {} entries); first {}:\n{}",
            d.len(),
            a.len(),
            b.len(),
            shown.len(),
            shown.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{utimensat, Mode, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    use std::ffi::OsStr;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o640)).unwrap();
    }

    fn set_mtime(path: &Path, sec: i64, nsec: i64) {
        let ts = TimeSpec::new(sec, nsec);
        utimensat(None, path, &ts, &ts, UtimensatFlags::NoFollowSymlink).unwrap();
    }

    fn populate(root: &Path) {
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/file"), b"content").unwrap();
        fs::set_permissions(root.join("d/file"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(root.join("d/file"), root.join("hard")).unwrap();
        symlink("d/file", root.join("link")).unwrap();
        symlink("/nonexistent/target", root.join("dangling")).unwrap();
        mkfifo(&root.join("fifo"));
        xattr::set(root.join("d/file"), "user.beam", b"v1").unwrap();
        // A non-UTF-8 name.
        fs::write(root.join(OsStr::from_bytes(b"bad\xffname")), b"x").unwrap();
        for p in ["d/file", "hard", "link", "dangling", "fifo", "d"] {
            set_mtime(&root.join(p), 1_600_000_000, 5);
        }
    }

    #[test]
    fn snapshot_records_everything() {
        let tmp = tempfile::tempdir().unwrap();
        populate(tmp.path());
        let s = snapshot(tmp.path()).unwrap();
        let keys: Vec<String> = s.keys().map(|k| show(k)).collect();
        assert_eq!(
            keys,
            [
                ".",
                "bad\\xffname",
                "d",
                "d/file",
                "dangling",
                "fifo",
                "hard",
                "link"
            ]
        );
        let f = &s[&b"d/file"[..]];
        assert_eq!(f.kind, FileType::Regular);
        assert_eq!(f.mode, 0o4755);
        assert_eq!(f.size, 7);
        assert_eq!(f.nlink, 2);
        assert_eq!(f.mtime, 1_600_000_000);
        assert_eq!(f.mtime_nsec, 5);
        assert_eq!(f.xattrs.get(&b"user.beam"[..]), Some(&b"v1".to_vec()));
        assert_eq!(
            f.sha256.as_deref(),
            Some("ed7002b439e9ac845f22357d822bac1444730fbdb6016d3ec9432297b9ec9f73")
        );
        // "d/file" < "hard": the later path points to the earlier one.
        assert_eq!(f.hardlink_to, None);
        assert_eq!(s[&b"hard"[..]].hardlink_to, Some(b"d/file".to_vec()));
        let l = &s[&b"link"[..]];
        assert_eq!(l.kind, FileType::Symlink);
        assert_eq!(l.link_target, Some(b"d/file".to_vec()));
        assert_eq!(l.sha256, None);
        assert_eq!(
            s[&b"dangling"[..]].link_target,
            Some(b"/nonexistent/target".to_vec())
        );
        assert_eq!(s[&b"fifo"[..]].kind, FileType::Fifo);
        assert_eq!(s[&b"fifo"[..]].mode, 0o640 & !umask());
        assert_eq!(s[ROOT].kind, FileType::Dir);
    }

    fn umask() -> u32 {
        // umask can only be read by setting it: set it back at once.
        let m = nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
        nix::sys::stat::umask(m);
        m.bits()
    }

    #[test]
    fn diff_finds_each_difference() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        populate(a.path());
        populate(b.path());
        let sa = snapshot(a.path()).unwrap();
        let sb = snapshot(b.path()).unwrap();
        let opts = DiffOptions {
            ignore_root: true,
            ..Default::default()
        };
        assert_same_with(&sa, &sb, &opts);

        // Change many things in b.
        fs::write(b.path().join("d/file"), b"CONTENT").unwrap();
        set_mtime(&b.path().join("d/file"), 1_600_000_000, 5);
        fs::set_permissions(b.path().join("d/file"), fs::Permissions::from_mode(0o755)).unwrap();
        xattr::set(b.path().join("d/file"), "user.beam", b"v2").unwrap();
        xattr::set(b.path().join("d/file"), "trusted.extra", b"1").unwrap();
        fs::remove_file(b.path().join("link")).unwrap();
        symlink("elsewhere", b.path().join("link")).unwrap();
        set_mtime(&b.path().join("link"), 1_600_000_000, 5);
        fs::remove_file(b.path().join("fifo")).unwrap();
        fs::write(b.path().join("new"), b"").unwrap();
        set_mtime(&b.path().join("dangling"), 1_600_000_000, 6);
        let sb = snapshot(b.path()).unwrap();
        let d = diff(
            &sa,
            &sb,
            &DiffOptions {
                ignore_dir_mtime: true,
                ..opts.clone()
            },
        );
        let text = d.join("\n");
        for want in [
            "d/file: mode 4755 != 0755",
            "d/file: xattr user.beam = \"v1\" != \"v2\"",
            "d/file: xattr trusted.extra only in b",
            "d/file: content sha256",
            "hard: mode 4755 != 0755",
            "link: symlink target \"d/file\" != \"elsewhere\"",
            "fifo: only in a (Fifo)",
            "new: only in b (Regular)",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(
            !text.contains("dangling"),
            "nanoseconds are ignored by default:\n{text}"
        );
        assert!(
            !text.contains("d: mtime"),
            "directory mtimes are ignored here:\n{text}"
        );
        let d = diff(
            &sa,
            &sb,
            &DiffOptions {
                compare_mtime_nsec: true,
                ..opts.clone()
            },
        );
        assert!(
            d.iter().any(|l| l == "dangling: mtime nsec 5 != 6"),
            "{d:#?}"
        );

        // Hard-link structure and nlink.
        fs::remove_file(b.path().join("hard")).unwrap();
        fs::write(b.path().join("hard"), b"content").unwrap();
        let sb = snapshot(b.path()).unwrap();
        let d = diff(
            &sa,
            &sb,
            &DiffOptions {
                ignore_mtime: true,
                ..opts.clone()
            },
        );
        assert!(
            d.iter()
                .any(|l| l == "hard: hard link to \"d/file\" != none"),
            "{d:#?}"
        );
        assert!(d.iter().any(|l| l == "hard: nlink 2 != 1"), "{d:#?}");
        let d = diff(
            &sa,
            &sb,
            &DiffOptions {
                ignore_mtime: true,
                ignore_nlink: true,
                ignore_hardlinks: true,
                ..opts.clone()
            },
        );
        assert!(
            !d.iter()
                .any(|l| l.contains("nlink") || l.contains("hard link")),
            "{d:#?}"
        );
    }

    #[test]
    fn selinux_xattr_can_be_ignored() {
        let mut e = Entry {
            kind: FileType::Regular,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: BTreeMap::new(),
            link_target: None,
            rdev: None,
            nlink: 1,
            hardlink_to: None,
            sha256: None,
        };
        let a: BTreeMap<_, _> = [(b"f".to_vec(), e.clone())].into();
        e.xattrs.insert(
            b"security.selinux".to_vec(),
            b"system_u:object_r:x".to_vec(),
        );
        let b: BTreeMap<_, _> = [(b"f".to_vec(), e)].into();
        assert_eq!(
            diff(&a, &b, &DiffOptions::default()),
            ["f: xattr security.selinux only in b"]
        );
        assert!(diff(
            &a,
            &b,
            &DiffOptions {
                ignore_selinux: true,
                ..Default::default()
            }
        )
        .is_empty());
    }

    #[test]
    #[should_panic(expected = "trees differ in 1 place(s)")]
    fn assert_same_panics_with_differences() {
        let a = tempfile::tempdir().unwrap();
        fs::write(a.path().join("x"), b"1").unwrap();
        let sa = snapshot(a.path()).unwrap();
        let mut sb = sa.clone();
        sb.remove(&b"x"[..]);
        assert_same(&sa, &sb);
    }

    #[test]
    fn devices_are_recorded() {
        // /dev/null is char 1:3 everywhere.
        let s = snapshot(Path::new("/dev/null")).unwrap();
        assert_eq!(s[ROOT].kind, FileType::Char);
        assert_eq!(s[ROOT].rdev, Some((1, 3)));
    }
}
