//! A user's whole path, on containerd 1.7 and 2.x (and bookworm's 1.6): registry, containerd
//! with Beam configured from `deploy/containerd/`, beam-snapshotter reading containerd's own
//! `hosts.toml` directory, and a python image of a few hundred MB in five layers, converted.
//!
//! - `beam pull` + `ctr run --snapshotter beam`: no original layer is downloaded, and the bytes
//!   fetched for `python3 -c 'print(1)'` stay under 20% of the image's compressed size;
//! - the kubelet path (CRI, acting as kubelet): PullImage, RunPodSandbox, CreateContainer,
//!   StartContainer, log, stop, remove, RemoveImage, with the same assertions;
//! - after image removal and containerd's GC: no snapshot, lazy mount or mount left;
//! - a containerd with the remote-snapshot annotations left off downloads every layer, the
//!   daemon counts the unlabelled requests, and `beam doctor` names the line to change.

use anyhow::{bail, ensure, Context, Result};
use beam_tests::containerd::{self, BeamCri, ContainerdVersion, CriConfig};
use beam_tests::cri::Kubelet;
use beam_tests::lazy_registry::LazyRegistry;
use beam_tests::util;
use beam_tests::{beam, oci_layout};
use beam_tests::{BeamDaemon, Compression, Containerd, ContainerdOptions, LayerSpec};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// The python layers (`make-python-layers.sh --large`), built once per test process and
/// kept under `target/` between runs (they depend only on the Debian packages).
fn python_layers() -> Result<Vec<PathBuf>> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let dir = util::workspace_root().join("target/beam-fixtures/python-large");
            if !dir.join("layers.txt").is_file() {
                let _ = std::fs::remove_dir_all(&dir);
                util::run_fixture("make-python-layers.sh", &[Path::new("--large"), &dir])
                    .map_err(|e| format!("{e:#}"))?;
            }
            Ok(dir)
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("building the python layers: {e}"))?;
    util::layers_listed_in(dir)
}

/// beam-snapshotter's cache budget in these tests.
const CACHE_BUDGET: u64 = 4 << 20;

/// Registry (behind a recording proxy), images, beam-snapshotter and containerd, dropped in
/// the reverse order (containerd before the daemon it uses).
struct Env {
    containerd: Containerd,
    daemon: BeamDaemon,
    reg: LazyRegistry,
    /// Converted python image, and its manifest's layers (digest, size).
    python: Option<(String, Vec<(String, u64)>)>,
}

impl Env {
    fn start(version: ContainerdVersion, cri_mode: BeamCri, with_python: bool) -> Result<Env> {
        let reg = LazyRegistry::start("e2e")?;
        let python = if with_python {
            let tars = python_layers()?;
            let specs: Vec<LayerSpec> = tars
                .iter()
                .map(|t| LayerSpec::new(t, Compression::Gzip))
                .collect();
            let built = oci_layout::build_with_config(
                &reg.layout,
                "python",
                &specs,
                &beam_tests::ImageConfig {
                    cmd: Some(vec!["/usr/bin/python3".into()]),
                    env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
                    ..Default::default()
                },
            )?;
            let image = format!("{}/e2e/python:1", reg.proxy.addr());
            beam::ok(&[
                "convert",
                "--plain-http",
                &format!("oci:{}:python", reg.layout.display()),
                &image,
            ])?;
            let layers = built
                .layers
                .iter()
                .map(|(d, _, s)| (d.clone(), *s))
                .collect();
            Some((image, layers))
        } else {
            None
        };

        // beam-snapshotter reads containerd's hosts.toml directory. A small cache budget:
        // what unmounted layers leave in the cache must go.
        let daemon = BeamDaemon::start(&[
            "--hosts-dir",
            &reg.hosts_arg()?,
            "--no-background-fetch",
            "--cache-budget",
            &CACHE_BUDGET.to_string(),
        ])?;
        let containerd = Containerd::start_with(ContainerdOptions {
            version,
            cri: true,
            cri_config: CriConfig {
                sandbox_image: Some(reg.pause.clone()),
                registry_config_path: Some(reg.hosts.path().to_path_buf()),
                ..Default::default()
            },
            extra_config: containerd::beam_plugin_config(
                version,
                daemon.socket(),
                daemon.root(),
                cri_mode,
            )?,
            ..Default::default()
        })?;
        Ok(Env {
            containerd,
            daemon,
            reg,
            python,
        })
    }

