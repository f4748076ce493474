//! The per-inode open state of a held layer mount, kept in a file so that a successor daemon
//! can go on serving the connection with FUSE passthrough (issue 7).
//!
//! Why: the kernel remembers, per inode, the passthrough backing file of its open files, and
//! refuses (EBUSY) a new open that names a *different* backing id while any of them is open; it
//! also refuses (ETXTBSY) a passthrough open while the inode has opens in caching mode. Backing
//! ids belong to the connection, which survives the daemon, but only the process that
//! registered them knows them. So a daemon that wants its successor to keep using passthrough
//! writes down, per inode, the backing id in use and the number of caching-mode opens; the
//! successor adopts both.
//!
//! Layout: one 8-byte slot per inode number (`0..=inode_count`), little-endian: backing id
//! (u32, 0 = none), caching-mode opens (u32). Slots are written in place with `pwrite`: the
//! page cache keeps them across a crash of the process (the connection does not survive a
//! crash of the machine, so neither must the file). Write order keeps errors on the safe side
//! (see `LayerFs`): a slot may claim more caching opens than there are (the successor then just
//! does not use passthrough for that inode), never fewer; a backing id is written before the
//! kernel learns it and cleared before it is closed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const SLOT: u64 = 8;

/// One inode's saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenSlot {
    pub backing_id: u32,
    pub cached_opens: u32,
}

/// The open-state file of one layer mount.
#[derive(Debug)]
pub struct OpenTable {
    file: File,
    inodes: u64,
}

impl OpenTable {
    /// A new, empty table for a mount of a layer with `inodes` inodes (replaces any file).
    pub fn create(path: &Path, inodes: u64) -> io::Result<OpenTable> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len((inodes + 1) * SLOT)?;
        Ok(OpenTable { file, inodes })
    }

    /// The table a predecessor wrote for this mount; its size must fit `inodes`.
    pub fn open_existing(path: &Path, inodes: u64) -> io::Result<OpenTable> {
        let file = File::options().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len != (inodes + 1) * SLOT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {len} bytes, not the {} of a layer with {inodes} inodes",
                    path.display(),
                    (inodes + 1) * SLOT
                ),
            ));
        }
        Ok(OpenTable { file, inodes })
    }

    fn check(&self, ino: u64) -> io::Result<()> {
        if ino == 0 || ino > self.inodes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inode {ino} out of 1..={}", self.inodes),
            ));
        }
        Ok(())
    }

    pub fn set_backing(&self, ino: u64, id: u32) -> io::Result<()> {
        self.check(ino)?;
        self.file.write_all_at(&id.to_le_bytes(), ino * SLOT)
    }

    pub fn set_cached_opens(&self, ino: u64, n: u32) -> io::Result<()> {
        self.check(ino)?;
        self.file.write_all_at(&n.to_le_bytes(), ino * SLOT + 4)
    }

    /// Every inode with a backing id or caching opens.
    pub fn entries(&self) -> io::Result<Vec<(u64, OpenSlot)>> {
        let mut buf = vec![0u8; ((self.inodes + 1) * SLOT) as usize];
        self.file.read_exact_at(&mut buf, 0)?;
        Ok(buf
            .chunks_exact(SLOT as usize)
            .enumerate()
            .skip(1)
            .filter_map(|(ino, s)| {
                let slot = OpenSlot {
                    backing_id: u32::from_le_bytes(s[0..4].try_into().ok()?),
                    cached_opens: u32::from_le_bytes(s[4..8].try_into().ok()?),
                };
                (slot != OpenSlot::default()).then_some((ino as u64, slot))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let t = OpenTable::create(&p, 10).unwrap();
        t.set_backing(3, 7).unwrap();
        t.set_cached_opens(3, 2).unwrap();
        t.set_cached_opens(10, 1).unwrap();
        t.set_backing(5, 9).unwrap();
        t.set_backing(5, 0).unwrap();
        assert!(t.set_backing(11, 1).is_err());
        assert!(t.set_backing(0, 1).is_err());
        drop(t);
        let t = OpenTable::open_existing(&p, 10).unwrap();
        assert_eq!(
            t.entries().unwrap(),
            vec![
                (
                    3,
                    OpenSlot {
                        backing_id: 7,
                        cached_opens: 2
                    }
                ),
                (
                    10,
                    OpenSlot {
                        backing_id: 0,
                        cached_opens: 1
                    }
                ),
            ]
        );
        assert!(OpenTable::open_existing(&p, 11).is_err());
        // A new mount starts empty.
        let t = OpenTable::create(&p, 10).unwrap();
        assert!(t.entries().unwrap().is_empty());
    }
}
