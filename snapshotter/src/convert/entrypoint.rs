//! The files an image's entrypoint loads before it does anything, found at conversion without
//! running it: the program (through `PATH` and symlinks, across layers), the interpreters of
//! `#!` scripts, the ELF program interpreter, the shared libraries it needs (recursively), and
//! `/etc/ld.so.cache`. They become each layer's prefetch list when the image has no recorded
//! one, so that a node fetches them in merged requests while containerd creates the container
//! instead of page fault by page fault once it runs (issue 13).
//!
//! Why static: `beam record` runs the workload to learn what it reads, which is exact but
//! runs the image's code; this reads only headers, so it is safe on every conversion, also in
//! `beam autoconvert`. It is a hint: a wrong guess costs bytes, never correctness.

use super::stack::{absolute, Stack};
use crate::format::index::{InodeKind, InodeRecord};
use std::collections::HashSet;

/// Files in the list at most.
const MAX_FILES: usize = 512;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub use super::stack::Layer;

/// What the image config says runs.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Process {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
}

impl Process {
    /// The `config` section of an image config (JSON), or nothing.
    pub fn of_config(config: &[u8]) -> Process {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            config: Option<Process>,
        }
        serde_json::from_slice::<Config>(config)
            .ok()
            .and_then(|c| c.config)
            .unwrap_or_default()
    }

    fn argv0(&self) -> Option<&str> {
        self.entrypoint
            .iter()
            .chain(self.cmd.iter())
            .flatten()
            .map(String::as_str)
            .next()
    }

    fn path_dirs(&self) -> Vec<String> {
        let path = self
            .env
            .iter()
            .flatten()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(String::from)
            .collect()
    }
}

