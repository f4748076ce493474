//! Building a layer's tree from tar entries, the way a container runtime would read them, and
//! refusing entries that would write outside the layer.
//!
//! Rules (OCI image spec, `layer.md`, and what containerd's applier does):
//! - paths are relative; a leading `./` or `/`-free form is normal. An absolute path, a `..`
//!   component, or a path whose parent is a symlink of this layer is refused, naming the entry;
//! - a later entry for the same path replaces the earlier one (a directory replacing a
//!   directory keeps its children);
//! - parents missing from the tar are created as root-owned 0755 directories;
//! - `.wh..wh..opq` makes its directory opaque; `.wh.NAME` becomes a whiteout for NAME unless
//!   this layer also has a real NAME (a whiteout only hides *lower* layers); other `.wh..wh.`
//!   names are AUFS bookkeeping and are dropped;
//! - a hard link names a non-directory entry that came earlier in the same layer.

use crate::format::index::{InodeKind, Node, MAX_NAME_LEN};
use std::collections::BTreeMap;

/// Prefix of an OCI whiteout file.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Bounds that keep a hostile tar from exhausting memory.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_entries: u64,
    pub max_path_len: usize,
    pub max_xattrs_per_entry: usize,
    pub max_xattr_value_len: usize,
    pub max_file_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 10_000_000,
            max_path_len: 4096,
            max_xattrs_per_entry: 128,
            max_xattr_value_len: 64 * 1024,
            max_file_size: 1 << 40,
        }
    }
}

/// Why an entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("tar entry {path:?}: {reason}")]
    Refused { path: String, reason: String },
    #[error("layer has more than {0} entries")]
    TooManyEntries(u64),
}

fn refused(path: &[u8], reason: impl Into<String>) -> TreeError {
    TreeError::Refused {
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.into(),
    }
}

/// Metadata of one entry, decoded from its tar header and PAX records.
#[derive(Debug, Clone)]
pub struct EntryMeta {
    pub kind: InodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    pub rdev: (u32, u32),
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The tree of one layer, as nodes of the index builder (node 0 is the root).
pub struct TreeBuilder {
    pub nodes: Vec<Node>,
    limits: Limits,
    entries: u64,
}

impl TreeBuilder {
    pub fn new(limits: Limits) -> Self {
        let mut root = Node::new(InodeKind::Dir, 0o755);
        root.mtime = 0;
        TreeBuilder {
            nodes: vec![root],
            limits,
            entries: 0,
        }
    }

