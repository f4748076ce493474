//! Running containers survive a beam-snapshotter restart, crash or upgrade (issue 7).
//!
//! With takeover (the default) every lazy layer's FUSE connection is parked in the fd holder, and a new
//! daemon takes live connections over instead of remounting. The workload is
//! `takeover-reader` (tests/src/bin): it reads a small file whole, preads a file it keeps open,
//! and on request a never-read region of a cold file, checking every byte, and reports rounds,
//! errors and every round over 2 ms.
//!
//! - `container_*`: the acceptance tests. A real containerd (the system's), registry and
//!   daemon; the reader runs in a container started with `ctr run` on a `beam pull`ed image.
//!   The daemon is restarted 20 times in each of five ways (SIGTERM, kill -9, into another
//!   binary file, kill -9 with the registry down, while a slow registry answer is in flight)
//!   and every restart's stall is the
//!   longest reader round overlapping it. After each way: containerd's snapshots equal the
//!   daemon's, a new container starts; at the end nothing is left once the image is removed.
//!   The control runs the same container with `--no-takeover` and must see read errors.
//! - `snapshots_*`: the same mechanism without containerd (layers prepared over the snapshots
//!   socket, the overlay mounted by the test, the reader a plain process), quick to debug.

use anyhow::{bail, ensure, Context, Result};
use beam_tests::snapshots_client::SnapshotsClient;
use beam_tests::takeover::{self, ReaderStats, RestartableDaemon};
use beam_tests::util::{self, ChildGuard};
use beam_tests::{beam, oci_layout};
use beam_tests::{Containerd, ContainerdOptions, Fault, Fixture, Proxy};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

/// Restarts per way (the issue asks for 20); `BEAM_TAKEOVER_RESTARTS` overrides it.
fn restarts() -> usize {
    std::env::var("BEAM_TAKEOVER_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// The converted three-layer image (busybox, data, reader) in a registry behind a proxy.
struct Image {
    reference: String,
    /// The bound manifest the tag names (what CRI passes as `cri.manifest-digest`).
    manifest: String,
    built: oci_layout::BuiltImage,
    /// The Beam chunk blob of the data layer (the cold file's chunks).
    data_chunks: String,
    fx: Fixture,
}

impl Image {
    fn proxy(&self) -> &Proxy {
        self.fx.proxy()
    }
}

fn image() -> Result<Image> {
    let fx = Fixture::with_proxy()?;
    let data = fx.path("data.tar");
    takeover::write_data_layer(&data)?;
    let reader = fx.path("reader.tar");
    takeover::write_reader_layer(&reader)?;
    let image = fx
        .image("reader")
        .busybox()?
        .tars(&[data, reader])
        .build()?;
    let converted = image.convert("takeover/reader:v1", &["--chunk-size", "65536"])?;
    let (reference, manifest) = (converted.reference.clone(), converted.manifest_digest()?);
    let inspect = beam::ok(&["inspect", "--plain-http", &reference])?;
    let chunks: Vec<String> = inspect
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chunks "))
        .filter_map(|rest| rest.split_whitespace().next().map(String::from))
        .collect();
    ensure!(chunks.len() == 3, "beam inspect: {inspect}");
    Ok(Image {
        reference,
        manifest,
        built: image.built,
        data_chunks: chunks[1].clone(),
        fx,
    })
}

// ------------------------------------------------------------------------------------------
// Acceptance: a container through 4 x 20 restarts.

/// A container running the reader on a lazily pulled image. Fields drop in order: containerd
/// (and the container) first, then the daemon, its holder and mounts, then the registry.
struct Setup {
    containerd: Containerd,
    daemon: RestartableDaemon,
    image: Image,
    /// The reader's OUTDIR (bind-mounted at /out).
    out: PathBuf,
    /// A copy of the daemon binary at another path: "the upgraded package".
    next_binary: PathBuf,
}

const READER_ID: &str = "reader";

/// The container on a daemon started with `args` besides `--root` and `--address`. The daemon
/// has no registry settings: `beam pull --plain-http` hands them over with each layer, and
/// they are kept with the layer for every restart.
fn setup(args: &[&str]) -> Result<Option<Setup>> {
    util::require_root()?;
    let image = image()?;
    let mut daemon = RestartableDaemon::new(args)?;
    daemon.start()?;
    let containerd = Containerd::start_with(ContainerdOptions {
        extra_config: daemon.containerd_config(),
        ..Default::default()
    })?;
    let out = daemon.dir().join("out");
    std::fs::create_dir_all(&out)?;
    let next_binary = daemon.dir().join("beam-snapshotter-next");
    std::fs::copy(util::cargo_bin("beam-snapshotter")?, &next_binary)?;
    let s = Setup {
        containerd,
        daemon,
        image,
        out,
        next_binary,
    };
    let pulled = beam::ok(&[
        "pull",
        "--address",
        s.containerd.address().to_str().context("utf-8")?,
        "--namespace",
        s.containerd.namespace(),
        "--plain-http",
        "--json",
        &s.image.reference,
    ])?;
    let pulled: serde_json::Value = serde_json::from_str(&pulled)?;
    ensure!(pulled["lazy"] == 3, "beam pull: {pulled}");
    let mount = format!(
        "type=bind,src={},dst=/out,options=rbind:rw",
        s.out.display()
    );
    s.containerd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "beam",
        "--mount",
        &mount,
        &s.image.reference,
        READER_ID,
        takeover::READER,
        "/",
        "/out",
    ])?;
    ensure!(
        takeover::wait_rounds(&s.out, 0, 50, Duration::from_secs(30)),
        "the reader did not start reading: {:?}\n{}",
        ReaderStats::read(&s.out).map(|s| s.summary()),
        s.daemon.log_tail(30)
    );
    Ok(Some(s))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// SIGTERM, then start.
    Clean,
    /// SIGKILL, then start.
    Kill9,
    /// SIGTERM, then start another binary file (alternating between two).
    NewBinary,
    /// The registry is down (connections closed at once) from before a `kill -9` until the
    /// next daemon serves again: a takeover needs nothing from the registry.
    RegistryDown,
    /// A read waits on a slow registry answer (1 s per chunk request) when the daemon gets
    /// SIGTERM; the next daemon must answer it.
    SlowRegistry,
}

