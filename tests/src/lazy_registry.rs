//! A registry for lazy-pull tests through containerd: Debian's docker-registry behind the
//! recording proxy (so a test can tell which blobs and ranges were fetched), holding a pause
//! image (unconverted) and a busybox image converted by `beam convert`, plus a containerd-style
//! `hosts.toml` directory that names the proxy as a plain-HTTP registry (for containerd's
//! `config_path` and beam-snapshotter's `--hosts-dir` alike).

use std::path::PathBuf;

use anyhow::Result;

use crate::{beam, cri, oci_layout, Proxy, Registry};

/// See the module documentation. Dropping it stops the proxy, then the registry.
pub struct LazyRegistry {
    pub proxy: Proxy,
    _registry: Registry,
    /// The hosts.toml directory.
    pub hosts: tempfile::TempDir,
    /// Work directory (layer tars, the OCI layout at `layout`); tests may add files.
    pub work: tempfile::TempDir,
    /// The OCI layout the images were built in (tags `busybox`, `pause`).
    pub layout: PathBuf,
    /// `PROXY/REPO/pause:1`, not converted (CRI's sandbox image).
    pub pause: String,
    /// `PROXY/REPO/busybox:1`, converted.
    pub busybox: String,
}

impl LazyRegistry {
    /// Starts it with the images under repository prefix `repo` (e.g. `e2e`).
    pub fn start(repo: &str) -> Result<LazyRegistry> {
        let registry = Registry::start()?;
        let proxy = Proxy::start(&registry.addr())?;
        let work = tempfile::Builder::new().prefix("beam-lazy-").tempdir()?;
        let layout = work.path().join("layout");
        cri::build_test_images(work.path(), &layout)?;
        let pause = format!("{}/{repo}/pause:1", proxy.addr());
        oci_layout::push_with_skopeo(&layout, "pause", &pause)?;
        let busybox = format!("{}/{repo}/busybox:1", proxy.addr());
        beam::ok(&[
            "convert",
            "--plain-http",
            &format!("oci:{}:busybox", layout.display()),
            &busybox,
        ])?;
        let hosts = tempfile::Builder::new().prefix("beam-certs.d-").tempdir()?;
        cri::write_plain_http_hosts(hosts.path(), &proxy.addr())?;
        Ok(LazyRegistry {
            proxy,
            _registry: registry,
            hosts,
            work,
            layout,
            pause,
            busybox,
        })
    }

    /// The hosts directory as a string argument.
    pub fn hosts_arg(&self) -> Result<String> {
        self.hosts
            .path()
            .to_str()
            .map(String::from)
            .ok_or_else(|| anyhow::anyhow!("hosts dir path is not UTF-8"))
    }
}
