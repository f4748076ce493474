//! containerd 1.6 (the system's), 1.7 and 2.x driven as Kubernetes drives them: a CRI client in
//! kubelet's place pulls, runs a host-network pod with one container, reads its log and removes
//! everything; and plain `ctr` on the fetched versions, to prove each runs its own ctr and shim.
//! These are the ground the Beam CRI tests stand on: if they fail, the harness or the
//! containerd setup is broken, not Beam.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use beam_tests::containerd::{
    self, BeamCri, Containerd, ContainerdOptions, ContainerdVersion, CriConfig,
};
use beam_tests::cri::{self, CriEnv};
use beam_tests::{oci_layout, util, Registry};

/// What must be gone once the harness objects are dropped.
struct Leftovers {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
    address: String,
}

impl Leftovers {
    fn of(env: &CriEnv) -> Leftovers {
        Leftovers {
            pids: vec![env.registry.pid(), env.containerd.pid()],
            dirs: vec![
                env.registry.dir().to_path_buf(),
                env.containerd.dir().to_path_buf(),
            ],
            address: env.containerd.address().to_string_lossy().into_owned(),
        }
    }

    fn check(&self) -> Result<()> {
        for pid in &self.pids {
            ensure!(!util::pid_alive(*pid), "process {pid} still alive");
        }
        let stray: Vec<_> = util::processes()
            .into_iter()
            .filter(|p| p.cmdline.iter().any(|a| a == &self.address))
            .collect();
        ensure!(
            stray.is_empty(),
            "processes naming {} still alive: {stray:?}",
            self.address
        );
        for dir in &self.dirs {
            let mounts = util::mounts_under(dir)?;
            ensure!(
                mounts.is_empty(),
                "mounts left under {}: {mounts:?}",
                dir.display()
            );
            ensure!(!dir.exists(), "{} was not removed", dir.display());
        }
        Ok(())
    }
}

