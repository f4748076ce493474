//! `beam node-setup` on sample containerd configs (none, version 2 with CRI settings and a
//! mirror, version 3, already set up): the user's settings survive, twice changes nothing,
//! `--dry-run` writes nothing, `--uninstall` restores the file; and containerd started with
//! the result pulls a converted image lazily through CRI.

use anyhow::{ensure, Context, Result};
use beam_tests::containerd::{self, ContainerdVersion, CriConfig};
use beam_tests::cri::Kubelet;
use beam_tests::lazy_registry::LazyRegistry;
use beam_tests::util;
use beam_tests::{beam, BeamDaemon, Containerd, ContainerdOptions};
use std::path::{Path, PathBuf};

/// The lazy-pull registry (converted busybox, pause image, hosts.toml) and beam-snapshotter.
struct Node {
    daemon: BeamDaemon,
    reg: LazyRegistry,
}

impl Node {
    fn start() -> Result<Node> {
        let reg = LazyRegistry::start("node")?;
        let daemon =
            BeamDaemon::start(&["--hosts-dir", &reg.hosts_arg()?, "--no-background-fetch"])?;
        Ok(Node { daemon, reg })
    }

    fn config_path(&self) -> PathBuf {
        self.reg.work.path().join("etc-containerd/config.toml")
    }

    /// `beam node-setup ARGS... --containerd-config ... --no-install --beam-address ...`.
    fn node_setup(&self, version: ContainerdVersion, extra: &[&str]) -> Result<String> {
        let config = self.config_path();
        let bin = version.containerd_bin();
        let mut args = vec![
            "node-setup",
            "--containerd-config",
            config.to_str().context("utf-8")?,
            "--no-install",
            "--no-restart",
            "--beam-address",
            self.daemon.socket().to_str().context("utf-8")?,
            "--beam-root",
            self.daemon.root().to_str().context("utf-8")?,
            "--containerd-bin",
            bin.to_str().context("utf-8")?,
        ];
        args.extend_from_slice(extra);
        beam::ok(&args)
    }

    /// Start containerd `version` with the node's config file (on top of the harness's
    /// private root, state, socket and CRI test settings) and pull the converted image
    /// through CRI: it must be mounted lazily, no layer downloaded.
    fn containerd_pulls_lazily(&self, version: ContainerdVersion) -> Result<()> {
        let text = std::fs::read_to_string(self.config_path())?;
        let c = Containerd::start_with(ContainerdOptions {
            version,
            cri: true,
            cri_config: CriConfig {
                sandbox_image: Some(self.reg.pause.clone()),
                registry_config_path: Some(self.reg.hosts.path().to_path_buf()),
                ..Default::default()
            },
            extra_config: text,
            ..Default::default()
        })?;
        self.reg.proxy.clear();
        let before = self.daemon.status()?["lazy_mounts"].as_u64().unwrap_or(0);
        {
            let mut kubelet = Kubelet::connect(&c)?;
            kubelet.client().pull_image(&self.reg.busybox, None)?;
            let pod = kubelet.run_pod("node")?;
            let (code, out) = kubelet.run_container(
                &pod,
                "cat",
                &self.reg.busybox,
                &["cat", "/etc/group"],
                std::time::Duration::from_secs(60),
            )?;
            ensure!(
                code == 0 && out == "root:x:0:\n",
                "exited {code}, printed {out:?}"
            );
            kubelet.remove_pod(&pod)?;
            kubelet.client().remove_image(&self.reg.busybox)?;
            kubelet.cleanup()?;
        }
        let after = self.daemon.status()?["lazy_mounts"].as_u64().unwrap_or(0);
        ensure!(
            after > before,
            "containerd {} did not pull lazily with the node-setup config:\n{}",
            c.version_string(),
            std::fs::read_to_string(self.config_path())?
        );
        let whole: Vec<_> = self
            .reg
            .proxy
            .blob_requests()
            .into_iter()
            .filter(|r| r.range.is_none() && r.body_bytes > 200_000)
            .collect();
        // The pause image (not converted) is downloaded; the busybox layer it shares is the
        // only big blob, so whole downloads may only be the pause image's own layers.
        ensure!(
            whole.iter().all(|r| !r.path.contains("/node/busybox/")),
            "the converted image was downloaded: {whole:?}"
        );
        drop(c);
        Ok(())
    }

