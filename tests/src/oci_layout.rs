//! Builds OCI image layouts from uncompressed layer tars, deterministically, and pushes them
//! to a registry with skopeo.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::util;

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an OCI image index.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The annotation naming a manifest in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`
    Zstd,
    /// `application/vnd.oci.image.layer.v1.tar`
    None,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// One layer: an uncompressed tar file and how to compress it.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// The uncompressed tar.
    pub tar: PathBuf,
    /// Compression of the blob.
    pub compression: Compression,
    /// Annotations on the layer's descriptor in the manifest.
    pub annotations: BTreeMap<String, String>,
}

impl LayerSpec {
    /// A layer from `tar`, compressed with `compression`, without annotations.
    pub fn new(tar: impl Into<PathBuf>, compression: Compression) -> LayerSpec {
        LayerSpec {
            tar: tar.into(),
            compression,
            annotations: BTreeMap::new(),
        }
    }
}

/// The optional runtime parts of the image config.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    /// `config.Cmd`
    pub cmd: Option<Vec<String>>,
    /// `config.Entrypoint`
    pub entrypoint: Option<Vec<String>>,
    /// `config.Env` (`KEY=VALUE`); omitted when empty.
    pub env: Vec<String>,
    /// `config.WorkingDir`
    pub working_dir: Option<String>,
}

/// What [`build_with_config`] wrote.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
    /// `sha256:...` of the config.
    pub config_digest: String,
    /// Per layer: `(blob digest, diff_id, blob size)`.
    pub layers: Vec<(String, String, u64)>,
}

/// A writer that hashes and counts what passes through it.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn blobs_dir(dir: &Path) -> PathBuf {
    dir.join("blobs").join("sha256")
}

/// Writes `data` as a blob; returns `(digest, size)`.
fn write_blob(dir: &Path, data: &[u8]) -> Result<(String, u64)> {
    let hex = hex::encode(Sha256::digest(data));
    let path = blobs_dir(dir).join(&hex);
    fs::write(&path, data).with_context(|| format!("writing blob {}", path.display()))?;
    Ok((format!("sha256:{hex}"), data.len() as u64))
}

/// Compresses one tar into a blob; returns `(blob digest, diff_id, blob size)`.
fn write_layer(dir: &Path, layer: &LayerSpec) -> Result<(String, String, u64)> {
    let tmp = tempfile::NamedTempFile::new_in(blobs_dir(dir))
        .context("creating a temporary blob file")?;
    let out = HashWriter {
        inner: BufWriter::new(tmp.reopen().context("reopening the temporary blob file")?),
        hasher: Sha256::new(),
        len: 0,
    };
    let input = File::open(&layer.tar)
        .with_context(|| format!("opening layer tar {}", layer.tar.display()))?;
    let mut input = BufReader::with_capacity(1 << 20, input);
    let mut diff_hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];

    fn pump(
        input: &mut impl Read,
        out: &mut impl Write,
        hasher: &mut Sha256,
        buf: &mut [u8],
        what: &Path,
    ) -> Result<()> {
        loop {
            let n = input
                .read(buf)
                .with_context(|| format!("reading {}", what.display()))?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .context("writing the compressed layer")?;
        }
    }

    let mut out = match layer.compression {
        Compression::Gzip => {
            // GzBuilder writes mtime 0 and no file name: the output depends on the input alone.
            let mut enc = flate2::GzBuilder::new().write(out, flate2::Compression::default());
            pump(&mut input, &mut enc, &mut diff_hasher, &mut buf, &layer.tar)?;
            enc.finish().context("finishing gzip")?
        }
        Compression::Zstd => {
            let mut enc = zstd::Encoder::new(out, 3).context("starting zstd")?;
            enc.include_checksum(true).context("configuring zstd")?;
            pump(&mut input, &mut enc, &mut diff_hasher, &mut buf, &layer.tar)?;
            enc.finish().context("finishing zstd")?
        }
        Compression::None => {
            let mut out = out;
            pump(&mut input, &mut out, &mut diff_hasher, &mut buf, &layer.tar)?;
            out
        }
    };
    out.flush().context("flushing the layer blob")?;
    let digest_hex = hex::encode(out.hasher.finalize());
    let size = out.len;
    drop(out.inner);
    let dest = blobs_dir(dir).join(&digest_hex);
    tmp.persist(&dest)
        .with_context(|| format!("moving the layer blob to {}", dest.display()))?;
    let diff_id = format!("sha256:{}", hex::encode(diff_hasher.finalize()));
    Ok((format!("sha256:{digest_hex}"), diff_id, size))
}

/// Serialises JSON canonically enough to be deterministic (serde_json sorts object keys).
fn to_bytes(v: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec(v).context("serialising JSON")
}

/// [`build`] with every layer tar gzip-compressed: the common case in tests.
pub fn build_gzip(dir: &Path, tag: &str, tars: &[PathBuf]) -> Result<String> {
    let specs: Vec<LayerSpec> = tars
        .iter()
        .map(|p| LayerSpec::new(p, Compression::Gzip))
        .collect();
    build(dir, tag, &specs)
}

/// Builds (or adds to) an OCI image layout in `dir` with one image tagged `tag` made of
/// `layers` (bottom first), with a default config. Returns the manifest digest (`sha256:...`).
pub fn build(dir: &Path, tag: &str, layers: &[LayerSpec]) -> Result<String> {
    Ok(build_with_config(dir, tag, layers, &ImageConfig::default())?.manifest_digest)
}

/// [`build`] with an explicit image config; returns everything it wrote.
///
/// Deterministic: the same tars, compressions, annotations and config give the same digests.
/// An existing layout in `dir` is kept and `tag` is added to (or replaced in) its index.json.
pub fn build_with_config(
    dir: &Path,
    tag: &str,
    layers: &[LayerSpec],
    config: &ImageConfig,
) -> Result<BuiltImage> {
    if tag.is_empty() {
        bail!("an OCI layout tag cannot be empty");
    }
    fs::create_dir_all(blobs_dir(dir))
        .with_context(|| format!("creating {}", blobs_dir(dir).display()))?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .with_context(|| format!("writing {}/oci-layout", dir.display()))?;

    let mut written = Vec::with_capacity(layers.len());
    for layer in layers {
        written.push(write_layer(dir, layer)?);
    }

    let mut runtime = serde_json::Map::new();
    if let Some(cmd) = &config.cmd {
        runtime.insert("Cmd".into(), json!(cmd));
    }
    if let Some(ep) = &config.entrypoint {
        runtime.insert("Entrypoint".into(), json!(ep));
    }
    if !config.env.is_empty() {
        runtime.insert("Env".into(), json!(config.env));
    }
    if let Some(wd) = &config.working_dir {
        runtime.insert("WorkingDir".into(), json!(wd));
    }
    let diff_ids: Vec<&str> = written.iter().map(|(_, d, _)| d.as_str()).collect();
    let history: Vec<Value> = (0..written.len())
        .map(|i| json!({"created": "1970-01-01T00:00:00Z", "created_by": format!("beam-tests layer {i}")}))
        .collect();
    let config_json = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": Value::Object(runtime),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let (config_digest, config_size) = write_blob(dir, &to_bytes(&config_json)?)?;

    let layer_descs: Vec<Value> = written
        .iter()
        .zip(layers)
        .map(|((digest, _, size), spec)| {
            let mut d =
                json!({"mediaType": spec.compression.media_type(), "digest": digest, "size": size});
            if !spec.annotations.is_empty() {
                d["annotations"] = json!(spec.annotations);
            }
            d
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    });
    let manifest_bytes = to_bytes(&manifest)?;
    let (manifest_digest, manifest_size) = write_blob(dir, &manifest_bytes)?;

    // index.json: keep other tags, replace this one.
    let index_path = dir.join("index.json");
    let mut manifests: Vec<Value> = match fs::read(&index_path) {
        Ok(raw) => {
            let v: Value = serde_json::from_slice(&raw)
                .with_context(|| format!("parsing {}", index_path.display()))?;
            v.get("manifests")
                .and_then(|m| m.as_array())
                .cloned()
                .unwrap_or_default()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", index_path.display())),
    };
    manifests.retain(|m| {
        m.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1"))) != Some(&json!(tag))
    });
    manifests.push(json!({
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": manifest_digest,
        "size": manifest_size,
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {REF_NAME: tag},
    }));
    let index = json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests});
    fs::write(&index_path, to_bytes(&index)?)
        .with_context(|| format!("writing {}", index_path.display()))?;

    Ok(BuiltImage {
        manifest_digest,
        config_digest,
        layers: written,
    })
}

/// `skopeo copy --dest-tls-verify=false oci:LAYOUT:TAG docker://DEST` (DEST is
/// `host:port/repo:tag`). Digests are preserved: the registry gets exactly the built blobs.
pub fn push_with_skopeo(layout_dir: &Path, tag: &str, dest: &str) -> Result<()> {
    push_with_skopeo_creds(layout_dir, tag, dest, None)
}

