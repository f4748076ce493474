//! Reading a tar stream entry by entry with `tar-core`, the sans-IO parser of the tar-rs
//! maintainers.
//!
//! Why not the `tar` crate's reader: its PAX parser (0.4.46) splits records on newlines
//! instead of honouring their length, so a binary xattr holding 0x0A (a file capability can)
//! fails the layer, and a crafted value can smuggle a `linkpath` that other readers do not
//! see (composefs/tar-rs#452). `tar-core` walks records by length, resolves GNU long names,
//! PAX records and every sparse format, and bounds metadata sizes.
//!
//! This module drives the parser over any `Read`: it keeps a buffer, feeds the parser until
//! it emits an entry, hands out owned metadata, then streams the entry's content (with
//! sparse holes expanded to zeros) so the caller never holds a whole file.

use std::collections::BTreeMap;
use std::io::{self, Read};
use tar_core::parse::{Limits, ParseEvent, Parser};
use tar_core::{EntryType, PaxExtensions, SparseEntry};

/// An entry's metadata, owned.
#[derive(Debug, Clone)]
pub struct TarEntry {
    pub entry_type: EntryType,
    pub path: Vec<u8>,
    pub link_target: Option<Vec<u8>>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub dev: (u32, u32),
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Logical size of the file (for a sparse file, its real size).
    pub size: u64,
    /// Data regions of a sparse file; `None` for a dense one.
    pub sparse: Option<Vec<SparseEntry>>,
}

/// Pull-style reader of a tar stream.
pub struct TarStream<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    parser: Parser,
    /// On-disk content bytes of the current entry still unread, then its padding.
    content_left: u64,
    padding_left: u64,
    /// Logical read position and sparse map of the current entry.
    pos: u64,
    size: u64,
    sparse: Option<Vec<SparseEntry>>,
    next_region: usize,
    done: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: Read> TarStream<R> {
    pub fn new(r: R) -> Self {
        let limits = Limits {
            max_path_len: Some(4096),
            max_sparse_entries: 1 << 20,
            ..Limits::default()
        };
        TarStream {
            r,
            buf: vec![0; 1 << 20],
            start: 0,
            end: 0,
            eof: false,
            parser: Parser::new(limits),
            content_left: 0,
            padding_left: 0,
            pos: 0,
            size: 0,
            sparse: None,
            next_region: 0,
            done: false,
        }
    }

    /// Make at least `n` bytes available in the buffer (fewer only at EOF).
    fn fill(&mut self, n: usize) -> io::Result<()> {
        if self.end - self.start >= n {
            return Ok(());
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        while self.end < n && !self.eof {
            let got = self.r.read(&mut self.buf[self.end..])?;
            if got == 0 {
                self.eof = true;
            }
            self.end += got;
        }
        Ok(())
    }

    /// Read raw stream bytes into `out` (all of it, or error).
    fn raw_read(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.start == self.end {
                self.fill(1)?;
                if self.start == self.end {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tar stream ends inside an entry",
                    ));
                }
            }
            let n = (self.end - self.start).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            done += n;
        }
        Ok(())
    }

    fn raw_skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.start == self.end {
                self.fill(1)?;
                if self.start == self.end {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tar stream ends inside an entry",
                    ));
                }
            }
            let k = ((self.end - self.start) as u64).min(n) as usize;
            self.start += k;
            n -= k as u64;
        }
        Ok(())
    }

    /// The next entry, skipping whatever of the previous entry's content was not read.
    pub fn next_entry(&mut self) -> io::Result<Option<TarEntry>> {
        if self.done {
            return Ok(None);
        }
        let skip = self.content_left + self.padding_left;
        self.raw_skip(skip)?;
        self.content_left = 0;
        self.padding_left = 0;
        let mut want = 512usize;
        loop {
            self.fill(want)?;
            let avail = self.end - self.start;
            let event = self
                .parser
                .parse(&self.buf[self.start..self.end])
                .map_err(|e| bad(format!("malformed tar: {e}")))?;
            let (consumed, entry, sparse) = match event {
                ParseEvent::NeedData { min_bytes } => {
                    if self.eof && avail < min_bytes {
                        if avail == 0 {
                            // A stream that ends without the end-of-archive blocks.
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "tar stream ends without its end-of-archive marker",
                            ));
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tar stream ends inside a header",
                        ));
                    }
                    want = min_bytes.max(want + 1);
                    continue;
                }
                ParseEvent::End { consumed } => {
                    self.start += consumed;
                    self.done = true;
                    return Ok(None);
                }
                ParseEvent::GlobalExtensions { consumed, .. } => {
                    self.start += consumed;
                    continue;
                }
                ParseEvent::Entry { consumed, entry } => (consumed, own(&entry)?, None),
                ParseEvent::SparseEntry {
                    consumed,
                    entry,
                    sparse_map,
                    real_size,
                } => {
                    let mut e = own(&entry)?;
                    e.size = real_size;
                    (consumed, e, Some((sparse_map, entry.size)))
                }
            };
            self.start += consumed;
            let disk = match &sparse {
                Some((_, disk)) => *disk,
                None => {
                    // The parser reports the content size for every entry type.
                    entry.size
                }
            };
            self.content_left = disk;
            self.padding_left = (512 - disk % 512) % 512;
            self.pos = 0;
            self.size = entry.size;
            self.next_region = 0;
            self.sparse = None;
            let mut entry = entry;
            if let Some((map, _)) = sparse {
                let mut end = 0u64;
                for r in &map {
                    let e = r
                        .offset
                        .checked_add(r.length)
                        .filter(|e| r.offset >= end && *e <= entry.size)
                        .ok_or_else(|| {
                            bad(format!(
                                "sparse map of {:?} overlaps or exceeds the file",
                                String::from_utf8_lossy(&entry.path)
                            ))
                        })?;
                    end = e;
                }
                let data: u64 = map.iter().map(|r| r.length).sum();
                if data != disk {
                    return Err(bad(format!(
                        "sparse map of {:?} lists {data} bytes, the entry holds {disk}",
                        String::from_utf8_lossy(&entry.path)
                    )));
                }
                entry.sparse = Some(map.clone());
                self.sparse = Some(map);
            }
            return Ok(Some(entry));
        }
    }

    /// Drain the rest of the stream (trailing blocks), so a hash over it covers everything.
    pub fn drain(&mut self) -> io::Result<()> {
        self.start = self.end;
        io::copy(&mut self.r, &mut io::sink())?;
        Ok(())
    }
}

