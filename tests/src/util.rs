//! Small helpers shared by the harness: ports, waiting, finding binaries and fixtures,
//! owning child processes, and cleaning up mounts and directories.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it).
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the bound address")?
        .port())
}

/// Polls `cond` every 50 ms until it returns true (then `true`) or `timeout` passes (then `false`).
pub fn wait_for(cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    wait_for_every(cond, timeout, Duration::from_millis(50))
}

/// [`wait_for`] polling every `interval` (short where the wait itself is being timed).
pub fn wait_for_every(
    mut cond: impl FnMut() -> bool,
    timeout: Duration,
    interval: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

/// Polls `cond` every 100 ms until it returns `Ok(true)`; an error after `timeout` names `what`
/// and the last error `cond` returned (a condition that reads files or asks a service).
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The workspace root (parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Finds a binary built by this workspace: `$BEAM_BIN_DIR/NAME` if that variable is set,
/// else `NAME` in `$CARGO_TARGET_DIR` (or `<workspace>/target`) under `debug/` then `release/`.
/// When both profiles have it, the newer file wins.
pub fn cargo_bin(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BEAM_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "BEAM_BIN_DIR is set but {} does not exist (build it, or unset BEAM_BIN_DIR)",
            path.display()
        );
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    };
    let candidates = [
        target.join("debug").join(name),
        target.join("release").join(name),
    ];
    let newest = candidates
        .iter()
        .filter_map(|p| Some((fs::metadata(p).ok()?.modified().ok()?, p)))
        .filter(|(_, p)| p.is_file())
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p.clone());
    newest.with_context(|| {
        format!(
            "binary {name:?} not found at {} or {}; build it first (e.g. `cargo build -p beam`) \
             or set BEAM_BIN_DIR",
            candidates[0].display(),
            candidates[1].display()
        )
    })
}

/// The path of `tests/fixtures/NAME`, checked to exist.
pub fn fixture_script(name: &str) -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    if !path.exists() {
        bail!("fixture {} does not exist", path.display());
    }
    Ok(path)
}

/// Fails (never skips) when the test does not run as root: the harness mounts, runs containerd
/// and runc, all of which need it.
pub fn require_root() -> Result<()> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!("this test must run as root (euid is {euid}): it starts containerd and mounts filesystems");
    }
    Ok(())
}

/// A program path from an environment variable, else `default` found on PATH, else `fallback`.
pub fn tool_path(env_var: &str, default: &str, fallback: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    if let Some(p) = find_on_path(default) {
        return p;
    }
    PathBuf::from(fallback)
}

/// Looks `name` up in `$PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A temporary directory with a short path under /tmp (`/tmp/bct-XXXXXX`), so that unix socket
/// paths inside it stay well below the 108-byte limit.
pub fn short_tempdir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("bct-")
        .tempdir_in("/tmp")
        .context("creating a temporary directory under /tmp")
}

/// The last `lines` lines of a (log) file, or a note saying why it could not be read.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("<cannot read {}: {e}>", path.display()),
    };
    // Only look at the last 64 KiB: enough for any tail we print.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = file.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Opens (creating) a log file in append mode, returning two handles for stdout and stderr.
pub fn log_stdio(path: &Path) -> Result<(Stdio, Stdio)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))?;
    let err = file
        .try_clone()
        .context("duplicating the log file handle")?;
    Ok((Stdio::from(file), Stdio::from(err)))
}

/// A child process that is killed (SIGKILL) and reaped when dropped, even during a panic.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd`, naming it `name` in errors.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(ChildGuard {
            child: Some(child),
            name: name.to_string(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `Some(status)` if the process has already exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c
                .try_wait()
                .with_context(|| format!("checking whether {} exited", self.name)),
            None => Ok(None),
        }
    }

    /// Sends SIGTERM, waits up to `grace` for the process to exit, then SIGKILLs and reaps it.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            signal(child.id(), Signal::SIGTERM);
            let exited = wait_for(|| matches!(child.try_wait(), Ok(Some(_))), grace);
            if !exited {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `sig` to `pid`; errors (e.g. the process is gone) are ignored.
pub fn signal(pid: u32, sig: Signal) {
    // Only one specific process: never 0 (our group) or a negative (another group).
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid > 0 {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
}

/// True while `/proc/PID` exists and the process is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the command name, which is in parentheses and may contain spaces.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// One process as seen in /proc.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// The command line, one entry per argument.
    pub cmdline: Vec<String>,
}

/// Every live process (zombies excluded) with its parent and command line.
pub fn processes() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().unwrap_or("");
        if state == "Z" || state == "X" {
            continue;
        }
        let ppid = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.push(ProcInfo { pid, ppid, cmdline });
    }
    out
}

