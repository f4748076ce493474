//! What the takeover tests (issue 7) share: a beam-snapshotter that can be stopped, killed and
//! started again on the same root (and the fd holder it leaves behind, cleaned up by PID), the
//! image the `takeover-reader` workload reads, and the reader's stats.
//!
//! The reader is always a separate process (a container, or a plain child): a process with a
//! descriptor open on a FUSE file must not spawn the daemon's successor, because the child's
//! exec closes that descriptor, sending a FLUSH that nobody answers until the successor runs.

use crate::util::{self, ChildGuard};
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Files of the data layer the reader reads (relative to the image root).
pub const SMALL: &str = "data/small.txt";
pub const BIG: &str = "data/big.bin";
pub const COLD: &str = "data/cold.bin";
/// Where the reader lives in the image.
pub const READER: &str = "/reader/takeover-reader";

/// `takeover-reader`'s small file.
pub fn small() -> Vec<u8> {
    b"read me through a restart\n".repeat(400)
}

/// `takeover-reader`'s pattern, `len` bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// `takeover-reader`'s cold file, `len` bytes: pseudo-random (splitmix64 of `i / 8`), so it
/// shares no chunk with anything and does not compress (the data layer stays too big to be
/// fetched whole while it mounts, and the cold file stays cold).
pub fn cold_pattern(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while out.len() < len {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// The data layer: the small file, a 1 MiB file kept open, a 16 MiB cold file.
pub fn write_data_layer(tar: &Path) -> Result<()> {
    util::write_tar(
        tar,
        &[
            (SMALL.into(), small()),
            (BIG.into(), pattern(1 << 20)),
            (COLD.into(), cold_pattern(16 << 20)),
        ],
    )
}

/// The reader layer: the `takeover-reader` binary this workspace built and the shared
/// libraries `ldd` says it needs, at the same paths (contents, not symlinks), all 0755.
pub fn write_reader_layer(tar: &Path) -> Result<()> {
    let bin = util::cargo_bin("takeover-reader")?;
    let out = Command::new("ldd")
        .arg(&bin)
        .output()
        .context("running ldd")?;
    ensure!(out.status.success(), "ldd {}", bin.display());
    let mut files: Vec<(String, PathBuf)> = vec![(READER.trim_start_matches('/').into(), bin)];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push((p.trim_start_matches('/').into(), PathBuf::from(p)));
        }
    }
    let contents = files
        .iter()
        .map(|(name, src)| {
            let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
            Ok((name.clone(), data))
        })
        .collect::<Result<Vec<_>>>()?;
    util::write_tar_with_mode(tar, &contents, 0o755)
}