    /// Snapshots of the beam snapshotter in containerd namespace `ns`.
    fn snapshots(&self, ns: &str) -> Result<Vec<String>> {
        let mut cmd = self.containerd.ctr_command();
        // ctr_command names the harness namespace; a later --namespace wins.
        cmd.args([
            "--namespace",
            ns,
            "snapshots",
            "--snapshotter",
            "beam",
            "ls",
        ]);
        let out = util::run_checked(&mut cmd, Duration::from_secs(60))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect())
    }

    /// `beam doctor` against this containerd and daemon: (success, stdout).
    fn doctor(&self) -> Result<(bool, String)> {
        beam::doctor(&self.containerd, self.daemon.socket())
    }

    /// Asserts that none of `layers` was downloaded whole.
    fn assert_no_layer_downloaded(&self, layers: &[(String, u64)]) -> Result<()> {
        for (digest, size) in layers {
            let reqs = self.reg.proxy.blob_requests_for(digest);
            ensure!(
                reqs.is_empty(),
                "original layer {digest} ({size} bytes) was downloaded: {reqs:?}"
            );
        }
        Ok(())
    }

    fn stop(self) -> Result<()> {
        let Env {
            containerd, daemon, ..
        } = self;
        drop(containerd);
        daemon.stop()
    }
}

/// `beam pull` + `ctr run`, then the kubelet path, on one containerd.
fn user_paths(version: ContainerdVersion) -> Result<()> {
    util::require_root()?;
    if !containerd::require_version(version)? {
        return Ok(());
    }
    let env = Env::start(version, BeamCri::AsDeployed, true)?;
    let c = &env.containerd;
    let (python, layers) = env.python.clone().context("python image")?;
    let compressed: u64 = layers.iter().map(|(_, s)| s).sum();
    let (ok, report) = env.doctor()?;
    ensure!(ok, "beam doctor finds fault with a good setup:\n{report}");

    // --- ctr users: beam pull, then ctr run ---------------------------------------------
    env.reg.proxy.clear();
    let out = beam::ok(&[
        "pull",
        "--address",
        c.address().to_str().context("utf-8")?,
        "--namespace",
        c.namespace(),
        "--plain-http",
        "--json",
        &python,
    ])?;
    let r: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        r["lazy"] == layers.len() && r["downloaded"] == 0,
        "beam pull: {r}"
    );
    let printed = c.run_with(
        &["--snapshotter", "beam"],
        &python,
        "e2e-print",
        &["python3", "-c", "print(1)"],
    )?;
    ensure!(printed == "1\n", "python printed {printed:?}");
    env.assert_no_layer_downloaded(&layers)?;
    let fetched = env.reg.proxy.blob_bytes_sent();
    let share = fetched as f64 / compressed as f64;
    eprintln!(
        "containerd {}: beam pull + ctr run python3 -c 'print(1)': fetched {fetched} bytes of a \
         {compressed}-byte image ({:.1}%)",
        c.version_string(),
        share * 100.0
    );
    ensure!(
        share < 0.20,
        "fetched {fetched} bytes, {:.1}% of the image's {compressed} compressed bytes",
        share * 100.0
    );
    c.ctr(&["images", "rm", "--sync", &python])?;
    ensure!(
        util::wait_for(
            || env.snapshots(c.namespace()).is_ok_and(|s| s.is_empty()),
            Duration::from_secs(30)
        ),
        "snapshots left after ctr image rm: {:?}",
        env.snapshots(c.namespace())?
    );
    ensure!(
        util::wait_for(
            || env.daemon.lazy_layers().is_ok_and(|n| n == 0),
            Duration::from_secs(30)
        ),
        "lazy layers left after ctr image rm: {}",
        env.daemon.status()?
    );

    // Unpinned chunks beyond the budget were evicted: the kubelet path starts cold.
    let st = env.daemon.status()?;
    ensure!(
        st["cache_bytes"]
            .as_u64()
            .is_some_and(|b| b <= CACHE_BUDGET),
        "cache over its {CACHE_BUDGET}-byte budget after image removal: {st}"
    );

    // --- the kubelet path ----------------------------------------------------------------
    env.reg.proxy.clear();
    let before = env.daemon.status()?["lazy_mounts"].as_u64().unwrap_or(0);
    {
        let mut kubelet = Kubelet::connect(c)?;
        kubelet.client().pull_image(&python, None)?;
        env.assert_no_layer_downloaded(&layers)?;
        let after = env.daemon.status()?["lazy_mounts"].as_u64().unwrap_or(0);
        ensure!(
            after - before == layers.len() as u64,
            "CRI's pull mounted {} layers lazily, expected {}",
            after - before,
            layers.len()
        );
        let pod = kubelet.run_pod("e2e")?;
        let (code, out) = kubelet.run_container(
            &pod,
            "print",
            &python,
            &["python3", "-c", "print(1)"],
            Duration::from_secs(120),
        )?;
        ensure!(
            code == 0 && out == "1\n",
            "container exited {code}, printed {out:?}"
        );
        kubelet.client().pull_image(&env.reg.busybox, None)?;
        let (code, out) = kubelet.run_container(
            &pod,
            "cat",
            &env.reg.busybox,
            &["cat", "/etc/group"],
            Duration::from_secs(60),
        )?;
        ensure!(
            code == 0 && out == "root:x:0:\n",
            "busybox exited {code}, printed {out:?}"
        );
        env.assert_no_layer_downloaded(&layers)?;
        let fetched = env.reg.proxy.blob_bytes_sent();
        eprintln!(
            "containerd {}: CRI pull + pod + python3 -c 'print(1)' + busybox: fetched {fetched} \
             bytes ({:.1}% of the python image)",
            c.version_string(),
            fetched as f64 / compressed as f64 * 100.0
        );
        ensure!(
            (fetched as f64) < 0.20 * compressed as f64,
            "the kubelet path fetched {fetched} bytes of a {compressed}-byte image"
        );
        kubelet.remove_pod(&pod)?;
        kubelet.client().remove_image(&python)?;
        kubelet.client().remove_image(&env.reg.busybox)?;
        kubelet.cleanup()?;
    }
    // containerd collects the removed images' snapshots; the daemon unmounts their layers.
    ensure!(
        util::wait_for(
            || env.daemon.lazy_layers().is_ok_and(|n| n == 0),
            Duration::from_secs(60)
        ),
        "lazy layers left after RemoveImage and GC: {}",
        env.daemon.status()?
    );
    let left = util::mounts_under(env.daemon.root())?;
    ensure!(left.is_empty(), "mounts left: {left:?}");
    let st = env.daemon.status()?;
    ensure!(
        st["cache_bytes"]
            .as_u64()
            .is_some_and(|b| b <= CACHE_BUDGET),
        "cache over its {CACHE_BUDGET}-byte budget after RemoveImage: {st}"
    );
    env.stop()
}

