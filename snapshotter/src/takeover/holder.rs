//! The fd holder: a tiny process that outlives daemon restarts and keeps a dup of each FUSE
//! connection's `/dev/fuse` fd, so the kernel never sees the connection's last fd close.
//!
//! Why a separate process and not the daemon itself: the holder must survive the daemon being
//! killed (-9, OOM, crash, upgrade), so it does as little as possible: no network, no FUSE, no
//! async runtime, just a map from name to (opaque state, fd) behind a unix socket (mode 0600;
//! put it in a root-only directory such as /run/beam). On hosts with systemd, the service
//! manager's fd store can play the same role.
//!
//! Entries are not validated: after a mount is unmounted, its fd stays held (and the
//! connection object alive) until the daemon drops the entry. The daemon should `drop_entry` when
//! it unmounts, and reconcile the list against its mounts after a takeover.

use super::proto::{self, Message};
use super::TakeoverError;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::socket::sockopt::PeerCredentials;
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    UnixAddr,
};
use nix::unistd::geteuid;

/// One held entry, as listed.
#[derive(Debug)]
pub struct HolderEntry {
    pub name: String,
    /// The state given at `put`, byte for byte.
    pub state: Vec<u8>,
    /// A new fd of the held file (same open file description as the one `put`).
    pub fd: OwnedFd,
}

type Entries = Arc<Mutex<BTreeMap<String, (String, OwnedFd)>>>;

/// The listening side of a holder. [`run_holder`] is bind + serve.
pub struct Holder {
    listener: OwnedFd,
    path: PathBuf,
    entries: Entries,
}

fn seqpacket() -> Result<OwnedFd, TakeoverError> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| TakeoverError::sys("creating a unix SOCK_SEQPACKET socket", e))
}

fn unix_addr(path: &Path) -> Result<UnixAddr, TakeoverError> {
    UnixAddr::new(path)
        .map_err(|e| TakeoverError::sys(format!("socket path {}", path.display()), e))
}

