//! beam-snapshotter with a real containerd (Debian's, as a proxy snapshot plugin): the
//! snapshots API semantics through `ctr snapshots`, and containers run on Beam snapshots.

use anyhow::{ensure, Context, Result};
use beam_tests::oci_layout;
use beam_tests::util::{self, ChildGuard};
use beam_tests::{Compression, Containerd, ContainerdOptions, LayerSpec, Registry};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A running beam-snapshotter, stopped by PID on drop.
struct Daemon {
    child: ChildGuard,
    socket: PathBuf,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Result<Daemon> {
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
            .stdout(out)
            .stderr(err);
        let child = ChildGuard::spawn("beam-snapshotter", &mut cmd)?;
        ensure!(
            util::wait_for(|| socket.exists(), Duration::from_secs(20)),
            "beam-snapshotter did not create its socket: {}",
            util::tail_file(&log, 30)
        );
        Ok(Daemon {
            child,
            socket,
            root,
            _dir: dir,
        })
    }

    fn containerd_config(&self) -> String {
        format!(
            "[proxy_plugins]\n  [proxy_plugins.beam]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            self.socket.display()
        )
    }

    fn stop(mut self) -> Result<()> {
        self.child.stop(Duration::from_secs(10));
        let left = util::mounts_under(&self.root)?;
        ensure!(
            left.is_empty(),
            "mounts left under the daemon root: {left:?}"
        );
        Ok(())
    }
}

fn ctr_ok(c: &Containerd, args: &[&str]) -> Result<String> {
    let out = c.ctr(args)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ctr_err(c: &Containerd, args: &[&str]) -> Result<String> {
    let out = c.ctr_unchecked(args, Duration::from_secs(60))?;
    ensure!(!out.status.success(), "ctr {args:?} should have failed");
    Ok(String::from_utf8_lossy(&out.stderr).to_lowercase())
}

#[test]
fn snapshots_api_semantics_through_containerd() -> Result<()> {
    util::require_root()?;
    let d = Daemon::start()?;
    let c = Containerd::start_with(ContainerdOptions {
        extra_config: d.containerd_config(),
        ..Default::default()
    })?;
    let s = |args: &[&str]| -> Vec<String> {
        let mut v = vec![
            "snapshots".to_string(),
            "--snapshotter".into(),
            "beam".into(),
        ];
        v.extend(args.iter().map(|a| a.to_string()));
        v
    };
    let run = |args: &[&str]| -> Result<String> {
        let v = s(args);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        ctr_ok(&c, &refs)
    };
    let fail = |args: &[&str]| -> Result<String> {
        let v = s(args);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        ctr_err(&c, &refs)
    };
    run(&["prepare", "a"])?;
    let mounts = run(&["mounts", "/tmp/x", "a"])?;
    ensure!(
        mounts.contains("bind") && mounts.contains("rw"),
        "mounts of a: {mounts}"
    );
    run(&["commit", "base", "a"])?;
    run(&["prepare", "b", "base"])?;
    let mounts = run(&["mounts", "/tmp/x", "b"])?;
    ensure!(
        mounts.contains("overlay") && mounts.contains("upperdir="),
        "mounts of b: {mounts}"
    );
    run(&["view", "v", "base"])?;
    let ls = run(&["ls"])?;
    for k in ["base", "b", "v"] {
        ensure!(ls.contains(k), "ls lacks {k}: {ls}");
    }
    ensure!(
        ls.contains("Committed") && ls.contains("Active") && ls.contains("View"),
        "{ls}"
    );
    // Labels and update.
    run(&["label", "base", "beam.test=yes"])?;
    let info = run(&["info", "base"])?;
    ensure!(
        info.contains("beam.test") && info.contains("yes"),
        "info: {info}"
    );
    // Errors with the right codes.
    ensure!(fail(&["prepare", "b", "base"])?.contains("already exists"));
    ensure!(fail(&["prepare", "c", "missing-parent"])?.contains("not found"));
    ensure!(
        fail(&["rm", "base"])?.contains("precondition")
            || fail(&["rm", "base"])?.contains("children")
    );
    ensure!(fail(&["info", "nothing"])?.contains("not found"));
    run(&["rm", "b"])?;
    run(&["rm", "v"])?;
    run(&["rm", "base"])?;
    let ls = run(&["ls"])?;
    ensure!(!ls.contains("base"), "base not removed: {ls}");
    drop(c);
    d.stop()
}

#[test]
fn unconverted_image_runs_on_beam_snapshots() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let tar = work.path().join("busybox.tar");
    util::run_fixture("make-busybox-layer.sh", &[&tar])?;
    let layout = work.path().join("layout");
    oci_layout::build(&layout, "v1", &[LayerSpec::new(&tar, Compression::Gzip)])?;
    let reg = Registry::start()?;
    let image = format!("{}/plain/busybox:v1", reg.addr());
    oci_layout::push_with_skopeo(&layout, "v1", &image)?;

    let d = Daemon::start()?;
    let c = Containerd::start_with(ContainerdOptions {
        extra_config: d.containerd_config(),
        ..Default::default()
    })?;
    ctr_ok(
        &c,
        &[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "beam",
            &image,
        ],
    )?;
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &image,
        "bb-beam",
        &["/bin/sh", "-c", "echo hello from beam && ls /etc/passwd"],
    )?;
    ensure!(
        out.contains("hello from beam") && out.contains("/etc/passwd"),
        "container printed {out:?}"
    );
    let ls = ctr_ok(&c, &["snapshots", "--snapshotter", "beam", "ls"])?;
    ensure!(
        ls.contains("Committed"),
        "no committed layer snapshot: {ls}"
    );
    // The image's layer lives in the daemon's root.
    ensure!(
        has_file(&d.root, "busybox")?,
        "the layer was not unpacked into beam's snapshots"
    );
    ctr_ok(&c, &["image", "rm", "--sync", &image])?;
    drop(c);
    d.stop()
}

fn has_file(root: &Path, name: &str) -> Result<bool> {
    let out = Command::new("find")
        .arg(root)
        .args(["-name", name])
        .output()
        .context("find")?;
    Ok(!out.stdout.is_empty())
}