/// [`push_with_skopeo`] with `user:pass` credentials for the destination.
pub fn push_with_skopeo_creds(
    layout_dir: &Path,
    tag: &str,
    dest: &str,
    creds: Option<&str>,
) -> Result<()> {
    let mut cmd = Command::new(util::tool_path(
        "BEAM_SKOPEO_BIN",
        "skopeo",
        "/usr/bin/skopeo",
    ));
    cmd.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]);
    if let Some(c) = creds {
        cmd.arg("--dest-creds").arg(c);
    } else {
        cmd.arg("--dest-no-creds");
    }
    cmd.arg(format!("oci:{}:{tag}", layout_dir.display()))
        .arg(format!("docker://{dest}"));
    util::run_checked(&mut cmd, Duration::from_secs(600)).with_context(|| {
        format!(
            "pushing oci:{}:{tag} to {dest} with skopeo",
            layout_dir.display()
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_tar(path: &Path, files: &[(&str, &[u8])]) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_600_000_000);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.finish().unwrap();
    }

    fn sha_file(p: &Path) -> String {
        hex::encode(Sha256::digest(fs::read(p).unwrap()))
    }

    #[test]
    fn builds_deterministic_layout_that_skopeo_accepts() {
        let tmp = tempfile::tempdir().unwrap();
        let t1 = tmp.path().join("l1.tar");
        let t2 = tmp.path().join("l2.tar");
        let t3 = tmp.path().join("l3.tar");
        make_tar(&t1, &[("a.txt", b"hello a\n")]);
        make_tar(&t2, &[("b.txt", &[7u8; 100_000])]);
        make_tar(&t3, &[("c.txt", b"")]);
        let mut l3 = LayerSpec::new(&t3, Compression::None);
        l3.annotations
            .insert("containerd.io/snapshot/test".into(), "x".into());
        let layers = vec![
            LayerSpec::new(&t1, Compression::Gzip),
            LayerSpec::new(&t2, Compression::Zstd),
            l3,
        ];
        let config = ImageConfig {
            cmd: Some(vec!["/bin/sh".into()]),
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        };
        let d1 = tmp.path().join("layout1");
        let d2 = tmp.path().join("layout2");
        let b1 = build_with_config(&d1, "v1", &layers, &config).unwrap();
        let b2 = build_with_config(&d2, "v1", &layers, &config).unwrap();
        assert_eq!(b1.manifest_digest, b2.manifest_digest);
        assert_eq!(
            fs::read(d1.join("index.json")).unwrap(),
            fs::read(d2.join("index.json")).unwrap()
        );
        // diff_id is the digest of the uncompressed tar; the uncompressed blob is the tar itself.
        assert_eq!(b1.layers[0].1, format!("sha256:{}", sha_file(&t1)));
        assert_eq!(b1.layers[2].0, b1.layers[2].1);
        // Every blob is named by its digest.
        for e in fs::read_dir(blobs_dir(&d1)).unwrap() {
            let e = e.unwrap();
            assert_eq!(e.file_name().to_str().unwrap(), sha_file(&e.path()));
        }
        // A second tag in the same layout keeps the first.
        let other = build(&d1, "v2", &layers[..1]).unwrap();
        let index: Value =
            serde_json::from_slice(&fs::read(d1.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
        // Rebuilding a tag replaces it.
        build(&d1, "v2", &layers[..1]).unwrap();
        let index: Value =
            serde_json::from_slice(&fs::read(d1.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2);

        let out = util::run_checked(
            Command::new("skopeo")
                .args(["--insecure-policy", "inspect", "--raw"])
                .arg(format!("oci:{}:v1", d1.display())),
            Duration::from_secs(60),
        )
        .unwrap();
        let raw_digest = format!("sha256:{}", hex::encode(Sha256::digest(&out.stdout)));
        assert_eq!(raw_digest, b1.manifest_digest);
        let out = util::run_checked(
            Command::new("skopeo")
                .args(["--insecure-policy", "inspect"])
                .arg(format!("oci:{}:v2", d1.display())),
            Duration::from_secs(60),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["Digest"], json!(other));
        assert_eq!(v["Architecture"], json!("amd64"));

        // umoci validates config and layers more strictly.
        let out = util::run_checked(
            Command::new("umoci")
                .args(["stat", "--image"])
                .arg(format!("{}:v1", d1.display())),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("beam-tests layer 2"),
            "{out:?}"
        );
    }
}
