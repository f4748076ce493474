//! Taking over a live FUSE connection with fuser 0.18.
//!
//! fuser's `Session::from_fd` always runs the INIT handshake, reading from the fd it is given.
//! The kernel sends INIT once per connection, so for a connection that is already initialised
//! we hand `from_fd` one end of a socketpair carrying a synthetic `FUSE_INIT` (rebuilt from
//! [`InitParams`] saved by the first daemon), let the filesystem's `init` run against it (its
//! answer goes into the socket and is discarded: the kernel still uses the answer the first
//! daemon gave), then `dup3` the real `/dev/fuse` fd onto the fd number fuser holds.
//!
//! What fuser exposes of the first handshake, in `Filesystem::init`'s `KernelConfig`: the
//! protocol version the kernel spoke, the capabilities it offered, and (indirectly, through
//! `set_max_readahead`'s error) the max_readahead it offered. It does not expose what was
//! finally negotiated (fuser computes `requested & offered` and sends it without telling the
//! filesystem), nor `max_write`/`max_pages`/`time_gran` of the reply. Feeding the successor the
//! same *offer* makes the same `init` code take the same decisions, which is what matters: the
//! successor must run an `init` compatible with the first daemon's (same passthrough choice,
//! same flags), since the kernel keeps the first answer.

use super::TakeoverError;
use fuser::{Filesystem, InitFlags, KernelConfig, Session};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// FUSE_INIT opcode (include/uapi/linux/fuse.h).
const FUSE_INIT: u32 = 26;
/// `struct fuse_in_header`: len, opcode, unique, nodeid, uid, gid, pid, total_extlen + padding.
const IN_HEADER_LEN: usize = 40;
/// `struct fuse_init_in` since protocol 7.36 (flags2 and reserved words).
const INIT_IN_LEN: usize = 64;
/// `struct fuse_init_in` before 7.36: major, minor, max_readahead, flags.
const INIT_IN_COMPAT_LEN: usize = 16;
/// `FUSE_INIT_EXT`: flags2 carries the high 32 bits of the flags (7.36+).
const FUSE_INIT_EXT: u64 = 1 << 30;
/// `FUSE_NOTIFY_RESEND` (kernel 6.9, protocol 7.40).
const FUSE_NOTIFY_RESEND: i32 = 7;
/// Device number of /dev/fuse (misc major 10, minor 229).
const DEV_FUSE_MAJOR: u64 = 10;
const DEV_FUSE_MINOR: u64 = 229;

/// What the kernel offered in a connection's FUSE_INIT: enough to replay the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitParams {
    /// Protocol major version the kernel spoke (7).
    pub major: u32,
    /// Protocol minor version the kernel spoke.
    pub minor: u32,
    /// Capabilities the kernel offered (flags | flags2 << 32, without FUSE_INIT_EXT).
    pub flags: u64,
    /// The max_readahead the kernel offered (the upper bound `init` may choose below).
    pub max_readahead: u32,
}

impl InitParams {
    /// Record the kernel's offer. Call from `Filesystem::init`, at any point (the offer does
    /// not change when `init` adjusts the requested settings).
    pub fn capture(config: &mut KernelConfig) -> InitParams {
        let v = config.kernel_abi();
        // fuser does not expose the offered max_readahead, but refuses larger values with
        // exactly that bound, without changing anything.
        let max_readahead = match config.set_max_readahead(u32::MAX) {
            Err(max) => max,
            // Only if the kernel offered u32::MAX; the setting is then unchanged in effect.
            Ok(_) => u32::MAX,
        };
        InitParams {
            major: v.0,
            minor: v.1,
            flags: config.capabilities().bits(),
            max_readahead,
        }
    }

    /// Whether the kernel can redeliver unanswered requests (FUSE_NOTIFY_RESEND).
    pub fn has_resend(&self) -> bool {
        InitFlags::from_bits_retain(self.flags).contains(InitFlags::FUSE_HAS_RESEND)
    }

    /// The bytes of a FUSE_INIT request (fuse_in_header + fuse_init_in) making the offer.
    pub fn init_request(&self, unique: u64) -> Vec<u8> {
        let ext = self.minor >= 36;
        let body_len = if ext { INIT_IN_LEN } else { INIT_IN_COMPAT_LEN };
        let len = IN_HEADER_LEN + body_len;
        let mut b = Vec::with_capacity(len);
        // fuse_in_header
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&FUSE_INIT.to_ne_bytes());
        b.extend_from_slice(&unique.to_ne_bytes());
        b.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
        b.extend_from_slice(&0u32.to_ne_bytes()); // uid
        b.extend_from_slice(&0u32.to_ne_bytes()); // gid
        b.extend_from_slice(&0u32.to_ne_bytes()); // pid
        b.extend_from_slice(&0u32.to_ne_bytes()); // total_extlen (u16) + padding (u16)

