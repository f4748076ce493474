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
//!
//! Why a grace period (issue 12): a held connection nobody serves makes every reader of the
//! mount wait for ever (and `rm -rf` of the state directory with it). The serving daemon keeps
//! one `attach` connection open; when none has been open for the grace period (the operator
//! stopped the service, a script ended, the node is drained), the holder *releases*: it closes
//! every held fd, which for a connection no daemon serves is the last one, so the kernel aborts
//! the connection and waiting readers get ENOTCONN; it detaches the mountpoints (recorded in
//! the entries' state as `mountpoint`), logs why, removes its socket and exits. `release` does
//! the same at once (`beam-snapshotter --stop`).

// fds received over a socket (SCM_RIGHTS) or from accept4 are wrapped as owned: unsafe.
#![allow(unsafe_code)]

use super::proto::{self, Message};
use super::TakeoverError;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Whether a daemon serves the held connections, and since when none does.
#[derive(Debug)]
struct Life {
    /// Open `attach` connections.
    attached: usize,
    /// When the last attached daemon went away (or the holder started).
    unattached_since: Instant,
    /// The grace period the last attached daemon asked for; zero = for ever.
    grace: Duration,
    /// Set once everything was let go: the holder is exiting.
    released: bool,
}

type Lives = Arc<Mutex<Life>>;

/// What a holder answers an `attach` while it lets go of everything (the daemon then starts a
/// new holder).
pub const RELEASING: &str = "this holder is releasing its connections and exiting";

/// What a holder does once it let go of everything (the holder process exits).
type OnRelease = Arc<dyn Fn() + Send + Sync>;