/// Reads the current entry's logical content: sparse holes come back as zeros.
impl<R: Read> Read for TarStream<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        let Some(map) = &self.sparse else {
            let n = (self.content_left.min(out.len() as u64)) as usize;
            if n == 0 {
                return Ok(0);
            }
            self.raw_read(&mut out[..n])?;
            self.content_left -= n as u64;
            self.pos += n as u64;
            return Ok(n);
        };
        while self.next_region < map.len() {
            let r = map[self.next_region];
            if self.pos >= r.offset + r.length {
                self.next_region += 1;
                continue;
            }
            if self.pos < r.offset {
                let n = ((r.offset - self.pos) as usize).min(out.len());
                out[..n].fill(0);
                self.pos += n as u64;
                return Ok(n);
            }
            let n = ((r.offset + r.length - self.pos) as usize).min(out.len());
            self.raw_read(&mut out[..n])?;
            self.content_left -= n as u64;
            self.pos += n as u64;
            return Ok(n);
        }
        let n = ((self.size - self.pos) as usize).min(out.len());
        out[..n].fill(0);
        self.pos += n as u64;
        Ok(n)
    }
}

fn own(e: &tar_core::parse::ParsedEntry<'_>) -> io::Result<TarEntry> {
    let mut xattrs: BTreeMap<Vec<u8>, Vec<u8>> = e
        .xattrs
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    let mut mtime = i64::try_from(e.mtime).map_err(|_| bad("mtime out of range"))?;
    let mut mtime_nsec = 0;
    if let Some(pax) = e.pax {
        for ext in PaxExtensions::new(pax) {
            let ext = ext.map_err(|e| bad(format!("malformed PAX record: {e}")))?;
            let key = ext.key_bytes();
            if key == b"mtime" {
                if let Some((s, ns)) = parse_pax_time(ext.value_bytes()) {
                    mtime = s;
                    mtime_nsec = ns;
                }
            } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                use base64::Engine;
                let mut v = ext.value_bytes();
                while let [rest @ .., b'='] = v {
                    v = rest;
                }
                let value = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(v)
                    .map_err(|e| bad(format!("bad LIBARCHIVE.xattr value: {e}")))?;
                xattrs.insert(percent_decode(name), value);
            }
        }
    }
    Ok(TarEntry {
        entry_type: e.entry_type,
        path: e.path.to_vec(),
        link_target: e.link_target.as_ref().map(|l| l.to_vec()),
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime,
        mtime_nsec,
        dev: (e.dev_major.unwrap_or(0), e.dev_minor.unwrap_or(0)),
        xattrs,
        size: e.size,
        sparse: None,
    })
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            let hex = std::str::from_utf8(&s[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// A PAX time: `[-]seconds[.fraction]`.
pub fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let mut sec: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let mut nsec: u32 = digits.parse().ok()?;
    if secs.starts_with('-') && nsec > 0 {
        // -1.5 means 1.5 s before the epoch: -2 s + 0.5 s.
        sec -= 1;
        nsec = 1_000_000_000 - nsec;
    }
    Some((sec, nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }

    /// A PAX xattr value holding a newline: the record length, not the newline, ends it.
    #[test]
    fn binary_pax_values_with_newlines_are_read_by_length() {
        let value: &[u8] = b"\x01\n\x00\nX";
        let key = b"SCHILY.xattr.security.capability";
        let body_len = key.len() + 1 + value.len() + 1;
        let mut len = body_len + 1;
        loop {
            let l = len.to_string().len() + 1 + body_len;
            if l == len {
                break;
            }
            len = l;
        }
        let mut rec = format!("{len} ").into_bytes();
        rec.extend_from_slice(key);
        rec.push(b'=');
        rec.extend_from_slice(value);
        rec.push(b'\n');
        assert_eq!(rec.len(), len);
        let mut tar = Vec::new();
        {
            let mut b = tar::Builder::new(&mut tar);
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(rec.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, "PaxHeaders/f", &rec[..]).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(3);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, "f", &b"abc"[..]).unwrap();
            b.finish().unwrap();
        }
        let mut s = TarStream::new(&tar[..]);
        let e = s.next_entry().unwrap().unwrap();
        assert_eq!(e.path, b"f");
        assert_eq!(
            e.xattrs.get(&b"security.capability"[..]).map(|v| &v[..]),
            Some(value)
        );
        let mut content = Vec::new();
        s.read_to_end(&mut content).unwrap();
        assert_eq!(content, b"abc");
        assert!(s.next_entry().unwrap().is_none());
    }
}