/// A beam-snapshotter on a fixed root and socket that the test stops, kills and starts again.
/// On drop: the daemon (by PID), the fd holder it started (PID from ROOT/holder.pid), then
/// every mount under the directory.
pub struct RestartableDaemon {
    daemon: Option<ChildGuard>,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl RestartableDaemon {
    /// Not started yet: see [`RestartableDaemon::start`].
    pub fn new(args: &[&str]) -> Result<RestartableDaemon> {
        util::require_root()?;
        Ok(RestartableDaemon {
            daemon: None,
            dir: util::short_tempdir()?,
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// The arguments of the next start.
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir().join("beam.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir().join("daemon.log")
    }

    /// The last `lines` lines of the daemons' common log.
    pub fn log_tail(&self, lines: usize) -> String {
        util::tail_file(&self.log_path(), lines)
    }

    /// Start the workspace's daemon (none may run). Returns when it listens, which it does
    /// only after taking over (or remounting) its lazy layers.
    pub fn start(&mut self) -> Result<Duration> {
        self.start_binary(&util::cargo_bin("beam-snapshotter")?)
    }

    /// Start `binary` as the daemon (e.g. an upgraded one).
    pub fn start_binary(&mut self, binary: &Path) -> Result<Duration> {
        ensure!(self.daemon.is_none(), "a daemon is running");
        let t0 = Instant::now();
        let (out, err) = util::log_stdio(&self.log_path())?;
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(binary);
        cmd.arg("--root")
            .arg(self.root())
            .arg("--address")
            .arg(&socket)
            .args(&self.args)
            .env("BEAM_LOG", "info,fuser=warn")
            .stdout(out)
            .stderr(err);
        self.daemon = Some(ChildGuard::spawn("beam-snapshotter", &mut cmd)?);
        // Connectable, not just present: the socket file appears at bind(), a moment before
        // listen().
        ensure!(
            poll_fast(
                || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
                Duration::from_secs(30)
            ),
            "beam-snapshotter did not start: {}",
            self.log_tail(30)
        );
        Ok(t0.elapsed())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// SIGTERM, wait for the exit (SIGKILL after 20 s).
    pub fn terminate(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            util::signal(d.pid(), nix::sys::signal::Signal::SIGTERM);
            poll_fast(
                || matches!(d.try_wait(), Ok(Some(_))),
                Duration::from_secs(20),
            );
            // Reaps it (SIGKILL first if it is still there).
            d.kill();
        }
    }

    /// The fd holder's PID, once a daemon started it.
    pub fn holder_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root().join("holder.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The fd holder's log (ROOT/holder.log).
    pub fn holder_log(&self) -> String {
        util::tail_file(&self.root().join("holder.log"), 200)
    }

    /// How many `/dev/fuse` descriptors the fd holder has open.
    pub fn holder_fuse_fds(&self) -> Result<usize> {
        let pid = self.holder_pid().context("no fd holder")?;
        let mut n = 0;
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            if std::fs::read_link(e?.path()).is_ok_and(|t| t == Path::new("/dev/fuse")) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// A `[proxy_plugins.beam]` section for containerd's config.
    pub fn containerd_config(&self) -> String {
        format!(
            "[proxy_plugins]\n  [proxy_plugins.beam]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            self.socket().display()
        )
    }

    /// `beam status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let socket = self.socket();
        let out = crate::beam::ok(&[
            "status",
            "--json",
            "--address",
            socket.to_str().context("socket path is not UTF-8")?,
        ])?;
        serde_json::from_str(&out).with_context(|| format!("beam status printed {out}"))
    }
}

impl Drop for RestartableDaemon {
    fn drop(&mut self) {
        self.kill();
        if let Some(pid) = self.holder_pid() {
            if !util::kill_pids(&[pid]).is_empty() {
                eprintln!("cleanup: fd holder {pid} did not die");
            }
        }
        if let Err(e) = util::unmount_all_under(self.dir.path()) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// `util::wait_for` polling every 2 ms: restarts are timed, and a 50 ms poll would add up to
/// 50 ms to every measured stall.
fn poll_fast(cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    util::wait_for_every(cond, timeout, Duration::from_millis(2))
}

/// What `takeover-reader` reported in OUTDIR/stats.json.
#[derive(Debug, Clone)]
pub struct ReaderStats {
    /// When the reader wrote these stats.
    pub written: SystemTime,
    pub rounds: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub cold_done: Vec<u64>,
    /// Rounds over 2 ms: (end, duration).
    pub slow: Vec<(SystemTime, Duration)>,
}

impl ReaderStats {
    pub fn read(out: &Path) -> Result<ReaderStats> {
        let text = std::fs::read_to_string(out.join("stats.json"))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(ReaderStats {
            written: UNIX_EPOCH + Duration::from_nanos(u("written")),
            rounds: u("rounds"),
            errors: u("errors"),
            first_error: v["first_error"].as_str().map(String::from),
            cold_done: v["cold_done"]
                .as_array()
                .map(|a| a.iter().filter_map(|n| n.as_u64()).collect())
                .unwrap_or_default(),
            slow: v["slow"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| {
                            let end = p.get(0)?.as_u64()?;
                            let d = p.get(1)?.as_u64()?;
                            Some((
                                UNIX_EPOCH + Duration::from_nanos(end),
                                Duration::from_nanos(d),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// One line for error messages.
    pub fn summary(&self) -> String {
        format!(
            "{} rounds, {} errors (first: {:?}), cold reads done {:?}, {} rounds over 2 ms",
            self.rounds,
            self.errors,
            self.first_error,
            self.cold_done,
            self.slow.len()
        )
    }

    /// The longest round that overlapped `[from, to]` (zero when none took over 2 ms).
    pub fn longest_between(&self, from: SystemTime, to: SystemTime) -> Duration {
        self.slow
            .iter()
            .filter(|(end, d)| *end >= from && end.checked_sub(*d).is_some_and(|s| s <= to))
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    }
}

/// Wait until the reader in `out` made `n` more rounds than `since` (false after `timeout`).
pub fn wait_rounds(out: &Path, since: u64, n: u64, timeout: Duration) -> bool {
    util::wait_for(
        || ReaderStats::read(out).is_ok_and(|s| s.rounds >= since + n),
        timeout,
    )
}

/// Wait until the reader made `n` rounds after `since` (false after `timeout`): first a stats
/// snapshot written after `since`, then one with `n` more rounds. (Comparing with a count read
/// before `since` would not do: the reader may have written a larger count in between.)
pub fn wait_progress_after(out: &Path, since: SystemTime, n: u64, timeout: Duration) -> bool {
    let mut base = None;
    util::wait_for_every(
        || {
            let Ok(s) = ReaderStats::read(out) else {
                return false;
            };
            match base {
                None if s.written >= since => base = Some(s.rounds),
                Some(b) => return s.rounds >= b + n,
                None => {}
            }
            false
        },
        timeout,
        Duration::from_millis(5),
    )
}

/// Median and max of `stalls`.
pub fn median_max(stalls: &[Duration]) -> (Duration, Duration) {
    let mut v = stalls.to_vec();
    v.sort();
    let median = v.get(v.len() / 2).copied().unwrap_or_default();
    (median, v.last().copied().unwrap_or_default())
}
