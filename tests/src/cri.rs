//! Kubernetes' side of containerd's CRI plugin, for tests: a CRI v1 client ([`CriClient`], the
//! `k8s-cri` crate over containerd's unix socket), a [`Kubelet`] that runs host-network pods
//! and containers with it and removes them on drop, a locally built pause image, and
//! [`CriEnv`]: a registry plus a containerd whose CRI plugin pulls from it over plain HTTP.
//!
//! Kubernetes is how most users reach Beam, and CRI pulls are where the configuration traps
//! are (`disable_snapshot_annotations`, the 2.1 transfer service): a test that only uses `ctr`
//! misses them. Nothing can be pulled from the internet here, so the sandbox image is a
//! busybox-static `/pause` pushed to the test registry.
//!
//! The client is blocking (it owns a small tokio runtime) so tests stay plain `#[test]`s, like
//! the rest of the harness. Its tonic is 0.14; the snapshots client's is 0.9: the types do not
//! mix, and none of them leave this module except the `k8s_cri::v1` messages.

use std::collections::HashMap;
use std::fs::{self, File};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic014::transport::{Channel, Endpoint, Uri};

use crate::containerd::{Containerd, ContainerdOptions, ContainerdVersion, CriConfig};
use crate::oci_layout::{self, Compression, ImageConfig, LayerSpec};
use crate::registry::Registry;
use crate::util;

/// Time limit of one CRI call other than a pull.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit of PullImage.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(300);
/// The namespace CRI keeps its containers and images in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A blocking CRI v1 client (runtime and image services) on containerd's socket.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriClient")
            .field("socket", &self.socket)
            .finish()
    }
}

/// Turns a CRI call's outcome (with a time limit) into anyhow, naming the call.
async fn call<T>(
    what: &str,
    timeout: Duration,
    fut: impl Future<Output = std::result::Result<tonic014::Response<T>, tonic014::Status>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => bail!(
            "CRI {what} failed: {:?}: {}",
            status.code(),
            status.message()
        ),
        Err(_) => bail!("CRI {what} did not answer within {timeout:?}"),
    }
}