impl Setup {
    fn stats(&self) -> Result<ReaderStats> {
        ReaderStats::read(&self.out)
    }

    /// Whether the reader's task is still running (`ctr task ls`).
    fn reader_running(&self) -> bool {
        self.containerd.ctr(&["task", "ls"]).is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with(READER_ID) && l.contains("RUNNING"))
        })
    }

    /// One restart; returns the reader's stall over it.
    fn restart(&mut self, way: Way, cycle: usize) -> Result<Duration> {
        std::thread::sleep(Duration::from_millis(100));
        let t0 = SystemTime::now();
        match way {
            Way::Clean => {
                self.daemon.terminate();
                self.daemon.start()?;
            }
            Way::Kill9 => {
                self.daemon.kill();
                self.daemon.start()?;
            }
            Way::RegistryDown => {
                self.image.proxy().set_down(true);
                self.daemon.kill();
                let started = self.daemon.start();
                let progressed = started.is_ok()
                    && takeover::wait_progress_after(
                        &self.out,
                        SystemTime::now(),
                        20,
                        Duration::from_secs(30),
                    );
                self.image.proxy().set_down(false);
                started?;
                ensure!(
                    progressed,
                    "cycle {cycle}: no progress with the registry down: {:?}\n{}",
                    self.stats().map(|s| s.summary()),
                    self.daemon.log_tail(30)
                );
            }
            Way::NewBinary => {
                self.daemon.terminate();
                if cycle % 2 == 0 {
                    self.daemon.start_binary(&self.next_binary)?;
                } else {
                    self.daemon.start()?;
                }
            }
            Way::SlowRegistry => {
                let blob = self.image.data_chunks.clone();
                self.image
                    .proxy()
                    .set_fault_for(Some(blob.clone()), Fault::Stall(Duration::from_secs(1)));
                let asked_before = self.image.proxy().blob_requests_for(&blob).len();
                std::fs::write(self.out.join("cold"), cycle.to_string())?;
                let in_flight = util::wait_for(
                    || {
                        self.image
                            .proxy()
                            .records()
                            .iter()
                            .any(|r| r.status == 0 && r.digest() == Some(blob.as_str()))
                    },
                    Duration::from_secs(10),
                );
                ensure!(in_flight, "cycle {cycle}: no chunk request in flight");
                self.daemon.terminate();
                self.daemon.start()?;
                let done = util::wait_for(
                    || {
                        self.stats()
                            .is_ok_and(|s| s.cold_done.contains(&(cycle as u64)) || s.errors > 0)
                    },
                    Duration::from_secs(30),
                );
                self.image.proxy().clear_fault();
                ensure!(
                    done,
                    "cycle {cycle}: the cold read never completed: {:?}\n{}",
                    self.stats().map(|s| s.summary()),
                    self.daemon.log_tail(30)
                );
                // The old daemon's request was cut off; the new daemon asked again and got it:
                // the read was delivered to it again (FUSE_NOTIFY_RESEND), not answered early.
                let asked: Vec<u16> = self.image.proxy().blob_requests_for(&blob)[asked_before..]
                    .iter()
                    .map(|r| r.status)
                    .collect();
                ensure!(
                    asked.len() >= 2 && asked.contains(&206),
                    "cycle {cycle}: chunk requests around the restart: {asked:?}"
                );
            }
        }
        let up = SystemTime::now();
        ensure!(
            takeover::wait_progress_after(&self.out, up, 20, Duration::from_secs(30)),
            "{way:?} cycle {cycle}: the reader made no progress after the restart: {:?}\n{}",
            self.stats().map(|s| s.summary()),
            self.daemon.log_tail(30)
        );
        let t1 = SystemTime::now();
        let s = self.stats()?;
        ensure!(
            s.errors == 0,
            "{way:?} cycle {cycle}: {} read errors in the container (first: {:?})\n{}",
            s.errors,
            s.first_error,
            self.daemon.log_tail(30)
        );
        Ok(s.longest_between(t0, t1))
    }

    /// containerd's snapshots (in its metadata) are the daemon's (over its socket), kind by
    /// kind; every lazy layer is mounted, held, and was taken over by this daemon.
    async fn check_views_agree(&self, way: Way) -> Result<()> {
        // containerd's gRPC client of the proxy plugin backs off up to 3 s after the daemon
        // went away: calls fail with the last dial error until it reconnects.
        let t0 = std::time::Instant::now();
        let mut last = None;
        let reconnected = util::wait_for(
            || {
                last = Some(
                    self.containerd
                        .ctr(&["snapshots", "--snapshotter", "beam", "ls"]),
                );
                matches!(last, Some(Ok(_)))
            },
            Duration::from_secs(15),
        );
        last.context("no ctr call")??;
        ensure!(reconnected, "containerd did not reconnect");
        eprintln!(
            "after {way:?}: containerd reconnected to the daemon in {:?}",
            t0.elapsed()
        );
        // containerd removes a snapshot from its own metadata at once and from the daemon at
        // its next garbage collection (e.g. the `ctr run --rm` container of the previous
        // check): the two views must become equal within a few seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (theirs, ours) = self.snapshot_kinds().await?;
            if theirs == ours {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "after {way:?}: containerd has {theirs:?}, the daemon {ours:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let st = self.daemon.status()?;
        let layers = st["layers"].as_array().context("status layers")?;
        ensure!(layers.len() == 3, "after {way:?}: beam status {st}");
        // The data layer's opens of the cached small file go through FUSE passthrough, also
        // in a daemon that took the connection over while such an open was kept.
        let data_layer = &self.image.built.layers[1].0;
        let data = layers
            .iter()
            .find(|l| l["layer"] == data_layer.as_str())
            .context("data layer in beam status")?;
        ensure!(
            data["passthrough_opens"].as_u64().is_some_and(|n| n > 0),
            "after {way:?}: no passthrough open of the data layer: {data}"
        );
        for l in layers {
            ensure!(
                l["mountpoint"].as_str().is_some_and(|m| !m.is_empty())
                    && l["held"] == true
                    && l["taken_over_unix_ms"].as_u64().is_some(),
                "after {way:?}: layer not taken over: {l}"
            );
        }
        Ok(())
    }

    /// The kinds of the snapshots containerd lists and of those the daemon lists, sorted.
    async fn snapshot_kinds(&self) -> Result<(Vec<String>, Vec<String>)> {
        let out = self
            .containerd
            .ctr(&["snapshots", "--snapshotter", "beam", "ls"])?;
        let mut theirs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().last().map(str::to_lowercase))
            .collect();
        let mut c = SnapshotsClient::connect(&self.daemon.socket()).await?;
        let mut ours: Vec<String> = c
            .list()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .iter()
            .map(|i| match i.kind {
                1 => "view".to_string(),
                2 => "active".to_string(),
                3 => "committed".to_string(),
                k => format!("kind {k}"),
            })
            .collect();
        theirs.sort();
        ours.sort();
        Ok((theirs, ours))
    }

    /// A new container on the same image starts and reads the lazy data.
    fn check_new_container(&self, id: &str) -> Result<()> {
        let out = self.containerd.run_with(
            &["--snapshotter", "beam"],
            &self.image.reference,
            id,
            &["/bin/cat", "/data/small.txt"],
        )?;
        ensure!(
            out.as_bytes() == takeover::small(),
            "new container {id} printed {} bytes, not the file",
            out.len()
        );
        Ok(())
    }

    /// Stop the reader, remove its container and the image; wait until no snapshot is left.
    fn remove_everything(&self) -> Result<()> {
        std::fs::write(self.out.join("stop"), "")?;
        let exited = util::wait_for(|| !self.reader_running(), Duration::from_secs(20));
        ensure!(exited, "the reader did not stop");
        self.containerd.ctr(&["task", "delete", READER_ID])?;
        self.containerd.ctr(&["containers", "rm", READER_ID])?;
        self.containerd
            .ctr(&["images", "rm", "--sync", &self.image.reference])?;
        let gone = util::wait_for(
            || {
                self.containerd
                    .ctr(&["snapshots", "--snapshotter", "beam", "ls"])
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().count() <= 1)
            },
            Duration::from_secs(30),
        );
        ensure!(gone, "snapshots left after the image was removed");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_keeps_reading_through_restarts_crashes_and_upgrades() -> Result<()> {
    let Some(mut s) = setup(&["--no-background-fetch"])? else {
        return Ok(());
    };
    let holder = s.daemon.holder_pid().context("no holder.pid")?;
    let n = restarts();
    let mut report = Vec::new();
    let ways = [
        Way::Clean,
        Way::Kill9,
        Way::NewBinary,
        Way::RegistryDown,
        Way::SlowRegistry,
    ];
    for way in ways {
        let mut stalls = Vec::with_capacity(n);
        for cycle in 0..n {
            stalls.push(s.restart(way, cycle)?);
        }
        ensure!(
            s.daemon.holder_pid() == Some(holder) && util::pid_alive(holder),
            "after {way:?}: the fd holder was replaced or died"
        );
        s.check_views_agree(way)
            .await
            .with_context(|| s.daemon.log_tail(30))?;
        s.check_new_container(&format!("new-{way:?}").to_lowercase())?;
        // containerd removes the new container's snapshot from the daemon at its next garbage
        // collection, which it does not retry after a failed call until something else changes:
        // let it finish before the next way kills the daemon.
        s.check_views_agree(way)
            .await
            .with_context(|| s.daemon.log_tail(30))?;
        let (median, max) = takeover::median_max(&stalls);
        report.push(format!(
            "{way:?}: {n} restarts, reader stall median {median:?}, max {max:?}"
        ));
    }
    let st = s.stats()?;
    eprintln!(
        "takeover, container on containerd {}: {} read rounds, {} errors\n  {}",
        s.containerd.version_string(),
        st.rounds,
        st.errors,
        report.join("\n  ")
    );
    ensure!(st.errors == 0, "read errors: {:?}", st.first_error);
    let log = std::fs::read_to_string(s.daemon.log_path())?;
    let taken = log.matches("lazy layer taken over").count();
    ensure!(
        taken >= 3 * ways.len() * n,
        "{taken} takeovers logged for {} restarts of 3 layers",
        ways.len() * n
    );
    ensure!(
        !log.contains("cannot take the lazy layer over"),
        "a takeover failed:\n{}",
        s.daemon.log_tail(40)
    );

    // Removing the image leaves nothing: no FUSE or overlay mount, no fd in the holder.
    s.remove_everything()?;
    let fuse_left = util::mounts_under(s.daemon.dir())?;
    ensure!(fuse_left.is_empty(), "mounts left: {fuse_left:?}");
    let overlays_left = util::mounts_under(s.containerd.dir())?;
    ensure!(overlays_left.is_empty(), "mounts left: {overlays_left:?}");
    ensure!(
        s.daemon.holder_fuse_fds()? == 0,
        "the fd holder still holds {} /dev/fuse fds",
        s.daemon.holder_fuse_fds()?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_sees_read_errors_after_kill_9_without_takeover() -> Result<()> {
    let Some(mut s) = setup(&["--no-background-fetch", "--no-takeover"])? else {
        return Ok(());
    };
    ensure!(
        s.daemon.holder_pid().is_none(),
        "no holder with --no-takeover"
    );
    let before = s.stats()?;
    ensure!(
        before.errors == 0,
        "errors before the kill: {}",
        before.summary()
    );
    s.daemon.kill();
    s.daemon.start()?;
    // The reader sees errors, or dies (SIGBUS: its own executable is mapped from the layer).
    let failed = util::wait_for(
        || s.stats().is_ok_and(|st| st.errors > 0) || !s.reader_running(),
        Duration::from_secs(20),
    );
    let st = s.stats()?;
    eprintln!(
        "control, container without takeover: after kill -9 the reader {}, {} read errors \
         (first: {:?})",
        if s.reader_running() { "runs" } else { "died" },
        st.errors,
        st.first_error
    );
    ensure!(
        failed,
        "reads kept working without takeover: {}",
        st.summary()
    );
    s.remove_everything()?;
    Ok(())
}

/// Issue 12: takeover is the default. A daemon started with nothing but its root and socket
/// (no config file, no flag; background fetch on), a container reading a lazy file in a loop,
/// `kill -9` and a new start, five times: no read error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_on_a_default_daemon_survives_kill_9() -> Result<()> {
    let Some(mut s) = setup(&[])? else {
        return Ok(());
    };
    ensure!(
        s.daemon.holder_pid().is_some(),
        "a default daemon started no fd holder"
    );
    let mut stalls = Vec::new();
    for cycle in 0..5 {
        stalls.push(s.restart(Way::Kill9, cycle)?);
    }
    let st = s.stats()?;
    let (median, max) = takeover::median_max(&stalls);
    eprintln!(
        "default daemon, 5 x kill -9: {} read rounds, {} errors, stall median {median:?}, max \
         {max:?}",
        st.rounds, st.errors
    );
    ensure!(st.errors == 0, "read errors: {:?}", st.first_error);
    s.check_views_agree(Way::Kill9)
        .await
        .with_context(|| s.daemon.log_tail(30))?;
    s.check_new_container("new-default")?;
    s.remove_everything()?;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The mechanism without containerd.

const TARGET: &str = "containerd.io/snapshot.ref";
const IMAGE: &str = "containerd.io/snapshot/cri.image-ref";
const MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const LAYER: &str = "containerd.io/snapshot/cri.layer-digest";

/// Make the layers lazy over the snapshots socket, prepare a container snapshot on top and
/// mount its overlay at DIR/rootfs.
async fn lazy_rootfs(d: &RestartableDaemon, img: &Image) -> Result<PathBuf> {
    let mut c = SnapshotsClient::connect(&d.socket()).await?;
    let mut parent = String::new();
    for (i, (layer, ..)) in img.built.layers.iter().enumerate() {
        let labels: HashMap<String, String> = [
            (TARGET, format!("layer-{i}")),
            (IMAGE, img.reference.clone()),
            (MANIFEST, img.manifest.clone()),
            (LAYER, layer.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        match c.prepare(&format!("extract-{i}"), &parent, labels).await {
            Err(e) if e.code() == containerd_snapshots::tonic::Code::AlreadyExists => {}
            other => bail!("prepare of a converted layer answered {other:?}"),
        }
        parent = format!("layer-{i}");
    }
    let mounts = c
        .prepare("ctr-1", &parent, HashMap::new())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let m = &mounts[0];
    let rootfs = d.dir().join("rootfs");
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
    Ok(rootfs)
}

/// A daemon serving a lazy rootfs that the test mounted, and the reader (a plain process) on
/// it. Fields drop in order: the daemon and its holder first, which ends the held connections
/// a stuck reader may be waiting on, then the reader; so a failing test cannot hang.
struct Rig {
    d: RestartableDaemon,
    reader: ChildGuard,
    out: PathBuf,
}

impl Rig {
    async fn start(img: &Image, args: &[&str]) -> Result<Rig> {
        let mut d = RestartableDaemon::new(args)?;
        d.start()?;
        let rootfs = lazy_rootfs(&d, img).await?;
        let out = d.dir().join("out");
        std::fs::create_dir_all(&out)?;
        let mut cmd = Command::new(util::cargo_bin("takeover-reader")?);
        cmd.arg(&rootfs).arg(&out);
        let reader = ChildGuard::spawn("takeover-reader", &mut cmd)?;
        let rig = Rig { d, reader, out };
        ensure!(
            takeover::wait_rounds(&rig.out, 0, 10, Duration::from_secs(10)),
            "the reader did not start reading"
        );
        Ok(rig)
    }

    fn summary(&self) -> Result<String> {
        ReaderStats::read(&self.out).map(|s| s.summary())
    }

    /// Stop the reader through its stop file; true when it exited in time.
    fn stop_reader(&mut self) -> bool {
        let _ = std::fs::write(self.out.join("stop"), "");
        util::wait_for(
            || matches!(self.reader.try_wait(), Ok(Some(_))),
            Duration::from_secs(10),
        )
    }

    /// Whether the reader reports a read error within 10 s; then stops it (it must stop).
    fn reader_fails(&mut self) -> Result<bool> {
        let out = self.out.clone();
        let failed = util::wait_for(
            || ReaderStats::read(&out).is_ok_and(|s| s.errors > 0),
            Duration::from_secs(10),
        );
        ensure!(self.stop_reader(), "the reader is stuck");
        Ok(failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_reads_survive_kill_9_with_takeover() -> Result<()> {
    let img = image()?;
    let mut rig = Rig::start(&img, &["--plain-http", "--no-background-fetch"]).await?;
    let holder = rig
        .d
        .holder_pid()
        .context("the daemon wrote no holder.pid")?;
    for cycle in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        rig.d.kill();
        rig.d.start()?;
        ensure!(
            takeover::wait_progress_after(&rig.out, SystemTime::now(), 10, Duration::from_secs(30)),
            "cycle {cycle}: the reader made no progress after the restart: {:?}\n{}",
            rig.summary(),
            rig.d.log_tail(30)
        );
        ensure!(
            rig.d.holder_pid() == Some(holder) && util::pid_alive(holder),
            "cycle {cycle}: the fd holder was replaced or died"
        );
    }
    ensure!(rig.stop_reader(), "the reader is stuck");
    let s = ReaderStats::read(&rig.out)?;
    ensure!(
        s.errors == 0,
        "{} read errors across the restarts (first: {:?})",
        s.errors,
        s.first_error
    );
    let st = rig.d.status()?;
    ensure!(
        st["takeover"] == true
            && st["layers"]
                .as_array()
                .is_some_and(|l| l.len() == 3 && l.iter().all(|l| l["held"] == true)),
        "beam status: {st}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_reads_fail_after_kill_9_without_takeover() -> Result<()> {
    let img = image()?;
    let mut rig = Rig::start(
        &img,
        &["--no-takeover", "--plain-http", "--no-background-fetch"],
    )
    .await?;
    ensure!(rig.d.holder_pid().is_none(), "no holder with --no-takeover");
    rig.d.kill();
    ensure!(
        rig.reader_fails()?,
        "reads kept working after kill -9 without takeover: {:?}",
        rig.summary()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_turning_takeover_off_releases_held_connections() -> Result<()> {
    let img = image()?;
    let mut rig = Rig::start(&img, &["--plain-http", "--no-background-fetch"]).await?;
    ensure!(rig.d.holder_fuse_fds()? == 3, "3 held connections expected");
    // Stopped with takeover on: the layers stay held. Started with it off: the daemon lets the
    // held connections go (and remounts), so the old mounts' readers fail instead of waiting
    // forever for a daemon that will not serve them.
    rig.d.terminate();
    rig.d
        .set_args(&["--no-takeover", "--plain-http", "--no-background-fetch"]);
    rig.d.start()?;
    ensure!(
        rig.reader_fails()?,
        "the reader saw no error: {:?}",
        rig.summary()
    );
    ensure!(
        rig.d.holder_fuse_fds()? == 0,
        "the holder still holds {} connections",
        rig.d.holder_fuse_fds()?
    );
    ensure!(
        rig.d
            .log_tail(50)
            .contains("releasing a connection the fd holder kept"),
        "{}",
        rig.d.log_tail(30)
    );
    Ok(())
}

/// Issue 12: a daemon stopped and not started again must not leave readers waiting for ever.
/// After the grace period (2 s here, 180 s by default) the holder lets the connections go:
/// the reader gets errors, the lazy mounts are gone, the holder has exited and the state
/// directory can be removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_readers_fail_after_the_grace_period_without_a_daemon() -> Result<()> {
    let img = image()?;
    let grace = Duration::from_secs(2);
    let mut rig = Rig::start(
        &img,
        &[
            "--plain-http",
            "--no-background-fetch",
            "--takeover-grace",
            "2",
        ],
    )
    .await?;
    let holder = rig.d.holder_pid().context("no fd holder")?;
    let st = rig.d.status()?;
    ensure!(st["takeover_grace_secs"] == 2.0, "beam status: {st}");
    // The operator stops the service; nothing starts again.
    rig.d.terminate();
    let stopped = std::time::Instant::now();
    ensure!(
        rig.d.holder_fuse_fds()? == 3,
        "the holder should keep the layers during the grace period"
    );
    ensure!(
        rig.reader_fails()?,
        "the reader saw no error after the grace period: {:?}",
        rig.summary()
    );
    let waited = stopped.elapsed();
    ensure!(
        waited >= grace.mul_f64(0.9),
        "reads failed after {waited:?}, before the {grace:?} grace period ended"
    );
    ensure!(
        util::wait_for(|| !util::pid_alive(holder), Duration::from_secs(10)),
        "the fd holder still runs"
    );
    ensure!(
        util::mounts_under(&rig.d.root())?.is_empty(),
        "lazy mounts left: {:?}",
        util::mounts_under(&rig.d.root())?
    );
    ensure!(
        rig.d.holder_log().contains("takeover grace period"),
        "the holder did not log why it let go:\n{}",
        rig.d.holder_log()
    );
    // The test's own overlay goes with the test; then the state directory can be removed.
    util::unmount_all_under(&rig.d.dir().join("rootfs"))?;
    std::fs::remove_dir_all(rig.d.root()).context("removing the state directory")?;
    eprintln!("grace {grace:?}: the reader failed {waited:?} after the stop");
    Ok(())
}

/// Issue 12: `beam-snapshotter --stop` is a real stop: the daemon exits and the holder lets go
/// at once (the reader fails long before the default grace period), leaving no mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_stop_releases_at_once() -> Result<()> {
    let img = image()?;
    let mut rig = Rig::start(&img, &["--plain-http", "--no-background-fetch"]).await?;
    let holder = rig.d.holder_pid().context("no fd holder")?;
    let t0 = std::time::Instant::now();
    let said = beam_tests::daemon::stop_for_good(&rig.d.root())?;
    ensure!(
        rig.reader_fails()?,
        "the reader saw no error after --stop: {:?}",
        rig.summary()
    );
    ensure!(
        t0.elapsed() < Duration::from_secs(30),
        "--stop took {:?}",
        t0.elapsed()
    );
    ensure!(
        util::wait_for(|| !util::pid_alive(holder), Duration::from_secs(10)),
        "the fd holder still runs after --stop"
    );
    ensure!(
        util::mounts_under(&rig.d.root())?.is_empty(),
        "lazy mounts left: {:?}",
        util::mounts_under(&rig.d.root())?
    );
    ensure!(
        said.contains("released 3 lazy layer(s)"),
        "--stop printed: {said}"
    );
    Ok(())
}
