//! A beam-snapshotter started by a test: its own root, socket and log in a short temporary
//! directory, stopped by PID on drop; [`BeamDaemon::stop`] also checks it left no mount.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::util::{self, ChildGuard};

/// A running beam-snapshotter.
pub struct BeamDaemon {
    child: ChildGuard,
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

    /// Lazy layers mounted now (from `beam status`).
    pub fn lazy_layers(&self) -> Result<usize> {
        Ok(self.status()?["layers"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0))
    }

    /// Stops the daemon (SIGTERM) and checks it left no mount under its root.
    pub fn stop(mut self) -> Result<()> {
        self.child.stop(Duration::from_secs(10));
        let left = util::mounts_under(&self.root)?;
        ensure!(
            left.is_empty(),
            "mounts left under the daemon root: {left:?}"
        );
        Ok(())
    }
}