/// `roots` and all their descendants, children listed before parents (so killing in order
/// never lets a child be reparented to a parent we have not killed yet).
pub fn descendants_first(roots: &[u32], all: &[ProcInfo]) -> Vec<u32> {
    fn visit(pid: u32, all: &[ProcInfo], out: &mut Vec<u32>) {
        if out.contains(&pid) {
            return;
        }
        for child in all.iter().filter(|p| p.ppid == pid) {
            visit(child.pid, all, out);
        }
        out.push(pid);
    }
    let mut out = Vec::new();
    for root in roots {
        visit(*root, all, &mut out);
    }
    out
}

/// SIGKILLs the given processes (which need not be our children) and waits up to 10 s for each
/// to disappear or become a zombie. Returns the ones still alive.
pub fn kill_pids(pids: &[u32]) -> Vec<u32> {
    for pid in pids {
        signal(*pid, Signal::SIGKILL);
    }
    let mut left: Vec<u32> = pids.to_vec();
    wait_for(
        || {
            left.retain(|p| pid_alive(*p));
            left.is_empty()
        },
        Duration::from_secs(10),
    );
    left
}

/// Decodes the octal escapes (`\040` etc.) used in /proc/self/mountinfo.
fn unescape_mount_path(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Every mount point in this process's mount namespace, in mountinfo order.
pub fn mount_points() -> Result<Vec<PathBuf>> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(OsStr::from_bytes(&unescape_mount_path(field))))
        .collect())
}

/// Mount points at or under `dir`, deepest (longest path) first, without duplicates.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    Ok(found)
}

/// Unmounts the topmost mount at `target`, retrying for a second while it is busy (a process
/// that just closed a file there, a FUSE daemon still answering).
pub fn umount(target: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        match umount2(target, MntFlags::empty()) {
            Err(Errno::EBUSY) if tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r.with_context(|| format!("umount {}", target.display())),
        }
    }
}

/// Detaches the mount at `target` (`MNT_DETACH`): gone from the tree at once, released by the
/// kernel when its last user lets go. The last resort of cleanup.
pub fn umount_detach(target: &Path) -> Result<()> {
    umount2(target, MntFlags::MNT_DETACH).with_context(|| format!("umount -l {}", target.display()))
}

/// Unmounts everything mounted at or under `dir`, deepest first. A busy mount is retried for a
/// second and then detached (`MNT_DETACH`). Fails if something is still mounted there afterwards.
pub fn unmount_all_under(dir: &Path) -> Result<()> {
    // Stacked mounts on one point need one umount each; loop until nothing is left.
    for _round in 0..16 {
        let mounts = mounts_under(dir)?;
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            let gone = match umount(&m) {
                Ok(()) => true,
                // Already gone with its parent, or its path was removed.
                Err(e) => matches!(
                    e.downcast_ref::<Errno>(),
                    Some(Errno::EINVAL | Errno::ENOENT)
                ),
            };
            if !gone {
                let _ = umount_detach(&m);
            }
        }
    }
    let left = mounts_under(dir)?;
    if !left.is_empty() {
        bail!("still mounted under {}: {:?}", dir.display(), left);
    }
    Ok(())
}