impl CriClient {
    /// Connects to the CRI plugin at `socket` (containerd's gRPC socket).
    pub fn connect(socket: &Path) -> Result<CriClient> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting a tokio runtime for the CRI client")?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is required by tonic and ignored by the connector.
                Endpoint::from_static("http://[::]:50051")
                    .connect_with_connector(tower05::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(&path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .with_context(|| format!("connecting to CRI at {}", socket.display()))?;
        Ok(CriClient {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    /// `Version`: the runtime's name and version (e.g. `containerd`, `1.7.24~ds1`).
    pub fn version(&mut self) -> Result<cri::VersionResponse> {
        let req = cri::VersionRequest {
            version: "v1".into(),
        };
        let c = &mut self.runtime;
        self.rt
            .block_on(call("Version", CALL_TIMEOUT, c.version(req)))
    }

    /// `Status`: runtime and network conditions.
    pub fn status(&mut self) -> Result<cri::StatusResponse> {
        let req = cri::StatusRequest { verbose: false };
        let c = &mut self.runtime;
        self.rt
            .block_on(call("Status", CALL_TIMEOUT, c.status(req)))
    }

    /// `PullImage` with optional `(user, password)`; returns the image reference CRI reports
    /// (the image id, `sha256:...` of the config).
    pub fn pull_image(&mut self, image: &str, auth: Option<(&str, &str)>) -> Result<String> {
        let req = cri::PullImageRequest {
            image: Some(image_spec(image)),
            auth: auth.map(|(u, p)| cri::AuthConfig {
                username: u.into(),
                password: p.into(),
                ..Default::default()
            }),
            sandbox_config: None,
        };
        let c = &mut self.images;
        let resp = self.rt.block_on(call(
            &format!("PullImage {image}"),
            PULL_TIMEOUT,
            c.pull_image(req),
        ))?;
        Ok(resp.image_ref)
    }

    /// `ImageStatus`: the image if CRI has it (`id`, `repo_tags`, `repo_digests`, `size`).
    pub fn image_status(&mut self, image: &str) -> Result<Option<cri::Image>> {
        let req = cri::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        let c = &mut self.images;
        let resp = self.rt.block_on(call(
            &format!("ImageStatus {image}"),
            CALL_TIMEOUT,
            c.image_status(req),
        ))?;
        Ok(resp.image)
    }

    /// `ListImages`.
    pub fn list_images(&mut self) -> Result<Vec<cri::Image>> {
        let req = cri::ListImagesRequest { filter: None };
        let c = &mut self.images;
        let resp = self
            .rt
            .block_on(call("ListImages", CALL_TIMEOUT, c.list_images(req)))?;
        Ok(resp.images)
    }

    /// `RemoveImage` (by reference or id).
    pub fn remove_image(&mut self, image: &str) -> Result<()> {
        let req = cri::RemoveImageRequest {
            image: Some(image_spec(image)),
        };
        let c = &mut self.images;
        self.rt.block_on(call(
            &format!("RemoveImage {image}"),
            CALL_TIMEOUT,
            c.remove_image(req),
        ))?;
        Ok(())
    }

    /// `RunPodSandbox`; returns the sandbox id.
    pub fn run_pod_sandbox(&mut self, config: &cri::PodSandboxConfig) -> Result<String> {
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let c = &mut self.runtime;
        // Runs the sandbox image, which may have to be pulled first.
        let resp = self
            .rt
            .block_on(call("RunPodSandbox", PULL_TIMEOUT, c.run_pod_sandbox(req)))?;
        Ok(resp.pod_sandbox_id)
    }

    /// `StopPodSandbox`.
    pub fn stop_pod_sandbox(&mut self, id: &str) -> Result<()> {
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let c = &mut self.runtime;
        self.rt.block_on(call(
            &format!("StopPodSandbox {id}"),
            CALL_TIMEOUT,
            c.stop_pod_sandbox(req),
        ))?;
        Ok(())
    }

    /// `RemovePodSandbox` (also removes its containers).
    pub fn remove_pod_sandbox(&mut self, id: &str) -> Result<()> {
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let c = &mut self.runtime;
        self.rt.block_on(call(
            &format!("RemovePodSandbox {id}"),
            CALL_TIMEOUT,
            c.remove_pod_sandbox(req),
        ))?;
        Ok(())
    }

    /// `ListPodSandbox` (all of them).
    pub fn list_pod_sandboxes(&mut self) -> Result<Vec<cri::PodSandbox>> {
        let req = cri::ListPodSandboxRequest { filter: None };
        let c = &mut self.runtime;
        let resp = self.rt.block_on(call(
            "ListPodSandbox",
            CALL_TIMEOUT,
            c.list_pod_sandbox(req),
        ))?;
        Ok(resp.items)
    }

    /// `CreateContainer` in `sandbox_id` (whose config is `sandbox_config`); returns its id.
    pub fn create_container(
        &mut self,
        sandbox_id: &str,
        config: &cri::ContainerConfig,
        sandbox_config: &cri::PodSandboxConfig,
    ) -> Result<String> {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let c = &mut self.runtime;
        let resp = self.rt.block_on(call(
            "CreateContainer",
            CALL_TIMEOUT,
            c.create_container(req),
        ))?;
        Ok(resp.container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&mut self, id: &str) -> Result<()> {
        let req = cri::StartContainerRequest {
            container_id: id.into(),
        };
        let c = &mut self.runtime;
        self.rt.block_on(call(
            &format!("StartContainer {id}"),
            CALL_TIMEOUT,
            c.start_container(req),
        ))?;
        Ok(())
    }

    /// `ContainerStatus`.
    pub fn container_status(&mut self, id: &str) -> Result<cri::ContainerStatus> {
        let req = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let c = &mut self.runtime;
        let resp = self.rt.block_on(call(
            &format!("ContainerStatus {id}"),
            CALL_TIMEOUT,
            c.container_status(req),
        ))?;
        resp.status
            .with_context(|| format!("ContainerStatus {id} returned no status"))
    }

    /// Polls `ContainerStatus` until the container has exited; returns its exit code.
    pub fn wait_container_exit(&mut self, id: &str, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.container_status(id)?;
            if st.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(st.exit_code);
            }
            if Instant::now() >= deadline {
                bail!(
                    "container {id} did not exit within {timeout:?} (state {:?}, reason {:?}, \
                     message {:?})",
                    cri::ContainerState::try_from(st.state),
                    st.reason,
                    st.message
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `StopContainer` with a grace period in seconds.
    pub fn stop_container(&mut self, id: &str, grace_seconds: i64) -> Result<()> {
        let req = cri::StopContainerRequest {
            container_id: id.into(),
            timeout: grace_seconds,
        };
        let c = &mut self.runtime;
        self.rt.block_on(call(
            &format!("StopContainer {id}"),
            CALL_TIMEOUT + Duration::from_secs(grace_seconds.max(0) as u64),
            c.stop_container(req),
        ))?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub fn remove_container(&mut self, id: &str) -> Result<()> {
        let req = cri::RemoveContainerRequest {
            container_id: id.into(),
        };
        let c = &mut self.runtime;
        self.rt.block_on(call(
            &format!("RemoveContainer {id}"),
            CALL_TIMEOUT,
            c.remove_container(req),
        ))?;
        Ok(())
    }

    /// `ListContainers` (all of them).
    pub fn list_containers(&mut self) -> Result<Vec<cri::Container>> {
        let req = cri::ListContainersRequest { filter: None };
        let c = &mut self.runtime;
        let resp =
            self.rt
                .block_on(call("ListContainers", CALL_TIMEOUT, c.list_containers(req)))?;
        Ok(resp.containers)
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// A pod made by [`Kubelet::run_pod`].
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox id.
    pub id: String,
    /// The config it was made with (CreateContainer needs it again).
    pub config: cri::PodSandboxConfig,
}

/// Does what kubelet does, through [`CriClient`]: host-network pods in a cgroup of the
/// containerd instance (so its drop removes what is left), containers logging into a temporary
/// log directory. Every pod and container it made and has not removed is stopped and removed
/// on drop, even when the test failed; drop it before the [`Containerd`] (declare it after).
#[derive(Debug)]
pub struct Kubelet {
    client: CriClient,
    logs: tempfile::TempDir,
    cgroup_parent: String,
    pods: Vec<String>,
    containers: Vec<String>,
    log_paths: HashMap<String, PathBuf>,
    counter: u32,
}

impl Kubelet {
    /// Connects to the CRI plugin of `containerd` (started with `cri: true`).
    pub fn connect(containerd: &Containerd) -> Result<Kubelet> {
        let client = CriClient::connect(containerd.address())?;
        let logs = tempfile::Builder::new()
            .prefix("beam-cri-logs-")
            .tempdir()
            .context("creating the pod log directory")?;
        Ok(Kubelet {
            client,
            logs,
            // `Containerd`'s drop removes the cgroups under /<its namespace>.
            cgroup_parent: format!("/{}", containerd.namespace()),
            pods: Vec::new(),
            containers: Vec::new(),
            log_paths: HashMap::new(),
            counter: 0,
        })
    }

    /// The CRI client, for calls this type does not wrap.
    pub fn client(&mut self) -> &mut CriClient {
        &mut self.client
    }

    /// Where pods log (one subdirectory per pod).
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// The config of a host-network pod named `name` (what [`Kubelet::run_pod`] uses).
    pub fn pod_config(&mut self, name: &str) -> Result<cri::PodSandboxConfig> {
        self.counter += 1;
        let uid = format!("beam-test-{}-{}", std::process::id(), self.counter);
        let log_dir = self.logs.path().join(&uid);
        fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        Ok(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid,
                namespace: "beam-test".into(),
                attempt: 0,
            }),
            log_directory: log_dir.to_string_lossy().into_owned(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(host_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// RunPodSandbox of [`Kubelet::pod_config`]`(name)`.
    pub fn run_pod(&mut self, name: &str) -> Result<Pod> {
        let config = self.pod_config(name)?;
        let id = self.client.run_pod_sandbox(&config)?;
        self.pods.push(id.clone());
        Ok(Pod { id, config })
    }

    /// CreateContainer `name` in `pod` from `image` running `command` (replacing the image's
    /// entrypoint; empty keeps it), logging to `<pod log dir>/<name>.log`. Returns its id.
    pub fn create_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(image_spec(image)),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(host_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .client
            .create_container(&pod.id, &config, &pod.config)?;
        self.containers.push(id.clone());
        self.log_paths.insert(
            id.clone(),
            Path::new(&pod.config.log_directory).join(&config.log_path),
        );
        Ok(id)
    }

    /// StartContainer.
    pub fn start_container(&mut self, id: &str) -> Result<()> {
        self.client.start_container(id)
    }

    /// Waits until container `id` exits; returns its exit code.
    pub fn wait_exit(&mut self, id: &str, timeout: Duration) -> Result<i32> {
        self.client.wait_container_exit(id, timeout)
    }

    /// The container's log file (CRI format).
    pub fn log_path(&self, id: &str) -> Result<&Path> {
        self.log_paths
            .get(id)
            .map(PathBuf::as_path)
            .with_context(|| format!("container {id} was not created by this Kubelet"))
    }

    /// What the container wrote to stdout, from its CRI log file.
    pub fn stdout(&self, id: &str) -> Result<String> {
        self.stream(id, "stdout")
    }

    /// What the container wrote to stderr, from its CRI log file.
    pub fn stderr(&self, id: &str) -> Result<String> {
        self.stream(id, "stderr")
    }

    fn stream(&self, id: &str, stream: &str) -> Result<String> {
        let path = self.log_path(id)?;
        let raw = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        parse_cri_log(&String::from_utf8_lossy(&raw), stream)
            .with_context(|| format!("parsing the CRI log {}", path.display()))
    }

    /// Create, start, wait (up to `timeout`): returns the exit code and stdout. The container
    /// stays (remove it with [`Kubelet::remove_container`], or leave it to the drop).
    pub fn run_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
        timeout: Duration,
    ) -> Result<(i32, String)> {
        let id = self.create_container(pod, name, image, command)?;
        self.start_container(&id)?;
        let code = self.wait_exit(&id, timeout)?;
        let out = self.stdout(&id)?;
        Ok((code, out))
    }

    /// StopContainer (10 s grace) and RemoveContainer.
    pub fn remove_container(&mut self, id: &str) -> Result<()> {
        self.client.stop_container(id, 10)?;
        self.client.remove_container(id)?;
        self.containers.retain(|c| c != id);
        Ok(())
    }

    /// StopPodSandbox and RemovePodSandbox (which removes its containers too).
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        self.client.stop_pod_sandbox(&pod.id)?;
        self.client.remove_pod_sandbox(&pod.id)?;
        self.pods.retain(|p| *p != pod.id);
        let gone: Vec<String> = self
            .client
            .list_containers()?
            .into_iter()
            .filter(|c| c.pod_sandbox_id == pod.id)
            .map(|c| c.id)
            .collect();
        self.containers.retain(|c| !gone.contains(c));
        Ok(())
    }

    /// Stops and removes every container and pod this Kubelet made and has not removed;
    /// returns the first error after trying them all.
    pub fn cleanup(&mut self) -> Result<()> {
        let mut first: Option<anyhow::Error> = None;
        for id in std::mem::take(&mut self.containers) {
            let r = self
                .client
                .stop_container(&id, 2)
                .and_then(|_| self.client.remove_container(&id));
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        for id in std::mem::take(&mut self.pods) {
            let r = self
                .client
                .stop_pod_sandbox(&id)
                .and_then(|_| self.client.remove_pod_sandbox(&id));
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("beam-tests: CRI cleanup: {e:#}");
        }
    }
}

/// Host network, a PID namespace per container, IPC per pod: a `hostNetwork: true` pod.
fn host_network() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// The text of one stream (`stdout` or `stderr`) of a CRI log: lines are
/// `<RFC 3339 time> <stream> <tags> <text>`; tag `P` marks a partial line continued by the next
/// one of the same stream, `F` a full line (a newline follows).
pub fn parse_cri_log(log: &str, stream: &str) -> Result<String> {
    let mut out = String::new();
    for (n, line) in log.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut parts = line.splitn(4, ' ');
        let (Some(_time), Some(s), Some(tags)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("line {} is not `TIME STREAM TAGS TEXT`: {line:?}", n + 1);
        };
        let text = parts.next().unwrap_or("");
        if s != "stdout" && s != "stderr" {
            bail!("line {} names stream {s:?}: {line:?}", n + 1);
        }
        if s != stream {
            continue;
        }
        out.push_str(text);
        if !tags.split(':').any(|t| t == "P") {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Writes a `certs.d`-style `config_path` directory in which `addr` (`127.0.0.1:PORT`) is a
/// plain-HTTP registry: `DIR/ADDR/hosts.toml`.
pub fn write_plain_http_hosts(dir: &Path, addr: &str) -> Result<()> {
    let host_dir = dir.join(addr);
    fs::create_dir_all(&host_dir).with_context(|| format!("creating {}", host_dir.display()))?;
    let hosts = format!(
        "server = \"http://{addr}\"\n\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    );
    let path = host_dir.join("hosts.toml");
    fs::write(&path, hosts).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// Applets the test images link to busybox.
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "sleep",
    "ls",
    "true",
    "false",
    "wc",
    "head",
    "sha256sum",
    "env",
];

/// Writes a layer tar with the system's static busybox (Debian busybox-static) as `/bin/busybox`,
/// a few applets, `/etc/passwd`, `/etc/group` and the usual empty directories.
pub fn write_busybox_layer(path: &Path) -> Result<()> {
    let busybox = fs::read("/bin/busybox")
        .context("reading /bin/busybox (Debian package busybox-static; .ci/install-deps.sh)")?;
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut b = tar::Builder::new(file);
    for dir in ["bin", "etc", "dev", "proc", "sys", "root", "tmp"] {
        let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
        let mut h = tar_header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h, dir, std::io::empty())
            .with_context(|| format!("adding {dir}"))?;
    }
    let mut h = tar_header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", &busybox[..])
        .context("adding bin/busybox")?;
    for applet in APPLETS {
        let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .with_context(|| format!("adding bin/{applet}"))?;
    }
    for (name, text) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
    ] {
        let mut h = tar_header(tar::EntryType::Regular, 0o644, text.len() as u64);
        b.append_data(&mut h, name, text.as_bytes())
            .with_context(|| format!("adding {name}"))?;
    }
    b.into_inner()
        .and_then(|mut f| std::io::Write::flush(&mut f))
        .with_context(|| format!("finishing {}", path.display()))?;
    Ok(())
}

/// The pause program: sleeps until SIGTERM or SIGINT, then exits 0 (as PID 1 of the sandbox it
/// only gets signals it handles, hence the trap).
const PAUSE_SCRIPT: &str = "#!/bin/sh\n\
    trap 'exit 0' TERM INT\n\
    while :; do sleep 3600 & wait $!; done\n";

/// Builds, in OCI layout `layout`, a busybox image tagged `busybox` (`/bin/sh` as its command)
/// and a pause image tagged `pause` (the same layer plus `/pause`, its entrypoint).
/// `work` holds the layer tars.
pub fn build_test_images(work: &Path, layout: &Path) -> Result<()> {
    let base = work.join("busybox.tar");
    write_busybox_layer(&base)?;
    let pause = work.join("pause.tar");
    {
        let file = File::create(&pause).with_context(|| format!("creating {}", pause.display()))?;
        let mut b = tar::Builder::new(file);
        let mut h = tar_header(tar::EntryType::Regular, 0o755, PAUSE_SCRIPT.len() as u64);
        b.append_data(&mut h, "pause", PAUSE_SCRIPT.as_bytes())
            .context("adding /pause")?;
        b.into_inner().context("finishing the pause layer")?;
    }
    let env = vec!["PATH=/bin".to_string()];
    oci_layout::build_with_config(
        layout,
        "busybox",
        &[LayerSpec::new(&base, Compression::Gzip)],
        &ImageConfig {
            cmd: Some(vec!["/bin/sh".into()]),
            env: env.clone(),
            ..Default::default()
        },
    )?;
    oci_layout::build_with_config(
        layout,
        "pause",
        &[
            LayerSpec::new(&base, Compression::Gzip),
            LayerSpec::new(&pause, Compression::Gzip),
        ],
        &ImageConfig {
            entrypoint: Some(vec!["/pause".into()]),
            env,
            ..Default::default()
        },
    )?;
    Ok(())
}

/// A registry with a pause and a busybox image, and a containerd whose CRI plugin uses that
/// pause image and pulls from the registry over plain HTTP. Dropping it stops containerd
/// first, then the registry.
#[derive(Debug)]
pub struct CriEnv {
    /// The containerd (CRI enabled).
    pub containerd: Containerd,
    /// The registry.
    pub registry: Registry,
    /// `127.0.0.1:PORT/beam-test/busybox:1`: `/bin/sh` and a few applets.
    pub busybox_image: String,
    /// `127.0.0.1:PORT/beam-test/pause:1`: the sandbox image.
    pub pause_image: String,
    hosts_dir: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl CriEnv {
    /// Starts containerd `version` with CRI and default settings (overlayfs).
    pub fn start(version: ContainerdVersion) -> Result<CriEnv> {
        Self::start_with(ContainerdOptions {
            version,
            cri: true,
            ..Default::default()
        })
    }

    /// Starts a registry, pushes the test images, and starts containerd with `opts` (`cri` is
    /// forced on; the sandbox image and registry `config_path` are filled in where `None`).
    pub fn start_with(mut opts: ContainerdOptions) -> Result<CriEnv> {
        let work = tempfile::Builder::new()
            .prefix("beam-cri-")
            .tempdir()
            .context("creating a work directory")?;
        let layout = work.path().join("layout");
        build_test_images(work.path(), &layout)?;
        let registry = Registry::start()?;
        let busybox_image = format!("{}/beam-test/busybox:1", registry.addr());
        let pause_image = format!("{}/beam-test/pause:1", registry.addr());
        oci_layout::push_with_skopeo(&layout, "busybox", &busybox_image)?;
        oci_layout::push_with_skopeo(&layout, "pause", &pause_image)?;

        let hosts_dir = tempfile::Builder::new()
            .prefix("beam-certs.d-")
            .tempdir()
            .context("creating the registry hosts directory")?;
        write_plain_http_hosts(hosts_dir.path(), &registry.addr())?;
        opts.cri = true;
        let cri: &mut CriConfig = &mut opts.cri_config;
        cri.sandbox_image.get_or_insert_with(|| pause_image.clone());
        cri.registry_config_path
            .get_or_insert_with(|| hosts_dir.path().to_path_buf());
        let containerd = Containerd::start_with(opts)?;
        Ok(CriEnv {
            containerd,
            registry,
            busybox_image,
            pause_image,
            hosts_dir,
            work,
        })
    }

    /// A [`Kubelet`] on this containerd.
    pub fn kubelet(&self) -> Result<Kubelet> {
        Kubelet::connect(&self.containerd)
    }

    /// The `config_path` directory with the registry's `hosts.toml`.
    pub fn hosts_dir(&self) -> &Path {
        self.hosts_dir.path()
    }

    /// A scratch directory that lives as long as this environment.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Mount points under containerd's root and state directories (none once every pod and
    /// container is removed).
    pub fn mounts(&self) -> Result<Vec<PathBuf>> {
        let mut m = util::mounts_under(self.containerd.root())?;
        m.extend(util::mounts_under(self.containerd.state())?);
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_joined() {
        let log = "2025-01-01T00:00:00.000000001Z stdout F hello\n\
                   2025-01-01T00:00:00.1Z stderr F oops\n\
                   2025-01-01T00:00:00.2Z stdout P par\n\
                   2025-01-01T00:00:00.3Z stdout F tial line\n\
                   2025-01-01T00:00:00.4Z stdout F \n\
                   2025-01-01T00:00:00.5Z stdout F with  two spaces\n";
        assert_eq!(
            parse_cri_log(log, "stdout").unwrap(),
            "hello\npartial line\n\nwith  two spaces\n"
        );
        assert_eq!(parse_cri_log(log, "stderr").unwrap(), "oops\n");
        assert!(parse_cri_log("garbage\n", "stdout").is_err());
    }

    #[test]
    fn hosts_toml_names_plain_http() {
        let dir = tempfile::tempdir().unwrap();
        write_plain_http_hosts(dir.path(), "127.0.0.1:5000").unwrap();
        let text = fs::read_to_string(dir.path().join("127.0.0.1:5000/hosts.toml")).unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert_eq!(
            t["host"]["http://127.0.0.1:5000"]["capabilities"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
