//! Tests of the holder protocol and of session takeover.
//!
//! The end-to-end tests need root and /dev/fuse (they skip with a message otherwise) and use real
//! processes: the holder and each FUSE server are this test binary re-executed with
//! `BEAM_TAKEOVER_ROLE` set, running only [`child_entry`]. The test process itself only reads
//! through the mount, so killing a server is a real crash from the kernel's point of view.
//!
//! Successors are started *before* the kill and wait on a FIFO: the test process must not
//! spawn (vfork + exec) while one of its own threads is blocked in a request on the mount. The
//! exec then blocks on the parent's mm and the successor that would answer the request never
//! runs (observed here: execve never returned). A real daemon and its containers are different
//! processes; the lesson for the daemon is the usual one: never touch your own mounts.

use super::holder::Holder;
use super::proto::{self, Message};
use super::*;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEntry, ReplyOpen,
    Request,
};
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

const ROLE_ENV: &str = "BEAM_TAKEOVER_ROLE";
const MNT_ENV: &str = "BEAM_TAKEOVER_MNT";
const SOCK_ENV: &str = "BEAM_TAKEOVER_SOCK";
const READY_ENV: &str = "BEAM_TAKEOVER_READY";
const ENTRY: &str = "hello";
const PARK_ENV: &str = "BEAM_TAKEOVER_PARK";
const GO_ENV: &str = "BEAM_TAKEOVER_GO";
const HELLO_INO: u64 = 2;
/// A file whose reads a server started with `BEAM_TAKEOVER_PARK` reads but never answers.
const SLOW_INO: u64 = 3;

// ---------------------------------------------------------------------------------------------
// Without root.

#[test]
fn init_request_layout() {
    let p = InitParams {
        major: 7,
        minor: 41,
        flags: (1 << 39) | (1 << 37) | 1,
        max_readahead: 131072,
    };
    assert!(p.has_resend());
    let b = p.init_request(9);
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    assert_eq!(b.len(), 104);
    assert_eq!(u32_at(0), 104, "len");
    assert_eq!(u32_at(4), 26, "opcode FUSE_INIT");
    assert_eq!(
        u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")),
        9,
        "unique"
    );
    assert_eq!((u32_at(40), u32_at(44), u32_at(48)), (7, 41, 131072));
    assert_eq!(u32_at(52), 1 | (1 << 30), "flags with FUSE_INIT_EXT");
    assert_eq!(u32_at(56), (1 << 7) | (1 << 5), "flags2");
    assert!(b[60..].iter().all(|&x| x == 0));

    let old = InitParams {
        minor: 31,
        flags: 1,
        ..p
    };
    assert_eq!(old.init_request(1).len(), 40 + 16);
    assert!(!old.has_resend());
}