        // fuse_init_in
        let (lo, hi) = if ext {
            (
                (self.flags | FUSE_INIT_EXT) as u32,
                (self.flags >> 32) as u32,
            )
        } else {
            (self.flags as u32, 0)
        };
        b.extend_from_slice(&self.major.to_ne_bytes());
        b.extend_from_slice(&self.minor.to_ne_bytes());
        b.extend_from_slice(&self.max_readahead.to_ne_bytes());
        b.extend_from_slice(&lo.to_ne_bytes());
        if ext {
            b.extend_from_slice(&hi.to_ne_bytes()); // flags2
            b.resize(len, 0); // unused[11]
        }
        debug_assert_eq!(b.len(), len);
        b
    }
}

/// Build a fuser session serving the live FUSE connection behind `fuse_fd`, whose
/// filesystem's `init` saw `init`. The session owns a dup of `fuse_fd` (which is closed). Before
/// returning, asks the kernel to resend requests nobody answered (logged if that fails).
///
/// The previous server must have stopped reading the connection (exited, or at least stopped its
/// loop) before this is called, or requests it still reads race with the resend.
/// `config.clone_fd` is forced off: cloned fds die with the process that made them.
pub fn take_over<FS: Filesystem>(
    fs: FS,
    fuse_fd: OwnedFd,
    init: &InitParams,
    mut config: fuser::Config,
) -> Result<Session<FS>, TakeoverError> {
    check_dev_fuse(fuse_fd.as_fd())?;
    if !init.has_resend() {
        tracing::warn!(
            "the kernel did not offer FUSE_NOTIFY_RESEND (Linux 6.9+): a request the previous \
             daemon read but did not answer stays unanswered and its reader hangs"
        );
    }
    if init.major != 7 || init.minor < 6 {
        // fuser would wait for a second INIT (major > 7) or refuse (< 7.6); neither can work.
        return Err(TakeoverError::Protocol(format!(
            "saved FUSE protocol {}.{} cannot be replayed",
            init.major, init.minor
        )));
    }
    if config.clone_fd {
        tracing::warn!("clone_fd is not supported for taken-over sessions; serving from one fd");
        config.clone_fd = false;
    }
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| TakeoverError::sys("socketpair for the INIT replay", e))?;
    let req = init.init_request(1);
    let n = nix::unistd::write(&ours, &req)
        .map_err(|e| TakeoverError::sys("writing the synthetic FUSE_INIT", e))?;
    if n != req.len() {
        return Err(TakeoverError::Protocol(format!(
            "short write of the synthetic FUSE_INIT: {n} of {}",
            req.len()
        )));
    }
    let acl = config.acl;
    // Reads the INIT from `theirs`, calls fs.init, and writes its answer into the socketpair
    // (`ours` is still open, so that write succeeds; the answer is discarded with `ours`).
    let session = Session::from_fd(fs, theirs, acl, config)
        .map_err(|e| TakeoverError::io("replaying FUSE_INIT through fuser", e))?;
    drop(ours);
    let target = session.as_fd().as_raw_fd();
    // dup3 atomically closes the socket behind `target` and makes `target` refer to the
    // /dev/fuse file. fuser keeps using the fd number (it owns it as a File and only ever
    // reads/writes/closes it), so from now on it talks to the kernel. No other thread knows
    // `target`: the session has not started.
    nix::unistd::dup3(fuse_fd.as_raw_fd(), target, nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| TakeoverError::sys("dup3 of the /dev/fuse fd onto the session", e))?;
    drop(fuse_fd);
    if let Err(e) = notify_resend(session.as_fd()) {
        tracing::warn!(
            has_resend = init.has_resend(),
            "FUSE_NOTIFY_RESEND failed ({e}); requests the previous daemon read but did not \
             answer will hang"
        );
    }
    Ok(session)
}

/// Ask the kernel to put every request that was read from this connection but not answered back
/// in its queue (FUSE_NOTIFY_RESEND, kernel 6.9+). Write it before anything reads the fd.
pub fn notify_resend(fuse_fd: BorrowedFd<'_>) -> Result<(), TakeoverError> {
    // struct fuse_out_header { u32 len; i32 error (the notify code when unique == 0); u64 unique }
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&16u32.to_ne_bytes());
    out.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    out.extend_from_slice(&0u64.to_ne_bytes());
    let n = nix::unistd::write(fuse_fd, &out)
        .map_err(|e| TakeoverError::sys("writing FUSE_NOTIFY_RESEND", e))?;
    if n != out.len() {
        return Err(TakeoverError::Protocol(format!(
            "short write of FUSE_NOTIFY_RESEND: {n}"
        )));
    }
    Ok(())
}

fn check_dev_fuse(fd: BorrowedFd<'_>) -> Result<(), TakeoverError> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| TakeoverError::sys("fstat of the fd to take over", e))?;
    let is_chr = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    let (maj, min) = (
        nix::sys::stat::major(st.st_rdev),
        nix::sys::stat::minor(st.st_rdev),
    );
    if !is_chr || maj != DEV_FUSE_MAJOR || min != DEV_FUSE_MINOR {
        return Err(TakeoverError::Protocol(format!(
            "fd to take over is not /dev/fuse (mode {:o}, rdev {maj}:{min})",
            st.st_mode
        )));
    }
    Ok(())
}
