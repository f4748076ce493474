//! A beam-snapshotter started by a test: its own root, socket and log in a short temporary
//! directory, with the defaults a user gets (takeover on, so the daemon starts an fd holder).
//! Dropping it kills the daemon and its fd holder by PID and unmounts what they left;
//! [`BeamDaemon::stop`] stops both the documented way (`beam-snapshotter --stop`) and checks
//! that nothing is left.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::util::{self, ChildGuard};

/// A running beam-snapshotter.
pub struct BeamDaemon {
    child: ChildGuard,
    /// Kills the fd holder (after the daemon: fields drop in order).
    _holder: HolderGuard,
    socket: PathBuf,
    root: PathBuf,
    log: PathBuf,
    _unmount: util::UnmountOnDrop,
    _dir: tempfile::TempDir,
}

impl BeamDaemon {
    /// Starts beam-snapshotter with `args` (besides `--root` and `--address`) and waits until
    /// it listens.
    pub fn start(args: &[&str]) -> Result<BeamDaemon> {
        let dir = util::short_tempdir()?;
        let socket = dir.path().join("beam.sock");
        let root = dir.path().join("root");
        let log = dir.path().join("daemon.log");
        let (out, err) = util::log_stdio(&log)?;
        let mut cmd = Command::new(util::cargo_bin("beam-snapshotter")?);
        cmd.arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(&socket)
            .args(args)
            .env("BEAM_LOG", "info,fuser=warn")
            .stdout(out)
            .stderr(err);
        let child = ChildGuard::spawn("beam-snapshotter", &mut cmd)?;
        // Connectable, not just present: the socket file appears at bind(), a moment before
        // listen().
        ensure!(
            util::wait_for(
                || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
                Duration::from_secs(30)
            ),
            "beam-snapshotter did not start: {}",
            util::tail_file(&log, 30)
        );
        Ok(BeamDaemon {
            child,
            _holder: HolderGuard(root.clone()),
            socket,
            _unmount: util::UnmountOnDrop(root.clone()),
            root,
            log,
            _dir: dir,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        util::tail_file(&self.log, 100_000)
    }

    /// A `[proxy_plugins.beam]` section for containerd's config (version 2 or 3).
    pub fn containerd_config(&self) -> String {
        format!(
            "[proxy_plugins]\n  [proxy_plugins.beam]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            self.socket.display()
        )
    }

    /// `beam status --json` of this daemon.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = crate::beam::ok(&[
            "status",
            "--json",
            "--address",
            self.socket.to_str().context("socket path is not UTF-8")?,
        ])?;
        serde_json::from_str(&out).with_context(|| format!("beam status printed {out}"))
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|s| s.is_none())
    }

    /// Lazy layers mounted now (from `beam status`).
    pub fn lazy_layers(&self) -> Result<usize> {
        Ok(self.status()?["layers"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0))
    }

    /// The fd holder's PID, once the daemon started one (takeover on).
    pub fn holder_pid(&self) -> Option<u32> {
        holder_pid(&self.root)
    }

    /// Stops the daemon for good as an operator does (`beam-snapshotter --stop --root ROOT`:
    /// SIGTERM, then the fd holder lets the lazy layers go) and checks that the daemon and
    /// holder are gone and no mount is left under its root.
    pub fn stop(mut self) -> Result<()> {
        let holder = self.holder_pid();
        stop_for_good(&self.root)?;
        ensure!(
            util::wait_for(
                || matches!(self.child.try_wait(), Ok(Some(_))),
                Duration::from_secs(10)
            ),
            "the daemon still runs after --stop"
        );
        if let Some(pid) = holder {
            ensure!(
                util::wait_for(|| !util::pid_alive(pid), Duration::from_secs(10)),
                "the fd holder (pid {pid}) still runs after --stop"
            );
        }
        self.child.stop(Duration::from_secs(1));
        let left = util::mounts_under(&self.root)?;
        ensure!(
            left.is_empty(),
            "mounts left under the daemon root: {left:?}"
        );
        Ok(())
    }
}

/// `beam-snapshotter --root ROOT --stop` (the daemon on ROOT and its fd holder, for good);
/// what it printed.
pub fn stop_for_good(root: &Path) -> Result<String> {
    let out = Command::new(util::cargo_bin("beam-snapshotter")?)
        .arg("--root")
        .arg(root)
        .arg("--stop")
        .output()?;
    ensure!(
        out.status.success(),
        "beam-snapshotter --stop failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn holder_pid(root: &Path) -> Option<u32> {
    std::fs::read_to_string(root.join("holder.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Kills the fd holder a daemon on ROOT started (PID in ROOT/holder.pid) on drop: with
/// takeover on (the default) a daemon leaves one behind, which would otherwise keep the test's
/// layers for the grace period. Drop it after the daemon.
pub struct HolderGuard(PathBuf);

impl HolderGuard {
    pub fn new(root: &Path) -> HolderGuard {
        HolderGuard(root.to_path_buf())
    }
}

impl Drop for HolderGuard {
    fn drop(&mut self) {
        if let Some(pid) = holder_pid(&self.0) {
            // Only the holder itself: the PID may be stale and reused by now.
            let is_holder = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--fd-holder"));
            if is_holder && util::pid_alive(pid) && !util::kill_pids(&[pid]).is_empty() {
                eprintln!("cleanup: fd holder {pid} did not die");
            }
        }
    }
}