/// CRI with the remote-snapshot annotations left off: full downloads, made visible.
fn misconfiguration_is_detected(version: ContainerdVersion) -> Result<()> {
    util::require_root()?;
    if !containerd::require_version(version)? {
        return Ok(());
    }
    let env = Env::start(version, BeamCri::AnnotationsDisabled, false)?;
    env.reg.proxy.clear();
    {
        let mut kubelet = Kubelet::connect(&env.containerd)?;
        kubelet.client().pull_image(&env.reg.busybox, None)?;
        kubelet.client().remove_image(&env.reg.busybox)?;
    }
    // The busybox layer (about 1 MB compressed; configs and Beam indexes are a few KB) was
    // downloaded in full, although the image is converted.
    let layer_gets: Vec<_> = env
        .reg
        .proxy
        .blob_requests()
        .into_iter()
        .filter(|r| r.range.is_none() && r.body_bytes > 200_000)
        .collect();
    ensure!(
        !layer_gets.is_empty(),
        "no whole-blob download seen: {:?}",
        env.reg.proxy.records()
    );
    let st = env.daemon.status()?;
    ensure!(
        st["unlabelled_layer_prepares"].as_u64().unwrap_or(0) >= 1 && st["lazy_mounts"] == 0,
        "the daemon did not see the unlabelled pull: {st}"
    );
    let (ok, report) = env.doctor()?;
    ensure!(
        !ok,
        "beam doctor passed a misconfigured containerd:\n{report}"
    );
    let config = env.containerd.config_path().display().to_string();
    let line = report
        .lines()
        .find(|l| l.contains("fix:") && l.contains("disable_snapshot_annotations = false"))
        .with_context(|| format!("beam doctor did not say what to change:\n{report}"))?;
    ensure!(
        line.contains(&format!("{config}:")),
        "the fix names no line of {config}: {line}"
    );
    ensure!(
        report.contains("downloaded in full"),
        "beam doctor does not say the layers were downloaded:\n{report}"
    );
    eprintln!(
        "beam doctor on containerd {}:\n{report}",
        env.containerd.version_string()
    );
    env.stop()
}

#[test]
fn user_paths_containerd_1_7() -> Result<()> {
    user_paths(ContainerdVersion::V1_7)
}

#[test]
fn user_paths_containerd_2() -> Result<()> {
    user_paths(ContainerdVersion::V2)
}

#[test]
fn misconfiguration_is_detected_containerd_1_7() -> Result<()> {
    misconfiguration_is_detected(ContainerdVersion::V1_7)
}

#[test]
fn misconfiguration_is_detected_containerd_2() -> Result<()> {
    misconfiguration_is_detected(ContainerdVersion::V2)
}

/// nerdctl is not installable here; when it is on PATH the suite runs it too.
#[test]
fn nerdctl_pull_and_run_when_available() -> Result<()> {
    util::require_root()?;
    let Some(nerdctl) = util::find_on_path("nerdctl") else {
        eprintln!("SKIPPED: nerdctl is not on PATH");
        return Ok(());
    };
    let env = Env::start(ContainerdVersion::System, BeamCri::AsDeployed, false)?;
    let c = &env.containerd;
    let mut cmd = std::process::Command::new(nerdctl);
    cmd.arg("--address")
        .arg(c.address())
        .args(["--namespace", c.namespace(), "--snapshotter", "beam"])
        .arg("--insecure-registry")
        .args([
            "run",
            "--rm",
            "--net",
            "host",
            &env.reg.busybox,
            "cat",
            "/etc/group",
        ]);
    let out = util::run_checked(&mut cmd, Duration::from_secs(120))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text != "root:x:0:\n" {
        bail!("nerdctl run printed {text:?}");
    }
    env.stop()
}