    /// Split and check a tar path. Returns the components; empty for the root.
    pub fn components<'a>(&self, raw: &'a [u8]) -> Result<Vec<&'a [u8]>, TreeError> {
        if raw.len() > self.limits.max_path_len {
            return Err(refused(
                &raw[..64],
                format!("path of {} bytes is too long", raw.len()),
            ));
        }
        if raw.first() == Some(&b'/') {
            return Err(refused(raw, "absolute path"));
        }
        if raw.contains(&0) {
            return Err(refused(raw, "NUL byte in path"));
        }
        let mut out = Vec::new();
        for c in raw.split(|b| *b == b'/') {
            match c {
                b"" | b"." => continue,
                b".." => return Err(refused(raw, "path has a `..` component")),
                c if c.len() > MAX_NAME_LEN => {
                    return Err(refused(raw, format!("name of {} bytes", c.len())))
                }
                c => out.push(c),
            }
        }
        Ok(out)
    }

    /// The directory holding the last component, creating missing parents. Refuses a path
    /// that goes through a symlink or a non-directory of this layer.
    fn parent_dir(&mut self, raw: &[u8], comps: &[&[u8]]) -> Result<usize, TreeError> {
        let mut dir = 0usize;
        for c in &comps[..comps.len().saturating_sub(1)] {
            let next = self.nodes[dir].children.get(*c).copied();
            dir = match next {
                Some(id) => match self.nodes[id].kind {
                    InodeKind::Dir => id,
                    InodeKind::Symlink => {
                        return Err(refused(raw, "parent is a symlink: would escape the layer"))
                    }
                    // A real runtime would fail on this too.
                    _ => return Err(refused(raw, "parent is not a directory")),
                },
                None => {
                    let id = self.push(Node::new(InodeKind::Dir, 0o755))?;
                    self.nodes[dir].children.insert(c.to_vec(), id);
                    id
                }
            };
        }
        Ok(dir)
    }

    fn push(&mut self, node: Node) -> Result<usize, TreeError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(TreeError::TooManyEntries(self.limits.max_entries));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    fn check_meta(&self, raw: &[u8], meta: &EntryMeta) -> Result<(), TreeError> {
        if meta.xattrs.len() > self.limits.max_xattrs_per_entry {
            return Err(refused(raw, format!("{} xattrs", meta.xattrs.len())));
        }
        if let Some((k, _)) = meta
            .xattrs
            .iter()
            .find(|(k, v)| v.len() > self.limits.max_xattr_value_len || k.len() > 255)
        {
            return Err(refused(
                raw,
                format!("xattr {} too large", String::from_utf8_lossy(k)),
            ));
        }
        if meta.size > self.limits.max_file_size {
            return Err(refused(raw, format!("file size {} too large", meta.size)));
        }
        Ok(())
    }

    /// Add a non-link entry. Returns the node id (for a regular file, so that chunks can be
    /// attached), or `None` when the entry was a whiteout marker or is dropped.
    pub fn add(
        &mut self,
        raw: &[u8],
        meta: EntryMeta,
        symlink_target: Option<Vec<u8>>,
    ) -> Result<Option<usize>, TreeError> {
        self.check_meta(raw, &meta)?;
        let comps = self.components(raw)?;
        let Some(&name) = comps.last() else {
            // The root itself ("./"): take its metadata.
            if meta.kind != InodeKind::Dir {
                return Err(refused(raw, "the root must be a directory"));
            }
            let root = &mut self.nodes[0];
            apply_meta(root, &meta);
            return Ok(Some(0));
        };
        let dir = self.parent_dir(raw, &comps)?;
        if name == OPAQUE_MARKER {
            self.nodes[dir].opaque = true;
            return Ok(None);
        }
        if name.starts_with(b".wh..wh.") {
            return Ok(None);
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() {
                return Err(refused(raw, "whiteout of an empty name"));
            }
            // `.wh..` and `.wh...` would hide the directory itself or its parent.
            if hidden == b"." || hidden == b".." {
                return Err(refused(raw, "whiteout of . or .."));
            }
            if self.nodes[dir].children.contains_key(hidden) {
                // A real entry of this layer wins over its whiteout.
                return Ok(None);
            }
            let id = self.push(Node::new(InodeKind::Whiteout, 0))?;
            self.nodes[dir].children.insert(hidden.to_vec(), id);
            return Ok(None);
        }
        if meta.kind == InodeKind::Dir {
            if let Some(&id) = self.nodes[dir].children.get(name) {
                if self.nodes[id].kind == InodeKind::Dir {
                    apply_meta(&mut self.nodes[id], &meta);
                    return Ok(Some(id));
                }
            }
        }
        let mut node = Node::new(meta.kind, meta.mode);
        apply_meta(&mut node, &meta);
        if let Some(t) = symlink_target {
            if t.len() > self.limits.max_path_len {
                return Err(refused(raw, "symlink target too long"));
            }
            node.target = t;
        }
        let id = self.push(node)?;
        self.nodes[dir].children.insert(name.to_vec(), id);
        Ok(Some(id))
    }

    /// Add a hard link `raw` to the earlier entry `target`.
    pub fn add_hardlink(&mut self, raw: &[u8], target: &[u8]) -> Result<(), TreeError> {
        let comps = self.components(raw)?;
        let Some(&name) = comps.last() else {
            return Err(refused(raw, "hard link named like the root"));
        };
        let tcomps = self.components(target)?;
        let mut id = 0usize;
        for c in &tcomps {
            id = match (self.nodes[id].kind, self.nodes[id].children.get(*c)) {
                (InodeKind::Dir, Some(&next)) => next,
                _ => {
                    return Err(refused(
                        raw,
                        format!(
                            "hard link target {:?} is not an earlier entry of this layer",
                            String::from_utf8_lossy(target)
                        ),
                    ))
                }
            };
        }
        if matches!(self.nodes[id].kind, InodeKind::Dir | InodeKind::Whiteout) {
            return Err(refused(raw, "hard link to a directory"));
        }
        let dir = self.parent_dir(raw, &comps)?;
        self.entries += 1;
        self.nodes[dir].children.insert(name.to_vec(), id);
        Ok(())
    }
}

