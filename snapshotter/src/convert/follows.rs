//! What reading a file loads next, found at conversion without running anything: a Python
//! module's imports and an ELF file's shared libraries. They become each layer's follows
//! section (`docs/format.md`), and a node that sees a file opened fetches what it loads,
//! and what that loads, in a few merged requests (`fs::LayerFs::follow_ahead`).
//!
//! Why: a starting interpreter reads one module, runs it, and only then asks for the modules
//! it imports. On a far registry each of those steps was a round trip: `import json, sqlite3`
//! in python was ten of them in a row at 20 ms (json, re, enum, types, operator, collections,
//! _json, sqlite3, _sqlite3, libsqlite3). The first file a workload opens cannot be known
//! before it runs, but what that file loads is written in it.
//!
//! Static and conservative: only module-level imports (not those inside a function), resolved
//! as CPython's path finder would in the image (the importing file's own tree, then the
//! standard library, `lib-dynload` and `site-packages`/`dist-packages`); cached bytecode
//! (`__pycache__`) where the image has it, since that is what CPython reads. A wrong edge
//! costs bytes, never correctness, and the node spends them only on a far registry.

use super::stack::{Layer, Stack, MAX_PARSED_FILE};
use crate::format::index::{Follow, InodeKind, InodeRecord, MAX_FOLLOW_INO, ROOT_INO};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// Largest Python source parsed for its imports.
const MAX_SOURCE: u64 = 1 << 20;
/// Largest ELF file parsed for its libraries.
const MAX_ELF: u64 = 64 << 20;
/// Edges from one file at most.
const MAX_EDGES_PER_FILE: usize = 64;
/// Edges of one layer at most (8 bytes each in its index).
const MAX_EDGES_PER_LAYER: usize = 1 << 20;
/// Platform tags of extension modules tried (`NAME.cpython-311-x86_64-linux-gnu.so`).
const TRIPLETS: [&str; 2] = ["x86_64-linux-gnu", "aarch64-linux-gnu"];

/// One layer's follows: the other layers its edges name (their diff_ids, in table order) and
/// the edges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerFollows {
    pub layers: Vec<[u8; 32]>,
    pub edges: Vec<Follow>,
}

/// A file of the image: its layer and inode.
type FileId = (usize, u64);