/// The listening side of a holder. [`run_holder`] is bind + serve.
pub struct Holder {
    listener: OwnedFd,
    path: PathBuf,
    entries: Entries,
    life: Lives,
    on_release: OnRelease,
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
            life: Arc::new(Mutex::new(Life {
                attached: 0,
                unattached_since: Instant::now(),
                grace: Duration::ZERO,
                released: false,
            })),
            on_release: Arc::new(|| std::process::exit(0)),
        })
    }

    /// Call `f` instead of exiting the process once everything was released (tests).
    pub fn on_release(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_release = Arc::new(f);
        self
    }

    /// Let go of everything once no daemon has been attached for `grace` (the grace period of
    /// the last daemon that attached wins). Runs a watchdog thread; after a release the
    /// process exits.
    pub fn start_watchdog(&self, grace: Duration) -> Result<(), TakeoverError> {
        lock_life(&self.life).grace = grace;
        let life = self.life.clone();
        let entries = self.entries.clone();
        let path = self.path.clone();
        let on_release = self.on_release.clone();
        std::thread::Builder::new()
            .name("holder-grace".into())
            .spawn(move || loop {
                // Decided and marked under one lock, so that an `attach` either comes first
                // (and keeps everything) or is refused (and its daemon starts a new holder).
                let expired = {
                    let mut l = lock_life(&life);
                    let expired = !l.released
                        && l.attached == 0
                        && !l.grace.is_zero()
                        && l.unattached_since.elapsed() >= l.grace;
                    l.released |= expired;
                    expired
                };
                if expired {
                    let grace = lock_life(&life).grace;
                    let n = lock_entries(&entries).len();
                    tracing::warn!(
                        held = n,
                        "no beam-snapshotter has served the held connections for {:.0} s (the \
                         takeover grace period): releasing them, readers of those mounts now \
                         get errors instead of waiting",
                        grace.as_secs_f64()
                    );
                    release_all(&entries, &life, &path);
                    on_release();
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            })
            .map_err(|e| TakeoverError::io("starting the holder's grace thread", e))?;
        Ok(())
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
            let life = self.life.clone();
            let path = self.path.clone();
            let on_release = self.on_release.clone();
            let spawned = std::thread::Builder::new()
                .name("holder-conn".into())
                .spawn(move || {
                    let mut attached = false;
                    let shared = Shared {
                        entries: &entries,
                        life: &life,
                        socket: &path,
                        on_release: &on_release,
                    };
                    let r = serve_connection(conn.as_fd(), &shared, &mut attached);
                    if attached {
                        let mut l = lock_life(&life);
                        l.attached -= 1;
                        if l.attached == 0 {
                            l.unattached_since = Instant::now();
                            tracing::info!(
                                "the serving daemon went away; held connections wait {:.0} s \
                                 for a successor",
                                l.grace.as_secs_f64()
                            );
                        }
                    }
                    if let Err(e) = r {
                        tracing::warn!("holder connection: {e}");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("holder: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Run a holder on `socket_path` until killed, or until no daemon has been attached for
/// `grace` (zero: never). This is all the holder process does.
pub fn run_holder(socket_path: &Path, grace: Duration) -> Result<(), TakeoverError> {
    let holder = Holder::bind(socket_path)?;
    holder.start_watchdog(grace)?;
    tracing::info!(
        socket = %socket_path.display(),
        grace_secs = grace.as_secs_f64(),
        "fd holder listening"
    );
    holder.serve()
}

fn lock_life(life: &Lives) -> std::sync::MutexGuard<'_, Life> {
    life.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_entries(
    entries: &Entries,
) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, OwnedFd)>> {
    entries.lock().unwrap_or_else(|p| p.into_inner())
}

/// Let go of every held connection: close its fd (the kernel aborts a connection whose last
/// `/dev/fuse` fd closes, failing its waiting requests with ENOTCONN), detach its mountpoint,
/// and remove the socket so no daemon finds a holder that is on its way out.
fn release_all(entries: &Entries, life: &Lives, socket: &Path) {
    lock_life(life).released = true;
    let _ = std::fs::remove_file(socket);
    let all = std::mem::take(&mut *lock_entries(entries));
    for (name, (state, fd)) in all {
        drop(fd);
        let mountpoint = proto::decode_state(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("mountpoint")?.as_str().map(PathBuf::from));
        match mountpoint {
            Some(mp) => match nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => {
                    tracing::info!(entry = %name, mountpoint = %mp.display(), "released and detached")
                }
                Err(nix::Error::EINVAL | nix::Error::ENOENT) => {
                    tracing::info!(entry = %name, "released (no longer mounted)")
                }
                Err(e) => {
                    tracing::warn!(entry = %name, mountpoint = %mp.display(), "released; detaching failed: {e}")
                }
            },
            None => tracing::info!(entry = %name, "released (no mountpoint recorded)"),
        }
    }
}

/// What every connection of one holder shares.
struct Shared<'a> {
    entries: &'a Entries,
    life: &'a Lives,
    socket: &'a Path,
    on_release: &'a OnRelease,
}

fn serve_connection(
    conn: BorrowedFd<'_>,
    shared: &Shared<'_>,
    attached: &mut bool,
) -> Result<(), TakeoverError> {
    let Shared {
        entries,
        life,
        socket,
        on_release,
    } = *shared;
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
            (Message::Attach { grace_ms }, None) => {
                let refused = {
                    let mut l = lock_life(life);
                    if !l.released && !*attached {
                        l.attached += 1;
                        l.grace = Duration::from_millis(grace_ms);
                        *attached = true;
                    }
                    l.released
                };
                let reply = if refused {
                    Message::Error {
                        message: RELEASING.into(),
                    }
                } else {
                    Message::Ok
                };
                proto::send(conn, &reply, None)?;
            }
            (Message::Release, None) => {
                let n = lock_entries(entries).len();
                tracing::info!(held = n, "asked to release everything (a real stop)");
                release_all(entries, life, socket);
                proto::send(conn, &Message::Ok, None)?;
                on_release();
                return Ok(());
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

    /// Declare this connection the serving daemon's: while it stays open the holder keeps
    /// everything; once no such connection has been open for `grace` it lets go (zero: never).
    /// Keep the client alive for the daemon's lifetime.
    pub fn attach(&self, grace: Duration) -> Result<(), TakeoverError> {
        let msg = Message::Attach {
            grace_ms: grace.as_millis().min(u64::MAX as u128) as u64,
        };
        Self::expect_ok(self.call(&msg, None)?)
    }

    /// Have the holder let go of every connection now (readers fail, mounts are detached)
    /// and exit: a real stop.
    pub fn release(&self) -> Result<(), TakeoverError> {
        Self::expect_ok(self.call(&Message::Release, None)?)
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