fn apply_meta(node: &mut Node, meta: &EntryMeta) {
    node.kind = meta.kind;
    node.mode = meta.mode & 0o7777;
    node.uid = meta.uid;
    node.gid = meta.gid;
    node.mtime = meta.mtime;
    node.mtime_nsec = meta.mtime_nsec;
    node.size = if meta.kind == InodeKind::File {
        meta.size
    } else {
        0
    };
    node.rdev = meta.rdev;
    node.xattrs = meta.xattrs.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: InodeKind) -> EntryMeta {
        EntryMeta {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1,
            mtime_nsec: 0,
            size: 0,
            rdev: (0, 0),
            xattrs: BTreeMap::new(),
        }
    }

    fn child(t: &TreeBuilder, dir: usize, name: &[u8]) -> Option<usize> {
        t.nodes[dir].children.get(name).copied()
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused_by_name() {
        let mut t = TreeBuilder::new(Limits::default());
        for bad in [&b"../etc/passwd"[..], b"a/../../x", b"/etc/shadow"] {
            let e = t.add(bad, meta(InodeKind::File), None).unwrap_err();
            assert!(
                e.to_string().contains(&*String::from_utf8_lossy(bad)),
                "{e}"
            );
        }
    }

    #[test]
    fn writing_through_a_symlink_is_refused() {
        let mut t = TreeBuilder::new(Limits::default());
        t.add(b"link", meta(InodeKind::Symlink), Some(b"/etc".to_vec()))
            .unwrap();
        let e = t
            .add(b"link/passwd", meta(InodeKind::File), None)
            .unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }

    #[test]
    fn whiteouts_opaque_and_implicit_parents() {
        let mut t = TreeBuilder::new(Limits::default());
        t.add(b"./a/b/.wh.gone", meta(InodeKind::File), None)
            .unwrap();
        t.add(b"a/.wh..wh..opq", meta(InodeKind::File), None)
            .unwrap();
        t.add(b"a/b/.wh.kept", meta(InodeKind::File), None).unwrap();
        t.add(b"a/b/kept", meta(InodeKind::File), None).unwrap();
        t.add(b"a/b/real", meta(InodeKind::File), None).unwrap();
        t.add(b"a/b/.wh.real", meta(InodeKind::File), None).unwrap();
        let a = child(&t, 0, b"a").unwrap();
        assert!(t.nodes[a].opaque);
        let b = child(&t, a, b"b").unwrap();
        assert_eq!(
            t.nodes[child(&t, b, b"gone").unwrap()].kind,
            InodeKind::Whiteout
        );
        assert_eq!(
            t.nodes[child(&t, b, b"kept").unwrap()].kind,
            InodeKind::File
        );
        assert_eq!(
            t.nodes[child(&t, b, b"real").unwrap()].kind,
            InodeKind::File
        );
    }

    #[test]
    fn later_entries_replace_earlier_ones_and_dirs_merge() {
        let mut t = TreeBuilder::new(Limits::default());
        t.add(b"d/", meta(InodeKind::Dir), None).unwrap();
        t.add(b"d/f", meta(InodeKind::File), None).unwrap();
        let mut m = meta(InodeKind::Dir);
        m.mode = 0o700;
        t.add(b"d", m, None).unwrap();
        let d = child(&t, 0, b"d").unwrap();
        assert_eq!(t.nodes[d].mode, 0o700);
        assert!(child(&t, d, b"f").is_some(), "children kept");
        t.add(b"d", meta(InodeKind::File), None).unwrap();
        let d2 = child(&t, 0, b"d").unwrap();
        assert_eq!(t.nodes[d2].kind, InodeKind::File);
    }

    #[test]
    fn hard_links_must_name_earlier_non_directories() {
        let mut t = TreeBuilder::new(Limits::default());
        t.add(b"x/f", meta(InodeKind::File), None).unwrap();
        t.add_hardlink(b"y/g", b"x/f").unwrap();
        let x = child(&t, 0, b"x").unwrap();
        let y = child(&t, 0, b"y").unwrap();
        assert_eq!(child(&t, x, b"f"), child(&t, y, b"g"));
        assert!(t.add_hardlink(b"z", b"missing").is_err());
        assert!(t.add_hardlink(b"z", b"x").is_err());
        assert!(t.add_hardlink(b"z", b"../etc/passwd").is_err());
    }

    #[test]
    fn counts_and_sizes_are_bounded() {
        let mut t = TreeBuilder::new(Limits {
            max_entries: 3,
            ..Limits::default()
        });
        let e = t.add(b"a/b/c/d", meta(InodeKind::File), None).unwrap_err();
        assert!(matches!(e, TreeError::TooManyEntries(3)));
        let mut t = TreeBuilder::new(Limits::default());
        let mut m = meta(InodeKind::File);
        m.xattrs.insert(b"user.big".to_vec(), vec![0; 1 << 20]);
        assert!(t.add(b"f", m, None).is_err());
        let long = vec![b'a'; 256];
        assert!(t.add(&long, meta(InodeKind::File), None).is_err());
    }

    #[test]
    fn whiteouts_of_dot_and_dotdot_are_refused() {
        for name in [&b"a/.wh.."[..], b"a/.wh...", b".wh.."] {
            let mut t = TreeBuilder::new(Limits::default());
            t.add(b"a/", meta(InodeKind::Dir), None).unwrap();
            let e = t.add(name, meta(InodeKind::File), None).unwrap_err();
            assert!(e.to_string().contains("whiteout of . or .."), "{e}");
        }
    }
}