/// The follows of every layer of an image (`layers` bottom first, `diff_ids` beside them).
pub fn follows(layers: &[Layer<'_>], diff_ids: &[[u8; 32]]) -> Vec<LayerFollows> {
    let started = std::time::Instant::now();
    let stack = Stack { layers };
    let mut files: Vec<(usize, String, InodeRecord)> = Vec::new();
    let mut versions: HashSet<String> = HashSet::new();
    for (li, l) in layers.iter().enumerate() {
        walk_files(&l.index, |path, rec| {
            if rec.kind == InodeKind::Dir {
                if let Some(v) = path
                    .rsplit_once("/lib/python")
                    .map(|(_, v)| v)
                    .filter(|v| python_version(v))
                {
                    versions.insert(v.to_string());
                }
            } else if rec.kind == InodeKind::File {
                files.push((li, path.to_string(), *rec));
            }
        });
    }
    // Only the files a container sees: one an upper layer replaces is never opened.
    let visible = |(li, path, rec): &&(usize, String, InodeRecord)| {
        stack
            .lookup(path)
            .is_some_and(|(l, r)| l == *li && r.ino == rec.ino)
    };
    // Modules and ELF files on two threads (about 60% and 40% of the time).
    let (py_found, elf_found) = std::thread::scope(|scope| {
        let elf = scope.spawn(|| {
            files
                .iter()
                .filter(|(_, path, _)| is_elf_candidate(path) && !path.ends_with(".py"))
                .filter(visible)
                .filter_map(|(li, path, rec)| elf_follows(&stack, path, *li, rec))
                .collect::<Vec<_>>()
        });
        let mut py = Python::new(stack, versions);
        let found: Vec<_> = files
            .iter()
            .filter(|(_, path, _)| path.ends_with(".py") && !in_test_suite(path))
            .filter(visible)
            .filter_map(|(li, path, rec)| py.module_follows(path, *li, rec))
            .collect();
        (found, elf.join().unwrap_or_default())
    });
    let mut edges: HashMap<FileId, Vec<FileId>> = HashMap::new();
    for (from, to) in py_found.iter().chain(&elf_found) {
        let list = edges.entry(*from).or_default();
        for t in to {
            if t != from && !list.contains(t) && list.len() < MAX_EDGES_PER_FILE {
                list.push(*t);
            }
        }
    }
    tracing::debug!(
        files = files.len(),
        modules = py_found.len(),
        elf = elf_found.len(),
        ms = started.elapsed().as_millis() as u64,
        "follows found"
    );
    let mut out = vec![LayerFollows::default(); layers.len()];
    let mut sorted: Vec<_> = edges.into_iter().collect();
    sorted.sort();
    for ((from_layer, from), targets) in sorted {
        let lf = &mut out[from_layer];
        for (to_layer, ino) in targets {
            if ino > MAX_FOLLOW_INO || lf.edges.len() >= MAX_EDGES_PER_LAYER {
                continue;
            }
            let layer = if to_layer == from_layer {
                0
            } else {
                let id = diff_ids[to_layer];
                match lf.layers.iter().position(|l| *l == id) {
                    Some(i) => i + 1,
                    None if lf.layers.len() < crate::format::index::MAX_FOLLOW_LAYERS => {
                        lf.layers.push(id);
                        lf.layers.len()
                    }
                    None => continue,
                }
            };
            lf.edges.push(Follow { from, layer, ino });
        }
    }
    out
}

/// Every entry of a layer with its path, depth first.
fn walk_files(
    index: &crate::format::index::IndexReader<&[u8]>,
    mut f: impl FnMut(&str, &InodeRecord),
) {
    let mut pending = vec![(String::new(), ROOT_INO)];
    while let Some((dir, ino)) = pending.pop() {
        let Ok(d) = index.inode(ino) else { continue };
        for (name, child) in index.dirents(&d) {
            let path = format!("{dir}/{}", String::from_utf8_lossy(name));
            let Ok(rec) = index.inode(child) else {
                continue;
            };
            f(&path, &rec);
            if rec.kind == InodeKind::Dir {
                pending.push((path, child));
            }
        }
    }
}

/// A module of a package's test suite (`.../tests/...`, `.../test/...`): half the Python files
/// of a typical image, imported by its test runner only.
fn in_test_suite(path: &str) -> bool {
    path.split('/').any(|c| c == "tests" || c == "test")
}

/// `X.Y` with digits only.
fn python_version(v: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    v.split_once('.')
        .is_some_and(|(major, minor)| digits(major) && digits(minor))
}

/// Shared libraries and programs: the files a loader or `exec` maps.
fn is_elf_candidate(path: &str) -> bool {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    name.ends_with(".so")
        || name.contains(".so.")
        || dir.ends_with("/bin")
        || dir.ends_with("/sbin")
}

/// An ELF file's libraries, as files of the image.
fn elf_follows(
    stack: &Stack<'_, '_>,
    path: &str,
    layer: usize,
    rec: &InodeRecord,
) -> Option<(FileId, Vec<FileId>)> {
    if rec.size < 64 || rec.size > MAX_ELF.min(MAX_PARSED_FILE) {
        return None;
    }
    let bytes = stack.read(layer, rec)?;
    if !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    let elf = goblin::elf::Elf::parse(&bytes).ok()?;
    let to = stack
        .libraries(path, &elf)
        .iter()
        .filter_map(|p| stack.resolve(p))
        .filter(|(_, _, r)| r.kind == InodeKind::File)
        .map(|(l, _, r)| (l, r.ino))
        .collect();
    Some(((layer, rec.ino), to))
}

/// Resolving Python imports in an image, as CPython's path finder would.
struct Python<'l, 'a> {
    stack: Stack<'l, 'a>,
    /// `cpython-311`, ... for each `lib/pythonX.Y` of the image.
    tags: Vec<String>,
    /// The standard library directories and where installed packages go.
    roots: Vec<String>,
    /// Absolute imports already resolved, by (the importing file's root, module).
    resolved: HashMap<(String, String), (Vec<FileId>, Option<String>)>,
    /// Directory listings (see [`Python::entries`]).
    entries: RefCell<HashMap<String, Rc<HashSet<Vec<u8>>>>>,
}

impl<'l, 'a> Python<'l, 'a> {
    fn new(stack: Stack<'l, 'a>, versions: HashSet<String>) -> Self {
        let mut versions: Vec<String> = versions.into_iter().collect();
        versions.sort();
        let tags = versions
            .iter()
            .map(|v| format!("cpython-{}", v.replace('.', "")))
            .collect();
        let mut roots = Vec::new();
        for prefix in ["/usr/local", "/usr", "/opt/conda", ""] {
            for v in &versions {
                let lib = format!("{prefix}/lib/python{v}");
                for dir in [
                    lib.clone(),
                    format!("{lib}/lib-dynload"),
                    format!("{lib}/site-packages"),
                    format!("{lib}/dist-packages"),
                ] {
                    if stack.is_dir(&dir) {
                        roots.push(dir);
                    }
                }
            }
        }
        if stack.is_dir("/usr/lib/python3/dist-packages") {
            roots.push("/usr/lib/python3/dist-packages".into());
        }
        Python {
            stack,
            tags,
            roots,
            resolved: HashMap::new(),
            entries: RefCell::new(HashMap::new()),
        }
    }

    /// The file CPython reads for the module whose source is `path` (its cached bytecode when
    /// the image has it), and the files its imports read.
    fn module_follows(
        &mut self,
        path: &str,
        layer: usize,
        rec: &InodeRecord,
    ) -> Option<(FileId, Vec<FileId>)> {
        if self.tags.is_empty() || rec.size > MAX_SOURCE {
            return None;
        }
        let (dir, name) = path.rsplit_once('/')?;
        let stem = name.strip_suffix(".py")?;
        let from = self.bytecode(dir, stem).unwrap_or((layer, rec.ino));
        let src = self.stack.read(layer, rec)?;
        let own_root = self.root_of(dir);
        let mut to = Vec::new();
        for import in python_imports(&src) {
            let base = if import.level == 0 {
                None
            } else {
                let mut base = dir.to_string();
                for _ in 1..import.level {
                    base = base.rsplit_once('/')?.0.to_string();
                }
                Some(base)
            };
            let package = match (&base, import.module.is_empty()) {
                (Some(base), true) => Some(base.clone()),
                (Some(base), false) => self.walk_module(base, &import.module, &mut to),
                (None, _) => self.absolute(&own_root, &import.module, &mut to),
            };
            if let Some(pkg) = package {
                for n in &import.names {
                    self.walk_module(&pkg, n, &mut to);
                }
            }
        }
        Some((from, to))
    }

    /// Resolve `module` from the first root that has its top-level name: `own_root` (the
    /// importing file's tree), then the image's library roots. Adds what it reads to `to`;
    /// returns the package directory when the module is a package.
    fn absolute(&mut self, own_root: &str, module: &str, to: &mut Vec<FileId>) -> Option<String> {
        let key = (own_root.to_string(), module.to_string());
        if let Some((found, package)) = self.resolved.get(&key) {
            to.extend(found.iter().copied());
            return package.clone();
        }
        let roots: Vec<String> = std::iter::once(own_root.to_string())
            .chain(self.roots.iter().cloned())
            .collect();
        let top = module.split('.').next().unwrap_or(module);
        let mut found = Vec::new();
        let mut package = None;
        for root in &roots {
            if self.is_package(&format!("{root}/{top}")) || self.module_file(root, top).is_some() {
                package = self.walk_module(root, module, &mut found);
                break;
            }
        }
        to.extend(found.iter().copied());
        self.resolved.insert(key, (found, package.clone()));
        package
    }

    /// Resolve dotted `module` under directory `base`, adding each package's `__init__` and
    /// the module's file to `to`. Returns the module's directory when it is a package.
    fn walk_module(&self, base: &str, module: &str, to: &mut Vec<FileId>) -> Option<String> {
        let parts: Vec<&str> = module.split('.').collect();
        let mut dir = base.to_string();
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return None;
            }
            let sub = format!("{dir}/{part}");
            if let Some(init) = self.package_init(&sub) {
                to.push(init);
                dir = sub;
                continue;
            }
            if i + 1 == parts.len() {
                if let Some(f) = self.module_file(&dir, part) {
                    to.push(f);
                }
            }
            return None;
        }
        Some(dir)
    }

    /// The directory of the outermost package holding `dir` (or `dir` itself).
    fn root_of(&self, dir: &str) -> String {
        let mut d = dir.to_string();
        while self.package_init(&d).is_some() {
            match d.rsplit_once('/') {
                Some((parent, _)) if !parent.is_empty() => d = parent.to_string(),
                _ => break,
            }
        }
        d
    }

    fn is_package(&self, dir: &str) -> bool {
        self.package_init(dir).is_some()
    }

    /// What CPython reads to import package `dir`: its `__init__`.
    fn package_init(&self, dir: &str) -> Option<FileId> {
        self.bytecode(dir, "__init__")
            .or_else(|| self.file(&format!("{dir}/__init__.py")))
    }

    /// What CPython reads to import module `stem` of `dir`: cached bytecode, source, or an
    /// extension module.
    fn module_file(&self, dir: &str, stem: &str) -> Option<FileId> {
        if let Some(f) = self
            .bytecode(dir, stem)
            .or_else(|| self.file(&format!("{dir}/{stem}.py")))
        {
            return Some(f);
        }
        for tag in &self.tags {
            for t in TRIPLETS {
                if let Some(f) = self.file(&format!("{dir}/{stem}.{tag}-{t}.so")) {
                    return Some(f);
                }
            }
        }
        self.file(&format!("{dir}/{stem}.abi3.so"))
            .or_else(|| self.file(&format!("{dir}/{stem}.so")))
    }

    fn bytecode(&self, dir: &str, stem: &str) -> Option<FileId> {
        self.tags
            .iter()
            .find_map(|tag| self.file(&format!("{dir}/__pycache__/{stem}.{tag}.pyc")))
    }

    /// The file at `path`, looked up in full only when its directory has an entry of that
    /// name in some layer (most candidates, such as a name imported from a package that is
    /// not a submodule, have none).
    fn file(&self, path: &str) -> Option<FileId> {
        let (dir, name) = path.rsplit_once('/')?;
        if !self.entries(dir).contains(name.as_bytes()) {
            return None;
        }
        self.stack
            .resolve(path)
            .filter(|(_, _, r)| r.kind == InodeKind::File)
            .map(|(l, _, r)| (l, r.ino))
    }
}