/// Unmounts everything under `dir` and then removes it. Refuses to remove the directory if a
/// mount is left (removing through a mount would delete the mounted filesystem's content).
pub fn cleanup_dir(dir: &Path) -> Result<()> {
    unmount_all_under(dir)?;
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Runs `cmd` to completion with a time limit, capturing stdout and stderr. On time-out the
/// process is killed and an error returned; a non-zero exit is *not* an error here.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let desc = format!("{:?}", cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {desc}"))?;
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child
            .try_wait()
            .with_context(|| format!("waiting for {desc}"))?
        {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = out_thread.join();
                let err = err_thread.join().unwrap_or_default();
                bail!(
                    "{desc} did not finish within {timeout:?}; killed it. stderr:\n{}",
                    String::from_utf8_lossy(&err)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`output_with_timeout`], but a non-zero exit is an error showing stdout and stderr.
pub fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{:?}", cmd);
    let out = output_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Run `tests/fixtures/NAME ARGS...` with bash (20 minutes at most), failing with its output.
pub fn run_fixture(name: &str, args: &[&Path]) -> Result<()> {
    let mut cmd = Command::new("bash");
    cmd.arg(fixture_script(name)?).args(args);
    run_checked(&mut cmd, Duration::from_secs(1200))?;
    Ok(())
}

/// The layer tars listed in DIR/layers.txt (as the fixture scripts write it), bottom first.
pub fn layers_listed_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let list = std::fs::read_to_string(dir.join("layers.txt"))
        .with_context(|| format!("reading {}/layers.txt", dir.display()))?;
    Ok(list
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let p = PathBuf::from(l.trim());
            if p.is_absolute() {
                p
            } else {
                dir.join(p)
            }
        })
        .collect())
}

/// Write a layer tar of regular files (`path`, contents): root-owned, mode 0644, a fixed
/// mtime, in the order given.
pub fn write_tar(path: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    write_tar_with_mode(path, files, 0o644)
}

/// [`write_tar`] with every file of mode `mode` (e.g. 0755 for programs and libraries).
pub fn write_tar_with_mode(path: &Path, files: &[(String, Vec<u8>)], mode: u32) -> Result<()> {
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, &data[..])
            .with_context(|| format!("adding {name} to {}", path.display()))?;
    }
    b.finish()?;
    Ok(())
}

/// `len` deterministic incompressible bytes: the splitmix64 stream seeded with `seed`. Files of
/// it share no chunk with each other (for any two seeds) and do not compress, so a test can
/// tell from the registry's side exactly which bytes were fetched.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Unmounts everything under a directory when dropped: declare it after the temp dir it
/// guards (so it drops first) and before the processes that mount there (so they are stopped
/// first). Keeps a failing test from leaving mounts behind.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        if let Err(e) = unmount_all_under(&self.0) {
            eprintln!("cleanup: unmounting under {}: {e:#}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().unwrap();
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn wait_for_times_out_and_succeeds() {
        assert!(!wait_for(|| false, Duration::from_millis(120)));
        let mut n = 0;
        assert!(wait_for(
            || {
                n += 1;
                n > 3
            },
            Duration::from_secs(5)
        ));
    }

    #[test]
    fn noise_is_deterministic_distinct_and_incompressible() {
        use std::io::Write;
        let a = noise(1, 100_000);
        assert_eq!(a, noise(1, 100_000));
        assert_eq!(&a[..99], &noise(1, 99)[..]);
        assert_ne!(&a[..4096], &noise(2, 4096)[..]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&a).unwrap();
        assert!(gz.finish().unwrap().len() > a.len());
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(
            unescape_mount_path(r"/a\040b\011c\134d"),
            b"/a b\tc\\d".to_vec()
        );
        assert_eq!(unescape_mount_path(r"/x\04"), br"/x\04".to_vec());
    }

    #[test]
    fn cargo_bin_missing_is_a_clear_error() {
        let err = cargo_bin("no-such-binary-beam-test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-binary-beam-test"), "{err}");
    }

    #[test]
    fn output_with_timeout_kills() {
        let started = Instant::now();
        let err = output_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(300))
            .unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let out = run_checked(
            Command::new("sh").args(["-c", "echo hi"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }

    #[test]
    fn descendants_come_first() {
        let all = vec![
            ProcInfo {
                pid: 10,
                ppid: 1,
                cmdline: vec![],
            },
            ProcInfo {
                pid: 11,
                ppid: 10,
                cmdline: vec![],
            },
            ProcInfo {
                pid: 12,
                ppid: 11,
                cmdline: vec![],
            },
            ProcInfo {
                pid: 13,
                ppid: 10,
                cmdline: vec![],
            },
        ];
        let order = descendants_first(&[10], &all);
        assert_eq!(order.last(), Some(&10));
        let pos = |p| order.iter().position(|x| *x == p).unwrap();
        assert!(pos(12) < pos(11));
        assert_eq!(order.len(), 4);
    }
}
