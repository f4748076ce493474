//! The one way tests make the images they need: layer tars written in a temporary directory,
//! built into an OCI layout, and put into a real registry (optionally behind the recording,
//! fault-injecting proxy) by `beam convert` or, unconverted, by skopeo.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use beam_tests::fixture::Fixture;
//! let fx = Fixture::with_proxy()?;
//! let image = fx
//!     .image("app")
//!     .busybox()?
//!     .files(&[("data/hello.txt".into(), b"hello\n".to_vec())])?
//!     .build()?;
//! let lazy = image.convert("app/lazy:v1", &["--chunk-size", "65536"])?;
//! let plain = image.push("app/plain:v1")?;
//! # Ok(()) }
//! ```

use crate::oci_layout::{self, BuiltImage, Compression, ImageConfig, LayerSpec};
use crate::{beam, util, Proxy, Registry};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The tag every fixture image has in its layout.
const TAG: &str = "v1";

/// A work directory, and optionally a registry with the proxy in front of it. Fields drop in
/// order: the proxy before the registry it forwards to, then the files.
pub struct Fixture {
    proxy: Option<Proxy>,
    registry: Option<Registry>,
    work: tempfile::TempDir,
}

impl Fixture {
    /// A work directory only: images are used from their layout (`oci:` references).
    pub fn new() -> Result<Fixture> {
        Ok(Fixture {
            proxy: None,
            registry: None,
            work: tempfile::tempdir()?,
        })
    }

    /// A work directory and a registry; images are pushed to the registry directly.
    pub fn with_registry() -> Result<Fixture> {
        Ok(Fixture {
            registry: Some(Registry::start()?),
            ..Fixture::new()?
        })
    }

    /// A work directory and the registry given (e.g. one that sends notifications).
    pub fn with_this_registry(registry: Registry) -> Result<Fixture> {
        Ok(Fixture {
            registry: Some(registry),
            ..Fixture::new()?
        })
    }

    /// A work directory, a registry and the proxy in front of it; images are pushed (and
    /// read) through the proxy, which records every request.
    pub fn with_proxy() -> Result<Fixture> {
        let mut fx = Fixture::with_registry()?;
        fx.proxy = Some(Proxy::start(&fx.registry().addr())?);
        Ok(fx)
    }

    /// The work directory.
    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    /// `name` in the work directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// The registry. Panics without one ([`Fixture::with_registry`]).
    pub fn registry(&self) -> &Registry {
        self.registry
            .as_ref()
            .expect("a fixture without a registry")
    }

    /// The proxy. Panics without one ([`Fixture::with_proxy`]).
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("a fixture without a proxy")
    }

    /// Where images go, `host:port`: the proxy if there is one, else the registry.
    pub fn addr(&self) -> String {
        match (&self.proxy, &self.registry) {
            (Some(p), _) => p.addr(),
            (None, Some(r)) => r.addr(),
            (None, None) => panic!("a fixture without a registry"),
        }
    }

    /// Starts an image whose layout is `layout-NAME` in the work directory.
    pub fn image(&self, name: &str) -> ImageBuilder {
        ImageBuilder {
            name: name.to_string(),
            work: self.work.path().to_path_buf(),
            addr: self.registry.as_ref().map(|_| self.addr()),
            layers: Vec::new(),
            config: ImageConfig::default(),
        }
    }
}

/// An image being described, bottom layer first.
pub struct ImageBuilder {
    name: String,
    work: PathBuf,
    addr: Option<String>,
    layers: Vec<LayerSpec>,
    config: ImageConfig,
}

impl ImageBuilder {
    /// A layer tar of this image in the work directory, numbered by position.
    fn next_tar(&self, what: &str) -> PathBuf {
        let n = self.layers.len();
        self.work.join(format!("{}-{n}-{what}.tar", self.name))
    }

    /// A gzip layer with busybox (`make-busybox-layer.sh`).
    pub fn busybox(mut self) -> Result<Self> {
        let tar = self.next_tar("busybox");
        util::run_fixture("make-busybox-layer.sh", &[&tar])?;
        self.layers.push(LayerSpec::new(tar, Compression::Gzip));
        Ok(self)
    }