impl Python<'_, '_> {
    /// The names in directory `dir` in any layer (symlinks resolved; whiteouts included):
    /// a filter before exact lookups, memoized.
    fn entries(&self, dir: &str) -> Rc<HashSet<Vec<u8>>> {
        if let Some(e) = self.entries.borrow().get(dir) {
            return e.clone();
        }
        let mut names = HashSet::new();
        if let Some((_, real, rec)) = self.stack.resolve(dir) {
            if rec.kind == InodeKind::Dir {
                for l in self.stack.layers {
                    let Ok(Some(ino)) = l.index.lookup_path(real.as_bytes()) else {
                        continue;
                    };
                    let Ok(d) = l.index.inode(ino) else { continue };
                    if d.kind == InodeKind::Dir {
                        names.extend(l.index.dirents(&d).map(|(n, _)| n.to_vec()));
                    }
                }
            }
        }
        let names = Rc::new(names);
        self.entries
            .borrow_mut()
            .insert(dir.to_string(), names.clone());
        names
    }
}

/// One import statement: `from ..a.b import c, d` is level 2, module `a.b`, names `c`, `d`;
/// `import x.y as z` is level 0, module `x.y`, no names.
#[derive(Debug, PartialEq, Eq)]
pub struct Import {
    pub level: usize,
    pub module: String,
    pub names: Vec<String>,
}

