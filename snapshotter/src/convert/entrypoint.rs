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

use crate::format::chunk;
use crate::format::index::{InodeKind, IndexReader, InodeRecord};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest file read to look into it (an ELF header, a `#!` line): bigger ones are still
/// prefetched, not parsed.
const MAX_PARSED_FILE: u64 = 256 << 20;
/// Symlinks followed while resolving one path (as Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;
/// Files in the list at most.
const MAX_FILES: usize = 512;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One converted layer: its index and its chunk blob on local disk.
pub struct Layer<'a> {
    pub index: IndexReader<&'a [u8]>,
    pub blob: &'a Path,
}

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
        layers,
        seen: HashSet::new(),
        order: Vec::new(),
    };
    if let Some(argv0) = process.argv0() {
        let dirs = process.path_dirs();
        if let Some(program) = walk.find_program(argv0, &dirs) {
            walk.add("/etc/ld.so.cache", 0);
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
    layers: &'l [Layer<'a>],
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
            .find(|p| {
                self.resolve(p)
                    .is_some_and(|(_, _, rec)| rec.kind == InodeKind::File)
            })
    }

    /// Add the file at `path` (resolved) to the list; return its layer and record.
    fn add(&mut self, path: &str, _depth: usize) -> Option<(usize, InodeRecord, String)> {
        let (layer, real, rec) = self.resolve(path)?;
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
        let Some((layer, rec, real)) = self.add(path, depth) else {
            return;
        };
        let Some(bytes) = self.read(layer, &rec) else {
            return;
        };
        if let Some(line) = bytes.strip_prefix(b"#!") {
            // `#!/usr/bin/env python3` and `#!/bin/sh -e`.
            let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut words = line.split_whitespace();
            let Some(interp) = words.next() else { return };
            let interp = if interp.ends_with("/env") {
                self.add(interp, depth);
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
            self.add(interp, depth);
        }
        let origin = real.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
        let mut dirs: Vec<String> = elf
            .rpaths
            .iter()
            .chain(elf.runpaths.iter())
            .flat_map(|p| p.split(':'))
            .map(|d| d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin))
            .filter(|d| d.starts_with('/'))
            .collect();
        let triplet = match elf.header.e_machine {
            goblin::elf::header::EM_X86_64 => "x86_64-linux-gnu",
            goblin::elf::header::EM_AARCH64 => "aarch64-linux-gnu",
            goblin::elf::header::EM_386 => "i386-linux-gnu",
            goblin::elf::header::EM_ARM => "arm-linux-gnueabihf",
            goblin::elf::header::EM_PPC64 => "powerpc64le-linux-gnu",
            goblin::elf::header::EM_S390 => "s390x-linux-gnu",
            _ => "",
        };
        for d in ["/lib", "/usr/lib"] {
            if !triplet.is_empty() {
                dirs.push(format!("{d}/{triplet}"));
            }
        }
        dirs.extend(
            ["/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib"].map(String::from),
        );
        let needed: Vec<String> = elf.libraries.iter().map(|s| s.to_string()).collect();
        for lib in needed {
            let found = if lib.contains('/') {
                Some(absolute(&lib))
            } else {
                dirs.iter()
                    .map(|d| format!("{}/{lib}", d.trim_end_matches('/')))
                    .find(|p| {
                        self.resolve(p)
                            .is_some_and(|(_, _, rec)| rec.kind == InodeKind::File)
                    })
            };
            let Some(path) = found else { continue };
            let before = self.order.len();
            let Some((layer, rec, real)) = self.add(&path, depth) else {
                continue;
            };
            if self.order.len() == before {
                continue; // already walked
            }
            if let Some(bytes) = self.read(layer, &rec) {
                self.add_elf_deps(&real, &bytes, depth + 1);
            }
        }
    }

    /// The whole content of a regular file of `layer`, from the local chunk blob.
    fn read(&self, layer: usize, rec: &InodeRecord) -> Option<Vec<u8>> {
        if rec.size > MAX_PARSED_FILE {
            return None;
        }
        let l = &self.layers[layer];
        let blob = std::fs::File::open(l.blob).ok()?;
        let mut out = Vec::with_capacity(rec.size as usize);
        for i in l.index.file_chunks(rec) {
            let c = l.index.chunk(i).ok()?;
            let mut stored = vec![0u8; c.stored_len as usize];
            blob.read_exact_at(&mut stored, c.offset).ok()?;
            chunk::decode_into(&stored, c.uncompressed_len as usize, &c.digest, &mut out).ok()?;
        }
        Some(out)
    }

    /// The entry at `path` in the layers stacked as overlayfs stacks them, following symlinks
    /// (in every component): its layer, its real path and its record. `None` when missing or
    /// deleted by a whiteout above it.
    fn resolve(&self, path: &str) -> Option<(usize, String, InodeRecord)> {
        let mut pending: Vec<String> = components(path);
        pending.reverse();
        let mut real: Vec<String> = Vec::new();
        let mut links = 0;
        let mut last = None;
        while let Some(name) = pending.pop() {
            match name.as_str() {
                "." => continue,
                ".." => {
                    real.pop();
                    continue;
                }
                _ => {}
            }
            real.push(name);
            let joined = format!("/{}", real.join("/"));
            let (layer, rec) = self.lookup(&joined)?;
            if rec.kind == InodeKind::Symlink {
                links += 1;
                if links > MAX_SYMLINKS {
                    return None;
                }
                let target =
                    String::from_utf8_lossy(self.layers[layer].index.symlink_target(&rec))
                        .into_owned();
                real.pop();
                if target.starts_with('/') {
                    real.clear();
                }
                let mut t = components(&target);
                t.reverse();
                pending.extend(t);
                last = None;
                continue;
            }
            last = Some((layer, rec));
        }
        let (layer, rec) = last?;
        Some((layer, format!("/{}", real.join("/")), rec))
    }

    /// The topmost entry at `path` (no symlinks in it), unless a whiteout above hides it.
    fn lookup(&self, path: &str) -> Option<(usize, InodeRecord)> {
        for (i, l) in self.layers.iter().enumerate().rev() {
            let Ok(Some(ino)) = l.index.lookup_path(path.as_bytes()) else {
                continue;
            };
            let rec = l.index.inode(ino).ok()?;
            if rec.kind == InodeKind::Whiteout {
                return None;
            }
            return Some((i, rec));
        }
        None
    }
}

fn absolute(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

fn components(p: &str) -> Vec<String> {
    p.split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}
