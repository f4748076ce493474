//! Running Beam's own binaries from tests: `beam` commands, and `beam mount` as a guarded
//! background process that is stopped by PID (SIGTERM, then SIGKILL) and whose mounts are
//! removed even when a test fails.

use crate::util;
use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run `beam ARGS` to completion.
pub fn run(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(util::cargo_bin("beam")?);
    cmd.args(args).env("BEAM_LOG", "info");
    util::output_with_timeout(&mut cmd, Duration::from_secs(900))
}

/// Run `beam ARGS`, failing with its output unless it succeeds; returns stdout.
pub fn ok(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    ensure!(
        out.status.success(),
        "beam {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `beam pull --address CONTAINERD --namespace NS --plain-http [--json] IMAGE`, to completion.
pub fn pull(c: &crate::Containerd, image: &str, json: bool) -> Result<Output> {
    pull_with(c, image, if json { &["--json"] } else { &[] })
}

/// `beam pull --address CONTAINERD --namespace NS --plain-http FLAGS IMAGE`, to completion.
pub fn pull_with(c: &crate::Containerd, image: &str, flags: &[&str]) -> Result<Output> {
    let mut args = vec![
        "pull",
        "--address",
        c.address()
            .to_str()
            .context("containerd socket path is not UTF-8")?,
        "--namespace",
        c.namespace(),
        "--plain-http",
    ];
    args.extend_from_slice(flags);
    args.push(image);
    run(&args)
}

/// `beam doctor` against containerd `c` (its config file and socket) and the daemon on
/// `beam_socket`: (success, stdout).
pub fn doctor(c: &crate::Containerd, beam_socket: &Path) -> Result<(bool, String)> {
    let out = run(&[
        "doctor",
        "--containerd-config",
        c.config_path().to_str().context("utf-8")?,
        "--address",
        c.address().to_str().context("utf-8")?,
        "--beam-address",
        beam_socket.to_str().context("utf-8")?,
    ])?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Whether `path` is a mountpoint (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    util::mount_points()
        .map(|m| m.contains(&canon))
        .unwrap_or(false)
}

/// A running `beam mount`.
pub struct BeamMount {
    child: Option<Child>,
    pub target: PathBuf,
    pub work_dir: PathBuf,
    log: PathBuf,
    out: PathBuf,
}

impl BeamMount {
    /// Start `beam mount --cache-dir CACHE --work-dir WORK [FLAGS] IMAGE TARGET` and wait until
    /// it says it has mounted (or fails).
    pub fn start(
        flags: &[&str],
        image: &str,
        target: &Path,
        cache: &Path,
        work: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(target)?;
        std::fs::create_dir_all(work)?;
        let log = work.with_extension("stderr");
        let out = work.with_extension("stdout");
        let mut cmd = Command::new(util::cargo_bin("beam")?);
        cmd.arg("mount")
            .arg("--cache-dir")
            .arg(cache)
            .arg("--work-dir")
            .arg(work)
            .args(flags)
            .arg(image)
            .arg(target)
            .env("BEAM_LOG", "info,fuser=warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&log)?);
        let child = cmd.spawn().context("starting beam mount")?;
        let mut m = BeamMount {
            child: Some(child),
            target: target.to_path_buf(),
            work_dir: work.to_path_buf(),
            log,
            out,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let said = std::fs::read_to_string(&m.out).unwrap_or_default();
            if said.contains("mounted ") {
                break;
            }
            if let Some(status) = m.child.as_mut().expect("child").try_wait()? {
                bail!("beam mount exited ({status}): {}", m.stderr());
            }
            if Instant::now() > deadline {
                bail!("beam mount did not mount within 120 s: {}", m.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ensure!(
            is_mountpoint(target),
            "beam mount said it mounted, but {} is no mountpoint",
            target.display()
        );
        Ok(m)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// What the daemon logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, wait for a clean exit, and check that nothing stays mounted. Returns stderr.
    pub fn stop(mut self) -> Result<String> {
        let mut child = self.child.take().expect("running");
        util::signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "beam mount did not stop within 30 s of SIGTERM: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            status.success(),
            "beam mount exited with {status}: {}",
            self.stderr()
        );
        ensure!(
            !is_mountpoint(&self.target),
            "{} is still mounted",
            self.target.display()
        );
        let left = util::mounts_under(&self.work_dir)?;
        ensure!(left.is_empty(), "mounts left under the work dir: {left:?}");
        Ok(self.stderr())
    }
}

impl Drop for BeamMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            util::signal(child.id(), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Last resort, for a daemon that died without unmounting.
        let _ = util::unmount_all_under(&self.target);
        if is_mountpoint(&self.target) {
            let _ = util::umount_detach(&self.target);
        }
        let _ = util::unmount_all_under(&self.work_dir);
    }
}