/// The imports a Python source runs when it is imported: those at module level, including
/// under `try:`/`if` blocks, not those inside a function or class body (run later, if ever)
/// or in a string.
pub fn python_imports(src: &[u8]) -> Vec<Import> {
    let text = String::from_utf8_lossy(src);
    let mut out = Vec::new();
    let mut in_body = false;
    let mut in_string: Option<&str> = None;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(q) = in_string {
            if line.contains(q) {
                in_string = None;
            }
            continue;
        }
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = line.len() - t.len();
        if indent == 0 {
            in_body = ["def ", "class ", "async def ", "@"]
                .iter()
                .any(|k| t.starts_with(k));
        }
        for q in ["\"\"\"", "'''"] {
            if t.matches(q).count() % 2 == 1 {
                in_string = Some(q);
            }
        }
        if in_body && indent > 0 || in_string.is_some() {
            continue;
        }
        if !(t.starts_with("import ") || t.starts_with("from ")) {
            continue;
        }
        let mut stmt = strip_comment(t).to_string();
        // Continued statements: `from x import (a,\n b)` and a trailing backslash.
        while (stmt.contains('(') && !stmt.contains(')')) || stmt.ends_with('\\') {
            let Some(next) = lines.next() else { break };
            stmt = format!(
                "{} {}",
                stmt.trim_end_matches('\\'),
                strip_comment(next.trim())
            );
        }
        if let Some(import) = parse_import(&stmt) {
            out.extend(import);
        }
    }
    out
}

