//! OCI image layouts on disk (`oci:DIR[:tag]`): read images from them, write Beam artifacts
//! and copied images into them.

use crate::oci::{self, Descriptor, ImageIndex};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// An OCI image layout directory.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn open(dir: &Path) -> Result<Self> {
        let marker = dir.join("oci-layout");
        let text = std::fs::read_to_string(&marker)
            .with_context(|| format!("{} is not an OCI image layout", dir.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", marker.display()))?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            bail!("{}: unsupported imageLayoutVersion", marker.display());
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    /// Create an empty layout (or open an existing one).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !dir.join("index.json").exists() {
            std::fs::write(
                dir.join("index.json"),
                serde_json::to_vec(&ImageIndex::empty())?,
            )?;
        }
        Self::open(dir)
    }

    pub fn index(&self) -> Result<ImageIndex> {
        let p = self.dir.join("index.json");
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))
    }

    fn write_index(&self, index: &ImageIndex) -> Result<()> {
        let p = self.dir.join("index.json");
        let tmp = self.dir.join(".index.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(index)?)?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
    }

    /// The descriptor tagged `tag`; with no tag, the only entry of index.json.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor> {
        let index = self.index()?;
        let tagged = |d: &&Descriptor| d.annotation(oci::ANNOTATION_REF_NAME) == tag;
        let found: Vec<&Descriptor> = match tag {
            Some(_) => index.manifests.iter().filter(tagged).collect(),
            None => index
                .manifests
                .iter()
                .filter(|d| d.artifact_type.is_none())
                .collect(),
        };
        match found.as_slice() {
            [d] => Ok((*d).clone()),
            [] => bail!(
                "{}: no image tagged {:?}",
                self.dir.display(),
                tag.unwrap_or("")
            ),
            _ => bail!(
                "{}: several images; name one with oci:DIR:TAG",
                self.dir.display()
            ),
        }
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        if !oci::is_sha256_digest(digest) {
            bail!("unsupported digest {digest:?}");
        }
        Ok(self.dir.join("blobs/sha256").join(&digest[7..]))
    }

    /// Read a blob, checking its digest.
    pub fn blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        let data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        if oci::sha256_digest(&data) != digest {
            bail!("{}: content does not match its digest", p.display());
        }
        Ok(data)
    }

    /// Store a blob (no-op when present).
    pub fn put_blob(&self, data: &[u8]) -> Result<String> {
        let digest = oci::sha256_digest(data);
        let p = self.blob_path(&digest)?;
        if !p.exists() {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, data)?;
            std::fs::rename(&tmp, &p)?;
        }
        Ok(digest)
    }

    /// Move a file in as a blob with a known digest.
    pub fn put_blob_file(&self, src: &Path, digest: &str) -> Result<()> {
        let p = self.blob_path(digest)?;
        if !p.exists() {
            std::fs::copy(src, &p).with_context(|| format!("copying into {}", p.display()))?;
        }
        Ok(())
    }

    /// Add a manifest descriptor to index.json unless an entry with its digest is there.
    pub fn add_manifest(&self, desc: Descriptor) -> Result<()> {
        let mut index = self.index()?;
        if index.manifests.iter().any(|d| d.digest == desc.digest) {
            return Ok(());
        }
        // A tag names one image, as in a registry: the tag moves to the new manifest, and the
        // entry it leaves (its blob stays) is dropped.
        if let Some(tag) = desc.annotation(oci::ANNOTATION_REF_NAME) {
            index
                .manifests
                .retain(|d| d.annotation(oci::ANNOTATION_REF_NAME) != Some(tag));
        }
        index.manifests.push(desc);
        self.write_index(&index)
    }

    /// Artifacts in index.json whose subject is `subject`.
    pub fn referrers(&self, subject: &str) -> Result<Vec<Descriptor>> {
        let mut out = Vec::new();
        for d in self.index()?.manifests {
            if d.artifact_type.is_none() {
                continue;
            }
            let m: oci::ImageManifest = serde_json::from_slice(&self.blob(&d.digest)?)?;
            if m.subject.as_ref().map(|s| s.digest.as_str()) == Some(subject) {
                out.push(d);
            }
        }
        Ok(out)
    }
}