    /// A gzip layer of regular files (`path`, contents), as [`util::write_tar`] writes them.
    pub fn files(self, files: &[(String, Vec<u8>)]) -> Result<Self> {
        self.files_as(Compression::Gzip, files)
    }

    /// [`ImageBuilder::files`] compressed as `compression`.
    pub fn files_as(
        mut self,
        compression: Compression,
        files: &[(String, Vec<u8>)],
    ) -> Result<Self> {
        let tar = self.next_tar("files");
        util::write_tar(&tar, files)?;
        self.layers.push(LayerSpec::new(tar, compression));
        Ok(self)
    }

    /// Gzip layers of tars written elsewhere (fixture scripts, test helpers).
    pub fn tars(mut self, tars: &[PathBuf]) -> Self {
        for tar in tars {
            self.layers.push(LayerSpec::new(tar, Compression::Gzip));
        }
        self
    }

    /// The image config (the default has none of its optional parts).
    pub fn config(mut self, config: ImageConfig) -> Self {
        self.config = config;
        self
    }

    /// Writes the OCI layout.
    pub fn build(self) -> Result<Image> {
        let layout = self.work.join(format!("layout-{}", self.name));
        let built = oci_layout::build_with_config(&layout, TAG, &self.layers, &self.config)
            .with_context(|| format!("building image {}", self.name))?;
        Ok(Image {
            layout,
            built,
            addr: self.addr,
        })
    }
}

/// A built image: its OCI layout, and the fixture's registry to put it in.
pub struct Image {
    pub layout: PathBuf,
    pub built: BuiltImage,
    addr: Option<String>,
}

/// What `beam convert` made.
pub struct Converted {
    /// `host:port/repo:tag`.
    pub reference: String,
    /// What it printed (a JSON report with `--json`).
    pub stdout: String,
}

impl Converted {
    /// The manifest the tag names after the conversion: the bound manifest `beam convert`
    /// printed (what containerd resolves the tag to, and so what CRI passes as
    /// `cri.manifest-digest`).
    pub fn manifest_digest(&self) -> Result<String> {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&self.stdout) {
            if let Some(b) = v[0]["bound"].as_str() {
                return Ok(b.to_string());
            }
        }
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix("bound image "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(String::from)
            .with_context(|| format!("beam convert printed no bound image: {}", self.stdout))
    }

    /// The chunk blob and index blob digests of layer `layer` (needs `--json`).
    pub fn layer_blobs(&self, layer: usize) -> Result<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(&self.stdout)
            .with_context(|| format!("beam convert printed {}", self.stdout))?;
        let field = |name: &str| {
            v[0]["layers"][layer][name]
                .as_str()
                .map(String::from)
                .with_context(|| format!("no {name} for layer {layer} in {}", self.stdout))
        };
        Ok((field("chunks")?, field("index")?))
    }
}

impl Image {
    /// `oci:LAYOUT:TAG`, for `beam convert` in place, `beam unpack` and `beam mount`.
    pub fn oci(&self) -> String {
        format!("oci:{}:{TAG}", self.layout.display())
    }

    fn reference(&self, repo: &str) -> String {
        let addr = self.addr.as_deref().expect("a fixture without a registry");
        format!("{addr}/{repo}")
    }

    /// `beam convert --plain-http EXTRA oci:LAYOUT:TAG ADDR/REPO` (`repo` is `name:tag`).
    pub fn convert(&self, repo: &str, extra: &[&str]) -> Result<Converted> {
        let reference = self.reference(repo);
        let src = self.oci();
        let mut args = vec!["convert", "--plain-http"];
        args.extend_from_slice(extra);
        args.extend([src.as_str(), reference.as_str()]);
        let stdout = beam::ok(&args)?;
        Ok(Converted { reference, stdout })
    }

    /// Pushes the image unconverted (skopeo, digests kept) to `ADDR/REPO`; returns the reference.
    pub fn push(&self, repo: &str) -> Result<String> {
        let reference = self.reference(repo);
        oci_layout::push_with_skopeo(&self.layout, TAG, &reference)?;
        Ok(reference)
    }
}