impl Holder {
    /// Listen on `socket_path` (mode 0600). A stale socket file nobody listens on is replaced;
    /// a live holder there is an error (two holders would split the entries).
    pub fn bind(socket_path: &Path) -> Result<Holder, TakeoverError> {
        let addr = unix_addr(socket_path)?;
        if let Ok(meta) = std::fs::symlink_metadata(socket_path) {
            if !meta.file_type().is_socket() {
                return Err(TakeoverError::io(
                    format!("{}", socket_path.display()),
                    std::io::Error::other("exists and is not a socket"),
                ));
            }
            let probe = seqpacket()?;
            if connect(probe.as_raw_fd(), &addr).is_ok() {
                return Err(TakeoverError::AlreadyRunning(
                    socket_path.display().to_string(),
                ));
            }
            std::fs::remove_file(socket_path).map_err(|e| {
                TakeoverError::io(
                    format!("removing stale socket {}", socket_path.display()),
                    e,
                )
            })?;
        }
        let listener = seqpacket()?;
        bind(listener.as_raw_fd(), &addr)
            .map_err(|e| TakeoverError::sys(format!("binding {}", socket_path.display()), e))?;
        // bind created the file with the process umask; connecting needs write permission on
        // it. Keep the directory root-only too, so the moment before this chmod does not matter
        // (and peers are checked at accept anyway).
        std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| TakeoverError::io(format!("chmod 0600 {}", socket_path.display()), e))?;
        listen(&listener, Backlog::new(16).unwrap_or(Backlog::MAXCONN)).map_err(|e| {
            TakeoverError::sys(format!("listening on {}", socket_path.display()), e)
        })?;
        Ok(Holder {
            listener,
            path: socket_path.to_owned(),
            entries: Arc::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept connections forever, one thread each (a daemon may keep its connection open).
    pub fn serve(&self) -> Result<(), TakeoverError> {
        loop {
            let raw = match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => fd,
                Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => continue,
                Err(e) => return Err(TakeoverError::sys("accepting a holder connection", e)),
            };
            // SAFETY: accept4 just returned this new fd; nothing else owns it.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            // Whoever can list can serve (or hijack) the held mounts: same user only.
            match getsockopt(&conn, PeerCredentials) {
                Ok(cred) if cred.uid() == geteuid().as_raw() => {}
                Ok(cred) => {
                    tracing::warn!(uid = cred.uid(), pid = cred.pid(), "holder: refusing peer");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("holder: no peer credentials: {e}");
                    continue;
                }
            }
            let entries = self.entries.clone();
            let spawned = std::thread::Builder::new()
                .name("holder-conn".into())
                .spawn(move || {
                    if let Err(e) = serve_connection(conn.as_fd(), &entries) {
                        tracing::warn!("holder connection: {e}");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("holder: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Run a holder on `socket_path` until killed. This is all the holder process does.
pub fn run_holder(socket_path: &Path) -> Result<(), TakeoverError> {
    let holder = Holder::bind(socket_path)?;
    tracing::info!(socket = %socket_path.display(), "fd holder listening");
    holder.serve()
}

fn serve_connection(conn: BorrowedFd<'_>, entries: &Entries) -> Result<(), TakeoverError> {
    loop {
        let (msg, fd) = match proto::recv(conn) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e @ (TakeoverError::Protocol(_) | TakeoverError::Version { .. })) => {
                // Tell the client why, then hang up: its framing cannot be trusted.
                let _ = proto::send(
                    conn,
                    &Message::Error {
                        message: e.to_string(),
                    },
                    None,
                );
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let lock = || entries.lock().unwrap_or_else(|p| p.into_inner());
        match (msg, fd) {
            (Message::Put { name, state }, Some(fd)) => {
                // Replacing drops (closes) the old fd only after the new one is in.
                let old = lock().insert(name, (state, fd));
                drop(old);
                proto::send(conn, &Message::Ok, None)?;
            }
            (Message::Put { .. }, None) => proto::send(
                conn,
                &Message::Error {
                    message: "put without an fd".into(),
                },
                None,
            )?,
            (Message::Drop { name }, None) => {
                let old = lock().remove(&name);
                drop(old);
                proto::send(conn, &Message::Ok, None)?;
            }
            (Message::List, None) => {
                // Copy out under the lock, send without it (a slow client must not stall puts).
                let snapshot = lock()
                    .iter()
                    .map(|(name, (state, fd))| {
                        let fd = fd.try_clone().map_err(|e| {
                            TakeoverError::io(format!("dup of the fd held as {name}"), e)
                        })?;
                        Ok((name.clone(), state.clone(), fd))
                    })
                    .collect::<Result<Vec<_>, TakeoverError>>()?;
                for (name, state, fd) in snapshot {
                    proto::send(conn, &Message::Entry { name, state }, Some(fd.as_fd()))?;
                }
                proto::send(conn, &Message::End, None)?;
            }
            (Message::Ping, None) => proto::send(
                conn,
                &Message::Pong {
                    version: proto::PROTOCOL_VERSION,
                },
                None,
            )?,
            (other, fd) => proto::send(
                conn,
                &Message::Error {
                    message: format!(
                        "unexpected {other:?}{}",
                        if fd.is_some() { " with an fd" } else { "" }
                    ),
                },
                None,
            )?,
        }
    }
}

/// A connection to a holder.
pub struct HolderClient {
    sock: OwnedFd,
}

impl AsFd for HolderClient {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl HolderClient {
    /// Connect to the holder listening on `socket_path`.
    pub fn connect(socket_path: &Path) -> Result<HolderClient, TakeoverError> {
        let addr = unix_addr(socket_path)?;
        let sock = seqpacket()?;
        connect(sock.as_raw_fd(), &addr).map_err(|e| {
            TakeoverError::sys(format!("connecting to holder {}", socket_path.display()), e)
        })?;
        Ok(HolderClient { sock })
    }

    fn call(&self, msg: &Message, fd: Option<BorrowedFd<'_>>) -> Result<Message, TakeoverError> {
        proto::send(self.sock.as_fd(), msg, fd)?;
        match proto::recv(self.sock.as_fd())? {
            Some((Message::Error { message }, _)) => Err(TakeoverError::Refused(message)),
            Some((reply, None)) => Ok(reply),
            Some((reply, Some(_))) => Err(TakeoverError::Protocol(format!(
                "unexpected fd with {reply:?}"
            ))),
            None => Err(TakeoverError::Protocol(
                "holder closed the connection".into(),
            )),
        }
    }

    fn expect_ok(reply: Message) -> Result<(), TakeoverError> {
        match reply {
            Message::Ok => Ok(()),
            other => Err(TakeoverError::Protocol(format!(
                "expected ok, got {other:?}"
            ))),
        }
    }

    /// The holder's protocol version.
    pub fn ping(&self) -> Result<u32, TakeoverError> {
        match self.call(&Message::Ping, None)? {
            Message::Pong { version } => Ok(version),
            other => Err(TakeoverError::Protocol(format!(
                "expected pong, got {other:?}"
            ))),
        }
    }

    /// Hold `fd` (the holder gets its own reference to the same open file) with `state`,
    /// replacing any entry of the same name.
    pub fn put(&self, name: &str, fd: impl AsFd, state: &[u8]) -> Result<(), TakeoverError> {
        let msg = Message::Put {
            name: name.to_owned(),
            state: proto::encode_state(state),
        };
        Self::expect_ok(self.call(&msg, Some(fd.as_fd()))?)
    }

    /// Forget the entry `name` (closing the holder's fd). Not an error if there is none.
    pub fn drop_entry(&self, name: &str) -> Result<(), TakeoverError> {
        let msg = Message::Drop {
            name: name.to_owned(),
        };
        Self::expect_ok(self.call(&msg, None)?)
    }

    /// Every held entry, with a new fd each (the holder keeps its own).
    pub fn list(&self) -> Result<Vec<HolderEntry>, TakeoverError> {
        proto::send(self.sock.as_fd(), &Message::List, None)?;
        let mut out = Vec::new();
        loop {
            match proto::recv(self.sock.as_fd())? {
                Some((Message::Entry { name, state }, Some(fd))) => out.push(HolderEntry {
                    name,
                    state: proto::decode_state(&state)?,
                    fd,
                }),
                Some((Message::End, None)) => return Ok(out),
                Some((Message::Error { message }, _)) => {
                    return Err(TakeoverError::Refused(message))
                }
                Some((other, fd)) => {
                    return Err(TakeoverError::Protocol(format!(
                        "unexpected {other:?} (fd attached: {}) in a list",
                        fd.is_some()
                    )))
                }
                None => {
                    return Err(TakeoverError::Protocol(
                        "holder closed the connection mid-list".into(),
                    ))
                }
            }
        }
    }
}
