//! The holder's wire protocol: one small JSON object per SOCK_SEQPACKET message (so message
//! boundaries come from the socket, no framing), at most one fd attached with SCM_RIGHTS.
//!
//! Every message carries `"v"` (the protocol version) and `"op"`.
//! - Requests: `put {name, state}` with an fd, `drop {name}`, `list`, `ping`,
//!   `attach {grace_ms}` (the sender is the serving daemon for as long as this connection
//!   stays open; once no daemon is attached for `grace_ms`, the holder lets go of everything),
//!   `release` (let go of everything now, then exit: a real stop). Both were added without a
//!   version change: a holder that predates them answers `error`.
//! - Replies: `ok`, `error {message}`, `entry {name, state}` with an fd (one per held entry,
//!   answering `list`), `end` (after the last entry), `pong {version}`.
//!
//! `state` is the caller's opaque bytes, base64-encoded so the holder never has to parse it.

// fds received over a socket (SCM_RIGHTS) or from accept4 are wrapped as owned: unsafe.
#![allow(unsafe_code)]

use super::TakeoverError;
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message accepted (a message is a name plus a small state; FUSE INIT parameters and
/// a mountpoint take a few hundred bytes).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// One protocol message (without the version, which [`send`] adds and [`recv`] checks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Message {
    Put { name: String, state: String },
    Drop { name: String },
    List,
    Ping,
    Attach { grace_ms: u64 },
    Release,
    Ok,
    Error { message: String },
    Entry { name: String, state: String },
    End,
    Pong { version: u32 },
}

/// Encode a message, version included.
pub fn encode(msg: &Message) -> Result<Vec<u8>, TakeoverError> {
    let mut v = serde_json::to_value(msg)
        .map_err(|e| TakeoverError::Protocol(format!("encoding {msg:?}: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| TakeoverError::Protocol("message is not a JSON object".into()))?;
    obj.insert("v".into(), PROTOCOL_VERSION.into());
    let bytes = serde_json::to_vec(&v)
        .map_err(|e| TakeoverError::Protocol(format!("encoding {msg:?}: {e}")))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(TakeoverError::Protocol(format!(
            "message of {} bytes exceeds {MAX_MESSAGE}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decode a message, refusing other protocol versions.
pub fn decode(bytes: &[u8]) -> Result<Message, TakeoverError> {
    #[derive(Deserialize)]
    struct Versioned {
        v: Option<u32>,
    }
    let ver: Versioned = serde_json::from_slice(bytes)
        .map_err(|e| TakeoverError::Protocol(format!("not a JSON object: {e}")))?;
    match ver.v {
        Some(PROTOCOL_VERSION) => {}
        Some(got) => {
            return Err(TakeoverError::Version {
                got,
                want: PROTOCOL_VERSION,
            })
        }
        None => return Err(TakeoverError::Protocol("no \"v\" field".into())),
    }
    serde_json::from_slice(bytes).map_err(|e| TakeoverError::Protocol(e.to_string()))
}

/// Send one message, with `fd` attached if given. Never raises SIGPIPE (a holder must not die
/// because a client went away).
pub fn send(
    sock: BorrowedFd<'_>,
    msg: &Message,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), TakeoverError> {
    let bytes = encode(msg)?;
    let iov = [IoSlice::new(&bytes)];
    let fds: [RawFd; 1] = [fd.map(|f| f.as_raw_fd()).unwrap_or(-1)];
    let cmsgs = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fd.is_some() { &cmsgs } else { &[] };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(TakeoverError::Protocol(format!(
                    "short send: {n} of {} bytes",
                    bytes.len()
                )))
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(TakeoverError::sys("sending to the holder socket", e)),
        }
    }
}

/// Receive one message and the fd attached to it, if any. `Ok(None)` when the peer closed the
/// connection. Received fds are close-on-exec; any fds beyond the first are closed.
pub fn recv(sock: BorrowedFd<'_>) -> Result<Option<(Message, Option<OwnedFd>)>, TakeoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; 4]);
    let (n, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => {
                let mut fds = Vec::new();
                let cmsgs = m.cmsgs().map_err(|e| {
                    TakeoverError::sys("control data truncated (too many fds attached)", e)
                })?;
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for r in raw {
                            // SAFETY: the kernel just installed `r` in this process for this
                            // message (SCM_RIGHTS); nothing else refers to it, so it is ours
                            // to own and close.
                            fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                        }
                    }
                }
                break (m.bytes, fds, m.flags.contains(MsgFlags::MSG_TRUNC));
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(TakeoverError::sys("receiving from the holder socket", e)),
        }
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(TakeoverError::Protocol(format!(
            "message larger than {MAX_MESSAGE} bytes"
        )));
    }
    if fds.len() > 1 {
        return Err(TakeoverError::Protocol(format!(
            "{} fds attached to one message, at most 1 expected",
            fds.len()
        )));
    }
    let msg = decode(&buf[..n])?;
    Ok(Some((msg, fds.into_iter().next())))
}

/// Base64 of opaque state bytes.
pub fn encode_state(state: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(state)
}

/// Opaque state bytes from base64.
pub fn decode_state(state: &str) -> Result<Vec<u8>, TakeoverError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(state)
        .map_err(|e| TakeoverError::Protocol(format!("state is not base64: {e}")))
}