    fn stop(self) -> Result<()> {
        self.daemon.stop()
    }
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

/// Setup, twice, dry run, containerd pulls lazily, uninstall restores `sample` (None: the
/// file did not exist; `@HOSTS@` in it names the node's hosts.toml directory).
fn check(version: ContainerdVersion, sample: Option<&str>, want_version: i64) -> Result<()> {
    util::require_root()?;
    if !containerd::require_version(version)? {
        return Ok(());
    }
    let node = Node::start()?;
    let original =
        sample.map(|t| t.replace("@HOSTS@", &node.reg.hosts.path().display().to_string()));
    let path = node.config_path();
    std::fs::create_dir_all(path.parent().context("parent")?)?;
    if let Some(text) = &original {
        std::fs::write(&path, text)?;
    }

    let dry = node.node_setup(version, &["--dry-run"])?;
    ensure!(
        dry.contains("+") && dry.contains("dry run"),
        "dry run printed no diff: {dry}"
    );
    match &original {
        Some(text) => ensure!(read(&path)? == *text, "--dry-run changed the file"),
        None => ensure!(!path.exists(), "--dry-run created the file"),
    }

    let out = node.node_setup(version, &[])?;
    ensure!(
        out.contains("snapshotter = \"beam\""),
        "node-setup did not report its changes: {out}"
    );
    let written = read(&path)?;
    let v: toml::Table = written.parse()?;
    ensure!(
        v.get("version").and_then(|x| x.as_integer()) == Some(want_version),
        "config version: {written}"
    );
    if let Some(text) = &original {
        // Every line of the user's file is still there.
        for line in text.lines().filter(|l| {
            !l.trim().is_empty()
                && !l.contains("snapshotter =")
                && !l.contains("disable_snapshot_annotations")
        }) {
            ensure!(
                written.contains(line),
                "node-setup lost {line:?}:\n{written}"
            );
        }
    }
    let again = node.node_setup(version, &[])?;
    ensure!(
        again.contains("already set up") && read(&path)? == written,
        "second run changed something: {again}"
    );

    node.containerd_pulls_lazily(version)?;

    // beam doctor agrees with the file node-setup wrote.
    let doctor = beam::run(&[
        "doctor",
        "--containerd-config",
        path.to_str().context("utf-8")?,
        "--address",
        "/nonexistent/containerd.sock",
        "--beam-address",
        node.daemon.socket().to_str().context("utf-8")?,
    ])?;
    let report = String::from_utf8_lossy(&doctor.stdout).into_owned();
    ensure!(
        !report.contains("ERROR"),
        "beam doctor finds fault with node-setup's config:\n{report}"
    );

    let un = node.node_setup(version, &["--uninstall"])?;
    match &original {
        Some(text) => ensure!(
            read(&path)? == *text,
            "--uninstall did not restore the file ({un}):\n{}",
            read(&path)?
        ),
        None => ensure!(!path.exists(), "--uninstall left the file it made: {un}"),
    }
    node.stop()
}

#[test]
fn no_config_yet_containerd_2() -> Result<()> {
    check(ContainerdVersion::V2, None, 3)
}

#[test]
fn version_2_with_cri_settings_and_mirrors_containerd_1_7() -> Result<()> {
    // config_path (a hosts.toml directory) is how mirrors are configured since containerd 1.5.
    let text = "version = 2\n\
        # site settings: must survive node setup\n\
        oom_score = -999\n\
        \n\
        [plugins.\"io.containerd.grpc.v1.cri\"]\n\
        \x20 max_concurrent_downloads = 5  # slow uplink\n\
        \n\
        \x20 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
        \x20   snapshotter = \"overlayfs\"\n\
        \x20   default_runtime_name = \"runc\"\n\
        \n\
        \x20 [plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
        \x20   config_path = \"@HOSTS@\"\n";
    check(ContainerdVersion::V1_7, Some(text), 2)
}

#[test]
fn version_3_containerd_2() -> Result<()> {
    let text = "version = 3\n\
        # site settings\n\
        [plugins.'io.containerd.cri.v1.images']\n\
        \x20 max_concurrent_downloads = 4\n\
        \x20 [plugins.'io.containerd.cri.v1.images'.registry]\n\
        \x20   config_path = '@HOSTS@'\n";
    check(ContainerdVersion::V2, Some(text), 3)
}

#[test]
fn already_set_up_containerd_1_7() -> Result<()> {
    // A config that is already what node setup writes: nothing to do, nothing to undo.
    util::require_root()?;
    if !containerd::require_version(ContainerdVersion::V1_7)? {
        return Ok(());
    }
    let node = Node::start()?;
    let path = node.config_path();
    std::fs::create_dir_all(path.parent().context("parent")?)?;
    let text = format!(
        "version = 2\n\n[proxy_plugins.beam]\n  type = \"snapshot\"\n  address = \"{}\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"beam\"\n  \
         disable_snapshot_annotations = false\n",
        node.daemon.socket().display()
    );
    std::fs::write(&path, &text)?;
    let out = node.node_setup(ContainerdVersion::V1_7, &[])?;
    ensure!(out.contains("already set up"), "{out}");
    ensure!(
        read(&path)? == text,
        "an already set-up config was rewritten"
    );
    node.containerd_pulls_lazily(ContainerdVersion::V1_7)?;
    let un = node.node_setup(ContainerdVersion::V1_7, &["--uninstall"])?;
    ensure!(
        un.contains("nothing to undo") && read(&path)? == text,
        "uninstall touched a config node setup never changed: {un}"
    );
    node.stop()
}

#[test]
fn installs_binaries_unit_and_config_and_uninstalls_them() -> Result<()> {
    util::require_root()?;
    let d = tempfile::tempdir()?;
    let p = |s: &str| d.path().join(s).to_str().map(String::from).context("utf-8");
    let args = |extra: &[&str]| -> Result<Vec<String>> {
        let mut v: Vec<String> = [
            "node-setup",
            "--containerd-config",
            &p("containerd/config.toml")?,
            "--no-restart",
            "--containerd-bin",
            "/nonexistent/containerd",
            "--bin-dir",
            &p("bin")?,
            "--unit-dir",
            &p("units")?,
            "--beam-config",
            &p("beam/config.toml")?,
            "--beam-address",
            "/run/beam-test/beam.sock",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        Ok(v)
    };
    let run = |extra: &[&str]| -> Result<String> {
        let a = args(extra)?;
        beam::ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run(&[])?;
    for f in [
        "bin/beam",
        "bin/beam-snapshotter",
        "units/beam-snapshotter.service",
    ] {
        ensure!(d.path().join(f).is_file(), "{f} not installed: {out}");
    }
    let unit = read(&d.path().join("units/beam-snapshotter.service"))?;
    ensure!(
        unit.contains(&format!(
            "ExecStart={} --config {}",
            p("bin/beam-snapshotter")?,
            p("beam/config.toml")?
        )),
        "unit does not run the installed binary with its config:\n{unit}"
    );
    // The written config is one beam-snapshotter accepts, with the socket asked for.
    let printed = util::run_checked(
        std::process::Command::new(d.path().join("bin/beam-snapshotter")).args([
            "--config",
            &p("beam/config.toml")?,
            "--print-config",
        ]),
        std::time::Duration::from_secs(30),
    )?;
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    ensure!(
        printed.contains("address = \"/run/beam-test/beam.sock\""),
        "installed config: {printed}"
    );
    // A new containerd config without a containerd to ask: version 2.
    ensure!(read(&d.path().join("containerd/config.toml"))?.starts_with("version = 2"));
    let again = run(&[])?;
    ensure!(
        !again.contains("install ") && again.contains("already set up"),
        "second run installed again: {again}"
    );
    let un = run(&["--uninstall"])?;
    for f in [
        "bin/beam",
        "bin/beam-snapshotter",
        "units/beam-snapshotter.service",
        "containerd/config.toml",
    ] {
        ensure!(
            !d.path().join(f).exists(),
            "{f} left after --uninstall: {un}"
        );
    }
    Ok(())
}
