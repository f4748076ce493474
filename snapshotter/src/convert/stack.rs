//! A converted image's layers seen as a container sees them, stacked as overlayfs stacks them:
//! paths resolved across layers (symlinks in every component, whiteouts), a file's bytes read
//! back from the local chunk blob, an ELF file's libraries found as the dynamic loader finds
//! them. The static analyses of a converted image (`entrypoint`, `follows`) share it.

use crate::format::chunk;
use crate::format::index::{IndexReader, InodeKind, InodeRecord};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest file read to look into it (an ELF header, a `#!` line, a module's imports).
pub const MAX_PARSED_FILE: u64 = 256 << 20;
/// Symlinks followed while resolving one path (as Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// One converted layer: its index and its chunk blob on local disk.
pub struct Layer<'a> {
    pub index: IndexReader<&'a [u8]>,
    pub blob: &'a Path,
}

/// The layers of one image, bottom first.
#[derive(Clone, Copy)]
pub struct Stack<'l, 'a> {
    pub layers: &'l [Layer<'a>],
}

impl Stack<'_, '_> {
    /// The whole content of a regular file of `layer`, from the local chunk blob.
    pub fn read(&self, layer: usize, rec: &InodeRecord) -> Option<Vec<u8>> {
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
    pub fn resolve(&self, path: &str) -> Option<(usize, String, InodeRecord)> {
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
                let target = String::from_utf8_lossy(self.layers[layer].index.symlink_target(&rec))
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
    pub fn lookup(&self, path: &str) -> Option<(usize, InodeRecord)> {
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

    /// The shared libraries the ELF file at `real` needs (`DT_NEEDED`), as paths that
    /// resolve to regular files, searched as the dynamic loader does: `DT_RPATH` and
    /// `DT_RUNPATH` (with `$ORIGIN`), then the architecture's and the usual library
    /// directories.
    pub fn libraries(&self, real: &str, elf: &goblin::elf::Elf<'_>) -> Vec<String> {
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
        elf.libraries
            .iter()
            .filter_map(|lib| {
                if lib.contains('/') {
                    return Some(absolute(lib));
                }
                dirs.iter()
                    .map(|d| format!("{}/{lib}", d.trim_end_matches('/')))
                    .find(|p| self.is_file(p))
            })
            .collect()
    }

    /// Whether `path` resolves to a regular file.
    pub fn is_file(&self, path: &str) -> bool {
        self.resolve(path)
            .is_some_and(|(_, _, rec)| rec.kind == InodeKind::File)
    }

    /// Whether `path` resolves to a directory.
    pub fn is_dir(&self, path: &str) -> bool {
        self.resolve(path)
            .is_some_and(|(_, _, rec)| rec.kind == InodeKind::Dir)
    }
}

pub fn absolute(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

pub fn components(p: &str) -> Vec<String> {
    p.split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}