#[test]
fn messages_carry_a_version() {
    let m = Message::Put {
        name: "a".into(),
        state: proto::encode_state(b"{\"x\":1}"),
    };
    let bytes = proto::encode(&m).expect("encode");
    let text = String::from_utf8(bytes.clone()).expect("utf8");
    assert!(
        text.contains("\"v\":1") && text.contains("\"op\":\"put\""),
        "{text}"
    );
    assert_eq!(proto::decode(&bytes).expect("decode"), m);
    assert_eq!(
        proto::decode(br#"{"v":1,"op":"list"}"#).expect("list"),
        Message::List
    );
    assert!(matches!(
        proto::decode(br#"{"v":2,"op":"list"}"#),
        Err(TakeoverError::Version { got: 2, want: 1 })
    ));
    assert!(proto::decode(br#"{"op":"list"}"#).is_err());
    assert!(proto::decode(br#"{"v":1,"op":"nope"}"#).is_err());
}

fn start_holder_thread(dir: &Path) -> PathBuf {
    let sock = dir.join("holder.sock");
    let holder = Holder::bind(&sock).expect("bind holder");
    std::thread::spawn(move || {
        if let Err(e) = holder.serve() {
            eprintln!("holder: {e}");
        }
    });
    sock
}

#[test]
fn holder_put_list_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = start_holder_thread(dir.path());
    let mode = std::fs::metadata(&sock).expect("socket").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // A second holder on the same path is refused.
    assert!(matches!(
        Holder::bind(&sock),
        Err(TakeoverError::AlreadyRunning(_))
    ));

    let client = HolderClient::connect(&sock).expect("connect");
    assert_eq!(client.ping().expect("ping"), proto::PROTOCOL_VERSION);

    let mut a = tempfile::tempfile().expect("tempfile");
    a.write_all(b"first").expect("write");
    let b = tempfile::tempfile().expect("tempfile");
    client.put("a", &a, b"{\"n\":1}").expect("put a");
    client.put("b", &b, b"{\"n\":2}").expect("put b");
    // Replacing keeps one entry per name.
    client.put("b", &a, b"{\"n\":3}").expect("replace b");
    drop(a);

    // From another connection, as a successor daemon would.
    let other = HolderClient::connect(&sock).expect("connect again");
    let list = other.list().expect("list");
    let names: Vec<_> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(list[0].state, b"{\"n\":1}");
    assert_eq!(list[1].state, b"{\"n\":3}");
    // The listed fd is the same open file (shared offset and content).
    let mut f = std::fs::File::from(list[0].fd.try_clone().expect("dup"));
    f.seek(SeekFrom::Start(0)).expect("seek");
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read");
    assert_eq!(s, "first");

    other.drop_entry("a").expect("drop a");
    other
        .drop_entry("missing")
        .expect("dropping a missing entry is fine");
    let names: Vec<_> = client
        .list()
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["b"]);
}

#[test]
fn holder_rejects_bad_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = start_holder_thread(dir.path());
    let client = HolderClient::connect(&sock).expect("connect");
    // put without an fd is refused; the connection stays usable.
    let put = Message::Put {
        name: "x".into(),
        state: String::new(),
    };
    proto::send(client.as_fd(), &put, None).expect("send");
    assert!(matches!(
        proto::recv(client.as_fd()).expect("recv"),
        Some((Message::Error { .. }, None))
    ));
    assert!(client.list().expect("list").is_empty());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("holder.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists());
    let sock = start_holder_thread(dir.path());
    HolderClient::connect(&sock)
        .expect("connect")
        .ping()
        .expect("ping");
}

#[test]
fn take_over_refuses_a_non_fuse_fd() {
    let f = tempfile::tempfile().expect("tempfile");
    let p = InitParams {
        major: 7,
        minor: 40,
        flags: 0,
        max_readahead: 4096,
    };
    let r = take_over(HelloFs::default(), f.into(), &p, fuser::Config::default());
    assert!(matches!(r, Err(TakeoverError::Protocol(_))));
}

// ---------------------------------------------------------------------------------------------
// The test filesystem: one file, stable inode numbers, stateless file handles.

fn content() -> Vec<u8> {
    (0..300 * 1024u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect()
}

#[derive(Default)]
struct HelloFs {
    data: Vec<u8>,
    recorded: Arc<Mutex<Option<InitParams>>>,
    /// When set: reads of `slow` create this file and then hang (a request read, unanswered).
    park: Option<PathBuf>,
}

impl HelloFs {
    fn new(recorded: Arc<Mutex<Option<InitParams>>>) -> HelloFs {
        HelloFs {
            data: content(),
            recorded,
            park: std::env::var_os(PARK_ENV).map(PathBuf::from),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            1 => (FileType::Directory, 0o755, 0, 2),
            HELLO_INO | SLOW_INO => (FileType::RegularFile, 0o644, self.data.len() as u64, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

/// No caching of names or attributes: every open goes to the server (more requests in flight
/// at the moment of a kill).
const TTL: Duration = Duration::ZERO;

impl Filesystem for HelloFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let p = InitParams::capture(config);
        *self.recorded.lock().expect("recorded lock") = Some(p);
        let _ = config.set_max_readahead(64 * 1024);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0, name.to_str()) {
            (1, Some("hello")) => reply.entry(
                &TTL,
                &self.attr(HELLO_INO).expect("hello attr"),
                Generation(0),
            ),
            (1, Some("slow")) => reply.entry(
                &TTL,
                &self.attr(SLOW_INO).expect("slow attr"),
                Generation(0),
            ),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == HELLO_INO || ino.0 == SLOW_INO {
            // Direct I/O: no page cache, every read is a request to the server.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == SLOW_INO {
            if let Some(park) = &self.park {
                let _ = std::fs::write(park, b"parked");
                std::thread::sleep(Duration::from_secs(3600));
            }
        } else if ino.0 != HELLO_INO {
            return reply.error(Errno::EISDIR);
        }
        let start = (offset as usize).min(self.data.len());
        let end = (start + size as usize).min(self.data.len());
        reply.data(&self.data[start..end]);
    }
}

// ---------------------------------------------------------------------------------------------
// Child roles.

/// Entry point of re-executed children; a no-op in a normal test run.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let code = match run_role(&role) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("takeover test child {role}: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("{name} not set"))
}

fn fuse_config() -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        MountOption::FSName("beam-takeover-test".into()),
        MountOption::RO,
    ];
    c.n_threads = Some(2);
    c.clone_fd = false;
    c
}

fn run_role(role: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let wait_for_go = || -> anyhow::Result<()> {
        if let Ok(go) = env_path(GO_ENV) {
            // Blocks until the test opens the FIFO for writing.
            drop(std::fs::File::open(&go).context("waiting on the go FIFO")?);
        }
        Ok(())
    };
    match role {
        "holder" => {
            wait_for_go()?;
            Ok(run_holder(&env_path(SOCK_ENV)?, std::time::Duration::ZERO)?)
        }
        "server" => {
            let mnt = env_path(MNT_ENV)?;
            let recorded = Arc::new(Mutex::new(None));
            let fs = HelloFs::new(recorded.clone());
            wait_for_go()?;
            let session = fuser::Session::new(fs, &mnt, &fuse_config()).context("mounting")?;
            if let Ok(sock) = env_path(SOCK_ENV) {
                let params = recorded
                    .lock()
                    .expect("recorded lock")
                    .take()
                    .context("init did not record the INIT parameters")?;
                let state = serde_json::to_vec(&params)?;
                HolderClient::connect(&sock)?.put(ENTRY, session.as_fd(), &state)?;
            }
            std::fs::write(env_path(READY_ENV)?, b"ready")?;
            session.run().context("serving")?;
            Ok(())
        }
        "takeover" => {
            let sock = env_path(SOCK_ENV)?;
            let recorded = Arc::new(Mutex::new(None));
            let fs = HelloFs::new(recorded.clone());
            wait_for_go()?;
            let entry = HolderClient::connect(&sock)?
                .list()?
                .into_iter()
                .find(|e| e.name == ENTRY)
                .context("the holder has no entry")?;
            let params: InitParams = serde_json::from_slice(&entry.state)?;
            let session = take_over(fs, entry.fd, &params, fuse_config())?;
            // The replayed handshake showed init the same offer.
            let seen = recorded.lock().expect("recorded lock").take();
            anyhow::ensure!(seen == Some(params), "init saw {seen:?}, saved {params:?}");
            std::fs::write(env_path(READY_ENV)?, b"ready")?;
            session.run().context("serving")?;
            Ok(())
        }
        other => anyhow::bail!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The end-to-end tests.

fn can_run_fuse() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root (mounts FUSE)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: no /dev/fuse");
        return false;
    }
    true
}

/// Kills every child by PID and lazily unmounts, also when a test fails.
#[derive(Default)]
struct Cleanup {
    children: Vec<(String, Child)>,
    /// Children started so far (names their ready files).
    started: usize,
    mounts: Vec<PathBuf>,
}

impl Cleanup {
    fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|(_, c)| c.id() == pid) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Killing every holder of the connection's fds aborts it: a reader stuck on it wakes.
        for (_, c) in &mut self.children {
            let _ = c.kill();
        }
        for (_, c) in &mut self.children {
            let _ = c.wait();
        }
        for m in &self.mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

struct Env {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    sock: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mountpoint");
        let sock = dir.path().join("holder.sock");
        Env { dir, mnt, sock }
    }

    /// Start a child in `role` (with the holder socket if `holder`) and wait until it says it
    /// is ready (servers) or answers pings (holder). Returns its PID.
    fn spawn(&self, cleanup: &mut Cleanup, role: &str, holder: bool) -> u32 {
        let child = self.start(cleanup, role, holder, None, None);
        self.wait_ready(cleanup, &child);
        child.pid
    }

    /// Start a child; with `go`, it waits until [`Env::release`] before doing anything.
    fn start(
        &self,
        cleanup: &mut Cleanup,
        role: &str,
        holder: bool,
        park: Option<&Path>,
        go: Option<&Path>,
    ) -> Started {
        let ready = self
            .dir
            .path()
            .join(format!("ready-{role}-{}", cleanup.started));
        cleanup.started += 1;
        let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
        cmd.args([
            "--exact",
            "takeover::tests::child_entry",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(ROLE_ENV, role)
        .env(MNT_ENV, &self.mnt)
        .env(READY_ENV, &ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        if holder {
            cmd.env(SOCK_ENV, &self.sock);
        }
        if let Some(p) = park {
            cmd.env(PARK_ENV, p);
        }
        if let Some(g) = go {
            cmd.env(GO_ENV, g);
        }
        let child = cmd.spawn().expect("spawn child");
        let pid = child.id();
        cleanup.children.push((role.to_owned(), child));
        Started {
            role: role.to_owned(),
            pid,
            ready,
        }
    }

    fn wait_ready(&self, cleanup: &mut Cleanup, child: &Started) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = if child.role == "holder" {
                HolderClient::connect(&self.sock)
                    .and_then(|c| c.ping())
                    .is_ok()
            } else {
                child.ready.exists()
            };
            if up {
                return;
            }
            if let Some((_, c)) = cleanup
                .children
                .iter_mut()
                .find(|(_, c)| c.id() == child.pid)
            {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("{} exited before it was ready: {status}", child.role);
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready in 20 s",
                child.role
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A FIFO a child started with it waits on.
    fn go_fifo(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        p
    }

    /// Let a child waiting on `go` proceed (non-blocking open: ENXIO until it has opened it).
    fn release(go: &Path) {
        use std::os::unix::fs::OpenOptionsExt;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(go)
            {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    assert!(
                        Instant::now() < deadline,
                        "nobody waits on {}",
                        go.display()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("opening {}: {e}", go.display()),
            }
        }
    }
}

struct Started {
    role: String,
    pid: u32,
    ready: PathBuf,
}

#[derive(Default)]
struct Stats {
    reads: u64,
    errors: u64,
    first_errors: Vec<String>,
    /// Longest single iteration since the last reset.
    max: Duration,
}

/// Reads the file in a loop, by path (lookup + open + reads + release) and through one file
/// opened once at the start (its handle must survive the takeovers), until `stop`.
fn start_reader(
    path: PathBuf,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<Stats>>,
) -> std::thread::JoinHandle<()> {
    let want = content();
    let kept = std::fs::File::open(&path).expect("open hello");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            let by_path = std::fs::read(&path).and_then(|got| {
                if got == want {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "wrong content ({} bytes)",
                        got.len()
                    )))
                }
            });
            let off = (i * 4096) % (want.len() as u64 - buf.len() as u64);
            let kept_read = kept.read_exact_at(&mut buf, off).and_then(|()| {
                if buf[..] == want[off as usize..off as usize + buf.len()] {
                    Ok(())
                } else {
                    Err(std::io::Error::other("wrong content via the kept fd"))
                }
            });
            let took = t0.elapsed();
            i += 1;
            let failed = by_path.is_err() || kept_read.is_err();
            let mut s = stats.lock().expect("stats lock");
            s.reads += 1;
            s.max = s.max.max(took);
            for e in [by_path.err(), kept_read.err()].into_iter().flatten() {
                s.errors += 1;
                if s.first_errors.len() < 5 {
                    s.first_errors.push(e.to_string());
                }
            }
            drop(s);
            if failed {
                // Do not spin on a dead mount.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })
}

fn reset_max(stats: &Mutex<Stats>) -> Duration {
    std::mem::take(&mut stats.lock().expect("stats lock").max)
}

/// Kill/takeover cycles.
const CYCLES: usize = 20;

#[test]
fn takeover_survives_kill_9() {
    if !can_run_fuse() {
        return;
    }
    let env = Env::new();
    let mut cleanup = Cleanup::default();
    env.spawn(&mut cleanup, "holder", true);
    let mut server = env.spawn(&mut cleanup, "server", true);
    cleanup.mounts.push(env.mnt.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let reader = start_reader(env.mnt.join("hello"), stop.clone(), stats.clone());
    std::thread::sleep(Duration::from_millis(300));
    let baseline = reset_max(&stats);

    let mut stalls = Vec::new();
    for cycle in 0..CYCLES {
        let go = env.go_fifo(&format!("go-{cycle}"));
        let next = env.start(&mut cleanup, "takeover", true, None, Some(&go));
        let reads_before = stats.lock().expect("stats").reads;
        cleanup.kill(server); // SIGKILL, then reaped
        let killed = Instant::now();
        Env::release(&go);
        env.wait_ready(&mut cleanup, &next);
        let ready = killed.elapsed();
        server = next.pid;
        // Let the reader run on the new server, and make sure it does.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.lock().expect("stats").reads < reads_before + 50 {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: reads stalled after the takeover"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        let stall = reset_max(&stats);
        eprintln!(
            "cycle {cycle}: successor ready {:.1} ms after the kill; longest read iteration {:.1} ms",
            ready.as_secs_f64() * 1e3,
            stall.as_secs_f64() * 1e3
        );
        stalls.push(stall);
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader thread");
    let s = stats.lock().expect("stats");
    eprintln!(
        "with holder: {} read iterations, {} errors {:?}; longest iteration before kills {:.1} ms, \
         across takeovers {:.1} ms",
        s.reads,
        s.errors,
        s.first_errors,
        baseline.as_secs_f64() * 1e3,
        stalls.iter().max().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    assert_eq!(
        s.errors, 0,
        "reads failed across takeovers: {:?}",
        s.first_errors
    );
    assert!(s.reads > 50 * CYCLES as u64, "too few reads: {}", s.reads);
}

#[test]
fn without_holder_reads_fail() {
    if !can_run_fuse() {
        return;
    }
    let env = Env::new();
    let mut cleanup = Cleanup::default();
    let server = env.spawn(&mut cleanup, "server", false);
    cleanup.mounts.push(env.mnt.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let reader = start_reader(env.mnt.join("hello"), stop.clone(), stats.clone());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        stats.lock().expect("stats").errors,
        0,
        "reads fail before the kill"
    );
    cleanup.kill(server);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.lock().expect("stats").errors == 0 {
        assert!(
            Instant::now() < deadline,
            "reads kept working without a server"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader thread");
    let s = stats.lock().expect("stats");
    eprintln!(
        "without holder: {} errors after the kill, first: {:?}",
        s.errors, s.first_errors
    );
    let expected = [Errno::ENOTCONN, Errno::ECONNABORTED]
        .map(|e| std::io::Error::from_raw_os_error(e.code()).to_string());
    assert!(
        s.first_errors
            .iter()
            .any(|e| expected.iter().any(|x| e == x)),
        "expected ENOTCONN/ECONNABORTED, got {:?}",
        s.first_errors
    );
}

#[test]
fn recorded_offer_includes_resend_on_new_kernels() {
    // Documents what InitParams captures on this kernel (FUSE_HAS_RESEND needs 6.9+).
    if !can_run_fuse() {
        return;
    }
    let env = Env::new();
    let mut cleanup = Cleanup::default();
    env.spawn(&mut cleanup, "holder", true);
    env.spawn(&mut cleanup, "server", true);
    cleanup.mounts.push(env.mnt.clone());
    let list = HolderClient::connect(&env.sock)
        .expect("connect")
        .list()
        .expect("list");
    let p: InitParams = serde_json::from_slice(&list[0].state).expect("state");
    eprintln!(
        "kernel offered protocol {}.{}, flags {:#x} ({:?}), max_readahead {}",
        p.major,
        p.minor,
        p.flags,
        InitFlags::from_bits_retain(p.flags),
        p.max_readahead
    );
    assert_eq!(p.major, 7);
    assert!(p.max_readahead > 0);
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned());
    eprintln!(
        "kernel {release:?}, FUSE_HAS_RESEND offered: {}",
        p.has_resend()
    );
}

#[test]
fn resend_redelivers_a_request_the_dead_server_read() {
    if !can_run_fuse() {
        return;
    }
    let env = Env::new();
    let mut cleanup = Cleanup::default();
    env.spawn(&mut cleanup, "holder", true);
    let parked = env.dir.path().join("parked");
    let first = env.start(&mut cleanup, "server", true, Some(&parked), None);
    env.wait_ready(&mut cleanup, &first);
    cleanup.mounts.push(env.mnt.clone());
    let go = env.go_fifo("go");
    let next = env.start(&mut cleanup, "takeover", true, None, Some(&go));

    let (tx, rx) = std::sync::mpsc::channel();
    let slow = env.mnt.join("slow");
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(slow));
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !parked.exists() {
        assert!(Instant::now() < deadline, "the server never got the read");
        std::thread::sleep(Duration::from_millis(2));
    }
    // The read request now sits in the kernel's processing list of a server about to die.
    cleanup.kill(first.pid);
    let killed = Instant::now();
    Env::release(&go);
    env.wait_ready(&mut cleanup, &next);
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the read the dead server took was never answered (no resend?)");
    eprintln!(
        "parked read answered {:.1} ms after the kill",
        killed.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(got.expect("read of slow"), content());
}

/// A holder serving on a thread with grace period `grace`, whose release sends on a channel
/// instead of exiting the process.
fn start_holder_with_grace(
    dir: &Path,
    grace: std::time::Duration,
) -> (PathBuf, std::sync::mpsc::Receiver<()>) {
    let sock = dir.join("holder.sock");
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let holder = Holder::bind(&sock)
        .expect("bind holder")
        .on_release(move || {
            let _ = tx.lock().expect("tx").send(());
        });
    holder.start_watchdog(grace).expect("watchdog");
    std::thread::spawn(move || {
        if let Err(e) = holder.serve() {
            eprintln!("holder: {e}");
        }
    });
    (sock, rx)
}

/// A pipe whose write end the holder keeps: once the holder lets go, the read end sees EOF.
fn held_pipe(client: &HolderClient, name: &str) -> std::fs::File {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    client.put(name, &w, b"{}").expect("put");
    drop(w);
    std::fs::File::from(r)
}

fn released(pipe: &mut std::fs::File) -> bool {
    let mut buf = [0u8; 1];
    matches!(pipe.read(&mut buf), Ok(0))
}

#[test]
fn holder_keeps_everything_while_a_daemon_is_attached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grace = std::time::Duration::from_millis(300);
    let (sock, rx) = start_holder_with_grace(dir.path(), grace);
    let daemon = HolderClient::connect(&sock).expect("connect");
    daemon.attach(grace).expect("attach");
    let mut pipe = held_pipe(&daemon, "snapshot-1");
    // Attached for four grace periods: nothing is released.
    assert!(
        rx.recv_timeout(grace * 4).is_err(),
        "released while attached"
    );
    assert_eq!(
        HolderClient::connect(&sock).unwrap().list().unwrap().len(),
        1
    );
    // The daemon goes away: after the grace period everything is let go.
    let gone = std::time::Instant::now();
    drop(daemon);
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("no release after the grace period");
    assert!(
        gone.elapsed() >= grace,
        "released before the grace period ended"
    );
    assert!(released(&mut pipe), "the held fd is still open");
    assert!(!sock.exists(), "a released holder removes its socket");
}

#[test]
fn holder_grace_restarts_when_a_successor_attaches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grace = std::time::Duration::from_millis(400);
    let (sock, rx) = start_holder_with_grace(dir.path(), grace);
    let first = HolderClient::connect(&sock).expect("connect");
    first.attach(grace).expect("attach");
    let _pipe = held_pipe(&first, "snapshot-1");
    drop(first);
    std::thread::sleep(grace / 2);
    // A successor attaches within the grace period and stays: nothing is released.
    let next = HolderClient::connect(&sock).expect("connect");
    next.attach(grace).expect("attach");
    assert!(
        rx.recv_timeout(grace * 3).is_err(),
        "released with a daemon attached"
    );
    drop(next);
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("no release after the successor went away");
}

#[test]
fn holder_release_lets_go_at_once_and_refuses_late_attaches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, rx) = start_holder_with_grace(dir.path(), std::time::Duration::from_secs(3600));
    let daemon = HolderClient::connect(&sock).expect("connect");
    daemon
        .attach(std::time::Duration::from_secs(3600))
        .expect("attach");
    let mut pipe = held_pipe(&daemon, "snapshot-1");
    let late = HolderClient::connect(&sock).expect("connect");
    HolderClient::connect(&sock)
        .expect("connect")
        .release()
        .expect("release");
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("release did not finish");
    assert!(released(&mut pipe), "the held fd is still open");
    // A daemon attaching to a holder on its way out is told so (and starts a new holder).
    match late.attach(std::time::Duration::from_secs(1)) {
        Err(TakeoverError::Refused(m)) => assert_eq!(m, RELEASING),
        other => panic!("attach to a released holder: {other:?}"),
    }
}
