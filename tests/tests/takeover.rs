//! beam-snapshotter with `--takeover` (issue 7): a container reading through a lazy layer keeps
//! reading while the daemon is killed (-9) and restarted, because the layer's FUSE connection is
//! parked in the fd holder and the successor takes it over; without `--takeover` the same kill
//! makes reads fail.
//!
//! The container is simulated as the remote-snapshot tests do: layers prepared with the
//! remote-snapshot labels over the snapshots socket, a container snapshot on top, its overlay
//! mounted by the test, and a reader thread in place of the container.

use anyhow::{ensure, Context, Result};
use beam_tests::beam;
use beam_tests::oci_layout;
use beam_tests::snapshots_client::SnapshotsClient;
use beam_tests::util::{self, ChildGuard};
use beam_tests::{Compression, LayerSpec, Registry};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TARGET: &str = "containerd.io/snapshot.ref";
const IMAGE: &str = "containerd.io/snapshot/cri.image-ref";
const MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const LAYER: &str = "containerd.io/snapshot/cri.layer-digest";

const SMALL: &str = "data/small.txt";
const BIG: &str = "data/big.bin";
const COLD: &str = "data/cold.bin";

fn small() -> Vec<u8> {
    b"read me through a restart\n".repeat(400)
}

/// `takeover-reader`'s pattern, `len` bytes.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A converted two-layer image (busybox + data) in a local registry.
struct Image {
    _work: tempfile::TempDir,
    _reg: Registry,
    reference: String,
    built: oci_layout::BuiltImage,
}

fn image() -> Result<Image> {
    let work = tempfile::tempdir()?;
    let bb = work.path().join("busybox.tar");
    util::run_fixture("make-busybox-layer.sh", &[&bb])?;
    let data = work.path().join("data.tar");
    util::write_tar(&data, &[(SMALL.into(), small()), (BIG.into(), pattern(1 << 20)), (COLD.into(), pattern(16 << 20))])?;
    let layout = work.path().join("layout");
    let built = oci_layout::build_with_config(
        &layout,
        "v1",
        &[
            LayerSpec::new(&bb, Compression::Gzip),
            LayerSpec::new(&data, Compression::Gzip),
        ],
        &Default::default(),
    )?;
    let reg = Registry::start()?;
    let reference = format!("{}/takeover/bb:v1", reg.addr());
    beam::ok(&[
        "convert",
        "--plain-http",
        &format!("oci:{}:v1", layout.display()),
        &reference,
    ])?;
    Ok(Image {
        _work: work,
        _reg: reg,
        reference,
        built,
    })
}

/// Everything one daemon run needs, cleaned up on drop even when the test fails: the daemon
/// (by PID), the fd holder it started (PID from ROOT/holder.pid), then every mount under the
/// directory (the overlay, then the lazy layers the holder kept alive).
struct Env {
    daemon: Option<ChildGuard>,
    dir: tempfile::TempDir,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    args: Vec<String>,
}