/// Pull, run a pod with `echo hello-cri`, read its log, remove everything, through CRI.
fn kubelet_lifecycle(version: ContainerdVersion) -> Result<()> {
    util::require_root()?;
    if !containerd::require_version(version)? {
        return Ok(());
    }
    let started = Instant::now();
    let env = CriEnv::start(version)?;
    let leftovers = Leftovers::of(&env);
    let ctd = &env.containerd;
    let context = || {
        format!(
            "containerd {} ({}); log tail:\n{}",
            ctd.version_string(),
            version.name(),
            util::tail_file(ctd.log_path(), 30)
        )
    };
    let mut k = env.kubelet()?;

    let v = k.client().version().with_context(context)?;
    ensure!(
        v.runtime_name == "containerd",
        "runtime name {:?}",
        v.runtime_name
    );
    ensure!(
        v.runtime_version.trim_start_matches('v') == ctd.version_string(),
        "CRI says version {:?}, containerd --version said {:?}",
        v.runtime_version,
        ctd.version_string()
    );

    let image_ref = k
        .client()
        .pull_image(&env.busybox_image, None)
        .with_context(context)?;
    let image = k
        .client()
        .image_status(&env.busybox_image)?
        .context("ImageStatus does not know the image just pulled")?;
    ensure!(
        image.id == image_ref,
        "image id {} != pulled ref {image_ref}",
        image.id
    );
    ensure!(image.size > 0, "image size is 0: {image:?}");
    ensure!(
        image.repo_tags.contains(&env.busybox_image),
        "repo tags {:?}",
        image.repo_tags
    );

    let pod = k.run_pod("hello").with_context(context)?;
    // runc keeps CRI's container state in our directory, not the shared /run/containerd/runc.
    let runc_state = ctd
        .dir()
        .join("runc")
        .join(cri::CRI_NAMESPACE)
        .join(&pod.id);
    ensure!(
        runc_state.is_dir(),
        "no runc state at {} for the running sandbox",
        runc_state.display()
    );
    let id = k
        .create_container(
            &pod,
            "hello",
            &env.busybox_image,
            &["/bin/sh", "-c", "echo hello-cri"],
        )
        .with_context(context)?;
    k.start_container(&id).with_context(context)?;
    let code = k.wait_exit(&id, Duration::from_secs(60))?;
    let stdout = k.stdout(&id)?;
    ensure!(
        code == 0,
        "exit code {code}; stdout {stdout:?}, stderr {:?}",
        k.stderr(&id)
    );
    ensure!(stdout == "hello-cri\n", "stdout {stdout:?}");
    k.remove_container(&id).with_context(context)?;
    k.remove_pod(&pod).with_context(context)?;
    k.client()
        .remove_image(&env.busybox_image)
        .with_context(context)?;
    ensure!(
        k.client().image_status(&env.busybox_image)?.is_none(),
        "the image is still there after RemoveImage"
    );
    let containers = k.client().list_containers()?;
    ensure!(containers.is_empty(), "containers left: {containers:?}");
    let pods = k.client().list_pod_sandboxes()?;
    ensure!(pods.is_empty(), "pods left: {pods:?}");
    ensure!(
        util::wait_for(|| ctd.shims().is_empty(), Duration::from_secs(10)),
        "shims left: {:?}",
        ctd.shims()
    );
    let mounts = env.mounts()?;
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");

    drop(k);
    let version_string = ctd.version_string().to_string();
    drop(env);
    leftovers.check()?;
    eprintln!(
        "containerd {version_string} ({}): CRI lifecycle in {:.1} s",
        version.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn cri_lifecycle_containerd_system() -> Result<()> {
    kubelet_lifecycle(ContainerdVersion::System)
}

#[test]
fn cri_lifecycle_containerd_1_7() -> Result<()> {
    kubelet_lifecycle(ContainerdVersion::V1_7)
}

#[test]
fn cri_lifecycle_containerd_2() -> Result<()> {
    kubelet_lifecycle(ContainerdVersion::V2)
}

/// `ctr image pull --plain-http` and `ctr run` on a fetched containerd: its own ctr talks to it
/// and its own shim runs the container.
fn ctr_pull_and_run(version: ContainerdVersion) -> Result<()> {
    util::require_root()?;
    if !containerd::require_version(version)? {
        return Ok(());
    }
    let started = Instant::now();
    let work = tempfile::tempdir()?;
    let layout = work.path().join("layout");
    cri::build_test_images(work.path(), &layout)?;
    let reg = Registry::start()?;
    let image = format!("{}/beam-test/busybox:1", reg.addr());
    oci_layout::push_with_skopeo(&layout, "busybox", &image)?;

    let ctd = Containerd::start_with(ContainerdOptions {
        version,
        ..Default::default()
    })?;
    let (pids, dir) = (vec![ctd.pid(), reg.pid()], ctd.dir().to_path_buf());
    let server = ctd.ctr(&["version"])?;
    let server = String::from_utf8_lossy(&server.stdout).into_owned();
    let versions: Vec<&str> = server
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Version:"))
        .map(str::trim)
        .collect();
    ensure!(
        versions.len() == 2 && versions.iter().all(|v| *v == ctd.version_string()),
        "ctr and containerd should both be {}:\n{server}",
        ctd.version_string()
    );
    ctd.pull_plain_http(&image)?;
    let out = ctd.run(&image, "hello", &["/bin/sh", "-c", "echo hello-ctr"])?;
    ensure!(out == "hello-ctr\n", "ctr run printed {out:?}");

    // A detached container: its shim must be this version's binary.
    ctd.ctr(&["run", "-d", &image, "sleeper", "/bin/sleep", "600"])?;
    ensure!(
        util::wait_for(|| !ctd.shims().is_empty(), Duration::from_secs(10)),
        "no shim for the detached container"
    );
    let bin_dir = version
        .bin_dir()
        .context("a fetched version has a bin dir")?;
    for shim in ctd.shims() {
        let exe = std::fs::read_link(format!("/proc/{}/exe", shim.pid))?;
        ensure!(
            exe.starts_with(&bin_dir),
            "shim {} runs {}, not the one in {}",
            shim.pid,
            exe.display(),
            bin_dir.display()
        );
    }
    ctd.ctr(&["task", "kill", "-s", "SIGKILL", "sleeper"])?;
    ensure!(
        util::wait_for(
            || ctd
                .ctr(&["task", "ls"])
                .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("RUNNING")),
            Duration::from_secs(20)
        ),
        "the killed task is still running"
    );
    ctd.ctr(&["task", "delete", "sleeper"])?;
    ctd.ctr(&["containers", "delete", "sleeper"])?;
    ensure!(
        util::wait_for(|| ctd.shims().is_empty(), Duration::from_secs(10)),
        "shims left: {:?}",
        ctd.shims()
    );
    let v = ctd.version_string().to_string();
    drop(ctd);
    drop(reg);
    for pid in pids {
        ensure!(!util::pid_alive(pid), "process {pid} still alive");
    }
    ensure!(!dir.exists(), "{} was not removed", dir.display());
    eprintln!(
        "containerd {v} ({}): ctr pull and run in {:.1} s",
        version.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn ctr_pull_and_run_containerd_1_7() -> Result<()> {
    ctr_pull_and_run(ContainerdVersion::V1_7)
}

#[test]
fn ctr_pull_and_run_containerd_2() -> Result<()> {
    ctr_pull_and_run(ContainerdVersion::V2)
}

/// CRI pulls from a registry that wants basic auth: refused without credentials, accepted with
/// the ones kubelet passes from a pull secret.
fn pull_with_auth(version: ContainerdVersion) -> Result<()> {
    util::require_root()?;
    if !containerd::require_version(version)? {
        return Ok(());
    }
    let env = CriEnv::start(version)?;
    let private = Registry::start_with_basic_auth("kube", "s3cret")?;
    let image = format!("{}/private/busybox:1", private.addr());
    let layout = env.work_dir().join("private-layout");
    cri::build_test_images(env.work_dir(), &layout)?;
    oci_layout::push_with_skopeo_creds(&layout, "busybox", &image, Some("kube:s3cret"))?;
    cri::write_plain_http_hosts(env.hosts_dir(), &private.addr())?;

    let mut k = env.kubelet()?;
    let err = match k.client().pull_image(&image, None) {
        Ok(r) => bail!("an anonymous pull of {image} succeeded ({r})"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        ["401", "unauthorized", "authorization"]
            .iter()
            .any(|w| err.to_lowercase().contains(w)),
        "unexpected error for an anonymous pull: {err}"
    );
    k.client().pull_image(&image, Some(("kube", "s3cret")))?;
    let pod = k.run_pod("private")?;
    let id = k.create_container(&pod, "private", &image, &["/bin/sh", "-c", "echo authed"])?;
    k.start_container(&id)?;
    ensure!(k.wait_exit(&id, Duration::from_secs(60))? == 0);
    ensure!(k.stdout(&id)? == "authed\n", "stdout {:?}", k.stdout(&id));
    // Drop removes the pod and container.
    Ok(())
}

#[test]
fn cri_pull_with_auth_containerd_system() -> Result<()> {
    pull_with_auth(ContainerdVersion::System)
}

#[test]
fn cri_pull_with_auth_containerd_2() -> Result<()> {
    pull_with_auth(ContainerdVersion::V2)
}

/// The value at a dotted path of a TOML table.
fn at<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (last, init) = path.split_last()?;
    let mut cur = t;
    for k in init {
        cur = cur.get(*k)?.as_table()?;
    }
    cur.get(*last)
}

/// The checked-in Beam snippets (deploy/containerd/beam-v{2,3}.toml), rendered by the harness
/// and merged with its CRI settings, mean to each containerd what they say: `config dump`
/// shows every key in effect (a misspelt or misplaced key would leave the default there), 2.x
/// warns of no ignored key, and the proxy snapshotter is registered.
fn beam_config_understood(version: ContainerdVersion) -> Result<()> {
    util::require_root()?;
    if !containerd::require_version(version)? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("beam.sock");
    let root = dir.path().join("beam-root");
    for cri in [BeamCri::AsDeployed, BeamCri::AnnotationsDisabled] {
        let ctd = Containerd::start_with(ContainerdOptions {
            version,
            cri: true,
            cri_config: CriConfig {
                sandbox_image: Some("127.0.0.1:1/beam-test/pause:1".into()),
                registry_config_path: Some(dir.path().join("certs.d")),
                ..Default::default()
            },
            extra_config: containerd::beam_plugin_config(version, &socket, &root, cri)?,
            ..Default::default()
        })?;
        let (dump, warnings) = ctd.config_dump()?;
        let config = ctd.config();
        ensure!(
            !warnings.to_lowercase().contains("unknown key"),
            "containerd {} ignores keys of\n{config}\n{warnings}",
            ctd.version_string()
        );
        let v3 = ctd.version().config_version() == 3;
        let images: &[&str] = if v3 {
            &["plugins", "io.containerd.cri.v1.images"]
        } else {
            &["plugins", "io.containerd.grpc.v1.cri", "containerd"]
        };
        let key = |base: &[&str], k: &str| {
            let mut p = base.to_vec();
            p.push(k);
            at(&dump, &p).cloned()
        };
        let want_disabled = cri == BeamCri::AnnotationsDisabled;
        let checks: Vec<(Vec<&str>, toml::Value)> = vec![
            (
                vec!["proxy_plugins", "beam", "address"],
                socket.to_string_lossy().into_owned().into(),
            ),
            (vec!["proxy_plugins", "beam", "type"], "snapshot".into()),
            ([images, &["snapshotter"]].concat(), "beam".into()),
            (
                [images, &["disable_snapshot_annotations"]].concat(),
                want_disabled.into(),
            ),
        ];
        for (path, want) in checks {
            ensure!(
                at(&dump, &path) == Some(&want),
                "containerd {}: {} is {:?}, want {want:?}; our config:\n{config}",
                ctd.version_string(),
                path.join("."),
                at(&dump, &path)
            );
        }
        let port = key(
            &["plugins", "io.containerd.grpc.v1.cri"],
            "stream_server_port",
        );
        ensure!(port == Some("0".into()), "stream_server_port {port:?}");
        if v3 {
            let unpack = at(
                &dump,
                &[
                    "plugins",
                    "io.containerd.transfer.v1.local",
                    "unpack_config",
                ],
            )
            .and_then(toml::Value::as_array)
            .context("no unpack_config in the dump")?;
            let snaps: Vec<&str> = unpack
                .iter()
                .filter_map(|e| e.get("snapshotter").and_then(toml::Value::as_str))
                .collect();
            ensure!(snaps == ["beam", "overlayfs"], "unpack_config {unpack:?}");
            // The 2.1 transfer service's way to pass the labels; the misconfiguration takes
            // it away too.
            let exports = at(&dump, &["proxy_plugins", "beam", "exports"]);
            let export = exports.and_then(|e| e.get("enable_remote_snapshot_annotations"));
            if want_disabled {
                ensure!(export.is_none(), "exports {exports:?}");
            } else {
                ensure!(export == Some(&"true".into()), "exports {exports:?}");
            }
        }
        let plugins = ctd.ctr(&["plugins", "ls"])?;
        let plugins = String::from_utf8_lossy(&plugins.stdout).into_owned();
        ensure!(
            plugins
                .lines()
                .any(|l| l.contains("io.containerd.snapshotter.v1") && l.contains(" beam ")),
            "the beam proxy snapshotter is not registered:\n{plugins}"
        );
    }
    Ok(())
}

#[test]
fn beam_config_understood_containerd_system() -> Result<()> {
    beam_config_understood(ContainerdVersion::System)
}

#[test]
fn beam_config_understood_containerd_1_7() -> Result<()> {
    beam_config_understood(ContainerdVersion::V1_7)
}

#[test]
fn beam_config_understood_containerd_2() -> Result<()> {
    beam_config_understood(ContainerdVersion::V2)
}

/// A test that fails with a pod and a container running leaves nothing behind: the Kubelet
/// guard removes them through CRI, and the Containerd guard whatever is left.
fn panic_cleans_up(version: ContainerdVersion) -> Result<()> {
    util::require_root()?;
    if !containerd::require_version(version)? {
        return Ok(());
    }
    struct Seen {
        leftovers: Leftovers,
        tree: Vec<u32>,
        cgroup_dirs: Vec<PathBuf>,
        log_dir: PathBuf,
    }
    let mut seen: Option<Seen> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let env = CriEnv::start(version).expect("start CRI");
        let mut k = env.kubelet().expect("kubelet");
        k.client()
            .pull_image(&env.busybox_image, None)
            .expect("pull");
        let pod = k.run_pod("doomed").expect("run pod");
        let id = k
            .create_container(&pod, "sleeper", &env.busybox_image, &["/bin/sleep", "600"])
            .expect("create");
        k.start_container(&id).expect("start");
        let shims: Vec<u32> = env.containerd.shims().iter().map(|s| s.pid).collect();
        assert!(!shims.is_empty(), "no shim for the running pod");
        let tree = util::descendants_first(&shims, &util::processes());
        assert!(
            tree.len() > shims.len() + 1,
            "no pause and sleeper under the shim"
        );
        let ns = env.containerd.namespace().to_string();
        let cgroup_dirs: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .expect("/sys/fs/cgroup")
            .flatten()
            .map(|c| c.path().join(&ns))
            .filter(|p| p.is_dir())
            .collect();
        assert!(!cgroup_dirs.is_empty(), "the pod has no cgroup under /{ns}");
        seen = Some(Seen {
            leftovers: Leftovers::of(&env),
            tree,
            cgroup_dirs,
            log_dir: k.log_dir().to_path_buf(),
        });
        panic!("deliberate panic with a running pod");
    }));
    ensure!(result.is_err(), "the closure should have panicked");
    let seen = seen.context("the closure got as far as the panic")?;
    seen.leftovers.check()?;
    for pid in seen.tree {
        ensure!(!util::pid_alive(pid), "pod process {pid} still alive");
    }
    for cg in seen.cgroup_dirs {
        ensure!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
    ensure!(
        !seen.log_dir.exists(),
        "log dir {} left",
        seen.log_dir.display()
    );
    Ok(())
}

#[test]
fn cri_panic_cleans_up_containerd_system() -> Result<()> {
    panic_cleans_up(ContainerdVersion::System)
}

#[test]
fn cri_panic_cleans_up_containerd_2() -> Result<()> {
    panic_cleans_up(ContainerdVersion::V2)
}