fn strip_comment(s: &str) -> &str {
    s.split('#').next().unwrap_or(s).trim_end()
}

fn is_dotted_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

fn parse_import(stmt: &str) -> Option<Vec<Import>> {
    let first_word = |s: &str| s.split_whitespace().next().unwrap_or("").to_string();
    if let Some(rest) = stmt.strip_prefix("import ") {
        return Some(
            rest.split(',')
                .map(first_word)
                .filter(|m| is_dotted_name(m))
                .map(|module| Import {
                    level: 0,
                    module,
                    names: Vec::new(),
                })
                .collect(),
        );
    }
    let rest = stmt.strip_prefix("from ")?;
    let (from, names) = rest.split_once(" import ")?;
    let from = from.trim();
    let module = from.trim_start_matches('.');
    let level = from.len() - module.len();
    if !(module.is_empty() && level > 0 || is_dotted_name(module)) {
        return None;
    }
    let names = names
        .replace(['(', ')'], " ")
        .split(',')
        .map(first_word)
        .filter(|n| is_dotted_name(n) && !n.contains('.'))
        .collect();
    Some(vec![Import {
        level,
        module: module.to_string(),
        names,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::entrypoint::tests::{layer, views};
    use crate::format::index::IndexReader;

    fn imp(level: usize, module: &str, names: &[&str]) -> Import {
        Import {
            level,
            module: module.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn module_level_imports_are_found_and_function_bodies_and_strings_skipped() {
        let src = br#""""A module.

import not_this
"""
import os, re as regex
import json.decoder
from . import sibling
from ..up import a, b as c
from collections import (
    OrderedDict,  # ordered
    deque,
)
try:
    from _json import scanstring
except ImportError:
    scanstring = None
if True:
    import enum

def f():
    import lazy_one

class C:
    import in_class
x = '''
import in_string
'''
from \
    types import GenericAlias
"#;
        assert_eq!(
            python_imports(src),
            vec![
                imp(0, "os", &[]),
                imp(0, "re", &[]),
                imp(0, "json.decoder", &[]),
                imp(1, "", &["sibling"]),
                imp(2, "up", &["a", "b"]),
                imp(0, "collections", &["OrderedDict", "deque"]),
                imp(0, "_json", &["scanstring"]),
                imp(0, "enum", &[]),
                imp(0, "types", &["GenericAlias"]),
            ]
        );
    }

    #[test]
    fn garbage_is_not_an_import() {
        assert!(python_imports(b"from  import x\nimport\nimport ..x\nfrom a import\n").is_empty());
        assert!(python_imports(&[0xff, 0xfe, b'\n', b'i']).is_empty());
    }

    #[test]
    fn imports_and_libraries_are_followed_across_layers_to_what_python_reads() {
        let dir = tempfile::tempdir().unwrap();
        let lib = "usr/lib/python3.11";
        let host_elf = std::fs::read("/bin/true").unwrap();
        // Layer 0: the standard library's `re` (bytecode cached) and `enum` (source only).
        let l0 = layer(
            dir.path(),
            0,
            &[
                (
                    &format!("{lib}/re/__init__.py"),
                    b"import enum\nfrom . import _parser\n".to_vec(),
                ),
                (
                    &format!("{lib}/re/__pycache__/__init__.cpython-311.pyc"),
                    b"pyc".to_vec(),
                ),
                (&format!("{lib}/re/_parser.py"), b"".to_vec()),
                (
                    &format!("{lib}/enum.py"),
                    b"import types\ndef f():\n    import lazy\n".to_vec(),
                ),
                (&format!("{lib}/types.py"), b"".to_vec()),
                (&format!("{lib}/lazy.py"), b"".to_vec()),
                ("usr/lib/x86_64-linux-gnu/libc.so.6", b"libc".to_vec()),
                ("usr/lib/x86_64-linux-gnu/libbogus.so", {
                    let mut b = b"\x7fELF\x02\x01\x01".to_vec();
                    b.extend([0xff; 120]);
                    b
                }),
            ],
        );
        // Layer 1: `json`, importing `re` (layer 0) and `_json` (an extension module).
        let l1 = layer(
            dir.path(),
            1,
            &[
                (&format!("{lib}/json/__init__.py"), b"from .decoder import JSONDecoder\n".to_vec()),
                (&format!("{lib}/json/decoder.py"), b"import re\nfrom json import scanner\ntry:\n    from _json import x\nexcept ImportError:\n    pass\n".to_vec()),
                (&format!("{lib}/json/scanner.py"), b"".to_vec()),
                (&format!("{lib}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"), host_elf),
                (&format!("{lib}/missing_import.py"), b"import nowhere\n".to_vec()),
                (&format!("{lib}/json/tests/test_x.py"), b"import re\n".to_vec()),
            ],
        );
        let layers = [l0, l1];
        let v = views(&layers);
        let ids = [[0u8; 32], [1u8; 32]];
        let f = follows(&v, &ids);
        let ino = |l: usize, p: &str| {
            v[l].index
                .lookup_path(format!("/{p}").as_bytes())
                .unwrap()
                .unwrap()
        };
        let targets = |l: usize, p: &str| -> Vec<(usize, u64)> {
            let from = ino(l, p);
            f[l].edges
                .iter()
                .filter(|e| e.from == from)
                .map(|e| {
                    let layer = if e.layer == 0 {
                        l
                    } else {
                        ids.iter()
                            .position(|i| *i == f[l].layers[e.layer - 1])
                            .unwrap()
                    };
                    (layer, e.ino)
                })
                .collect()
        };
        // `re` is read as its cached bytecode: the edges start there.
        assert_eq!(targets(0, &format!("{lib}/re/__init__.py")), vec![]);
        assert_eq!(
            targets(0, &format!("{lib}/re/__pycache__/__init__.cpython-311.pyc")),
            vec![
                (0, ino(0, &format!("{lib}/enum.py"))),
                (0, ino(0, &format!("{lib}/re/_parser.py")))
            ]
        );
        // Not the import inside a function.
        assert_eq!(
            targets(0, &format!("{lib}/enum.py")),
            vec![(0, ino(0, &format!("{lib}/types.py")))]
        );
        assert_eq!(
            targets(1, &format!("{lib}/json/__init__.py")),
            vec![(1, ino(1, &format!("{lib}/json/decoder.py")))]
        );
        // Across layers (to the bytecode), a package's own tree, an extension module.
        assert_eq!(
            targets(1, &format!("{lib}/json/decoder.py")),
            vec![
                (
                    0,
                    ino(0, &format!("{lib}/re/__pycache__/__init__.cpython-311.pyc"))
                ),
                (1, ino(1, &format!("{lib}/json/__init__.py"))),
                (1, ino(1, &format!("{lib}/json/scanner.py"))),
                (
                    1,
                    ino(
                        1,
                        &format!("{lib}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so")
                    )
                ),
            ]
        );
        // An extension module's libraries (the host's /bin/true needs libc.so.6).
        assert_eq!(
            targets(
                1,
                &format!("{lib}/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so")
            ),
            vec![(0, ino(0, "usr/lib/x86_64-linux-gnu/libc.so.6"))]
        );
        // A malformed ELF file gets no edges (and the pass goes on).
        assert!(targets(0, "usr/lib/x86_64-linux-gnu/libbogus.so").is_empty());
        assert_eq!(f[1].layers, vec![[0u8; 32]]);
        assert!(targets(1, &format!("{lib}/missing_import.py")).is_empty());
        // Not a test suite's modules.
        assert!(targets(1, &format!("{lib}/json/tests/test_x.py")).is_empty());
        // And the sections they make read back.
        let index =
            crate::format::index::with_follows(v[1].index.as_bytes(), &f[1].layers, &f[1].edges)
                .unwrap();
        let r = IndexReader::new(&index[..]).unwrap();
        assert_eq!(
            r.follows(ino(1, &format!("{lib}/json/__init__.py")))
                .collect::<Vec<_>>(),
            vec![(0, ino(1, &format!("{lib}/json/decoder.py")))]
        );
    }
}