impl Env {
    fn new(args: &[&str]) -> Result<Env> {
        util::require_root()?;
        let dir = util::short_tempdir()?;
        Ok(Env {
            daemon: None,
            root: dir.path().join("root"),
            socket: dir.path().join("beam.sock"),
            log: dir.path().join("daemon.log"),
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// Start a daemon on the root and socket (any previous one must be gone); wait until it
    /// listens, which it does only after recovering (taking over) its lazy layers.
    fn start(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        let (out, err) = util::log_stdio(&self.log)?;
        let mut cmd = Command::new(util::cargo_bin("beam-snapshotter")?);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .args(&self.args)
            .env("BEAM_LOG", "info,fuser=warn")
            .stdout(out)
            .stderr(err);
        let _ = std::fs::remove_file(&self.socket);
        self.daemon = Some(ChildGuard::spawn("beam-snapshotter", &mut cmd)?);
        ensure!(
            util::wait_for(|| self.socket.exists(), Duration::from_secs(30)),
            "beam-snapshotter did not start: {}",
            util::tail_file(&self.log, 30)
        );
        Ok(t0.elapsed())
    }

    fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    fn holder_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root.join("holder.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill();
        if let Some(pid) = self.holder_pid() {
            let left = util::kill_pids(&[pid]);
            if !left.is_empty() {
                eprintln!("cleanup: fd holder {pid} did not die");
            }
        }
        if let Err(e) = util::unmount_all_under(self.dir.path()) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Make both layers lazy, prepare a container snapshot on top and mount its overlay at
/// `rootfs`.
async fn lazy_container(env: &Env, img: &Image) -> Result<()> {
    let mut c = SnapshotsClient::connect(&env.socket).await?;
    let mut parent = String::new();
    for i in 0..2 {
        let labels: HashMap<String, String> = [
            (TARGET, format!("layer-{i}")),
            (IMAGE, img.reference.clone()),
            (MANIFEST, img.built.manifest_digest.clone()),
            (LAYER, img.built.layers[i].0.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let e = c
            .prepare(&format!("extract-{i}"), &parent, labels)
            .await
            .expect_err("a converted layer must be committed by the snapshotter");
        ensure!(
            e.code() == containerd_snapshots::tonic::Code::AlreadyExists,
            "prepare answered {e:?}"
        );
        parent = format!("layer-{i}");
    }
    let mounts = c
        .prepare("ctr-1", "layer-1", HashMap::new())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let m = &mounts[0];
    let rootfs = env.rootfs();
    std::fs::create_dir_all(&rootfs)?;
    let out = Command::new("mount")
        .args(["-t", &m.r#type, &m.source])
        .arg(&rootfs)
        .args(["-o", &m.options.join(",")])
        .output()?;
    ensure!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The reader process (`takeover-reader`) on the container's rootfs, writing its stats to
/// OUTDIR; told to stop (and waited for) on drop, killed if it does not stop.
struct Reader {
    child: ChildGuard,
    out: PathBuf,
}

impl Reader {
    fn start(rootfs: &Path, out: &Path) -> Result<Reader> {
        std::fs::create_dir_all(out)?;
        let mut cmd = Command::new(util::cargo_bin("takeover-reader")?);
        cmd.arg(rootfs).arg(out);
        let child = ChildGuard::spawn("takeover-reader", &mut cmd)?;
        let r = Reader {
            child,
            out: out.to_path_buf(),
        };
        ensure!(
            util::wait_for(|| r.stats().is_ok(), Duration::from_secs(10)),
            "the reader wrote no stats"
        );
        Ok(r)
    }

    fn stats(&self) -> Result<serde_json::Value> {
        let s = std::fs::read_to_string(self.out.join("stats.json"))?;
        Ok(serde_json::from_str(&s)?)
    }

    fn rounds(&self) -> u64 {
        self.stats().map(|s| s["rounds"].as_u64().unwrap_or(0)).unwrap_or(0)
    }

    fn errors(&self) -> u64 {
        self.stats().map(|s| s["errors"].as_u64().unwrap_or(0)).unwrap_or(0)
    }

    /// Ask the reader to stop; true when it exited within `timeout`.
    fn stop(&mut self, timeout: Duration) -> bool {
        let _ = std::fs::write(self.out.join("stop"), "");
        util::wait_for(|| matches!(self.child.try_wait(), Ok(Some(_))), timeout)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_kill_9_with_takeover() -> Result<()> {
    let img = image()?;
    let mut env = Env::new(&["--takeover", "--plain-http", "--no-background-fetch"])?;
    env.start()?;
    let holder = env.holder_pid().context("the daemon wrote no holder.pid")?;
    ensure!(
        util::pid_alive(holder),
        "the fd holder {holder} is not running"
    );
    lazy_container(&env, &img).await?;
    let mut reader = Reader::start(&env.rootfs(), &env.dir.path().join("out"))?;
    let result = async {
        let mut restarts = Vec::new();
        for cycle in 0..5 {
            std::thread::sleep(Duration::from_millis(300));
            let before = reader.rounds();
            env.kill();
            restarts.push(env.start()?);
            // The reader makes progress again through the new daemon.
            ensure!(
                util::wait_for(|| reader.rounds() > before + 10, Duration::from_secs(30)),
                "cycle {cycle}: the reader made no progress after the restart: {:?}\n{}",
                reader.stats(),
                util::tail_file(&env.log, 30)
            );
            ensure!(
                env.holder_pid() == Some(holder) && util::pid_alive(holder),
                "cycle {cycle}: the fd holder was replaced or died"
            );
        }
        let log = util::tail_file(&env.log, 100_000);
        ensure!(
            log.matches("lazy layer taken over").count() >= 10,
            "the restarted daemons did not take the layers over:\n{}",
            util::tail_file(&env.log, 40)
        );
        anyhow::Ok(restarts)
    }
    .await;
    let stopped = reader.stop(Duration::from_secs(10));
    let restarts = result?;
    ensure!(stopped, "the reader is stuck");
    let s = reader.stats()?;
    eprintln!(
        "takeover: 5 kill -9/restart cycles, {} read rounds, {} errors, restarts took {:?}",
        s["rounds"], s["errors"], restarts
    );
    ensure!(
        s["errors"] == 0,
        "{} read errors across the restarts (first: {})",
        s["errors"],
        s["first_error"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fail_after_kill_9_without_takeover() -> Result<()> {
    let img = image()?;
    let mut env = Env::new(&["--plain-http", "--no-background-fetch"])?;
    env.start()?;
    ensure!(env.holder_pid().is_none(), "no holder without --takeover");
    lazy_container(&env, &img).await?;
    let mut reader = Reader::start(&env.rootfs(), &env.dir.path().join("out"))?;
    std::thread::sleep(Duration::from_millis(300));
    let (rounds, errors) = (reader.rounds(), reader.errors());
    ensure!(
        rounds > 0 && errors == 0,
        "reader before the kill: {rounds} rounds, {errors} errors"
    );
    env.kill();
    let failed = util::wait_for(|| reader.errors() > 0, Duration::from_secs(10));
    let finished = reader.stop(Duration::from_secs(10));
    let s = reader.stats()?;
    eprintln!(
        "control (no takeover): {} read errors after kill -9 (first: {})",
        s["errors"], s["first_error"]
    );
    ensure!(
        failed,
        "reads kept working after kill -9 without takeover: {s}"
    );
    ensure!(finished, "the reader is stuck");
    Ok(())
}