/// Per layer (bottom first, as `layers`), the inodes to prefetch, in the order the process
/// would load them. Empty lists when the entrypoint cannot be found.
pub fn prefetch_lists(layers: &[Layer<'_>], process: &Process) -> Vec<Vec<u64>> {
    let mut walk = Walk {
        stack: Stack { layers },
        seen: HashSet::new(),
        order: Vec::new(),
    };
    if let Some(argv0) = process.argv0() {
        let dirs = process.path_dirs();
        if let Some(program) = walk.find_program(argv0, &dirs) {
            walk.add("/etc/ld.so.cache");
            walk.add_program(&program, &dirs, 0);
        }
    }
    let mut lists = vec![Vec::new(); layers.len()];
    for (layer, ino) in walk.order {
        lists[layer].push(ino);
    }
    lists
}

struct Walk<'l, 'a> {
    stack: Stack<'l, 'a>,
    seen: HashSet<(usize, u64)>,
    /// (layer, inode) of each regular file, in load order.
    order: Vec<(usize, u64)>,
}

impl Walk<'_, '_> {
    /// `name` as `execvp` finds it: a path, or a name in `PATH`.
    fn find_program(&self, name: &str, path_dirs: &[String]) -> Option<String> {
        if name.contains('/') {
            return Some(absolute(name));
        }
        path_dirs
            .iter()
            .map(|d| format!("{}/{name}", d.trim_end_matches('/')))
            .find(|p| self.stack.is_file(p))
    }

    /// Add the file at `path` (resolved) to the list; return its layer and record.
    fn add(&mut self, path: &str) -> Option<(usize, InodeRecord, String)> {
        let (layer, real, rec) = self.stack.resolve(path)?;
        if rec.kind != InodeKind::File || self.order.len() >= MAX_FILES {
            return None;
        }
        if self.seen.insert((layer, rec.ino)) {
            tracing::debug!(path = %real, layer, size = rec.size, "prefetch");
            self.order.push((layer, rec.ino));
        }
        Some((layer, rec, real))
    }

    /// Add a program and what loading it loads.
    fn add_program(&mut self, path: &str, path_dirs: &[String], depth: usize) {
        if depth > 4 {
            return;
        }
        let Some((layer, rec, real)) = self.add(path) else {
            return;
        };
        let Some(bytes) = self.stack.read(layer, &rec) else {
            return;
        };
        if let Some(line) = bytes.strip_prefix(b"#!") {
            // `#!/usr/bin/env python3` and `#!/bin/sh -e`.
            let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut words = line.split_whitespace();
            let Some(interp) = words.next() else { return };
            let interp = if interp.ends_with("/env") {
                self.add(interp);
                match words.find(|w| !w.starts_with('-')) {
                    Some(name) => match self.find_program(name, path_dirs) {
                        Some(p) => p,
                        None => return,
                    },
                    None => return,
                }
            } else {
                interp.to_string()
            };
            self.add_program(&interp, path_dirs, depth + 1);
            return;
        }
        self.add_elf_deps(&real, &bytes, 0);
        self.add_interpreter_startup(&real);
    }

    /// The files an interpreter reads on every start, whatever it runs, each one a round trip
    /// otherwise (it reads the next only once it has run the last). For CPython (a program
    /// named `pythonX.Y`): the codec package it imports before `site` (`encodings`, its
    /// aliases and UTF-8; the modules `site` needs are frozen into the program) and
    /// `sitecustomize` (on Debian a symlink to `/etc/pythonX.Y`), as source and as cached
    /// bytecode, whichever the image has.
    fn add_interpreter_startup(&mut self, real: &str) {
        let Some((bin, name)) = real.rsplit_once('/') else {
            return;
        };
        let Some(version) = python_version(name) else {
            return;
        };
        let prefix = bin.strip_suffix("/bin").unwrap_or("/usr");
        let lib = format!("{prefix}/lib/python{version}");
        let tag = format!("cpython-{}", version.replace('.', ""));
        for module in [
            "encodings/__init__",
            "encodings/aliases",
            "encodings/utf_8",
            "sitecustomize",
        ] {
            let (dir, stem) = module.rsplit_once('/').unwrap_or(("", module));
            let dir = if dir.is_empty() {
                lib.clone()
            } else {
                format!("{lib}/{dir}")
            };
            self.add(&format!("{dir}/__pycache__/{stem}.{tag}.pyc"));
            self.add(&format!("{dir}/{stem}.py"));
        }
    }

    /// The program interpreter and the shared libraries of the ELF file at `real`.
    fn add_elf_deps(&mut self, real: &str, bytes: &[u8], depth: usize) {
        if depth > 16 {
            return;
        }
        let Ok(elf) = goblin::elf::Elf::parse(bytes) else {
            return;
        };
        if let Some(interp) = elf.interpreter {
            self.add(interp);
        }
        for path in self.stack.libraries(real, &elf) {
            let before = self.order.len();
            let Some((layer, rec, real)) = self.add(&path) else {
                continue;
            };
            if self.order.len() == before {
                continue; // already walked
            }
            if let Some(bytes) = self.stack.read(layer, &rec) {
                self.add_elf_deps(&real, &bytes, depth + 1);
            }
        }
    }
}

/// `X.Y` of a CPython program's name `pythonX.Y` (not `python3`: the versioned name is
/// what its symlinks resolve to).
fn python_version(name: &str) -> Option<&str> {
    let v = name.strip_prefix("python")?;
    let (major, minor) = v.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(major) && digits(minor)).then_some(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::convert::layer::{convert_layer, ConvertOptions};
    use crate::format::index::IndexReader;
    use std::path::Path;

    /// A layer of `entries`: (path, content) files (mode 0755), or (path, "->target")
    /// symlinks, or (path, "whiteout") for `.wh.` deletions; converted to (index, blob file).
    pub(crate) fn layer(
        dir: &Path,
        n: usize,
        entries: &[(&str, Vec<u8>)],
    ) -> (Vec<u8>, std::path::PathBuf) {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            if let Some(target) = content.strip_prefix(b"->") {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, path, std::str::from_utf8(target).unwrap())
                    .unwrap();
            } else if content == b"whiteout" {
                let (d, name) = path.rsplit_once('/').unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(0);
                h.set_mode(0o644);
                b.append_data(&mut h, format!("{d}/.wh.{name}"), &[][..])
                    .unwrap();
            } else {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(content.len() as u64);
                h.set_mode(0o755);
                b.append_data(&mut h, path, content.as_slice()).unwrap();
            }
        }
        let tar = b.into_inner().unwrap();
        let blob = dir.join(format!("blob-{n}"));
        let out = std::fs::File::create(&blob).unwrap();
        let c = convert_layer(&tar[..], out, &ConvertOptions::default(), None).unwrap();
        (c.index, blob)
    }

    /// Index readers over converted layers.
    pub(crate) fn views(layers: &[(Vec<u8>, std::path::PathBuf)]) -> Vec<Layer<'_>> {
        layers
            .iter()
            .map(|(index, blob)| Layer {
                index: IndexReader::new(index.as_slice()).unwrap(),
                blob: blob.as_path(),
            })
            .collect()
    }

    /// The prefetch lists of `process`, as `layer:/path` in order.
    fn listed(views: &[Layer<'_>], process: &Process) -> Vec<String> {
        let path_of = |l: usize, ino: u64| -> String {
            let idx = &views[l].index;
            let mut names = Vec::new();
            let mut cur = ino;
            while cur != crate::format::index::ROOT_INO {
                let rec = idx.inode(cur).unwrap();
                let parent = idx.inode(rec.parent).unwrap();
                let name = idx
                    .dirents(&parent)
                    .find(|(_, i)| *i == cur)
                    .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
                    .unwrap();
                names.push(name);
                cur = rec.parent;
            }
            names.reverse();
            format!("{l}:/{}", names.join("/"))
        };
        prefetch_lists(views, process)
            .iter()
            .enumerate()
            .flat_map(|(l, inos)| inos.iter().map(move |i| (l, *i)))
            .map(|(l, i)| path_of(l, i))
            .collect()
    }

    #[test]
    fn a_python_entrypoint_brings_the_files_every_python_start_reads() {
        let dir = tempfile::tempdir().unwrap();
        let src = |s: &str| s.as_bytes().to_vec();
        let base = layer(
            dir.path(),
            0,
            &[
                ("usr/bin/python3", src("->python3.11")),
                // Not an ELF file: no libraries, the rule goes by the program's name.
                ("usr/bin/python3.11", src("not elf")),
                (
                    "usr/lib/python3.11/encodings/__init__.py",
                    src("import codecs"),
                ),
                (
                    "usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
                    src("bytecode"),
                ),
                (
                    "usr/lib/python3.11/encodings/aliases.py",
                    src("aliases = {}"),
                ),
                ("usr/lib/python3.11/encodings/latin_1.py", src("# not read")),
                ("usr/lib/python3.11/encodings/utf_8.py", src("# utf-8")),
                ("usr/lib/python3.11/json/__init__.py", src("# not read")),
                (
                    "usr/lib/python3.11/sitecustomize.py",
                    src("->/etc/python3.11/sitecustomize.py"),
                ),
                ("etc/python3.11/sitecustomize.py", src("# site")),
                ("usr/bin/pythonista", src("not a python")),
            ],
        );
        let views = views(std::slice::from_ref(&base));
        let process = Process::of_config(br#"{"config":{"Cmd":["python3"]}}"#);
        assert_eq!(
            listed(&views, &process),
            [
                "0:/usr/bin/python3.11",
                "0:/usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
                "0:/usr/lib/python3.11/encodings/__init__.py",
                "0:/usr/lib/python3.11/encodings/aliases.py",
                "0:/usr/lib/python3.11/encodings/utf_8.py",
                "0:/etc/python3.11/sitecustomize.py",
            ]
        );
        let other = Process::of_config(br#"{"config":{"Cmd":["/usr/bin/pythonista"]}}"#);
        assert_eq!(listed(&views, &other), ["0:/usr/bin/pythonista"]);
    }

    #[test]
    fn python_versions_come_from_versioned_names_only() {
        assert_eq!(python_version("python3.11"), Some("3.11"));
        assert_eq!(python_version("python2.7"), Some("2.7"));
        for name in [
            "python3",
            "python",
            "python3.",
            "python3.11-config",
            "pythonista",
        ] {
            assert_eq!(python_version(name), None, "{name}");
        }
    }

    fn host(path: &str) -> Option<Vec<u8>> {
        std::fs::read(path).ok()
    }

    #[test]
    fn a_scripts_interpreter_its_elf_interpreter_and_libraries_are_found_across_layers() {
        // The host's dynamically linked programs and libraries stand in for an image's.
        let (Some(env), Some(prog), Some(libc), Some(ld)) = (
            host("/usr/bin/env"),
            host("/usr/bin/true"),
            host("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            host("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        ) else {
            eprintln!("skipped: not an x86_64 Debian host");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // Layer 0: the merged-/usr base (`/lib` is a symlink), libc, the ELF interpreter.
        let base = layer(
            dir.path(),
            0,
            &[
                ("lib", b"->usr/lib".to_vec()),
                (
                    "lib64/ld-linux-x86-64.so.2",
                    b"->/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".to_vec(),
                ),
                ("usr/lib/x86_64-linux-gnu/libc.so.6", libc),
                ("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", ld),
                ("usr/bin/env", env),
                ("usr/bin/old", b"#!/bin/sh\n".to_vec()),
            ],
        );
        // Layer 1: the program and a script that runs it through env; `old` deleted.
        let app = layer(
            dir.path(),
            1,
            &[
                ("usr/local/bin/prog", prog),
                (
                    "usr/local/bin/run",
                    b"#!/usr/bin/env -S prog --flag\n".to_vec(),
                ),
                ("usr/bin/old", b"whiteout".to_vec()),
            ],
        );
        let layers = [base, app];
        let views = views(&layers);
        let process = Process::of_config(
            br#"{"config":{"Entrypoint":["run"],"Env":["PATH=/usr/local/bin:/usr/bin"]}}"#,
        );
        let got = listed(&views, &process);
        assert_eq!(
            got,
            [
                "0:/usr/bin/env",
                "0:/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "0:/usr/lib/x86_64-linux-gnu/libc.so.6",
                "1:/usr/local/bin/run",
                "1:/usr/local/bin/prog",
            ],
            "per layer, in load order"
        );
        // A program a whiteout deleted is not found; nor is a missing one.
        for gone in ["old", "/usr/bin/old", "missing"] {
            let p = Process {
                entrypoint: Some(vec![gone.into()]),
                ..Default::default()
            };
            assert!(
                prefetch_lists(&views, &p).iter().all(Vec::is_empty),
                "{gone}"
            );
        }
    }
}
