//! beam-snapshotter with a real containerd (Debian's, as a proxy snapshot plugin): the
//! snapshots API semantics through `ctr snapshots`, and containers run on Beam snapshots.

use anyhow::{ensure, Context, Result};
use beam_tests::util::{self, ChildGuard};
use beam_tests::{Containerd, ContainerdOptions, Fixture};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Start beam-snapshotter on `socket` with state in `root` and `args`, logging to `log`;
/// wait until it listens. Stopped by PID when the guard drops.
fn start_daemon(root: &Path, socket: &Path, log: &Path, args: &[&str]) -> Result<ChildGuard> {
    start_daemon_with_env(root, socket, log, args, &[])
}

/// [`start_daemon`] with extra environment variables.
fn start_daemon_with_env(
    root: &Path,
    socket: &Path,
    log: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<ChildGuard> {
    let (out, err) = util::log_stdio(log)?;
    let mut cmd = Command::new(util::cargo_bin("beam-snapshotter")?);
    cmd.arg("--root")
        .arg(root)
        .arg("--address")
        .arg(socket)
        .args(args)
        .env("BEAM_LOG", "info,fuser=warn")
        .envs(env.iter().copied())
        .stdout(out)
        .stderr(err);
    let _ = std::fs::remove_file(socket);
    let child = ChildGuard::spawn("beam-snapshotter", &mut cmd)?;
    ensure!(
        // Answering, not only there: the socket file exists from bind() on, and a connect
        // before listen() is refused (seen under load).
        util::wait_for(
            || std::os::unix::net::UnixStream::connect(socket).is_ok(),
            Duration::from_secs(30)
        ),
        "beam-snapshotter did not start: {}",
        util::tail_file(log, 30)
    );
    Ok(child)
}

/// Where a test's beam-snapshotter lives: a short temp dir with its state root, socket and
/// log. On drop (after the daemon, which the test drops first) its fd holder is stopped and
/// every mount under it unmounted.
struct Place {
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    _holder: beam_tests::daemon::HolderGuard,
    _unmount: util::UnmountOnDrop,
    _dir: tempfile::TempDir,
}

impl Place {
    fn new() -> Result<Place> {
        let dir = util::short_tempdir()?;
        let root = dir.path().join("root");
        Ok(Place {
            _holder: beam_tests::daemon::HolderGuard::new(&root),
            _unmount: util::UnmountOnDrop(dir.path().to_path_buf()),
            socket: dir.path().join("beam.sock"),
            log: dir.path().join("daemon.log"),
            root,
            _dir: dir,
        })
    }

    /// Start a daemon here with `args` and `env`.
    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Result<ChildGuard> {
        start_daemon_with_env(&self.root, &self.socket, &self.log, args, env)
    }
}

/// A running beam-snapshotter, stopped by PID on drop.
struct Daemon {
    child: ChildGuard,
    _holder: beam_tests::daemon::HolderGuard,
    socket: PathBuf,
    root: PathBuf,
    _unmount: util::UnmountOnDrop,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Result<Daemon> {
        Self::start_with(&[])
    }

    /// [`Daemon::start`] with `args`.
    fn start_with(args: &[&str]) -> Result<Daemon> {
        let dir = util::short_tempdir()?;
        let socket = dir.path().join("beam.sock");
        let root = dir.path().join("root");
        let child = start_daemon(&root, &socket, &dir.path().join("daemon.log"), args)?;
        Ok(Daemon {
            child,
            _holder: beam_tests::daemon::HolderGuard::new(&root),
            socket,
            _unmount: util::UnmountOnDrop(root.clone()),
            root,
            _dir: dir,
        })
    }

    /// A `Status:` field of the daemon process in KiB (`VmRSS`, `VmHWM`).
    fn memory_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{field} of the daemon"))
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
    // Nothing references these snapshots: keep containerd's garbage collector (which runs
    // after every removal) from taking them while the test works on them.
    for k in ["base", "b", "v"] {
        run(&["label", k, "containerd.io/gc.root=test"])?;
    }
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
    let fx = Fixture::with_registry()?;
    let image = fx
        .image("busybox")
        .busybox()?
        .build()?
        .push("plain/busybox:v1")?;

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

mod remote {
    use super::*;
    use beam_tests::beam;
    use beam_tests::snapshots_client::SnapshotsClient;
    use std::collections::HashMap;

    pub(super) const TARGET: &str = "containerd.io/snapshot.ref";
    pub(super) const IMAGE: &str = "containerd.io/snapshot/cri.image-ref";
    pub(super) const MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
    pub(super) const LAYER: &str = "containerd.io/snapshot/cri.layer-digest";

    fn start_daemon(root: &Path, socket: &Path, log: &Path, metrics: &str) -> Result<ChildGuard> {
        super::start_daemon(
            root,
            socket,
            log,
            &[
                "--metrics-address",
                metrics,
                "--plain-http",
                "--no-background-fetch",
                "--fetch-deadline",
                "10",
            ],
        )
    }

    fn mount_overlay(
        mounts: &[containerd_snapshots::api::types::Mount],
        target: &Path,
    ) -> Result<()> {
        let m = &mounts[0];
        std::fs::create_dir_all(target)?;
        let out = Command::new("mount")
            .args(["-t", &m.r#type, &m.source])
            .arg(target)
            .args(["-o", &m.options.join(",")])
            .output()?;
        ensure!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn converted_layers_are_committed_lazily_and_survive_a_daemon_kill() -> Result<()> {
        util::require_root()?;
        let fx = Fixture::with_proxy()?;
        let _unmount_work = util::UnmountOnDrop(fx.dir().to_path_buf());
        let proxy = fx.proxy();
        let bb = fx
            .image("bb")
            .busybox()?
            .files(&[("data/sevens.bin".into(), vec![7u8; 3 << 20])])?
            .build()?;
        let built = &bb.built;
        let converted = bb.convert("lazy/bb:v1", &[])?;
        let (image, manifest) = (converted.reference.clone(), converted.manifest_digest()?);
        // An unconverted image for the fallback.
        let plain = bb.push("plain/bb:v1")?;

        let place = Place::new()?;
        let (root, socket, log) = (&place.root, &place.socket, &place.log);
        let metrics = format!("127.0.0.1:{}", util::free_port()?);
        let mut daemon = start_daemon(root, socket, log, &metrics)?;
        let mut c = SnapshotsClient::connect(socket).await?;
        let labels_for = |i: usize, img: &str| -> HashMap<String, String> {
            [
                (TARGET, format!("layer-{i}")),
                (IMAGE, img.to_string()),
                (MANIFEST, manifest.clone()),
                (LAYER, built.layers[i].0.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        };
        proxy.clear();
        let mut parent = String::new();
        for i in 0..2 {
            let e = c
                .prepare(&format!("extract-{i}"), &parent, labels_for(i, &image))
                .await
                .expect_err("a converted layer must be committed by the snapshotter");
            ensure!(
                e.code() == tonic_code_already_exists(),
                "prepare answered {e:?}"
            );
            let info = c
                .stat(&format!("layer-{i}"))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ensure!(info.kind == 3, "layer-{i} is not committed: {info:?}");
            parent = format!("layer-{i}");
        }
        // No layer blob was downloaded: only manifests, indexes and nothing else yet.
        for (digest, ..) in &built.layers {
            ensure!(
                proxy.blob_requests_for(digest).is_empty(),
                "layer {digest} was downloaded"
            );
        }
        // A container's snapshot on top: the lazy layers are overlay lowerdirs.
        let mounts = c
            .prepare("ctr-1", "layer-1", HashMap::new())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let rootfs = fx.path("rootfs");
        mount_overlay(&mounts, &rootfs)?;
        let read = std::fs::read(rootfs.join("data/sevens.bin"));
        let ran = Command::new("chroot")
            .arg(&rootfs)
            .args(["/bin/sh", "-c", "echo lazy"])
            .output();
        let _ = util::umount(&rootfs);
        ensure!(
            read? == vec![7u8; 3 << 20],
            "wrong content through the lazy layer"
        );
        ensure!(String::from_utf8_lossy(&ran?.stdout).trim() == "lazy");

        // Fallback: an image without a Beam conversion gets an ordinary snapshot.
        let mut l = labels_for(0, &plain);
        l.insert(TARGET.into(), "plain-layer-0".into());
        let m = c
            .prepare("extract-plain", "", l)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(
            m[0].r#type == "bind",
            "fallback should be an ordinary snapshot: {m:?}"
        );
        ensure!(
            util::tail_file(log, 50).contains("no lazy mount"),
            "the fallback was not logged: {}",
            util::tail_file(log, 20)
        );

        // Prometheus metrics say what happened.
        let text = ureq::get(&format!("http://{metrics}/metrics"))
            .call()?
            .into_string()?;
        for want in [
            "beam_lazy_mounts_total 2",
            "beam_fallbacks_total 1",
            "beam_mounted_layers 2",
        ] {
            ensure!(text.contains(want), "metrics lack {want:?}:\n{text}");
        }
        ensure!(
            text.contains("beam_fetch_latency_seconds_count")
                && !text.contains("beam_fetch_bytes_total 0\n"),
            "no fetch metrics:\n{text}"
        );

        // `beam status` reads the same state over the control API.
        let status = beam::ok(&[
            "status",
            "--json",
            "--address",
            socket.to_str().context("utf-8")?,
        ])?;
        let st: serde_json::Value = serde_json::from_str(&status)?;
        ensure!(
            st["lazy_mounts"] == 2
                && st["fallbacks"] == 1
                && st["layers"].as_array().map(Vec::len) == Some(2),
            "beam status: {status}"
        );
        let data_layer = st["layers"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["layer"] == built.layers[1].0.as_str()))
            .context("data layer in status")?;
        // The data layer is small (its chunks fit the whole-layer threshold), so it was
        // fetched whole while it mounted and the file is read through FUSE passthrough.
        ensure!(
            data_layer["chunks_cached"] == data_layer["chunks_total"]
                && (data_layer["reads"].as_u64() >= Some(1)
                    || data_layer["passthrough_opens"].as_u64() >= Some(1)),
            "fetch progress of the data layer: {data_layer}"
        );

        // kill -9, restart: the lazy layers are remounted and new containers start.
        daemon.kill();
        drop(daemon);
        let daemon = start_daemon(root, socket, log, &metrics)?;
        let mut c = SnapshotsClient::connect(socket).await?;
        let mounts = c
            .prepare("ctr-2", "layer-1", HashMap::new())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        mount_overlay(&mounts, &rootfs)?;
        let read = std::fs::read(rootfs.join("data/sevens.bin"));
        let _ = util::umount(&rootfs);
        ensure!(
            read? == vec![7u8; 3 << 20],
            "wrong content after the restart"
        );

        for k in ["ctr-1", "ctr-2", "extract-plain", "layer-1", "layer-0"] {
            c.remove(k)
                .await
                .map_err(|e| anyhow::anyhow!("removing {k}: {e}"))?;
        }
        let mut daemon = daemon;
        daemon.stop(Duration::from_secs(10));
        let left = util::mounts_under(root)?;
        ensure!(left.is_empty(), "mounts left: {left:?}");
        Ok(())
    }

    pub(super) fn tonic_code_already_exists() -> containerd_snapshots::tonic::Code {
        containerd_snapshots::tonic::Code::AlreadyExists
    }
}

mod storm {
    use super::*;
    use beam_tests::snapshots_client::SnapshotsClient;
    use std::collections::HashMap;

    fn start(place: &Place) -> Result<ChildGuard> {
        place.start(&["--no-remote"], &[])
    }

    /// 200 clients prepare, commit and remove on overlapping chains at once; then the store
    /// is consistent (every committed chain intact, no active leftovers, no mounts, no
    /// directory without a record).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_storm_leaves_a_consistent_store() -> Result<()> {
        util::require_root()?;
        let place = Place::new()?;
        let (root, socket) = (&place.root, &place.socket);
        let mut daemon = start(&place)?;
        let mut c = SnapshotsClient::connect(socket).await?;
        c.prepare("base-a", "", HashMap::new()).await?;
        c.commit("base", "base-a", HashMap::new()).await?;
        let mut tasks = Vec::new();
        for i in 0..200 {
            let socket = socket.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = SnapshotsClient::connect(&socket).await?;
                // Chains overlap: every 10th worker builds on the committed snapshot of the
                // worker before it in its group, which may or may not exist yet.
                let parent = if i % 10 == 0 {
                    "base".to_string()
                } else {
                    format!("c-{}", i - 1)
                };
                let key = format!("k-{i}");
                match c.prepare(&key, &parent, HashMap::new()).await {
                    Ok(_) => {}
                    Err(e) if e.code() == containerd_snapshots::tonic::Code::NotFound => {
                        c.prepare(&key, "base", HashMap::new()).await?;
                    }
                    Err(e) => return Err(anyhow::anyhow!("prepare {key}: {e}")),
                }
                let mut labels = HashMap::new();
                labels.insert("worker".to_string(), i.to_string());
                c.commit(&format!("c-{i}"), &key, labels).await?;
                if i % 3 == 0 {
                    // Removing may be refused when another worker built on it: both are fine.
                    let _ = c.remove(&format!("c-{i}")).await;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let all = c.list().await?;
        let names: std::collections::HashSet<String> = all.iter().map(|i| i.name.clone()).collect();
        for i in &all {
            ensure!(i.kind == 3, "{} is not committed after the storm", i.name);
            ensure!(
                i.parent.is_empty() || names.contains(&i.parent),
                "{} has a missing parent {}",
                i.name,
                i.parent
            );
            if i.name != "base" {
                ensure!(
                    i.labels.contains_key("worker"),
                    "{} lost its labels",
                    i.name
                );
            }
        }
        let dirs = std::fs::read_dir(root.join("snapshotter/snapshots"))?.count();
        ensure!(
            dirs == all.len(),
            "{dirs} directories for {} snapshots",
            all.len()
        );
        daemon.stop(Duration::from_secs(10));
        ensure!(util::mounts_under(root)?.is_empty());
        Ok(())
    }

    /// kill -9 in the middle of a commit storm: after a restart every snapshot whose commit
    /// was answered is there with its labels, and new snapshots can be made on them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn kill_during_commits_loses_nothing_committed() -> Result<()> {
        util::require_root()?;
        let place = Place::new()?;
        let socket = &place.socket;
        let mut daemon = start(&place)?;
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let mut tasks = Vec::new();
        for w in 0..8 {
            let socket = socket.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(mut c) = SnapshotsClient::connect(&socket).await else {
                    return;
                };
                for n in 0..1000 {
                    let key = format!("w{w}-k{n}");
                    let name = format!("w{w}-c{n}");
                    if c.prepare(&key, "", HashMap::new()).await.is_err() {
                        return;
                    }
                    let mut labels = HashMap::new();
                    labels.insert("n".to_string(), n.to_string());
                    if c.commit(&name, &key, labels).await.is_err() {
                        return;
                    }
                    done.lock().unwrap().push(name);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        daemon.kill();
        for t in tasks {
            let _ = t.await;
        }
        drop(daemon);
        let committed = done.lock().unwrap().clone();
        ensure!(
            committed.len() > 10,
            "only {} commits before the kill",
            committed.len()
        );
        let mut daemon = start(&place)?;
        let mut c = SnapshotsClient::connect(socket).await?;
        for name in &committed {
            let info = c
                .stat(name)
                .await
                .map_err(|e| anyhow::anyhow!("{name} lost: {e}"))?;
            ensure!(
                info.kind == 3 && info.labels.contains_key("n"),
                "{name}: {info:?}"
            );
        }
        c.prepare("after", &committed[0], HashMap::new()).await?;
        daemon.stop(Duration::from_secs(10));
        Ok(())
    }

    /// The state disk fills up while snapshots are committed: a Commit that cannot be written
    /// is a gRPC error, the daemon goes on, every Commit acknowledged before is there, and once
    /// there is room again (and after a restart) Commits succeed.
    #[tokio::test]
    async fn a_full_state_disk_fails_commits_cleanly_and_loses_nothing() -> Result<()> {
        util::require_root()?;
        let place = Place::new()?;
        std::fs::create_dir_all(&place.root)?;
        nix::mount::mount(
            Some("tmpfs"),
            &place.root,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=6m"),
        )?;
        let socket = &place.socket;
        let mut daemon = start(&place)?;
        let mut c = SnapshotsClient::connect(socket).await?;
        // Labels of 32 KiB each, until the disk is full.
        let big = |n: usize| -> HashMap<String, String> {
            [("blob".to_string(), format!("{n}{}", "x".repeat(32 << 10)))].into()
        };
        let mut acknowledged = Vec::new();
        let mut refused = None;
        for n in 0..1000 {
            let key = format!("k{n}");
            if let Err(e) = c.prepare(&key, "", HashMap::new()).await {
                refused = Some(format!("prepare: {e}"));
                break;
            }
            match c.commit(&format!("c{n}"), &key, big(n)).await {
                Ok(()) => acknowledged.push(n),
                Err(e) => {
                    refused = Some(format!("commit: {e}"));
                    break;
                }
            }
        }
        let refused = refused.context("6 MiB never filled up")?;
        eprintln!(
            "full state disk: {} commits acknowledged, then {refused}",
            acknowledged.len()
        );
        ensure!(
            acknowledged.len() > 10,
            "only {} commits",
            acknowledged.len()
        );
        ensure!(
            refused.to_ascii_lowercase().contains("space"),
            "the error does not say the disk is full: {refused}"
        );
        // Still serving, and nothing acknowledged is lost.
        for n in &acknowledged {
            let info = c.stat(&format!("c{n}")).await?;
            ensure!(info.kind == 3 && info.labels == big(*n), "c{n} changed");
        }
        // Room again (what was not committed is removed): commits succeed, also after a
        // restart.
        for n in acknowledged.iter().rev().take(20) {
            c.remove(&format!("c{n}")).await?;
        }
        let _ = c.remove(&format!("k{}", acknowledged.len())).await;
        c.prepare("after", "", HashMap::new()).await?;
        c.commit("after-c", "after", HashMap::new()).await?;
        drop(c);
        daemon.stop(Duration::from_secs(10));
        let mut daemon = start(&place)?;
        let mut c = SnapshotsClient::connect(socket).await?;
        for n in acknowledged.iter().rev().skip(20) {
            ensure!(c.stat(&format!("c{n}")).await?.kind == 3, "c{n} lost");
        }
        ensure!(c.stat("after-c").await?.kind == 3, "after-c lost");
        drop(c);
        daemon.stop(Duration::from_secs(10));
        Ok(())
    }

    /// A damaged `metadata.redb` (its header overwritten, or the file cut short) stops the
    /// daemon with an error that names the file and the recovery, and changes nothing; the
    /// recovery as the error gives it (move the file aside, start again) starts an empty
    /// store and keeps the old snapshot directories aside, never deleting them.
    #[tokio::test]
    async fn a_damaged_metadata_database_is_a_clear_error_and_loses_nothing() -> Result<()> {
        util::require_root()?;
        for damage in ["header", "truncated"] {
            let place = Place::new()?;
            let (root, socket) = (&place.root, &place.socket);
            let mut daemon = start(&place)?;
            let mut c = SnapshotsClient::connect(socket).await?;
            c.prepare("a", "", HashMap::new()).await?;
            c.commit("committed", "a", HashMap::new()).await?;
            c.prepare("active", "committed", HashMap::new()).await?;
            drop(c);
            daemon.stop(Duration::from_secs(10));

            let db = root.join("snapshotter/metadata.redb");
            let mut bytes = std::fs::read(&db)?;
            match damage {
                "header" => bytes[..512].fill(0xAB),
                _ => bytes.truncate(bytes.len() / 3),
            }
            std::fs::write(&db, &bytes)?;
            let dirs_before = std::fs::read_dir(root.join("snapshotter/snapshots"))?.count();

            // The daemon refuses to start, says why and what to do, and touches nothing.
            let out = Command::new(util::cargo_bin("beam-snapshotter")?)
                .arg("--root")
                .arg(root)
                .arg("--address")
                .arg(socket)
                .arg("--no-remote")
                .output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(
                !out.status.success(),
                "{damage}: a daemon started on a damaged database"
            );
            ensure!(
                err.contains(&db.display().to_string())
                    && err.contains("is damaged")
                    && err.contains("A damaged snapshot database"),
                "{damage}: the error does not name the file and the recovery: {err}"
            );
            ensure!(
                std::fs::read(&db)? == bytes,
                "{damage}: the damaged file was changed ({} bytes, was {}): {err}",
                std::fs::metadata(&db)?.len(),
                bytes.len()
            );
            ensure!(
                std::fs::read_dir(root.join("snapshotter/snapshots"))?.count() == dirs_before,
                "{damage}: snapshot directories were removed"
            );

            // The recovery: move it aside and start again.
            std::fs::rename(&db, db.with_extension("redb.damaged"))?;
            let mut daemon = start(&place)?;
            let mut c = SnapshotsClient::connect(socket).await?;
            ensure!(c.list().await?.is_empty(), "{damage}: a new store is empty");
            c.prepare("new", "", HashMap::new()).await?;
            drop(c);
            daemon.stop(Duration::from_secs(10));
            let aside: Vec<_> = std::fs::read_dir(root.join("snapshotter"))?
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("snapshots.orphaned-")
                })
                .collect();
            ensure!(
                aside.len() == 1 && std::fs::read_dir(aside[0].path())?.count() == dirs_before,
                "{damage}: the old snapshot directories were not kept aside: {aside:?}"
            );
        }
        Ok(())
    }
}

/// Crash points (`BEAM_CRASH_AT`): the daemon SIGKILLs itself at each step of
/// Prepare, Commit, Remove and a lazy mount; restarted, its store is consistent (one directory
/// per record, nothing mounted that no record names), the interrupted request either took
/// effect wholly or not at all, and asking again completes it.
mod crash_points {
    use super::remote::{tonic_code_already_exists, IMAGE, LAYER, MANIFEST, TARGET};
    use super::*;
    use beam_tests::snapshots_client::SnapshotsClient;
    use std::collections::HashMap;
    use std::os::unix::process::ExitStatusExt;

    const POINTS: &[&str] = &[
        "prepare.dirs-made",
        "prepare.recorded",
        "commit.measured",
        "commit.recorded",
        "remove.forgotten",
        "remove.dir-deleted",
        "lazy.mounted",
        "lazy.recorded",
        "remove.unmounted",
    ];

    fn start(place: &Place, crash_at: Option<&str>) -> Result<ChildGuard> {
        let env: Vec<(&str, &str)> = crash_at.map(|p| ("BEAM_CRASH_AT", p)).into_iter().collect();
        place.start(&["--plain-http", "--no-background-fetch"], &env)
    }

    fn dirs(root: &Path) -> Result<usize> {
        Ok(std::fs::read_dir(root.join("snapshotter/snapshots"))?.count())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kill_at_any_step_leaves_a_consistent_store_and_the_request_can_be_repeated(
    ) -> Result<()> {
        util::require_root()?;
        let fx = Fixture::with_registry()?;
        let _unmount_work = util::UnmountOnDrop(fx.dir().to_path_buf());
        let bb = fx.image("bb").busybox()?.build()?;
        let converted = bb.convert("crash/bb:v1", &[])?;
        let lazy_labels: HashMap<String, String> = [
            (TARGET, "layer-0".to_string()),
            (IMAGE, converted.reference.clone()),
            (MANIFEST, converted.manifest_digest()?),
            (LAYER, bb.built.layers[0].0.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let none = HashMap::<String, String>::new;

        for &point in POINTS {
            let place = Place::new()?;
            let (root, socket, log) = (&place.root, &place.socket, &place.log);
            let mut daemon = start(&place, Some(point))?;
            let mut c = SnapshotsClient::connect(socket).await.with_context(|| {
                format!(
                    "{point}: connecting; daemon {:?}, log:\n{}",
                    daemon.try_wait(),
                    util::tail_file(log, 30)
                )
            })?;
            let op = point.split('.').next().unwrap_or_default();
            // What comes before the request that meets the crash point.
            match point {
                "commit.measured" | "commit.recorded" => {
                    c.prepare("a", "", none()).await?;
                }
                "remove.forgotten" | "remove.dir-deleted" => {
                    c.prepare("a", "", none()).await?;
                    c.commit("c", "a", none()).await?;
                }
                "remove.unmounted" => {
                    let e = c.prepare("extract", "", lazy_labels.clone()).await;
                    ensure!(
                        e.is_err_and(|e| e.code() == tonic_code_already_exists()),
                        "{point}: the lazy layer was not committed"
                    );
                }
                _ => {}
            }
            let answer = match (op, point) {
                ("prepare", _) => c.prepare("a", "", none()).await.map(|_| ()),
                ("commit", _) => c.commit("c", "a", none()).await,
                (_, "remove.unmounted") => c.remove("layer-0").await,
                ("remove", _) => c.remove("c").await,
                _ => c
                    .prepare("extract", "", lazy_labels.clone())
                    .await
                    .map(|_| ()),
            };
            ensure!(
                answer.is_err(),
                "{point}: the request was answered; daemon log:\n{}",
                util::tail_file(log, 30)
            );
            drop(c);
            let died = util::wait_for(
                || daemon.try_wait().ok().flatten().is_some(),
                Duration::from_secs(20),
            );
            ensure!(died, "{point}: the daemon did not die at its crash point");
            let status = daemon.try_wait()?.context("exit status")?;
            ensure!(
                status.signal() == Some(9),
                "{point}: the daemon ended with {status}, not SIGKILL: {}",
                util::tail_file(log, 20)
            );

            // Restarted: consistent, and the request completes when asked again.
            let mut daemon = start(&place, None)?;
            let mut c = SnapshotsClient::connect(socket).await?;
            let records = c.list().await?.len();
            ensure!(
                dirs(root)? == records,
                "{point}: {} snapshot directories for {records} records",
                dirs(root)?
            );
            let lazy_records = usize::from(c.stat("layer-0").await.is_ok());
            let mounted = util::mounts_under(&root.join("snapshotter/snapshots"))?;
            ensure!(
                mounted.len() == lazy_records,
                "{point}: mounted {mounted:?} for {lazy_records} lazy records"
            );
            match (op, point) {
                ("prepare", _) => {
                    if c.stat("a").await.is_err() {
                        c.prepare("a", "", none()).await?;
                    }
                    ensure!(c.stat("a").await?.kind == 2, "{point}: a is not active");
                    c.mounts("a").await?;
                }
                ("commit", _) => {
                    let (a, committed) = (c.stat("a").await.ok(), c.stat("c").await.ok());
                    match (a, committed) {
                        (None, Some(i)) if i.kind == 3 => {}
                        (Some(i), None) if i.kind == 2 => c.commit("c", "a", none()).await?,
                        other => anyhow::bail!("{point}: half a commit: {other:?}"),
                    }
                    ensure!(c.stat("c").await?.kind == 3, "{point}: c not committed");
                }
                (_, "remove.unmounted") => {
                    if c.stat("layer-0").await.is_ok() {
                        c.remove("layer-0").await?;
                    }
                    ensure!(
                        c.stat("layer-0").await.is_err(),
                        "{point}: layer-0 is there"
                    );
                }
                ("remove", _) => {
                    if c.stat("c").await.is_ok() {
                        c.remove("c").await?;
                    }
                    ensure!(c.stat("c").await.is_err(), "{point}: c is still there");
                }
                _ => {
                    if c.stat("layer-0").await.is_err() {
                        let e = c.prepare("extract", "", lazy_labels.clone()).await;
                        ensure!(
                            e.is_err_and(|e| e.code() == tonic_code_already_exists()),
                            "{point}: asked again, the lazy layer was not committed"
                        );
                    }
                    ensure!(
                        c.stat("layer-0").await?.kind == 3,
                        "{point}: layer-0 is not committed"
                    );
                    // It serves: a snapshot on top of it mounts.
                    c.prepare("top", "layer-0", none()).await?;
                }
            }
            let records = c.list().await?.len();
            ensure!(
                dirs(root)? == records,
                "{point}: after asking again, {} directories for {records} records",
                dirs(root)?
            );
            drop(c);
            daemon.stop(Duration::from_secs(10));
            eprintln!("{point}: consistent after the kill; {records} snapshots");
        }
        Ok(())
    }
}

mod footprint {
    use super::*;
    use beam_tests::snapshots_client::SnapshotsClient;
    use std::collections::HashMap;

    /// Resident memory of the daemon with 20 lazy layers mounted stays under 64 MiB (the
    /// issue's goal; 16 MiB FUSE buffers per thread once made it 360 MiB).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_rss_with_twenty_lazy_layers() -> Result<()> {
        util::require_root()?;
        let fx = Fixture::with_registry()?;
        let mut twenty = fx.image("twenty");
        for i in 0..20 {
            let text = format!("layer {i}\n").repeat(1000).into_bytes();
            twenty = twenty.files(&[(format!("f{i}.txt"), text)])?;
        }
        let twenty = twenty.build()?;
        let built = &twenty.built;
        let converted = twenty.convert("twenty:v1", &[])?;
        let (image, manifest) = (converted.reference.clone(), converted.manifest_digest()?);
        let daemon = Daemon::start_with(&["--plain-http", "--no-background-fetch"])?;
        let mut c = SnapshotsClient::connect(&daemon.socket).await?;
        let rss = |_| daemon.memory_kib("VmRSS");
        println!("beam-snapshotter RSS at start: {} KiB", rss(())?);
        let mut parent = String::new();
        for i in 0..20 {
            if i == 1 {
                println!("beam-snapshotter RSS with 1 lazy layer: {} KiB", rss(())?);
            }
            let labels: HashMap<String, String> = [
                ("containerd.io/snapshot.ref", format!("layer-{i}")),
                ("containerd.io/snapshot/cri.image-ref", image.clone()),
                (
                    "containerd.io/snapshot/cri.manifest-digest",
                    manifest.clone(),
                ),
                (
                    "containerd.io/snapshot/cri.layer-digest",
                    built.layers[i].0.clone(),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let e = c
                .prepare(&format!("x-{i}"), &parent, labels)
                .await
                .expect_err("lazy");
            ensure!(
                e.code() == containerd_snapshots::tonic::Code::AlreadyExists,
                "{e:?}"
            );
            parent = format!("layer-{i}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_kib = rss(())?;
        println!("beam-snapshotter RSS with 20 lazy layers: {} KiB", rss_kib);
        ensure!(rss_kib < 64 * 1024, "RSS {rss_kib} KiB with 20 lazy layers");
        for i in (0..20).rev() {
            c.remove(&format!("layer-{i}")).await?;
        }
        drop(c);
        daemon.stop()
    }

    /// 200 clients at once, over 20 converted images: each asks for its image's layer lazily
    /// (ten clients per layer race to mount it), prepares a container snapshot on it and
    /// removes that; then the 20 layers are removed at once. Every client succeeds, the store
    /// ends empty with nothing mounted, and the daemon's peak memory stays bounded (printed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_hundred_clients_over_twenty_lazy_images() -> Result<()> {
        util::require_root()?;
        let fx = Fixture::with_registry()?;
        let mut images = Vec::new();
        for n in 0..20u64 {
            let image = fx
                .image(&format!("load{n}"))
                .files(&[(format!("f{n}.bin"), util::noise(n, 200_000))])?
                .build()?;
            let layer = image.built.layers[0].0.clone();
            let converted = image.convert(&format!("load/i{n}:v1"), &[])?;
            images.push((
                converted.reference.clone(),
                converted.manifest_digest()?,
                layer,
            ));
        }
        let daemon = Daemon::start_with(&["--plain-http", "--no-background-fetch"])?;
        let (socket, root) = (daemon.socket.clone(), daemon.root.clone());
        let images = std::sync::Arc::new(images);
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for k in 0..200usize {
            let (socket, images) = (socket.clone(), images.clone());
            tasks.push(tokio::spawn(async move {
                let n = k % 20;
                let (reference, manifest, layer) = &images[n];
                let mut c = SnapshotsClient::connect(&socket).await?;
                let labels: HashMap<String, String> = [
                    ("containerd.io/snapshot.ref", format!("img-{n}")),
                    ("containerd.io/snapshot/cri.image-ref", reference.clone()),
                    (
                        "containerd.io/snapshot/cri.manifest-digest",
                        manifest.clone(),
                    ),
                    ("containerd.io/snapshot/cri.layer-digest", layer.clone()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                let e = c
                    .prepare(&format!("extract-{k}"), "", labels)
                    .await
                    .expect_err("a lazy layer is committed by the snapshotter");
                ensure!(
                    e.code() == containerd_snapshots::tonic::Code::AlreadyExists,
                    "client {k}: {e:?}"
                );
                c.prepare(&format!("ctr-{k}"), &format!("img-{n}"), HashMap::new())
                    .await
                    .map_err(|e| anyhow::anyhow!("client {k}: prepare on img-{n}: {e}"))?;
                c.remove(&format!("ctr-{k}"))
                    .await
                    .map_err(|e| anyhow::anyhow!("client {k}: remove: {e}"))?;
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let mut removals = Vec::new();
        for n in 0..20 {
            let socket = socket.clone();
            removals.push(tokio::spawn(async move {
                let mut c = SnapshotsClient::connect(&socket).await?;
                c.remove(&format!("img-{n}")).await?;
                anyhow::Ok(())
            }));
        }
        for t in removals {
            t.await??;
        }
        let took = started.elapsed();
        let peak_kib = daemon.memory_kib("VmHWM")?;
        let mut c = SnapshotsClient::connect(&socket).await?;
        ensure!(c.list().await?.is_empty(), "snapshots left");
        ensure!(
            std::fs::read_dir(root.join("snapshotter/snapshots"))?.count() == 0,
            "snapshot directories left"
        );
        ensure!(
            util::mounts_under(&root.join("snapshotter"))?.is_empty(),
            "mounts left"
        );
        println!(
            "200 clients over 20 lazy images: {took:?}, beam-snapshotter peak RSS {} MiB",
            peak_kib / 1024
        );
        ensure!(
            peak_kib < 256 * 1024,
            "peak RSS {peak_kib} KiB under 200 clients"
        );
        drop(c);
        daemon.stop()
    }
}

#[test]
fn configuration_file_and_flags() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bin = util::cargo_bin("beam-snapshotter")?;
    let cfg = dir.path().join("beam.toml");
    std::fs::write(&cfg, "root = \"/srv/beam\"\n[fetch]\nconcurrency = 3\n")?;
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .args(["--print-config", "--cache-budget", "1000"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("root = \"/srv/beam\"")
            && text.contains("concurrency = 3")
            && text.contains("budget_bytes = 1000"),
        "effective configuration: {text}"
    );
    // A misspelt key stops the daemon, naming the key.
    std::fs::write(&cfg, "[fetch]\nconcurency = 3\n")?;
    let out = Command::new(&bin).arg("--config").arg(&cfg).output()?;
    ensure!(!out.status.success(), "a bad configuration was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("concurency"),
        "error does not name the key: {err}"
    );
    Ok(())
}
